// A decode loop of a toy MoE across N ranks with the low-latency kernels: two micro-batches per
// step overlapped through hooks, the whole step captured once as a CUDA graph and replayed.
//
//   bun examples/decode-loop.ts                          (2 ranks in this process, LocalGroup)
//   bun examples/decode-loop.ts --ranks 4 --steps 200
//   bun examples/decode-loop.ts --launcher --ranks 2     (one process per rank: bun bin/bun-ep.ts run)
//   bun examples/decode-loop.ts --serve [--port 8080]    (HTTP: GET /generate?prompt=hi&tokens=16)
//   bun examples/decode-loop.ts --serve --requests 8     (sends 8 requests to itself, prints them, exits)
//
// The toy model. Every rank holds `tokens` sequences per micro-batch. A step embeds each
// sequence's last token (a fixed random table), routes it to `topk` experts (chosen from the token
// id), dispatches (lowLatencyDispatch, bf16), runs the experts, combines (weighted sum on the home
// rank), and reads the next token off the result with a small LM head on the CPU. An expert here is
// the identity plus a fixed amount of GPU work (a spin kernel of --expert-us, standing in for the
// expert FFN), so the combined row is exactly bf16(sum_k w_k * x): every step is checked bit for
// bit on the host.
//
// Per step the GPU runs, on each rank's own stream (ranks of one process must not share one):
//   no hooks:  dispatch0, experts0, combine0, dispatch1, experts1, combine1
//   hooks:     send0, send1, recv0, experts0, csend0, recv1, experts1, csend1, crecv0, crecv1
// With hooks the bytes of one micro-batch travel while the other's experts compute, and no SM
// spins waiting for them. Both variants are captured once per rank and replayed; latency is the
// median of CUDA-event times of the replays. Without a GPU (or built library) it runs the same
// steps on the host backend, without graphs, and says so.

import { EpBuffer, type BackendChoice } from "../lib/buffer.ts";
import type { LowLatencyDispatchResult } from "../lib/backend/types.ts";
import { bf16ToF32, f32ToBf16 } from "../lib/convert.ts";
import { native } from "../lib/ffi.ts";
import { LocalGroup, initGroupFromEnv, type Group } from "../lib/group.ts";
import { makeRng } from "../lib/reference.ts";
import { Event, Stream, type Graph } from "../lib/stream.ts";
import { DeviceTensor, HostTensor, type Tensor } from "../lib/tensor.ts";

interface Config {
  ranks: number;
  tokens: number;
  hidden: number;
  experts: number;
  topk: number;
  steps: number;
  expertUs: number;
  vocab: number;
  seed: number;
  launcher: boolean;
  serve: boolean;
  port: number;
  requests: number;
  backend: BackendChoice;
}

const USAGE = `usage: bun examples/decode-loop.ts [--ranks N] [--launcher] [--tokens T] [--hidden H] [--experts E] [--topk K]
       [--steps S] [--expert-us U] [--seed N] [--backend auto|cuda|host] [--serve [--port P] [--requests N]]
  --ranks      ranks (default 2): LocalGroup in this process, or processes with --launcher
  --tokens     sequences per micro-batch per rank (default 16; two micro-batches per step)
  --expert-us  GPU time of one micro-batch's experts (spin kernel; default 20)
  --serve      answer GET /generate?prompt=..&tokens=N on --port (default 0: any free port)
  --requests   with --serve: send N requests to this server, print the answers, exit`;

