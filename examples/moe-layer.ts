// A small Mixture-of-Experts layer across N ranks with bun-ep, checked against the same layer
// computed densely on one rank.
//
//   bun run demo                                     (= bun bin/bun-ep.ts run --nproc 2 examples/moe-layer.ts)
//   bun bin/bun-ep.ts run --nproc 4 examples/moe-layer.ts --tokens 256 --hidden 512
//   bun examples/moe-layer.ts --local --ranks 3      (all ranks in this process, LocalGroup)
//
// Each step: router (linear map to E logits, softmax, top-k, weights renormalized), getDispatchLayout,
// dispatch (tokens with their top-k weights), expert compute on the received tokens (one linear map
// y = W_e x + b_e per expert, bf16 weights, f32 accumulation), the top-k weights applied per row,
// combine (sum over ranks). It uses the CUDA backend when a GPU and build/libbun_ep.so are there,
// else the host backend, and says which. The expert compute runs on the CPU in this example (a
// real model runs its own GPU kernels there).
//
// Check: every rank's output equals, bit for bit, the dense layer computed on rank 0 for all tokens
// with the same rounding points (per-rank partial sums rounded to bf16, then summed in f32 in rank
// order, as combine does). It is also compared to an all-f32 dense layer within a stated tolerance.

import { EpBuffer, type BackendChoice } from "../lib/buffer.ts";
import { bf16ToF32, f32ToBf16 } from "../lib/convert.ts";
import { LocalGroup, initGroupFromEnv, type Group } from "../lib/group.ts";
import { makeRng, randomBf16, type Rng } from "../lib/reference.ts";
import { HostTensor } from "../lib/tensor.ts";

interface Config {
  tokens: number;
  hidden: number;
  experts: number;
  topk: number;
  steps: number;
  seed: number;
  local: boolean;
  ranks: number;
  backend: BackendChoice;
}

const USAGE = `usage: bun examples/moe-layer.ts [--local --ranks N] [--tokens T] [--hidden H] [--experts E] [--topk K] [--steps S] [--seed N] [--backend auto|cuda|host]
  ranks come from the launcher (bun-ep run --nproc N), or --ranks with --local (default 2)
  defaults: --tokens 64 (per rank) --hidden 256 --experts 8 --topk 2 --steps 5 --seed 1 --backend auto`;

function parseArgs(argv: string[]): Config {
  const config: Config = { tokens: 64, hidden: 256, experts: 8, topk: 2, steps: 5, seed: 1, local: false, ranks: 2, backend: "auto" };
  const integers = new Set(["tokens", "hidden", "experts", "topk", "steps", "seed", "ranks"]);
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === "--help" || arg === "-h") {
      console.log(USAGE);
      process.exit(0);
    }
    if (arg === "--local") {
      config.local = true;
      continue;
    }
    const [flag, inline] = arg.split("=", 2) as [string, string | undefined];
    const name = flag.replace(/^--/, "");
    const value = inline ?? argv[++i];
    if (name === "backend" && (value === "auto" || value === "cuda" || value === "host")) {
      config.backend = value;
    } else if (integers.has(name) && value !== undefined && /^\d+$/.test(value)) {
      (config as unknown as Record<string, number>)[name] = Number(value);
    } else {
      console.error(`moe-layer: bad argument ${JSON.stringify(arg)}${value === undefined ? "" : ` ${JSON.stringify(value)}`}\n${USAGE}`);
      process.exit(2);
    }
  }
  if (config.topk < 1 || config.topk > config.experts) fail(`--topk must be in [1, --experts = ${config.experts}], got ${config.topk}`);
  if (config.tokens < 1 || config.hidden < 1 || config.steps < 1) fail("--tokens, --hidden and --steps must be >= 1");
  return config;
}

function fail(message: string): never {
  console.error(`moe-layer: ${message}`);
  process.exit(2);
}

// ---- the model (the same on every rank: derived from the seed) ----

interface Model {
  /** f32 [hidden, experts]: router weights. */
  router: Float32Array;
  /** Per expert, f32 [hidden, hidden] (bf16 values widened; row j = output channel j). */
  weights: Float32Array[];
  /** Per expert, f32 [hidden] (bf16 values widened). */
  biases: Float32Array[];
}

function bf16Values(rng: Rng, n: number, scale: number): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = bf16ToF32(f32ToBf16(rng.normal() * scale));
  return out;
}

function makeModel(c: Config): Model {
  const rng = makeRng(c.seed * 7919 + 17);
  const router = bf16Values(rng, c.hidden * c.experts, 1 / Math.sqrt(c.hidden));
  const weights = Array.from({ length: c.experts }, () => bf16Values(rng, c.hidden * c.hidden, 1 / Math.sqrt(c.hidden)));
  const biases = Array.from({ length: c.experts }, () => bf16Values(rng, c.hidden, 0.1));
  return { router, weights, biases };
}

