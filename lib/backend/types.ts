// The one interface both backends implement (host: lib/backend/host.ts, cuda: lib/backend/cuda.ts),
// and the argument/result types of the public EpBuffer API (lib/buffer.ts). EpBuffer validates
// every argument (lib/validate.ts) before a backend sees it, so backends may assume well-formed
// input: shapes, dtypes, devices and ranges are already checked.
//
// Exact semantics of every call: docs/ARCHITECTURE.md, "Semantics"; executable spec:
// lib/reference.ts.

import type { Group } from "../group.ts";
import type { Tensor } from "../tensor.ts";

/** What EpBuffer needs of a completion event. CUDA: lib/stream.ts `Event`; host: none (null). */
export interface EventLike {
  /** Make `stream` (a CUDA stream handle, 0 = legacy default) wait for this event. */
  waitOn(stream: number): void;
  /** Block the host until the event completes. */
  synchronize(): void;
}

/** Chunk sizes and SM budget of the normal kernels (DeepEP's `Config`). */
export interface CommConfig {
  /** SMs the normal kernels may use (even; channels = numSMs / 2). */
  numSMs: number;
  /** Tokens a sender moves per step into a peer's ring. */
  nvlChunkedSendTokens: number;
  /** Ring capacity per (channel, peer), in tokens. */
  nvlChunkedRecvTokens: number;
  /** Same for the RDMA leg of the internode kernels. */
  rdmaChunkedSendTokens: number;
  rdmaChunkedRecvTokens: number;
}

export interface DispatchLayout {
  /** i32 [numRanks]: tokens of this rank that go to each rank (a token counts once per rank). */
  numTokensPerRank: Tensor;
  /** i32 [numNodes] for the internode kernels (tokens per node), else null. */
  numTokensPerRdmaRank: Tensor | null;
  /** i32 [numExperts]: (token, k) pairs of this rank routed to each expert. */
  numTokensPerExpert: Tensor;
  /** u8 [numTokens, numRanks]: 1 when the token has at least one expert on that rank. */
  isTokenInRank: Tensor;
  event: EventLike | null;
}

/** Opaque: returned by dispatch, passed back to combine and to a cached dispatch. */
export interface DispatchHandle {
  readonly kind: "normal";
  /** Id of the EpBuffer that made it; another buffer rejects it. */
  readonly bufferId: number;
  /** Tokens of this rank at dispatch time ([T] of x). */
  readonly numTokens: number;
  readonly hidden: number;
  /** Rows received by this rank, or null when only numWorstTokens is known (no host wait). */
  readonly numRecvTokens: number | null;
  /** Rows of the receive tensors (numRecvTokens, or numWorstTokens). */
  readonly numRecvRows: number;
  /** Backend-private data. */
  readonly data: unknown;
}

export interface DispatchArgs {
  /** bf16 [T, H], or fp8_e4m3 [T, H] with xScales. */
  x: Tensor;
  /** f32 [T, H/128]: dequantization scale of each 128-channel group (fp8 only). */
  xScales: Tensor | null;
  /** i64 [T, K]: global expert ids, -1 = none. Null for a cached dispatch. */
  topkIdx: Tensor | null;
  /** f32 [T, K]. Null for a cached dispatch or when weights are not needed. */
  topkWeights: Tensor | null;
  /** From getDispatchLayout. Always set for a fresh dispatch (EpBuffer computes it when the caller did not); null with a handle. */
  layout: DispatchLayout | null;
  /** A handle from an earlier dispatch of this buffer: replay its routing with new x. */
  handle: DispatchHandle | null;
  /** Round each per-expert received count up to this multiple (>= 1). */
  expertAlignment: number;
  /** > 0: size the outputs for this many rows and never wait on the host. 0: exact size. */
  numWorstTokens: number;
  config: CommConfig;
  previousEvent: EventLike | null;
  asyncFinish: boolean;
}

