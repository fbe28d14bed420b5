// The executable spec of docs/ARCHITECTURE.md, "Semantics": every rank's inputs in, every rank's
// outputs out, in plain TypeScript over HostTensors. The host backend calls the per-rank functions
// (`...Rank`), so it equals this file bit for bit; the CUDA kernels are tested against it.
//
// Written to be read: one loop per rule of the spec, in the order the spec states it. Speed is not
// a goal. f32 arithmetic is rounded after every operation (Math.fround); bf16/e4m3 conversions are
// lib/convert.ts's, which match CUDA's.
//
// At the end: small seeded helpers the tests of every layer share (PRNG, random bf16 tensors,
// DeepEP-style random routing, exact comparison with a message naming the first mismatch).

import { DTYPE_BYTES } from "./dtype.ts";
import { HostTensor } from "./tensor.ts";
import {
  bf16ToF32,
  f32Bits,
  f32ToBf16,
  FP8_GROUP_SIZE,
  quantizeFp8Group,
  ue8m0Byte,
  UE8M0_GROUPS_PER_WORD,
} from "./convert.ts";

// ---------------------------------------------------------------------------------------------
// Small shared pieces

function fail(message: string): never {
  throw new RangeError(message);
}

function numLocalExpertsOf(numExperts: number, numRanks: number): number {
  if (!Number.isSafeInteger(numExperts) || numExperts <= 0 || numRanks <= 0 || numExperts % numRanks !== 0) {
    fail(`numExperts (${numExperts}) must be a positive multiple of the number of ranks (${numRanks})`);
  }
  return numExperts / numRanks;
}

/** Row t of topkIdx [T, K] as numbers, after checking every id is in [-1, numExperts). */
function expertsOfToken(topkIdx: HostTensor<"i64">, t: number, numExperts: number): number[] {
  const topk = topkIdx.shape[1] ?? 0;
  const experts: number[] = [];
  for (let k = 0; k < topk; k++) {
    const e = Number(topkIdx.data[t * topk + k]!);
    if (!Number.isInteger(e) || e < -1 || e >= numExperts) {
      fail(`topkIdx[${t}, ${k}] = ${e} is outside [-1, ${numExperts})`);
    }
    experts.push(e);
  }
  return experts;
}

function rankOfExpert(expert: number, numLocalExperts: number): number {
  return Math.floor(expert / numLocalExperts);
}

/** A byte view of a tensor's storage: dispatch copies rows as bytes whatever the dtype. */
function bytesOf(t: HostTensor): Uint8Array {
  return new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength);
}

/** Copy row `srcRow` of `src` into row `dstRow` of `dst` (same dtype and row width). */
function copyRow(dst: HostTensor, dstRow: number, src: HostTensor, srcRow: number): void {
  const rowBytes = (src.numel / Math.max(1, src.shape[0] ?? 1)) * DTYPE_BYTES[src.dtype];
  bytesOf(dst).set(bytesOf(src).subarray(srcRow * rowBytes, (srcRow + 1) * rowBytes), dstRow * rowBytes);
}

function roundUp(n: number, multiple: number): number {
  return Math.ceil(n / multiple) * multiple;
}

function allAlive(numRanks: number, alive: readonly boolean[] | undefined): readonly boolean[] {
  if (alive === undefined) return new Array<boolean>(numRanks).fill(true);
  if (alive.length !== numRanks) fail(`alive: expected ${numRanks} entries (one per rank), got ${alive.length}`);
  return alive;
}

// ---------------------------------------------------------------------------------------------
// Layout

export function referenceLayout(
  topkIdx: HostTensor<"i64">,
  numExperts: number,
  numRanks: number,
): { numTokensPerRank: HostTensor<"i32">; numTokensPerExpert: HostTensor<"i32">; isTokenInRank: HostTensor<"u8"> } {
  const numLocalExperts = numLocalExpertsOf(numExperts, numRanks);
  const numTokens = topkIdx.shape[0] ?? 0;
  const numTokensPerExpert = new HostTensor("i32", [numExperts]);
  const isTokenInRank = new HostTensor("u8", [numTokens, numRanks]);
  const numTokensPerRank = new HostTensor("i32", [numRanks]);
  for (let t = 0; t < numTokens; t++) {
    for (const e of expertsOfToken(topkIdx, t, numExperts)) {
      if (e < 0) continue;
      numTokensPerExpert.data[e]! += 1; // pairs (t, k)
      isTokenInRank.data[t * numRanks + rankOfExpert(e, numLocalExperts)] = 1;
    }
  }
  for (let t = 0; t < numTokens; t++) {
    for (let r = 0; r < numRanks; r++) numTokensPerRank.data[r]! += isTokenInRank.data[t * numRanks + r]!;
  }
  return { numTokensPerRank, numTokensPerExpert, isTokenInRank };
}

