// The reference (lib/reference.ts) against brute-force definitions written here from
// docs/ARCHITECTURE.md "Semantics", by other loop orders (collect then sort, search instead of
// index), never by calling the reference's internals. Fresh random seeds each run; a failure prints
// the seed (rerun with BUN_EP_TEST_SEED=<seed>).

import { describe, expect, test } from "bun:test";
import { bf16ToF32, dequantizeFp8, f32ToBf16, quantizeFp8 } from "../lib/convert.ts";
import {
  compareExact,
  makeRng,
  randomBf16,
  randomRouting,
  randomTopkWeights,
  referenceCombine,
  referenceDispatch,
  referenceLayout,
  referenceLowLatencyCombine,
  referenceLowLatencyDispatch,
  type LowLatencyOptions,
  type RankCombineInput,
  type RankDispatchInput,
  type RankDispatchOutput,
  type Rng,
} from "../lib/reference.ts";
import { HostTensor } from "../lib/tensor.ts";

const baseSeed = Number(process.env.BUN_EP_TEST_SEED ?? Math.floor(Math.random() * 2 ** 31));

/** Run a case with its own seed (derived from the base seed and the case name); print it on failure. */
function seeded(name: string, body: (rng: Rng) => void): () => void {
  return () => {
    let seed = baseSeed;
    for (const c of name) seed = (Math.imul(seed, 31) + c.charCodeAt(0)) >>> 0;
    try {
      body(makeRng(seed));
    } catch (e) {
      console.error(`reference.test "${name}": failed with BUN_EP_TEST_SEED=${baseSeed} (case seed ${seed})`);
      throw e;
    }
  };
}

function expectSame(name: string, got: Parameters<typeof compareExact>[1], expected: Parameters<typeof compareExact>[2]): void {
  const message = compareExact(name, got, expected);
  if (message !== null) throw new Error(message);
}

const topkRow = (topkIdx: HostTensor<"i64">, t: number): number[] => {
  const topk = topkIdx.shape[1]!;
  return Array.from(topkIdx.data.subarray(t * topk, (t + 1) * topk), Number);
};

/** Routing whose experts all avoid `avoidRank` (distinct per row). */
function routingAvoiding(rng: Rng, numTokens: number, numExperts: number, numRanks: number, topk: number, avoidRank: number): HostTensor<"i64"> {
  const perRank = numExperts / numRanks;
  const allowed = Array.from({ length: numExperts }, (_, e) => e).filter((e) => Math.floor(e / perRank) !== avoidRank);
  const out = new HostTensor("i64", [numTokens, topk]);
  for (let t = 0; t < numTokens; t++) {
    const pool = [...allowed];
    for (let k = 0; k < topk; k++) out.data[t * topk + k] = BigInt(pool.splice(rng.int(pool.length), 1)[0]!);
  }
  return out;
}

interface Scenario {
  name: string;
  numRanks: number;
  numExperts: number;
  topk: number;
  hidden: number;
  tokensPerRank: number[];
  maskProbability?: number;
  skewToExpert?: number;
  /** Rank whose experts get no token. */
  avoidRank?: number;
}

const SCENARIOS: Scenario[] = [
  { name: "2 ranks, masked -1 experts", numRanks: 2, numExperts: 8, topk: 3, hidden: 256, tokensPerRank: [9, 7], maskProbability: 0.25 },
  { name: "4 ranks, topk 8, a rank that sends nothing", numRanks: 4, numExperts: 16, topk: 8, hidden: 128, tokensPerRank: [5, 0, 6, 3] },
  { name: "3 ranks, topk 1", numRanks: 3, numExperts: 6, topk: 1, hidden: 384, tokensPerRank: [8, 5, 7] },
  { name: "4 ranks, a rank that receives nothing", numRanks: 4, numExperts: 8, topk: 2, hidden: 128, tokensPerRank: [6, 4, 5, 3], avoidRank: 2 },
  { name: "2 ranks, all tokens to one expert", numRanks: 2, numExperts: 4, topk: 1, hidden: 128, tokensPerRank: [6, 5], skewToExpert: 3 },
  { name: "3 ranks, skewed topk 4", numRanks: 3, numExperts: 12, topk: 4, hidden: 256, tokensPerRank: [4, 6, 5], skewToExpert: 0, maskProbability: 0.1 },
  { name: "0 tokens everywhere", numRanks: 2, numExperts: 4, topk: 2, hidden: 128, tokensPerRank: [0, 0] },
  { name: "hidden 7168, few tokens", numRanks: 2, numExperts: 8, topk: 4, hidden: 7168, tokensPerRank: [2, 3] },
  { name: "every token fully masked on one rank", numRanks: 2, numExperts: 4, topk: 2, hidden: 128, tokensPerRank: [4, 3], maskProbability: 1 },
];

