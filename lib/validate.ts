// Argument checks shared by both backends. EpBuffer runs them before a backend sees a call, so
// nothing reaches a kernel (or the host backend's exchange) with a wrong shape, dtype, device or
// range. Every message names the method, the argument, what was given and what is expected:
//   dispatch: topkIdx must be i64 [numTokens, topk] = [128, topk], got f32 [128, 8]
//
// Values inside tensors are checked only where they can be read without a copy (host memory:
// HostTensor, or any tensor exposing a typed array `data` on device "cpu"). Device tensors are
// checked by the CUDA kernels themselves: an expert id outside [-1, numExperts) raises a device
// flag and the next call on that buffer throws naming the rank.

import type {
  CombineArgs,
  CommConfig,
  DispatchArgs,
  DispatchHandle,
  DispatchLayout,
  EventLike,
  LowLatencyCombineArgs,
  LowLatencyDispatchArgs,
  LowLatencyHandle,
} from "./backend/types.ts";
import type {
  CombineOptions,
  DispatchOptions,
  LayoutOptions,
  LowLatencyCombineOptions,
  LowLatencyDispatchOptions,
} from "./buffer.ts";
import type { DType } from "./dtype.ts";
import type { Device, Tensor } from "./tensor.ts";

/** Thrown for every invalid argument or misuse of an EpBuffer (before anything runs). */
export class EpArgumentError extends Error {
  /** The method that was called, e.g. "dispatch". */
  readonly method: string;
  /** The argument at fault, e.g. "topkIdx" (or "this" for a closed buffer). */
  readonly argument: string;
  constructor(method: string, argument: string, message: string) {
    super(`${method}: ${message}`);
    this.name = "EpArgumentError";
    this.method = method;
    this.argument = argument;
  }
}

/** Where a check runs: the method's name (for messages) and the backend's device. */
export interface CheckContext {
  readonly method: string;
  readonly device: Device;
}

/** One dimension of an expected shape: its name and its size (null = any). */
export type Dim = readonly [name: string, size: number | null];

export interface TensorSpec {
  dtype: DType | readonly DType[];
  dims: readonly Dim[];
}

export function deviceName(device: Device): string {
  return device === "cpu" ? "cpu" : `cuda:${device}`;
}

/** "f32 [128, 8]": how a given tensor is shown in messages. */
export function describeTensor(t: Tensor): string {
  return `${t.dtype} [${t.shape.join(", ")}]`;
}

function describeValue(v: unknown): string {
  if (v === null) return "null";
  if (v === undefined) return "undefined";
  if (typeof v === "number" || typeof v === "boolean" || typeof v === "bigint") return String(v);
  if (typeof v === "string") return JSON.stringify(v);
  if (Array.isArray(v)) return `an array of ${v.length}`;
  if (isTensor(v)) return describeTensor(v);
  return `a ${typeof v === "object" ? (v.constructor?.name ?? "object") : typeof v}`;
}

function describeSpec(spec: TensorSpec): string {
  const dtypes = typeof spec.dtype === "string" ? spec.dtype : spec.dtype.join(" or ");
  const names = spec.dims.map(([name]) => name);
  const sizes = spec.dims.map(([name, size]) => (size === null ? name : String(size)));
  const known = spec.dims.some(([, size]) => size !== null);
  return known ? `${dtypes} [${names.join(", ")}] = [${sizes.join(", ")}]` : `${dtypes} [${names.join(", ")}]`;
}

export function isTensor(v: unknown): v is Tensor {
  if (typeof v !== "object" || v === null) return false;
  const t = v as Partial<Tensor>;
  return typeof t.dtype === "string" && Array.isArray(t.shape) && (t.device === "cpu" || typeof t.device === "number");
}

function fail(ctx: CheckContext, argument: string, message: string): never {
  throw new EpArgumentError(ctx.method, argument, message);
}