// ---------------------------------------------------------------------------------------------
// Normal dispatch

export interface RankDispatchInput {
  /** bf16 or fp8_e4m3 [T, H]. */
  x: HostTensor;
  /** f32 [T, H/128] when x is fp8, else null. */
  xScales: HostTensor<"f32"> | null;
  /** i64 [T, K], -1 = none. */
  topkIdx: HostTensor<"i64">;
  /** f32 [T, K], or null (on every rank alike). */
  topkWeights: HostTensor<"f32"> | null;
}

export interface RankDispatchOutput {
  recvX: HostTensor;
  recvXScales: HostTensor<"f32"> | null;
  recvTopkIdx: HostTensor<"i64">;
  recvTopkWeights: HostTensor<"f32"> | null;
  /** Per local expert, rows holding it, rounded up to expertAlignment. */
  numRecvTokensPerExpert: number[];
  /** Per received row: source rank and source token index. */
  recvSrcRank: Int32Array;
  recvSrcToken: Int32Array;
}

function checkDispatchInputs(inputs: RankDispatchInput[]): { hidden: number; topk: number } {
  const first = inputs[0] ?? fail("inputs: expected one entry per rank, got none");
  const hidden = first.x.shape[1] ?? 0;
  const topk = first.topkIdx.shape[1] ?? 0;
  inputs.forEach((input, s) => {
    const numTokens = input.x.shape[0] ?? 0;
    if (input.x.dtype !== first.x.dtype || input.x.shape.length !== 2 || input.x.shape[1] !== hidden) {
      fail(`inputs[${s}].x: expected ${first.x.dtype} [T, ${hidden}] like rank 0, got ${input.x.dtype} [${input.x.shape.join(", ")}]`);
    }
    if (input.topkIdx.shape.length !== 2 || input.topkIdx.shape[0] !== numTokens || input.topkIdx.shape[1] !== topk) {
      fail(`inputs[${s}].topkIdx: expected [${numTokens}, ${topk}], got [${input.topkIdx.shape.join(", ")}]`);
    }
    if ((input.xScales === null) !== (first.xScales === null) || (input.topkWeights === null) !== (first.topkWeights === null)) {
      fail(`inputs[${s}]: xScales and topkWeights must be given on every rank or on none`);
    }
    if (input.xScales !== null && input.xScales.shape[0] !== numTokens) {
      fail(`inputs[${s}].xScales: expected ${numTokens} rows, got [${input.xScales.shape.join(", ")}]`);
    }
    if (input.topkWeights !== null && (input.topkWeights.shape[0] !== numTokens || input.topkWeights.shape[1] !== topk)) {
      fail(`inputs[${s}].topkWeights: expected [${numTokens}, ${topk}], got [${input.topkWeights.shape.join(", ")}]`);
    }
  });
  return { hidden, topk };
}