function makeRouting(rng: Rng, s: Scenario, numTokens: number): HostTensor<"i64"> {
  if (s.avoidRank !== undefined) return routingAvoiding(rng, numTokens, s.numExperts, s.numRanks, s.topk, s.avoidRank);
  return randomRouting(rng, numTokens, s.numExperts, s.topk, { maskProbability: s.maskProbability, skewToExpert: s.skewToExpert });
}

function makeDispatchInputs(rng: Rng, s: Scenario, opts: { fp8: boolean; weights: boolean }): RankDispatchInput[] {
  return s.tokensPerRank.map((numTokens, rank) => {
    let x: HostTensor;
    let xScales: HostTensor<"f32"> | null = null;
    if (opts.fp8) {
      x = new HostTensor("fp8_e4m3", [numTokens, s.hidden]);
      for (let i = 0; i < x.numel; i++) x.data[i] = rng.int(256); // bytes are copied, any pattern goes
      xScales = new HostTensor("f32", [numTokens, s.hidden / 128]);
      for (let i = 0; i < xScales.numel; i++) xScales.data[i] = rng.normal();
    } else {
      x = randomBf16(rng, [numTokens, s.hidden], 1);
    }
    // "every token fully masked on one rank": rank 1 keeps routing, rank 0 masks all.
    const topkIdx = s.maskProbability === 1 && rank === 1 ? randomRouting(rng, numTokens, s.numExperts, s.topk) : makeRouting(rng, s, numTokens);
    return { x, xScales, topkIdx, topkWeights: opts.weights ? randomTopkWeights(rng, numTokens, s.topk) : null };
  });
}

// ---------------------------------------------------------------------------------------------
// Brute-force expectations

function expectedLayout(topkIdx: HostTensor<"i64">, numExperts: number, numRanks: number) {
  const perRank = numExperts / numRanks;
  const numTokens = topkIdx.shape[0]!;
  const numTokensPerExpert = new HostTensor("i32", [numExperts]);
  for (const e of topkIdx.data) if (e >= 0n) numTokensPerExpert.data[Number(e)]! += 1;
  const isTokenInRank = new HostTensor("u8", [numTokens, numRanks]);
  const numTokensPerRank = new HostTensor("i32", [numRanks]);
  for (let r = 0; r < numRanks; r++) {
    for (let t = 0; t < numTokens; t++) {
      const hit = topkRow(topkIdx, t).some((e) => e >= r * perRank && e < (r + 1) * perRank);
      isTokenInRank.data[t * numRanks + r] = hit ? 1 : 0;
      if (hit) numTokensPerRank.data[r]! += 1;
    }
  }
  return { numTokensPerRank, numTokensPerExpert, isTokenInRank };
}

function expectedDispatch(rank: number, inputs: RankDispatchInput[], numExperts: number, alignment: number): RankDispatchOutput {
  const numRanks = inputs.length;
  const perRank = numExperts / numRanks;
  const first = rank * perRank;
  const onRank = (e: number) => e >= first && e < first + perRank;
  // Collect (s, t) in reverse and sort: a different route to "by source rank, then token".
  const pairs: Array<[number, number]> = [];
  for (let s = numRanks - 1; s >= 0; s--) {
    for (let t = inputs[s]!.topkIdx.shape[0]! - 1; t >= 0; t--) if (topkRow(inputs[s]!.topkIdx, t).some(onRank)) pairs.push([s, t]);
  }
  pairs.sort((a, b) => a[0] - b[0] || a[1] - b[1]);

  const hidden = inputs[0]!.x.shape[1]!;
  const topk = inputs[0]!.topkIdx.shape[1]!;
  const scaleCols = inputs[0]!.xScales?.shape[1] ?? 0;
  const recvX = new HostTensor(inputs[0]!.x.dtype, [pairs.length, hidden]);
  const recvXScales = inputs[0]!.xScales ? new HostTensor("f32", [pairs.length, scaleCols]) : null;
  const recvTopkIdx = new HostTensor("i64", [pairs.length, topk]);
  const recvTopkWeights = inputs[0]!.topkWeights ? new HostTensor("f32", [pairs.length, topk]) : null;
  pairs.forEach(([s, t], n) => {
    const input = inputs[s]!;
    for (let i = 0; i < hidden; i++) (recvX.data as Uint16Array | Uint8Array)[n * hidden + i] = (input.x.data as Uint16Array | Uint8Array)[t * hidden + i]!;
    for (let i = 0; i < scaleCols; i++) recvXScales!.data[n * scaleCols + i] = input.xScales!.data[t * scaleCols + i]!;
    topkRow(input.topkIdx, t).forEach((e, k) => {
      recvTopkIdx.data[n * topk + k] = onRank(e) ? BigInt(e - first) : -1n;
      if (recvTopkWeights) recvTopkWeights.data[n * topk + k] = onRank(e) ? input.topkWeights!.data[t * topk + k]! : 0;
    });
  });
  const numRecvTokensPerExpert: number[] = [];
  for (let local = 0; local < perRank; local++) {
    let count = 0;
    for (const [s, t] of pairs) if (topkRow(inputs[s]!.topkIdx, t).includes(first + local)) count++;
    while (count % alignment !== 0) count++;
    numRecvTokensPerExpert.push(count);
  }
  return {
    recvX,
    recvXScales,
    recvTopkIdx,
    recvTopkWeights,
    numRecvTokensPerExpert,
    recvSrcRank: Int32Array.from(pairs, ([s]) => s),
    recvSrcToken: Int32Array.from(pairs, ([, t]) => t),
  };
}

