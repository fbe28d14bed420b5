// Low-latency dispatch/combine on one GPU shared by R ranks (LocalGroup, one process):
// DeepEP's decode config (128 tokens per rank, hidden 7168, top-8, 256 experts, fp8 dispatch, bf16
// combine). Per call (all R ranks together): median latency with CUDA events, and inside one
// captured graph (all ranks forked into it), and per call of --calls-per-graph calls in one graph;
// bytes moved (valid (token, expert) rows) and the time of a plain device copy of those bytes
// measured in the same run and launched the same way (every rank copies its share with its own
// kernel, forked like our calls): ratioToCopy = copy / ours. singleCopyUs / ratioToSingleCopy: one
// copy kernel of all the bytes, plain launch with events (the ceiling of earlier sessions).
// Events rows also give hostUs: the host's time launching one call of every rank (and copyHostUs,
// the copies'): with R ranks in one process it is the launch skew the events rows include.
// Also the latency floor (8 tokens, 1 expert each, in a graph) and the overlap win of two
// micro-batches with hooks against the same without; the compute between the calls is a spin kernel
// of --compute-us per micro-batch phase on each rank's stream (GPU time, no memory traffic).
// The floor rows also show the graph's own cost (an empty kernel per rank in the same forked graph)
// and the cost per call of --calls-per-graph calls captured back to back (a decode step's graph).
// Ranks of the one process sit on GPU r % BUN_EP_NUM_GPUS (default 1); events are recorded on
// each rank's own device.
// The overlap step runs twice: with the spin kernel, and with a memory-bound full-GPU copy of
// --compute-copy-mib per rank as the compute (it competes with the transfers for HBM).
// BUN_EP_LL_COPY_ENGINES=all|0 picks the dispatch path (see DISPATCH_PATH); results then go to
// bench/results/low_latency_copy-engines-<value>.json.
//   bun bench/low_latency.ts [--ranks 2,4,8] [--iterations 50] [--compute-us 50] [--compute-copy-mib 32] [--calls-per-graph 20] [--floor-only]

import { check, native } from "../lib/ffi.ts";
import { LocalGroup } from "../lib/group.ts";
import { deviceProps } from "../lib/stream.ts";
import { DeviceTensor } from "../lib/tensor.ts";
import type { LowLatencyDispatchResult } from "../lib/backend/types.ts";
import { createEngines, makeInputs, toDevice, type LlShape, type RankState } from "../test/gpu/fixtures/ll_harness.ts";
import { describeDevices, markdownTable, median, requireGpu, writeResults, type Row } from "./common.ts";
import { capturedMs, timeForked } from "./forked.ts";

function option(name: string, fallback: string): string {
  const i = process.argv.indexOf(name);
  return i >= 0 ? (process.argv[i + 1] ?? fallback) : fallback;
}
const RANKS = option("--ranks", "2,4,8").split(",").map(Number);
const ITERATIONS = Number(option("--iterations", "50"));
const COMPUTE_US = Number(option("--compute-us", "50"));
const WARMUP = 5;
const CALLS_PER_GRAPH = Number(option("--calls-per-graph", "20"));
const DEVICE = Number(process.env.BUN_EP_DEVICE ?? 0);
// The second stand-in compute of the overlap step: a full-GPU copy of this many bytes per rank.
const COMPUTE_COPY_BYTES = Number(option("--compute-copy-mib", "32")) * 2 ** 20;
// Which dispatch path the native side takes (read there at context creation): "hook" (default:
// copy engines with hook, direct peer stores without), "all" (copy engines always), "0" (never).
const DISPATCH_PATH = process.env.BUN_EP_LL_COPY_ENGINES ?? "hook";

requireGpu("bench/low_latency.ts");
const lib = native();
console.log(`device: ${describeDevices()}`);

interface RankData {
  x: DeviceTensor<"bf16">;
  topkIdx: DeviceTensor<"i64">;
  topkWeights: DeviceTensor<"f32">;
}

