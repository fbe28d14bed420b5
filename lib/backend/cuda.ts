// The CUDA backend: one per rank. Owns the rank's comm stream, its registered (IPC) buffer for the
// normal kernels (allocated once here, peers' pointers exchanged through the group), a mapped pinned
// record the kernels write for the host (receive counts, errors), and delegates the low-latency
// calls to the LowLatencyEngine (lib/backend/cuda_ll.ts) when `init.lowLatency` is set.
//
// Streams: every call is ordered after the rank's compute stream (init.computeStream, one per rank:
// ranks of one process on one GPU must not share it) and the compute stream after the call.
//
// The registered buffer: [control | staging area | arena]. The arena (class Arena below) holds the
// receive tensors of dispatch when they fit, so peers store rows straight into them (no staging
// copy), and combine inputs that home ranks pull from (a dispatch output, or allocPeerReadable).
// Arena tensors are returned to the arena by free(); they are invalid once the backend is closed.
//
// Normal-kernel protocol and buffer layout: cuda/include/bun_ep_normal.h. Every collective call
// takes the next `seq` (same on every rank because every rank makes the same calls in the same
// order); the kernels' flags carry it, so nothing is ever reset between calls.
//
// dispatch() submits its notify step before its first `await`, so one process driving several
// ranks issues every rank's calls first and then awaits them together. The ranks of one process on
// one device run each normal kernel as ONE launch (class LaunchBatch): it starts when the last of
// them has submitted, so no rank's kernel can be stuck in a hardware queue behind another's.

import { BunEpError, check, native, Status } from "../ffi.ts";
import {
  NORMAL_CONTROL_BYTES,
  NORMAL_HOST_RECORD_BYTES,
  NORMAL_MAX_CHANNELS,
  NORMAL_MAX_RANKS,
  NORMAL_WORKSPACE_BYTES,
  Rec,
} from "../native/normal.ts";
import { Event, Stream, withDevice } from "../stream.ts";
import type { DType } from "../dtype.ts";
import { DeviceTensor, HostTensor, PinnedTensor, type Tensor } from "../tensor.ts";
import { CommOrder, notifyTimeoutError, pollNotify, ptrOf, recordedError, StructWriter } from "./cuda_common.ts";
import { exchangePeerPointers, PeerBuffer, type PeerPointers } from "./cuda_peers.ts";
import type { InternodeEngine } from "./cuda_internode.ts";
import type {
  Backend,
  BackendInit,
  CombineArgs,
  CombineResult,
  DispatchArgs,
  DispatchHandle,
  DispatchLayout,
  DispatchResult,
  EventLike,
  LowLatencyCombineArgs,
  LowLatencyCombineResult,
  LowLatencyDispatchArgs,
  LowLatencyDispatchResult,
  LowLatencyHandle,
} from "./types.ts";

/** What this backend needs of H6's engine (lib/backend/cuda_ll.ts). */
interface LowLatencyEngineLike {
  dispatch(args: LowLatencyDispatchArgs): Promise<LowLatencyDispatchResult>;
  combine(args: LowLatencyCombineArgs): Promise<LowLatencyCombineResult>;
  getNextCombineBuffer(handle: LowLatencyHandle): Tensor;
  clean(): Promise<void>;
  setRankMask(alive: readonly boolean[]): void;
  close(): Promise<void>;
}
interface LowLatencyModule {
  LowLatencyEngine: { create(opts: { init: BackendInit; commStream: number }): Promise<LowLatencyEngineLike> };
}

export async function createCudaBackend(init: BackendInit): Promise<Backend> {
  return CudaBackend.create(init);
}

/** Backend-private part of a normal DispatchHandle. */
interface CudaHandleData {
  /** bun_ep_normal_handle_bytes(numTokens, numRanks) bytes: offsets and homeSlot (see the header). */
  handleMem: DeviceTensor<"i32">;
  recvCountPerExpert: DeviceTensor<"i32">;
  numChannels: number;
  numExperts: number;
  topk: number;
  xDType: "bf16" | "fp8_e4m3";
}

/** Receive tensors of one dispatch, and whether they lie in the arena (senders write them directly). */
interface RecvTensors {
  recvX: DeviceTensor;
  recvXScales: DeviceTensor | null;
  recvTopkIdx: DeviceTensor | null;
  recvTopkWeights: DeviceTensor | null;
  direct: boolean;
}

/** Fields of bunEpNormalComm_t: rank, numRanks, peerBuffers[8], bufferBytes, hostRecord, workspace, timeoutNs, seq, stream. */
const COMM_FIELDS = 2 + NORMAL_MAX_RANKS + 6;

/** Share of the registered buffer after the control region that is staging area; the rest is the arena. */
const STAGING_SHARE = 0.5;
const ARENA_ALIGN = 256;

/**
 * First-fit allocator over the arena part of the registered buffer (byte offsets). A freed block is
 * reused only after the work that may still use it: free() records an event on the freeing stream,
 * and the next allocation makes the comm and compute streams wait for it (no host wait). Peers only
 * write into a block during a call whose kernel this rank's comm stream has started, so that order
 * covers them too.
 */
class Arena {
  readonly begin: number;
  readonly end: number;
  /** Free blocks, sorted by offset, never adjacent (coalesced). */
  #free: { offset: number; bytes: number }[];
  #pending: { offset: number; bytes: number; event: Event }[] = [];
  #warnedFull = false;