/** Checks kind, dtype, shape, device and contiguity of a tensor argument. */
export function checkTensor(ctx: CheckContext, argument: string, value: unknown, spec: TensorSpec): Tensor {
  if (!isTensor(value)) {
    fail(ctx, argument, `${argument} must be a tensor ${describeSpec(spec)}, got ${describeValue(value)}`);
  }
  // A plain loop: a destructuring callback per dimension was a third of a low-latency call's
  // validation time (CPU profile, session 6). This runs on every call of a decode loop.
  let shapeOk = value.shape.length === spec.dims.length;
  for (let i = 0; shapeOk && i < spec.dims.length; i++) {
    const size = spec.dims[i]![1];
    shapeOk = size === null || value.shape[i] === size;
  }
  const dtypeOk = typeof spec.dtype === "string" ? value.dtype === spec.dtype : spec.dtype.includes(value.dtype);
  if (!dtypeOk || !shapeOk) {
    fail(ctx, argument, `${argument} must be ${describeSpec(spec)}, got ${describeTensor(value)}`);
  }
  if (value.device !== ctx.device) {
    fail(
      ctx,
      argument,
      `${argument} must be on ${deviceName(ctx.device)} (this buffer's device), got a tensor on ${deviceName(value.device)}`,
    );
  }
  if (!value.contiguous) {
    fail(ctx, argument, `${argument} must be contiguous (row-major, dense), got a strided view ${describeTensor(value)}`);
  }
  return value;
}

export function checkOptionalTensor(ctx: CheckContext, argument: string, value: unknown, spec: TensorSpec): Tensor | null {
  return value === undefined || value === null ? null : checkTensor(ctx, argument, value, spec);
}

export function checkInteger(ctx: CheckContext, argument: string, value: unknown, min: number, max = Number.MAX_SAFE_INTEGER): number {
  if (typeof value !== "number" || !Number.isSafeInteger(value) || value < min || value > max) {
    const range = max === Number.MAX_SAFE_INTEGER ? `an integer >= ${min}` : `an integer in [${min}, ${max}]`;
    fail(ctx, argument, `${argument} must be ${range}, got ${describeValue(value)}`);
  }
  return value;
}

export function checkBoolean(ctx: CheckContext, argument: string, value: unknown): boolean {
  if (value === undefined) return false;
  if (typeof value !== "boolean") fail(ctx, argument, `${argument} must be a boolean, got ${describeValue(value)}`);
  return value;
}

/** Rejects option names the method does not know (a typo must not be silently ignored). */
export function checkKnownKeys(ctx: CheckContext, argument: string, value: unknown, known: readonly string[]): void {
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    fail(ctx, argument, `${argument} must be an options object, got ${describeValue(value)}`);
  }
  for (const key of Object.keys(value)) {
    if (!known.includes(key)) {
      fail(ctx, key, `unknown option ${JSON.stringify(key)} in ${argument}; expected one of ${known.join(", ")}`);
    }
  }
}

/** numExperts: a positive multiple of numRanks (every rank holds numExperts / numRanks experts). */
export function checkNumExperts(ctx: CheckContext, value: unknown, numRanks: number): number {
  const numExperts = checkInteger(ctx, "numExperts", value, 1);
  if (numExperts % numRanks !== 0) {
    fail(ctx, "numExperts", `numExperts must be a multiple of numRanks = ${numRanks}, got ${numExperts}`);
  }
  return numExperts;
}

/** Host-readable typed array of a tensor, when it has one (HostTensor, PinnedTensor on "cpu"). */
function hostData(t: Tensor): ArrayLike<number | bigint> | null {
  if (t.device !== "cpu") return null;
  const data = (t as { data?: unknown }).data;
  return ArrayBuffer.isView(data) ? (data as unknown as ArrayLike<number | bigint>) : null;
}

/**
 * Every expert id in [-1, numExperts), and no id repeated within a row (-1 may repeat). Read for
 * host tensors only; device tensors are checked by the CUDA kernels (see the file comment).
 */
export function checkExpertIds(ctx: CheckContext, argument: string, topkIdx: Tensor, numExperts: number): void {
  const data = hostData(topkIdx);
  if (data === null) return;
  const topk = topkIdx.shape[1] ?? 1;
  for (let i = 0; i < data.length; i++) {
    const e = Number(data[i]);
    const [row, k] = [Math.floor(i / topk), i % topk];
    if (e < -1 || e >= numExperts) {
      fail(ctx, argument, `${argument} values must be expert ids in [-1, numExperts) = [-1, ${numExperts}), got ${e} at [${row}, ${k}]`);
    }
    for (let j = row * topk; e >= 0 && j < i; j++) {
      if (Number(data[j]) === e) {
        fail(ctx, argument, `${argument} rows must not repeat an expert id (-1 excepted), got ${e} at [${row}, ${j - row * topk}] and [${row}, ${k}]`);
      }
    }
  }
}

