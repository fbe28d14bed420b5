// The internode engine of the CUDA backend: the normal kernels when the group spans several nodes
// (group.ranksPerNode < group.size). lib/backend/cuda.ts delegates getDispatchLayout, dispatch and
// combine to it. Protocol and buffer maps: cuda/include/bun_ep_internode.h.
//
// It owns two symmetric NVSHMEM allocations per rank (allocated once here, through this process's
// NvshmemContext): the NVL buffer (numNvlBytes), reached by the ranks of the same node through
// nvshmem_ptr peer pointers, and the RDMA buffer (numRdmaBytes), reached by ranks of other nodes
// only through NVSHMEM puts and signals. A mapped pinned record carries counts and errors to the host.
//
// Every collective call takes the next `seq` (same on every rank: every rank makes the same calls
// in the same order). dispatch() launches its notify step before its first `await`.

import { BunEpError, check, native, Status } from "../ffi.ts";
import {
  INTERNODE_COMBINE_EXTRA_FIELDS,
  INTERNODE_COMM_FIELDS,
  INTERNODE_DISPATCH_EXTRA_FIELDS,
  INTERNODE_ERR_RDMA,
  INTERNODE_LAYOUT_FIELDS,
  INTERNODE_MAX_CHANNELS,
  INTERNODE_MAX_LOCAL_EXPERTS,
  INTERNODE_MAX_NODES,
  INTERNODE_MAX_RANKS_PER_NODE,
  INTERNODE_NOTIFY_EXTRA_FIELDS,
  INTERNODE_NVL_CONTROL_BYTES,
  InternodeCapacity,
  InternodeRec,
} from "../native/internode.ts";
import { NORMAL_HOST_RECORD_BYTES, NORMAL_WORKSPACE_BYTES, Rec } from "../native/normal.ts";
import { type Stream, withDevice } from "../stream.ts";
import { DeviceTensor, PinnedTensor, type Tensor } from "../tensor.ts";
import { CommOrder, notifyTimeoutError, pollNotify, ptrOf, recordedError, StructWriter } from "./cuda_common.ts";
import { DEFAULT_NVSHMEM_HEAP_BYTES, NvshmemContext, nvshmemBuilt } from "./nvshmem.ts";
import type {
  BackendInit,
  CombineArgs,
  CombineResult,
  DispatchArgs,
  DispatchHandle,
  DispatchLayout,
  DispatchResult,
  EventLike,
} from "./types.ts";

export interface InternodeEngineOptions {
  init: BackendInit;
  /** The rank's comm stream: every kernel of this engine runs on it. */
  commStream: Stream;
  /** The rank's compute stream: calls are ordered after it, and it after them (unless asyncFinish). */
  computeStream: Stream;
}

/** Capacities of the NVL and RDMA buffers for one row shape (bunEpInternodeCapacities_t). */
export interface InternodeCapacities {
  stagingRows: number;
  gatherPairs: number;
  rdmaSendRows: number;
  rdmaRecvRows: number;
  combineRecvPairs: number;
  rdmaControlBytes: number;
}

/** Backend-private part of a normal DispatchHandle made by this engine. */
interface InternodeHandleData {
  engine: "internode";
  handleMem: DeviceTensor<"i32">;
  /** i32 [numRecvRows, 2]: (source rank, gather pair) of each received row, for combine. */
  recvMeta: DeviceTensor<"i32">;
  recvCountPerExpert: DeviceTensor<"i32">;
  numChannels: number;
  numExperts: number;
  topk: number;
  xDType: "bf16" | "fp8_e4m3";
}

/** Capacities of the engine's buffers for one row shape (same numbers on every rank). */
export function internodeCapacities(
  nvlBytes: number,
  rdmaBytes: number,
  numRanks: number,
  ranksPerNode: number,
  hidden: number,
  elementBytes: number,
  topk: number,
): InternodeCapacities {
  const out = new BigInt64Array(InternodeCapacity.fields);
  check(
    native().bun_ep_internode_capacities(nvlBytes, rdmaBytes, numRanks, ranksPerNode, hidden, elementBytes, topk, out),
    "internode capacities",
  );
  const at = (i: number): number => Number(out[i]);
  return {
    stagingRows: at(InternodeCapacity.stagingRows),
    gatherPairs: at(InternodeCapacity.gatherPairs),
    rdmaSendRows: at(InternodeCapacity.rdmaSendRows),
    rdmaRecvRows: at(InternodeCapacity.rdmaRecvRows),
    combineRecvPairs: at(InternodeCapacity.combineRecvPairs),
    rdmaControlBytes: at(InternodeCapacity.rdmaControlBytes),
  };
}

