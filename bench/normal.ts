// Normal-kernel benchmark in DeepEP's own setup (issue 5): 4096 tokens per rank, hidden 7168, top-8
// of 256 experts, random routing (top-k of |randn|+1 scores); cached dispatch (bf16 and fp8) and
// bf16 combine of the dispatched tensor. CUDA events around each call, median of 49 after 20
// warm-ups, L2 flushed before each; GB/s = received tokens x hidden x 2 bytes / time (fp8:
// x (1 + 4/128) / 2). In the same run: a device copy of the same bytes by every rank at once (the
// ceiling), the layout kernel time, the SM count and GB/s per SM, and the HBM bytes each path moves
// per byte received (the model of the kernels: direct dispatch into the arena and pulled combine
// move about half of what the staged/pushed paths move; see cuda/include/bun_ep_normal.h). Combine
// runs twice: on the dispatch output (in the arena: home ranks pull) and on a plain copy (pushed).
//
//   bun bench/normal.ts --ranks 2 [--sms 24] [--tokens 4096]           ranks of one process
//   bun bin/bun-ep.ts run --nproc 2 --ranks-per-gpu 2 bench/normal.ts   ranks as processes (MPS on)
//   ... --launch-slack-us 300 (default): a spin before each timed call absorbs the ranks' launch skew
//   bun bin/bun-ep.ts run --nproc 2 bench/normal.ts                     one rank per GPU
//
// Rows are merged into bench/results/normal.json (key: mode + ranks) and printed as a markdown table.
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { resolve } from "node:path";
import { EpBuffer } from "../lib/buffer.ts";
import { check, native } from "../lib/ffi.ts";
import { initGroupFromEnv, LocalGroup, type Group } from "../lib/group.ts";
import { makeRng, randomBf16, randomRouting } from "../lib/reference.ts";
import { deviceProps, Event, Stream, withDevice } from "../lib/stream.ts";
import { DeviceTensor, HostTensor } from "../lib/tensor.ts";
import type { DispatchHandle, DispatchResult } from "../lib/backend/types.ts";

const argv = process.argv.slice(2);
const flag = (name: string, fallback: number): number => {
  const i = argv.indexOf(`--${name}`);
  return i >= 0 ? Number(argv[i + 1]) : fallback;
};
const NUM_TOKENS = flag("tokens", 4096);
const HIDDEN = 7168;
const TOPK = 8;
const NUM_EXPERTS = 256;
const NUM_SMS = flag("sms", 24);
// Before each timed call every rank's stream first runs a short spin kernel, so that the host-side
// barrier's release skew (rank 0 is released first; under MPS its kernel then waited ~200 us for the
// others' launches, batch 3: EP4 rank 0 910 us vs 707-741 us) is absorbed before the start event, as
// it is when calls are queued back to back. --launch-slack-us 0 turns it off.
const LAUNCH_SLACK_US = flag("launch-slack-us", 300);
const WARMUP = 20;
const RUNS = 49;
const DEVICE = Number(process.env.BUN_EP_DEVICE ?? 0);
// One process: rank r runs on device r % BUN_EP_NUM_GPUS (default 1: every rank on DEVICE). As
// processes, the launcher sets BUN_EP_DEVICE per rank (--ranks-per-gpu).
const NUM_GPUS = Math.max(1, Number(process.env.BUN_EP_NUM_GPUS ?? 1));
const deviceOf = (group: Group): number => (process.env.RANK === undefined && NUM_GPUS > 1 ? group.rank % NUM_GPUS : DEVICE);

/** DeepEP V1 on one H100, 2 or 4 ranks as processes (MPS), 24 SMs per rank: GB/s (issue 5). */
const DEEPEP: Record<string, number> = {
  "2 dispatch fp8": 221, "2 dispatch bf16": 281, "2 combine bf16": 229,
  "4 dispatch fp8": 198, "4 dispatch bf16": 195, "4 combine bf16": 195,
};

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