/** FP8 quantization works on 128-channel groups; packed UE8M0 on 4 groups per i32 word. */
export function checkFp8Hidden(ctx: CheckContext, argument: string, hidden: number, useUe8m0: boolean): void {
  if (hidden % 128 !== 0) {
    fail(ctx, argument, `${argument} hidden must be a multiple of 128 for fp8 (one scale per 128 channels), got ${hidden}`);
  }
  if (useUe8m0 && hidden % 512 !== 0) {
    fail(ctx, argument, `${argument} hidden must be a multiple of 512 for useUe8m0 (4 scales per i32 word), got ${hidden}`);
  }
}

export function checkClosed(ctx: CheckContext, closed: boolean): void {
  if (closed) fail(ctx, "this", "this EpBuffer was closed; create a new one");
}

/** A handle must come from this buffer and be of the expected kind. */
export function checkHandle(
  ctx: CheckContext,
  argument: string,
  handle: unknown,
  kind: "normal" | "low_latency",
  bufferId: number,
): void {
  if (typeof handle !== "object" || handle === null || (handle as { kind?: unknown }).kind !== kind) {
    const what = kind === "normal" ? "dispatch()" : "lowLatencyDispatch()";
    fail(ctx, argument, `${argument} must be a handle returned by ${what} of this buffer, got ${describeValue(handle)}`);
  }
  const id = (handle as { bufferId?: unknown }).bufferId;
  if (id !== bufferId) {
    fail(ctx, argument, `${argument} comes from another EpBuffer (bufferId ${String(id)}), expected one of this buffer (bufferId ${bufferId})`);
  }
}

/** An error detected after the exchange (host backend) or flagged by a kernel (CUDA backend). */
export function numWorstTokensError(method: string, rank: number, numRecvTokens: number, numWorstTokens: number): EpArgumentError {
  return new EpArgumentError(
    method,
    "numWorstTokens",
    `numWorstTokens = ${numWorstTokens} is too small: rank ${rank} receives ${numRecvTokens} tokens; ` +
      `pass numWorstTokens >= ${numRecvTokens} (nothing is truncated)`,
  );
}

export function failArgument(ctx: CheckContext, argument: string, message: string): never {
  fail(ctx, argument, message);
}

export { describeValue };

// ---- per-method validation: public options -> the backend's fully-specified arguments ----


/** What the checks need to know about the buffer a call is made on. */
export interface BufferState {
  ctx: CheckContext;
  bufferId: number;
  rank: number;
  numRanks: number;
  lowLatency: { maxTokensPerRank: number; hidden: number; numExperts: number } | null;
}

function checkEvent(ctx: CheckContext, argument: string, value: unknown): EventLike | null {
  if (value === undefined || value === null) return null;
  if (typeof value !== "object" || typeof (value as EventLike).synchronize !== "function" || typeof (value as EventLike).waitOn !== "function") {
    fail(ctx, argument, `${argument} must be an Event (with waitOn and synchronize) or null, got ${describeValue(value)}`);
  }
  return value as EventLike;
}

const CONFIG_KEYS = ["numSMs", "nvlChunkedSendTokens", "nvlChunkedRecvTokens", "rdmaChunkedSendTokens", "rdmaChunkedRecvTokens"] as const;

function checkConfig(ctx: CheckContext, value: unknown, fallback: CommConfig): CommConfig {
  if (value === undefined || value === null) return fallback;
  checkKnownKeys(ctx, "config", value, CONFIG_KEYS);
  const c = value as Partial<CommConfig>;
  for (const key of CONFIG_KEYS) checkInteger(ctx, `config.${key}`, c[key], 1);
  const config = c as CommConfig;
  if (config.numSMs % 2 !== 0) fail(ctx, "config.numSMs", `config.numSMs must be even (one sending and one receiving SM per channel), got ${config.numSMs}`);
  if (config.nvlChunkedSendTokens > config.nvlChunkedRecvTokens) {
    fail(
      ctx,
      "config.nvlChunkedSendTokens",
      `config.nvlChunkedSendTokens must be <= config.nvlChunkedRecvTokens = ${config.nvlChunkedRecvTokens}, got ${config.nvlChunkedSendTokens}`,
    );
  }
  return { ...config };
}