function tokensOf(c: Config, rank: number): HostTensor<"bf16"> {
  return randomBf16(makeRng(c.seed * 1_000_003 + rank), [c.tokens, c.hidden]);
}

/** Router: logits = x . router, softmax, top-k (ties to the lower id), weights renormalized over the top-k. */
function route(c: Config, model: Model, x: HostTensor<"bf16">): { topkIdx: HostTensor<"i64">; topkWeights: HostTensor<"f32"> } {
  const { hidden, experts, topk } = c;
  const topkIdx = new HostTensor("i64", [c.tokens, topk]);
  const topkWeights = new HostTensor("f32", [c.tokens, topk]);
  const logits = new Float64Array(experts);
  for (let t = 0; t < c.tokens; t++) {
    logits.fill(0);
    for (let i = 0; i < hidden; i++) {
      const xi = bf16ToF32(x.data[t * hidden + i]!);
      for (let e = 0; e < experts; e++) logits[e]! += xi * model.router[i * experts + e]!;
    }
    const max = Math.max(...logits);
    const probs = Array.from(logits, (l) => Math.exp(l - max));
    const order = probs.map((p, e) => ({ p, e })).sort((a, b) => b.p - a.p || a.e - b.e).slice(0, topk);
    const total = order.reduce((s, o) => s + o.p, 0);
    order.forEach((o, k) => {
      topkIdx.data[t * topk + k] = BigInt(o.e);
      topkWeights.data[t * topk + k] = Math.fround(o.p / total);
    });
  }
  return { topkIdx, topkWeights };
}

/** One expert on one token: y = bf16(W_e x + b_e), f32 accumulation in channel order. */
function expertForward(model: Model, expert: number, xRow: Float32Array, out: Float32Array): void {
  const hidden = xRow.length;
  const w = model.weights[expert]!;
  const b = model.biases[expert]!;
  for (let j = 0; j < hidden; j++) {
    let acc = 0;
    const row = j * hidden;
    for (let i = 0; i < hidden; i++) acc = Math.fround(acc + Math.fround(w[row + i]! * xRow[i]!));
    out[j] = bf16ToF32(f32ToBf16(Math.fround(acc + b[j]!)));
  }
}

function widenRow(x: Uint16Array, row: number, hidden: number, out: Float32Array): Float32Array {
  for (let i = 0; i < hidden; i++) out[i] = bf16ToF32(x[row * hidden + i]!);
  return out;
}

/**
 * The experts of this rank on its received rows: out[n] = bf16(sum over k, in order, with a local
 * expert, of w[n,k] * expert(x[n])), f32 accumulation. Rows past numRecvTokens stay 0.
 */
function expertCompute(model: Model, rank: number, numLocalExperts: number, recvX: HostTensor, recvTopkIdx: HostTensor, recvTopkWeights: HostTensor, rows: number): HostTensor<"bf16"> {
  const [numRows = 0, hidden = 0] = recvX.shape;
  const topk = recvTopkIdx.shape[1]!;
  const out = new HostTensor("bf16", [numRows, hidden]);
  const xRow = new Float32Array(hidden);
  const y = new Float32Array(hidden);
  const acc = new Float32Array(hidden);
  const idx = recvTopkIdx.data as BigInt64Array;
  const weights = recvTopkWeights.data as Float32Array;
  for (let n = 0; n < rows; n++) {
    widenRow(recvX.data as Uint16Array, n, hidden, xRow);
    acc.fill(0);
    for (let k = 0; k < topk; k++) {
      const local = Number(idx[n * topk + k]!);
      if (local < 0) continue;
      expertForward(model, rank * numLocalExperts + local, xRow, y);
      const w = weights[n * topk + k]!;
      for (let j = 0; j < hidden; j++) acc[j] = Math.fround(acc[j]! + Math.fround(w * y[j]!));
    }
    for (let j = 0; j < hidden; j++) out.data[n * hidden + j] = f32ToBf16(acc[j]!);
  }
  return out;
}

/**
 * The dense layer for one token, with no communication. `exact`: the EP rounding points (partial
 * sum per owning rank rounded to bf16, partials summed in rank order, rounded). `ideal`: all in f32,
 * rounded once. `bound`: sum of |w * y| (for the tolerance of ideal).
 */
