// EpBuffer: the public API. One per rank; it validates every argument (lib/validate.ts), fills in
// defaults, then calls one backend (lib/backend/host.ts or lib/backend/cuda.ts). Method meanings
// follow DeepEP V1's `Buffer`; exact semantics: docs/ARCHITECTURE.md, "Semantics".

import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import type {
  Backend,
  BackendInit,
  CombineResult,
  CommConfig,
  DispatchHandle,
  DispatchLayout,
  DispatchResult,
  EventLike,
  LowLatencyCombineResult,
  LowLatencyDispatchResult,
  LowLatencyHandle,
} from "./backend/types.ts";
import type { Group } from "./group.ts";
import type { Stream } from "./stream.ts";
import { HostTensor, type Tensor } from "./tensor.ts";
import {
  checkClosed,
  checkHandle,
  checkInteger,
  checkKnownKeys,
  failArgument,
  type CheckContext,
} from "./validate.ts";
import {
  validateCombine,
  validateDispatch,
  validateLayout,
  validateLowLatencyCombine,
  validateLowLatencyDispatch,
  type BufferState,
} from "./validate.ts";

export type BackendChoice = "auto" | "cuda" | "host";

/** Options of `EpBuffer.create`. Only `group` is required. */
export interface EpBufferOptions {
  /** The rank group this buffer communicates over (TcpGroup, one LocalGroup member, or your own). Its rank and size are this buffer's. */
  group: Group;
  /**
   * "auto" (default): the CUDA backend when `build/libbun_ep.so` loads and this rank's CUDA device
   * exists on every rank (agreed through the group), else the host backend. "cuda" fails with the loader's reason when it cannot run. "host": CPU
   * memory, exchange through the group; needs no compiler or GPU. See `backendKind`.
   */
  backend?: BackendChoice;
  /** CUDA device ordinal for this rank's buffers and streams. Default: env BUN_EP_DEVICE, else 0. Ignored by the host backend. */
  device?: number;
  /** Bytes of the intranode (NVLink/IPC) buffer per rank, used by the normal kernels. Default 256 MiB; 0 = no normal kernels. */
  numNvlBytes?: number;
  /** Bytes of the NVSHMEM buffer per rank (internode normal kernels, low-latency kernels across hosts). Default 0. */
  numRdmaBytes?: number;
  /**
   * Sizes the low-latency buffers; required before calling lowLatencyDispatch, whose
   * maxTokensPerRank, hidden and numExperts must then equal these.
   */
  lowLatency?: { maxTokensPerRank: number; hidden: number; numExperts: number } | null;
  /** Every bounded wait (host and device) gives up after this many ms with an error naming the missing rank. Default 100000. */
  timeoutMs?: number;
  /** SMs the normal kernels use when no `config` is passed (even, >= 2). Default 20 (or the tuned table's). */
  numSMs?: number;
  /**
   * CUDA: the stream this rank's own compute runs on (DeepEP's "current stream"): every call is
   * ordered after the work already on it, and it waits for the call's result (unless asyncFinish);
   * fromHost/toHost use it. Default: a new stream per buffer (closed with it), exposed as
   * `buffer.stream`. Each rank MUST have its own: when several ranks of one process share one GPU,
   * a shared stream would queue rank 1's call behind rank 0's kernel, which spins waiting for
   * rank 1: a deadlock on the GPU. Ignored by the host backend.
   *
   * One process driving several ranks issues every rank's call before awaiting any, and prepares
   * every rank's inputs (fromHost, which synchronizes that rank's stream) before launching the
   * first rank's call of a collective.
   */
  stream?: Stream;
}

/** Options of `getDispatchLayout`. */
export interface LayoutOptions {
  /** The layout kernel first waits for this event (CUDA); the host backend synchronizes on it. */
  previousEvent?: EventLike | null;
  /** Return an event that completes with the layout instead of making the caller's stream wait. */
  asyncFinish?: boolean;
}