  constructor(begin: number, end: number) {
    this.begin = begin;
    this.end = end;
    this.#free = end > begin ? [{ offset: begin, bytes: end - begin }] : [];
  }

  /** Offset of `bytes` free bytes, or null when they do not fit. `orderAfterFrees` gets the pending frees' events. */
  alloc(bytes: number, orderAfterFrees: (event: Event) => void): number | null {
    const size = Math.max(ARENA_ALIGN, Math.ceil(bytes / ARENA_ALIGN) * ARENA_ALIGN);
    if (this.#pending.length > 0) {
      for (const p of this.#pending) {
        orderAfterFrees(p.event);
        p.event.close();
        this.#insertFree(p.offset, p.bytes);
      }
      this.#pending = [];
    }
    const i = this.#free.findIndex((b) => b.bytes >= size);
    if (i < 0) return null;
    const block = this.#free[i]!;
    const offset = block.offset;
    if (block.bytes === size) this.#free.splice(i, 1);
    else this.#free[i] = { offset: offset + size, bytes: block.bytes - size };
    return offset;
  }

  /** Return a block once the work recorded by `event` is done. */
  release(offset: number, bytes: number, event: Event): void {
    const size = Math.max(ARENA_ALIGN, Math.ceil(bytes / ARENA_ALIGN) * ARENA_ALIGN);
    this.#pending.push({ offset, bytes: size, event });
  }

  /** True the first time only: the caller warns that outputs are not being freed. */
  noteFull(): boolean {
    if (this.#warnedFull) return false;
    this.#warnedFull = true;
    return true;
  }

  close(): void {
    for (const p of this.#pending) p.event.close();
    this.#pending = [];
  }

  #insertFree(offset: number, bytes: number): void {
    const list = this.#free;
    let i = 0;
    while (i < list.length && list[i]!.offset < offset) i++;
    list.splice(i, 0, { offset, bytes });
    // Coalesce with the next, then with the previous block.
    const next = list[i + 1];
    if (next !== undefined && offset + bytes === next.offset) {
      list[i] = { offset, bytes: bytes + next.bytes };
      list.splice(i + 1, 1);
    }
    const prev = list[i - 1];
    const cur = list[i]!;
    if (prev !== undefined && prev.offset + prev.bytes === cur.offset) {
      list[i - 1] = { offset: prev.offset, bytes: prev.bytes + cur.bytes };
      list.splice(i, 1);
    }
  }
}

type NormalKernel = "notify" | "dispatch" | "combine";

interface PendingLaunch {
  kind: NormalKernel;
  structs: Map<number, BigInt64Array>;
  /** Each non-leading rank's comm stream position when it submitted. */
  events: Map<number, Event>;
  waiters: { rank: number; resolve: () => void; reject: (err: Error) => void }[];
  timer: ReturnType<typeof setTimeout>;
}

/**
 * Runs each notify/dispatch/combine of the ranks of this process on one device (of one group) as ONE
 * kernel launch. Why: those kernels wait on each other, so every rank's must run at once. As separate
 * launches on separate streams that held only by luck: streams share a few hardware queues (fewer
 * under MPS), so a rank's kernel could queue behind a peer's spinning kernel, or behind a compute
 * stream's wait on it, and never start (batch 2: 3+ ranks in one process timed out at their first
 * dispatch). Now no command of this process can wait on a normal kernel that is not yet launched, and
 * a launched one needs nothing else of this process to make progress: its peers are in the same grid
 * (sized to be resident at once, checked natively) or in other processes / on other devices.
 *
 * Each rank submits its argument struct for call `seq`; the last to arrive launches for all on the
 * first rank's comm stream, after the others' comm streams (events), and the others' comm streams
 * then wait for it. One rank alone launches at once, synchronously. A rank that never submits fails
 * the others after timeoutMs, naming it.
 */
class LaunchBatch {
  static readonly #byKey = new Map<string, LaunchBatch>();
  /**
   * Per group (key: the same-process ranks' buffer pointers), the ranks of this process whose launch
   * waits, or waited until it expired, for ranks of the same batch that never submitted. A peer on
   * another device then times out naming the held-back rank; its error says why (held.get(rank)).
   */
  static readonly #held = new Map<string, Map<number, () => readonly number[]>>();
  readonly key: string;
  readonly groupKey: string;
  readonly device: number;
  /** Group ranks of this batch, ascending: entry i of the native call is ranks[i]. */
  readonly ranks: readonly number[];
  readonly #streams = new Map<number, Stream>();
  readonly #pending = new Map<number, PendingLaunch>();

  private constructor(key: string, groupKey: string, device: number, ranks: readonly number[]) {
    this.key = key;
    this.groupKey = groupKey;
    this.device = device;
    this.ranks = ranks;
  }

  /**
   * Why rank `who` of this process (group `groupKey`) never arrived, when its launch is held back by
   * a missing rank of its batch: " (rank 0 is held back: ...)", else "".
   */
  static heldBackReason(groupKey: string, who: number): string {
    const missing = LaunchBatch.#held.get(groupKey)?.get(who)?.() ?? [];
    if (missing.length === 0) return "";
    return ` (rank ${who} runs in one launch with rank ${missing.join(", rank ")} of the same process on its device, which never made the call)`;
  }

