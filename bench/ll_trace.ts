// Developer probe: where a low-latency call spends its time. Ranks of one process on one GPU,
// hidden 7168, 256 experts, fp8 dispatch; CALLS calls of --op (the direct dispatch, or the fused
// zero-copy combine, alternating between the handles of two dispatches as two micro-batches do)
// captured in one graph and replayed. Then, from thread 0 of every block (g_trace in
// cuda/src/low_latency.cu), for the last three calls: per rank, the global-timer stamps as
// min / median / max over blocks in us from the call's first stamp (comparable across blocks and
// ranks; the timer ticks every 256 ns or so on H200), and the median SM cycles from each block's
// first instruction to each point (exact). Needs a trace build:
// BUN_EP_NVCC_FLAGS=-DBUN_EP_LL_TRACE bun run build
//   bun bench/ll_trace.ts [--op dispatch|combine] [--ranks 2] [--tokens 128] [--topk 8] [--span 14,15,8]
// --span P,Q,...: also, for rank 0 of the last call, every 8th sender block's SM cycles between
// those points in turn (where a phase's cost depends on the block's tokens).
import { dlopen, ptr } from "bun:ffi";
import { resolve } from "node:path";
import { LocalGroup } from "../lib/group.ts";
import type { LowLatencyDispatchResult } from "../lib/backend/types.ts";
import { requireGpu } from "./common.ts";
import { captureForked, timeGraph } from "./forked.ts";
import { createEngines, makeInputs, toDevice, type LlShape, type RankState } from "../test/gpu/fixtures/ll_harness.ts";

function option(name: string, fallback: string): string {
  const i = process.argv.indexOf(name);
  return i >= 0 ? (process.argv[i + 1] ?? fallback) : fallback;
}
const OP = option("--op", "dispatch");
if (OP !== "dispatch" && OP !== "combine") throw new RangeError(`--op: expected dispatch or combine, got ${OP}`);
const R = Number(option("--ranks", "2"));
const T = Number(option("--tokens", "128"));
const K = Number(option("--topk", "8"));
const CALLS = 20;
const SPAN = process.argv.includes("--span") ? option("--span", "").split(",").map(Number) : [];
// g_trace's shape: [ops][calls][ranks][blocks][points]
const OPS_T = 2, CALLS_T = 8, RANKS_T = 8, BLOCKS_T = 256, POINTS_T = 16, ENTRY = 10;
const OP_INDEX = OP === "dispatch" ? 0 : 1;
// The points each op stamps, in the order its code passes them (point 7: the block's end).
const POINTS: readonly (readonly [number, string])[] =
  OP === "dispatch"
    ? [[0, "seq"], [1, "routing"], [12, "loads issued"], [13, "zeroed"], [14, "synced"], [15, "scanned"], [8, "counted"],
       [9, "waited"], [3, "planned"], [4, "sent"], [5, "announced"], [7, "end"]]
    : [[0, "seq"], [1, "sent"], [2, "waited"], [3, "summed"], [7, "end"]];

requireGpu("bench/ll_trace.ts");
const lib = dlopen(resolve(import.meta.dir, "../build/libbun_ep.so"), {
  bun_ep_ll_debug_trace: { args: ["ptr", "u64"], returns: "i32" },
});

const shape: LlShape = { numRanks: R, maxTokensPerRank: T, hidden: 7168, numExperts: 256, topk: K };
const groups = LocalGroup.create(R);
const states: RankState[] = await createEngines(groups, shape, 0, 30_000);
const inputs = makeInputs(1234, shape, "full");
const data = states.map((st, r) => ({
  x: toDevice(inputs[r]!.x, st.stream),
  topkIdx: toDevice(inputs[r]!.topkIdx, st.stream),
  topkWeights: toDevice(inputs[r]!.topkWeights, st.stream),
}));
const dispatchAll = (): LowLatencyDispatchResult[] =>
  states.map((st, r) =>
    st.engine.dispatchSync({
      x: data[r]!.x, topkIdx: data[r]!.topkIdx, maxTokensPerRank: T, numExperts: 256, useFp8: true, roundScale: false,
      useUe8m0: false, cumulativeRecvStats: null, waitStats: null, hook: false, asyncFinish: false, stream: st.stream.handle,
    }),
  );
const pair = OP === "combine" ? [dispatchAll(), dispatchAll()] : [];
const combineAll = (results: LowLatencyDispatchResult[]) =>
  states.forEach((st, r) =>
    st.engine.combineSync({
      x: st.engine.getNextCombineBuffer(results[r]!.handle), topkIdx: data[r]!.topkIdx, topkWeights: data[r]!.topkWeights,
      handle: results[r]!.handle, zeroCopy: true, out: null, hook: false, asyncFinish: false, stream: st.stream.handle,
    }),
  );
// 30 launches; the stamps (and the time printed) are the last one's.
const graph = captureForked(states, () => {
  for (let i = 0; i < CALLS; i++) {
    if (OP === "dispatch") dispatchAll();
    else combineAll(pair[i % 2]!);
  }
});
const ms = timeGraph(states, graph, 29, 1).at(-1)!;
graph.close();
console.log(`${OP} R=${R} T=${T} K=${K}: last graph ${(ms * 1000).toFixed(1)} us, ${((ms * 1000) / CALLS).toFixed(2)} us per call`);