function checkDispatch(got: RankDispatchOutput, expected: RankDispatchOutput, rank: number): void {
  expectSame(`rank ${rank} recvX`, got.recvX, expected.recvX);
  if (expected.recvXScales) expectSame(`rank ${rank} recvXScales`, got.recvXScales!, expected.recvXScales);
  else expect(got.recvXScales).toBeNull();
  expectSame(`rank ${rank} recvTopkIdx`, got.recvTopkIdx, expected.recvTopkIdx);
  if (expected.recvTopkWeights) expectSame(`rank ${rank} recvTopkWeights`, got.recvTopkWeights!, expected.recvTopkWeights);
  else expect(got.recvTopkWeights).toBeNull();
  expect(got.numRecvTokensPerExpert).toEqual(expected.numRecvTokensPerExpert);
  expectSame(`rank ${rank} recvSrcRank`, got.recvSrcRank, expected.recvSrcRank);
  expectSame(`rank ${rank} recvSrcToken`, got.recvSrcToken, expected.recvSrcToken);
}

/**
 * Normal combine by definition: for home token t of rank s, ranks r ascending, find the row of
 * (s, t) on r by linear search and add it; biases first. Weights the same without biases.
 */
function expectedCombine(home: number, numHomeTokens: number, inputs: RankCombineInput[], biases: HostTensor<"bf16">[]) {
  const hidden = inputs[0]!.x.shape[1]!;
  const topk = inputs[0]!.topkWeights?.shape[1] ?? 0;
  const combinedX = new HostTensor("bf16", [numHomeTokens, hidden]);
  const combinedTopkWeights = inputs[0]!.topkWeights ? new HostTensor("f32", [numHomeTokens, topk]) : null;
  for (let t = 0; t < numHomeTokens; t++) {
    const rows = inputs.map((input) => input.recvSrcRank.findIndex((s, n) => s === home && input.recvSrcToken[n] === t));
    const sum = new Float32Array(hidden);
    for (const bias of biases) for (let i = 0; i < hidden; i++) sum[i] = sum[i]! + bf16ToF32(bias.data[t * hidden + i]!);
    rows.forEach((row, r) => {
      if (row < 0) return;
      for (let i = 0; i < hidden; i++) sum[i] = sum[i]! + bf16ToF32(inputs[r]!.x.data[row * hidden + i]!); // Float32Array store rounds
    });
    for (let i = 0; i < hidden; i++) combinedX.data[t * hidden + i] = f32ToBf16(sum[i]!);
    if (combinedTopkWeights) {
      for (let k = 0; k < topk; k++) {
        const w = new Float32Array(1);
        rows.forEach((row, r) => {
          if (row >= 0) w[0] = w[0]! + inputs[r]!.topkWeights!.data[row * topk + k]!;
        });
        combinedTopkWeights.data[t * topk + k] = w[0]!;
      }
    }
  }
  return { combinedX, combinedTopkWeights };
}

// ---------------------------------------------------------------------------------------------

describe("layout", () => {
  for (const s of SCENARIOS) {
    test(s.name, seeded(`layout ${s.name}`, (rng) => {
      for (const numTokens of s.tokensPerRank) {
        const topkIdx = makeRouting(rng, s, numTokens);
        const got = referenceLayout(topkIdx, s.numExperts, s.numRanks);
        const expected = expectedLayout(topkIdx, s.numExperts, s.numRanks);
        expectSame("numTokensPerRank", got.numTokensPerRank, expected.numTokensPerRank);
        expectSame("numTokensPerExpert", got.numTokensPerExpert, expected.numTokensPerExpert);
        expectSame("isTokenInRank", got.isTokenInRank, expected.isTokenInRank);
      }
    }));
  }

  test("expert ids outside [-1, E) and E not a multiple of R are rejected", () => {
    const bad = new HostTensor("i64", [1, 2], BigInt64Array.of(0n, 8n));
    expect(() => referenceLayout(bad, 8, 2)).toThrow(/topkIdx\[0, 1\] = 8 is outside \[-1, 8\)/);
    expect(() => referenceLayout(new HostTensor("i64", [1, 1], BigInt64Array.of(-2n)), 8, 2)).toThrow(/outside/);
    expect(() => referenceLayout(new HostTensor("i64", [0, 1]), 6, 4)).toThrow(/numExperts \(6\)/);
  });
});

