// The low-latency engine's TypeScript side without a GPU (test/fixtures/ll_engine_stub.ts): the
// argument structs it hands the native calls, the buffer parities, hooks, the cached output views
// and the error word. The kernels themselves are tested on a GPU (test/gpu/low_latency.test.ts).
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { BunEpError, nativeAvailability, Status } from "../lib/ffi.ts";
import { LL_COMBINE, LL_DISPATCH, LL_PHASE, LL_VIEWS } from "../lib/native/low_latency.ts";
import type { LowLatencyDispatchArgs } from "../lib/backend/types.ts";
import { DeviceTensor } from "../lib/tensor.ts";
import { FAKE_BASE, fakeViewAddress, stubbedEngine, type StubbedEngine } from "./fixtures/ll_engine_stub.ts";

const available = nativeAvailability();
if (!available.ok) console.log(`skipping the low-latency engine's host tests: ${available.reason}`);

describe.skipIf(!available.ok)("low-latency engine, host side (native calls stubbed)", () => {
  let s: StubbedEngine;
  beforeAll(() => {
    s = stubbedEngine();
  });
  afterAll(() => s.restore());

  // Fresh made-up addresses per test: a field copied from a stale call would not match.
  let nextAddress = FAKE_BASE + 2 ** 44;
  const address = (): number => (nextAddress += 2 ** 30);
  const inputs = (tokens: number, topk = 8) => ({
    x: DeviceTensor.fromPointer(address(), "bf16", [tokens, 7168], 0),
    topkIdx: DeviceTensor.fromPointer(address(), "i64", [tokens, topk], 0),
    topkWeights: DeviceTensor.fromPointer(address(), "f32", [tokens, topk], 0),
  });
  const dispatchArgs = (x: DeviceTensor, topkIdx: DeviceTensor, extra: Partial<LowLatencyDispatchArgs> = {}): LowLatencyDispatchArgs => ({
    x, topkIdx, maxTokensPerRank: 128, numExperts: 256, useFp8: true, roundScale: false, useUe8m0: false,
    cumulativeRecvStats: null, waitStats: null, hook: false, asyncFinish: false, stream: 0x55aa_0000 + nextAddress % 4096, ...extra,
  });
  const field = (struct: bigint[] | undefined, index: number): number => Number(struct![index]!);

  test("a dispatch hands over every field, alternates the parity, and returns the parity's views", () => {
    for (let call = 0; call < 4; call++) {
      const { x, topkIdx } = inputs(37 + call, 6);
      const stats = DeviceTensor.fromPointer(address(), "i32", [128], 0);
      const args = dispatchArgs(x, topkIdx, { useUe8m0: call % 2 === 1, roundScale: call % 2 === 1, cumulativeRecvStats: stats });
      const parity = s.engine.nextParity;
      const before = s.dispatches.length;
      const result = s.engine.dispatchSync(args);
      expect(s.dispatches.length).toBe(before + 1);
      const struct = s.dispatches.at(-1);
      expect(field(struct, LL_DISPATCH.x)).toBe(x.ptr);
      expect(field(struct, LL_DISPATCH.topkIdx)).toBe(topkIdx.ptr);
      expect(field(struct, LL_DISPATCH.numTokens)).toBe(37 + call);
      expect(field(struct, LL_DISPATCH.numTopk)).toBe(6);
      expect(field(struct, LL_DISPATCH.parity)).toBe(parity);
      expect(field(struct, LL_DISPATCH.useFp8)).toBe(1);
      expect(field(struct, LL_DISPATCH.roundScale)).toBe(call % 2);
      expect(field(struct, LL_DISPATCH.useUe8m0)).toBe(call % 2);
      expect(field(struct, LL_DISPATCH.cumulativeRecvStats)).toBe(stats.ptr);
      expect(field(struct, LL_DISPATCH.waitStats)).toBe(0);
      expect(field(struct, LL_DISPATCH.phases)).toBe(LL_PHASE.send | LL_PHASE.recv);
      expect(field(struct, LL_DISPATCH.stream)).toBe(args.stream!);
      expect(s.engine.nextParity).toBe(parity === 0 ? 1 : 0);
      expect(result.handle.bufferParity).toBe(parity);
      expect(result.handle.numTokens).toBe(37 + call);
      expect((result.recvX as DeviceTensor).ptr).toBe(fakeViewAddress(parity, LL_VIEWS.recvX));
      expect((result.recvXScales as DeviceTensor).ptr).toBe(fakeViewAddress(parity, LL_VIEWS.recvXScales));
      expect(result.recvXScales!.dtype).toBe(call % 2 === 1 ? "i32" : "f32");
      // Without hook: nothing left to launch.
      result.hook();
      expect(s.dispatches.length).toBe(before + 1);
    }
  });

  test("hook mode: the send launches, hook() launches the receive once with the same fields, a second hook() throws", () => {
    const { x, topkIdx } = inputs(128);
    const before = s.dispatches.length;
    const result = s.engine.dispatchSync(dispatchArgs(x, topkIdx, { hook: true }));
    expect(field(s.dispatches.at(-1), LL_DISPATCH.phases)).toBe(LL_PHASE.send);
    result.hook();
    expect(s.dispatches.length).toBe(before + 2);
    const [send, recv] = s.dispatches.slice(-2);
    expect(field(recv, LL_DISPATCH.phases)).toBe(LL_PHASE.recv);
    for (const index of [LL_DISPATCH.x, LL_DISPATCH.topkIdx, LL_DISPATCH.numTokens, LL_DISPATCH.parity, LL_DISPATCH.stream]) {
      expect(field(recv, index)).toBe(field(send, index));
    }
    expect(() => result.hook()).toThrow(/hook\(\) may be called only once/);
    expect(s.dispatches.length).toBe(before + 2);
  });

  test("a zero-copy combine reads the handle's parity and count; its output view is made once per count", () => {
    const a = inputs(128);
    const first = s.engine.dispatchSync(dispatchArgs(a.x, a.topkIdx));
    const b = inputs(64);
    const second = s.engine.dispatchSync(dispatchArgs(b.x, b.topkIdx));
    const combine = (handle: typeof first.handle, topkIdx: DeviceTensor, topkWeights: DeviceTensor, out: DeviceTensor | null = null) =>
      s.engine.combineSync({
        x: s.engine.getNextCombineBuffer(handle), topkIdx, topkWeights, handle, zeroCopy: true, out, hook: false, asyncFinish: false, stream: 7,
      });
    const r1 = combine(first.handle, a.topkIdx, a.topkWeights);
    const struct = s.combines.at(-1);
    const parity = first.handle.bufferParity;
    expect(field(struct, LL_COMBINE.x)).toBe(fakeViewAddress(parity, LL_VIEWS.combineBuffer));
    expect(field(struct, LL_COMBINE.topkIdx)).toBe(a.topkIdx.ptr);
    expect(field(struct, LL_COMBINE.topkWeights)).toBe(a.topkWeights.ptr);
    expect(field(struct, LL_COMBINE.numTokens)).toBe(128);
    expect(field(struct, LL_COMBINE.numTopk)).toBe(8);
    expect(field(struct, LL_COMBINE.parity)).toBe(parity);
    expect(field(struct, LL_COMBINE.out)).toBe(fakeViewAddress(parity, LL_VIEWS.combinedX));
    expect(field(struct, LL_COMBINE.phases)).toBe(LL_PHASE.send | LL_PHASE.recv);
    expect(field(struct, LL_COMBINE.stream)).toBe(7);
    expect(r1.combinedX.shape).toEqual([128, 7168]);
    const r2 = combine(second.handle, b.topkIdx, b.topkWeights);
    expect(field(s.combines.at(-1), LL_COMBINE.parity)).toBe(second.handle.bufferParity);
    expect(r2.combinedX.shape).toEqual([64, 7168]);
    // The same (parity, count) gives the same view object; a caller's `out` is used as given.
    expect(combine(first.handle, a.topkIdx, a.topkWeights).combinedX).toBe(r1.combinedX);
    const out = DeviceTensor.fromPointer(address(), "bf16", [128, 7168], 0);
    expect(combine(first.handle, a.topkIdx, a.topkWeights, out).combinedX).toBe(out);
    expect(field(s.combines.at(-1), LL_COMBINE.out)).toBe(out.ptr);
  });

  test("a refused launch throws naming the call and leaves the parity alternation as it was", () => {
    const { x, topkIdx } = inputs(8);
    const parity = s.engine.nextParity;
    s.next.dispatch = Status.InvalidArgument;
    try {
      expect(() => s.engine.dispatchSync(dispatchArgs(x, topkIdx))).toThrow(/lowLatencyDispatch on rank 0/);
    } finally {
      s.next.dispatch = Status.Success;
    }
    expect(s.engine.nextParity).toBe(parity);
  });

  test("the error word: clear, no native check; set, the native check runs and its error is thrown", () => {
    const checks = s.checks.count;
    s.engine.checkError();
    const { x, topkIdx } = inputs(8);
    s.engine.dispatchSync(dispatchArgs(x, topkIdx));
    expect(s.checks.count).toBe(checks);
    s.errorWord[0] = 1;
    s.next.check = Status.Timeout;
    try {
      let thrown: unknown = null;
      try {
        s.engine.checkError();
      } catch (err) {
        thrown = err;
      }
      expect(thrown).toBeInstanceOf(BunEpError);
      expect((thrown as BunEpError).status).toBe(Status.Timeout);
      expect(s.checks.count).toBe(checks + 1);
      const before = s.dispatches.length;
      expect(() => s.engine.dispatchSync(dispatchArgs(x, topkIdx))).toThrow(BunEpError);
      expect(s.dispatches.length).toBe(before);
    } finally {
      s.errorWord[0] = 0;
      s.next.check = Status.Success;
    }
  });
});
