// The host backend: the EpBuffer API on CPU memory. Each call exchanges the inputs every rank needs
// through the rank group (one allGather of a compact binary encoding), then each rank computes its
// own outputs with the reference's per-rank functions (lib/reference.ts), so results equal the
// reference bit for bit. It needs no compiler and no GPU; it is the demo's and the tests' backend
// where no GPU exists, and works with LocalGroup (ranks of one process: issue every rank's call
// before awaiting any) and with TcpGroup (one process per rank).
//
// Low-latency hook mode mirrors the GPU: the send call does the exchange and returns; hook() does
// the receive step locally (reference computation into the tensors already returned).

import { DTYPES, DTYPE_BYTES, typedView, type DType } from "../dtype.ts";
import type { Group } from "../group.ts";
import {
  referenceCombineRank,
  referenceDispatchRank,
  referenceLayout,
  referenceLowLatencyCombineRank,
  referenceLowLatencyDispatchRank,
  type RankCombineInput,
  type RankDispatchInput,
} from "../reference.ts";
import { HostTensor, type Tensor } from "../tensor.ts";
import { EpArgumentError, numWorstTokensError } from "../validate.ts";
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

// ---- wire format: a list of optional tensors ----
// u32 words: [magic, count, then per entry: present, dtype index, ndim, dims...], then each
// present tensor's bytes, each starting at a multiple of 8 (so typed views need no copy).

const WIRE_MAGIC = 0x45504831; // "EPH1"

function align8(n: number): number {
  return (n + 7) & ~7;
}

function bytesOf(t: HostTensor): Uint8Array {
  return new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength);
}

export function encodeTensors(tensors: readonly (HostTensor | null)[]): Uint8Array {
  const header: number[] = [WIRE_MAGIC, tensors.length];
  for (const t of tensors) {
    if (t === null) header.push(0, 0, 0);
    else header.push(1, DTYPES.indexOf(t.dtype), t.shape.length, ...t.shape);
  }
  let size = align8(header.length * 4);
  for (const t of tensors) if (t !== null) size += align8(t.byteLength);
  const out = new Uint8Array(size);
  new Uint32Array(out.buffer, 0, header.length).set(header);
  let offset = align8(header.length * 4);
  for (const t of tensors) {
    if (t === null) continue;
    out.set(bytesOf(t), offset);
    offset += align8(t.byteLength);
  }
  return out;
}

export function decodeTensors(bytes: Uint8Array, from: number): (HostTensor | null)[] {
  // Views need 8-byte alignment of the whole message: copy when the group handed us an odd offset.
  const buf = bytes.byteOffset % 8 === 0 ? bytes : bytes.slice();
  const wordCount = Math.floor(buf.byteLength / 4);
  const words = new Uint32Array(buf.buffer, buf.byteOffset, wordCount);
  const bad = (what: string): never => {
    throw new Error(`host backend: malformed exchange message from rank ${from}: ${what}`);
  };
  if (words[0] !== WIRE_MAGIC) bad("bad magic");
  const count = words[1] ?? bad("truncated header");
  let w = 2;
  const entries: { dtype: DType; shape: number[] }[] = [];
  const present: boolean[] = [];
  for (let i = 0; i < count; i++) {
    const isPresent = words[w++] === 1;
    const dtype = DTYPES[words[w++] ?? bad("truncated header")] ?? bad("unknown dtype");
    const ndim = words[w++] ?? bad("truncated header");
    const shape = Array.from(words.subarray(w, w + ndim));
    if (shape.length !== ndim) bad("truncated shape");
    w += ndim;
    present.push(isPresent);
    entries.push({ dtype, shape });
  }
  let offset = align8(w * 4);
  return entries.map(({ dtype, shape }, i) => {
    if (!present[i]) return null;
    const numel = shape.reduce((a, b) => a * b, 1);
    const byteLength = numel * DTYPE_BYTES[dtype];
    if (offset + byteLength > buf.byteLength) bad("truncated data");
    const t = new HostTensor(dtype, shape, typedView(dtype, buf.buffer, buf.byteOffset + offset, numel));
    offset += align8(byteLength);
    return t;
  });
}

