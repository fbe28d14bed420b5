// Every argument check of EpBuffer (lib/validate.ts): each bad call throws EpArgumentError before
// anything runs, and its message names the argument, the given value and the expected one.

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import type { DispatchHandle, LowLatencyHandle } from "../lib/backend/types.ts";
import { EpBuffer } from "../lib/buffer.ts";
import { LocalGroup } from "../lib/group.ts";
import { makeRng, randomBf16, randomRouting, randomTopkWeights } from "../lib/reference.ts";
import { HostTensor, type Tensor } from "../lib/tensor.ts";
import { EpArgumentError } from "../lib/validate.ts";

const R = 2;
const E = 8;
const T = 6;
const H = 128;
const K = 2;
const M = 8;

let groups: LocalGroup[];
let bufs: EpBuffer[];
let other: EpBuffer; // a second buffer of rank 0 (its handles are foreign to bufs[0])
let b: EpBuffer;
const rng = makeRng(11);
const x = randomBf16(rng, [T, H]);
const topkIdx = randomRouting(rng, T, E, K);
const topkWeights = randomTopkWeights(rng, T, K);
let handle: DispatchHandle;
let llHandle: LowLatencyHandle;

/** Runs `fn` (sync or async) and checks the error: EpArgumentError naming `argument` and each part. */
async function expectArgError(fn: () => unknown, argument: string, ...parts: string[]): Promise<EpArgumentError> {
  let error: unknown = null;
  try {
    await fn();
  } catch (e) {
    error = e;
  }
  expect(error).toBeInstanceOf(EpArgumentError);
  const e = error as EpArgumentError;
  expect(e.argument).toBe(argument);
  expect(e.message).toContain(argument);
  for (const part of parts) expect(e.message).toContain(part);
  return e;
}

/** A tensor-shaped object standing for memory elsewhere (a device) or a strided view. */
function fakeTensor(dtype: Tensor["dtype"], shape: number[], device: Tensor["device"], contiguous = true): Tensor {
  const nothing = (): void => {};
  return { dtype, shape, device, numel: shape.reduce((a, c) => a * c, 1), byteLength: 0, contiguous, free: nothing, [Symbol.dispose]: nothing };
}

beforeAll(async () => {
  groups = LocalGroup.create(R, { timeoutMs: 10_000 });
  const lowLatency = { maxTokensPerRank: M, hidden: H, numExperts: E };
  bufs = await Promise.all(groups.map((group) => EpBuffer.create({ group, backend: "host", lowLatency })));
  other = await EpBuffer.create({ group: groups[0]!, backend: "host", lowLatency });
  b = bufs[0]!;
  const results = await Promise.all(bufs.map((buf) => buf.dispatch({ x, topkIdx, topkWeights, numExperts: E })));
  handle = results[0]!.handle;
  const ll = await Promise.all(bufs.map((buf) => buf.lowLatencyDispatch({ x, topkIdx, maxTokensPerRank: M, numExperts: E })));
  llHandle = ll[0]!.handle;
});

afterAll(async () => {
  await Promise.all([...bufs, other].map((buf) => buf.close()));
  for (const g of groups) g.close();
});

describe("EpBuffer.create", () => {
  test("unknown option", () => expectArgError(() => EpBuffer.create({ group: groups[0]!, numSm: 4 } as never), "numSm", "unknown option", "numSMs"));
  test("backend name", () => expectArgError(() => EpBuffer.create({ group: groups[0]!, backend: "gpu" as never }), "backend", '"gpu"', '"auto", "cuda" or "host"'));
  test("group", () => expectArgError(() => EpBuffer.create({ group: null as never }), "group", "null"));
  test("numSMs odd", () => expectArgError(() => EpBuffer.create({ group: groups[0]!, numSMs: 3 }), "numSMs", "even", "3"));
  test("lowLatency.numExperts not a multiple of numRanks", () =>
    expectArgError(() => EpBuffer.create({ group: groups[0]!, lowLatency: { maxTokensPerRank: 4, hidden: 128, numExperts: 3 } }), "lowLatency.numExperts", "numRanks = 2", "3"));
  test("backend auto says which backend it chose", async () => {
    // Collective: the ranks agree on one backend. This machine may or may not have a GPU; either
    // way both ranks make the same choice and state it.
    const created = await Promise.all(groups.map((group) => EpBuffer.create({ group, backend: "auto" })));
    expect(["cuda", "host"]).toContain(created[0]!.backendKind);
    expect(created[1]!.backendKind).toBe(created[0]!.backendKind);
    expect(created[0]!.backendReason).toMatch(/^auto: /);
    await Promise.all(created.map((buf) => buf.close()));
  });
});

