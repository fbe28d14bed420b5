// Internode normal-kernel benchmark in DeepEP's setup (issue 7): 4096 tokens per rank, hidden 7168,
// top-8 of 256 experts, random routing (top-k of |randn|+1 scores); cached dispatch (bf16, fp8) and
// bf16 combine of the dispatched tensor, CUDA events around each call, median after warm-up (the
// L2 is not flushed). Bytes as DeepEP's test_internode counts them: RDMA = tokens sent per node
// (numTokensPerRdmaRank summed over every node, own included) x hidden x 2, NVL = received rows x
// hidden x 2 (fp8: x (1 + 4/128) / 2); combine moves the same bytes back.
//
//   BUN_EP_RANKS_PER_NODE=1 bun bin/bun-ep.ts run --nproc 2 --ranks-per-gpu 2 bench/internode.ts [--sms 24]
//
// On one GPU (virtual nodes, NVSHMEM's P2P transport standing in for RDMA) the figures show only
// the kernels' own cost, not a network's: the script says so. Rows go to bench/results/internode.json.
import { existsSync, readFileSync } from "node:fs";
import { resolve } from "node:path";
import { InternodeEngine } from "../lib/backend/cuda_internode.ts";
import type { CommConfig, DispatchHandle, DispatchResult } from "../lib/backend/types.ts";
import { quantizeFp8 } from "../lib/convert.ts";
import { initGroupFromEnv } from "../lib/group.ts";
import { makeRng, randomBf16, randomRouting } from "../lib/reference.ts";
import { Event, Stream, deviceCount } from "../lib/stream.ts";
import { DeviceTensor, type Tensor } from "../lib/tensor.ts";
import { markdownTable, median, writeResults, type Row } from "./common.ts";

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
const WARMUP = flag("warmup", 10);
const RUNS = flag("runs", 29);
const DEVICE = Number(process.env.BUN_EP_DEVICE ?? 0);

const group = await initGroupFromEnv();
const R = group.size;
const L = group.ranksPerNode;
const N = R / L;
if (N < 2) throw new Error(`bench/internode.ts needs at least 2 (virtual) nodes: set BUN_EP_RANKS_PER_NODE below the rank count ${R}`);
const oneGpu = deviceCount() === 1;
const commStream = Stream.create({ device: DEVICE });
const computeStream = Stream.create({ device: DEVICE });
const engine = await InternodeEngine.create({
  init: { group, bufferId: 1, device: DEVICE, numNvlBytes: 1024 << 20, numRdmaBytes: 512 << 20, lowLatency: null, timeoutMs: 8_000 },
  commStream,
  computeStream,
});
const config: CommConfig = { numSMs: NUM_SMS, nvlChunkedSendTokens: 8, nvlChunkedRecvTokens: 256, rdmaChunkedSendTokens: 16, rdmaChunkedRecvTokens: 128 };

// Inputs of this rank (seeded by rank: only the shapes and routing statistics matter here).
const rng = makeRng(1000 + group.rank);
const xHost = randomBf16(rng, [NUM_TOKENS, HIDDEN]);
const topkHost = randomRouting(rng, NUM_TOKENS, NUM_EXPERTS, TOPK);
const fp8Host = quantizeFp8(xHost, { roundScale: false, ue8m0: false });
const up = <T extends Tensor>(t: T) => DeviceTensor.fromHost(t as never, { device: DEVICE, stream: computeStream });
const x = up(xHost);
const xFp8 = up(fp8Host.q);
const xScales = up(fp8Host.scales);
const topkIdx = up(topkHost);
computeStream.synchronize();

const layout = engine.getDispatchLayout(topkIdx, NUM_EXPERTS, null, false);
computeStream.synchronize();
const tokensPerNode = Array.from((layout.numTokensPerRdmaRank as DeviceTensor).toHost().data as Int32Array);
const rdmaTokens = tokensPerNode.reduce((a, b) => a + b, 0);
const fresh: DispatchResult = await engine.dispatch({
  x, xScales: null, topkIdx, topkWeights: null, layout, handle: null, expertAlignment: 1, numWorstTokens: 0, config, previousEvent: null, asyncFinish: false,
});
const handle: DispatchHandle = fresh.handle;
const numRecv = fresh.numRecvTokens ?? 0;