function mustBeAbsent(ctx: CheckContext, argument: string, value: unknown, why: string): void {
  if (value !== undefined && value !== null) fail(ctx, argument, `${argument} must be omitted ${why}, got ${describeValue(value)}`);
}

function checkTopkIdx(ctx: CheckContext, argument: string, value: unknown, numTokens: number, numExperts: number | null): Tensor {
  const t = checkTensor(ctx, argument, value, { dtype: "i64", dims: [["numTokens", numTokens], ["topk", null]] });
  if (t.shape[1] === 0) fail(ctx, argument, `${argument} must have topk >= 1 columns, got ${describeTensor(t)}`);
  if (numExperts !== null) checkExpertIds(ctx, argument, t, numExperts);
  return t;
}

/** x of dispatch: bf16 or fp8 [numTokens, hidden]; xScales exactly when fp8. */
function checkDispatchX(ctx: CheckContext, opts: DispatchOptions, numTokens: number | null, hidden: number | null): { x: Tensor; xScales: Tensor | null } {
  const x = checkTensor(ctx, "x", opts.x, { dtype: ["bf16", "fp8_e4m3"], dims: [["numTokens", numTokens], ["hidden", hidden]] });
  const h = x.shape[1]!;
  if (x.dtype === "bf16") {
    mustBeAbsent(ctx, "xScales", opts.xScales, "with bf16 x (scales belong to fp8_e4m3 x)");
    return { x, xScales: null };
  }
  checkFp8Hidden(ctx, "x", h, false);
  if (opts.xScales === undefined || opts.xScales === null) {
    fail(ctx, "xScales", `xScales must be f32 [numTokens, hidden / 128] = [${x.shape[0]}, ${h / 128}] with fp8_e4m3 x, got ${describeValue(opts.xScales)}`);
  }
  const xScales = checkTensor(ctx, "xScales", opts.xScales, { dtype: "f32", dims: [["numTokens", x.shape[0]!], ["hidden / 128", h / 128]] });
  return { x, xScales };
}

function checkLayout(ctx: CheckContext, value: unknown, numTokens: number, numRanks: number): DispatchLayout {
  if (typeof value !== "object" || value === null) {
    fail(ctx, "layout", `layout must be the result of getDispatchLayout, got ${describeValue(value)}`);
  }
  const l = value as DispatchLayout;
  checkTensor(ctx, "layout.numTokensPerRank", l.numTokensPerRank, { dtype: "i32", dims: [["numRanks", numRanks]] });
  const perExpert = checkTensor(ctx, "layout.numTokensPerExpert", l.numTokensPerExpert, { dtype: "i32", dims: [["numExperts", null]] });
  checkNumExpertsOf(ctx, "layout.numTokensPerExpert", perExpert.shape[0]!, numRanks);
  checkTensor(ctx, "layout.isTokenInRank", l.isTokenInRank, { dtype: "u8", dims: [["numTokens", numTokens], ["numRanks", numRanks]] });
  return l;
}

function checkNumExpertsOf(ctx: CheckContext, argument: string, numExperts: number, numRanks: number): void {
  if (numExperts < 1 || numExperts % numRanks !== 0) {
    fail(ctx, argument, `${argument} must describe numExperts = a positive multiple of numRanks = ${numRanks}, got ${numExperts} experts`);
  }
}

const LAYOUT_KEYS = ["previousEvent", "asyncFinish"] as const;