describe("getDispatchLayout", () => {
  test("topkIdx dtype", () =>
    expectArgError(() => b.getDispatchLayout(topkWeights, E), "topkIdx", "topkIdx must be i64 [numTokens, topk] = [6, topk], got f32 [6, 2]"));
  test("numExperts not a multiple of numRanks", () => expectArgError(() => b.getDispatchLayout(topkIdx, 7), "numExperts", "multiple of numRanks = 2", "7"));
  test("expert id out of range", () => {
    const bad = topkIdx.clone();
    bad.data[3] = BigInt(E);
    return expectArgError(() => b.getDispatchLayout(bad, E), "topkIdx", "[-1, numExperts) = [-1, 8)", "got 8 at [1, 1]");
  });
  test("expert id below -1", () => {
    const bad = topkIdx.clone();
    bad.data[0] = -2n;
    return expectArgError(() => b.getDispatchLayout(bad, E), "topkIdx", "got -2 at [0, 0]");
  });
  test("expert id repeated in a row", () => {
    const bad = topkIdx.clone();
    bad.data[9] = bad.data[8]!;
    return expectArgError(() => b.getDispatchLayout(bad, E), "topkIdx", "must not repeat an expert id", `got ${bad.data[8]} at [4, 0] and [4, 1]`);
  });
  test("-1 is allowed", () => {
    const masked = topkIdx.clone();
    masked.data.fill(-1n); // -1 repeated within a row is fine
    const layout = b.getDispatchLayout(masked, E);
    expect(Array.from(b.toHost(layout.numTokensPerRank).data as Int32Array)).toEqual([0, 0]);
  });
  test("wrong device", () => expectArgError(() => b.getDispatchLayout(fakeTensor("i64", [T, K], 0), E), "topkIdx", "must be on cpu", "cuda:0"));
  test("not contiguous", () => expectArgError(() => b.getDispatchLayout(fakeTensor("i64", [T, K], "cpu", false), E), "topkIdx", "contiguous", "strided"));
});