/** Whether this build has the internode kernels; else why not. */
export function internodeAvailability(): { ok: true } | { ok: false; reason: string } {
  try {
    if (!nvshmemBuilt()) return { ok: false, reason: "libbun_ep.so was built without NVSHMEM (set NVSHMEM_DIR and rebuild)" };
    const constants = new BigInt64Array(7);
    check(native().bun_ep_internode_constants(constants, 7), "internode constants");
    if (constants[6] !== 1n) return { ok: false, reason: "libbun_ep.so was built without NVSHMEM (set NVSHMEM_DIR and rebuild)" };
    return { ok: true };
  } catch (err) {
    return { ok: false, reason: (err as Error).message };
  }
}

const handleRegistry = new FinalizationRegistry<{ engine: WeakRef<InternodeEngine>; data: InternodeHandleData }>((held) => {
  const engine = held.engine.deref();
  if (engine === undefined || engine.closed) return;
  try {
    held.data.handleMem.free(engine.commStream);
    held.data.recvMeta.free(engine.commStream);
    held.data.recvCountPerExpert.free(engine.commStream);
  } catch {
    // A failed free at collection time has no caller to report to.
  }
});

export class InternodeEngine {
  readonly rank: number;
  readonly numRanks: number;
  readonly ranksPerNode: number;
  readonly numNodes: number;
  readonly device: number;
  readonly commStream: Stream;
  readonly computeStream: Stream;
  readonly #init: BackendInit;
  readonly #shmem: NvshmemContext;
  readonly #nvl: number;
  readonly #rdma: number;
  readonly #nvlPeers: readonly number[];
  readonly #record: PinnedTensor<"i32">;
  readonly #workspace: DeviceTensor<"u8">;
  readonly #order: CommOrder;
  #seq = 0;
  #unusable: Error | null = null;
  #closed = false;

  private constructor(
    opts: InternodeEngineOptions,
    shmem: NvshmemContext,
    nvl: number,
    rdma: number,
    nvlPeers: readonly number[],
    record: PinnedTensor<"i32">,
    workspace: DeviceTensor<"u8">,
  ) {
    const { init } = opts;
    this.#init = init;
    this.rank = init.group.rank;
    this.numRanks = init.group.size;
    this.ranksPerNode = init.group.ranksPerNode;
    this.numNodes = this.numRanks / this.ranksPerNode;
    this.device = init.device;
    this.commStream = opts.commStream;
    this.computeStream = opts.computeStream;
    this.#shmem = shmem;
    this.#nvl = nvl;
    this.#rdma = rdma;
    this.#nvlPeers = nvlPeers;
    this.#record = record;
    this.#workspace = workspace;
    this.#order = new CommOrder(init.device, opts.commStream, opts.computeStream);
  }