/** What rank `rank` receives from a normal dispatch of every rank's `inputs`. */
export function referenceDispatchRank(
  rank: number,
  inputs: RankDispatchInput[],
  numExperts: number,
  expertAlignment = 1,
): RankDispatchOutput {
  const numRanks = inputs.length;
  const numLocalExperts = numLocalExpertsOf(numExperts, numRanks);
  const { hidden, topk } = checkDispatchInputs(inputs);
  if (!Number.isSafeInteger(expertAlignment) || expertAlignment < 1) fail(`expertAlignment must be an integer >= 1, got ${expertAlignment}`);
  const isLocal = (e: number) => e >= 0 && rankOfExpert(e, numLocalExperts) === rank;

  // The receive list: source ranks in order, each one's tokens ascending, those with an expert here.
  const srcRanks: number[] = [];
  const srcTokens: number[] = [];
  inputs.forEach((input, s) => {
    for (let t = 0; t < (input.x.shape[0] ?? 0); t++) {
      if (expertsOfToken(input.topkIdx, t, numExperts).some(isLocal)) {
        srcRanks.push(s);
        srcTokens.push(t);
      }
    }
  });

  const numRows = srcRanks.length;
  const first = inputs[0]!;
  const recvX = new HostTensor(first.x.dtype, [numRows, hidden]);
  const recvXScales = first.xScales === null ? null : new HostTensor("f32", [numRows, first.xScales.shape[1] ?? 0]);
  const recvTopkIdx = new HostTensor("i64", [numRows, topk]);
  const recvTopkWeights = first.topkWeights === null ? null : new HostTensor("f32", [numRows, topk]);
  const rowsPerLocalExpert = new Array<number>(numLocalExperts).fill(0);

  for (let n = 0; n < numRows; n++) {
    const s = srcRanks[n]!;
    const t = srcTokens[n]!;
    const input = inputs[s]!;
    copyRow(recvX, n, input.x, t);
    if (recvXScales !== null) copyRow(recvXScales, n, input.xScales!, t);
    const experts = expertsOfToken(input.topkIdx, t, numExperts);
    experts.forEach((e, k) => {
      recvTopkIdx.data[n * topk + k] = BigInt(isLocal(e) ? e - rank * numLocalExperts : -1);
      if (recvTopkWeights !== null) recvTopkWeights.data[n * topk + k] = isLocal(e) ? input.topkWeights!.data[t * topk + k]! : 0;
    });
    // A row counts once for each local expert it holds (a repeated expert id counts once).
    for (const e of new Set(experts.filter(isLocal))) rowsPerLocalExpert[e - rank * numLocalExperts]! += 1;
  }

  return {
    recvX,
    recvXScales,
    recvTopkIdx,
    recvTopkWeights,
    numRecvTokensPerExpert: rowsPerLocalExpert.map((n) => roundUp(n, expertAlignment)),
    recvSrcRank: Int32Array.from(srcRanks),
    recvSrcToken: Int32Array.from(srcTokens),
  };
}

/** Every rank's dispatch outputs. */
export function referenceDispatch(inputs: RankDispatchInput[], numExperts: number, expertAlignment = 1): RankDispatchOutput[] {
  return inputs.map((_, rank) => referenceDispatchRank(rank, inputs, numExperts, expertAlignment));
}

// ---------------------------------------------------------------------------------------------
// Normal combine

export interface RankCombineInput {
  /** bf16 [rows >= recvSrcRank.length, H]: one row per row this rank received (extra rows ignored). */
  x: HostTensor<"bf16">;
  /** f32 [rows, K], or null (on every rank alike). */
  topkWeights: HostTensor<"f32"> | null;
  /** From this rank's dispatch: source rank and token of each received row. */
  recvSrcRank: Int32Array;
  recvSrcToken: Int32Array;
}

/**
 * For each rank r, the row on r that holds home token t of `home` (-1 where t did not go to r):
 * result[r][t].
 */
function rowsOfHomeTokens(home: number, numHomeTokens: number, inputs: RankCombineInput[]): Int32Array[] {
  return inputs.map((input, r) => {
    const rowOfToken = new Int32Array(numHomeTokens).fill(-1);
    for (let n = 0; n < input.recvSrcRank.length; n++) {
      if (input.recvSrcRank[n] !== home) continue;
      const t = input.recvSrcToken[n]!;
      if (t < 0 || t >= numHomeTokens) fail(`inputs[${r}].recvSrcToken[${n}] = ${t} is outside [0, ${numHomeTokens}) for rank ${home}`);
      if (rowOfToken[t] !== -1) fail(`inputs[${r}]: token ${t} of rank ${home} appears in rows ${rowOfToken[t]} and ${n}`);
      rowOfToken[t] = n;
    }
    return rowOfToken;
  });
}