describe("dispatch", () => {
  test("x dtype", () => expectArgError(() => b.dispatch({ x: topkWeights, topkIdx, numExperts: E }), "x", "bf16 or fp8_e4m3 [numTokens, hidden]", "got f32 [6, 2]"));
  test("x rank", () => expectArgError(() => b.dispatch({ x: x.reshape([T, 2, 64]), topkIdx, numExperts: E }), "x", "got bf16 [6, 2, 64]"));
  test("x on another device", () => expectArgError(() => b.dispatch({ x: fakeTensor("bf16", [T, H], 1), topkIdx, numExperts: E }), "x", "must be on cpu", "cuda:1"));
  test("fp8 x without scales", () =>
    expectArgError(() => b.dispatch({ x: new HostTensor("fp8_e4m3", [T, H]), topkIdx, numExperts: E }), "xScales", "f32 [numTokens, hidden / 128] = [6, 1]", "fp8_e4m3", "undefined"));
  test("scales with bf16 x", () =>
    expectArgError(() => b.dispatch({ x, xScales: new HostTensor("f32", [T, 1]), topkIdx, numExperts: E }), "xScales", "omitted with bf16 x", "f32 [6, 1]"));
  test("scales shape", () =>
    expectArgError(() => b.dispatch({ x: new HostTensor("fp8_e4m3", [T, 256]), xScales: new HostTensor("f32", [T, 1]), topkIdx, numExperts: E }), "xScales", "= [6, 2]", "got f32 [6, 1]"));
  test("fp8 hidden not a multiple of 128", () =>
    expectArgError(() => b.dispatch({ x: new HostTensor("fp8_e4m3", [T, 200]), topkIdx, numExperts: E }), "x", "multiple of 128", "200"));
  test("topkIdx rows differ from x", () => expectArgError(() => b.dispatch({ x, topkIdx: topkIdx.rows(0, 4), numExperts: E }), "topkIdx", "= [6, topk]", "got i64 [4, 2]"));
  test("topkIdx missing", () => expectArgError(() => b.dispatch({ x, numExperts: E }), "topkIdx", "required without a handle", "undefined"));
  test("topkWeights shape", () =>
    expectArgError(() => b.dispatch({ x, topkIdx, topkWeights: new HostTensor("f32", [T, 3]), numExperts: E }), "topkWeights", "f32 [numTokens, topk] = [6, 2]", "got f32 [6, 3]"));
  test("numExperts missing without layout", () => expectArgError(() => b.dispatch({ x, topkIdx }), "numExperts", "required when no layout"));
  test("numExperts differs from the layout", () => {
    const layout = b.getDispatchLayout(topkIdx, E);
    return expectArgError(() => b.dispatch({ x, topkIdx, layout, numExperts: 16 }), "numExperts", "8 experts", "16");
  });
  test("layout of another routing", () => {
    const layout = b.getDispatchLayout(topkIdx.rows(0, 3), E);
    return expectArgError(() => b.dispatch({ x, topkIdx, layout }), "layout.isTokenInRank", "= [6, 2]", "got u8 [3, 2]");
  });
  test("expert id out of range", () => {
    const bad = topkIdx.clone();
    bad.data[1] = 99n;
    return expectArgError(() => b.dispatch({ x, topkIdx: bad, numExperts: E }), "topkIdx", "[-1, 8)", "got 99");
  });
  test("expertAlignment", () => expectArgError(() => b.dispatch({ x, topkIdx, numExperts: E, expertAlignment: 0 }), "expertAlignment", ">= 1", "got 0"));
  test("numWorstTokens", () => expectArgError(() => b.dispatch({ x, topkIdx, numExperts: E, numWorstTokens: -1 }), "numWorstTokens", ">= 0", "got -1"));
  test("config.numSMs odd", () =>
    expectArgError(() => b.dispatch({ x, topkIdx, numExperts: E, config: { ...b.getDispatchConfig(), numSMs: 5 } }), "config.numSMs", "even", "5"));
  test("unknown option", () => expectArgError(() => b.dispatch({ x, topk_idx: topkIdx } as never), "topk_idx", "unknown option", "topkIdx"));
  test("handle of another buffer", () => expectArgError(() => other.dispatch({ x, handle }), "handle", "another EpBuffer", `bufferId ${other.bufferId}`));
  test("low-latency handle given to dispatch", () => expectArgError(() => b.dispatch({ x, handle: llHandle as never }), "handle", "returned by dispatch()"));
  test("cached dispatch with topkIdx", () => expectArgError(() => b.dispatch({ x, handle, topkIdx }), "topkIdx", "omitted with handle", "i64 [6, 2]"));
  test("cached dispatch with numWorstTokens", () => expectArgError(() => b.dispatch({ x, handle, numWorstTokens: 64 }), "numWorstTokens", "omitted with handle", "64"));
  test("cached dispatch of another layout (numTokens)", () => expectArgError(() => b.dispatch({ x: x.rows(0, 5), handle }), "x", "= [6, 128]", "got bf16 [5, 128]"));
  test("cached dispatch of another layout (hidden)", () => expectArgError(() => b.dispatch({ x: new HostTensor("bf16", [T, 256]), handle }), "x", "= [6, 128]", "got bf16 [6, 256]"));
  test("numWorstTokens too small: the host backend throws naming the rank and the counts", async () => {
    const calls = bufs.map((buf) => buf.dispatch({ x, topkIdx, numExperts: E, numWorstTokens: 1 }).then(() => null, (e: unknown) => e));
    const errors = await Promise.all(calls);
    errors.forEach((error, rank) => {
      expect(error).toBeInstanceOf(EpArgumentError);
      const e = error as EpArgumentError;
      expect(e.argument).toBe("numWorstTokens");
      expect(e.message).toContain(`rank ${rank} receives`);
      expect(e.message).toContain("numWorstTokens = 1 is too small");
    });
  });
});