function parseArgs(argv: string[]): Config {
  const c: Config = {
    ranks: 2, tokens: 16, hidden: 1024, experts: 16, topk: 4, steps: 100, expertUs: 20, vocab: 128, seed: 1,
    launcher: false, serve: false, port: 0, requests: 0, backend: "auto",
  };
  const numeric: Record<string, keyof Config> = {
    "--ranks": "ranks", "--tokens": "tokens", "--hidden": "hidden", "--experts": "experts", "--topk": "topk",
    "--steps": "steps", "--expert-us": "expertUs", "--seed": "seed", "--port": "port", "--requests": "requests",
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === "--help" || arg === "-h") {
      console.log(USAGE);
      process.exit(0);
    } else if (arg === "--launcher") c.launcher = true;
    else if (arg === "--serve") c.serve = true;
    else if (arg === "--backend") {
      const v = argv[++i];
      if (v !== "auto" && v !== "cuda" && v !== "host") throw new Error(`--backend: expected auto, cuda or host, got ${v}\n${USAGE}`);
      c.backend = v;
    } else if (numeric[arg] !== undefined) {
      const v = argv[++i];
      if (v === undefined || !/^\d+$/.test(v)) throw new Error(`${arg}: expected a non-negative integer, got ${v}\n${USAGE}`);
      (c as unknown as Record<string, number>)[numeric[arg]] = Number(v);
    } else throw new Error(`unknown argument ${arg}\n${USAGE}`);
  }
  if (c.experts % c.ranks !== 0) throw new Error(`--experts ${c.experts} must be a multiple of --ranks ${c.ranks}`);
  if (c.topk < 1 || c.topk > Math.min(16, c.experts)) throw new Error(`--topk: expected 1..${Math.min(16, c.experts)}, got ${c.topk}`);
  if (c.hidden < 128 || c.hidden % 128 !== 0) throw new Error(`--hidden: expected a positive multiple of 128, got ${c.hidden}`);
  if (c.tokens < 1) throw new Error(`--tokens: expected >= 1, got ${c.tokens}`);
  if (c.requests > 0) c.serve = true;
  return c;
}

// ---- the toy model (same tables on every rank, from the seed) -------------------------------------

class ToyModel {
  readonly embedding: Uint16Array; // bf16 [vocab, hidden]
  readonly head: Float32Array; // [vocab, min(hidden, 128)]
  readonly headWidth: number;
  constructor(readonly c: Config) {
    const rng = makeRng(c.seed);
    this.embedding = Uint16Array.from({ length: c.vocab * c.hidden }, () => f32ToBf16(rng.normal()));
    this.headWidth = Math.min(c.hidden, 128);
    this.head = Float32Array.from({ length: c.vocab * this.headWidth }, () => rng.normal());
  }

  /** Experts and weights of a token: `topk` distinct experts and weights summing to about 1. */
  route(token: number): { experts: number[]; weights: number[] } {
    const rng = makeRng(this.c.seed * 7919 + token);
    const experts: number[] = [];
    while (experts.length < this.c.topk) {
      const e = rng.int(this.c.experts);
      if (!experts.includes(e)) experts.push(e);
    }
    const raw = experts.map(() => 0.5 + rng.next());
    const sum = raw.reduce((a, b) => a + b, 0);
    return { experts, weights: raw.map((w) => Math.fround(w / sum)) };
  }

  /** The next token: argmax of the LM head over the combined row. */
  next(row: Uint16Array): number {
    let best = 0;
    let bestLogit = -Infinity;
    for (let v = 0; v < this.c.vocab; v++) {
      let logit = 0;
      for (let i = 0; i < this.headWidth; i++) logit += this.head[v * this.headWidth + i]! * bf16ToF32(row[i]!);
      if (logit > bestLogit) [best, bestLogit] = [v, logit];
    }
    return best;
  }

  /** What combine must return for a token with identity experts: bf16(sum_k f32(w_k * x)), in k order. */
  expected(token: number, channel: number): number {
    const x = bf16ToF32(this.embedding[token * this.c.hidden + channel]!);
    let acc = 0;
    for (const w of this.route(token).weights) acc = Math.fround(acc + Math.fround(w * x));
    return f32ToBf16(acc);
  }
}

// ---- one rank's state: its buffer, stream, micro-batch tensors, sequences ---------------------------

interface MicroBatch {
  x: Tensor; // bf16 [T, H]
  topkIdx: Tensor; // i64 [T, K]
  topkWeights: Tensor; // f32 [T, K]
  out: Tensor; // bf16 [T, H]
  tokens: Int32Array; // last token of each sequence
}

interface Rank {
  rank: number;
  group: Group;
  buffer: EpBuffer;
  stream: Stream | null; // CUDA: this rank's own stream (graphs run there)
  mbs: [MicroBatch, MicroBatch];
  graphs: { plain: Graph; hooked: Graph } | null;
}