  /** The batch of `ranks` (this process, this device); every member calls it with the same key. */
  static join(key: string, groupKey: string, device: number, ranks: readonly number[], rank: number, commStream: Stream): LaunchBatch {
    let batch = LaunchBatch.#byKey.get(key);
    if (batch === undefined) {
      batch = new LaunchBatch(key, groupKey, device, ranks);
      LaunchBatch.#byKey.set(key, batch);
    }
    batch.#streams.set(rank, commStream);
    return batch;
  }

  leave(rank: number): void {
    this.#streams.delete(rank);
    const held = LaunchBatch.#held.get(this.groupKey);
    held?.delete(rank);
    if (held?.size === 0) LaunchBatch.#held.delete(this.groupKey);
    if (this.#streams.size === 0 && LaunchBatch.#byKey.get(this.key) === this) LaunchBatch.#byKey.delete(this.key);
  }

  submit(rank: number, seq: number, kind: NormalKernel, struct: BigInt64Array, timeoutMs: number): Promise<void> {
    if (this.ranks.length === 1) {
      try {
        this.#run(kind, seq, struct);
        return Promise.resolve();
      } catch (err) {
        return Promise.reject(err);
      }
    }
    let pending = this.#pending.get(seq);
    if (pending === undefined) {
      const created: PendingLaunch = {
        kind,
        structs: new Map(),
        events: new Map(),
        waiters: [],
        timer: setTimeout(() => this.#expire(seq, created, timeoutMs), timeoutMs),
      };
      pending = created;
      this.#pending.set(seq, pending);
    }
    if (pending.kind !== kind || pending.structs.has(rank)) {
      return Promise.reject(new Error(`internal: rank ${rank} submitted ${kind} for call ${seq}, which is a ${pending.kind} already submitted by ranks [${[...pending.structs.keys()]}]`));
    }
    const stream = this.#streams.get(rank);
    if (stream === undefined) return Promise.reject(new Error(`internal: rank ${rank} is not in this launch batch`));
    if (rank !== this.ranks[0]) pending.events.set(rank, Event.create({ device: this.device }).record(stream));
    pending.structs.set(rank, struct);
    const held = LaunchBatch.#held.get(this.groupKey) ?? new Map<number, () => readonly number[]>();
    LaunchBatch.#held.set(this.groupKey, held);
    const waiting = pending;
    held.set(rank, () => this.ranks.filter((r) => !waiting.structs.has(r)));
    const done = new Promise<void>((resolve, reject) => pending.waiters.push({ rank, resolve, reject }));
    if (pending.structs.size === this.ranks.length) this.#launch(seq, pending);
    return done;
  }

  #launch(seq: number, pending: PendingLaunch): void {
    clearTimeout(pending.timer);
    this.#pending.delete(seq);
    for (const r of pending.structs.keys()) LaunchBatch.#held.get(this.groupKey)?.delete(r);
    try {
      const lead = this.#streams.get(this.ranks[0]!)!;
      for (const event of pending.events.values()) event.waitOn(lead);
      const fields = pending.structs.get(this.ranks[0]!)!.length;
      const data = new BigInt64Array(fields * this.ranks.length);
      this.ranks.forEach((r, i) => data.set(pending.structs.get(r)!, i * fields));
      this.#run(pending.kind, seq, data);
      if (this.ranks.length > 1) {
        const finished = Event.create({ device: this.device }).record(lead);
        for (const r of this.ranks.slice(1)) finished.waitOn(this.#streams.get(r)!);
        finished.close();
      }
      for (const w of pending.waiters) w.resolve();
    } catch (err) {
      for (const w of pending.waiters) w.reject(err as Error);
    } finally {
      for (const event of pending.events.values()) event.close();
    }
  }

  /** One native launch of `data` (one struct per rank of this batch) on the first rank's comm stream. */
  #run(kind: NormalKernel, seq: number, data: BigInt64Array): void {
    const lib = native();
    const launch = kind === "notify" ? lib.bun_ep_normal_notify : kind === "dispatch" ? lib.bun_ep_normal_dispatch : lib.bun_ep_normal_combine;
    withDevice(this.device, () => check(launch(data, this.ranks.length), `rank${this.ranks.length > 1 ? "s" : ""} ${this.ranks.join(", ")}: ${kind} (call ${seq})`));
  }

  #expire(seq: number, pending: PendingLaunch, timeoutMs: number): void {
    if (this.#pending.get(seq) !== pending) return;
    this.#pending.delete(seq);
    for (const event of pending.events.values()) event.close();
    const missing = this.ranks.filter((r) => !pending.structs.has(r));
    // Kept: a peer on another device may report its own timeout naming these ranks a moment later.
    for (const r of pending.structs.keys()) LaunchBatch.#held.get(this.groupKey)?.set(r, () => missing);
    for (const w of pending.waiters) {
      w.reject(
        new BunEpError(
          Status.Timeout,
          `rank ${w.rank} EpBuffer`,
          `rank ${w.rank}: ${pending.kind} timed out after ${timeoutMs} ms waiting for rank ${missing.join(", rank ")}, which never ` +
            `made the call (call ${seq}; ranks of one process must each make every call); this EpBuffer is unusable now, create a new one`,
        ),
      );
    }
  }
}

const handleRegistry = new FinalizationRegistry<{ backend: WeakRef<CudaBackend>; data: CudaHandleData }>((held) => {
  const backend = held.backend.deref();
  if (backend === undefined || backend.closed) return;
  try {
    held.data.handleMem.free(backend.commStream);
    held.data.recvCountPerExpert.free(backend.commStream);
  } catch {
    // A failed free at collection time has no caller to report to.
  }
});

class CudaBackend implements Backend {
  readonly kind = "cuda" as const;
  readonly rank: number;
  readonly numRanks: number;
  readonly device: number;
  readonly commStream: Stream;
  /** This rank's compute stream: calls wait for it, it waits for calls; fromHost/toHost use it. */
  readonly computeStream: Stream;
  readonly #ownsComputeStream: boolean;
  readonly #init: BackendInit;
  /** End of control + staging area in the registered buffer (bufferBytes of the kernels). */
  readonly #stagingEnd: number;
  readonly #arena: Arena | null;
  readonly #buffer: PeerBuffer | null;
  readonly #peers: PeerPointers | null;
  readonly #record: PinnedTensor<"i32">;
  readonly #workspace: DeviceTensor<"u8">;
  readonly #lowLatency: LowLatencyEngineLike | null;
  /** Set when the group spans several (possibly virtual) nodes: the normal kernels go through NVSHMEM. */
  #internode: InternodeEngine | null = null;
  /** The ranks of this process on this device, whose normal kernels run as one launch. */
  readonly #batch: LaunchBatch | null;
  /** Orders the comm stream against the compute stream; allocates on the comm stream. */
  readonly #order: CommOrder;
  #seq = 0;
  #unusable: Error | null = null;
  #closed = false;

