// Finds the SM budget of the normal kernels for one shape on this machine and writes it where
// lib/buffer.ts reads tuned configs (env BUN_EP_TUNED_CONFIGS, else build/tuned-configs.json; or
// --out PATH). The kernels have no chunk sizes (rows land at their final place, see
// cuda/include/bun_ep_normal.h), so numSMs is the one knob: each candidate is timed for a cached
// bf16 dispatch and a combine of its output (CUDA events, median after warm-up, slowest rank
// counts), and the fastest is kept per operation and world size. Other world sizes already in
// the file are kept.
//
//   bun scripts/tune.ts --ranks 2 [--tokens 4096] [--hidden 7168] [--sms 8,16,24,32]   ranks of one process
//   bun bin/bun-ep.ts run --nproc 4 --ranks-per-gpu 4 scripts/tune.ts                  ranks as processes
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname } from "node:path";
import type { DispatchResult } from "../lib/backend/types.ts";
import { EpBuffer, tunedConfigPath, type TunedConfigTable } from "../lib/buffer.ts";
import { initGroupFromEnv, LocalGroup, type Group } from "../lib/group.ts";
import { makeRng, randomBf16, randomRouting } from "../lib/reference.ts";
import { deviceCount, deviceProps, Event } from "../lib/stream.ts";
import { DeviceTensor } from "../lib/tensor.ts";

const argv = process.argv.slice(2);
const option = (name: string): string | undefined => {
  const i = argv.indexOf(`--${name}`);
  return i >= 0 ? argv[i + 1] : undefined;
};
const NUM_TOKENS = Number(option("tokens") ?? 4096);
const HIDDEN = Number(option("hidden") ?? 7168);
const TOPK = Number(option("topk") ?? 8);
const NUM_EXPERTS = Number(option("experts") ?? 256);
const WARMUP = 5;
const RUNS = 15;
const DEVICE = Number(process.env.BUN_EP_DEVICE ?? 0);

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

function candidates(ranksSharingGpu: number): number[] {
  const given = option("sms");
  if (given !== undefined) return given.split(",").map(Number);
  // Every rank's blocks must fit on the GPU at once (ranks sharing one GPU share its SMs).
  const perRank = Math.floor(deviceProps(DEVICE).multiProcessorCount / ranksSharingGpu);
  return [8, 12, 16, 20, 24, 32, 40, 48, 64, 96].filter((n) => n <= perRank);
}

/** Median ms of `op` (all ranks launched, then awaited), the slowest rank's. */
async function timeOp(buffers: EpBuffer[], barrier: () => Promise<void>, op: (b: EpBuffer, i: number) => Promise<unknown>): Promise<number> {
  const samples: number[][] = buffers.map(() => []);
  for (let i = 0; i < WARMUP + RUNS; i++) {
    await barrier();
    const events = buffers.map((b) => [Event.create({ device: DEVICE, timing: true }).record(b.stream!), Event.create({ device: DEVICE, timing: true })] as const);
    const results = await Promise.all(buffers.map((b, k) => op(b, k)));
    buffers.forEach((b, k) => {
      const [start, end] = events[k]!;
      end.record(b.stream!).synchronize();
      if (i >= WARMUP) samples[k]!.push(start.elapsedMs(end));
      start.close();
      end.close();
      const res = results[k] as Partial<DispatchResult> & { combinedX?: unknown };
      for (const t of [res.recvX, res.recvXScales, res.recvCountPerExpert, res.combinedX]) if (t instanceof DeviceTensor) t.free();
    });
  }
  return Math.max(...samples.map(median));
}

async function main(): Promise<void> {
  const asProcesses = process.env.RANK !== undefined;
  const groups: Group[] = asProcesses ? [await initGroupFromEnv()] : LocalGroup.create(Number(option("ranks") ?? 2));
  const numRanks = groups[0]!.size;
  // Processes: the launcher spreads LOCAL_WORLD_SIZE ranks over the GPUs (--ranks-per-gpu K per GPU).
  const ranksSharingGpu = asProcesses ? Math.ceil(Number(process.env.LOCAL_WORLD_SIZE ?? numRanks) / Math.max(1, deviceCount())) : numRanks;
  const barrier = async (): Promise<void> => {
    await Promise.all(groups.map((g) => g.barrier()));
  };
  const buffers = await Promise.all(groups.map((group) => EpBuffer.create({ group, backend: "cuda", device: DEVICE, numNvlBytes: 1_200_000_000, timeoutMs: 8000 })));
  const inputs = buffers.map((b) => {
    const rng = makeRng(99 + b.rank);
    return { x: b.fromHost(randomBf16(rng, [NUM_TOKENS, HIDDEN])), topkIdx: b.fromHost(randomRouting(rng, NUM_TOKENS, NUM_EXPERTS, TOPK)) };
  });
  const first = await Promise.all(buffers.map((b, i) => b.dispatch({ x: inputs[i]!.x, topkIdx: inputs[i]!.topkIdx, numExperts: NUM_EXPERTS })));

  const results: { numSMs: number; dispatchMs: number; combineMs: number }[] = [];
  for (const numSMs of candidates(ranksSharingGpu)) {
    const dispatchConfig = { ...EpBuffer.getDispatchConfig(numRanks), numSMs };
    const combineConfig = { ...EpBuffer.getCombineConfig(numRanks), numSMs };
    const dispatchMs = await timeOp(buffers, barrier, (b, i) => b.dispatch({ x: inputs[i]!.x, handle: first[i]!.handle, config: dispatchConfig }));
    const combineMs = await timeOp(buffers, barrier, (b, i) => b.combine({ x: first[i]!.recvX, handle: first[i]!.handle, config: combineConfig }));
    results.push({ numSMs, dispatchMs, combineMs });
    if (groups[0]!.rank === 0) console.log(`numSMs ${numSMs}: dispatch ${(dispatchMs * 1e3).toFixed(1)} us, combine ${(combineMs * 1e3).toFixed(1)} us`);
  }
  const best = (key: "dispatchMs" | "combineMs"): number => results.reduce((a, b) => (b[key] < a[key] ? b : a)).numSMs;

  if (groups[0]!.rank === 0) {
    const path = option("out") ?? tunedConfigPath();
    const table: TunedConfigTable = existsSync(path) ? (JSON.parse(readFileSync(path, "utf8")) as TunedConfigTable) : {};
    table.dispatch = { ...table.dispatch, [String(numRanks)]: { numSMs: best("dispatchMs") } };
    table.combine = { ...table.combine, [String(numRanks)]: { numSMs: best("combineMs") } };
    mkdirSync(dirname(path), { recursive: true });
    writeFileSync(path, `${JSON.stringify(table, null, 2)}\n`);
    console.log(`${numRanks} ranks (${ranksSharingGpu} per GPU), ${NUM_TOKENS} tokens, hidden ${HIDDEN}: dispatch numSMs ${best("dispatchMs")}, combine numSMs ${best("combineMs")}; written ${path}`);
  }
  for (const [i, r] of first.entries()) {
    for (const t of [r.recvX, r.recvXScales, r.recvTopkIdx, r.recvTopkWeights, r.recvCountPerExpert]) (t as DeviceTensor | null)?.free();
    for (const t of [inputs[i]!.x, inputs[i]!.topkIdx]) (t as DeviceTensor).free();
  }
  await Promise.all(buffers.map((b) => b.close()));
  for (const g of groups) g.close();
}

await main();
