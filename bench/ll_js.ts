// Developer probe, no GPU needed: the JavaScript side of a low-latency call. The engine
// (lib/backend/cuda_ll.ts) is built around a fake context, and the native entry points it calls
// are replaced by stubs, so each call runs only the TypeScript wrapper. That wrapper is what this
// package adds above the native launch (bench/ll_host.ts times the whole call on a GPU). It needs
// the built library, which loads without a GPU.
// DeepEP's decode shape (128 tokens, hidden 7168, top-8, 256 experts), 2 ranks; median of rounds.
//   bun bench/ll_js.ts [--calls 300000] [--rounds 7]
import { ptr } from "bun:ffi";
import { native } from "../lib/ffi.ts";
import { LowLatencyEngine } from "../lib/backend/cuda_ll.ts";
import type { LowLatencyDispatchArgs, LowLatencyDispatchResult } from "../lib/backend/types.ts";
import { DeviceTensor } from "../lib/tensor.ts";
import { median } from "./common.ts";

function option(name: string, fallback: number): number {
  const i = process.argv.indexOf(name);
  return i >= 0 ? Number(process.argv[i + 1]) : fallback;
}
const CALLS = option("--calls", 300_000);
const ROUNDS = option("--rounds", 7);

// Stubs: views at made-up addresses (never dereferenced), an error word in JS memory, launches
// that succeed at once.
const symbols = native() as unknown as Record<string, unknown>;
const errorWord = new Int32Array(16);
const fakeBase = 0x7f00_0000_0000;
Object.assign(symbols, {
  bun_ep_ll_views: (_context: unknown, parity: number, views: BigUint64Array) => {
    for (let i = 0; i < views.length; i++) views[i] = BigInt(fakeBase + parity * 2 ** 32 + i * 2 ** 26);
    return 0;
  },
  bun_ep_ll_error_word: (_context: unknown, out: BigUint64Array) => {
    out[0] = BigInt(ptr(errorWord));
    return 0;
  },
  bun_ep_ll_check: () => 0,
  bun_ep_ll_dispatch: () => 0,
  bun_ep_ll_combine: () => 0,
});

// The engine's constructor is private (create() allocates and exchanges real buffers).
const Engine = LowLatencyEngine as unknown as new (...args: unknown[]) => LowLatencyEngine;
const init = { group: { rank: 0, size: 2 }, lowLatency: { numExperts: 256, maxTokensPerRank: 128, hidden: 7168 }, device: 0, bufferId: 1 };
const engine = new Engine(
  { init, commStream: 0 },
  { maxTopk: 16, ranksOnDevice: 2, bufferBytes: 2 ** 30, memory: { kind: "peer" }, context: 1 },
);
const x = DeviceTensor.fromPointer(fakeBase + 2 ** 40, "bf16", [128, 7168], 0);
const topkIdx = DeviceTensor.fromPointer(fakeBase + 2 ** 41, "i64", [128, 8], 0);
const topkWeights = DeviceTensor.fromPointer(fakeBase + 2 ** 42, "f32", [128, 8], 0);
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
