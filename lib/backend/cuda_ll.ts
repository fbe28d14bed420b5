// The low-latency (decode) engine of the CUDA backend: one registered buffer per rank (allocated
// once, opened by peers through CUDA IPC or shared by pointer in one process), the native context
// over it (cuda/src/low_latency.cu), and per-parity output tensors that live inside the buffer.
// Every call only launches kernels: no host sync, no allocation on the device, fixed shapes, so a
// decode step can be captured into a CUDA graph (`args.stream` may be a capturing stream).

import { ptr, toArrayBuffer } from "bun:ffi";
import { hostname } from "node:os";
import { BunEpError, check, native } from "../ffi.ts";
import { LL_COMBINE, LL_CONFIG, LL_DISPATCH, LL_PHASE, LL_TRANSPORT, LL_VIEWS } from "../native/low_latency.ts";
import { deviceProps, Event, withDevice } from "../stream.ts";
import { DeviceTensor, PinnedTensor, type Tensor } from "../tensor.ts";
import { Int64Fields } from "./cuda_common.ts";
import { exchangePeerPointers, PeerBuffer, type PeerPointers } from "./cuda_peers.ts";
import { DEFAULT_NVSHMEM_HEAP_BYTES, NvshmemContext } from "./nvshmem.ts";
import type {
  BackendInit,
  LowLatencyCombineArgs,
  LowLatencyCombineResult,
  LowLatencyDispatchArgs,
  LowLatencyDispatchResult,
  LowLatencyHandle,
} from "./types.ts";

/** Largest top-k by default: sizes the combine receive rows [maxTokensPerRank][maxTopk]. */
export const DEFAULT_LL_MAX_TOPK = 16;

export interface LowLatencyEngineOptions {
  init: BackendInit;
  /** CUDA stream handle used when a call gives no stream. */
  commStream: number;
  /** Largest top-k of any call (1..16, default 16). */
  maxTopk?: number;
  /** Use NVSHMEM for every peer (tests the cross-host path on one host); also BUN_EP_LL_FORCE_NVSHMEM=1. */
  forceNvshmem?: boolean;
}

/** Where the registered buffer lives and how peers reach it. */
type BufferMemory =
  | { kind: "peer"; buffer: PeerBuffer; peers: PeerPointers }
  | { kind: "nvshmem"; shmem: NvshmemContext; base: number };

/** The backend-private part of a LowLatencyHandle. */
interface HandleData {
  engine: LowLatencyEngine;
  numTopk: number;
}

/** Tensors over one parity's region of the buffer. */
export interface ParityViews {
  recvXBf16: DeviceTensor<"bf16">;
  recvXFp8: DeviceTensor<"fp8_e4m3">;
  scalesF32: DeviceTensor<"f32">;
  scalesUe8m0: DeviceTensor<"i32">;
  recvCount: DeviceTensor<"i32">;
  srcTokenIdx: DeviceTensor<"i32">;
  layoutRange: DeviceTensor<"i32">;
  combineBuffer: DeviceTensor<"bf16">;
  combinedX: DeviceTensor<"bf16">;
}

const outPointer = new BigUint64Array(1);
/** The hook of a call made without `hook: true`: nothing to do. One function for all such calls. */
const NO_HOOK = (): void => {};

function devicePointer(t: Tensor | null, name: string): number {
  if (t === null) return 0;
  if (t instanceof DeviceTensor) return t.ptr;
  if (t instanceof PinnedTensor) return t.devicePtr;
  throw new TypeError(`${name}: expected a DeviceTensor or PinnedTensor of the CUDA backend, got a tensor on ${String(t.device)}`);
}

/** How many ranks of the group run on this rank's GPU (their waiting grids must share it). */
async function countRanksOnDevice(init: BackendInit, pciBusId: number, pciDeviceId: number): Promise<number> {
  const key = `${hostname()}/${pciBusId}/${pciDeviceId}`;
  const all = await init.group.allGather(new TextEncoder().encode(key));
  const decoder = new TextDecoder();
  return all.filter((bytes) => decoder.decode(bytes) === key).length;
}