/** Options of `dispatch`. */
export interface DispatchOptions {
  /** bf16 [numTokens, hidden], or fp8_e4m3 [numTokens, hidden] together with `xScales`. */
  x: Tensor;
  /** f32 [numTokens, hidden / 128]: dequantization scale of each 128-channel group. Required with fp8 x, rejected with bf16 x. */
  xScales?: Tensor | null;
  /** i64 [numTokens, topk]: global expert ids, -1 = no expert. Required unless `handle` is given; rejected with it. */
  topkIdx?: Tensor | null;
  /** f32 [numTokens, topk]: router weights, sent along with the tokens (recvTopkWeights). Optional; rejected with `handle`. */
  topkWeights?: Tensor | null;
  /** Total experts (a multiple of numRanks); required when `layout` is omitted, else it must match the layout's. Rejected with `handle`. */
  numExperts?: number;
  /** From getDispatchLayout(topkIdx, numExperts) on this buffer; computed here when omitted. Rejected with `handle`. */
  layout?: DispatchLayout | null;
  /** A handle from an earlier dispatch of this buffer: a cached dispatch, replaying the same routing for a new x (no layout work, no host wait). */
  handle?: DispatchHandle | null;
  /** Round each local expert's received count up to a multiple of this (>= 1, default 1). Rejected with `handle`. */
  expertAlignment?: number;
  /**
   * > 0: receive tensors get exactly this many rows and the host never waits for the count (CUDA
   * graph capture). Too small is an error, never a truncation. Default 0 (exact size). Rejected with `handle`.
   */
  numWorstTokens?: number;
  /** Chunk sizes and SM budget; default `getDispatchConfig(numRanks)` with this buffer's numSMs. */
  config?: CommConfig;
  /** The dispatch first waits for this event. */
  previousEvent?: EventLike | null;
  /** Return the completion event instead of making the caller's stream wait. */
  asyncFinish?: boolean;
}

/** Options of `combine`. */
export interface CombineOptions {
  /** bf16 [numRecvRows, hidden]: one row per row dispatch received, in its order. */
  x: Tensor;
  /** The handle of the dispatch whose rows these are. */
  handle: DispatchHandle;
  /** f32 [numRecvRows, topk]: reduced like x (summed per home token) when given. */
  topkWeights?: Tensor | null;
  /** bf16 [numTokens, hidden] (one tensor or one or two in an array): added once per home token before the received rows. */
  bias?: Tensor | readonly Tensor[] | null;
  /** Default `getCombineConfig(numRanks)` with this buffer's numSMs. */
  config?: CommConfig;
  previousEvent?: EventLike | null;
  asyncFinish?: boolean;
}

/** Options of `lowLatencyDispatch`. */
export interface LowLatencyDispatchOptions {
  /** bf16 [numTokens, hidden], numTokens <= maxTokensPerRank, hidden = the buffer's lowLatency.hidden. */
  x: Tensor;
  /** i64 [numTokens, topk]: global expert ids, -1 = none. */
  topkIdx: Tensor;
  /** Slots per (local expert, source rank); must equal the buffer's lowLatency.maxTokensPerRank. */
  maxTokensPerRank: number;
  /** Must equal the buffer's lowLatency.numExperts. */
  numExperts: number;
  /** Send FP8 e4m3 with one scale per 128 channels instead of bf16. */
  useFp8?: boolean;
  /** fp8 only: round scales up to powers of two. */
  roundScale?: boolean;
  /** fp8 only (implies roundScale): scales as packed UE8M0 exponents, i32 [.., hidden / 512]. */
  useUe8m0?: boolean;
  /** i32 [numLocalExperts] on this buffer's device: received tokens per local expert are added to it. */
  cumulativeRecvStats?: Tensor | null;
  /** i64 [numRanks] on this buffer's device: ns this rank waited on each source rank are added to it. */
  waitStats?: Tensor | null;
  /** true: only the send step runs now; the result's hook() runs the receive step later. */
  hook?: boolean;
  asyncFinish?: boolean;
  /** CUDA stream to launch on (e.g. one being captured into a graph): a Stream or its handle. Default: the buffer's comm stream. Ignored by the host backend. */
  stream?: number | { readonly handle: number | bigint } | null;
}