describe("combine", () => {
  const rows = () => handle.numRecvRows;
  test("x rows differ from handle.numRecvRows", () =>
    expectArgError(() => b.combine({ x: new HostTensor("bf16", [rows() + 1, H]), handle }), "x", `bf16 [handle.numRecvRows, hidden] = [${rows()}, 128]`, `got bf16 [${rows() + 1}, 128]`));
  test("x dtype", () => expectArgError(() => b.combine({ x: new HostTensor("f32", [rows(), H]), handle }), "x", `got f32 [${rows()}, 128]`));
  test("topkWeights rows", () =>
    expectArgError(() => b.combine({ x: new HostTensor("bf16", [rows(), H]), handle, topkWeights: new HostTensor("f32", [1, K]) }), "topkWeights", "handle.numRecvRows", "got f32 [1, 2]"));
  test("bias shape", () =>
    expectArgError(() => b.combine({ x: new HostTensor("bf16", [rows(), H]), handle, bias: new HostTensor("bf16", [T, 64]) }), "bias", "bf16 [numTokens, hidden] = [6, 128]", "got bf16 [6, 64]"));
  test("second bias shape", () =>
    expectArgError(() => b.combine({ x: new HostTensor("bf16", [rows(), H]), handle, bias: [new HostTensor("bf16", [T, H]), new HostTensor("bf16", [5, H])] }), "bias[1]", "got bf16 [5, 128]"));
  test("three biases", () => {
    const bias = new HostTensor("bf16", [T, H]);
    return expectArgError(() => b.combine({ x: new HostTensor("bf16", [rows(), H]), handle, bias: [bias, bias, bias] }), "bias", "at most two", "3");
  });
  test("handle of another buffer", () => expectArgError(() => other.combine({ x: new HostTensor("bf16", [rows(), H]), handle }), "handle", "another EpBuffer"));
  test("handle missing", () => expectArgError(() => b.combine({ x: new HostTensor("bf16", [rows(), H]) } as never), "handle", "returned by dispatch()", "undefined"));
});

describe("lowLatencyDispatch", () => {
  const ll = { x, topkIdx, maxTokensPerRank: M, numExperts: E };
  /** A rank-0 buffer with its own low-latency sizes (host buffers need no collective to create). */
  async function withLowLatency(hidden: number, maxTokensPerRank: number, fn: (buf: EpBuffer) => Promise<unknown>): Promise<void> {
    const buf = await EpBuffer.create({ group: groups[0]!, backend: "host", lowLatency: { maxTokensPerRank, hidden, numExperts: E } });
    await fn(buf);
    await buf.close();
  }
  test("buffer without lowLatency", async () => {
    const plain = await EpBuffer.create({ group: groups[0]!, backend: "host" });
    await expectArgError(() => plain.lowLatencyDispatch(ll), "lowLatency", "EpBuffer.create");
    await plain.close();
  });
  test("more tokens than maxTokensPerRank", () =>
    withLowLatency(H, 4, (buf) => expectArgError(() => buf.lowLatencyDispatch({ ...ll, maxTokensPerRank: 4 }), "x", "6 tokens", "maxTokensPerRank = 4")));
  test("maxTokensPerRank differs from the buffer's", () =>
    expectArgError(() => b.lowLatencyDispatch({ ...ll, maxTokensPerRank: 9 }), "maxTokensPerRank", "lowLatency.maxTokensPerRank = 8", "got 9"));
  test("hidden differs from the buffer's", () =>
    expectArgError(() => b.lowLatencyDispatch({ ...ll, x: new HostTensor("bf16", [T, 256]) }), "x", "lowLatency.hidden = 128", "got bf16 [6, 256]"));
  test("numExperts differs from the buffer's", () => expectArgError(() => b.lowLatencyDispatch({ ...ll, numExperts: 4 }), "numExperts", "lowLatency.numExperts = 8", "got 4"));
  test("x dtype", () => expectArgError(() => b.lowLatencyDispatch({ ...ll, x: new HostTensor("fp8_e4m3", [T, H]) }), "x", "bf16 [numTokens, hidden]", "got fp8_e4m3 [6, 128]"));
  test("fp8 hidden not a multiple of 128", () =>
    withLowLatency(192, M, (buf) => expectArgError(() => buf.lowLatencyDispatch({ ...ll, x: new HostTensor("bf16", [T, 192]), useFp8: true }), "x", "multiple of 128", "192")));
  test("ue8m0 hidden not a multiple of 512", () =>
    withLowLatency(256, M, (buf) =>
      expectArgError(() => buf.lowLatencyDispatch({ ...ll, x: new HostTensor("bf16", [T, 256]), useFp8: true, useUe8m0: true }), "x", "multiple of 512", "256"),
    ));
  test("roundScale without fp8", () => expectArgError(() => b.lowLatencyDispatch({ ...ll, roundScale: true }), "roundScale", "fp8 only"));
  test("useUe8m0 without fp8", () => expectArgError(() => b.lowLatencyDispatch({ ...ll, useUe8m0: true }), "useUe8m0", "fp8 only"));
  test("topkIdx range", () => {
    const bad = topkIdx.clone();
    bad.data[5] = 8n;
    return expectArgError(() => b.lowLatencyDispatch({ ...ll, topkIdx: bad }), "topkIdx", "[-1, 8)", "got 8 at [2, 1]");
  });
  test("cumulativeRecvStats", () =>
    expectArgError(() => b.lowLatencyDispatch({ ...ll, cumulativeRecvStats: new HostTensor("i64", [4]) }), "cumulativeRecvStats", "i32 [numLocalExperts] = [4]", "got i64 [4]"));
  test("waitStats", () => expectArgError(() => b.lowLatencyDispatch({ ...ll, waitStats: new HostTensor("i64", [3]) }), "waitStats", "i64 [numRanks] = [2]", "got i64 [3]"));
  test("hook not a boolean", () => expectArgError(() => b.lowLatencyDispatch({ ...ll, hook: 1 as never }), "hook", "boolean", "1"));
  test("stream", () => expectArgError(() => b.lowLatencyDispatch({ ...ll, stream: "s" as never }), "stream", "Stream", '"s"'));
});