function hostInputs(model: ToyModel, tokens: Int32Array): { x: HostTensor<"bf16">; topkIdx: HostTensor<"i64">; topkWeights: HostTensor<"f32"> } {
  const { hidden, topk } = model.c;
  const x = HostTensor.zeros("bf16", [tokens.length, hidden]);
  const topkIdx = HostTensor.zeros("i64", [tokens.length, topk]);
  const topkWeights = HostTensor.zeros("f32", [tokens.length, topk]);
  tokens.forEach((token, t) => {
    x.data.set(model.embedding.subarray(token * hidden, (token + 1) * hidden), t * hidden);
    const { experts, weights } = model.route(token);
    experts.forEach((e, k) => {
      topkIdx.data[t * topk + k] = BigInt(e);
      topkWeights.data[t * topk + k] = weights[k]!;
    });
  });
  return { x, topkIdx, topkWeights };
}

/** Write the micro-batch's inputs for its current tokens (ordered on the rank's stream). */
function upload(model: ToyModel, r: Rank, mb: MicroBatch): void {
  const h = hostInputs(model, mb.tokens);
  if (r.stream === null) {
    (mb.x as HostTensor<"bf16">).data.set(h.x.data);
    (mb.topkIdx as HostTensor<"i64">).data.set(h.topkIdx.data);
    (mb.topkWeights as HostTensor<"f32">).data.set(h.topkWeights.data);
    return;
  }
  (mb.x as DeviceTensor<"bf16">).copyFrom(h.x, r.stream);
  (mb.topkIdx as DeviceTensor<"i64">).copyFrom(h.topkIdx, r.stream);
  (mb.topkWeights as DeviceTensor<"f32">).copyFrom(h.topkWeights, r.stream);
}

/** Identity experts plus `expertUs` of GPU work: the expert outputs go into the combine buffer. */
function runExperts(c: Config, r: Rank, d: LowLatencyDispatchResult): Tensor {
  const combineBuffer = r.buffer.getNextLowLatencyCombineBuffer(d.handle);
  if (r.stream === null) {
    (combineBuffer as HostTensor<"bf16">).data.set((d.recvX as HostTensor<"bf16">).data);
    return combineBuffer;
  }
  if (c.expertUs > 0) native().bun_ep_debug_spin(BigInt(c.expertUs * 1000), r.stream.handle);
  (combineBuffer as DeviceTensor<"bf16">).copyFrom(d.recvX as DeviceTensor<"bf16">, r.stream);
  return combineBuffer;
}

/** Enqueue one decode step of both micro-batches (captured into a graph on CUDA). */
async function enqueueStep(c: Config, r: Rank, hooked: boolean): Promise<void> {
  const stream = r.stream;
  const dispatch = (mb: MicroBatch) =>
    r.buffer.lowLatencyDispatch({
      x: mb.x, topkIdx: mb.topkIdx, maxTokensPerRank: c.tokens, numExperts: c.experts, hook: hooked, stream,
    });
  const combine = (mb: MicroBatch, d: LowLatencyDispatchResult, x: Tensor) =>
    r.buffer.lowLatencyCombine({
      x, topkIdx: mb.topkIdx, topkWeights: mb.topkWeights, handle: d.handle, zeroCopy: true, out: mb.out, hook: hooked, stream,
    });
  const [mb0, mb1] = r.mbs;
  if (!hooked) {
    for (const mb of r.mbs) {
      const d = await dispatch(mb);
      await combine(mb, d, runExperts(c, r, d));
    }
    return;
  }
  const d0 = await dispatch(mb0);
  const d1 = await dispatch(mb1); // in flight while micro-batch 0 computes
  d0.hook();
  const c0 = await combine(mb0, d0, runExperts(c, r, d0));
  d1.hook();
  const c1 = await combine(mb1, d1, runExperts(c, r, d1));
  c0.hook();
  c1.hook();
}