// ---- helpers ----

function host<D extends DType>(t: Tensor, dtype?: D): HostTensor<D> {
  // EpBuffer validated device "cpu": a HostTensor, or another tensor whose memory the host reads
  // through a typed array (PinnedTensor). Wrapping shares that memory, so in-place outputs work.
  if (dtype !== undefined && t.dtype !== dtype) throw new TypeError(`host backend: expected ${dtype}, got ${t.dtype}`);
  if (t instanceof HostTensor) return t as HostTensor<D>;
  const data = (t as { data?: unknown }).data;
  if (t.device === "cpu" && ArrayBuffer.isView(data)) return new HostTensor(t.dtype, t.shape, data as never) as HostTensor<D>;
  throw new TypeError(`host backend: expected a tensor in host memory, got ${t.dtype} [${t.shape.join(", ")}] on ${String(t.device)}`);
}

function i32Tensor(values: ArrayLike<number>): HostTensor<"i32"> {
  return new HostTensor("i32", [values.length], Int32Array.from(values));
}

/** `t` with `rows` rows: the same tensor when it has them already, else a copy padded with `fill`. */
function padRows<D extends DType>(t: HostTensor<D>, rows: number, fill: number | bigint = 0): HostTensor<D> {
  if (t.shape[0] === rows) return t;
  const out = HostTensor.full(t.dtype, [rows, ...t.shape.slice(1)], fill);
  (out.data as { set(a: ArrayLike<number | bigint>): void }).set(t.data);
  return out;
}

function once(what: string, fn: () => void): () => void {
  let called = false;
  return () => {
    if (called) throw new EpArgumentError(what, "hook", "hook() was already called; call it exactly once per call");
    called = true;
    fn();
  };
}

/** What a normal handle keeps: enough to replay the routing (cached dispatch) and to combine. */
interface HostDispatchData {
  numExperts: number;
  expertAlignment: number;
  /** Every rank's routing at dispatch time (the host backend already has them from the exchange). */
  topkIdxPerRank: HostTensor<"i64">[];
  numRecvTokens: number;
  recvSrcRank: Int32Array;
  recvSrcToken: Int32Array;
  recvCountPerExpert: HostTensor<"i32">;
}

interface HostLowLatencyData {
  alive: boolean[];
}

class HostBackend implements Backend {
  readonly kind = "host" as const;
  readonly rank: number;
  readonly numRanks: number;
  readonly #group: Group;
  readonly #bufferId: number;
  readonly #timeoutMs: number;
  #alive: boolean[];
  #parity: 0 | 1 = 0;
  /** The two alternating zero-copy combine buffers, allocated at first use with a handle's shape. */
  readonly #combineBuffers: (HostTensor<"bf16"> | null)[] = [null, null];
  #closed = false;

  constructor(init: BackendInit) {
    this.#group = init.group;
    this.rank = init.group.rank;
    this.numRanks = init.group.size;
    this.#bufferId = init.bufferId;
    this.#timeoutMs = init.timeoutMs;
    this.#alive = new Array<boolean>(this.numRanks).fill(true);
  }