/** What home rank `home` gets from a normal combine (see the spec's pseudo-code). */
export function referenceCombineRank(
  home: number,
  numHomeTokens: number,
  inputs: RankCombineInput[],
  biases: HostTensor<"bf16">[],
): { combinedX: HostTensor<"bf16">; combinedTopkWeights: HostTensor<"f32"> | null } {
  const hidden = inputs[0]?.x.shape[1] ?? fail("inputs: expected one entry per rank, got none");
  if (biases.length > 2) fail(`biases: expected 0, 1 or 2 tensors, got ${biases.length}`);
  biases.forEach((bias, i) => {
    if (bias.shape[0] !== numHomeTokens || bias.shape[1] !== hidden) {
      fail(`biases[${i}]: expected bf16 [${numHomeTokens}, ${hidden}], got [${bias.shape.join(", ")}]`);
    }
  });
  inputs.forEach((input, r) => {
    if (input.x.shape[1] !== hidden || (input.x.shape[0] ?? 0) < input.recvSrcRank.length) {
      fail(`inputs[${r}].x: expected [>= ${input.recvSrcRank.length}, ${hidden}], got [${input.x.shape.join(", ")}]`);
    }
  });
  const rowOn = rowsOfHomeTokens(home, numHomeTokens, inputs);

  const combinedX = new HostTensor("bf16", [numHomeTokens, hidden]);
  for (let t = 0; t < numHomeTokens; t++) {
    for (let i = 0; i < hidden; i++) {
      let acc = 0;
      for (const bias of biases) acc = Math.fround(acc + bf16ToF32(bias.data[t * hidden + i]!));
      inputs.forEach((input, r) => {
        const row = rowOn[r]![t]!;
        if (row >= 0) acc = Math.fround(acc + bf16ToF32(input.x.data[row * hidden + i]!));
      });
      combinedX.data[t * hidden + i] = f32ToBf16(acc);
    }
  }

  const withWeights = inputs[0]!.topkWeights;
  if (withWeights === null) return { combinedX, combinedTopkWeights: null };
  const topk = withWeights.shape[1] ?? 0;
  const combinedTopkWeights = new HostTensor("f32", [numHomeTokens, topk]);
  for (let t = 0; t < numHomeTokens; t++) {
    for (let k = 0; k < topk; k++) {
      let acc = 0;
      inputs.forEach((input, r) => {
        const row = rowOn[r]![t]!;
        const weights = input.topkWeights ?? fail(`inputs[${r}].topkWeights: given on rank 0, so expected on every rank`);
        if (row >= 0) acc = Math.fround(acc + weights.data[row * topk + k]!);
      });
      combinedTopkWeights.data[t * topk + k] = acc;
    }
  }
  return { combinedX, combinedTopkWeights };
}

/** Every home rank's combine outputs; biasesPerRank[s] are home rank s's biases. */
export function referenceCombine(
  inputs: RankCombineInput[],
  numTokensPerRank: number[],
  biasesPerRank: HostTensor<"bf16">[][],
): Array<{ combinedX: HostTensor<"bf16">; combinedTopkWeights: HostTensor<"f32"> | null }> {
  return inputs.map((_, home) => referenceCombineRank(home, numTokensPerRank[home] ?? 0, inputs, biasesPerRank[home] ?? []));
}

// ---------------------------------------------------------------------------------------------
// Low-latency dispatch

export interface LowLatencyOptions {
  useFp8: boolean;
  /** fp8: power-of-two scales. */
  roundScale: boolean;
  /** fp8: packed UE8M0 scales (implies roundScale). */
  useUe8m0: boolean;
  /** alive[r] false: rank r is dead (neither sends nor receives). Default: all alive. */
  alive?: readonly boolean[];
}

export interface RankLowLatencyDispatchOutput {
  /** [El, R*M, H] bf16 or fp8_e4m3; slots past recvCount[e] are 0. */
  recvX: HostTensor;
  /** f32 [El, R*M, H/128], or i32 [El, R*M, H/512] (ue8m0); null for bf16. */
  recvXScales: HostTensor | null;
  /** i32 [El]. */
  recvCount: HostTensor<"i32">;
  /** i32 [El, R*M]: source token of each slot, -1 past recvCount. */
  srcTokenIdx: HostTensor<"i32">;
  /** i32 [El, R, 2]: (begin slot, count) of each source rank. */
  layoutRange: HostTensor<"i32">;
}