// Global-timer stamps, then the SM cycle counter's at the same points.
const STAMPS = OPS_T * CALLS_T * RANKS_T * BLOCKS_T * POINTS_T;
const buf = new BigUint64Array(2 * STAMPS);
const got = lib.symbols.bun_ep_ll_debug_trace(ptr(buf), BigInt(buf.byteLength));
if (got < 0) throw new Error(`trace: ${got} (build with BUN_EP_NVCC_FLAGS=-DBUN_EP_LL_TRACE)`);
const index = (call: number, rank: number, block: number, point: number) =>
  (((OP_INDEX * CALLS_T + call) * RANKS_T + rank) * BLOCKS_T + block) * POINTS_T + point;
const at = (call: number, rank: number, block: number, point: number) => Number(buf[index(call, rank, block, point)]!);
const cycles = (call: number, rank: number, block: number, point: number) => Number(buf[STAMPS + index(call, rank, block, point)]!);
// The blocks of rank r that stamped call c (its grid).
const blocksOf = (c: number, r: number) => Array.from({ length: BLOCKS_T }, (_, b) => b).filter((b) => at(c, r, b, 0) > 0);
// Order the traced calls by their first stamp.
const calls = Array.from({ length: CALLS_T }, (_, c) => c).filter((c) => at(c, 0, 0, 0) > 0);
calls.sort((a, b) => at(a, 0, 0, 0) - at(b, 0, 0, 0));
const q = (xs: number[], f: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(f * s.length))]!;
};
let prevEnd = 0;
for (const c of calls.slice(-3)) {
  let t0 = Infinity, end = 0;
  for (let r = 0; r < R; r++) for (let b = 0; b < BLOCKS_T; b++) {
    const e = at(c, r, b, 0);
    if (e > 0) t0 = Math.min(t0, e);
    end = Math.max(end, at(c, r, b, 7));
  }
  console.log(`call slot ${c}: span ${((end - t0) / 1000).toFixed(2)} us, gap after previous end ${prevEnd ? ((t0 - prevEnd) / 1000).toFixed(2) : "-"} us`);
  prevEnd = end;
  for (let r = 0; r < R; r++) {
    const rel = (b: number, p: number) => (at(c, r, b, p) - t0) / 1000;
    const used = blocksOf(c, r);
    // The direct dispatch's last block publishes and receives (points 2, 11, 6, 8, 9 of its own); the others send.
    const rcv = OP === "dispatch" ? used[used.length - 1]! : -1;
    const blocks = OP === "dispatch" ? used.slice(0, -1) : used;
    const parts = POINTS.map(([p, name]) => {
      const xs = (p === 0 || p === 7 ? used : blocks).map((b) => rel(b, p));
      return `${name} ${q(xs, 0).toFixed(2)}/${q(xs, 0.5).toFixed(2)}/${q(xs, 1).toFixed(2)}`;
    });
    if (rcv >= 0) {
      // The last sender to finish its rows: the one the receiver waits for.
      const last = blocks.reduce((a, b) => (at(c, r, b, 4) > at(c, r, a, 4) ? b : a), blocks[0]!);
      parts.push(
        `rcv ${rcv}: published ${rel(rcv, 2).toFixed(2)} acks ${rel(rcv, 11).toFixed(2)} counts ${rel(rcv, 6).toFixed(2)} ` +
          `ranges ${rel(rcv, 8).toFixed(2)} arrived ${rel(rcv, 9).toFixed(2)} end ${rel(rcv, 7).toFixed(2)} | last sent: block ${last}`,
      );
    }
    console.log(`  rank ${r} (min/med/max us from call start): ${parts.join(" | ")}`);
    // Per block, exact: SM cycles from its first instruction; as us at this rank's median cycles per
    // ns (entry to end).
    const rate = q(blocks.map((b) => (cycles(c, r, b, 7) - cycles(c, r, b, ENTRY)) / Math.max(1, at(c, r, b, 7) - at(c, r, b, ENTRY))), 0.5);
    const steps = POINTS.map(([p, name]) => {
      const median = q(blocks.map((b) => cycles(c, r, b, p) - cycles(c, r, b, ENTRY)), 0.5);
      return `${name} ${median} (${(median / rate / 1000).toFixed(2)} us)`;
    });
    const who = OP === "dispatch" ? "sender blocks" : "blocks";
    console.log(`  rank ${r} ${who}, median cycles from entry at ${rate.toFixed(2)} cycles/ns: ${steps.join(" | ")}`);
  }
}
if (SPAN.length > 1 && calls.length > 0) {
  const c = calls.at(-1)!;
  const used = blocksOf(c, 0);
  const senders = OP === "dispatch" ? used.slice(0, -1) : used;
  const rows = senders
    .filter((b) => b % 8 === 0)
    .map((b) => `b${b} ${SPAN.slice(1).map((p, i) => cycles(c, 0, b, p) - cycles(c, 0, b, SPAN[i]!)).join("/")}`);
  console.log(`  rank 0, cycles between points ${SPAN.join(" > ")} per block: ${rows.join(" | ")}`);
}
await Promise.all(states.map((st) => st.engine.close()));
process.exit(0);