/** Options of `lowLatencyCombine`. */
export interface LowLatencyCombineOptions {
  /** bf16 [numLocalExperts, numRanks * maxTokensPerRank, hidden]: expert outputs in dispatch's slot layout. */
  x: Tensor;
  /** i64 [numTokens, topk]: this rank's routing, as given to lowLatencyDispatch. */
  topkIdx: Tensor;
  /** f32 [numTokens, topk]: the weight of each expert's output. */
  topkWeights: Tensor;
  /** The handle of that lowLatencyDispatch. */
  handle: LowLatencyHandle;
  /** true: the expert outputs were written into getNextLowLatencyCombineBuffer(handle); x only gives the shape. */
  zeroCopy?: boolean;
  /** bf16 [numTokens, hidden]: written in place and returned as combinedX. */
  out?: Tensor | null;
  /** true: only the send step runs now; the result's hook() runs the receive (reduce) step. */
  hook?: boolean;
  asyncFinish?: boolean;
  /** CUDA stream to launch on; default the buffer's comm stream. Ignored by the host backend. */
  stream?: number | { readonly handle: number | bigint } | null;
}

// ---- configs: defaults per world size, and the tuned table hook ----

const DEFAULT_NUM_SMS = 20;

/**
 * Tuned table written by scripts/tune.ts: {"dispatch": {"<numRanks>": CommConfig}, "combine": {...}}.
 * Read once from env BUN_EP_TUNED_CONFIGS, else build/tuned-configs.json in the package, if present.
 */
export interface TunedConfigTable {
  dispatch?: Record<string, Partial<CommConfig>>;
  combine?: Record<string, Partial<CommConfig>>;
}

let tunedTable: TunedConfigTable | null | undefined;

/** Replace the tuned table (null: defaults only). Normally loaded from the file described above. */
export function setTunedConfigTable(table: TunedConfigTable | null): void {
  tunedTable = table;
}

export function tunedConfigPath(): string {
  return process.env.BUN_EP_TUNED_CONFIGS ?? join(import.meta.dir, "..", "build", "tuned-configs.json");
}

function loadTunedTable(): TunedConfigTable | null {
  if (tunedTable !== undefined) return tunedTable;
  const path = tunedConfigPath();
  tunedTable = null;
  if (existsSync(path)) {
    try {
      tunedTable = JSON.parse(readFileSync(path, "utf8")) as TunedConfigTable;
    } catch (e) {
      throw new Error(`tuned configs: ${path} is not valid JSON (${(e as Error).message}); fix or delete it`);
    }
  }
  return tunedTable;
}

function defaultConfig(kind: "dispatch" | "combine", numRanks: number, numSMs: number | undefined): CommConfig {
  // Fewer peers leave more ring room per peer, so each send step can carry more tokens.
  const base: CommConfig =
    kind === "dispatch"
      ? { numSMs: DEFAULT_NUM_SMS, nvlChunkedSendTokens: numRanks <= 2 ? 16 : 8, nvlChunkedRecvTokens: 256, rdmaChunkedSendTokens: 8, rdmaChunkedRecvTokens: 128 }
      : { numSMs: DEFAULT_NUM_SMS, nvlChunkedSendTokens: numRanks <= 2 ? 8 : 4, nvlChunkedRecvTokens: 256, rdmaChunkedSendTokens: 8, rdmaChunkedRecvTokens: 128 };
  const tuned = loadTunedTable()?.[kind]?.[String(numRanks)];
  const config = { ...base, ...tuned };
  if (numSMs !== undefined) config.numSMs = numSMs;
  return config;
}

