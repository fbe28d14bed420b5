// Developer probe, no GPU needed: the JavaScript side of a low-latency call. The engine
// (lib/backend/cuda_ll.ts) runs around a fake context with its native entry points stubbed
// (test/fixtures/ll_engine_stub.ts), so each call runs only the TypeScript wrapper. That wrapper is
// what this package adds above the native launch (bench/ll_host.ts times the whole call on a GPU).
// DeepEP's decode shape (128 tokens, hidden 7168, top-8, 256 experts), rank 0 of 2; median of rounds.
//   bun bench/ll_js.ts [--calls 300000] [--rounds 7]
import type { LowLatencyDispatchArgs, LowLatencyDispatchResult } from "../lib/backend/types.ts";
import { DeviceTensor } from "../lib/tensor.ts";
import { FAKE_BASE, stubbedEngine } from "../test/fixtures/ll_engine_stub.ts";
import { median } from "./common.ts";

function option(name: string, fallback: number): number {
  const i = process.argv.indexOf(name);
  return i >= 0 ? Number(process.argv[i + 1]) : fallback;
}
const CALLS = option("--calls", 300_000);
const ROUNDS = option("--rounds", 7);

const { engine } = stubbedEngine({ record: false });
const x = DeviceTensor.fromPointer(FAKE_BASE + 2 ** 40, "bf16", [128, 7168], 0);
const topkIdx = DeviceTensor.fromPointer(FAKE_BASE + 2 ** 41, "i64", [128, 8], 0);
const topkWeights = DeviceTensor.fromPointer(FAKE_BASE + 2 ** 42, "f32", [128, 8], 0);
const dispatchArgs: LowLatencyDispatchArgs = {
  x, topkIdx, maxTokensPerRank: 128, numExperts: 256, useFp8: true, roundScale: false, useUe8m0: false,
  cumulativeRecvStats: null, waitStats: null, hook: false, asyncFinish: false, stream: 0x55aa_0000,
};

const dispatchUs: number[] = [];
const combineUs: number[] = [];
let last: LowLatencyDispatchResult | null = null;
for (let round = 0; round < ROUNDS; round++) {
  let start = performance.now();
  for (let i = 0; i < CALLS; i++) last = engine.dispatchSync(dispatchArgs);
  dispatchUs.push(((performance.now() - start) * 1000) / CALLS);
  const handle = last!.handle;
  start = performance.now();
  for (let i = 0; i < CALLS; i++) {
    engine.combineSync({
      x: engine.getNextCombineBuffer(handle), topkIdx, topkWeights, handle, zeroCopy: true, out: null, hook: false,
      asyncFinish: false, stream: 0x55aa_0000,
    });
  }
  combineUs.push(((performance.now() - start) * 1000) / CALLS);
}
console.log(`JS side per call (median of ${ROUNDS} rounds of ${CALLS}): dispatchSync ${median(dispatchUs).toFixed(3)} us, combineSync ${median(combineUs).toFixed(3)} us`);