function denseToken(c: Config, model: Model, numRanks: number, x: HostTensor<"bf16">, t: number, topkIdx: HostTensor<"i64">, topkWeights: HostTensor<"f32">) {
  const { hidden, topk } = c;
  const numLocalExperts = c.experts / numRanks;
  const xRow = widenRow(x.data, t, hidden, new Float32Array(hidden));
  const y = new Float32Array(hidden);
  const partial = Array.from({ length: numRanks }, () => new Float32Array(hidden));
  const used = new Array<boolean>(numRanks).fill(false);
  const ideal = new Float64Array(hidden);
  const bound = new Float64Array(hidden);
  for (let k = 0; k < topk; k++) {
    const e = Number(topkIdx.data[t * topk + k]!);
    const q = Math.floor(e / numLocalExperts);
    const w = topkWeights.data[t * topk + k]!;
    expertForward(model, e, xRow, y);
    used[q] = true;
    for (let j = 0; j < hidden; j++) {
      const term = Math.fround(w * y[j]!);
      partial[q]![j] = Math.fround(partial[q]![j]! + term);
      ideal[j]! += term;
      bound[j]! += Math.abs(term);
    }
  }
  const exact = new Uint16Array(hidden);
  for (let j = 0; j < hidden; j++) {
    let acc = 0;
    for (let q = 0; q < numRanks; q++) if (used[q]) acc = Math.fround(acc + bf16ToF32(f32ToBf16(partial[q]![j]!)));
    exact[j] = f32ToBf16(acc);
  }
  return { exact, ideal, bound };
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

function i32Bytes(values: ArrayLike<number>): Uint8Array {
  return new Uint8Array(Int32Array.from(values).buffer);
}
function bytesI32(bytes: Uint8Array): Int32Array {
  return new Int32Array(bytes.slice().buffer);
}

function table(header: string[], rows: (string | number)[][]): string {
  const cells = [header, ...rows.map((r) => r.map(String))];
  const widths = header.map((_, i) => Math.max(...cells.map((r) => (r[i] ?? "").length)));
  return cells.map((r) => r.map((cell, i) => (i === 0 ? cell.padEnd(widths[i]!) : cell.padStart(widths[i]!))).join("  ")).join("\n");
}

/** One rank's whole run; resolves to whether the check passed (known on every rank). */
async function runRank(c: Config, group: Group): Promise<boolean> {
  const rank = group.rank;
  const numRanks = group.size;
  const log = (text: string) => {
    if (rank === 0) console.log(text);
  };
  if (c.experts % numRanks !== 0) fail(`--experts (${c.experts}) must be a multiple of the number of ranks (${numRanks})`);
  const numLocalExperts = c.experts / numRanks;

  await using buf = await EpBuffer.create({ group, backend: c.backend });
  log(`bun-ep MoE layer: ${numRanks} ranks, ${c.tokens} tokens/rank, hidden ${c.hidden}, ${c.experts} experts (top-${c.topk}), ${c.steps} steps, seed ${c.seed}`);
  log(`backend: ${buf.backendKind} (${buf.backendReason})`);

  const model = makeModel(c);
  const x = tokensOf(c, rank);
  const { topkIdx, topkWeights } = route(c, model, x);
  const xOnDevice = buf.fromHost(x);
  const topkIdxOnDevice = buf.fromHost(topkIdx);
  const topkWeightsOnDevice = buf.fromHost(topkWeights);

  const times = { dispatch: [] as number[], experts: [] as number[], combine: [] as number[], step: [] as number[] };
  let combined: HostTensor | null = null;
  let numTokensPerRank: Int32Array<ArrayBufferLike> = new Int32Array(numRanks);
  let numTokensPerExpert: Int32Array<ArrayBufferLike> = new Int32Array(c.experts);
  let numRecvTokens = 0;
  for (let step = 0; step < c.steps; step++) {
    await group.barrier(); // steps start together, so the times measure the layer, not skew
    const t0 = performance.now();
    const layout = buf.getDispatchLayout(topkIdxOnDevice, c.experts);
    const d = await buf.dispatch({ x: xOnDevice, topkIdx: topkIdxOnDevice, topkWeights: topkWeightsOnDevice, layout });
    const t1 = performance.now();
    const rows = d.numRecvTokens ?? d.recvX.shape[0]!;
    const expertOut = expertCompute(model, rank, numLocalExperts, buf.toHost(d.recvX), buf.toHost(d.recvTopkIdx!), buf.toHost(d.recvTopkWeights!), rows);
    const t2 = performance.now();
    const out = await buf.combine({ x: buf.fromHost(expertOut), handle: d.handle });
    combined = buf.toHost(out.combinedX);
    const t3 = performance.now();
    times.dispatch.push(t1 - t0);
    times.experts.push(t2 - t1);
    times.combine.push(t3 - t2);
    times.step.push(t3 - t0);
    numTokensPerRank = buf.toHost(layout.numTokensPerRank).data as Int32Array;
    numTokensPerExpert = buf.toHost(layout.numTokensPerExpert).data as Int32Array;
    numRecvTokens = rows;
  }

  // Tables: what each rank sent where, and (token, expert) pairs per expert.
  const perRank = (await group.allGather(i32Bytes(numTokensPerRank))).map(bytesI32);
  const perExpert = (await group.allGather(i32Bytes(numTokensPerExpert))).map(bytesI32);
  const received = (await group.allGather(i32Bytes([numRecvTokens]))).map((b) => bytesI32(b)[0]!);
  const stepMs = (await group.allGather(new Uint8Array(new Float64Array([median(times.step), median(times.dispatch), median(times.experts), median(times.combine)]).buffer))).map(
    (b) => new Float64Array(b.slice().buffer),
  );
  const rankNames = Array.from({ length: numRanks }, (_, r) => `rank ${r}`);
  log("\ntokens sent (a token counts once per destination rank):");
  log(table(["from \\ to", ...rankNames], [...perRank.map((row, s) => [`rank ${s}`, ...row]), ["received", ...received]]));
  log("\n(token, expert) pairs per expert:");
  const expertTotals = Array.from({ length: c.experts }, (_, e) => perRank.length && perExpert.reduce((sum, row) => sum + row[e]!, 0));
  log(
    table(
      ["from \\ expert", ...Array.from({ length: c.experts }, (_, e) => `e${e}@r${Math.floor(e / numLocalExperts)}`)],
      [...perExpert.map((row, s) => [`rank ${s}`, ...row]), ["total", ...expertTotals]],
    ),
  );
  log(`\ntime per step, median of ${c.steps} (ms):`);
  log(
    table(
      ["", "step", "dispatch", "experts (CPU)", "combine"],
      stepMs.map((m, r) => [`rank ${r}`, m[0]!.toFixed(2), m[1]!.toFixed(2), m[2]!.toFixed(2), m[3]!.toFixed(2)]),
    ),
  );

  // The check: rank 0 computes the dense layer for every rank's tokens and compares.
  const outputs = await group.allGather(new Uint8Array(combined!.data.buffer, combined!.data.byteOffset, combined!.data.byteLength));
  let verdict = new Uint8Array([1]);
  if (rank === 0) {
    let exactMismatches = 0;
    let toleranceFailures = 0;
    let maxDeviation = 0;
    let firstMismatch = "";
    for (let s = 0; s < numRanks; s++) {
      const got = new Uint16Array(outputs[s]!.slice().buffer);
      const xs = tokensOf(c, s);
      const routing = route(c, model, xs);
      for (let t = 0; t < c.tokens; t++) {
        const dense = denseToken(c, model, numRanks, xs, t, routing.topkIdx, routing.topkWeights);
        for (let j = 0; j < c.hidden; j++) {
          const g = got[t * c.hidden + j]!;
          if (g !== dense.exact[j]) {
            if (exactMismatches++ === 0) firstMismatch = `rank ${s} token ${t} channel ${j}: got ${bf16ToF32(g)}, dense ${bf16ToF32(dense.exact[j]!)}`;
          }
          // Tolerance against all-f32: each bf16 rounding (numRanks partials + the result) is within 2^-8 relative.
          const deviation = Math.abs(bf16ToF32(g) - dense.ideal[j]!);
          maxDeviation = Math.max(maxDeviation, deviation);
          if (deviation > 2 ** -8 * (2 * dense.bound[j]! + Math.abs(dense.ideal[j]!)) + 1e-30) toleranceFailures++;
        }
      }
    }
    const total = numRanks * c.tokens * c.hidden;
    log(`\ncheck: ${total} outputs vs. the dense layer on one rank: ${exactMismatches === 0 ? "all equal bit for bit" : `${exactMismatches} differ (first: ${firstMismatch})`}`);
    log(
      `       vs. all-f32 dense: max |diff| = ${maxDeviation.toExponential(2)}, ${toleranceFailures} outside 2^-8 * (2 * sum|w*y| + |y|)`,
    );
    verdict = new Uint8Array([exactMismatches === 0 && toleranceFailures === 0 ? 1 : 0]);
  }
  const passed = (await group.broadcast(verdict, 0))[0] === 1;
  log(passed ? "check passed" : "check FAILED");
  return passed;
}

async function main(): Promise<void> {
  const c = parseArgs(process.argv.slice(2));
  let passed: boolean;
  if (c.local) {
    const groups = LocalGroup.create(c.ranks);
    const results = await Promise.all(groups.map((g) => runRank(c, g)));
    for (const g of groups) g.close();
    passed = results.every(Boolean);
  } else {
    if (process.env.WORLD_SIZE === undefined) fail(`no ranks: run through the launcher (bun bin/bun-ep.ts run --nproc 2 examples/moe-layer.ts) or pass --local\n${USAGE}`);
    const group = await initGroupFromEnv();
    passed = await runRank(c, group);
    await group.barrier();
    try {
      group.close();
    } catch {
      // Rank 0's close may report peers that already left; the run is over either way.
    }
  }
  process.exit(passed ? 0 : 1);
}

await main();