// ---- the buffer ----

let nextBufferId = 1;

/** Whether "auto" can use CUDA: the native library loads and device `device` exists; else why not. */
async function probeCuda(device: number): Promise<{ ok: boolean; reason: string }> {
  try {
    const { nativeAvailability } = await import("./ffi.ts");
    const availability = nativeAvailability();
    if (!availability.ok) return { ok: false, reason: availability.reason };
    const { deviceCount } = await import("./stream.ts");
    const count = deviceCount();
    if (count <= device) return { ok: false, reason: count === 0 ? "no CUDA device" : `CUDA device ${device} does not exist (${count} devices)` };
    return { ok: true, reason: `CUDA device ${device} of ${count}` };
  } catch (e) {
    return { ok: false, reason: (e as Error).message };
  }
}

const CREATE_KEYS = ["group", "backend", "device", "numNvlBytes", "numRdmaBytes", "lowLatency", "timeoutMs", "numSMs", "stream"] as const;

export class EpBuffer {
  /** "cuda" or "host": the backend this buffer runs on. */
  readonly backendKind: "cuda" | "host";
  /** Why this backend was chosen (e.g. "auto: libbun_ep.so not found, using host"). */
  readonly backendReason: string;
  /** Unique in this process; handles carry it. */
  readonly bufferId: number;
  readonly group: Group;
  /** This buffer's device: "cpu" (host backend) or the CUDA ordinal. Every tensor argument must be on it. */
  readonly device: "cpu" | number;
  readonly lowLatencyConfig: { maxTokensPerRank: number; hidden: number; numExperts: number } | null;
  /** CUDA: this rank's compute stream (the `stream` option, or one made for this buffer); null on the host backend. */
  readonly stream: Stream | null;
  readonly #ownsStream: boolean;
  readonly #backend: Backend;
  #numSMs: number | undefined;
  #closed = false;

  private constructor(backend: Backend, init: BackendInit, reason: string, numSMs: number | undefined, stream: Stream | null, ownsStream: boolean) {
    this.#backend = backend;
    this.backendKind = backend.kind;
    this.backendReason = reason;
    this.bufferId = init.bufferId;
    this.group = init.group;
    this.device = backend.kind === "host" ? "cpu" : init.device;
    this.lowLatencyConfig = init.lowLatency;
    this.#numSMs = numSMs;
    this.stream = stream;
    this.#ownsStream = ownsStream;
  }