describe("normal dispatch", () => {
  for (const s of SCENARIOS) {
    for (const fp8 of [false, true]) {
      const alignment = fp8 ? 4 : 1;
      test(`${s.name}${fp8 ? ", fp8 + scales, expertAlignment 4" : ", bf16"}`, seeded(`dispatch ${s.name} ${fp8}`, (rng) => {
        const inputs = makeDispatchInputs(rng, s, { fp8, weights: !fp8 || rng.next() < 0.5 });
        const outputs = referenceDispatch(inputs, s.numExperts, alignment);
        outputs.forEach((got, rank) => checkDispatch(got, expectedDispatch(rank, inputs, s.numExperts, alignment), rank));
        if (s.avoidRank !== undefined) expect(outputs[s.avoidRank]!.recvX.shape[0]).toBe(0);
      }));
    }
  }

  test("expertAlignment 128 rounds each count up; 0 stays 0", seeded("alignment 128", (rng) => {
    const s: Scenario = { name: "", numRanks: 2, numExperts: 8, topk: 2, hidden: 128, tokensPerRank: [10, 3], skewToExpert: 1 };
    const inputs = makeDispatchInputs(rng, s, { fp8: false, weights: true });
    const outputs = referenceDispatch(inputs, s.numExperts, 128);
    for (const [rank, out] of outputs.entries()) {
      checkDispatch(out, expectedDispatch(rank, inputs, s.numExperts, 128), rank);
      for (const n of out.numRecvTokensPerExpert) expect(n % 128).toBe(0);
    }
    expect(outputs[0]!.numRecvTokensPerExpert[1]).toBe(128); // every token holds expert 1
  }));
});

describe("normal combine", () => {
  for (const s of SCENARIOS) {
    for (const numBiases of [0, 1, 2]) {
      test(`${s.name}, ${numBiases} bias(es)`, seeded(`combine ${s.name} ${numBiases}`, (rng) => {
        const inputs = makeDispatchInputs(rng, s, { fp8: false, weights: true });
        const dispatched = referenceDispatch(inputs, s.numExperts);
        // Arbitrary expert outputs (not the dispatched x) so that every row differs.
        const combineInputs: RankCombineInput[] = dispatched.map((d) => ({
          x: randomBf16(rng, [d.recvSrcRank.length + rng.int(3), s.hidden], 2), // extra rows (numWorstTokens) are ignored
          topkWeights: d.recvTopkWeights!.numel === 0 ? new HostTensor("f32", [0, s.topk]) : randomTopkWeights(rng, d.recvSrcRank.length, s.topk),
          recvSrcRank: d.recvSrcRank,
          recvSrcToken: d.recvSrcToken,
        }));
        for (const c of combineInputs) if (c.topkWeights!.shape[0]! < c.x.shape[0]!) c.topkWeights = padRows(c.topkWeights!, c.x.shape[0]!);
        const biases = s.tokensPerRank.map((numTokens) => Array.from({ length: numBiases }, () => randomBf16(rng, [numTokens, s.hidden], 0.5)));
        const got = referenceCombine(combineInputs, s.tokensPerRank, biases);
        got.forEach((out, home) => {
          const expected = expectedCombine(home, s.tokensPerRank[home]!, combineInputs, biases[home]!);
          expectSame(`home ${home} combinedX`, out.combinedX, expected.combinedX);
          expectSame(`home ${home} combinedTopkWeights`, out.combinedTopkWeights!, expected.combinedTopkWeights!);
        });
      }));
    }
  }

  test("a token routed nowhere gets bf16(bias sum) or 0, weights 0; no weights gives null", () => {
    const x = new HostTensor("bf16", [0, 128]);
    const inputs: RankCombineInput[] = [0, 1].map(() => ({ x, topkWeights: null, recvSrcRank: new Int32Array(0), recvSrcToken: new Int32Array(0) }));
    const bias0 = HostTensor.full("bf16", [1, 128], f32ToBf16(1.5));
    const bias1 = HostTensor.full("bf16", [1, 128], f32ToBf16(-0.25));
    const [withBiases] = referenceCombine(inputs, [1, 0], [[bias0, bias1], []]);
    expect(withBiases!.combinedTopkWeights).toBeNull();
    expect(withBiases!.combinedX.data.every((b) => b === f32ToBf16(1.25))).toBe(true);
    const [without] = referenceCombine(inputs, [1, 0], [[], []]);
    expect(without!.combinedX.data.every((b) => b === 0)).toBe(true);
  });

  test("dispatch -> per-rank weighted expert -> combine equals the dense weighted sum (exact values)", seeded("round trip exact", (rng) => {
    // Values chosen so every sum is exact in bf16/f32: x in {-4..4}, weights in {0.5, 1, 2}.
    for (const s of SCENARIOS.filter((c) => c.hidden <= 384)) {
      const inputs = makeDispatchInputs(rng, s, { fp8: false, weights: true });
      for (const input of inputs) {
        for (let i = 0; i < input.x.numel; i++) (input.x.data as Uint16Array)[i] = f32ToBf16(rng.int(9) - 4);
        for (let i = 0; i < input.topkWeights!.numel; i++) input.topkWeights!.data[i] = [0.5, 1, 2][rng.int(3)]!;
      }
      const dispatched = referenceDispatch(inputs, s.numExperts);
      // Each rank's "expert": y = sum over its local k of w_k * x (what an MoE layer computes).
      const combineInputs: RankCombineInput[] = dispatched.map((d) => {
        const rows = d.recvSrcRank.length;
        const y = new HostTensor("bf16", [rows, s.hidden]);
        for (let n = 0; n < rows; n++) {
          for (let i = 0; i < s.hidden; i++) {
            let acc = 0;
            for (let k = 0; k < s.topk; k++) {
              if (d.recvTopkIdx.data[n * s.topk + k]! >= 0n) acc += d.recvTopkWeights!.data[n * s.topk + k]! * bf16ToF32((d.recvX.data as Uint16Array)[n * s.hidden + i]!);
            }
            y.data[n * s.hidden + i] = f32ToBf16(acc);
          }
        }
        return { x: y, topkWeights: d.recvTopkWeights, recvSrcRank: d.recvSrcRank, recvSrcToken: d.recvSrcToken };
      });
      const combined = referenceCombine(combineInputs, s.tokensPerRank, s.tokensPerRank.map(() => []));
      combined.forEach((out, home) => {
        const input = inputs[home]!;
        const numTokens = s.tokensPerRank[home]!;
        const dense = new HostTensor("bf16", [numTokens, s.hidden]);
        const denseWeights = new HostTensor("f32", [numTokens, s.topk]);
        for (let t = 0; t < numTokens; t++) {
          const row = topkRow(input.topkIdx, t);
          for (let i = 0; i < s.hidden; i++) {
            let acc = 0;
            row.forEach((e, k) => {
              if (e >= 0) acc += input.topkWeights!.data[t * s.topk + k]! * bf16ToF32((input.x.data as Uint16Array)[t * s.hidden + i]!);
            });
            dense.data[t * s.hidden + i] = f32ToBf16(acc);
          }
          row.forEach((e, k) => (denseWeights.data[t * s.topk + k] = e >= 0 ? input.topkWeights!.data[t * s.topk + k]! : 0));
        }
        expectSame(`${s.name}: home ${home} combinedX`, out.combinedX, dense);
        expectSame(`${s.name}: home ${home} combinedTopkWeights`, out.combinedTopkWeights!, denseWeights);
      });
    }
  }));
});