describe("lowLatencyCombine", () => {
  const slots = R * M;
  const args = () => ({ x: new HostTensor("bf16", [E / R, slots, H]), topkIdx, topkWeights, handle: llHandle });
  test("x shape", () =>
    expectArgError(
      () => b.lowLatencyCombine({ ...args(), x: new HostTensor("bf16", [E / R, slots, 256]) }),
      "x",
      "bf16 [numLocalExperts, numRanks * maxTokensPerRank, hidden] = [4, 16, 128]",
      "got bf16 [4, 16, 256]",
    ));
  test("topkWeights shape", () =>
    expectArgError(() => b.lowLatencyCombine({ ...args(), x: new HostTensor("bf16", [E / R, slots, H]), topkWeights: new HostTensor("f32", [T, 1]) }), "topkWeights", "= [6, 2]", "got f32 [6, 1]"));
  test("topkIdx of another layout", () =>
    expectArgError(() => b.lowLatencyCombine({ ...args(), x: new HostTensor("bf16", [E / R, slots, H]), topkIdx: topkIdx.rows(0, 2) }), "topkIdx", "= [6, topk]", "got i64 [2, 2]"));
  test("out shape", () =>
    expectArgError(() => b.lowLatencyCombine({ ...args(), x: new HostTensor("bf16", [E / R, slots, H]), out: new HostTensor("bf16", [T + 1, H]) }), "out", "= [6, 128]", "got bf16 [7, 128]"));
  test("handle of another buffer", () => expectArgError(() => other.lowLatencyCombine({ ...args(), x: new HostTensor("bf16", [E / R, slots, H]) }), "handle", "another EpBuffer"));
  test("normal handle given", () => expectArgError(() => b.lowLatencyCombine({ ...args(), handle: handle as never }), "handle", "lowLatencyDispatch()"));
  test("getNextLowLatencyCombineBuffer with a foreign handle", () => expectArgError(() => other.getNextLowLatencyCombineBuffer(llHandle), "handle", "another EpBuffer"));
});

describe("misc", () => {
  test("setRankMask length", () => expectArgError(() => b.setRankMask([true]), "alive", "boolean[2]", "an array of 1"));
  test("setNumSMs odd", () => expectArgError(() => b.setNumSMs(7), "numSMs", "even", "7"));
  test("configs per world size", () => {
    const config = EpBuffer.getDispatchConfig(8, 24);
    expect(config.numSMs).toBe(24);
    expect(config.nvlChunkedSendTokens).toBeLessThanOrEqual(config.nvlChunkedRecvTokens);
    expect(EpBuffer.getCombineConfig(2).numSMs % 2).toBe(0);
  });
  test("a closed buffer rejects every call", async () => {
    const buf = await EpBuffer.create({ group: groups[0]!, backend: "host" });
    await buf.close();
    await buf.close(); // idempotent
    await expectArgError(() => buf.dispatch({ x, topkIdx, numExperts: E }), "this", "closed");
    await expectArgError(() => buf.getDispatchLayout(topkIdx, E), "this", "closed");
    await expectArgError(() => buf.fromHost(x), "this", "closed");
  });
  test("errors are EpArgumentError with method and argument", async () => {
    const e = await expectArgError(() => b.getDispatchLayout(topkIdx, 3), "numExperts");
    expect(e.method).toBe("getDispatchLayout");
    expect(e.name).toBe("EpArgumentError");
    expect(e.message.startsWith("getDispatchLayout: ")).toBe(true);
  });
});