interface Rank {
  buffer: EpBuffer;
  device: number;
  stream: Stream; // the rank's compute stream (buffer.stream): where the timing events go
  flush: DeviceTensor<"u8">;
  x: DeviceTensor;
  xFp8: DeviceTensor;
  scales: DeviceTensor;
  topkIdx: DeviceTensor;
}

async function setup(groups: Group[]): Promise<Rank[]> {
  const buffers = await Promise.all(groups.map((group) => EpBuffer.create({ group, backend: "cuda", device: deviceOf(group), numNvlBytes: 1_200_000_000, numSMs: NUM_SMS, timeoutMs: 8000 })));
  return buffers.map((buffer) => {
    const device = buffer.device as number;
    const rng = makeRng(1234 + buffer.rank);
    const host = randomBf16(rng, [NUM_TOKENS, HIDDEN]);
    const fp8 = new HostTensor("fp8_e4m3", [NUM_TOKENS, HIDDEN]);
    for (let i = 0; i < fp8.numel; i++) fp8.data[i] = (host.data[i]! >> 8) & 0x7e; // any finite e4m3 bytes
    const scales = HostTensor.full("f32", [NUM_TOKENS, HIDDEN / 128], 1);
    return {
      buffer,
      device,
      stream: buffer.stream!,
      flush: DeviceTensor.empty("u8", [256 << 20], { device, stream: buffer.stream! }),
      x: buffer.fromHost(host) as DeviceTensor,
      xFp8: buffer.fromHost(fp8) as DeviceTensor,
      scales: buffer.fromHost(scales) as DeviceTensor,
      topkIdx: buffer.fromHost(randomRouting(rng, NUM_TOKENS, NUM_EXPERTS, TOPK)) as DeviceTensor,
    };
  });
}

/** Time `op` on every rank at once (all launched, then awaited): median ms per rank. */
async function timeAll(ranks: Rank[], barrier: () => Promise<void>, op: (r: Rank) => Promise<unknown>): Promise<number[]> {
  const samples: number[][] = ranks.map(() => []);
  for (let i = 0; i < WARMUP + RUNS; i++) {
    const events = ranks.map((r) => {
      r.flush.fillBytes(i & 0xff, r.stream);
      return [Event.create({ device: r.device, timing: true }), Event.create({ device: r.device, timing: true })] as const;
    });
    for (const r of ranks) r.stream.synchronize();
    await barrier();
    if (LAUNCH_SLACK_US > 0) for (const r of ranks) withDevice(r.device, () => check(native().bun_ep_debug_spin(BigInt(LAUNCH_SLACK_US * 1000), r.stream.handle), "launch slack spin"));
    const results = await Promise.all(
      ranks.map((r, k) => {
        events[k]![0].record(r.stream);
        return op(r).then((res) => {
          events[k]![1].record(r.stream);
          return res;
        });
      }),
    );
    ranks.forEach((r, k) => {
      events[k]![1].synchronize();
      if (i >= WARMUP) samples[k]!.push(events[k]![0].elapsedMs(events[k]![1]));
      events[k]![0].close();
      events[k]![1].close();
      freeResult(results[k]);
    });
  }
  return samples.map(median);
}

function freeResult(res: unknown): void {
  if (res === null || typeof res !== "object") return;
  for (const key of ["recvX", "recvXScales", "recvTopkIdx", "recvTopkWeights", "recvCountPerExpert", "combinedX", "combinedTopkWeights", "numTokensPerRank", "numTokensPerExpert", "isTokenInRank"]) {
    const t = (res as Record<string, unknown>)[key];
    if (t instanceof DeviceTensor) t.free();
  }
}