  /**
   * Collective over init.group: starts (or joins) this process's NVSHMEM, allocates the NVL and RDMA
   * buffers on the symmetric heap, and maps the NVL buffers of the ranks of this node.
   */
  static async create(opts: InternodeEngineOptions): Promise<InternodeEngine> {
    const { init } = opts;
    const { group, device } = init;
    const what = `rank ${group.rank}: internode engine`;
    const availability = internodeAvailability();
    if (!availability.ok) throw new BunEpError(Status.NotSupported, what, availability.reason);
    const ranksPerNode = group.ranksPerNode;
    if (!Number.isInteger(ranksPerNode) || ranksPerNode < 1 || ranksPerNode > INTERNODE_MAX_RANKS_PER_NODE || group.size % ranksPerNode !== 0) {
      throw new RangeError(
        `group.ranksPerNode: expected a divisor of the group size ${group.size} in [1, ${INTERNODE_MAX_RANKS_PER_NODE}], got ${ranksPerNode} ` +
          "(LOCAL_WORLD_SIZE or BUN_EP_RANKS_PER_NODE)",
      );
    }
    const numNodes = group.size / ranksPerNode;
    if (numNodes > INTERNODE_MAX_NODES) {
      throw new RangeError(`group: the internode kernels support at most ${INTERNODE_MAX_NODES} nodes, got ${numNodes} (${group.size} ranks / ${ranksPerNode} per node)`);
    }
    if (init.numNvlBytes <= INTERNODE_NVL_CONTROL_BYTES) {
      throw new RangeError(`numNvlBytes: the internode kernels need more than ${INTERNODE_NVL_CONTROL_BYTES} bytes (control region), got ${init.numNvlBytes}`);
    }
    const control = internodeCapacities(init.numNvlBytes, 0, group.size, ranksPerNode, 128, 2, 1).rdmaControlBytes;
    if (init.numRdmaBytes <= control) {
      throw new RangeError(
        `numRdmaBytes: the internode kernels need an RDMA buffer of more than ${control} bytes for ${group.size} ranks ` +
          `(its control region), got ${init.numRdmaBytes}; pass numRdmaBytes to EpBuffer.create (e.g. 1 GiB)`,
      );
    }
    // Every rank must allocate the same sizes: the heap is symmetric.
    const sizes = await group.allGather(new TextEncoder().encode(`${init.numNvlBytes}/${init.numRdmaBytes}`));
    const decoder = new TextDecoder();
    const mismatch = sizes.findIndex((s) => decoder.decode(s) !== `${init.numNvlBytes}/${init.numRdmaBytes}`);
    if (mismatch >= 0) {
      throw new RangeError(
        `numNvlBytes/numRdmaBytes: rank ${mismatch} uses ${decoder.decode(sizes[mismatch])} but rank ${group.rank} uses ` +
          `${init.numNvlBytes}/${init.numRdmaBytes}; every rank must pass the same sizes`,
      );
    }

    const heapBytes = Math.max(DEFAULT_NVSHMEM_HEAP_BYTES, init.numNvlBytes + init.numRdmaBytes + 512 * 2 ** 20);
    const shmem = await NvshmemContext.init(group, device, { heapBytes });
    let nvl = 0;
    let rdma = 0;
    try {
      if (shmem.myPe !== group.rank || shmem.nPes !== group.size) {
        throw new Error(`${what}: NVSHMEM runs as PE ${shmem.myPe} of ${shmem.nPes}, expected PE = rank ${group.rank} of ${group.size}`);
      }
      nvl = withDevice(device, () => shmem.alloc(init.numNvlBytes));
      rdma = withDevice(device, () => shmem.alloc(init.numRdmaBytes));
      const node = Math.floor(group.rank / ranksPerNode);
      const nvlPeers: number[] = [];
      for (let j = 0; j < ranksPerNode; ++j) {
        const pe = node * ranksPerNode + j;
        const peer = pe === group.rank ? nvl : shmem.ptr(pe, nvl);
        if (peer === 0) {
          throw new BunEpError(
            Status.NotSupported,
            what,
            `NVSHMEM gives no peer pointer to rank ${pe} of the same node (no P2P path inside the node: ` +
              "is NVSHMEM_DISABLE_P2P set, or do the node's GPUs lack peer access?)",
          );
        }
        nvlPeers.push(peer);
      }
      const record = PinnedTensor.zeros("i32", [NORMAL_HOST_RECORD_BYTES / 4]);
      const workspace = withDevice(device, () =>
        DeviceTensor.zeros("u8", [NORMAL_WORKSPACE_BYTES], { device, stream: opts.commStream }),
      );
      opts.commStream.synchronize();
      return new InternodeEngine(opts, shmem, nvl, rdma, nvlPeers, record, workspace);
    } catch (err) {
      // The allocations are collective: every rank fails here alike or none does.
      if (rdma !== 0) shmem.free(rdma);
      if (nvl !== 0) shmem.free(nvl);
      shmem.finalize();
      throw err;
    }
  }

  get closed(): boolean {
    return this.#closed;
  }

  // ---- errors ------------------------------------------------------------------------------------