export interface DispatchResult {
  /** [numRecvRows, H], same dtype as x. Rows past numRecvTokens are unspecified. */
  recvX: Tensor;
  /** f32 [numRecvRows, H/128] for fp8 x, else null. */
  recvXScales: Tensor | null;
  /** i64 [numRecvRows, K]: local expert ids (global - rank * numLocalExperts), -1 when not local. Null when cached. */
  recvTopkIdx: Tensor | null;
  /** f32 [numRecvRows, K]: the weight where the expert is local, 0 elsewhere. Null when cached or not given. */
  recvTopkWeights: Tensor | null;
  /** Per local expert, tokens received (rounded up to expertAlignment); null when the host did not wait or cached. */
  numRecvTokensPerExpert: number[] | null;
  /** i32 [numLocalExperts] on the backend's device: the same counts, always present (also with numWorstTokens). */
  recvCountPerExpert: Tensor;
  numRecvTokens: number | null;
  handle: DispatchHandle;
  event: EventLike | null;
}

export interface CombineArgs {
  /** bf16 [numRecvRows, H]: one row per received token, in dispatch's receive order. */
  x: Tensor;
  handle: DispatchHandle;
  /** f32 [numRecvRows, K]: reduced like x (summed over ranks) when given. */
  topkWeights: Tensor | null;
  /** bf16 [T, H] each, added once per home token: zero, one or two tensors. */
  biases: Tensor[];
  config: CommConfig;
  previousEvent: EventLike | null;
  asyncFinish: boolean;
}

export interface CombineResult {
  /** bf16 [T, H] on each token's home rank. */
  combinedX: Tensor;
  /** f32 [T, K] when topkWeights was given, else null. */
  combinedTopkWeights: Tensor | null;
  event: EventLike | null;
}

/** Opaque: returned by lowLatencyDispatch, passed to lowLatencyCombine. */
export interface LowLatencyHandle {
  readonly kind: "low_latency";
  readonly bufferId: number;
  readonly numTokens: number;
  readonly maxTokensPerRank: number;
  readonly hidden: number;
  readonly numExperts: number;
  /** i32 [numLocalExperts, numRanks * maxTokensPerRank]: source token index of each valid slot. */
  readonly srcTokenIdx: Tensor;
  /** i32 [numLocalExperts, numRanks, 2]: (begin slot, count) of each source rank's tokens per local expert. */
  readonly layoutRange: Tensor;
  /** Which of the two alternating low-latency buffers this call used. */
  readonly bufferParity: 0 | 1;
  readonly data: unknown;
}

export interface LowLatencyDispatchArgs {
  /** bf16 [T, H], T <= maxTokensPerRank. */
  x: Tensor;
  /** i64 [T, K]. */
  topkIdx: Tensor;
  maxTokensPerRank: number;
  numExperts: number;
  useFp8: boolean;
  /** fp8 only: scales rounded up to powers of two. */
  roundScale: boolean;
  /** fp8 only (implies roundScale): scales as packed UE8M0 exponents. */
  useUe8m0: boolean;
  /** i32 [numLocalExperts], added to: cumulative received tokens per local expert. */
  cumulativeRecvStats: Tensor | null;
  /** i64 [numRanks], added to: time (ns) this rank waited on each source rank. */
  waitStats: Tensor | null;
  /** true: launch only the send step now; the receive step runs when hook() is called. */
  hook: boolean;
  asyncFinish: boolean;
  /** CUDA stream (handle) the kernels are launched on, e.g. one being captured into a graph; null = the buffer's comm stream. */
  stream: number | null;
}

export interface LowLatencyDispatchResult {
  /** [numLocalExperts, numRanks * maxTokensPerRank, H]: bf16, or fp8_e4m3 with recvXScales. */
  recvX: Tensor;
  /** f32 [El, R*M, H/128], or i32 [El, R*M, H/512] packed UE8M0 (byte j of word i = group 4i+j). */
  recvXScales: Tensor | null;
  /** i32 [numLocalExperts]: valid slots per local expert (slots 0..count-1). */
  recvCount: Tensor;
  handle: LowLatencyHandle;
  event: EventLike | null;
  /** Runs the receive step (a no-op when hook was false). Call it exactly once. */
  hook: () => void;
}