export interface LowLatencyInput {
  x: HostTensor<"bf16">;
  topkIdx: HostTensor<"i64">;
}

function checkLowLatencyInputs(inputs: LowLatencyInput[], maxTokensPerRank: number, opts: LowLatencyOptions): number {
  const hidden = inputs[0]?.x.shape[1] ?? fail("inputs: expected one entry per rank, got none");
  inputs.forEach((input, s) => {
    const numTokens = input.x.shape[0] ?? 0;
    if (input.x.dtype !== "bf16" || input.x.shape.length !== 2 || input.x.shape[1] !== hidden) {
      fail(`inputs[${s}].x: expected bf16 [T, ${hidden}], got ${input.x.dtype} [${input.x.shape.join(", ")}]`);
    }
    if (numTokens > maxTokensPerRank) fail(`inputs[${s}].x: ${numTokens} tokens exceed maxTokensPerRank ${maxTokensPerRank}`);
    if (input.topkIdx.shape[0] !== numTokens) fail(`inputs[${s}].topkIdx: expected ${numTokens} rows, got [${input.topkIdx.shape.join(", ")}]`);
  });
  const multiple = opts.useFp8 ? (opts.useUe8m0 ? FP8_GROUP_SIZE * UE8M0_GROUPS_PER_WORD : FP8_GROUP_SIZE) : 1;
  if (hidden % multiple !== 0) fail(`hidden must be a multiple of ${multiple} for this FP8 mode, got ${hidden}`);
  return hidden;
}

/**
 * Write the payload of source row x[t] into slot `slot` (a flat index over [El * R*M]): a byte copy
 * for bf16; for fp8, per 128-channel group, the e4m3 values and the scale (f32, or its UE8M0 byte).
 */
function writeLowLatencyPayload(out: RankLowLatencyDispatchOutput, slot: number, x: HostTensor<"bf16">, t: number, opts: LowLatencyOptions): void {
  const hidden = x.shape[1]!;
  if (!opts.useFp8) {
    copyRow(out.recvX, slot, x, t);
    return;
  }
  const numGroups = hidden / FP8_GROUP_SIZE;
  const roundScale = opts.roundScale || opts.useUe8m0;
  const q = out.recvX.data as Uint8Array;
  for (let g = 0; g < numGroups; g++) {
    const begin = g * FP8_GROUP_SIZE;
    const scale = quantizeFp8Group(
      x.data.subarray(t * hidden + begin, t * hidden + begin + FP8_GROUP_SIZE),
      q.subarray(slot * hidden + begin, slot * hidden + begin + FP8_GROUP_SIZE),
      roundScale,
    );
    if (opts.useUe8m0) {
      const word = slot * (numGroups / UE8M0_GROUPS_PER_WORD) + Math.floor(g / UE8M0_GROUPS_PER_WORD);
      (out.recvXScales!.data as Int32Array)[word]! |= ue8m0Byte(scale) << (8 * (g % UE8M0_GROUPS_PER_WORD));
    } else {
      (out.recvXScales!.data as Float32Array)[slot * numGroups + g] = scale;
    }
  }
}