  private constructor(
    init: BackendInit,
    commStream: Stream,
    buffer: PeerBuffer | null,
    peers: PeerPointers | null,
    record: PinnedTensor<"i32">,
    workspace: DeviceTensor<"u8">,
    lowLatency: LowLatencyEngineLike | null,
    computeStream: Stream,
    ownsComputeStream: boolean,
    batch: LaunchBatch | null,
  ) {
    this.#init = init;
    this.#batch = batch;
    this.computeStream = computeStream;
    this.#ownsComputeStream = ownsComputeStream;
    const usable = Math.max(0, init.numNvlBytes - NORMAL_CONTROL_BYTES);
    this.#stagingEnd = NORMAL_CONTROL_BYTES + Math.floor((usable * STAGING_SHARE) / ARENA_ALIGN) * ARENA_ALIGN;
    this.#arena = buffer !== null ? new Arena(this.#stagingEnd, buffer.byteLength) : null;
    this.rank = init.group.rank;
    this.numRanks = init.group.size;
    this.device = init.device;
    this.commStream = commStream;
    this.#buffer = buffer;
    this.#peers = peers;
    this.#record = record;
    this.#workspace = workspace;
    this.#lowLatency = lowLatency;
    this.#order = new CommOrder(init.device, commStream, computeStream);
  }

  static async create(init: BackendInit): Promise<CudaBackend> {
    const { group, device } = init;
    if (group.size > NORMAL_MAX_RANKS && init.numNvlBytes > 0 && group.ranksPerNode >= group.size) {
      throw new RangeError(`group: the intranode normal kernels support at most ${NORMAL_MAX_RANKS} ranks, got ${group.size}`);
    }
    if (init.numNvlBytes > 0 && init.numNvlBytes <= NORMAL_CONTROL_BYTES) {
      throw new RangeError(`numNvlBytes: must exceed ${NORMAL_CONTROL_BYTES} (the control region), got ${init.numNvlBytes}`);
    }
    const commStream = Stream.create({ device });
    const ownsComputeStream = init.computeStream == null;
    const computeStream = ownsComputeStream ? Stream.create({ device }) : Stream.fromHandle(init.computeStream!, device);
    const record = PinnedTensor.zeros("i32", [NORMAL_HOST_RECORD_BYTES / 4]);
    const workspace = withDevice(device, () => DeviceTensor.zeros("u8", [NORMAL_WORKSPACE_BYTES], { device, stream: commStream }));
    commStream.synchronize();
    let buffer: PeerBuffer | null = null;
    let peers: PeerPointers | null = null;
    let batch: LaunchBatch | null = null;
    const spansNodes = group.ranksPerNode < group.size && init.numNvlBytes > 0;
    let internode: InternodeEngine | null = null;
    if (spansNodes) {
      // Ranks on other nodes are reached only through NVSHMEM (no IPC across nodes), so the
      // internode engine owns the normal buffers instead of a PeerBuffer.
      const { InternodeEngine: Engine } = await import("./cuda_internode.ts");
      internode = await Engine.create({ init, commStream, computeStream });
    } else if (init.numNvlBytes > 0) {
      buffer = PeerBuffer.allocate(device, init.numNvlBytes);
      peers = await exchangePeerPointers(group, buffer.ptr, device);
      // The ranks of this process on this device share one launch per normal kernel (LaunchBatch).
      const devices = (await group.allGather(new Uint8Array(new Int32Array([device]).buffer))).map((b) =>
        new DataView(b.buffer, b.byteOffset, b.byteLength).getInt32(0, true),
      );
      const local = devices.flatMap((d, r) => (d === device && peers!.sameProcess[r] === true ? [r] : []));
      const key = `${device}:${local.map((r) => peers!.ptrs[r]).join(",")}`;
      const groupKey = peers.ptrs.filter((_, r) => peers!.sameProcess[r] === true).join(",");
      batch = LaunchBatch.join(key, groupKey, device, local, group.rank, commStream);
      // Every rank's buffer is zeroed before anyone's first kernel can touch it.
      await group.barrier();
    }
    let lowLatency: LowLatencyEngineLike | null = null;
    if (init.lowLatency !== null) {
      const modulePath = "./cuda_ll.ts";
      let module: LowLatencyModule;
      try {
        module = (await import(modulePath)) as LowLatencyModule;
      } catch (err) {
        throw new BunEpError(Status.NotSupported, "creating the low-latency engine", `lib/backend/cuda_ll.ts could not be loaded: ${(err as Error).message}`);
      }
      lowLatency = await module.LowLatencyEngine.create({ init, commStream: commStream.handle });
    }
    const backend = new CudaBackend(init, commStream, buffer, peers, record, workspace, lowLatency, computeStream, ownsComputeStream, batch);
    backend.#internode = internode;
    return backend;
  }