async function main(): Promise<void> {
  const asProcesses = process.env.RANK !== undefined;
  let groups: Group[];
  if (asProcesses) groups = [await initGroupFromEnv()];
  else groups = LocalGroup.create(flag("ranks", 2));
  const numRanks = groups[0]!.size;
  const mode = asProcesses ? "processes" : "one process";
  const barrier = async (): Promise<void> => {
    await Promise.all(groups.map((g) => g.barrier()));
  };
  const ranks = await setup(groups);

  // Layout and the first (non-cached) dispatch give the handles.
  const layoutMs = await timeAll(ranks, barrier, async (r) => r.buffer.getDispatchLayout(r.topkIdx, NUM_EXPERTS));
  const first = await Promise.all(ranks.map((r) => r.buffer.dispatch({ x: r.x, topkIdx: r.topkIdx, layout: r.buffer.getDispatchLayout(r.topkIdx, NUM_EXPERTS) })));
  const handles = new Map<Rank, DispatchHandle>(ranks.map((r, k) => [r, first[k]!.handle]));
  const recvX = new Map<Rank, DispatchResult>(ranks.map((r, k) => [r, first[k]!]));
  const numRecv = ranks.map((r) => handles.get(r)!.numRecvTokens!);

  const bf16Ms = await timeAll(ranks, barrier, (r) => r.buffer.dispatch({ x: r.x, handle: handles.get(r)! }));
  const fp8Ms = await timeAll(ranks, barrier, (r) => r.buffer.dispatch({ x: r.xFp8, xScales: r.scales, handle: handles.get(r)! }));
  const combineMs = await timeAll(ranks, barrier, (r) => r.buffer.combine({ x: recvX.get(r)!.recvX, handle: handles.get(r)! }));
  // The same combine from a plain pool copy of the rows: pushed into the home ranks' staging.
  const plainX = new Map<Rank, DeviceTensor>(
    ranks.map((r) => {
      const src = recvX.get(r)!.recvX as DeviceTensor<"bf16">;
      return [r, DeviceTensor.empty("bf16", src.shape, { device: r.device, stream: r.stream }).copyFrom(src, r.stream)];
    }),
  );
  const combinePushMs = await timeAll(ranks, barrier, (r) => r.buffer.combine({ x: plainX.get(r)!, handle: handles.get(r)! }));
  // Arena tensors carry their own free() (they hand the block back to the arena).
  const direct = ranks.map((r) => Object.hasOwn(recvX.get(r)!.recvX, "free"));

  // Ceiling: every rank copies its received bf16 bytes at once with a copy kernel (4 blocks per SM).
  const copyMs = await (async () => {
    const bufs = ranks.map((r, k) => ({
      src: DeviceTensor.empty("u8", [numRecv[k]! * HIDDEN * 2], { device: r.device }),
      dst: DeviceTensor.empty("u8", [numRecv[k]! * HIDDEN * 2], { device: r.device }),
      stream: Stream.create({ device: r.device }),
    }));
    const times = await timeAll(
      ranks.map((r, k) => ({ ...r, stream: bufs[k]!.stream })),
      barrier,
      async (r) => {
        const b = bufs[ranks.findIndex((q) => q.buffer === r.buffer)]!;
        withDevice(b.stream.device, () => check(native().bun_ep_debug_copy_bytes(b.dst.ptr, b.src.ptr, b.dst.byteLength, 0, b.stream.handle), "ceiling copy"));
      },
    );
    for (const b of bufs) {
      b.src.free();
      b.dst.free();
    }
    return times;
  })();

  const device = deviceProps(ranks[0]!.device);
  const rows: Record<string, unknown>[] = [];
  ranks.forEach((r, k) => {
    const bytesBf16 = numRecv[k]! * HIDDEN * 2;
    const bytesFp8 = (bytesBf16 * (1 + 4 / 128)) / 2;
    const ceilingGBs = bytesBf16 / (copyMs[k]! * 1e6);
    // HBM bytes moved per byte received, from the kernels' design: x read once per token (T rows),
    // each received row written once; staged adds a staging write and read; combine reads every
    // received row once and writes T rows, push adds a staging write and read.
    const sentShare = NUM_TOKENS / numRecv[k]!;
    const dispatchPasses = sentShare + 1 + (direct[k] ? 0 : 2);
    const pullPasses = 1 + sentShare;
    const pushPasses = 1 + sentShare + 2;
    for (const [name, ms, bytes, passes, path] of [
      ["dispatch bf16", bf16Ms[k]!, bytesBf16, dispatchPasses, direct[k] ? "direct" : "staged"],
      ["dispatch fp8", fp8Ms[k]!, bytesFp8, dispatchPasses, direct[k] ? "direct" : "staged"],
      ["combine bf16", combineMs[k]!, bytesBf16, direct[k] ? pullPasses : pushPasses, direct[k] ? "pull" : "push"],
      ["combine bf16 (push)", combinePushMs[k]!, bytesBf16, pushPasses, "push"],
    ] as const) {
      const gbs = bytes / (ms * 1e6);
      const deepep = DEEPEP[`${numRanks} ${name}`];
      rows.push({
        mode, numRanks, rank: r.buffer.rank, case: `EP${numRanks} ${name}`, path, numRecvTokens: numRecv[k], timeUs: ms * 1e3, gbs,
        ceilingGBs, ratioToCeiling: gbs / ceilingGBs, bytesMovedPerByte: passes, hbmGBs: gbs * passes, numSMs: NUM_SMS, gbsPerSM: gbs / NUM_SMS,
        layoutUs: layoutMs[k]! * 1e3, deepepGBs: deepep ?? null, ratioToDeepEP: deepep !== undefined ? gbs / deepep : null,
      });
    }
  });

  const isWriter = !asProcesses || groups[0]!.rank === 0;
  let allRows = rows;
  if (asProcesses) {
    const gathered = await groups[0]!.allGather(new TextEncoder().encode(JSON.stringify(rows)));
    allRows = gathered.flatMap((b) => JSON.parse(new TextDecoder().decode(b)) as Record<string, unknown>[]);
  }
  if (isWriter) {
    const dir = resolve(import.meta.dir, "results");
    mkdirSync(dir, { recursive: true });
    const path = resolve(dir, "normal.json");
    const previous = existsSync(path) ? (JSON.parse(readFileSync(path, "utf8")) as { rows?: Record<string, unknown>[] }) : {};
    const kept = (previous.rows ?? []).filter((row) => !(row.mode === mode && row.numRanks === numRanks));
    writeFileSync(path, JSON.stringify({ device: device.name ?? `device ${DEVICE}`, date: new Date().toISOString(), command: `bun ${process.argv.slice(1).join(" ")}`, rows: [...kept, ...allRows] }, null, 2));
    console.log(`\n${device.name ?? ""} ${mode}, ${numRanks} ranks, ${NUM_SMS} SMs per rank, ${NUM_TOKENS} tokens, hidden ${HIDDEN}, top-${TOPK} of ${NUM_EXPERTS}`);
    console.log("| case | path | rank | recv tokens | time (us) | GB/s | ceiling GB/s | of ceiling | bytes moved / byte | HBM GB/s | GB/s per SM | layout (us) | DeepEP GB/s | ratioToDeepEP |");
    console.log("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (const row of allRows) {
      const f = (v: unknown, d = 1): string => (typeof v === "number" ? v.toFixed(d) : "-");
      console.log(`| ${row.case} | ${row.path} | ${row.rank} | ${row.numRecvTokens} | ${f(row.timeUs)} | ${f(row.gbs)} | ${f(row.ceilingGBs)} | ${f(row.ratioToCeiling, 2)} | ${f(row.bytesMovedPerByte, 2)} | ${f(row.hbmGBs, 0)} | ${f(row.gbsPerSM, 2)} | ${f(row.layoutUs)} | ${f(row.deepepGBs, 0)} | ${f(row.ratioToDeepEP, 2)} |`);
    }
    console.log(`written: ${path}`);
  }
  for (const r of ranks) {
    for (const t of [r.flush, r.x, r.xFp8, r.scales, r.topkIdx, plainX.get(r)!]) t.free();
    freeResult(recvX.get(r));
  }
  await Promise.all(ranks.map((r) => r.buffer.close()));
  for (const g of groups) g.close();
}

await main();