export class LowLatencyEngine {
  readonly rank: number;
  readonly numRanks: number;
  readonly numExperts: number;
  readonly numLocalExperts: number;
  readonly maxTokensPerRank: number;
  readonly hidden: number;
  readonly maxTopk: number;
  readonly device: number;
  readonly commStream: number;
  readonly bufferId: number;
  readonly ranksOnDevice: number;
  /** "peerPointers" (same process or CUDA IPC) or "nvshmem" (symmetric heap; puts where no pointer). */
  readonly transport: "peerPointers" | "nvshmem";
  /** Bytes of this rank's registered buffer. */
  readonly bufferBytes: number;
  readonly #init: BackendInit;
  readonly #memory: BufferMemory;
  #context: number;
  readonly #views: [ParityViews, ParityViews];
  /** Per parity, combinedX's first n rows at index n (made on first use). */
  readonly #combinedRowViews: [DeviceTensor<"bf16">[], DeviceTensor<"bf16">[]] = [[], []];
  /** The context's error record in mapped host memory (word 0 nonzero: a wait timed out). */
  readonly #errorWord: Int32Array;
  readonly #dispatchArgs = new Int64Fields(LL_DISPATCH.fields);
  readonly #combineArgs = new Int64Fields(LL_COMBINE.fields);
  #nextParity: 0 | 1 = 0;
  #closed = false;