/** What rank `rank` receives from a low-latency dispatch of every rank's inputs. */
export function referenceLowLatencyDispatchRank(
  rank: number,
  inputs: LowLatencyInput[],
  maxTokensPerRank: number,
  numExperts: number,
  opts: LowLatencyOptions,
): RankLowLatencyDispatchOutput {
  const numRanks = inputs.length;
  const numLocalExperts = numLocalExpertsOf(numExperts, numRanks);
  const hidden = checkLowLatencyInputs(inputs, maxTokensPerRank, opts);
  const alive = allAlive(numRanks, opts.alive);
  const slotsPerExpert = numRanks * maxTokensPerRank;

  const numGroups = hidden / FP8_GROUP_SIZE;
  const out: RankLowLatencyDispatchOutput = {
    recvX: new HostTensor(opts.useFp8 ? "fp8_e4m3" : "bf16", [numLocalExperts, slotsPerExpert, hidden]),
    recvXScales: !opts.useFp8
      ? null
      : opts.useUe8m0
        ? new HostTensor("i32", [numLocalExperts, slotsPerExpert, numGroups / UE8M0_GROUPS_PER_WORD])
        : new HostTensor("f32", [numLocalExperts, slotsPerExpert, numGroups]),
    recvCount: new HostTensor("i32", [numLocalExperts]),
    srcTokenIdx: HostTensor.full("i32", [numLocalExperts, slotsPerExpert], -1),
    layoutRange: new HostTensor("i32", [numLocalExperts, numRanks, 2]),
  };

  for (let e = 0; e < numLocalExperts; e++) {
    const globalExpert = rank * numLocalExperts + e;
    let count = 0; // slots of expert e filled so far: packed by source rank, then source token
    for (let s = 0; s < numRanks; s++) {
      const begin = count;
      const input = inputs[s]!;
      if (alive[rank] && alive[s]) {
        for (let t = 0; t < (input.x.shape[0] ?? 0); t++) {
          if (!expertsOfToken(input.topkIdx, t, numExperts).includes(globalExpert)) continue;
          const slot = e * slotsPerExpert + count;
          writeLowLatencyPayload(out, slot, input.x, t, opts);
          out.srcTokenIdx.data[slot] = t;
          count += 1;
        }
      }
      out.layoutRange.data[(e * numRanks + s) * 2] = begin;
      out.layoutRange.data[(e * numRanks + s) * 2 + 1] = count - begin;
    }
    out.recvCount.data[e] = count;
  }
  return out;
}

/** Every rank's low-latency dispatch outputs. */
export function referenceLowLatencyDispatch(
  inputs: LowLatencyInput[],
  maxTokensPerRank: number,
  numExperts: number,
  opts: LowLatencyOptions,
): RankLowLatencyDispatchOutput[] {
  return inputs.map((_, rank) => referenceLowLatencyDispatchRank(rank, inputs, maxTokensPerRank, numExperts, opts));
}

// ---------------------------------------------------------------------------------------------
// Low-latency combine

/**
 * slotOf[t * numExperts + e]: the slot (within expert e's R*M slots on its rank) where dispatch put
 * home token t of `home`, for every expert in t's row (else -1). Dispatch packs each source rank's
 * tokens in ascending order from layoutRange's begin, so the slot is begin + the number of earlier
 * home tokens routed to e; the count in layoutRange must agree.
 */
function homeSlots(home: number, topkIdx: HostTensor<"i64">, numExperts: number, layoutRanges: HostTensor<"i32">[], alive: readonly boolean[]): Int32Array {
  const numRanks = layoutRanges.length;
  const numLocalExperts = numLocalExpertsOf(numExperts, numRanks);
  const numTokens = topkIdx.shape[0] ?? 0;
  const slotOf = new Int32Array(numTokens * numExperts).fill(-1);
  const rangeOf = (e: number, field: 0 | 1) => {
    const q = rankOfExpert(e, numLocalExperts);
    return layoutRanges[q]!.data[((e % numLocalExperts) * numRanks + home) * 2 + field]!;
  };
  const seen = new Int32Array(numExperts);
  for (let t = 0; t < numTokens; t++) {
    for (const e of new Set(expertsOfToken(topkIdx, t, numExperts))) {
      if (e < 0 || !alive[rankOfExpert(e, numLocalExperts)]) continue;
      slotOf[t * numExperts + e] = rangeOf(e, 0) + seen[e]!;
      seen[e]! += 1;
    }
  }
  for (let e = 0; e < numExperts; e++) {
    if (alive[rankOfExpert(e, numLocalExperts)] && seen[e] !== rangeOf(e, 1)) {
      fail(`layoutRanges[${rankOfExpert(e, numLocalExperts)}]: rank ${home} sent ${seen[e]} tokens to expert ${e}, but its range counts ${rangeOf(e, 1)}`);
    }
  }
  return slotOf;
}