/** Median ms of `enqueue` forked over `states`' streams, plainly launched with events; `hostMs`
 * gets the host's time inside `enqueue` (median ms) when given. */
const eventsMs = (states: RankState[], enqueue: () => void, hostMs?: { median: number }): number => {
  const host: number[] = [];
  const ms = median(timeForked(states, enqueue, ITERATIONS, WARMUP, host));
  if (hostMs !== undefined) hostMs.median = median(host);
  return ms;
};
/** Median ms per call of `enqueue` (which enqueues `calls` calls) captured as one forked graph. */
const graphMs = (states: RankState[], enqueue: () => void, calls = 1): number => capturedMs(states, enqueue, ITERATIONS, WARMUP, calls);

function copyMs(bytes: number, state: RankState): number {
  const stream = state.stream;
  const src = DeviceTensor.zeros("u8", [bytes], { device: stream.device, stream });
  const dst = DeviceTensor.zeros("u8", [bytes], { device: stream.device, stream });
  const ms = eventsMs([state], () => check(lib.bun_ep_debug_copy_bytes(dst.ptr, src.ptr, bytes, 0, stream.handle), "copy"));
  src.free();
  dst.free();
  return ms;
}

/** The same bytes moved by a plain copy kernel per rank (each rank copies its 1/R share on its own
 * stream, within its own device), timed the three ways ours is: forked plain launches with events,
 * one forked graph per call, and CALLS_PER_GRAPH calls in one graph (per call). Ms each. */
function copyForked(states: RankState[], totalBytes: number): { events: number; eventsHost: number; graph: number; graphPerCall: number } {
  const share = Math.max(16, Math.ceil(totalBytes / states.length / 16) * 16);
  const blocks = 4 * deviceProps(states[0]!.stream.device).multiProcessorCount;
  const buffers = states.map((st) => ({
    src: DeviceTensor.zeros("u8", [share], { device: st.stream.device, stream: st.stream }),
    dst: DeviceTensor.zeros("u8", [share], { device: st.stream.device, stream: st.stream }),
  }));
  const copyAll = () =>
    states.forEach((st, r) => check(lib.bun_ep_debug_copy_bytes(buffers[r]!.dst.ptr, buffers[r]!.src.ptr, share, blocks, st.stream.handle), "copy"));
  const host = { median: 0 };
  const events = eventsMs(states, copyAll, host);
  const graph = graphMs(states, copyAll);
  const graphPerCall = graphMs(states, () => {
    for (let i = 0; i < CALLS_PER_GRAPH; i++) copyAll();
  }, CALLS_PER_GRAPH);
  for (const st of states) st.stream.synchronize();
  for (const b of buffers) {
    b.src.free();
    b.dst.free();
  }
  return { events, eventsHost: host.median, graph, graphPerCall };
}

/** Distinct (token, expert) pairs over all ranks: the rows dispatch moves and combine returns. */
function countPairs(shape: LlShape, seed: number, kind: "full" | "masked"): number {
  let pairs = 0;
  for (const input of makeInputs(seed, shape, kind)) {
    const [T = 0, K = 0] = input.topkIdx.shape;
    for (let t = 0; t < T; t++) {
      const seen = new Set<bigint>();
      for (let k = 0; k < K; k++) {
        const e = input.topkIdx.data[t * K + k]!;
        if (e >= 0n) seen.add(e);
      }
      pairs += seen.size;
    }
  }
  return pairs;
}