  /** Creates this rank's buffer (collective: every rank of the group calls it). */
  static async create(opts: EpBufferOptions): Promise<EpBuffer> {
    const ctx: CheckContext = { method: "EpBuffer.create", device: "cpu" };
    checkKnownKeys(ctx, "options", opts, CREATE_KEYS);
    const group = opts.group;
    if (typeof group !== "object" || group === null || typeof group.allGather !== "function") {
      failArgument(ctx, "group", `group must be a Group (TcpGroup, a LocalGroup member, or your own), got ${String(group)}`);
    }
    const choice = opts.backend ?? "auto";
    if (choice !== "auto" && choice !== "cuda" && choice !== "host") {
      failArgument(ctx, "backend", `backend must be "auto", "cuda" or "host", got ${JSON.stringify(choice)}`);
    }
    const envDevice = process.env.BUN_EP_DEVICE;
    const device = checkInteger(ctx, "device", opts.device ?? (envDevice !== undefined ? Number(envDevice) : 0), 0);
    const numNvlBytes = checkInteger(ctx, "numNvlBytes", opts.numNvlBytes ?? 256 * 1024 * 1024, 0);
    const numRdmaBytes = checkInteger(ctx, "numRdmaBytes", opts.numRdmaBytes ?? 0, 0);
    const timeoutMs = checkInteger(ctx, "timeoutMs", opts.timeoutMs ?? 100_000, 1);
    const numSMs = opts.numSMs === undefined ? undefined : checkNumSMs(ctx, opts.numSMs);
    let lowLatency: BackendInit["lowLatency"] = null;
    if (opts.lowLatency !== undefined && opts.lowLatency !== null) {
      checkKnownKeys(ctx, "lowLatency", opts.lowLatency, ["maxTokensPerRank", "hidden", "numExperts"]);
      const ll = opts.lowLatency;
      lowLatency = {
        maxTokensPerRank: checkInteger(ctx, "lowLatency.maxTokensPerRank", ll.maxTokensPerRank, 1),
        hidden: checkInteger(ctx, "lowLatency.hidden", ll.hidden, 1),
        numExperts: checkInteger(ctx, "lowLatency.numExperts", ll.numExperts, 1),
      };
      if (lowLatency.numExperts % group.size !== 0) {
        failArgument(ctx, "lowLatency.numExperts", `lowLatency.numExperts must be a multiple of numRanks = ${group.size}, got ${lowLatency.numExperts}`);
      }
    }
    const init: BackendInit = { group, bufferId: nextBufferId++, device, numNvlBytes, numRdmaBytes, lowLatency, timeoutMs };

    let kind: "cuda" | "host";
    let reason: string;
    if (choice === "host") {
      kind = "host";
      reason = "requested";
    } else {
      let probe = await probeCuda(device);
      if (choice === "cuda" && !probe.ok) {
        failArgument(ctx, "backend", `backend "cuda" cannot run here: ${probe.reason}`);
      }
      if (choice === "auto") {
        // Every rank must pick the same backend: CUDA only if it works on all of them.
        const votes = await group.allGather(new TextEncoder().encode(probe.ok ? "" : firstLine(probe.reason)));
        const failed = votes.findIndex((v) => v.byteLength > 0);
        if (probe.ok && failed >= 0) probe = { ok: false, reason: `rank ${failed}: ${new TextDecoder().decode(votes[failed])}` };
      }
      kind = probe.ok ? "cuda" : "host";
      reason = choice === "cuda" ? `requested: ${probe.reason}` : probe.ok ? `auto: ${probe.reason}` : `auto: no CUDA (${firstLine(probe.reason)}); using host`;
    }
    let backend: Backend;
    let stream: Stream | null = null;
    let ownsStream = false;
    if (kind === "cuda") {
      // Imported lazily so that the host path never loads the native library.
      const { Stream: StreamClass } = await import("./stream.ts");
      if (opts.stream !== undefined) {
        if (!(opts.stream instanceof StreamClass) || opts.stream.device !== device) {
          failArgument(ctx, "stream", `stream must be a Stream of device ${device}, got ${opts.stream instanceof StreamClass ? `one of device ${opts.stream.device}` : String(opts.stream)}`);
        }
        stream = opts.stream;
      } else {
        stream = StreamClass.create({ device });
        ownsStream = true;
      }
      const { createCudaBackend } = await import("./backend/cuda.ts");
      try {
        backend = await createCudaBackend({ ...init, computeStream: stream.handle });
      } catch (e) {
        if (ownsStream) stream.close();
        throw e;
      }
    } else {
      const { createHostBackend } = await import("./backend/host.ts");
      backend = await createHostBackend(init);
    }
    return new EpBuffer(backend, init, reason, numSMs, stream, ownsStream);
  }

  /** This rank, 0 <= rank < numRanks. */
  get rank(): number {
    return this.#backend.rank;
  }
  get numRanks(): number {
    return this.#backend.numRanks;
  }
  get closed(): boolean {
    return this.#closed;
  }

  #state(method: string): BufferState {
    const ctx: CheckContext = { method, device: this.device };
    checkClosed(ctx, this.#closed);
    return { ctx, bufferId: this.bufferId, rank: this.rank, numRanks: this.numRanks, lowLatency: this.lowLatencyConfig };
  }