/** What home rank `home` gets from a low-latency combine (see the spec's pseudo-code). */
export function referenceLowLatencyCombineRank(
  home: number,
  expertOutputs: HostTensor<"bf16">[],
  layoutRanges: HostTensor<"i32">[],
  topkIdx: HostTensor<"i64">,
  topkWeights: HostTensor<"f32">,
  numExperts: number,
  alive?: readonly boolean[],
): HostTensor<"bf16"> {
  const numRanks = expertOutputs.length;
  const numLocalExperts = numLocalExpertsOf(numExperts, numRanks);
  const aliveRanks = allAlive(numRanks, alive);
  const [numTokens = 0, topk = 0] = topkIdx.shape;
  const [, slotsPerExpert = 0, hidden = 0] = expertOutputs[0]?.shape ?? [];
  if (topkWeights.shape[0] !== numTokens || topkWeights.shape[1] !== topk) {
    fail(`topkWeights: expected [${numTokens}, ${topk}] like topkIdx, got [${topkWeights.shape.join(", ")}]`);
  }
  expertOutputs.forEach((x, q) => {
    if (x.shape.length !== 3 || x.shape[0] !== numLocalExperts || x.shape[1] !== slotsPerExpert || x.shape[2] !== hidden) {
      fail(`expertOutputs[${q}]: expected bf16 [${numLocalExperts}, ${slotsPerExpert}, ${hidden}], got [${x.shape.join(", ")}]`);
    }
  });
  const combinedX = new HostTensor("bf16", [numTokens, hidden]);
  if (!aliveRanks[home]) return combinedX; // a dead home rank sends nothing and gets zeros

  const slotOf = homeSlots(home, topkIdx, numExperts, layoutRanges, aliveRanks);
  for (let t = 0; t < numTokens; t++) {
    const experts = expertsOfToken(topkIdx, t, numExperts);
    for (let i = 0; i < hidden; i++) {
      let acc = 0;
      experts.forEach((e, k) => {
        if (e < 0) return;
        const q = rankOfExpert(e, numLocalExperts);
        if (!aliveRanks[q]) return; // experts on a dead rank contribute nothing
        const row = (e % numLocalExperts) * slotsPerExpert + slotOf[t * numExperts + e]!;
        const value = bf16ToF32(expertOutputs[q]!.data[row * hidden + i]!);
        acc = Math.fround(acc + Math.fround(topkWeights.data[t * topk + k]! * value));
      });
      combinedX.data[t * hidden + i] = f32ToBf16(acc);
    }
  }
  return combinedX;
}

/** Every home rank's low-latency combine output. */
export function referenceLowLatencyCombine(
  expertOutputs: HostTensor<"bf16">[],
  layoutRanges: HostTensor<"i32">[],
  topkIdx: HostTensor<"i64">[],
  topkWeights: HostTensor<"f32">[],
  numExperts: number,
  alive?: readonly boolean[],
): HostTensor<"bf16">[] {
  return expertOutputs.map((_, home) =>
    referenceLowLatencyCombineRank(home, expertOutputs, layoutRanges, topkIdx[home]!, topkWeights[home]!, numExperts, alive),
  );
}

// ---------------------------------------------------------------------------------------------
// Helpers shared by the tests of every layer

export interface Rng {
  /** Uniform in [0, 1). */
  next(): number;
  /** Uniform integer in [0, n). */
  int(n: number): number;
  /** Standard normal. */
  normal(): number;
}

/** A small seeded PRNG (mulberry32; normals by Box-Muller). Same seed, same sequence. */
export function makeRng(seed: number): Rng {
  let state = seed >>> 0;
  const next = () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let z = state;
    z = Math.imul(z ^ (z >>> 15), z | 1);
    z ^= z + Math.imul(z ^ (z >>> 7), z | 61);
    return ((z ^ (z >>> 14)) >>> 0) / 4294967296;
  };
  return {
    next,
    int: (n) => Math.floor(next() * n),
    normal: () => Math.sqrt(-2 * Math.log(1 - next())) * Math.cos(2 * Math.PI * next()),
  };
}

/** A bf16 tensor of normal values times `scale`. */
export function randomBf16(rng: Rng, shape: readonly number[], scale = 1): HostTensor<"bf16"> {
  const t = new HostTensor("bf16", shape);
  for (let i = 0; i < t.numel; i++) t.data[i] = f32ToBf16(rng.normal() * scale);
  return t;
}