/** Milliseconds of each timed call: events on the comm stream around it, outputs freed after. */
async function timeCalls(call: () => Promise<Tensor[]>): Promise<number[]> {
  const times: number[] = [];
  for (let i = 0; i < WARMUP + RUNS; i++) {
    await group.barrier(); // start every rank's call together (the kernels wait for each other anyway)
    const start = Event.create({ device: DEVICE, timing: true }).record(commStream);
    const outputs = await call();
    const end = Event.create({ device: DEVICE, timing: true }).record(commStream);
    end.synchronize();
    if (i >= WARMUP) times.push(start.elapsedMs(end));
    start.close();
    end.close();
    for (const t of outputs) (t as DeviceTensor).free(commStream);
  }
  return times;
}

const cached = (input: Tensor, scales: Tensor | null) => async (): Promise<Tensor[]> => {
  const r = await engine.dispatch({
    x: input, xScales: scales, topkIdx: null, topkWeights: null, layout: null, handle, expertAlignment: 1, numWorstTokens: 0, config, previousEvent: null, asyncFinish: true,
  });
  return [r.recvX, ...(r.recvXScales ? [r.recvXScales] : []), r.recvCountPerExpert];
};
const combine = async (): Promise<Tensor[]> => {
  const r = await engine.combine({ x: fresh.recvX, handle, topkWeights: null, biases: [], config, previousEvent: null, asyncFinish: true });
  return [r.combinedX];
};

const fp8Factor = (1 + 4 / 128) / 2;
const rows: Row[] = [];
const addRow = (name: string, ms: number[], factor: number): void => {
  const t = median(ms);
  const rdmaBytes = rdmaTokens * HIDDEN * 2 * factor;
  const nvlBytes = numRecv * HIDDEN * 2 * factor;
  rows.push({
    case: `${N}x${L} ${name}`,
    rank: group.rank,
    numSMs: NUM_SMS,
    us: Math.round(t * 1000),
    rdmaGBs: rdmaBytes / (t * 1e6),
    nvlGBs: nvlBytes / (t * 1e6),
    rdmaTokens,
    recvTokens: numRecv,
  });
};
addRow("dispatch bf16 (cached)", await timeCalls(cached(x, null)), 1);
addRow("dispatch fp8 (cached)", await timeCalls(cached(xFp8, xScales)), fp8Factor);
addRow("combine bf16", await timeCalls(combine), 1);

// Rank 0 gathers every rank's rows and writes the result file.
const all = await group.allGather(new TextEncoder().encode(JSON.stringify(rows)));
if (group.rank === 0) {
  const every = all.flatMap((b) => JSON.parse(new TextDecoder().decode(b)) as Row[]);
  const note = oneGpu
    ? "one GPU: every rank shares it and NVSHMEM's P2P transport stands in for RDMA, so these figures show only the kernels' own cost, not a network's"
    : "several GPUs: see the transport NVSHMEM chose (NVSHMEM_DEBUG=INFO)";
  console.log(`internode bench, ${N} nodes x ${L} ranks, ${NUM_TOKENS} tokens, hidden ${HIDDEN}, top-${TOPK} of ${NUM_EXPERTS}, ${NUM_SMS} SMs; ${note}`);
  console.log(markdownTable(every));
  const path = resolve(import.meta.dir, "results", "internode.json");
  let previous: Row[] = [];
  if (existsSync(path)) {
    try {
      previous = (JSON.parse(readFileSync(path, "utf8")) as { rows?: Row[] }).rows ?? [];
    } catch {
      previous = [];
    }
  }
  const key = `${N}x${L} `;
  const merged = [...previous.filter((r) => !String(r.case).startsWith(key)), ...every];
  console.log(`wrote ${writeResults("internode", merged, { note, bytes: "DeepEP test_internode: RDMA = sum(numTokensPerRdmaRank) x hidden x 2, NVL = recv rows x hidden x 2; fp8 x (1+4/128)/2" })}`);
}
for (const t of [fresh.recvX, fresh.recvTopkIdx, fresh.recvCountPerExpert, x, xFp8, xScales, topkIdx]) (t as DeviceTensor | null)?.free();
await engine.close();
group.close();