  get closed(): boolean {
    return this.#closed;
  }

  // ---- errors ------------------------------------------------------------------------------------

  /** Throw the first error the kernels recorded (the buffer is unusable from then on). */
  #throwIfFailed(): void {
    if (this.#closed) throw new Error(`rank ${this.rank}: this CUDA backend is closed`);
    if (this.#unusable !== null) throw this.#unusable;
    this.#unusable = recordedError(this.#record.data, this.rank, this.#init.timeoutMs, this.#init.numNvlBytes, {
      unknownStep: "a normal kernel",
      stepPrefix: "",
      stagingWhat: "staging rows",
      whyMissing: (who) => (this.#batch === null ? "" : LaunchBatch.heldBackReason(this.#batch.groupKey, who)),
    });
    if (this.#unusable !== null) throw this.#unusable;
  }

  #requireNormal(what: string): { buffer: PeerBuffer; peers: PeerPointers } {
    this.#throwIfFailed();
    if (this.#buffer === null || this.#peers === null) {
      throw new BunEpError(Status.NotSupported, what, "this EpBuffer was created with numNvlBytes = 0 (no normal kernels)");
    }
    return { buffer: this.#buffer, peers: this.#peers };
  }

  // ---- stream ordering ----------------------------------------------------------------------------

  #waitBefore(previousEvent: EventLike | null): void {
    this.#order.waitBefore(previousEvent);
  }

  #finish(asyncFinish: boolean): EventLike | null {
    return this.#order.finish(asyncFinish);
  }

