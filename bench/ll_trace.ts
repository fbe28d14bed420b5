// Developer probe: where the direct low-latency dispatch spends a call. Ranks of one process on one
// GPU, hidden 7168, 256 experts, fp8; CALLS calls captured in one graph and replayed; then thread 0
// of every block's global-timer stamps of the last calls (g_trace in cuda/src/low_latency.cu), per
// rank as min / median / max over sender blocks, in us from the call's first stamp, plus the
// receiver block's phases. Needs a trace build: BUN_EP_NVCC_FLAGS=-DBUN_EP_LL_TRACE bun run build
// (the stamps are coarse: the global timer ticks every 256 ns or so on H200).
//   bun bench/ll_trace.ts [--ranks 2] [--tokens 128] [--topk 8]
import { dlopen, ptr } from "bun:ffi";
import { resolve } from "node:path";
import { LocalGroup } from "../lib/group.ts";
import { requireGpu } from "./common.ts";
import { captureForked, timeGraph } from "./forked.ts";
import { createEngines, makeInputs, toDevice, type LlShape, type RankState } from "../test/gpu/fixtures/ll_harness.ts";

function option(name: string, fallback: string): string {
  const i = process.argv.indexOf(name);
  return i >= 0 ? (process.argv[i + 1] ?? fallback) : fallback;
}
const R = Number(option("--ranks", "2"));
const T = Number(option("--tokens", "128"));
const K = Number(option("--topk", "8"));
const CALLS = 20;
const CALLS_T = 8, RANKS_T = 8, BLOCKS_T = 256, POINTS_T = 11;

requireGpu("bench/ll_trace.ts");
const lib = dlopen(resolve(import.meta.dir, "../build/libbun_ep.so"), {
  bun_ep_ll_debug_trace: { args: ["ptr", "u64"], returns: "i32" },
});

const shape: LlShape = { numRanks: R, maxTokensPerRank: T, hidden: 7168, numExperts: 256, topk: K };
const groups = LocalGroup.create(R);
const states: RankState[] = await createEngines(groups, shape, 0, 30_000);
const inputs = makeInputs(1234, shape, "full");
const data = states.map((st, r) => ({ x: toDevice(inputs[r]!.x, st.stream), topkIdx: toDevice(inputs[r]!.topkIdx, st.stream) }));
const dispatchAll = () =>
  states.map((st, r) =>
    st.engine.dispatchSync({
      x: data[r]!.x, topkIdx: data[r]!.topkIdx, maxTokensPerRank: T, numExperts: 256, useFp8: true, roundScale: false,
      useUe8m0: false, cumulativeRecvStats: null, waitStats: null, hook: false, asyncFinish: false, stream: st.stream.handle,
    }),
  );
// 30 launches; the stamps (and the time printed) are the last one's.
const graph = captureForked(states, () => {
  for (let i = 0; i < CALLS; i++) dispatchAll();
});
const ms = timeGraph(states, graph, 29, 1).at(-1)!;
graph.close();
console.log(`R=${R} T=${T} K=${K}: last graph ${(ms * 1000).toFixed(1)} us, ${((ms * 1000) / CALLS).toFixed(2)} us per call`);

// Global-timer stamps, then the SM cycle counter's at the same points.
const STAMPS = CALLS_T * RANKS_T * BLOCKS_T * POINTS_T;
const buf = new BigUint64Array(2 * STAMPS);
const got = lib.symbols.bun_ep_ll_debug_trace(ptr(buf), BigInt(buf.byteLength));
if (got < 0) throw new Error(`trace: ${got} (build with BUN_EP_NVCC_FLAGS=-DBUN_EP_LL_TRACE)`);
const index = (call: number, rank: number, block: number, point: number) => ((call * RANKS_T + rank) * BLOCKS_T + block) * POINTS_T + point;
const at = (call: number, rank: number, block: number, point: number) => Number(buf[index(call, rank, block, point)]!);
const cycles = (call: number, rank: number, block: number, point: number) => Number(buf[STAMPS + index(call, rank, block, point)]!);
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
    const used = Array.from({ length: BLOCKS_T }, (_, b) => b).filter((b) => at(c, r, b, 0) > 0);
    const rcv = used[used.length - 1]!;
    const senderBlocks = used.slice(0, -1);
    // Phase ends: kernel entry, routing in shared memory, counts published (block 0), first batch
    // planned (its waits done), first batch sent, rows announced, -, block end.
    const names = ["entry", "routing", "publish", "planned", "sent", "announced", "", "end"];
    const parts: string[] = [];
    for (let p = 0; p < 8; p++) {
      if (p === 6) { parts.push(`rcv counts ${rel(rcv, 6).toFixed(2)} ranges ${rel(rcv, 8).toFixed(2)} arrived ${rel(rcv, 9).toFixed(2)}`); continue; }
      const xs = (p === 0 || p === 7 ? used : senderBlocks).map((b) => rel(b, p));
      parts.push(`${names[p]} ${q(xs, 0).toFixed(2)}/${q(xs, 0.5).toFixed(2)}/${q(xs, 1).toFixed(2)}`);
    }
    // Inside the first batch's planning of sender blocks: earlier tokens counted (thread 0), waits done.
    for (const [p, name] of [[8, "counted"], [9, "waited"]] as const) {
      const xs = senderBlocks.map((b) => rel(b, p));
      parts.push(`${name} ${q(xs, 0).toFixed(2)}/${q(xs, 0.5).toFixed(2)}/${q(xs, 1).toFixed(2)}`);
    }
    console.log(`  rank ${r} (min/med/max us from call start): ${parts.join(" | ")} | rcv ${rcv} entry ${rel(rcv, 0).toFixed(2)} end ${rel(rcv, 7).toFixed(2)}`);
    // Per sender block, exact: SM cycles from its first instruction (point 10) to each point, in the
    // order the code passes them; as ns at this block's own cycles per ns (entry to end).
    const order = [[0, "seq"], [1, "routing"], [2, "publish"], [8, "counted"], [9, "waited"], [3, "planned"], [4, "sent"], [5, "announced"], [7, "end"]] as const;
    const rate = q(senderBlocks.map((b) => (cycles(c, r, b, 7) - cycles(c, r, b, 10)) / Math.max(1, at(c, r, b, 7) - at(c, r, b, 10))), 0.5);
    const steps = order.map(([p, name]) => {
      const xs = senderBlocks.map((b) => cycles(c, r, b, p) - cycles(c, r, b, 10));
      return `${name} ${q(xs, 0.5)} (${(q(xs, 0.5) / rate / 1000).toFixed(2)} us)`;
    });
    console.log(`  rank ${r} sender blocks, median cycles from entry at ${rate.toFixed(2)} cycles/ns: ${steps.join(" | ")}`);
  }
}
await Promise.all(states.map((st) => st.engine.close()));
process.exit(0);