export function validateLayout(
  state: BufferState,
  topkIdx: unknown,
  numExperts: unknown,
  opts: LayoutOptions,
): { topkIdx: Tensor; numExperts: number; previousEvent: EventLike | null; asyncFinish: boolean } {
  const { ctx } = state;
  const e = checkNumExperts(ctx, numExperts, state.numRanks);
  const t = checkTopkIdx(ctx, "topkIdx", topkIdx, isTensor(topkIdx) ? (topkIdx.shape[0] ?? 0) : 0, e);
  checkKnownKeys(ctx, "opts", opts, LAYOUT_KEYS);
  return { topkIdx: t, numExperts: e, previousEvent: checkEvent(ctx, "previousEvent", opts.previousEvent), asyncFinish: checkBoolean(ctx, "asyncFinish", opts.asyncFinish) };
}

const DISPATCH_KEYS = [
  "x", "xScales", "topkIdx", "topkWeights", "numExperts", "layout", "handle", "expertAlignment", "numWorstTokens", "config", "previousEvent", "asyncFinish",
] as const;

/**
 * Checks a dispatch call. For a fresh dispatch, `layout` is left null when not given: EpBuffer
 * then computes it with `numExperts` (and the backend always receives a layout).
 */
export function validateDispatch(
  state: BufferState,
  opts: DispatchOptions,
  defaultConfig: CommConfig,
): DispatchArgs & { numExperts: number } {
  const { ctx } = state;
  checkKnownKeys(ctx, "options", opts, DISPATCH_KEYS);
  const config = checkConfig(ctx, opts.config, defaultConfig);
  const previousEvent = checkEvent(ctx, "previousEvent", opts.previousEvent);
  const asyncFinish = checkBoolean(ctx, "asyncFinish", opts.asyncFinish);

  if (opts.handle !== undefined && opts.handle !== null) {
    checkHandle(ctx, "handle", opts.handle, "normal", state.bufferId);
    const handle = opts.handle as DispatchHandle;
    const why = "with handle (a cached dispatch replays the handle's routing)";
    for (const key of ["topkIdx", "topkWeights", "layout", "numExperts", "expertAlignment", "numWorstTokens"] as const) {
      mustBeAbsent(ctx, key, opts[key], why);
    }
    const { x, xScales } = checkDispatchX(ctx, opts, handle.numTokens, handle.hidden);
    return {
      x, xScales, topkIdx: null, topkWeights: null, layout: null, handle,
      expertAlignment: 1, numWorstTokens: 0, config, previousEvent, asyncFinish, numExperts: 0,
    };
  }

  const { x, xScales } = checkDispatchX(ctx, opts, null, null);
  const numTokens = x.shape[0]!;
  let layout: DispatchLayout | null = null;
  let numExperts: number;
  if (opts.layout !== undefined && opts.layout !== null) {
    layout = checkLayout(ctx, opts.layout, numTokens, state.numRanks);
    numExperts = layout.numTokensPerExpert.shape[0]!;
    if (opts.numExperts !== undefined && opts.numExperts !== numExperts) {
      fail(ctx, "numExperts", `numExperts must match layout.numTokensPerExpert = ${numExperts} experts, got ${describeValue(opts.numExperts)}`);
    }
  } else {
    if (opts.numExperts === undefined) {
      fail(ctx, "numExperts", "numExperts is required when no layout is given (dispatch computes the layout), got undefined");
    }
    numExperts = checkNumExperts(ctx, opts.numExperts, state.numRanks);
  }
  if (opts.topkIdx === undefined || opts.topkIdx === null) {
    fail(ctx, "topkIdx", `topkIdx must be i64 [numTokens, topk] = [${numTokens}, topk] (required without a handle), got ${describeValue(opts.topkIdx)}`);
  }
  const topkIdx = checkTopkIdx(ctx, "topkIdx", opts.topkIdx, numTokens, numExperts);
  const topkWeights = checkOptionalTensor(ctx, "topkWeights", opts.topkWeights, {
    dtype: "f32",
    dims: [["numTokens", numTokens], ["topk", topkIdx.shape[1]!]],
  });
  const expertAlignment = checkInteger(ctx, "expertAlignment", opts.expertAlignment ?? 1, 1);
  const numWorstTokens = checkInteger(ctx, "numWorstTokens", opts.numWorstTokens ?? 0, 0);
  return { x, xScales, topkIdx, topkWeights, layout, handle: null, expertAlignment, numWorstTokens, config, previousEvent, asyncFinish, numExperts };
}