  /** The fields of bunEpNormalComm_t for call `seq`. */
  #putComm(w: StructWriter, seq: number): void {
    const { buffer, peers } = this.#requireNormal("normal kernels");
    w.put(this.rank).put(this.numRanks);
    for (let r = 0; r < NORMAL_MAX_RANKS; ++r) w.put(r < this.numRanks ? (peers.ptrs[r] ?? 0) : 0);
    w.put(this.#stagingEnd)
      .put(this.#record.devicePtr)
      .put(this.#workspace.ptr)
      .put(Math.round(this.#init.timeoutMs * 1e6))
      .put(seq)
      .put(this.commStream.handle);
  }

  /** Launch (with the other ranks of this process on this device) `kind` of call `seq`; a failure makes the buffer unusable. */
  #submit(kind: NormalKernel, seq: number, struct: BigInt64Array): Promise<void> {
    return this.#batch!.submit(this.rank, seq, kind, struct, this.#init.timeoutMs).catch((err: unknown) => {
      this.#unusable ??= err as Error;
      throw err;
    });
  }

  // ---- layout ------------------------------------------------------------------------------------

  getDispatchLayout(topkIdx: Tensor, numExperts: number, previousEvent: EventLike | null, asyncFinish: boolean): DispatchLayout {
    if (this.#internode !== null) return this.#internode.getDispatchLayout(topkIdx, numExperts, previousEvent, asyncFinish);
    this.#throwIfFailed();
    const numTokens = topkIdx.shape[0] ?? 0;
    const topk = topkIdx.shape[1] ?? 0;
    this.#waitBefore(previousEvent);
    const numTokensPerRank = this.#order.empty("i32", [this.numRanks]);
    const numTokensPerExpert = this.#order.empty("i32", [numExperts]);
    const isTokenInRank = this.#order.empty("u8", [numTokens, this.numRanks]);
    const w = new StructWriter(11);
    w.put(ptrOf(topkIdx)).put(numTokensPerRank.ptr).put(numTokensPerExpert.ptr).put(isTokenInRank.ptr);
    w.put(numTokens).put(topk).put(numExperts).put(this.numRanks).put(this.rank).put(this.#record.devicePtr).put(this.commStream.handle);
    withDevice(this.device, () => check(native().bun_ep_normal_layout(w.done()), `rank ${this.rank}: getDispatchLayout`));
    return { numTokensPerRank, numTokensPerRdmaRank: null, numTokensPerExpert, isTokenInRank, event: this.#finish(asyncFinish) };
  }

  // ---- dispatch ----------------------------------------------------------------------------------

  dispatch(args: DispatchArgs): Promise<DispatchResult> {
    // Not async: every launch that does not need the host wait happens before this returns.
    if (this.#internode !== null) return this.#internode.dispatch(args);
    try {
      this.#requireNormal("dispatch");
      this.#waitBefore(args.previousEvent);
      if (args.handle !== null) return this.#cachedDispatch(args, args.handle);
      return this.#freshDispatch(args);
    } catch (err) {
      return Promise.reject(err);
    }
  }

  #numChannels(numSMs: number): number {
    if (!Number.isInteger(numSMs) || numSMs < 1 || numSMs > NORMAL_MAX_CHANNELS) {
      throw new RangeError(`config.numSMs: expected an integer in [1, ${NORMAL_MAX_CHANNELS}], got ${numSMs}`);
    }
    return numSMs;
  }

  #stagingRows(hidden: number, elementBytes: number, fp8: boolean, topk: number): number {
    this.#requireNormal("dispatch");
    return Number(native().bun_ep_normal_staging_rows(this.#stagingEnd, hidden, elementBytes, fp8 ? 1 : 0, topk, 1));
  }

  #freshDispatch(args: DispatchArgs): Promise<DispatchResult> {
    const x = args.x as DeviceTensor;
    const topkIdx = args.topkIdx!;
    const layout = args.layout!;
    const numTokens = x.shape[0]!;
    const hidden = x.shape[1]!;
    const topk = topkIdx.shape[1]!;
    const numExperts = layout.numTokensPerExpert.shape[0]!;
    const numLocalExperts = numExperts / this.numRanks;
    const numChannels = this.#numChannels(args.config.numSMs);
    const fp8 = x.dtype === "fp8_e4m3";
    const elementBytes = fp8 ? 1 : 2;
    const stagingRows = this.#stagingRows(hidden, elementBytes, fp8, topk);
    if (args.numWorstTokens > stagingRows) {
      throw new RangeError(
        `numWorstTokens: ${args.numWorstTokens} rows do not fit the staging area of numNvlBytes = ${this.#init.numNvlBytes} ` +
          `(${stagingRows} rows of hidden ${hidden}, ${x.dtype}); raise numNvlBytes or lower numWorstTokens`,
      );
    }
    const handleBytes = Number(native().bun_ep_normal_handle_bytes(numTokens, this.numRanks));
    const handleMem = this.#order.empty("i32", [handleBytes / 4]);
    const recvCountPerExpert = this.#order.empty("i32", [numLocalExperts]);
    const notifySeq = ++this.#seq;
    const w = new StructWriter(COMM_FIELDS + 10);
    this.#putComm(w, notifySeq);
    w.put(ptrOf(topkIdx)).put(handleMem.ptr).put(recvCountPerExpert.ptr).put(numTokens).put(topk).put(numExperts);
    w.put(numChannels).put(args.expertAlignment).put(args.numWorstTokens).put(stagingRows);
    const notifyLaunched = this.#submit("notify", notifySeq, w.done());
    const data: CudaHandleData = { handleMem, recvCountPerExpert, numChannels, numExperts, topk, xDType: fp8 ? "fp8_e4m3" : "bf16" };

    // Everything on the comm stream that depends on the kernels is enqueued once they are launched
    // (for a rank that is not first in its LaunchBatch, they run on another stream, then this one waits).
    const launchData = (numRecvTokens: number | null, numRecvRows: number, perExpert: number[] | null): Promise<DispatchResult> => {
      const out = this.#recvTensors(x.dtype as "bf16" | "fp8_e4m3", numRecvRows, hidden, topk, args.topkWeights !== null);
      const { recvX, recvXScales, recvTopkIdx, recvTopkWeights } = out;
      const launched = this.#launchDispatch(args, data, numRecvRows, out);
      return Promise.all([notifyLaunched, launched]).then(() => ({
        recvX,
        recvXScales,
        recvTopkIdx,
        recvTopkWeights,
        numRecvTokensPerExpert: perExpert,
        recvCountPerExpert: this.#order.copyOf(recvCountPerExpert),
        numRecvTokens,
        handle: this.#makeHandle(data, numTokens, hidden, numRecvTokens, numRecvRows),
        event: this.#finish(args.asyncFinish),
      }));
    };

    // numWorstTokens: the data step is submitted right away (no host wait); it launches after notify.
    if (args.numWorstTokens > 0) return launchData(null, args.numWorstTokens, null);
    return notifyLaunched.then(() => this.#awaitNotify(notifySeq)).then(() => {
      const rec = this.#record.data;
      const numRecv = rec[Rec.numRecv]!;
      const maxRecv = rec[Rec.maxRecv]!;
      if (maxRecv > stagingRows) {
        this.#seq++; // every rank skips the data step alike, so the next call's seq still agrees
        throw new RangeError(
          `numNvlBytes: rank ${rec[Rec.maxRecvRank]} receives ${maxRecv} rows but the staging area of numNvlBytes = ` +
            `${this.#init.numNvlBytes} holds ${stagingRows} rows of hidden ${hidden} (${x.dtype}); raise numNvlBytes`,
        );
      }
      const perExpert = Array.from(rec.subarray(Rec.expertCounts, Rec.expertCounts + numLocalExperts));
      return launchData(numRecv, numRecv, perExpert);
    });
  }

  async #awaitNotify(seq: number): Promise<void> {
    const ok = await pollNotify(this.#record.data, seq, this.#init.timeoutMs);
    this.#throwIfFailed();
    if (!ok) {
      this.#unusable = notifyTimeoutError(this.rank, "the notify step", this.#init.timeoutMs);
      throw this.#unusable;
    }
  }

  /**
   * The receive tensors of one dispatch: in the arena when all of them fit ("direct": senders store
   * straight into them, no staging copy), else fresh pool tensors filled from the staging area.
   * `topk` 0: no index/weight tensors (cached dispatch).
   */
  #recvTensors(dtype: "bf16" | "fp8_e4m3", rows: number, hidden: number, topk: number, weights: boolean): RecvTensors {
    const fp8 = dtype === "fp8_e4m3";
    const shapes: [keyof Omit<RecvTensors, "direct">, DType, number[]][] = [["recvX", dtype, [rows, hidden]]];
    if (fp8) shapes.push(["recvXScales", "f32", [rows, hidden / 128]]);
    if (topk > 0) shapes.push(["recvTopkIdx", "i64", [rows, topk]]);
    if (topk > 0 && weights) shapes.push(["recvTopkWeights", "f32", [rows, topk]]);
    const out: RecvTensors = { recvX: null as unknown as DeviceTensor, recvXScales: null, recvTopkIdx: null, recvTopkWeights: null, direct: false };
    if (rows > 0) {
      const placed: DeviceTensor[] = [];
      for (const [, type, shape] of shapes) {
        const t = this.#arenaTensor(type, shape);
        if (t === null) break;
        placed.push(t);
      }
      if (placed.length === shapes.length) {
        shapes.forEach(([name], i) => (out[name] = placed[i]!));
        out.direct = true;
        return out;
      }
      for (const t of placed) t.free(this.commStream);
      if (this.#arena?.noteFull()) {
        console.warn(
          `bun-ep rank ${this.rank}: the receive arena of numNvlBytes = ${this.#init.numNvlBytes} is full; dispatch falls back to ` +
            "the staged copy (slower). Free dispatch outputs when done, or raise numNvlBytes.",
        );
      }
    }
    for (const [name, type, shape] of shapes) out[name] = this.#order.empty(type as "bf16", shape);
    return out;
  }

  #launchDispatch(args: DispatchArgs, data: CudaHandleData, recvRows: number, out: RecvTensors): Promise<void> {
    const x = args.x;
    const fp8 = x.dtype === "fp8_e4m3";
    const seq = ++this.#seq;
    const w = new StructWriter(COMM_FIELDS + 18);
    this.#putComm(w, seq);
    w.put(data.handleMem.ptr).put(ptrOf(x)).put(ptrOf(args.xScales)).put(ptrOf(args.topkIdx)).put(ptrOf(args.topkWeights));
    w.put(out.recvX.ptr).put(ptrOf(out.recvXScales)).put(ptrOf(out.recvTopkIdx)).put(ptrOf(out.recvTopkWeights));
    w.put(x.shape[0]!).put(x.shape[1]!).put(fp8 ? 1 : 2).put(args.topkIdx !== null ? data.topk : 0).put(data.numExperts);
    w.put(data.numChannels).put(recvRows).put(0).put(out.direct ? 1 : 0);
    return this.#submit("dispatch", seq, w.done());
  }

  #cachedDispatch(args: DispatchArgs, handle: DispatchHandle): Promise<DispatchResult> {
    const data = handle.data as CudaHandleData;
    const x = args.x;
    const fp8 = x.dtype === "fp8_e4m3";
    const hidden = x.shape[1]!;
    const stagingRows = this.#stagingRows(hidden, fp8 ? 1 : 2, fp8, 0);
    if (handle.numRecvRows > stagingRows) {
      throw new RangeError(`numNvlBytes: ${handle.numRecvRows} rows do not fit the staging area (${stagingRows} rows); raise numNvlBytes`);
    }
    const out = this.#recvTensors(x.dtype as "bf16" | "fp8_e4m3", handle.numRecvRows, hidden, 0, false);
    const { recvX, recvXScales } = out;
    return this.#launchDispatch({ ...args, topkIdx: null, topkWeights: null }, data, handle.numRecvRows, out).then(() => ({
      recvX,
      recvXScales,
      recvTopkIdx: null,
      recvTopkWeights: null,
      numRecvTokensPerExpert: null,
      recvCountPerExpert: this.#order.copyOf(data.recvCountPerExpert),
      numRecvTokens: handle.numRecvTokens,
      handle,
      event: this.#finish(args.asyncFinish),
    }));
  }

  #makeHandle(data: CudaHandleData, numTokens: number, hidden: number, numRecvTokens: number | null, numRecvRows: number): DispatchHandle {
    const handle: DispatchHandle = {
      kind: "normal",
      bufferId: this.#init.bufferId,
      numTokens,
      hidden,
      numRecvTokens,
      numRecvRows,
      data,
    };
    handleRegistry.register(handle, { backend: new WeakRef(this), data });
    return handle;
  }

  // ---- combine -----------------------------------------------------------------------------------

  async combine(args: CombineArgs): Promise<CombineResult> {
    if (this.#internode !== null) return this.#internode.combine(args);
    this.#requireNormal("combine");
    const data = args.handle.data as CudaHandleData;
    const hidden = args.x.shape[1]!;
    const numTokens = args.handle.numTokens;
    const topk = args.topkWeights?.shape[1] ?? 0;
    const numBlocks = this.#numChannels(args.config.numSMs);
    this.#waitBefore(args.previousEvent);
    const combinedX = this.#order.empty("bf16", [numTokens, hidden]);
    const combinedTopkWeights = args.topkWeights !== null ? this.#order.empty("f32", [numTokens, topk]) : null;
    // Rows that lie in this rank's arena are pulled by the home ranks (no push into their staging).
    const xDirect = this.#inArena(args.x) && (args.topkWeights === null || this.#inArena(args.topkWeights));
    const seq = ++this.#seq;
    const w = new StructWriter(COMM_FIELDS + 13);
    this.#putComm(w, seq);
    w.put(data.handleMem.ptr).put(ptrOf(args.x)).put(ptrOf(args.topkWeights)).put(ptrOf(args.biases[0])).put(ptrOf(args.biases[1]));
    w.put(combinedX.ptr).put(ptrOf(combinedTopkWeights)).put(numTokens).put(hidden).put(topk).put(numBlocks).put(0).put(xDirect ? 1 : 0);
    await this.#submit("combine", seq, w.done());
    return { combinedX, combinedTopkWeights, event: this.#finish(args.asyncFinish) };
  }

  // ---- low latency (H6's engine) -----------------------------------------------------------------

  #ll(what: string): LowLatencyEngineLike {
    this.#throwIfFailed();
    if (this.#lowLatency === null) {
      throw new BunEpError(Status.NotSupported, what, "this EpBuffer was created without the lowLatency option");
    }
    return this.#lowLatency;
  }

  lowLatencyDispatch(args: LowLatencyDispatchArgs): Promise<LowLatencyDispatchResult> {
    try {
      return this.#ll("lowLatencyDispatch").dispatch(args);
    } catch (err) {
      return Promise.reject(err);
    }
  }

  lowLatencyCombine(args: LowLatencyCombineArgs): Promise<LowLatencyCombineResult> {
    try {
      return this.#ll("lowLatencyCombine").combine(args);
    } catch (err) {
      return Promise.reject(err);
    }
  }

  getNextLowLatencyCombineBuffer(handle: LowLatencyHandle): Tensor {
    return this.#ll("getNextLowLatencyCombineBuffer").getNextCombineBuffer(handle);
  }

  cleanLowLatencyBuffer(): Promise<void> {
    try {
      return this.#ll("cleanLowLatencyBuffer").clean();
    } catch (err) {
      return Promise.reject(err);
    }
  }

  setRankMask(alive: readonly boolean[]): void {
    this.#lowLatency?.setRankMask(alive);
  }

  // ---- tensors -----------------------------------------------------------------------------------

  fromHost(t: HostTensor): Tensor {
    return DeviceTensor.fromHost(t, { device: this.device, stream: this.computeStream });
  }

  allocPeerReadable(dtype: "bf16" | "f32", shape: readonly number[]): Tensor {
    this.#throwIfFailed();
    return this.#arenaTensor(dtype, shape) ?? DeviceTensor.empty(dtype, shape, { device: this.device, stream: this.computeStream });
  }

  /**
   * A tensor in the arena (peers reach it at the same offset of their mapping of this rank's buffer),
   * or null when it does not fit. Its free() hands the block back, ordered after the freeing stream.
   */
  #arenaTensor<D extends DType>(dtype: D, shape: readonly number[]): DeviceTensor<D> | null {
    const arena = this.#arena;
    if (arena === null || this.#buffer === null) return null;
    const probe = DeviceTensor.fromPointer(1, dtype, shape, this.device);
    const bytes = probe.byteLength;
    const offset = arena.alloc(bytes, (event) => {
      event.waitOn(this.commStream);
      event.waitOn(this.computeStream);
    });
    if (offset === null) return null;
    const tensor = DeviceTensor.fromPointer(this.#buffer.ptr + offset, dtype, shape, this.device, { stream: this.computeStream });
    let freed = false;
    // An own property shadows DeviceTensor.free (fromPointer tensors otherwise free nothing).
    Object.defineProperty(tensor, "free", {
      value: (stream?: Stream | number): void => {
        if (freed || this.#closed) return;
        freed = true;
        const event = Event.create({ device: this.device }).record(stream ?? this.computeStream);
        arena.release(offset, bytes, event);
      },
    });
    return tensor;
  }

  /** Whether `t` lies entirely in this rank's arena (peers can read it in place). */
  #inArena(t: Tensor | null): boolean {
    if (t === null || !(t instanceof DeviceTensor) || this.#buffer === null || t.device !== this.device) return false;
    const begin = this.#buffer.ptr + this.#stagingEnd;
    const end = this.#buffer.ptr + this.#buffer.byteLength;
    return t.ptr >= begin && t.ptr + t.byteLength <= end && t.ptr % 16 === 0;
  }

  toHost(t: Tensor): HostTensor {
    if (t instanceof HostTensor) return t.clone();
    if (t instanceof PinnedTensor) return t.asHost().clone();
    if (!(t instanceof DeviceTensor)) throw new TypeError("toHost: expected a DeviceTensor of this backend");
    const host = t.toHost();
    this.#throwIfFailed();
    return host;
  }

  // ---- close -------------------------------------------------------------------------------------

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    try {
      this.commStream.synchronize();
    } finally {
      await this.#lowLatency?.close();
      await this.#internode?.close();
      this.#batch?.leave(this.rank);
      this.#peers?.close();
      // Peers must have unmapped this rank's buffer before it is freed.
      if (this.#buffer !== null) await this.#init.group.barrier();
      this.#buffer?.free();
      this.#workspace.free(this.commStream);
      this.commStream.synchronize();
      this.#record.free();
      this.#order.close();
      this.#arena?.close();
      this.commStream.close();
      if (this.#ownsComputeStream) this.computeStream.close();
    }
  }
}