  private constructor(
    opts: LowLatencyEngineOptions,
    fields: { maxTopk: number; ranksOnDevice: number; bufferBytes: number; memory: BufferMemory; context: number },
  ) {
    const { init } = opts;
    const ll = init.lowLatency!;
    this.#init = init;
    this.rank = init.group.rank;
    this.numRanks = init.group.size;
    this.numExperts = ll.numExperts;
    this.numLocalExperts = ll.numExperts / init.group.size;
    this.maxTokensPerRank = ll.maxTokensPerRank;
    this.hidden = ll.hidden;
    this.maxTopk = fields.maxTopk;
    this.device = init.device;
    this.commStream = opts.commStream;
    this.bufferId = init.bufferId;
    this.ranksOnDevice = fields.ranksOnDevice;
    this.bufferBytes = fields.bufferBytes;
    this.#memory = fields.memory;
    this.transport = fields.memory.kind === "nvshmem" ? "nvshmem" : "peerPointers";
    this.#context = fields.context;
    this.#views = [this.#makeViews(0), this.#makeViews(1)];
    const wordPointer = new BigUint64Array(1);
    check(native().bun_ep_ll_error_word(this.#context, wordPointer), `low-latency error word of rank ${this.rank}`);
    this.#errorWord = new Int32Array(toArrayBuffer(Number(wordPointer[0]), 0, 16));
  }

  /** Collective over init.group: allocate and register the buffer, exchange peer pointers. */
  static async create(opts: LowLatencyEngineOptions): Promise<LowLatencyEngine> {
    const { init } = opts;
    const ll = init.lowLatency;
    if (ll === null) throw new RangeError("init.lowLatency: expected { maxTokensPerRank, hidden, numExperts }, got null");
    const maxTopk = opts.maxTopk ?? Math.min(DEFAULT_LL_MAX_TOPK, ll.numExperts);
    const forceNvshmem = opts.forceNvshmem ?? process.env.BUN_EP_LL_FORCE_NVSHMEM === "1";
    const group = init.group;
    const props = deviceProps(init.device);
    const ranksOnDevice = await countRanksOnDevice(init, props.pciBusId, props.pciDeviceId);
    // Peers on other hosts need NVSHMEM; so does the forced path.
    const transport = forceNvshmem || group.ranksPerNode < group.size ? LL_TRANSPORT.nvshmem : LL_TRANSPORT.peerPointers;

    const config = new BigInt64Array(LL_CONFIG.fields);
    config[LL_CONFIG.rank] = BigInt(group.rank);
    config[LL_CONFIG.numRanks] = BigInt(group.size);
    config[LL_CONFIG.numExperts] = BigInt(ll.numExperts);
    config[LL_CONFIG.maxTokensPerRank] = BigInt(ll.maxTokensPerRank);
    config[LL_CONFIG.hidden] = BigInt(ll.hidden);
    config[LL_CONFIG.maxTopk] = BigInt(maxTopk);
    config[LL_CONFIG.timeoutNs] = BigInt(Math.round(init.timeoutMs * 1e6));
    config[LL_CONFIG.numSMs] = BigInt(props.multiProcessorCount);
    config[LL_CONFIG.ranksOnDevice] = BigInt(ranksOnDevice);
    config[LL_CONFIG.transport] = BigInt(transport);
    const lib = native();
    check(lib.bun_ep_ll_buffer_bytes(config, outPointer), `low-latency buffer size (rank ${group.rank})`);
    const bufferBytes = Number(outPointer[0]);
    const createContext = (localBuffer: number, peerPointers: readonly number[]): number => {
      const peerArray = new BigUint64Array(peerPointers.map((p) => BigInt(p)));
      config[LL_CONFIG.localBuffer] = BigInt(localBuffer);
      config[LL_CONFIG.peerBuffers] = BigInt(ptr(peerArray));
      return withDevice(init.device, () => {
        check(lib.bun_ep_ll_create(config, outPointer), `creating the low-latency context of rank ${group.rank}`);
        return Number(outPointer[0]);
      });
    };

    if (transport === LL_TRANSPORT.nvshmem) {
      const why = forceNvshmem ? " (forced)" : " (peers on other hosts)";
      // Throws NotSupported (naming why) in a build without NVSHMEM or with several ranks per process.
      const shmem = await NvshmemContext.init(group, init.device, {
        heapBytes: Math.max(DEFAULT_NVSHMEM_HEAP_BYTES, bufferBytes + 2 ** 29),
      }).catch((err: unknown) => {
        if (err instanceof BunEpError) throw new BunEpError(err.status, `low-latency NVSHMEM transport on rank ${group.rank}${why}`, err.message);
        throw err;
      });
      let base = 0;
      try {
        base = withDevice(init.device, () => shmem.alloc(bufferBytes));
        // Forced: every peer (this rank too) by puts. Else a load/store pointer where NVSHMEM has one.
        const pointers = Array.from({ length: group.size }, (_, r) => (forceNvshmem ? 0 : shmem.ptr(r, base)));
        const context = createContext(base, pointers);
        await group.barrier(); // nobody may send before every peer has cleared its flags
        return new LowLatencyEngine(opts, { maxTopk, ranksOnDevice, bufferBytes, memory: { kind: "nvshmem", shmem, base }, context });
      } catch (err) {
        if (base !== 0) shmem.free(base);
        shmem.finalize();
        throw err;
      }
    }

    const buffer = PeerBuffer.allocate(init.device, bufferBytes);
    let peers: PeerPointers | null = null;
    try {
      peers = await exchangePeerPointers(group, buffer.ptr, init.device);
      const context = createContext(buffer.ptr, peers.ptrs);
      // Nobody may send before every peer has cleared its flags.
      await group.barrier();
      return new LowLatencyEngine(opts, { maxTopk, ranksOnDevice, bufferBytes, memory: { kind: "peer", buffer, peers }, context });
    } catch (err) {
      peers?.close();
      buffer.free();
      throw err;
    }
  }

  /** Parity the next dispatch will use (tests poison its outputs before the call). */
  get nextParity(): 0 | 1 {
    return this.#nextParity;
  }

  /** The preallocated output tensors of one parity (tests and benchmarks). */
  outputTensors(parity: 0 | 1): Readonly<ParityViews> {
    return this.#views[parity];
  }

  /** Throws (BunEpError "Timeout", naming the rank) if a kernel of this engine waited in vain.
   * Reads the error word the kernels write (mapped host memory) with no native call; only a set
   * word goes to the native check, which words the error (and marks the context unusable). */
  checkError(): void {
    this.#checkOpen("checkError");
    if (this.#errorWord[0] === 0) return;
    check(native().bun_ep_ll_check(this.#context), `low-latency buffer ${this.bufferId} of rank ${this.rank}`);
  }

  /** The Backend form (lib/backend/cuda.ts): dispatchSync as a promise (rejected on bad input). */
  dispatch(args: LowLatencyDispatchArgs): Promise<LowLatencyDispatchResult> {
    try {
      return Promise.resolve(this.dispatchSync(args));
    } catch (err) {
      return Promise.reject(err);
    }
  }

  /** The Backend form: combineSync as a promise (rejected on bad input). */
  combine(args: LowLatencyCombineArgs): Promise<LowLatencyCombineResult> {
    try {
      return Promise.resolve(this.combineSync(args));
    } catch (err) {
      return Promise.reject(err);
    }
  }

  /** Launches the dispatch (send, and receive unless hook) and returns its outputs at once. */
  dispatchSync(args: LowLatencyDispatchArgs): LowLatencyDispatchResult {
    this.checkError();
    const numTokens = args.x.shape[0] ?? 0;
    const numTopk = args.topkIdx.shape[1] ?? 0;
    this.#checkCall("lowLatencyDispatch", args.maxTokensPerRank, args.numExperts, args.x.shape[1] ?? 0, numTopk);
    const parity = this.#nextParity;
    const stream = args.stream ?? this.commStream;
    this.#launchDispatch(args, numTokens, numTopk, parity, stream, args.hook ? LL_PHASE.send : LL_PHASE.send | LL_PHASE.recv);
    // Only a launched call takes the parity (a refused one leaves the alternation as it was).
    this.#nextParity = parity === 0 ? 1 : 0;

    const views = this.#views[parity];
    const handle: LowLatencyHandle = {
      kind: "low_latency",
      bufferId: this.bufferId,
      numTokens,
      maxTokensPerRank: this.maxTokensPerRank,
      hidden: this.hidden,
      numExperts: this.numExperts,
      srcTokenIdx: views.srcTokenIdx,
      layoutRange: views.layoutRange,
      bufferParity: parity,
      data: { engine: this, numTopk } satisfies HandleData,
    };
    return {
      recvX: args.useFp8 ? views.recvXFp8 : views.recvXBf16,
      recvXScales: !args.useFp8 ? null : args.useUe8m0 ? views.scalesUe8m0 : views.scalesF32,
      recvCount: views.recvCount,
      handle,
      event: args.asyncFinish && !args.hook ? this.#recordEvent(stream) : null,
      hook: args.hook
        ? this.#hookOnce("lowLatencyDispatch", () => this.#launchDispatch(args, numTokens, numTopk, parity, stream, LL_PHASE.recv))
        : NO_HOOK,
    };
  }

  // The native call of a dispatch phase (the struct is this engine's, refilled per launch). Its
  // error message is built only on failure: a template string per call showed in the profile.
  #launchDispatch(args: LowLatencyDispatchArgs, numTokens: number, numTopk: number, parity: 0 | 1, stream: number, phases: number): void {
    const a = this.#dispatchArgs;
    a.set(LL_DISPATCH.x, devicePointer(args.x, "x"));
    a.set(LL_DISPATCH.topkIdx, devicePointer(args.topkIdx, "topkIdx"));
    a.set(LL_DISPATCH.numTokens, numTokens);
    a.set(LL_DISPATCH.numTopk, numTopk);
    a.set(LL_DISPATCH.parity, parity);
    a.set(LL_DISPATCH.useFp8, args.useFp8 ? 1 : 0);
    a.set(LL_DISPATCH.roundScale, args.roundScale ? 1 : 0);
    a.set(LL_DISPATCH.useUe8m0, args.useUe8m0 ? 1 : 0);
    a.set(LL_DISPATCH.cumulativeRecvStats, devicePointer(args.cumulativeRecvStats, "cumulativeRecvStats"));
    a.set(LL_DISPATCH.waitStats, devicePointer(args.waitStats, "waitStats"));
    a.set(LL_DISPATCH.phases, phases);
    a.set(LL_DISPATCH.stream, stream);
    const status = native().bun_ep_ll_dispatch(this.#context, a.data);
    if (status !== 0) check(status, `lowLatencyDispatch on rank ${this.rank}`);
  }

  /** Launches the combine (send, and receive unless hook) and returns combinedX at once. */
  combineSync(args: LowLatencyCombineArgs): LowLatencyCombineResult {
    this.checkError();
    const data = this.#handleData(args.handle);
    const numTokens = args.handle.numTokens;
    const parity = args.handle.bufferParity;
    const stream = args.stream ?? this.commStream;
    const combinedX = args.out ?? this.#combinedRows(parity, numTokens);
    this.#launchCombine(args, data.numTopk, combinedX, stream, args.hook ? LL_PHASE.send : LL_PHASE.send | LL_PHASE.recv);
    return {
      combinedX,
      event: args.asyncFinish && !args.hook ? this.#recordEvent(stream) : null,
      hook: args.hook
        ? this.#hookOnce("lowLatencyCombine", () => this.#launchCombine(args, data.numTopk, combinedX, stream, LL_PHASE.recv))
        : NO_HOOK,
    };
  }

  // The native call of a combine phase (as #launchDispatch).
  #launchCombine(args: LowLatencyCombineArgs, numTopk: number, combinedX: Tensor, stream: number, phases: number): void {
    const a = this.#combineArgs;
    a.set(LL_COMBINE.x, devicePointer(args.x, "x"));
    a.set(LL_COMBINE.topkIdx, devicePointer(args.topkIdx, "topkIdx"));
    a.set(LL_COMBINE.topkWeights, devicePointer(args.topkWeights, "topkWeights"));
    a.set(LL_COMBINE.numTokens, args.handle.numTokens);
    a.set(LL_COMBINE.numTopk, numTopk);
    a.set(LL_COMBINE.parity, args.handle.bufferParity);
    a.set(LL_COMBINE.out, devicePointer(combinedX, "out"));
    a.set(LL_COMBINE.phases, phases);
    a.set(LL_COMBINE.stream, stream);
    const status = native().bun_ep_ll_combine(this.#context, a.data);
    if (status !== 0) check(status, `lowLatencyCombine on rank ${this.rank}`);
  }

  /** bf16 [El, R*M, H]: write expert outputs here for a zero-copy combine with this handle. */
  getNextCombineBuffer(handle: LowLatencyHandle): DeviceTensor<"bf16"> {
    this.#handleData(handle);
    return this.#views[handle.bufferParity].combineBuffer;
  }

  /** Collective: every rank, with no low-latency call in flight, resets flags and sequence numbers. */
  async clean(): Promise<void> {
    this.#checkOpen("clean");
    const lib = native();
    check(lib.bun_ep_stream_synchronize(this.commStream), `cleanLowLatencyBuffer on rank ${this.rank}`);
    await this.#init.group.barrier();
    check(lib.bun_ep_ll_clean(this.#context, this.commStream), `cleanLowLatencyBuffer on rank ${this.rank}`);
    check(lib.bun_ep_stream_synchronize(this.commStream), `cleanLowLatencyBuffer on rank ${this.rank}`);
    this.#nextParity = 0;
    await this.#init.group.barrier();
  }

  /** alive[r] false: rank r is neither sent to nor waited for. Applies to later launches and graphs. */
  setRankMask(alive: readonly boolean[]): void {
    this.#checkOpen("setRankMask");
    if (alive.length !== this.numRanks) {
      throw new RangeError(`alive: expected ${this.numRanks} entries (one per rank), got ${alive.length}`);
    }
    const values = Int32Array.from(alive, (a) => (a ? 1 : 0));
    check(native().bun_ep_ll_set_rank_mask(this.#context, values), `setRankMask on rank ${this.rank}`);
  }

  /** Collective: waits for this rank's work, then releases the context, the mappings and the buffer. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    const lib = native();
    withDevice(this.device, () => lib.bun_ep_stream_synchronize(this.commStream));
    await this.#init.group.barrier(); // no peer still writes into our buffer
    lib.bun_ep_ll_destroy(this.#context);
    this.#context = 0;
    const memory = this.#memory;
    if (memory.kind === "nvshmem") {
      // Both collective inside NVSHMEM: every rank closes its engines in the same order.
      withDevice(this.device, () => memory.shmem.free(memory.base));
      memory.shmem.finalize();
      return;
    }
    memory.peers.close();
    await this.#init.group.barrier(); // every peer closed its mapping of our buffer
    memory.buffer.free();
  }

  // ---- private ----------------------------------------------------------------------------------

  #makeViews(parity: 0 | 1): ParityViews {
    const v = new BigUint64Array(LL_VIEWS.fields);
    check(native().bun_ep_ll_views(this.#context, parity, v), "low-latency buffer views");
    const at = (field: number): number => Number(v[field]!);
    const El = this.numLocalExperts;
    const slots = this.numRanks * this.maxTokensPerRank;
    const H = this.hidden;
    const d = this.device;
    return {
      recvXBf16: DeviceTensor.fromPointer(at(LL_VIEWS.recvX), "bf16", [El, slots, H], d),
      recvXFp8: DeviceTensor.fromPointer(at(LL_VIEWS.recvX), "fp8_e4m3", [El, slots, H], d),
      scalesF32: DeviceTensor.fromPointer(at(LL_VIEWS.recvXScales), "f32", [El, slots, H / 128], d),
      scalesUe8m0: DeviceTensor.fromPointer(at(LL_VIEWS.recvXScales), "i32", [El, slots, Math.floor(H / 512)], d),
      recvCount: DeviceTensor.fromPointer(at(LL_VIEWS.recvCount), "i32", [El], d),
      srcTokenIdx: DeviceTensor.fromPointer(at(LL_VIEWS.srcTokenIdx), "i32", [El, slots], d),
      layoutRange: DeviceTensor.fromPointer(at(LL_VIEWS.layoutRange), "i32", [El, this.numRanks, 2], d),
      combineBuffer: DeviceTensor.fromPointer(at(LL_VIEWS.combineBuffer), "bf16", [El, slots, H], d),
      combinedX: DeviceTensor.fromPointer(at(LL_VIEWS.combinedX), "bf16", [this.maxTokensPerRank, H], d),
    };
  }

  #checkCall(what: string, maxTokensPerRank: number, numExperts: number, hidden: number, numTopk: number): void {
    this.#checkOpen(what);
    const mismatch = (name: string, got: number, expected: number): never => {
      throw new RangeError(`${what}: ${name} is ${got} but this buffer was created for ${expected}`);
    };
    if (maxTokensPerRank !== this.maxTokensPerRank) mismatch("maxTokensPerRank", maxTokensPerRank, this.maxTokensPerRank);
    if (numExperts !== this.numExperts) mismatch("numExperts", numExperts, this.numExperts);
    if (hidden !== this.hidden) mismatch("hidden", hidden, this.hidden);
    if (numTopk < 1 || numTopk > this.maxTopk) {
      throw new RangeError(`${what}: topkIdx has ${numTopk} columns; expected 1..${this.maxTopk} (maxTopk of this buffer)`);
    }
  }

  #handleData(handle: LowLatencyHandle): HandleData {
    this.#checkOpen("lowLatencyCombine");
    const data = handle.data as HandleData | undefined;
    if (handle.kind !== "low_latency" || data?.engine !== this) {
      throw new RangeError(`handle: expected a low-latency handle of buffer ${this.bufferId}, got one of buffer ${handle.bufferId}`);
    }
    return data;
  }

  /** combinedX's first `numTokens` rows of one parity, made once per (parity, count): creating a
   * tensor view per call was most of combineSync's JS time (CPU profile, session 6). */
  #combinedRows(parity: 0 | 1, numTokens: number): DeviceTensor<"bf16"> {
    const cache = this.#combinedRowViews[parity];
    let rows = cache[numTokens];
    if (rows === undefined) {
      rows = this.#views[parity].combinedX.rows(0, numTokens);
      cache[numTokens] = rows;
    }
    return rows;
  }

  #hookOnce(what: string, launch: () => void): () => void {
    let called = false;
    return () => {
      if (called) throw new Error(`${what}: hook() may be called only once`);
      called = true;
      this.checkError();
      launch();
    };
  }

  #recordEvent(stream: number): Event {
    return withDevice(this.device, () => Event.create({ timing: false }).record(stream));
  }

  #checkOpen(what: string): void {
    if (this.#closed) throw new Error(`${what}: the low-latency engine of rank ${this.rank} was closed`);
  }
}

export { BunEpError };