/** One step of every rank of this process; returns the GPU time of each rank (ms) when timed. */
async function step(c: Config, model: ToyModel, ranks: Rank[], hooked: boolean, timed: boolean): Promise<number[]> {
  // Every rank's inputs first: a rank's launch must not wait behind another rank's upload.
  for (const r of ranks) for (const mb of r.mbs) upload(model, r, mb);
  const events = ranks.map((r) => (timed && r.stream !== null ? Event.create({ timing: true, device: r.stream.device }).record(r.stream) : null));
  await Promise.all(
    ranks.map(async (r) => {
      if (r.graphs !== null && r.stream !== null) (hooked ? r.graphs.hooked : r.graphs.plain).launch(r.stream);
      else await enqueueStep(c, r, hooked);
    }),
  );
  const times = ranks.map((r, i) => {
    const start = events[i];
    if (start == null || r.stream === null) return 0;
    const end = Event.create({ timing: true, device: r.stream.device }).record(r.stream);
    end.synchronize();
    const ms = start.elapsedMs(end);
    start.close();
    end.close();
    return ms;
  });
  for (const r of ranks) r.stream?.synchronize();
  // Read the results, check them exactly, advance every sequence.
  for (const r of ranks) {
    for (const mb of r.mbs) {
      const out = r.buffer.toHost(mb.out).data as Uint16Array;
      mb.tokens.forEach((token, t) => {
        for (let i = 0; i < c.hidden; i++) {
          const want = model.expected(token, i);
          if (out[t * c.hidden + i] !== want) {
            throw new Error(
              `rank ${r.rank}: combined row of token ${token} (sequence ${t}) channel ${i} is 0x${out[t * c.hidden + i]!.toString(16)}, expected 0x${want.toString(16)}`,
            );
          }
        }
        mb.tokens[t] = model.next(out.subarray(t * c.hidden, (t + 1) * c.hidden));
      });
    }
  }
  return times;
}

// ---- set-up ------------------------------------------------------------------------------------------

/** GPUs the ranks spread over: BUN_EP_NUM_GPUS, default 1. */
function gpuCount(): number {
  return Math.max(1, Math.floor(Number(process.env.BUN_EP_NUM_GPUS ?? 1)) || 1);
}

async function makeRank(c: Config, group: Group): Promise<Rank> {
  // One process driving every rank: rank r on GPU r % BUN_EP_NUM_GPUS (default 1 GPU). Launched
  // ranks take BUN_EP_DEVICE from the launcher (EpBuffer's default).
  const numGpus = gpuCount();
  const device = !c.launcher && numGpus > 1 ? group.rank % numGpus : undefined;
  const buffer = await EpBuffer.create({
    group, backend: c.backend, numNvlBytes: 0, ...(device !== undefined ? { device } : {}),
    lowLatency: { maxTokensPerRank: c.tokens, hidden: c.hidden, numExperts: c.experts },
  });
  const stream = buffer.backendKind === "cuda" ? buffer.stream : null;
  const rng = makeRng(c.seed * 31 + group.rank);
  const mb = (): MicroBatch => ({
    x: buffer.fromHost(HostTensor.zeros("bf16", [c.tokens, c.hidden])),
    topkIdx: buffer.fromHost(HostTensor.zeros("i64", [c.tokens, c.topk])),
    topkWeights: buffer.fromHost(HostTensor.zeros("f32", [c.tokens, c.topk])),
    out: buffer.fromHost(HostTensor.zeros("bf16", [c.tokens, c.hidden])),
    tokens: Int32Array.from({ length: c.tokens }, () => rng.int(c.vocab)),
  });
  return { rank: group.rank, group, buffer, stream, mbs: [mb(), mb()], graphs: null };
}

/** Capture both step variants on every CUDA rank (no GPU work runs while capturing). */
async function capture(c: Config, ranks: Rank[]): Promise<void> {
  for (const r of ranks) {
    if (r.stream === null) continue;
    const graphOf = async (hooked: boolean): Promise<Graph> => {
      r.stream!.beginCapture();
      try {
        await enqueueStep(c, r, hooked);
      } catch (err) {
        r.stream!.endCapture().close();
        throw err;
      }
      return r.stream!.endCapture();
    };
    r.graphs = { plain: await graphOf(false), hooked: await graphOf(true) };
  }
}

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? 0;