async function benchShape(
  label: string,
  shape: LlShape,
  rows: Row[],
  opts: { events: boolean; overlap: boolean; breakdown?: boolean },
): Promise<void> {
  const groups = LocalGroup.create(shape.numRanks);
  const states = await createEngines(groups, shape, DEVICE, 30_000);
  const seed = 1234;
  const inputs = makeInputs(seed, shape, "full");
  const data: RankData[] = states.map((st, r) => ({
    x: toDevice(inputs[r]!.x, st.stream),
    topkIdx: toDevice(inputs[r]!.topkIdx, st.stream),
    topkWeights: toDevice(inputs[r]!.topkWeights, st.stream),
  }));
  let last: LowLatencyDispatchResult[] = [];
  const dispatchAll = (hook = false, stream = (st: RankState) => st.stream.handle): LowLatencyDispatchResult[] =>
    (last = states.map((st, r) =>
      st.engine.dispatchSync({
        x: data[r]!.x, topkIdx: data[r]!.topkIdx, maxTokensPerRank: shape.maxTokensPerRank, numExperts: shape.numExperts,
        useFp8: true, roundScale: false, useUe8m0: false, cumulativeRecvStats: null, waitStats: null, hook, asyncFinish: false,
        stream: stream(st),
      }),
    ));
  const combineAll = (results: LowLatencyDispatchResult[], hook = false) =>
    states.map((st, r) =>
      st.engine.combineSync({
        x: st.engine.getNextCombineBuffer(results[r]!.handle), topkIdx: data[r]!.topkIdx, topkWeights: data[r]!.topkWeights,
        handle: results[r]!.handle, zeroCopy: true, out: null, hook, asyncFinish: false, stream: st.stream.handle,
      }),
    );

  const pairs = countPairs(shape, seed, "full");
  const H = shape.hidden;
  const dispatchBytes = pairs * (H + (H / 128) * 4);
  const combineBytes = pairs * H * 2;
  // Ceilings: one copy kernel of all the bytes on rank 0's stream (plain launch, events), and the
  // same bytes copied by every rank's own kernel, launched exactly as each row of ours is (copyUs).
  const ceilings = { dispatch: copyForked(states, dispatchBytes), combine: copyForked(states, combineBytes) };
  const single = { dispatch: copyMs(dispatchBytes, states[0]!), combine: copyMs(combineBytes, states[0]!) };

  // hostMs: for events rows, the host's time launching one call of every rank (median).
  const row = (op: string, mode: string, ms: number, bytes: number, hostMs?: number): void => {
    const which = op.startsWith("dispatch") ? "dispatch" : op.startsWith("combine") ? "combine" : null;
    const ceiling = which === null ? null : ceilings[which];
    const copy = ceiling === null ? 0 : mode === "events" ? ceiling.events : mode === "graph" ? ceiling.graph : ceiling.graphPerCall;
    rows.push({
      case: label, ranks: shape.numRanks, op, mode, tokensPerRank: shape.maxTokensPerRank, hidden: H, topk: shape.topk,
      experts: shape.numExperts, latencyUs: ms * 1000, bytes: bytes || null, copyUs: bytes ? copy * 1000 : null,
      ratioToCopy: bytes ? copy / ms : null, GBps: bytes ? bytes / (ms * 1e6) : null,
      singleCopyUs: which === null || !bytes ? null : single[which] * 1000,
      ratioToSingleCopy: which === null || !bytes ? null : single[which] / ms,
      hostUs: hostMs === undefined ? null : hostMs * 1000,
      copyHostUs: hostMs === undefined || ceiling === null ? null : ceiling.eventsHost * 1000,
    });
  };
  if (opts.events) {
    const host = { median: 0 };
    const dispatchMs = eventsMs(states, () => dispatchAll(), host);
    row("dispatch", "events", dispatchMs, dispatchBytes, host.median);
    dispatchAll();
    for (const st of states) st.stream.synchronize();
    const results = last;
    const combineMs = eventsMs(states, () => combineAll(results), host);
    row("combine", "events", combineMs, combineBytes, host.median);
  }
  // Graphs: dispatch alone, then combine alone (of the dispatch captured just before).
  row("dispatch", "graph", graphMs(states, () => dispatchAll(false)), dispatchBytes);
  const captured = last;
  row("combine", "graph", graphMs(states, () => combineAll(captured)), combineBytes);

  if (opts.breakdown) {
    // Where a tiny call's time goes. (1) The same forked graph with an empty kernel per rank: what
    // graph launch, fork and join cost by themselves. (2) CALLS_PER_GRAPH calls captured back to back
    // in one graph, per call: what each call costs inside a decode step's graph (many layers), the
    // graph's own launch spread over them.
    const emptyKernels = () => states.forEach((st) => check(lib.bun_ep_debug_spin(0n, st.stream.handle), "empty kernel"));
    row("empty kernel per rank (graph overhead)", "graph", graphMs(states, emptyKernels), 0);
    const emptyMany = () => {
      for (let i = 0; i < CALLS_PER_GRAPH; i++) emptyKernels();
    };
    row(`empty kernel per rank`, `graph of ${CALLS_PER_GRAPH}, per call`, graphMs(states, emptyMany, CALLS_PER_GRAPH), 0);
    // The last two dispatches (one per buffer parity) feed the combines, which alternate between
    // them as two micro-batches do (back-to-back combines of ONE handle need a dispatch between).
    const lastTwo: LowLatencyDispatchResult[][] = [];
    const manyDispatch = () => {
      for (let i = 0; i < CALLS_PER_GRAPH; i++) lastTwo.push(dispatchAll(false));
    };
    row("dispatch", `graph of ${CALLS_PER_GRAPH}, per call`, graphMs(states, manyDispatch, CALLS_PER_GRAPH), dispatchBytes);
    const pair = lastTwo.slice(-2);
    const manyCombine = () => {
      for (let i = 0; i < CALLS_PER_GRAPH; i++) combineAll(pair[i % 2]!);
    };
    row("combine", `graph of ${CALLS_PER_GRAPH}, per call`, graphMs(states, manyCombine, CALLS_PER_GRAPH), combineBytes);
    // The hook path's own cost: send then hook() at once (nothing to overlap), per call.
    const hooked: LowLatencyDispatchResult[][] = [];
    const manyHookDispatch = () => {
      for (let i = 0; i < CALLS_PER_GRAPH; i++) {
        const results = dispatchAll(true);
        for (const r of results) r.hook();
        hooked.push(results);
      }
    };
    row("dispatch send + hook()", `graph of ${CALLS_PER_GRAPH}, per call`, graphMs(states, manyHookDispatch, CALLS_PER_GRAPH), dispatchBytes);
    const hookedPair = hooked.slice(-2);
    const manyHookCombine = () => {
      for (let i = 0; i < CALLS_PER_GRAPH; i++) for (const c of combineAll(hookedPair[i % 2]!, true)) c.hook();
    };
    row("combine send + hook()", `graph of ${CALLS_PER_GRAPH}, per call`, graphMs(states, manyHookCombine, CALLS_PER_GRAPH), combineBytes);
  }

  if (opts.overlap) {
    // Two micro-batches per step; between the calls a stand-in compute on each rank's stream: a spin
    // kernel of COMPUTE_US (GPU time without SMs or memory traffic: the most a hook can hide), or a
    // memory-bound full-GPU copy (it competes with the transfers for HBM and SMs). Timed with
    // events (plain launches) and as one captured graph per step.
    for (const kind of ["spin", "copy"] as const) {
      const scratch =
        kind === "copy"
          ? states.map((st) => ({
              src: DeviceTensor.zeros("u8", [COMPUTE_COPY_BYTES], { device: st.stream.device, stream: st.stream }),
              dst: DeviceTensor.zeros("u8", [COMPUTE_COPY_BYTES], { device: st.stream.device, stream: st.stream }),
            }))
          : [];
      // A block count of its own: the automatic one asks the stream's device, which a capture refuses.
      const copyBlocks = 4 * deviceProps(DEVICE).multiProcessorCount;
      const compute =
        kind === "spin"
          ? () => states.forEach((st) => check(lib.bun_ep_debug_spin(BigInt(Math.round(COMPUTE_US * 1000)), st.stream.handle), "compute"))
          : () =>
              states.forEach((st, r) =>
                check(lib.bun_ep_debug_copy_bytes(scratch[r]!.dst.ptr, scratch[r]!.src.ptr, COMPUTE_COPY_BYTES, copyBlocks, st.stream.handle), "compute"),
              );
      const computeOnly = () => {
        for (let i = 0; i < 4; i++) compute();
      };
      const stepWithout = () => {
        const a = dispatchAll();
        compute();
        const b = dispatchAll();
        compute();
        combineAll(a);
        compute();
        combineAll(b);
        compute();
      };
      const stepWith = () => {
        const a = dispatchAll(true);
        compute(); // micro-batch B's attention while A's tokens fly
        const b = dispatchAll(true);
        for (const r of a) r.hook();
        compute(); // A's experts while B's tokens fly
        for (const r of b) r.hook();
        const ca = combineAll(a, true);
        compute();
        const cb = combineAll(b, true);
        for (const c of ca) c.hook();
        compute();
        for (const c of cb) c.hook();
      };
      const what = kind === "spin" ? `${COMPUTE_US} us spin (no SM, no memory)` : `full-GPU copy of ${COMPUTE_COPY_BYTES / 2 ** 20} MiB per rank`;
      const op = `step(2 micro-batches, 4 x ${what})`;
      for (const timing of ["events", "graph"] as const) {
        const time = (fn: () => void): number => (timing === "events" ? eventsMs(states, fn) : graphMs(states, fn));
        const alone = time(computeOnly);
        const without = time(stepWithout);
        const withHooks = time(stepWith);
        rows.push({ case: label, ranks: shape.numRanks, op, mode: `${timing}: compute alone`, latencyUs: alone * 1000 });
        rows.push({ case: label, ranks: shape.numRanks, op, mode: `${timing}: no hooks`, latencyUs: without * 1000 });
        rows.push({ case: label, ranks: shape.numRanks, op, mode: `${timing}: hooks`, latencyUs: withHooks * 1000, overlapWin: without / withHooks });
      }
      for (const b of scratch) {
        b.src.free();
        b.dst.free();
      }
    }
  }

  for (const st of states) st.stream.synchronize();
  for (const d of data) for (const t of [d.x, d.topkIdx, d.topkWeights]) t.free();
  await Promise.all(states.map((s) => s.engine.close()));
  for (const s of states) s.stream.close();
  for (const g of groups) g.close();
}