  // ---- configs ----

  /** Default dispatch config for a world size (tuned table when present). `numSMs` overrides its SM budget. */
  static getDispatchConfig(numRanks: number, numSMs?: number): CommConfig {
    return defaultConfig("dispatch", numRanks, numSMs);
  }
  /** Default combine config for a world size (tuned table when present). */
  static getCombineConfig(numRanks: number, numSMs?: number): CommConfig {
    return defaultConfig("combine", numRanks, numSMs);
  }
  /** SM budget of this buffer's default configs (even, >= 2). */
  setNumSMs(numSMs: number): void {
    this.#numSMs = checkNumSMs({ method: "setNumSMs", device: this.device }, numSMs);
  }
  /** This buffer's default dispatch config. */
  getDispatchConfig(): CommConfig {
    return defaultConfig("dispatch", this.numRanks, this.#numSMs);
  }
  /** This buffer's default combine config. */
  getCombineConfig(): CommConfig {
    return defaultConfig("combine", this.numRanks, this.#numSMs);
  }

  // ---- normal kernels ----

  /**
   * Tokens per rank and per expert and the token-to-rank map of this rank's routing.
   * `topkIdx`: i64 [numTokens, topk], -1 = none. `numExperts`: a multiple of numRanks.
   */
  getDispatchLayout(topkIdx: Tensor, numExperts: number, opts: LayoutOptions = {}): DispatchLayout {
    const state = this.#state("getDispatchLayout");
    const v = validateLayout(state, topkIdx, numExperts, opts);
    return this.#backend.getDispatchLayout(v.topkIdx, v.numExperts, v.previousEvent, v.asyncFinish);
  }

  /**
   * Sends each token to the ranks holding its experts (collective). Receive rows are grouped by
   * source rank, source order kept. Resolves when the receive tensors are sized (no wait with
   * numWorstTokens or a handle).
   */
  dispatch(opts: DispatchOptions): Promise<DispatchResult> {
    try {
      const state = this.#state("dispatch");
      const { numExperts, ...args } = validateDispatch(state, opts, this.getDispatchConfig());
      if (args.handle === null && args.layout === null) {
        // The backend always gets a layout for a fresh dispatch; this one waits on previousEvent.
        args.layout = this.#backend.getDispatchLayout(args.topkIdx!, numExperts, args.previousEvent, false);
        args.previousEvent = null;
      }
      return this.#backend.dispatch(args);
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /** Sends expert outputs back to each token's home rank and sums them there (collective). */
  combine(opts: CombineOptions): Promise<CombineResult> {
    try {
      const state = this.#state("combine");
      const args = validateCombine(state, opts, this.getCombineConfig());
      return this.#backend.combine(args);
    } catch (e) {
      return Promise.reject(e);
    }
  }

  // ---- low-latency kernels ----

  /** Sends one copy of each token per selected expert into the experts' slots (collective). */
  lowLatencyDispatch(opts: LowLatencyDispatchOptions): Promise<LowLatencyDispatchResult> {
    try {
      const state = this.#state("lowLatencyDispatch");
      return this.#backend.lowLatencyDispatch(validateLowLatencyDispatch(state, opts));
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /** Weighted sum of each token's expert outputs on its home rank (collective). */
  lowLatencyCombine(opts: LowLatencyCombineOptions): Promise<LowLatencyCombineResult> {
    try {
      const state = this.#state("lowLatencyCombine");
      return this.#backend.lowLatencyCombine(validateLowLatencyCombine(state, opts));
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /** bf16 [numLocalExperts, numRanks * maxTokensPerRank, hidden]: write expert outputs here, then combine with zeroCopy. */
  getNextLowLatencyCombineBuffer(handle: LowLatencyHandle): Tensor {
    const state = this.#state("getNextLowLatencyCombineBuffer");
    checkHandle(state.ctx, "handle", handle, "low_latency", this.bufferId);
    return this.#backend.getNextLowLatencyCombineBuffer(handle);
  }

  /** Resets the low-latency buffers (collective). Needed after a failed or abandoned call. */
  cleanLowLatencyBuffer(): Promise<void> {
    try {
      const state = this.#state("cleanLowLatencyBuffer");
      if (state.lowLatency === null) {
        failArgument(state.ctx, "lowLatency", "this buffer has no low-latency buffers; pass lowLatency to EpBuffer.create");
      }
      return this.#backend.cleanLowLatencyBuffer();
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /**
   * Declares ranks dead (false) or alive (true), one entry per rank; the low-latency kernels
   * neither send to nor wait for dead ranks, and their experts contribute nothing. Every live rank
   * should pass the same mask. (Host backend: a dead rank's process must still make the calls, as
   * the exchange is a group collective; its data is ignored.)
   */
  setRankMask(alive: readonly boolean[]): void {
    const state = this.#state("setRankMask");
    if (!Array.isArray(alive) || alive.length !== this.numRanks || !alive.every((a) => typeof a === "boolean")) {
      failArgument(state.ctx, "alive", `alive must be boolean[numRanks] = boolean[${this.numRanks}], got ${Array.isArray(alive) ? `an array of ${alive.length}` : String(alive)}`);
    }
    this.#backend.setRankMask(alive);
  }

  // ---- tensors ----

  /** A tensor on this buffer's device with the contents of `t` (a copy for CUDA; the host backend copies too). */
  fromHost(t: HostTensor): Tensor {
    this.#state("fromHost");
    return this.#backend.fromHost(t);
  }
  /** A host copy of any tensor of this buffer's device (synchronous). */
  toHost(t: Tensor): HostTensor {
    this.#state("toHost");
    return this.#backend.toHost(t);
  }

  /**
   * Uninitialised tensors for a combine input that peers can read in place: write the expert outputs
   * (bf16 [rows, hidden]) and, when `topk` > 0, the weights (f32 [rows, topk]) into them, then pass
   * them to combine(): the home ranks pull the rows directly (CUDA: the tensors lie in this rank's
   * registered buffer; about half the memory traffic of the default push). A dispatch output used as
   * combine input gets the same benefit without this call. Falls back to ordinary tensors when the
   * buffer is full. Free them with free() like any tensor; they become invalid when the buffer closes.
   */
  allocCombineInput(rows: number, hidden: number, topk = 0): { x: Tensor; topkWeights: Tensor | null } {
    const state = this.#state("allocCombineInput");
    checkInteger(state.ctx, "rows", rows, 0);
    checkInteger(state.ctx, "hidden", hidden, 1);
    checkInteger(state.ctx, "topk", topk, 0);
    const alloc = (dtype: "bf16" | "f32", shape: number[]): Tensor =>
      this.#backend.allocPeerReadable?.(dtype, shape) ?? this.#backend.fromHost(HostTensor.zeros(dtype, shape));
    return { x: alloc("bf16", [rows, hidden]), topkWeights: topk > 0 ? alloc("f32", [rows, topk]) : null };
  }

  // ---- lifetime ----

  /** Frees the buffers and connections. Later calls throw. Idempotent. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    try {
      await this.#backend.close();
    } finally {
      if (this.#ownsStream) this.stream?.close();
    }
  }
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
  /** Starts closing; use `await using` (asyncDispose) to wait for it. */
  [Symbol.dispose](): void {
    void this.close();
  }
}

function firstLine(text: string): string {
  return text.split("\n")[0] ?? text;
}

function checkNumSMs(ctx: CheckContext, value: unknown): number {
  const n = checkInteger(ctx, "numSMs", value, 2);
  if (n % 2 !== 0) failArgument(ctx, "numSMs", `numSMs must be even (one sending and one receiving SM per channel), got ${n}`);
  return n;
}