/** rank 0 decides, every rank learns it (LocalGroup members all take part from this process). */
async function agree(ranks: Rank[], value: Uint8Array): Promise<Uint8Array> {
  const all = await Promise.all(ranks.map((r) => r.group.broadcast(r.rank === 0 ? value : new Uint8Array(0), 0)));
  return all[0]!;
}

async function benchmark(c: Config, model: ToyModel, ranks: Rank[]): Promise<void> {
  const lead = ranks.find((r) => r.rank === 0);
  const say = (line: string) => lead !== undefined && console.log(line);
  // First steps run directly (warm-up, and the check of the un-captured path).
  for (const hooked of [false, true]) await step(c, model, ranks, hooked, false);
  if (ranks.some((r) => r.stream !== null)) {
    await capture(c, ranks);
    say(`captured: one graph per rank and variant (${c.ranks} ranks, 2 micro-batches x ${c.tokens} tokens, hidden ${c.hidden}, top-${c.topk} of ${c.experts} experts, experts ${c.expertUs} us)`);
  } else {
    say("host backend: no CUDA graphs; the steps run directly");
  }
  const samples: Record<"plain" | "hooked", number[]> = { plain: [], hooked: [] };
  for (let i = 0; i < c.steps; i++) {
    for (const hooked of [false, true]) {
      const times = await step(c, model, ranks, hooked, true);
      if (i >= 3) samples[hooked ? "hooked" : "plain"].push(Math.max(...times));
    }
  }
  const seq = ranks[0]!.mbs[0].tokens;
  if (ranks.some((r) => r.stream !== null)) {
    const plain = median(samples.plain) * 1000;
    const hooked = median(samples.hooked) * 1000;
    // On one GPU the hooks cannot hide anything (the transfers use the same SMs and HBM as the
    // compute), so "slower" is an expected outcome there; across GPUs they hide the wire time.
    const change = hooked <= plain ? `${((1 - hooked / plain) * 100).toFixed(1)}% faster` : `${((hooked / plain - 1) * 100).toFixed(1)}% slower`;
    say(`step latency (median of ${samples.plain.length} graph replays, both micro-batches): without hooks ${plain.toFixed(1)} us, with hooks ${hooked.toFixed(1)} us (hooks ${change})`);
  }
  say(`all ${c.steps * 2 + 2} steps exact on every rank of this process; sequence 0 of rank ${ranks[0]!.rank} now at token ${seq[0]}`);
}

// ---- serving -----------------------------------------------------------------------------------------

interface Request {
  prompt: number[];
  wanted: number;
  generated: number[];
  slot: { mb: number; t: number } | null;
  done: (tokens: number[]) => void;
}

async function serve(c: Config, model: ToyModel, ranks: Rank[]): Promise<void> {
  if (ranks.some((r) => r.stream !== null)) await capture(c, ranks);
  const lead = ranks.find((r) => r.rank === 0);
  const queue: Request[] = [];
  const active: Request[] = [];
  let server: ReturnType<typeof Bun.serve> | null = null;
  let stopping = false;
  if (lead !== undefined) {
    server = Bun.serve({
      port: c.port,
      fetch(req) {
        const url = new URL(req.url);
        if (url.pathname !== "/generate") return new Response("GET /generate?prompt=text&tokens=N\n", { status: 404 });
        const prompt = [...(url.searchParams.get("prompt") ?? "a")].map((ch) => ch.codePointAt(0)! % c.vocab);
        const wanted = Math.min(256, Math.max(1, Number(url.searchParams.get("tokens") ?? 16) || 16));
        return new Promise<Response>((resolve) => {
          queue.push({
            prompt, wanted, generated: [], slot: null,
            done: (tokens) => resolve(Response.json({ prompt: url.searchParams.get("prompt"), tokens, text: tokens.map((t) => String.fromCodePoint(33 + (t % 94))).join("") })),
          });
        });
      },
    });
    console.log(`serving on http://localhost:${server.port}/generate?prompt=hello&tokens=16`);
  }

  const selfTest = lead !== undefined && c.requests > 0 ? runSelfTest(c, server!.port ?? c.port).then(() => (stopping = true)) : null;
  let steps = 0;
  const started = performance.now();
  for (;;) {
    // Rank 0 places waiting requests into free sequence slots (feeding the prompt's last token),
    // then every rank learns whether to go on.
    if (lead !== undefined) {
      for (const req of queue.splice(0)) {
        const used = new Set(active.map((a) => `${a.slot!.mb}/${a.slot!.t}`));
        const free = [0, 1].flatMap((m) => Array.from({ length: c.tokens }, (_, t) => ({ mb: m, t }))).find((s) => !used.has(`${s.mb}/${s.t}`));
        if (free === undefined) {
          queue.push(req);
          break;
        }
        req.slot = free;
        lead.mbs[free.mb]!.tokens[free.t] = req.prompt[req.prompt.length - 1]!;
        active.push(req);
      }
    }
    const go = await agree(ranks, Uint8Array.of(stopping && active.length === 0 ? 0 : 1));
    if (go[0] === 0) break;
    if (lead !== undefined && active.length === 0 && queue.length === 0) {
      await Bun.sleep(1); // idle: let requests arrive (the other ranks wait in agree)
      continue;
    }
    await step(c, model, ranks, true, false);
    steps++;
    if (lead === undefined) continue;
    for (const req of [...active]) {
      req.generated.push(lead.mbs[req.slot!.mb]!.tokens[req.slot!.t]!);
      if (req.generated.length >= req.wanted) {
        active.splice(active.indexOf(req), 1);
        req.done(req.generated);
      }
    }
    await Bun.sleep(0); // let the server answer
  }
  await selfTest;
  server?.stop(true);
  if (lead !== undefined) console.log(`served: ${steps} decode steps in ${((performance.now() - started) / 1000).toFixed(2)} s`);
}

