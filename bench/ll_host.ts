// Developer probe: what one low-latency call costs the host (the CPU time inside dispatchSync /
// combineSync until the launch is queued), beside a bare kernel launch and a copy kernel's launch
// through the same FFI. With R ranks in one process these costs add up to the launch skew that the
// events rows of bench/low_latency.ts include. DeepEP's decode config, 2 ranks on one GPU. Last, the
// same calls with the native entry points stubbed out: the JS side's own share.
//   bun bench/ll_host.ts [--calls 400]      (add --cpu-prof-md before the script for a JS profile)

import { check, native } from "../lib/ffi.ts";
import { LocalGroup } from "../lib/group.ts";
import { DeviceTensor } from "../lib/tensor.ts";
import { createEngines, makeInputs, toDevice, type LlShape } from "../test/gpu/fixtures/ll_harness.ts";
import { describeDevices, median, requireGpu } from "./common.ts";

const callsIndex = process.argv.indexOf("--calls");
const CALLS = callsIndex >= 0 ? Number(process.argv[callsIndex + 1]) : 400;
const BATCH = 20; // calls queued between synchronisations (the GPU queue stays short)

requireGpu("bench/ll_host.ts");
const lib = native();
console.log(`device: ${describeDevices()}`);
const shape: LlShape = { numRanks: 2, maxTokensPerRank: 128, hidden: 7168, numExperts: 256, topk: 8 };
const groups = LocalGroup.create(shape.numRanks);
const states = await createEngines(groups, shape, 0, 30_000);
const inputs = makeInputs(1234, shape, "full");
const data = states.map((st, r) => ({
  x: toDevice(inputs[r]!.x, st.stream),
  topkIdx: toDevice(inputs[r]!.topkIdx, st.stream),
  topkWeights: toDevice(inputs[r]!.topkWeights, st.stream),
}));
const syncAll = () => states.forEach((st) => st.stream.synchronize());

/** Median host µs per call of `call(i)` over batches of BATCH calls (synchronised in between). */
function hostUs(label: string, call: (i: number) => void): void {
  const perCall: number[] = [];
  for (let done = -2 * BATCH; done < CALLS; done += BATCH) {
    syncAll();
    const start = performance.now();
    for (let i = 0; i < BATCH; i++) call(i);
    const us = ((performance.now() - start) * 1000) / BATCH;
    if (done >= 0) perCall.push(us);
  }
  syncAll();
  console.log(`${label.padEnd(52)} ${median(perCall).toFixed(2)} us per call (min ${Math.min(...perCall).toFixed(2)})`);
}

const stream0 = states[0]!.stream;
const src = DeviceTensor.zeros("u8", [1 << 20], { device: stream0.device, stream: stream0 });
const dst = DeviceTensor.zeros("u8", [1 << 20], { device: stream0.device, stream: stream0 });
hostUs("empty kernel (bun_ep_debug_spin 0)", () => check(lib.bun_ep_debug_spin(0n, stream0.handle), "spin"));
hostUs("copy kernel, 1 MiB (bun_ep_debug_copy_bytes)", () =>
  check(lib.bun_ep_debug_copy_bytes(dst.ptr, src.ptr, 1 << 20, 528, stream0.handle), "copy"));
hostUs("engine.checkError()", () => states[0]!.engine.checkError());

const dispatch = (r: number, hook: boolean) =>
  states[r]!.engine.dispatchSync({
    x: data[r]!.x, topkIdx: data[r]!.topkIdx, maxTokensPerRank: shape.maxTokensPerRank, numExperts: shape.numExperts,
    useFp8: true, roundScale: false, useUe8m0: false, cumulativeRecvStats: null, waitStats: null, hook, asyncFinish: false,
    stream: states[r]!.stream.handle,
  });
// Ranks alternate (each call of rank 0 is matched by rank 1's next), so the kernels complete.
hostUs("dispatchSync (direct kernel), per rank-call", (i) => void dispatch(i % 2, false));
// The combines alternate between the handles of the last two dispatches (one per buffer parity),
// as two micro-batches do.
const pair = [[dispatch(0, false), dispatch(1, false)], [dispatch(0, false), dispatch(1, false)]];
const combine = (i: number) => {
  const r = i % 2;
  const st = states[r]!;
  const handle = pair[Math.floor(i / 2) % 2]![r]!.handle;
  st.engine.combineSync({
    x: st.engine.getNextCombineBuffer(handle), topkIdx: data[r]!.topkIdx, topkWeights: data[r]!.topkWeights,
    handle, zeroCopy: true, out: null, hook: false, asyncFinish: false, stream: st.stream.handle,
  });
};
hostUs("combineSync (fused kernel, zero-copy), per rank-call", combine);

// The JS side alone: the same calls with the two native entry points replaced by no-ops (restored
// after; each rank makes as many calls, so the ranks' buffer parities stay in step).
const symbols = lib as unknown as Record<string, unknown>;
const realDispatch = symbols.bun_ep_ll_dispatch, realCombine = symbols.bun_ep_ll_combine;
try {
  symbols.bun_ep_ll_dispatch = () => 0;
  symbols.bun_ep_ll_combine = () => 0;
  hostUs("dispatchSync, JS only (native entry a no-op)", (i) => void dispatch(i % 2, false));
  hostUs("combineSync, JS only (native entry a no-op)", combine);
} catch (err) {
  console.log(`JS-only timing not possible here: ${(err as Error).message}`);
} finally {
  symbols.bun_ep_ll_dispatch = realDispatch;
  symbols.bun_ep_ll_combine = realCombine;
}
syncAll();
src.free();
dst.free();
for (const d of data) for (const t of [d.x, d.topkIdx, d.topkWeights]) t.free();
await Promise.all(states.map((s) => s.engine.close()));
for (const s of states) s.stream.close();
for (const g of groups) g.close();