/** An f32 [numTokens, topk] tensor of routing weights (|normal|, as f32). */
export function randomTopkWeights(rng: Rng, numTokens: number, topk: number): HostTensor<"f32"> {
  const t = new HostTensor("f32", [numTokens, topk]);
  for (let i = 0; i < t.numel; i++) t.data[i] = Math.abs(rng.normal());
  return t;
}

/**
 * i64 [numTokens, topk] routing as DeepEP's tests make it: each token scores every expert
 * |normal| + 1 and takes its topk best (distinct experts, best first). skewToExpert: that expert
 * wins every token. maskProbability: each entry becomes -1 with this probability.
 */
export function randomRouting(
  rng: Rng,
  numTokens: number,
  numExperts: number,
  topk: number,
  opts: { maskProbability?: number; skewToExpert?: number } = {},
): HostTensor<"i64"> {
  if (topk > numExperts) fail(`randomRouting: topk ${topk} exceeds numExperts ${numExperts}`);
  const routing = new HostTensor("i64", [numTokens, topk]);
  for (let t = 0; t < numTokens; t++) {
    const scores = Array.from({ length: numExperts }, (_, e) => ({ e, score: Math.abs(rng.normal()) + 1 + (e === opts.skewToExpert ? 100 : 0) }));
    scores.sort((a, b) => b.score - a.score);
    for (let k = 0; k < topk; k++) {
      const masked = rng.next() < (opts.maskProbability ?? 0);
      routing.data[t * topk + k] = BigInt(masked ? -1 : scores[k]!.e);
    }
  }
  return routing;
}

type Comparable = HostTensor | ArrayLike<number> | ArrayLike<bigint>;

function elementsOf(x: Comparable): ArrayLike<number | bigint> {
  return x instanceof HostTensor ? x.data : x;
}

/** Bits of an element for exact comparison: f32 by its IEEE bits (so -0 != 0, NaN == same NaN). */
function sameElement(a: number | bigint, b: number | bigint, isF32: boolean): boolean {
  if (isF32 && typeof a === "number" && typeof b === "number") return a !== a ? b !== b : b === b && f32Bits(a) === f32Bits(b);
  return Object.is(a, b);
}

function describeElement(x: Comparable, v: number | bigint): string {
  if (x instanceof HostTensor && x.dtype === "bf16") return `${bf16ToF32(Number(v))} (0x${Number(v).toString(16).padStart(4, "0")})`;
  if (x instanceof HostTensor && x.dtype === "fp8_e4m3") return `0x${Number(v).toString(16).padStart(2, "0")}`;
  return String(v);
}

/** Null when `got` equals `expected` bit for bit (dtype, shape, every element); else a message naming the first mismatch. */
export function compareExact(name: string, got: Comparable, expected: Comparable): string | null {
  if (got instanceof HostTensor && expected instanceof HostTensor) {
    if (got.dtype !== expected.dtype) return `${name}: dtype ${got.dtype}, expected ${expected.dtype}`;
    if (got.shape.join() !== expected.shape.join()) return `${name}: shape [${got.shape.join(", ")}], expected [${expected.shape.join(", ")}]`;
  }
  const a = elementsOf(got);
  const b = elementsOf(expected);
  if (a.length !== b.length) return `${name}: ${a.length} elements, expected ${b.length}`;
  const isF32 = (got instanceof HostTensor && got.dtype === "f32") || got instanceof Float32Array;
  let first = -1;
  let mismatches = 0;
  for (let i = 0; i < a.length; i++) {
    if (!sameElement(a[i]!, b[i]!, isF32)) {
      if (first < 0) first = i;
      mismatches += 1;
    }
  }
  if (first < 0) return null;
  let where = `index ${first}`;
  if (expected instanceof HostTensor && expected.shape.length > 1) {
    const coords: number[] = [];
    let rest = first;
    for (let d = expected.shape.length - 1; d >= 0; d--) {
      coords.unshift(rest % expected.shape[d]!);
      rest = Math.floor(rest / expected.shape[d]!);
    }
    where += ` [${coords.join(", ")}]`;
  }
  return `${name}: first mismatch at ${where}: got ${describeElement(got, a[first]!)}, expected ${describeElement(expected, b[first]!)} (${mismatches} of ${a.length} elements differ)`;
}