async function runSelfTest(c: Config, port: number): Promise<void> {
  const prompts = Array.from({ length: c.requests }, (_, i) => `request-${i}`);
  const answers = await Promise.all(
    prompts.map(async (prompt) => {
      const res = await fetch(`http://localhost:${port}/generate?prompt=${encodeURIComponent(prompt)}&tokens=12`);
      if (!res.ok) throw new Error(`self-test: ${prompt} answered ${res.status}`);
      return (await res.json()) as { prompt: string; tokens: number[]; text: string };
    }),
  );
  for (const a of answers) {
    if (a.tokens.length !== 12) throw new Error(`self-test: ${a.prompt} got ${a.tokens.length} tokens, expected 12`);
    console.log(`  ${a.prompt} -> ${a.text}`);
  }
  console.log(`self-test: ${answers.length} requests answered`);
}

// ---- main ----------------------------------------------------------------------------------------------

async function main(): Promise<void> {
  const c = parseArgs(process.argv.slice(2));
  if (c.launcher && process.env.RANK === undefined) {
    // Re-run this script as one process per rank; they meet through TcpGroup (initGroupFromEnv).
    const args = process.argv.slice(2).filter((a) => a !== "--launcher");
    const cli = new URL("../bin/bun-ep.ts", import.meta.url).pathname;
    const child = Bun.spawn([process.execPath, cli, "run", "--nproc", String(c.ranks), "--ranks-per-gpu", String(Math.ceil(c.ranks / gpuCount())), import.meta.path, "--launcher", ...args], {
      stdout: "inherit", stderr: "inherit",
    });
    process.exit(await child.exited);
  }
  const groups: Group[] = c.launcher ? [await initGroupFromEnv()] : LocalGroup.create(c.ranks);
  const model = new ToyModel(c);
  const ranks = await Promise.all(groups.map((g) => makeRank(c, g)));
  const lead = ranks.find((r) => r.rank === 0);
  if (lead !== undefined) console.log(`backend: ${lead.buffer.backendKind} (${lead.buffer.backendReason})`);
  try {
    if (c.serve) await serve(c, model, ranks);
    else await benchmark(c, model, ranks);
  } finally {
    for (const r of ranks) {
      r.graphs?.plain.close();
      r.graphs?.hooked.close();
      r.stream?.synchronize(); // the last step's work on the micro-batch tensors is done
      for (const mb of r.mbs) for (const t of [mb.x, mb.topkIdx, mb.topkWeights, mb.out]) t.free();
    }
    await Promise.all(ranks.map((r) => r.buffer.close()));
    for (const g of groups) g.close();
  }
}

await main();