export interface LowLatencyCombineArgs {
  /** bf16 [numLocalExperts, numRanks * maxTokensPerRank, H]: expert outputs in dispatch's slot layout. */
  x: Tensor;
  /** i64 [T, K] and f32 [T, K]: this rank's (home) routing, as given to lowLatencyDispatch. */
  topkIdx: Tensor;
  topkWeights: Tensor;
  handle: LowLatencyHandle;
  /** true: x already sits in getNextLowLatencyCombineBuffer(handle); skip the local copy. */
  zeroCopy: boolean;
  /** bf16 [T, H] written in place when given. */
  out: Tensor | null;
  hook: boolean;
  asyncFinish: boolean;
  /** CUDA stream (handle) to launch on; null = the buffer's comm stream. */
  stream: number | null;
}

export interface LowLatencyCombineResult {
  /** bf16 [T, H]. */
  combinedX: Tensor;
  event: EventLike | null;
  hook: () => void;
}

export interface BackendInit {
  group: Group;
  /** Unique per EpBuffer in this process; handles carry it. */
  bufferId: number;
  /** CUDA device ordinal (ignored by the host backend). */
  device: number;
  /** Bytes of the intranode (NVLink/IPC) buffer per rank; 0 = no normal kernels. */
  numNvlBytes: number;
  /** Bytes of the NVSHMEM buffer per rank; 0 = no internode/NVSHMEM. */
  numRdmaBytes: number;
  /** Set when the low-latency kernels are wanted: sizes their buffers. */
  lowLatency: { maxTokensPerRank: number; hidden: number; numExperts: number } | null;
  /** Every bounded wait (host and device) gives up after this long, naming the missing rank. */
  timeoutMs: number;
  /**
   * CUDA stream handle of this rank's compute ("current") stream: calls are ordered after it and it
   * after them (unless asyncFinish), and fromHost/toHost run on it. Each rank needs its own: ranks of
   * one process on one GPU that shared a stream would make each rank's kernel wait behind another's
   * spinning kernel (see lib/buffer.ts, EpBufferOptions.stream). Null or absent: the CUDA backend
   * makes its own. Ignored by the host backend.
   */
  computeStream?: number | null;
}

export interface Backend {
  readonly kind: "cuda" | "host";
  readonly rank: number;
  readonly numRanks: number;
  getDispatchLayout(topkIdx: Tensor, numExperts: number, previousEvent: EventLike | null, asyncFinish: boolean): DispatchLayout;
  dispatch(args: DispatchArgs): Promise<DispatchResult>;
  combine(args: CombineArgs): Promise<CombineResult>;
  lowLatencyDispatch(args: LowLatencyDispatchArgs): Promise<LowLatencyDispatchResult>;
  lowLatencyCombine(args: LowLatencyCombineArgs): Promise<LowLatencyCombineResult>;
  /** bf16 [El, R*M, H]: where expert outputs go for a zero-copy lowLatencyCombine with this handle. */
  getNextLowLatencyCombineBuffer(handle: LowLatencyHandle): Tensor;
  /** Reset the low-latency buffers (collective). */
  cleanLowLatencyBuffer(): Promise<void>;
  /** Ranks marked false are dead: no one sends to or waits for them (low-latency kernels). */
  setRankMask(alive: readonly boolean[]): void;
  /** Make a tensor on this backend's device from host data (tests, demo). */
  fromHost(t: import("../tensor.ts").HostTensor): Tensor;
  /** Copy any tensor of this backend to the host (synchronous). */
  toHost(t: Tensor): import("../tensor.ts").HostTensor;
  /**
   * An uninitialised tensor that peers can read directly (CUDA: in this rank's registered buffer, so
   * a combine whose x lives there lets home ranks pull the rows instead of having them pushed), or an
   * ordinary tensor when it does not fit. Absent on backends without such memory.
   */
  allocPeerReadable?(dtype: "bf16" | "f32", shape: readonly number[]): Tensor;
  close(): Promise<void>;
}