  /** One allGather of every rank's tensors, bounded by timeoutMs. Result: [rank][entry]. */
  async #exchange(method: string, tensors: readonly (HostTensor | null)[]): Promise<(HostTensor | null)[][]> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new Error(`${method}: rank ${this.rank} timed out after ${this.#timeoutMs} ms waiting for the other ranks' exchange`)),
        this.#timeoutMs,
      );
    });
    try {
      const all = await Promise.race([this.#group.allGather(encodeTensors(tensors)), timeout]);
      return all.map((bytes, r) => decodeTensors(bytes, r));
    } finally {
      clearTimeout(timer);
    }
  }

  getDispatchLayout(topkIdx: Tensor, numExperts: number, previousEvent: EventLike | null, _asyncFinish: boolean): DispatchLayout {
    previousEvent?.synchronize();
    const layout = referenceLayout(host(topkIdx, "i64"), numExperts, this.numRanks);
    return { ...layout, numTokensPerRdmaRank: null, event: null };
  }

  async dispatch(args: DispatchArgs): Promise<DispatchResult> {
    args.previousEvent?.synchronize();
    if (args.handle !== null) return this.#cachedDispatch(args, args.handle);
    const layout = args.layout!;
    const numExperts = layout.numTokensPerExpert.shape[0]!;
    const all = await this.#exchange("dispatch", [host(args.x), args.xScales && host(args.xScales), host(args.topkIdx!), args.topkWeights && host(args.topkWeights)]);
    const inputs: RankDispatchInput[] = all.map(([x, xScales, topkIdx, topkWeights]) => ({
      x: x!,
      xScales: xScales as HostTensor<"f32"> | null,
      topkIdx: topkIdx as HostTensor<"i64">,
      topkWeights: topkWeights as HostTensor<"f32"> | null,
    }));
    const out = referenceDispatchRank(this.rank, inputs, numExperts, args.expertAlignment);
    const numRecvTokens = out.recvSrcRank.length;
    if (args.numWorstTokens > 0 && numRecvTokens > args.numWorstTokens) {
      throw numWorstTokensError("dispatch", this.rank, numRecvTokens, args.numWorstTokens);
    }
    const rows = args.numWorstTokens > 0 ? args.numWorstTokens : numRecvTokens;
    const hostKnowsCount = args.numWorstTokens === 0; // as on the GPU: no host wait with numWorstTokens
    const recvCountPerExpert = i32Tensor(out.numRecvTokensPerExpert);
    const data: HostDispatchData = {
      numExperts,
      expertAlignment: args.expertAlignment,
      topkIdxPerRank: inputs.map((i) => i.topkIdx),
      numRecvTokens,
      recvSrcRank: out.recvSrcRank,
      recvSrcToken: out.recvSrcToken,
      recvCountPerExpert,
    };
    const handle: DispatchHandle = {
      kind: "normal",
      bufferId: this.#bufferId,
      numTokens: args.x.shape[0]!,
      hidden: args.x.shape[1]!,
      numRecvTokens: hostKnowsCount ? numRecvTokens : null,
      numRecvRows: rows,
      data,
    };
    return {
      recvX: padRows(out.recvX, rows),
      recvXScales: out.recvXScales && padRows(out.recvXScales, rows),
      recvTopkIdx: padRows(out.recvTopkIdx, rows, -1n),
      recvTopkWeights: out.recvTopkWeights && padRows(out.recvTopkWeights, rows),
      numRecvTokensPerExpert: hostKnowsCount ? out.numRecvTokensPerExpert : null,
      recvCountPerExpert: recvCountPerExpert.clone(),
      numRecvTokens: hostKnowsCount ? numRecvTokens : null,
      handle,
      event: null,
    };
  }

  /** The handle's rows, in its order, for a new x: the reference replayed on the saved routing. */
  async #cachedDispatch(args: DispatchArgs, handle: DispatchHandle): Promise<DispatchResult> {
    const data = handle.data as HostDispatchData;
    const all = await this.#exchange("dispatch", [host(args.x), args.xScales && host(args.xScales)]);
    const inputs: RankDispatchInput[] = all.map(([x, xScales], r) => ({
      x: x!,
      xScales: xScales as HostTensor<"f32"> | null,
      topkIdx: data.topkIdxPerRank[r]!,
      topkWeights: null,
    }));
    const out = referenceDispatchRank(this.rank, inputs, data.numExperts, data.expertAlignment);
    return {
      recvX: padRows(out.recvX, handle.numRecvRows),
      recvXScales: out.recvXScales && padRows(out.recvXScales, handle.numRecvRows),
      recvTopkIdx: null,
      recvTopkWeights: null,
      numRecvTokensPerExpert: null,
      recvCountPerExpert: data.recvCountPerExpert.clone(),
      numRecvTokens: handle.numRecvTokens,
      handle,
      event: null,
    };
  }

  async combine(args: CombineArgs): Promise<CombineResult> {
    args.previousEvent?.synchronize();
    const data = args.handle.data as HostDispatchData;
    // Rows past numRecvTokens (numWorstTokens padding) carry nothing: they are not sent.
    const x = host(args.x, "bf16").rows(0, data.numRecvTokens);
    const weights = args.topkWeights && host(args.topkWeights, "f32").rows(0, data.numRecvTokens);
    const all = await this.#exchange("combine", [x, weights, i32Tensor(data.recvSrcRank), i32Tensor(data.recvSrcToken)]);
    const inputs: RankCombineInput[] = all.map(([rx, rw, srcRank, srcToken]) => ({
      x: rx as HostTensor<"bf16">,
      topkWeights: rw as HostTensor<"f32"> | null,
      recvSrcRank: (srcRank as HostTensor<"i32">).data,
      recvSrcToken: (srcToken as HostTensor<"i32">).data,
    }));
    const biases = args.biases.map((b) => host(b, "bf16"));
    const out = referenceCombineRank(this.rank, args.handle.numTokens, inputs, biases);
    return { combinedX: out.combinedX, combinedTopkWeights: out.combinedTopkWeights, event: null };
  }

  async lowLatencyDispatch(args: LowLatencyDispatchArgs): Promise<LowLatencyDispatchResult> {
    const alive = [...this.#alive];
    const waitStart = Bun.nanoseconds();
    const all = await this.#exchange("lowLatencyDispatch", [host(args.x, "bf16"), host(args.topkIdx, "i64")]);
    const waitedNs = BigInt(Bun.nanoseconds() - waitStart);
    const inputs = all.map(([x, topkIdx]) => ({ x: x as HostTensor<"bf16">, topkIdx: topkIdx as HostTensor<"i64"> }));

    // The receive tensors exist now; the receive step (hook) fills them.
    const [numTokens, hidden] = [args.x.shape[0]!, args.x.shape[1]!];
    const numLocalExperts = args.numExperts / this.numRanks;
    const slots = this.numRanks * args.maxTokensPerRank;
    const numGroups = hidden / 128;
    const recvX = new HostTensor(args.useFp8 ? "fp8_e4m3" : "bf16", [numLocalExperts, slots, hidden]);
    const recvXScales = !args.useFp8
      ? null
      : args.useUe8m0
        ? new HostTensor("i32", [numLocalExperts, slots, numGroups / 4])
        : new HostTensor("f32", [numLocalExperts, slots, numGroups]);
    const recvCount = new HostTensor("i32", [numLocalExperts]);
    const srcTokenIdx = new HostTensor("i32", [numLocalExperts, slots]);
    const layoutRange = new HostTensor("i32", [numLocalExperts, this.numRanks, 2]);

    const receive = () => {
      const out = referenceLowLatencyDispatchRank(this.rank, inputs, args.maxTokensPerRank, args.numExperts, {
        useFp8: args.useFp8,
        roundScale: args.roundScale,
        useUe8m0: args.useUe8m0,
        alive,
      });
      recvX.data.set(out.recvX.data as never);
      if (recvXScales !== null) recvXScales.data.set(out.recvXScales!.data as never);
      recvCount.data.set(out.recvCount.data);
      srcTokenIdx.data.set(out.srcTokenIdx.data);
      layoutRange.data.set(out.layoutRange.data);
      if (args.cumulativeRecvStats !== null) {
        const stats = host(args.cumulativeRecvStats, "i32").data;
        for (let e = 0; e < numLocalExperts; e++) stats[e]! += out.recvCount.data[e]!;
      }
      if (args.waitStats !== null) {
        // One allGather waits on every rank at once: each live source is charged the whole wait.
        const stats = host(args.waitStats, "i64").data;
        for (let s = 0; s < this.numRanks; s++) if (alive[s]) stats[s]! += waitedNs;
      }
    };

    const handle: LowLatencyHandle = {
      kind: "low_latency",
      bufferId: this.#bufferId,
      numTokens,
      maxTokensPerRank: args.maxTokensPerRank,
      hidden,
      numExperts: args.numExperts,
      srcTokenIdx,
      layoutRange,
      bufferParity: this.#parity,
      data: { alive } satisfies HostLowLatencyData,
    };
    this.#parity = this.#parity === 0 ? 1 : 0;
    let hook: () => void = () => {};
    if (args.hook) hook = once("lowLatencyDispatch", receive);
    else receive();
    return { recvX, recvXScales, recvCount, handle, event: null, hook };
  }

  async lowLatencyCombine(args: LowLatencyCombineArgs): Promise<LowLatencyCombineResult> {
    const handle = args.handle;
    const { alive } = handle.data as HostLowLatencyData;
    let expertOutputs = host(args.x, "bf16");
    if (args.zeroCopy) {
      const buffer = this.#combineBuffers[handle.bufferParity];
      if (buffer === null || buffer === undefined || buffer.shape.join() !== args.x.shape.join()) {
        throw new EpArgumentError("lowLatencyCombine", "zeroCopy", "zeroCopy needs the expert outputs in getNextLowLatencyCombineBuffer(handle); call it first and write into it");
      }
      expertOutputs = buffer;
    }
    const all = await this.#exchange("lowLatencyCombine", [expertOutputs, host(handle.layoutRange, "i32")]);
    const outputsPerRank = all.map(([x]) => x as HostTensor<"bf16">);
    const rangesPerRank = all.map(([, range]) => range as HostTensor<"i32">);
    const combinedX = args.out !== null ? host(args.out, "bf16") : new HostTensor("bf16", [handle.numTokens, handle.hidden]);
    const topkIdx = host(args.topkIdx, "i64").clone();
    const topkWeights = host(args.topkWeights, "f32").clone();
    const receive = () => {
      const out = referenceLowLatencyCombineRank(this.rank, outputsPerRank, rangesPerRank, topkIdx, topkWeights, handle.numExperts, alive);
      combinedX.data.set(out.data);
    };
    let hook: () => void = () => {};
    if (args.hook) hook = once("lowLatencyCombine", receive);
    else receive();
    return { combinedX, event: null, hook };
  }

  getNextLowLatencyCombineBuffer(handle: LowLatencyHandle): Tensor {
    const shape = [handle.numExperts / this.numRanks, this.numRanks * handle.maxTokensPerRank, handle.hidden];
    const existing = this.#combineBuffers[handle.bufferParity];
    if (existing !== null && existing !== undefined && existing.shape.join() === shape.join()) return existing;
    const buffer = new HostTensor("bf16", shape);
    this.#combineBuffers[handle.bufferParity] = buffer;
    return buffer;
  }

  async cleanLowLatencyBuffer(): Promise<void> {
    for (const b of this.#combineBuffers) b?.data.fill(0);
    this.#parity = 0;
    await this.#group.barrier();
  }

  setRankMask(alive: readonly boolean[]): void {
    this.#alive = [...alive];
  }

  fromHost(t: HostTensor): Tensor {
    return t.clone();
  }

  toHost(t: Tensor): HostTensor {
    return host(t).clone();
  }

  async close(): Promise<void> {
    this.#closed = true;
    this.#combineBuffers.fill(null);
  }
}

export async function createHostBackend(init: BackendInit): Promise<Backend> {
  return new HostBackend(init);
}