function padRows(t: HostTensor<"f32">, rows: number): HostTensor<"f32"> {
  const out = new HostTensor("f32", [rows, t.shape[1]!]);
  out.data.set(t.data);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Low-latency

interface LowLatencyCase {
  name: string;
  scenario: Scenario;
  maxTokensPerRank: number;
  opts: LowLatencyOptions;
}

const LL_MODES: Array<{ label: string; opts: LowLatencyOptions }> = [
  { label: "bf16", opts: { useFp8: false, roundScale: false, useUe8m0: false } },
  { label: "fp8", opts: { useFp8: true, roundScale: false, useUe8m0: false } },
  { label: "fp8 roundScale", opts: { useFp8: true, roundScale: true, useUe8m0: false } },
  { label: "fp8 ue8m0", opts: { useFp8: true, roundScale: true, useUe8m0: true } },
];

const LL_CASES: LowLatencyCase[] = [];
for (const mode of LL_MODES) {
  for (const s of SCENARIOS) {
    const scenario = mode.opts.useUe8m0 && s.hidden % 512 !== 0 ? { ...s, hidden: 512 } : s;
    LL_CASES.push({ name: `${mode.label}, ${s.name}`, scenario, maxTokensPerRank: Math.max(1, ...s.tokensPerRank) + 1, opts: mode.opts });
  }
  LL_CASES.push({
    name: `${mode.label}, rank 1 of 3 dead`,
    scenario: { name: "dead", numRanks: 3, numExperts: 6, topk: 3, hidden: 512, tokensPerRank: [5, 4, 6], maskProbability: 0.1 },
    maxTokensPerRank: 6,
    opts: { ...mode.opts, alive: [true, false, true] },
  });
}

/** Low-latency dispatch by definition: per receiving rank and local expert, sort the (s, t) pairs. */
function expectedLowLatencyDispatch(q: number, xs: HostTensor<"bf16">[], routings: HostTensor<"i64">[], c: LowLatencyCase) {
  const { numRanks, numExperts, hidden } = c.scenario;
  const perRank = numExperts / numRanks;
  const slots = numRanks * c.maxTokensPerRank;
  const alive = c.opts.alive ?? new Array(numRanks).fill(true);
  const quantized = xs.map((x) => (c.opts.useFp8 ? quantizeFp8(x, { roundScale: c.opts.roundScale, ue8m0: c.opts.useUe8m0 }) : null));
  const scaleCols = !c.opts.useFp8 ? 0 : c.opts.useUe8m0 ? hidden / 512 : hidden / 128;
  const recvX = new HostTensor(c.opts.useFp8 ? "fp8_e4m3" : "bf16", [perRank, slots, hidden]);
  const recvXScales = !c.opts.useFp8 ? null : new HostTensor(c.opts.useUe8m0 ? "i32" : "f32", [perRank, slots, scaleCols]);
  const recvCount = new HostTensor("i32", [perRank]);
  const srcTokenIdx = HostTensor.full("i32", [perRank, slots], -1);
  const layoutRange = new HostTensor("i32", [perRank, numRanks, 2]);
  for (let local = 0; local < perRank; local++) {
    const expert = q * perRank + local;
    const pairs: Array<[number, number]> = [];
    routings.forEach((routing, s) => {
      for (let t = 0; t < routing.shape[0]!; t++) if (alive[q] && alive[s] && topkRow(routing, t).includes(expert)) pairs.push([s, t]);
    });
    pairs.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
    recvCount.data[local] = pairs.length;
    pairs.forEach(([s, t], slot) => {
      const row = local * slots + slot;
      srcTokenIdx.data[row] = t;
      const payload = quantized[s]?.q ?? xs[s]!;
      for (let i = 0; i < hidden; i++) (recvX.data as Uint8Array | Uint16Array)[row * hidden + i] = (payload.data as Uint8Array | Uint16Array)[t * hidden + i]!;
      if (recvXScales) for (let j = 0; j < scaleCols; j++) (recvXScales.data as Int32Array | Float32Array)[row * scaleCols + j] = (quantized[s]!.scales.data as Int32Array | Float32Array)[t * scaleCols + j]!;
    });
    for (let s = 0; s < numRanks; s++) {
      layoutRange.data[(local * numRanks + s) * 2] = pairs.filter(([src]) => src < s).length;
      layoutRange.data[(local * numRanks + s) * 2 + 1] = pairs.filter(([src]) => src === s).length;
    }
  }
  return { recvX, recvXScales, recvCount, srcTokenIdx, layoutRange };
}

describe("low-latency dispatch and combine", () => {
  for (const c of LL_CASES) {
    test(c.name, seeded(`ll ${c.name}`, (rng) => {
      const s = c.scenario;
      const xs = s.tokensPerRank.map((n) => randomBf16(rng, [n, s.hidden], 2 ** (rng.int(10) - 5)));
      const routings = s.tokensPerRank.map((n, rank) => (s.maskProbability === 1 && rank === 1 ? randomRouting(rng, n, s.numExperts, s.topk) : makeRouting(rng, s, n)));
      const outputs = referenceLowLatencyDispatch(xs.map((x, r) => ({ x, topkIdx: routings[r]! })), c.maxTokensPerRank, s.numExperts, c.opts);
      outputs.forEach((got, q) => {
        const expected = expectedLowLatencyDispatch(q, xs, routings, c);
        expectSame(`rank ${q} recvX`, got.recvX, expected.recvX);
        if (expected.recvXScales) expectSame(`rank ${q} recvXScales`, got.recvXScales!, expected.recvXScales);
        else expect(got.recvXScales).toBeNull();
        expectSame(`rank ${q} recvCount`, got.recvCount, expected.recvCount);
        expectSame(`rank ${q} srcTokenIdx`, got.srcTokenIdx, expected.srcTokenIdx);
        expectSame(`rank ${q} layoutRange`, got.layoutRange, expected.layoutRange);
      });

      // Identity experts: combine of what arrived (dequantized to bf16 for fp8) equals, per home
      // token, sum over k of f32(w_k * f32(payload)) in k order, skipping -1 and dead ranks.
      const alive = c.opts.alive ?? new Array(s.numRanks).fill(true);
      const expertOutputs = outputs.map((out, q) => {
        const [experts, slots, hidden] = out.recvX.shape as [number, number, number];
        let y: HostTensor<"bf16">;
        if (!c.opts.useFp8) {
          y = (out.recvX as HostTensor<"bf16">).clone();
        } else {
          const deq = dequantizeFp8(out.recvX.reshape([experts * slots, hidden]) as HostTensor<"fp8_e4m3">, out.recvXScales!.reshape([experts * slots, out.recvXScales!.shape[2]!]) as HostTensor<"f32">, { ue8m0: c.opts.useUe8m0 });
          y = new HostTensor("bf16", [experts, slots, hidden], Uint16Array.from(deq.data, f32ToBf16));
        }
        // Poison what combine must never read: slots past recvCount, and all of a dead rank's.
        for (let e = 0; e < experts; e++) {
          const valid = alive[q] ? out.recvCount.data[e]! : 0;
          y.data.fill(f32ToBf16(12345), (e * slots + valid) * hidden, (e + 1) * slots * hidden);
        }
        return y;
      });
      const weights = s.tokensPerRank.map((n) => randomTopkWeights(rng, n, s.topk));
      const combined = referenceLowLatencyCombine(expertOutputs, outputs.map((o) => o.layoutRange), routings, weights, s.numExperts, c.opts.alive);
      combined.forEach((got, home) => {
        const numTokens = s.tokensPerRank[home]!;
        const payload = c.opts.useFp8 ? (() => {
          const { q, scales } = quantizeFp8(xs[home]!, { roundScale: c.opts.roundScale, ue8m0: c.opts.useUe8m0 });
          return dequantizeFp8(q, scales, { ue8m0: c.opts.useUe8m0 }).data.map((v) => bf16ToF32(f32ToBf16(v)));
        })() : Float32Array.from(xs[home]!.data, bf16ToF32);
        const expected = new HostTensor("bf16", [numTokens, s.hidden]);
        if (alive[home]) {
          for (let t = 0; t < numTokens; t++) {
            const row = topkRow(routings[home]!, t);
            for (let i = 0; i < s.hidden; i++) {
              const acc = new Float32Array(1);
              row.forEach((e, k) => {
                if (e < 0 || !alive[Math.floor(e / (s.numExperts / s.numRanks))]) return;
                acc[0] = acc[0]! + Math.fround(weights[home]!.data[t * s.topk + k]! * payload[t * s.hidden + i]!);
              });
              expected.data[t * s.hidden + i] = f32ToBf16(acc[0]!);
            }
          }
        }
        expectSame(`home ${home} low-latency combinedX`, got, expected);
      });
    }));
  }

  test("combine reads the slot of each (home, token) even when other ranks fill slots first", seeded("ll slots", (rng) => {
    // Distinct expert outputs per slot: y[e][slot] = slot index + 100 * local expert (exact in bf16), so
    // a wrong slot shows up as a wrong value.
    const numRanks = 3;
    const numExperts = 6;
    const hidden = 128;
    const maxTokensPerRank = 5;
    const routings = [4, 5, 3].map((n) => randomRouting(rng, n, numExperts, 2));
    const xs = routings.map((r) => randomBf16(rng, [r.shape[0]!, hidden]));
    const outputs = referenceLowLatencyDispatch(xs.map((x, r) => ({ x, topkIdx: routings[r]! })), maxTokensPerRank, numExperts, { useFp8: false, roundScale: false, useUe8m0: false });
    const expertOutputs = outputs.map((out) => {
      const y = new HostTensor("bf16", out.recvX.shape);
      const slots = numRanks * maxTokensPerRank;
      for (let row = 0; row < 2 * slots; row++) y.data.fill(f32ToBf16((row % slots) + 100 * Math.floor(row / slots)), row * hidden, (row + 1) * hidden);
      return y;
    });
    const ones = routings.map((r) => HostTensor.full("f32", r.shape, 1));
    const combined = referenceLowLatencyCombine(expertOutputs, outputs.map((o) => o.layoutRange), routings, ones, numExperts);
    combined.forEach((got, home) => {
      for (let t = 0; t < routings[home]!.shape[0]!; t++) {
        let expected = 0;
        for (const e of topkRow(routings[home]!, t)) {
          const q = Math.floor(e / 2);
          const local = e % 2;
          const slot = outputs[q]!.srcTokenIdx.data.subarray(local * 15, local * 15 + 15).findIndex((src, i) => src === t && i >= outputs[q]!.layoutRange.data[(local * 3 + home) * 2]! && i < outputs[q]!.layoutRange.data[(local * 3 + home) * 2]! + outputs[q]!.layoutRange.data[(local * 3 + home) * 2 + 1]!);
          expected += slot + 100 * local;
        }
        expect(bf16ToF32(got.data[t * hidden]!)).toBe(bf16ToF32(f32ToBf16(expected)));
      }
    });
  }));

  test("each product and each sum is rounded to f32 (no fused multiply-add, no wider accumulator)", () => {
    // One token of rank 0 routed to experts 0, 1, 2 (all on the single rank), slot 0 of each.
    // Terms: 1 * 2^-24, (1 + 2^-22) * (1 + 2^-7), -1 * (1 + 2^-7). With the product rounded to f32
    // first, the middle sum is a tie that rounds to even and the result is 2^-22; unrounded
    // products (an FMA) give 1.5 * 2^-22.
    const hidden = 128;
    const topkIdx = new HostTensor("i64", [1, 3], BigInt64Array.of(0n, 1n, 2n));
    const [dispatched] = referenceLowLatencyDispatch([{ x: new HostTensor("bf16", [1, hidden]), topkIdx }], 1, 3, { useFp8: false, roundScale: false, useUe8m0: false });
    const y = new HostTensor("bf16", [3, 1, hidden]);
    [2 ** -24, 1 + 2 ** -7, 1 + 2 ** -7].forEach((v, e) => y.data.fill(f32ToBf16(v), e * hidden, (e + 1) * hidden));
    const weights = new HostTensor("f32", [1, 3], Float32Array.of(1, 1 + 2 ** -22, -1));
    const [out] = referenceLowLatencyCombine([y], [dispatched!.layoutRange], [topkIdx], [weights], 3);
    expect(bf16ToF32(out!.data[0]!)).toBe(2 ** -22);

    // Normal combine: rank 0's token 0 on ranks 0, 1, 2 with rows 1, 1.5 * 2^-24, -1. In f32,
    // 1 + 1.5 * 2^-24 rounds to 1 + 2^-23, so the result is 2^-23; a wider accumulator keeps
    // 1.5 * 2^-24 (a bf16 value).
    const row = (v: number) => HostTensor.full("bf16", [1, hidden], f32ToBf16(v));
    const inputs: RankCombineInput[] = [1, 1.5 * 2 ** -24, -1].map((v) => ({ x: row(v), topkWeights: null, recvSrcRank: Int32Array.of(0), recvSrcToken: Int32Array.of(0) }));
    const [home0] = referenceCombine(inputs, [1, 0, 0], [[], [], []]);
    expect(bf16ToF32(home0!.combinedX.data[0]!)).toBe(2 ** -23);
  });

  test("tokens over maxTokensPerRank and hidden not a multiple of 512 with ue8m0 are rejected", () => {
    const x = new HostTensor("bf16", [3, 128]);
    const topkIdx = new HostTensor("i64", [3, 1]);
    expect(() => referenceLowLatencyDispatch([{ x, topkIdx }], 2, 2, { useFp8: false, roundScale: false, useUe8m0: false })).toThrow(/3 tokens exceed maxTokensPerRank 2/);
    expect(() => referenceLowLatencyDispatch([{ x, topkIdx }], 4, 2, { useFp8: true, roundScale: true, useUe8m0: true })).toThrow(/multiple of 512/);
  });
});

describe("test helpers", () => {
  test("makeRng is deterministic and in range", () => {
    const a = makeRng(42);
    const b = makeRng(42);
    for (let i = 0; i < 1000; i++) {
      const v = a.next();
      expect(v).toBe(b.next());
      expect(v >= 0 && v < 1).toBe(true);
      const n = a.int(7);
      b.int(7);
      expect(Number.isInteger(n) && n >= 0 && n < 7).toBe(true);
    }
    let sum = 0;
    let sumSquares = 0;
    for (let i = 0; i < 20000; i++) {
      const v = a.normal();
      sum += v;
      sumSquares += v * v;
    }
    expect(Math.abs(sum / 20000)).toBeLessThan(0.05);
    expect(Math.abs(sumSquares / 20000 - 1)).toBeLessThan(0.05);
  });

  test("randomRouting: distinct experts per row, skew, masking", seeded("routing", (rng) => {
    const r = randomRouting(rng, 50, 16, 8);
    for (let t = 0; t < 50; t++) {
      const row = topkRow(r, t);
      expect(new Set(row).size).toBe(8);
      for (const e of row) expect(e >= 0 && e < 16).toBe(true);
    }
    const skewed = randomRouting(rng, 20, 16, 3, { skewToExpert: 5 });
    for (let t = 0; t < 20; t++) expect(topkRow(skewed, t)[0]).toBe(5);
    expect(randomRouting(rng, 10, 8, 2, { maskProbability: 1 }).data.every((e) => e === -1n)).toBe(true);
  }));

  test("compareExact names the first mismatch and tells -0 from 0", () => {
    const a = new HostTensor("bf16", [2, 3], Uint16Array.of(1, 2, 3, 4, 5, 6));
    const b = new HostTensor("bf16", [2, 3], Uint16Array.of(1, 2, 3, 4, 9, 6));
    expect(compareExact("x", a, a.clone())).toBeNull();
    expect(compareExact("x", a, b)).toMatch(/^x: first mismatch at index 4 \[1, 1\]: got .*0x0005.*expected .*0x0009.*1 of 6/);
    expect(compareExact("x", a, a.reshape([3, 2]))).toMatch(/shape/);
    expect(compareExact("w", new HostTensor("f32", [1], Float32Array.of(-0)), new HostTensor("f32", [1], Float32Array.of(0)))).toMatch(/first mismatch/);
    expect(compareExact("w", new HostTensor("f32", [1], Float32Array.of(NaN)), new HostTensor("f32", [1], Float32Array.of(NaN)))).toBeNull();
    expect(compareExact("i", Int32Array.of(1, 2), Int32Array.of(1, 3))).toMatch(/index 1: got 2, expected 3/);
  });
});