const rows: Row[] = [];
const FLOOR_ONLY = process.argv.includes("--floor-only");
for (const numRanks of FLOOR_ONLY ? [] : RANKS) {
  const shape: LlShape = { numRanks, maxTokensPerRank: 128, hidden: 7168, numExperts: 256, topk: 8 };
  console.log(`EP${numRanks}: DeepEP decode config ...`);
  await benchShape("deepep-decode", shape, rows, { events: true, overlap: numRanks === RANKS[0], breakdown: true });
}
for (const numRanks of RANKS) {
  const shape: LlShape = { numRanks, maxTokensPerRank: 8, hidden: 7168, numExperts: 256, topk: 1 };
  console.log(`EP${numRanks}: latency floor ...`);
  await benchShape("floor(8 tokens, top-1)", shape, rows, { events: false, overlap: false, breakdown: true });
}
const path = writeResults(DISPATCH_PATH === "hook" ? "low_latency" : `low_latency_copy-engines-${DISPATCH_PATH}`, rows, {
  copyEngines: DISPATCH_PATH, iterations: ITERATIONS, warmup: WARMUP, goal: "ratioToCopy >= 0.6; floor < 10 us in a graph" });
console.log(markdownTable(rows, ["case", "ranks", "op", "mode", "latencyUs", "bytes", "copyUs", "ratioToCopy", "singleCopyUs", "ratioToSingleCopy", "GBps", "overlapWin", "hostUs", "copyHostUs"]));
console.log(`wrote ${path}`);