const COMBINE_KEYS = ["x", "handle", "topkWeights", "bias", "config", "previousEvent", "asyncFinish"] as const;

export function validateCombine(state: BufferState, opts: CombineOptions, defaultConfig: CommConfig): CombineArgs {
  const { ctx } = state;
  checkKnownKeys(ctx, "options", opts, COMBINE_KEYS);
  checkHandle(ctx, "handle", opts.handle, "normal", state.bufferId);
  const handle = opts.handle;
  const x = checkTensor(ctx, "x", opts.x, { dtype: "bf16", dims: [["handle.numRecvRows", handle.numRecvRows], ["hidden", handle.hidden]] });
  const topkWeights = checkOptionalTensor(ctx, "topkWeights", opts.topkWeights, { dtype: "f32", dims: [["handle.numRecvRows", handle.numRecvRows], ["topk", null]] });
  let biasList: readonly unknown[];
  if (opts.bias === undefined || opts.bias === null) biasList = [];
  else if (Array.isArray(opts.bias)) biasList = opts.bias;
  else biasList = [opts.bias];
  if (biasList.length > 2) fail(ctx, "bias", `bias must be one tensor or an array of at most two, got an array of ${biasList.length}`);
  const biases = biasList.map((b, i) =>
    checkTensor(ctx, Array.isArray(opts.bias) ? `bias[${i}]` : "bias", b, { dtype: "bf16", dims: [["numTokens", handle.numTokens], ["hidden", x.shape[1]!]] }),
  );
  return {
    x, handle, topkWeights, biases,
    config: checkConfig(ctx, opts.config, defaultConfig),
    previousEvent: checkEvent(ctx, "previousEvent", opts.previousEvent),
    asyncFinish: checkBoolean(ctx, "asyncFinish", opts.asyncFinish),
  };
}

const LL_DISPATCH_KEYS = [
  "x", "topkIdx", "maxTokensPerRank", "numExperts", "useFp8", "roundScale", "useUe8m0", "cumulativeRecvStats", "waitStats", "hook", "asyncFinish", "stream",
] as const;

/** A CUDA stream: its handle as a number, or an object carrying it (lib/stream.ts Stream). null = the buffer's comm stream. */
function checkStream(ctx: CheckContext, value: unknown): number | null {
  if (value === undefined || value === null) return null;
  if (typeof value === "number" && Number.isSafeInteger(value) && value >= 0) return value;
  if (typeof value === "object") {
    const h = (value as { handle?: unknown; ptr?: unknown }).handle ?? (value as { ptr?: unknown }).ptr;
    if (typeof h === "number" && Number.isSafeInteger(h) && h >= 0) return h;
    if (typeof h === "bigint" && h >= 0n) return Number(h);
  }
  fail(ctx, "stream", `stream must be a Stream, a CUDA stream handle (number) or null, got ${describeValue(value)}`);
}

function requireLowLatency(state: BufferState): NonNullable<BufferState["lowLatency"]> {
  if (state.lowLatency === null) {
    fail(state.ctx, "lowLatency", "this buffer has no low-latency buffers: pass lowLatency: {maxTokensPerRank, hidden, numExperts} to EpBuffer.create");
  }
  return state.lowLatency;
}