  /** Throw the first error the kernels recorded (the engine is unusable from then on). */
  #throwIfFailed(): void {
    if (this.#closed) throw new Error(`rank ${this.rank}: this internode engine is closed`);
    if (this.#unusable !== null) throw this.#unusable;
    const numRdmaBytes = this.#init.numRdmaBytes;
    this.#unusable = recordedError(this.#record.data, this.rank, this.#init.timeoutMs, this.#init.numNvlBytes, {
      unknownStep: "an internode kernel",
      stepPrefix: "internode ",
      stagingWhat: "rows (or pairs) of its NVL buffer",
      extra: (code, who, a, b, step) =>
        code === INTERNODE_ERR_RDMA
          ? {
              status: Status.InvalidArgument,
              message: `numRdmaBytes: rank ${who} needs ${a} rows (or pairs) of an RDMA-buffer area in ${step} but only ${b} fit in numRdmaBytes = ${numRdmaBytes}; raise numRdmaBytes`,
            }
          : undefined,
    });
    if (this.#unusable !== null) throw this.#unusable;
  }

  // ---- stream ordering ----------------------------------------------------------------------------

  #waitBefore(previousEvent: EventLike | null): void {
    this.#order.waitBefore(previousEvent);
  }

  #finish(asyncFinish: boolean): EventLike | null {
    return this.#order.finish(asyncFinish);
  }

  #putComm(w: StructWriter, seq: number): void {
    w.put(this.rank).put(this.numRanks).put(this.ranksPerNode).put(this.#nvl);
    for (let j = 0; j < INTERNODE_MAX_RANKS_PER_NODE; ++j) w.put(this.#nvlPeers[j] ?? 0);
    w.put(this.#rdma)
      .put(this.#init.numNvlBytes)
      .put(this.#init.numRdmaBytes)
      .put(this.#record.devicePtr)
      .put(this.#workspace.ptr)
      .put(Math.round(this.#init.timeoutMs * 1e6))
      .put(seq)
      .put(this.commStream.handle);
  }

  #capacities(hidden: number, elementBytes: number, topk: number): InternodeCapacities {
    return internodeCapacities(this.#init.numNvlBytes, this.#init.numRdmaBytes, this.numRanks, this.ranksPerNode, hidden, elementBytes, topk);
  }

  #numChannels(numSMs: number): number {
    if (!Number.isInteger(numSMs) || numSMs < 1 || numSMs > INTERNODE_MAX_CHANNELS) {
      throw new RangeError(`config.numSMs: the internode kernels take an integer in [1, ${INTERNODE_MAX_CHANNELS}], got ${numSMs}`);
    }
    return numSMs;
  }

  // ---- layout ------------------------------------------------------------------------------------

  getDispatchLayout(topkIdx: Tensor, numExperts: number, previousEvent: EventLike | null, asyncFinish: boolean): DispatchLayout {
    this.#throwIfFailed();
    const numTokens = topkIdx.shape[0] ?? 0;
    const topk = topkIdx.shape[1] ?? 0;
    this.#waitBefore(previousEvent);
    const numTokensPerRank = this.#order.empty("i32", [this.numRanks]);
    const numTokensPerRdmaRank = this.#order.empty("i32", [this.numNodes]);
    const numTokensPerExpert = this.#order.empty("i32", [numExperts]);
    const isTokenInRank = this.#order.empty("u8", [numTokens, this.numRanks]);
    const w = new StructWriter(INTERNODE_LAYOUT_FIELDS);
    w.put(ptrOf(topkIdx)).put(numTokensPerRank.ptr).put(numTokensPerRdmaRank.ptr).put(numTokensPerExpert.ptr).put(isTokenInRank.ptr);
    w.put(numTokens).put(topk).put(numExperts).put(this.numRanks).put(this.ranksPerNode).put(this.rank).put(this.#record.devicePtr);
    w.put(this.commStream.handle);
    withDevice(this.device, () => check(native().bun_ep_internode_layout(w.done()), `rank ${this.rank}: getDispatchLayout (internode)`));
    return { numTokensPerRank, numTokensPerRdmaRank, numTokensPerExpert, isTokenInRank, event: this.#finish(asyncFinish) };
  }

  // ---- dispatch ----------------------------------------------------------------------------------

  dispatch(args: DispatchArgs): Promise<DispatchResult> {
    // Not async: every launch that does not need the host wait happens before this returns.
    try {
      this.#throwIfFailed();
      this.#waitBefore(args.previousEvent);
      if (args.handle !== null) return Promise.resolve(this.#cachedDispatch(args, args.handle));
      return this.#freshDispatch(args);
    } catch (err) {
      return Promise.reject(err);
    }
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
    if (numLocalExperts > INTERNODE_MAX_LOCAL_EXPERTS) {
      throw new RangeError(`numExperts: the internode kernels take at most ${INTERNODE_MAX_LOCAL_EXPERTS} experts per rank, got ${numLocalExperts}`);
    }
    const numChannels = this.#numChannels(args.config.numSMs);
    const fp8 = x.dtype === "fp8_e4m3";
    const elementBytes = fp8 ? 1 : 2;
    const cap = this.#capacities(hidden, elementBytes, topk);
    if (args.numWorstTokens > cap.stagingRows) {
      throw new RangeError(
        `numWorstTokens: ${args.numWorstTokens} rows do not fit the NVL buffer of numNvlBytes = ${this.#init.numNvlBytes} ` +
          `(${cap.stagingRows} rows of hidden ${hidden}, ${x.dtype}); raise numNvlBytes or lower numWorstTokens`,
      );
    }
    const handleBytes = Number(native().bun_ep_internode_handle_bytes(numTokens, this.numRanks, this.ranksPerNode));
    const handleMem = this.#order.empty("i32", [handleBytes / 4]);
    const recvCountPerExpert = this.#order.empty("i32", [numLocalExperts]);
    const notifySeq = ++this.#seq;
    const w = new StructWriter(INTERNODE_COMM_FIELDS + INTERNODE_NOTIFY_EXTRA_FIELDS);
    this.#putComm(w, notifySeq);
    w.put(ptrOf(topkIdx)).put(handleMem.ptr).put(recvCountPerExpert.ptr).put(numTokens).put(topk).put(numExperts);
    w.put(numChannels).put(args.expertAlignment).put(args.numWorstTokens);
    withDevice(this.device, () => check(native().bun_ep_internode_notify(w.done()), `rank ${this.rank}: dispatch (internode notify)`));

    const launchData = (numRecvTokens: number | null, numRecvRows: number, perExpert: number[] | null): DispatchResult => {
      const recvX = this.#order.empty(x.dtype as "bf16" | "fp8_e4m3", [numRecvRows, hidden]);
      const recvXScales = fp8 ? this.#order.empty("f32", [numRecvRows, hidden / 128]) : null;
      const recvTopkIdx = this.#order.empty("i64", [numRecvRows, topk]);
      const recvTopkWeights = args.topkWeights !== null ? this.#order.empty("f32", [numRecvRows, topk]) : null;
      const recvMeta = this.#order.empty("i32", [numRecvRows, 2]);
      const data: InternodeHandleData = {
        engine: "internode",
        handleMem,
        recvMeta,
        recvCountPerExpert,
        numChannels,
        numExperts,
        topk,
        xDType: fp8 ? "fp8_e4m3" : "bf16",
      };
      this.#launchDispatch(args, data, numRecvRows, { recvX, recvXScales, recvTopkIdx, recvTopkWeights, recvMeta });
      return {
        recvX,
        recvXScales,
        recvTopkIdx,
        recvTopkWeights,
        numRecvTokensPerExpert: perExpert,
        recvCountPerExpert: this.#order.copyOf(recvCountPerExpert),
        numRecvTokens,
        handle: this.#makeHandle(data, numTokens, hidden, numRecvTokens, numRecvRows),
        event: this.#finish(args.asyncFinish),
      };
    };

    if (args.numWorstTokens > 0) return Promise.resolve(launchData(null, args.numWorstTokens, null));
    return this.#awaitNotify(notifySeq).then(() => {
      const rec = this.#record.data;
      const numRecv = rec[Rec.numRecv]!;
      // Every rank reads the same maxima, so every rank skips the data step alike (seq stays in step).
      const problem = this.#capacityProblem(cap, hidden, x.dtype, this.#capacities(hidden, 2, topk));
      if (problem !== null) {
        this.#seq++;
        throw new RangeError(problem);
      }
      const perExpert = Array.from(rec.subarray(Rec.expertCounts, Rec.expertCounts + numLocalExperts));
      return launchData(numRecv, numRecv, perExpert);
    });
  }

  /** The first area the notified counts do not fit (dispatch rows, or the combine pairs of this routing), else null. */
  #capacityProblem(cap: InternodeCapacities, hidden: number, dtype: string, combineCap: InternodeCapacities): string | null {
    const rec = this.#record.data;
    const checks: [needed: number, rank: number, fits: number, what: string][] = [
      [rec[Rec.maxRecv]!, rec[Rec.maxRecvRank]!, cap.stagingRows, `numNvlBytes: rank %r receives %n rows but its NVL buffer holds %f rows of hidden ${hidden} (${dtype})`],
      [rec[InternodeRec.maxRdmaSend]!, rec[InternodeRec.maxRdmaSendRank]!, cap.rdmaSendRows, "numRdmaBytes: rank %r sends %n tokens to other nodes but its RDMA send area holds %f"],
      [rec[InternodeRec.maxRdmaRecv]!, rec[InternodeRec.maxRdmaRecvRank]!, cap.rdmaRecvRows, "numRdmaBytes: rank %r forwards %n tokens from other nodes but its RDMA receive area holds %f"],
      [rec[InternodeRec.maxGather]!, rec[InternodeRec.maxGatherRank]!, combineCap.gatherPairs, "numNvlBytes: rank %r would gather %n combine rows but its NVL buffer holds %f"],
      [rec[InternodeRec.maxCombineRecv]!, rec[InternodeRec.maxCombineRecvRank]!, combineCap.combineRecvPairs, "numRdmaBytes: rank %r would receive %n combine rows from other nodes but its RDMA buffer holds %f"],
    ];
    for (const [needed, rank, fits, what] of checks) {
      if (needed > fits) {
        return `${what.replace("%r", String(rank)).replace("%n", String(needed)).replace("%f", String(fits))}; raise it (numNvlBytes = ${this.#init.numNvlBytes}, numRdmaBytes = ${this.#init.numRdmaBytes})`;
      }
    }
    return null;
  }

  async #awaitNotify(seq: number): Promise<void> {
    const ok = await pollNotify(this.#record.data, seq, this.#init.timeoutMs);
    this.#throwIfFailed();
    if (!ok) {
      this.#unusable = notifyTimeoutError(this.rank, "the internode notify step", this.#init.timeoutMs);
      throw this.#unusable;
    }
  }

  #launchDispatch(
    args: DispatchArgs,
    data: InternodeHandleData,
    recvRows: number,
    out: { recvX: DeviceTensor; recvXScales: DeviceTensor | null; recvTopkIdx: DeviceTensor | null; recvTopkWeights: DeviceTensor | null; recvMeta: DeviceTensor | null },
  ): void {
    const x = args.x;
    const fp8 = x.dtype === "fp8_e4m3";
    const seq = ++this.#seq;
    const w = new StructWriter(INTERNODE_COMM_FIELDS + INTERNODE_DISPATCH_EXTRA_FIELDS);
    this.#putComm(w, seq);
    w.put(data.handleMem.ptr).put(ptrOf(out.recvMeta)).put(ptrOf(x)).put(ptrOf(args.xScales)).put(ptrOf(args.topkIdx)).put(ptrOf(args.topkWeights));
    w.put(out.recvX.ptr).put(ptrOf(out.recvXScales)).put(ptrOf(out.recvTopkIdx)).put(ptrOf(out.recvTopkWeights));
    w.put(x.shape[0]!).put(x.shape[1]!).put(fp8 ? 1 : 2).put(args.topkIdx !== null ? data.topk : 0).put(data.numExperts);
    w.put(data.numChannels).put(recvRows);
    withDevice(this.device, () => check(native().bun_ep_internode_dispatch(w.done()), `rank ${this.rank}: dispatch (internode)`));
  }

  #cachedDispatch(args: DispatchArgs, handle: DispatchHandle): DispatchResult {
    const data = handle.data as InternodeHandleData;
    if (data?.engine !== "internode") throw new TypeError("handle: not a handle of this buffer's internode kernels");
    const x = args.x;
    const fp8 = x.dtype === "fp8_e4m3";
    const hidden = x.shape[1]!;
    const cap = this.#capacities(hidden, fp8 ? 1 : 2, 0);
    if (handle.numRecvRows > cap.stagingRows) {
      throw new RangeError(`numNvlBytes: ${handle.numRecvRows} rows do not fit the NVL buffer (${cap.stagingRows} rows); raise numNvlBytes`);
    }
    const recvX = this.#order.empty(x.dtype as "bf16" | "fp8_e4m3", [handle.numRecvRows, hidden]);
    const recvXScales = fp8 ? this.#order.empty("f32", [handle.numRecvRows, hidden / 128]) : null;
    this.#launchDispatch({ ...args, topkIdx: null, topkWeights: null }, data, handle.numRecvRows, {
      recvX,
      recvXScales,
      recvTopkIdx: null,
      recvTopkWeights: null,
      recvMeta: null,
    });
    return {
      recvX,
      recvXScales,
      recvTopkIdx: null,
      recvTopkWeights: null,
      numRecvTokensPerExpert: null,
      recvCountPerExpert: this.#order.copyOf(data.recvCountPerExpert),
      numRecvTokens: handle.numRecvTokens,
      handle,
      event: this.#finish(args.asyncFinish),
    };
  }

  #makeHandle(data: InternodeHandleData, numTokens: number, hidden: number, numRecvTokens: number | null, numRecvRows: number): DispatchHandle {
    const handle: DispatchHandle = { kind: "normal", bufferId: this.#init.bufferId, numTokens, hidden, numRecvTokens, numRecvRows, data };
    handleRegistry.register(handle, { engine: new WeakRef(this), data });
    return handle;
  }

  // ---- combine -----------------------------------------------------------------------------------

  async combine(args: CombineArgs): Promise<CombineResult> {
    this.#throwIfFailed();
    const data = args.handle.data as InternodeHandleData;
    if (data?.engine !== "internode") throw new TypeError("handle: not a handle of this buffer's internode kernels");
    const hidden = args.x.shape[1]!;
    const numTokens = args.handle.numTokens;
    if (args.topkWeights !== null && args.topkWeights.shape[1] !== data.topk) {
      throw new RangeError(`topkWeights: expected [${args.handle.numRecvRows}, ${data.topk}] (the dispatch's topk), got [${args.topkWeights.shape.join(", ")}]`);
    }
    const numBlocks = this.#numChannels(args.config.numSMs);
    this.#waitBefore(args.previousEvent);
    const combinedX = this.#order.empty("bf16", [numTokens, hidden]);
    const combinedTopkWeights = args.topkWeights !== null ? this.#order.empty("f32", [numTokens, data.topk]) : null;
    const seq = ++this.#seq;
    const w = new StructWriter(INTERNODE_COMM_FIELDS + INTERNODE_COMBINE_EXTRA_FIELDS);
    this.#putComm(w, seq);
    w.put(data.handleMem.ptr).put(data.recvMeta.ptr).put(ptrOf(args.x)).put(ptrOf(args.topkWeights));
    w.put(ptrOf(args.biases[0])).put(ptrOf(args.biases[1])).put(combinedX.ptr).put(ptrOf(combinedTopkWeights));
    w.put(numTokens).put(hidden).put(data.topk).put(numBlocks).put(args.handle.numRecvRows);
    withDevice(this.device, () => check(native().bun_ep_internode_combine(w.done()), `rank ${this.rank}: combine (internode)`));
    return { combinedX, combinedTopkWeights, event: this.#finish(args.asyncFinish) };
  }

  /** Throw a recorded device error, if any (tests call it after synchronizing). */
  checkErrors(): void {
    this.#throwIfFailed();
  }

  // ---- close -------------------------------------------------------------------------------------

  /** Collective: frees the symmetric buffers (every rank must close) and leaves NVSHMEM. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    try {
      this.commStream.synchronize();
    } finally {
      withDevice(this.device, () => {
        this.#shmem.free(this.#rdma);
        this.#shmem.free(this.#nvl);
      });
      this.#shmem.finalize();
      this.#workspace.free(this.commStream);
      this.commStream.synchronize();
      this.#record.free();
      this.#order.close();
    }
  }
}