export function validateLowLatencyDispatch(state: BufferState, opts: LowLatencyDispatchOptions): LowLatencyDispatchArgs {
  const { ctx, numRanks } = state;
  checkKnownKeys(ctx, "options", opts, LL_DISPATCH_KEYS);
  const sized = requireLowLatency(state);
  const maxTokensPerRank = checkInteger(ctx, "maxTokensPerRank", opts.maxTokensPerRank, 1);
  if (maxTokensPerRank !== sized.maxTokensPerRank) {
    fail(ctx, "maxTokensPerRank", `maxTokensPerRank must equal the buffer's lowLatency.maxTokensPerRank = ${sized.maxTokensPerRank}, got ${maxTokensPerRank}`);
  }
  const numExperts = checkNumExperts(ctx, opts.numExperts, numRanks);
  if (numExperts !== sized.numExperts) {
    fail(ctx, "numExperts", `numExperts must equal the buffer's lowLatency.numExperts = ${sized.numExperts}, got ${numExperts}`);
  }
  const x = checkTensor(ctx, "x", opts.x, { dtype: "bf16", dims: [["numTokens", null], ["hidden", null]] });
  const numTokens = x.shape[0]!, hidden = x.shape[1]!;
  if (numTokens > maxTokensPerRank) {
    fail(ctx, "x", `x has ${numTokens} tokens, more than maxTokensPerRank = ${maxTokensPerRank} (x is bf16 [${numTokens}, ${hidden}])`);
  }
  if (hidden !== sized.hidden) fail(ctx, "x", `x hidden must equal the buffer's lowLatency.hidden = ${sized.hidden}, got bf16 [${numTokens}, ${hidden}]`);
  const topkIdx = checkTopkIdx(ctx, "topkIdx", opts.topkIdx, numTokens, numExperts);
  const useFp8 = checkBoolean(ctx, "useFp8", opts.useFp8);
  const useUe8m0 = checkBoolean(ctx, "useUe8m0", opts.useUe8m0);
  let roundScale = checkBoolean(ctx, "roundScale", opts.roundScale);
  if (!useFp8 && (roundScale || useUe8m0)) {
    fail(ctx, roundScale ? "roundScale" : "useUe8m0", `${roundScale ? "roundScale" : "useUe8m0"} applies to fp8 only: pass useFp8: true, or drop it`);
  }
  if (useUe8m0) roundScale = true; // UE8M0 stores exponents only: the scales are powers of two.
  if (useFp8) checkFp8Hidden(ctx, "x", hidden, useUe8m0);
  const numLocalExperts = numExperts / numRanks;
  return {
    x, topkIdx, maxTokensPerRank, numExperts, useFp8, roundScale, useUe8m0,
    cumulativeRecvStats: checkOptionalTensor(ctx, "cumulativeRecvStats", opts.cumulativeRecvStats, { dtype: "i32", dims: [["numLocalExperts", numLocalExperts]] }),
    waitStats: checkOptionalTensor(ctx, "waitStats", opts.waitStats, { dtype: "i64", dims: [["numRanks", numRanks]] }),
    hook: checkBoolean(ctx, "hook", opts.hook),
    asyncFinish: checkBoolean(ctx, "asyncFinish", opts.asyncFinish),
    stream: checkStream(ctx, opts.stream),
  };
}

const LL_COMBINE_KEYS = ["x", "topkIdx", "topkWeights", "handle", "zeroCopy", "out", "hook", "asyncFinish", "stream"] as const;

export function validateLowLatencyCombine(state: BufferState, opts: LowLatencyCombineOptions): LowLatencyCombineArgs {
  const { ctx, numRanks } = state;
  checkKnownKeys(ctx, "options", opts, LL_COMBINE_KEYS);
  checkHandle(ctx, "handle", opts.handle, "low_latency", state.bufferId);
  const handle = opts.handle as LowLatencyHandle;
  const numLocalExperts = handle.numExperts / numRanks;
  const x = checkTensor(ctx, "x", opts.x, {
    dtype: "bf16",
    dims: [["numLocalExperts", numLocalExperts], ["numRanks * maxTokensPerRank", numRanks * handle.maxTokensPerRank], ["hidden", handle.hidden]],
  });
  const topkIdx = checkTopkIdx(ctx, "topkIdx", opts.topkIdx, handle.numTokens, handle.numExperts);
  const topkWeights = checkTensor(ctx, "topkWeights", opts.topkWeights, { dtype: "f32", dims: [["numTokens", handle.numTokens], ["topk", topkIdx.shape[1]!]] });
  const out = checkOptionalTensor(ctx, "out", opts.out, { dtype: "bf16", dims: [["numTokens", handle.numTokens], ["hidden", handle.hidden]] });
  return {
    x, topkIdx, topkWeights, handle,
    zeroCopy: checkBoolean(ctx, "zeroCopy", opts.zeroCopy),
    out,
    hook: checkBoolean(ctx, "hook", opts.hook),
    asyncFinish: checkBoolean(ctx, "asyncFinish", opts.asyncFinish),
    stream: checkStream(ctx, opts.stream),
  };
}
