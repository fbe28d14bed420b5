// Rank groups: how ranks find each other and exchange small byte strings (CUDA IPC handles,
// NVSHMEM unique ids, host-backend payloads). Two implementations: TcpGroup (a store held by rank 0,
// torchrun variables) and LocalGroup (several ranks in one process). A server can plug in its own
// by implementing `Group`.
//
// How both work: every collective gets a sequence number (1, 2, ... in call order on each rank).
// A hub (in rank 0's process for TcpGroup, shared memory for LocalGroup) receives each rank's
// contribution for #n, checks that every rank called the same collective, and forwards it to every
// other rank at once. A rank's call resolves when it holds every rank's part for #n, so it knows at
// any moment exactly which ranks have not arrived: that is what its timeout error names. Parts for
// a later #n+1 may arrive before #n resolves; they wait in their own slot, so collectives never mix.

import type { Socket, TCPSocketListener } from "bun";

/** The whole contract a rank group must meet. Every method is collective over all ranks. */
export interface Group {
  /** This rank, 0 <= rank < size. */
  readonly rank: number;
  /** Number of ranks in the group. */
  readonly size: number;
  /** Ranks per node (host) for the node layout; `size` when every rank is on one node. */
  readonly ranksPerNode: number;
  /** Every rank's bytes, index = rank. Rejects with an error naming missing ranks on timeout. */
  allGather(bytes: Uint8Array): Promise<Uint8Array[]>;
  /** `root`'s bytes on every rank (`bytes` is ignored on other ranks). */
  broadcast(bytes: Uint8Array, root: number): Promise<Uint8Array>;
  /** Resolves once every rank has called it. */
  barrier(): Promise<void>;
  /** Leave the group; later calls reject. */
  close(): void;
}

// ---------------------------------------------------------------------------------------------
// Errors

/** What went wrong, for code that wants to react without parsing messages. */
export type GroupErrorCode =
  | "timeout" // a collective waited longer than timeoutMs
  | "rank-gone" // a rank closed the group or lost its connection
  | "store-lost" // this rank lost its connection to rank 0's store
  | "mismatch" // ranks called different collectives (or roots) at the same sequence number
  | "protocol" // a malformed or unexpected frame
  | "closed" // this rank already closed the group
  | "broken" // an earlier error left the group unusable
  | "join-timeout" // not every rank joined within connectTimeoutMs
  | "unreachable" // the store could not be reached within connectTimeoutMs
  | "listen"; // rank 0 could not open the store's port

/** Every failure of a group operation. `ranks` are the ranks the message names (may be empty). */
export class GroupError extends Error {
  override readonly name = "GroupError";
  constructor(
    message: string,
    readonly code: GroupErrorCode,
    readonly ranks: readonly number[] = [],
  ) {
    super(message);
  }
}

/** "rank 3" or "ranks 2, 3". */
function describeRanks(ranks: readonly number[]): string {
  return ranks.length === 1 ? `rank ${ranks[0]}` : `ranks ${ranks.join(", ")}`;
}

// ---------------------------------------------------------------------------------------------
// Options shared by both implementations

/** Default wait of every collective. */
export const DEFAULT_TIMEOUT_MS = 60_000;
/** Default bound of one frame's payload (one rank's contribution to one collective). */
export const DEFAULT_MAX_FRAME_BYTES = 1 << 30;

function checkPositiveInteger(value: number, name: string): void {
  if (!Number.isSafeInteger(value) || value < 1) {
    throw new RangeError(`${name} must be a positive integer, got ${String(value)}`);
  }
}

function checkLayout(rank: number, size: number, ranksPerNode: number, where: string): void {
  checkPositiveInteger(size, `${where}: size`);
  if (!Number.isSafeInteger(rank) || rank < 0 || rank >= size) {
    throw new RangeError(`${where}: rank must be an integer in [0, ${size}), got ${String(rank)}`);
  }
  checkPositiveInteger(ranksPerNode, `${where}: ranksPerNode`);
  if (size % ranksPerNode !== 0) {
    throw new RangeError(
      `${where}: size ${size} is not a multiple of ranksPerNode ${ranksPerNode}`,
    );
  }
}

// ---------------------------------------------------------------------------------------------
// The per-rank side of a collective: sequence numbers, parts received, timeouts.

/** Collective kinds, as sent on the wire. */
const enum Kind {
  AllGather = 1,
  Broadcast = 2,
  Barrier = 3,
}
const KIND_NAMES: Record<number, string> = {
  [Kind.AllGather]: "allGather",
  [Kind.Broadcast]: "broadcast",
  [Kind.Barrier]: "barrier",
};
function isKind(value: number): value is Kind {
  return value === Kind.AllGather || value === Kind.Broadcast || value === Kind.Barrier;
}
function describeCall(kind: Kind, seq: number, root: number): string {
  return kind === Kind.Broadcast ? `broadcast #${seq} (root ${root})` : `${KIND_NAMES[kind]} #${seq}`;
}

/** Why a rank left, as sent on the wire. */
const enum GoneReason {
  Closed = 1,
  ConnectionLost = 2,
  ProtocolError = 3,
}
function describeGone(reason: number): string {
  switch (reason) {
    case GoneReason.Closed:
      return "closed the group";
    case GoneReason.ConnectionLost:
      return "lost its connection to the group";
    case GoneReason.ProtocolError:
      return "was disconnected for sending a malformed frame";
    default:
      return `left the group (reason ${reason})`;
  }
}

interface Waiter {
  kind: Kind;
  root: number;
  resolve: (parts: Uint8Array[]) => void;
  reject: (error: GroupError) => void;
  timer: ReturnType<typeof setTimeout>;
}

/** One sequence number's parts on one rank; created by the first part or by the local call. */
interface Slot {
  parts: (Uint8Array | undefined)[];
  arrived: number;
  /** The first rank seen at this sequence number and what it called: all must call the same. */
  first?: { rank: number; kind: Kind; root: number };
  waiter?: Waiter;
}

/** Where a rank sends its contribution (the hub, in process or over TCP). */
type Contribute = (seq: number, kind: Kind, root: number, payload: Uint8Array) => void;

const EMPTY = new Uint8Array(0);

/** Sequence numbers, received parts and timeouts of one rank. Transport-agnostic. */
class RankEndpoint {
  private nextSeq = 1;
  private readonly slots = new Map<number, Slot>();
  private readonly goneRanks = new Map<number, number>();
  private broken: GroupError | null = null;
  private closed = false;
  private waiting = 0;

  constructor(
    readonly rank: number,
    readonly size: number,
    private readonly timeoutMs: number,
    private readonly maxPayloadBytes: number,
    private readonly contribute: Contribute,
    /** Called with true when the first collective starts waiting, false when none is left. */
    private readonly setBusy: (busy: boolean) => void,
  ) {}

  run(kind: Kind, bytes: Uint8Array, root: number): Promise<Uint8Array[]> {
    const seq = this.nextSeq++;
    const call = describeCall(kind, seq, root);
    if (this.closed) {
      return Promise.reject(
        new GroupError(`${call} on rank ${this.rank}: this rank already closed the group`, "closed"),
      );
    }
    if (this.broken) {
      return Promise.reject(
        new GroupError(
          `${call} failed: the group is unusable after an earlier error: ${this.broken.message}`,
          "broken",
          this.broken.ranks,
        ),
      );
    }
    if (this.goneRanks.size > 0) {
      const error = this.goneError(call);
      this.breakWith(error);
      return Promise.reject(error);
    }
    if (bytes.byteLength > this.maxPayloadBytes) {
      return Promise.reject(
        new RangeError(
          `${call}: ${bytes.byteLength} bytes exceed maxFrameBytes ${this.maxPayloadBytes}` +
            ` (raise maxFrameBytes on every rank)`,
        ),
      );
    }
    const sends = kind === Kind.AllGather || (kind === Kind.Broadcast && root === this.rank);
    // Two copies when sending: the caller may reuse `bytes` at once, and the part kept for our own
    // result must not alias what the transport may still be sending.
    const own = sends ? bytes.slice() : EMPTY;
    const slot = this.slot(seq);
    slot.parts[this.rank] = own;
    slot.arrived += 1;
    return new Promise<Uint8Array[]>((resolve, reject) => {
      const timer = setTimeout(() => this.timeOut(seq, call), this.timeoutMs);
      slot.waiter = { kind, root, resolve, reject, timer };
      if (this.waiting++ === 0) this.setBusy(true);
      try {
        // Sent even when it mismatches what already arrived, so that the hub tells every rank.
        this.contribute(seq, kind, root, sends ? bytes.slice() : EMPTY);
      } catch (error) {
        if (error instanceof GroupError) this.fail(error.message, error.code, error.ranks);
        else this.fail(String(error), "protocol");
        return;
      }
      if (this.sameCall(seq, slot, this.rank, kind, root)) this.settleIfComplete(seq, slot);
    });
  }

  /** A part from `source` for collective #seq. */
  deliver(seq: number, source: number, kind: Kind, root: number, payload: Uint8Array): void {
    if (this.broken || this.closed) return;
    if (seq < this.nextSeq && !this.slots.has(seq)) {
      throw new GroupError(`part from rank ${source} for #${seq}, which already completed`, "protocol");
    }
    const slot = this.slot(seq);
    if (slot.parts[source] !== undefined) {
      throw new GroupError(`rank ${source} sent two parts for #${seq}`, "protocol");
    }
    if (!this.sameCall(seq, slot, source, kind, root)) return;
    slot.parts[source] = payload;
    slot.arrived += 1;
    this.settleIfComplete(seq, slot);
  }

  /** Check that `rank` called what the first rank seen at #seq called; on a mismatch, fail. */
  private sameCall(seq: number, slot: Slot, rank: number, kind: Kind, root: number): boolean {
    const first = slot.first;
    if (!first) {
      slot.first = { rank, kind, root };
      return true;
    }
    if (first.kind === kind && first.root === root) return true;
    this.fail(
      `collective mismatch: rank ${first.rank} called ${describeCall(first.kind, seq, first.root)} ` +
        `but rank ${rank} called ${describeCall(kind, seq, root)}`,
      "mismatch",
      [first.rank, rank].sort((a, b) => a - b),
    );
    return false;
  }

  /** `rank` left: every waiting collective still missing its part fails, and so do later ones. */
  rankGone(rank: number, reason: number): void {
    if (this.goneRanks.has(rank)) return;
    this.goneRanks.set(rank, reason);
    for (const [seq, slot] of this.slots) {
      const waiter = slot.waiter;
      if (waiter && slot.parts[rank] === undefined) {
        const error = this.goneError(describeCall(waiter.kind, seq, waiter.root));
        this.breakWith(error);
        return;
      }
    }
  }

  /** The group can no longer work: reject every waiting collective and every later one. */
  fail(reason: string, code: GroupErrorCode, ranks: readonly number[] = []): void {
    const first = [...this.slots].find(([, slot]) => slot.waiter);
    const message = first
      ? `${describeCall(first[1].waiter!.kind, first[0], first[1].waiter!.root)} failed: ${reason}`
      : reason;
    this.breakWith(new GroupError(message, code, ranks));
  }

  /** Leave: waiting collectives reject; later calls reject. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.rejectAll(
      (call) => new GroupError(`${call} failed: rank ${this.rank} closed the group`, "closed"),
    );
  }

  get isClosed(): boolean {
    return this.closed;
  }

  private goneError(call: string): GroupError {
    const ranks = [...this.goneRanks.keys()].sort((a, b) => a - b);
    const reasons = ranks.map((rank) => `rank ${rank} ${describeGone(this.goneRanks.get(rank)!)}`);
    return new GroupError(`${call} failed: ${reasons.join("; ")}`, "rank-gone", ranks);
  }

  private timeOut(seq: number, call: string): void {
    const slot = this.slots.get(seq);
    if (!slot?.waiter) return;
    const missing: number[] = [];
    for (let rank = 0; rank < this.size; rank++) {
      if (slot.parts[rank] === undefined) missing.push(rank);
    }
    const error = new GroupError(
      `${call} timed out after ${this.timeoutMs} ms: ${describeRanks(missing)} did not arrive`,
      "timeout",
      missing,
    );
    // Parts of the missing ranks may still come; the sequence can no longer be trusted.
    this.breakWith(error, seq);
  }

  /** Mark the group broken; reject the collective `first` with `error`, the others likewise. */
  private breakWith(error: GroupError, first?: number): void {
    if (!this.broken) this.broken = error;
    if (first !== undefined) this.rejectOne(first, error);
    this.rejectAll((call) =>
      error.message.startsWith(call)
        ? error
        : new GroupError(`${call} failed: ${error.message}`, error.code, error.ranks),
    );
  }

  private rejectAll(makeError: (call: string) => GroupError): void {
    for (const [seq, slot] of this.slots) {
      const waiter = slot.waiter;
      if (waiter) this.rejectOne(seq, makeError(describeCall(waiter.kind, seq, waiter.root)));
    }
  }

  private rejectOne(seq: number, error: GroupError): void {
    const slot = this.slots.get(seq);
    const waiter = slot?.waiter;
    if (!slot || !waiter) return;
    slot.waiter = undefined;
    this.slots.delete(seq);
    clearTimeout(waiter.timer);
    if (--this.waiting === 0) this.setBusy(false);
    waiter.reject(error);
  }

  private slot(seq: number): Slot {
    let slot = this.slots.get(seq);
    if (!slot) {
      slot = { parts: new Array<Uint8Array | undefined>(this.size), arrived: 0 };
      this.slots.set(seq, slot);
    }
    return slot;
  }

  private settleIfComplete(seq: number, slot: Slot): void {
    const waiter = slot.waiter;
    if (!waiter || slot.arrived < this.size) return;
    slot.waiter = undefined;
    this.slots.delete(seq);
    clearTimeout(waiter.timer);
    if (--this.waiting === 0) this.setBusy(false);
    waiter.resolve(slot.parts as Uint8Array[]);
  }
}

// ---------------------------------------------------------------------------------------------
// The hub: receives contributions, checks that they match, forwards them to the other ranks.

/** Where the hub sends things for one rank. */
interface HubSink {
  part(seq: number, source: number, kind: Kind, root: number, payload: Uint8Array): void;
  gone(rank: number, reason: GoneReason): void;
  error(message: string, code: GroupErrorCode): void;
}

interface HubRecord {
  kind: Kind;
  root: number;
  firstRank: number;
  arrived: number;
}

class Hub {
  readonly sinks: (HubSink | undefined)[];
  private readonly lastSeq: number[];
  private readonly records = new Map<number, HubRecord>();
  private readonly gone = new Set<number>();
  private failed = false;

  constructor(readonly size: number) {
    this.sinks = new Array<HubSink | undefined>(size);
    this.lastSeq = new Array<number>(size).fill(0);
  }

  /**
   * Rank `rank`'s contribution to #seq. The payload must be owned by the hub from now on: it is
   * forwarded without copying. Throws (a protocol error of that rank) if #seq is out of order.
   */
  contribute(rank: number, seq: number, kind: Kind, root: number, payload: Uint8Array): void {
    if (this.failed) return;
    const expected = this.lastSeq[rank]! + 1;
    if (seq !== expected) {
      throw new GroupError(`rank ${rank} sent collective #${seq}, expected #${expected}`, "protocol");
    }
    this.lastSeq[rank] = seq;
    let record = this.records.get(seq);
    if (!record) {
      record = { kind, root, firstRank: rank, arrived: 0 };
      this.records.set(seq, record);
    } else if (record.kind !== kind || record.root !== root) {
      this.failAll(
        `collective mismatch: rank ${record.firstRank} called ` +
          `${describeCall(record.kind, seq, record.root)} but rank ${rank} called ` +
          describeCall(kind, seq, root),
        "mismatch",
      );
      return;
    }
    if (++record.arrived === this.size) this.records.delete(seq);
    for (let target = 0; target < this.size; target++) {
      if (target !== rank && !this.gone.has(target)) {
        this.sinks[target]?.part(seq, rank, kind, root, payload);
      }
    }
  }

  leave(rank: number, reason: GoneReason): void {
    if (this.gone.has(rank)) return;
    this.gone.add(rank);
    for (let target = 0; target < this.size; target++) {
      if (target !== rank && !this.gone.has(target)) this.sinks[target]?.gone(rank, reason);
    }
  }

  failAll(message: string, code: GroupErrorCode): void {
    if (this.failed) return;
    this.failed = true;
    for (let target = 0; target < this.size; target++) {
      if (!this.gone.has(target)) this.sinks[target]?.error(message, code);
    }
  }
}

function checkBytes(bytes: unknown, call: string): asserts bytes is Uint8Array {
  if (!(bytes instanceof Uint8Array)) {
    throw new TypeError(`${call}: bytes must be a Uint8Array, got ${describeValue(bytes)}`);
  }
}
function checkRoot(root: unknown, size: number): asserts root is number {
  if (typeof root !== "number" || !Number.isInteger(root) || root < 0 || root >= size) {
    throw new RangeError(`broadcast: root must be an integer in [0, ${size}), got ${describeValue(root)}`);
  }
}
function describeValue(value: unknown): string {
  if (value === null) return "null";
  if (typeof value === "object") return (value as object).constructor?.name ?? "object";
  return `${typeof value} ${String(value)}`;
}

/** The three collectives on top of a RankEndpoint, with argument checks. */
abstract class EndpointGroup implements Group {
  abstract readonly rank: number;
  abstract readonly size: number;
  abstract readonly ranksPerNode: number;
  protected abstract readonly endpoint: RankEndpoint;

  allGather(bytes: Uint8Array): Promise<Uint8Array[]> {
    try {
      checkBytes(bytes, "allGather");
    } catch (error) {
      return Promise.reject(error);
    }
    return this.endpoint.run(Kind.AllGather, bytes, 0);
  }

  async broadcast(bytes: Uint8Array, root: number): Promise<Uint8Array> {
    checkRoot(root, this.size);
    if (root === this.rank) checkBytes(bytes, "broadcast");
    const parts = await this.endpoint.run(Kind.Broadcast, root === this.rank ? bytes : EMPTY, root);
    return parts[root]!;
  }

  async barrier(): Promise<void> {
    await this.endpoint.run(Kind.Barrier, EMPTY, 0);
  }

  abstract close(): void;

  [Symbol.dispose](): void {
    this.close();
  }
}

// ---------------------------------------------------------------------------------------------
// LocalGroup

/** Options of `LocalGroup.create`. */
export interface LocalGroupOptions {
  /** Ranks per node for the node layout; must divide `size`. Default: `size` (one node). */
  ranksPerNode?: number;
  /** Longest wait of one collective, in ms; its error names the ranks that did not arrive. Default 60000. */
  timeoutMs?: number;
}

/**
 * Several ranks in one process (a server that drives all GPUs of a host; tests). Each member is
 * used like a rank of any other group: every member must make the same collective calls, usually
 * from concurrent async code (`Promise.all(groups.map(...))`). Results are fresh copies per rank.
 */
export class LocalGroup extends EndpointGroup {
  protected readonly endpoint: RankEndpoint;

  private constructor(
    readonly rank: number,
    readonly size: number,
    readonly ranksPerNode: number,
    private readonly hub: Hub,
    timeoutMs: number,
  ) {
    super();
    this.endpoint = new RankEndpoint(rank, size, timeoutMs, Number.MAX_SAFE_INTEGER, (seq, kind, root, payload) =>
      hub.contribute(rank, seq, kind, root, payload),
      () => {},
    );
    const endpoint = this.endpoint;
    hub.sinks[rank] = {
      // Each rank gets its own copy: a rank may modify its result.
      part: (seq, source, kind, root, payload) =>
        endpoint.deliver(seq, source, kind, root, payload.byteLength ? payload.slice() : EMPTY),
      gone: (gone, reason) => endpoint.rankGone(gone, reason),
      error: (message, code) => endpoint.fail(message, code),
    };
  }

  /** `size` ranks sharing one in-memory rendezvous; element i is rank i. */
  static create(size: number, options: LocalGroupOptions = {}): LocalGroup[] {
    const ranksPerNode = options.ranksPerNode ?? size;
    const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    checkLayout(0, size, ranksPerNode, "LocalGroup.create");
    checkPositiveInteger(timeoutMs, "LocalGroup.create: timeoutMs");
    const hub = new Hub(size);
    return Array.from({ length: size }, (_, rank) => new LocalGroup(rank, size, ranksPerNode, hub, timeoutMs));
  }

  close(): void {
    if (this.endpoint.isClosed) return;
    this.endpoint.close();
    this.hub.leave(this.rank, GoneReason.Closed);
  }
}

// ---------------------------------------------------------------------------------------------
// Wire format of TcpGroup

/**
 * Every frame: a 32-byte little-endian header, then `payloadLength` bytes.
 *   0 u32 magic "BUEP"   4 u16 version   6 u8 type   7 u8 kind (collective kind, else 0)
 *   8 u32 rank (sender; source rank of a PART; the rank a GONE is about)
 *  12 u32 seq   16 u32 arg (HELLO: size; CONTRIBUTE/PART: root; GONE: reason)
 *  20 u32 arg2 (HELLO: ranksPerNode)   24 u64 payloadLength
 */
export const WIRE_MAGIC = 0x50455542; // bytes "BUEP"
export const WIRE_VERSION = 1;
export const WIRE_HEADER_BYTES = 32;

/** Frame types. HELLO/CONTRIBUTE/LEAVE go to the store; READY/PART/GONE/ERROR come from it. */
export const FrameType = {
  Hello: 1,
  Ready: 2,
  Contribute: 3,
  Part: 4,
  Leave: 5,
  Gone: 6,
  Error: 7,
} as const;
const FRAME_TYPE_NAMES: Record<number, string> = {
  1: "HELLO",
  2: "READY",
  3: "CONTRIBUTE",
  4: "PART",
  5: "LEAVE",
  6: "GONE",
  7: "ERROR",
};

export interface Frame {
  type: number;
  kind: number;
  rank: number;
  seq: number;
  arg: number;
  arg2: number;
  payload: Uint8Array;
}

/** A malformed frame; the connection that sent it is closed. */
export class FrameError extends Error {
  override readonly name = "FrameError";
}

export function encodeFrameHeader(
  frame: Omit<Frame, "payload">,
  payloadLength: number | bigint,
  magic = WIRE_MAGIC,
  version = WIRE_VERSION,
): Uint8Array {
  const header = new Uint8Array(WIRE_HEADER_BYTES);
  const view = new DataView(header.buffer);
  view.setUint32(0, magic, true);
  view.setUint16(4, version, true);
  view.setUint8(6, frame.type);
  view.setUint8(7, frame.kind);
  view.setUint32(8, frame.rank, true);
  view.setUint32(12, frame.seq, true);
  view.setUint32(16, frame.arg, true);
  view.setUint32(20, frame.arg2, true);
  view.setBigUint64(24, BigInt(payloadLength), true);
  return header;
}

/**
 * Cuts a TCP byte stream into frames. Checks magic (as soon as 4 bytes are in, so a stranger
 * talking to the port is turned away at once), version, type and the payload bound before
 * allocating the payload; the payload is filled chunk by chunk into one buffer of its final size.
 */
export class FrameDecoder {
  private readonly header = new Uint8Array(WIRE_HEADER_BYTES);
  private readonly headerView = new DataView(this.header.buffer);
  private headerFilled = 0;
  private pending: Frame | null = null;
  private payloadFilled = 0;

  constructor(private readonly maxPayloadBytes: number) {}

  /** Frames completed by `chunk` (the chunk is not kept). Throws FrameError on a malformed one. */
  push(chunk: Uint8Array): Frame[] {
    const frames: Frame[] = [];
    let offset = 0;
    while (offset < chunk.length) {
      if (this.pending === null) {
        const take = Math.min(WIRE_HEADER_BYTES - this.headerFilled, chunk.length - offset);
        this.header.set(chunk.subarray(offset, offset + take), this.headerFilled);
        const before = this.headerFilled;
        this.headerFilled += take;
        offset += take;
        if (before < 4 && this.headerFilled >= 4) this.checkMagic();
        if (this.headerFilled < WIRE_HEADER_BYTES) break;
        this.headerFilled = 0;
        this.pending = this.parseHeader();
        this.payloadFilled = 0;
      }
      const frame = this.pending;
      const take = Math.min(frame.payload.length - this.payloadFilled, chunk.length - offset);
      if (take > 0) {
        frame.payload.set(chunk.subarray(offset, offset + take), this.payloadFilled);
        this.payloadFilled += take;
        offset += take;
      }
      if (this.payloadFilled === frame.payload.length) {
        frames.push(frame);
        this.pending = null;
      }
    }
    return frames;
  }

  private checkMagic(): void {
    const magic = this.headerView.getUint32(0, true);
    if (magic !== WIRE_MAGIC) {
      throw new FrameError(
        `bad magic 0x${magic.toString(16).padStart(8, "0")} (expected 0x${WIRE_MAGIC.toString(16)}, "BUEP"): ` +
          `not a bun-ep group peer`,
      );
    }
  }

  private parseHeader(): Frame {
    const view = this.headerView;
    const version = view.getUint16(4, true);
    if (version !== WIRE_VERSION) {
      throw new FrameError(`unsupported protocol version ${version} (this bun-ep speaks ${WIRE_VERSION})`);
    }
    const type = view.getUint8(6);
    if (FRAME_TYPE_NAMES[type] === undefined) throw new FrameError(`unknown frame type ${type}`);
    const length = view.getBigUint64(24, true);
    if (length > BigInt(this.maxPayloadBytes)) {
      throw new FrameError(
        `${FRAME_TYPE_NAMES[type]} frame of ${length} bytes exceeds maxFrameBytes ${this.maxPayloadBytes}`,
      );
    }
    const payloadLength = Number(length);
    return {
      type,
      kind: view.getUint8(7),
      rank: view.getUint32(8, true),
      seq: view.getUint32(12, true),
      arg: view.getUint32(16, true),
      arg2: view.getUint32(20, true),
      payload: payloadLength === 0 ? EMPTY : new Uint8Array(payloadLength),
    };
  }
}

/** Small payloads ride in the header's write; big ones go as they are. */
const COALESCE_BYTES = 64 * 1024;

/**
 * Writes frames to a Bun socket, keeping what the kernel did not take until `drain`.
 * Payloads marked `owned` are never modified by anyone and are queued without copying.
 */
class SocketWriter {
  private readonly queue: Uint8Array[] = [];
  private endWhenDrained = false;

  constructor(
    private readonly socket: Socket<unknown>,
    /** Called with true while bytes wait in the queue. */
    private readonly setBacklogged: (backlogged: boolean) => void,
  ) {}

  /** True once a write found the socket closed: later sends are dropped. */
  closed = false;

  /** Queue a frame; false when the socket is already closed (the frame is dropped). */
  send(frame: Omit<Frame, "payload">, payload: Uint8Array, owned: boolean): boolean {
    const header = encodeFrameHeader(frame, payload.byteLength);
    if (payload.byteLength === 0) {
      this.write(header, true);
    } else if (payload.byteLength <= COALESCE_BYTES) {
      const joined = new Uint8Array(WIRE_HEADER_BYTES + payload.byteLength);
      joined.set(header);
      joined.set(payload, WIRE_HEADER_BYTES);
      this.write(joined, true);
    } else {
      this.write(header, true);
      this.write(payload, owned);
    }
    return !this.closed;
  }

  /** Half-close once everything queued is written. */
  end(): void {
    if (this.queue.length === 0) this.socket.end();
    else this.endWhenDrained = true;
  }

  drain(): void {
    while (this.queue.length > 0) {
      const head = this.queue[0]!;
      const written = this.socket.write(head);
      if (written < 0) {
        this.closed = true;
        this.queue.length = 0;
        break;
      }
      if (written < head.byteLength) {
        this.queue[0] = head.subarray(written);
        return;
      }
      this.queue.shift();
    }
    this.setBacklogged(false);
    if (this.endWhenDrained) this.socket.end();
  }

  private write(bytes: Uint8Array, owned: boolean): void {
    if (this.closed) return;
    if (this.queue.length > 0) {
      this.queue.push(owned ? bytes : bytes.slice());
      return;
    }
    const written = this.socket.write(bytes);
    if (written < 0) {
      // The peer is gone; its close handler reports that. Nothing more can be sent.
      this.closed = true;
      return;
    }
    if (written < bytes.byteLength) {
      const rest = bytes.subarray(written);
      this.queue.push(owned ? rest : rest.slice());
      this.setBacklogged(true);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// TcpGroup

/** Options of `TcpGroup.connect`. */
export interface TcpGroupOptions {
  /** This rank, 0 <= rank < size. Rank 0 holds the store. */
  rank: number;
  /** Number of ranks. */
  size: number;
  /** Address of rank 0's host, as the other ranks reach it (MASTER_ADDR). */
  masterAddr: string;
  /** Port of the store on rank 0's host (MASTER_PORT), 1..65535. */
  masterPort: number;
  /** Ranks per node; must divide `size`. Default: `size` (one node). */
  ranksPerNode?: number;
  /** Longest wait of one collective, in ms; its error names the ranks that did not arrive. Default 60000. */
  timeoutMs?: number;
  /**
   * Longest time to form the group, in ms: other ranks retry reaching the store for this long, and
   * rank 0 waits this long for every rank to join (then every joined rank fails naming the missing
   * ones). Default: `timeoutMs`.
   */
  connectTimeoutMs?: number;
  /** Bound of one rank's contribution to one collective (frames above it are rejected). Default 1 GiB. */
  maxFrameBytes?: number;
  /**
   * Rank 0 only: the address the store listens on. Default: `masterAddr` when it is a loopback
   * address (so a single-host group is not reachable from the network), else "0.0.0.0".
   */
  listenAddr?: string;
  /** Rank 0 only: told about rejected connections that never were ranks. Default: console.warn. */
  onRejectedConnection?: (message: string) => void;
}

function isLoopback(address: string): boolean {
  return address === "localhost" || address === "::1" || /^127\.\d+\.\d+\.\d+$/.test(address);
}

interface ServerConnection {
  rank: number | null;
  peer: string;
  decoder: FrameDecoder;
  writer: SocketWriter;
  leaving: boolean;
  dead: boolean;
}

/** Rank 0's store: accepts the other ranks, runs the hub, forwards parts over TCP. */
class Store {
  readonly hub: Hub;
  private readonly connections = new Set<Socket<ServerConnection>>();
  private readonly joined: boolean[];
  private joinedCount = 1; // rank 0 is in process
  private listener: TCPSocketListener<ServerConnection> | null = null;
  private joinTimer: ReturnType<typeof setTimeout> | null = null;
  private resolveJoin!: () => void;
  private rejectJoin!: (error: GroupError) => void;
  /** Settles when every rank has joined (or the join times out). */
  readonly allJoined: Promise<void>;
  private closed = false;

  constructor(
    private readonly options: Required<Pick<TcpGroupOptions, "size" | "ranksPerNode" | "maxFrameBytes">> & {
      where: string;
      onRejectedConnection: (message: string) => void;
    },
  ) {
    this.hub = new Hub(options.size);
    this.joined = new Array<boolean>(options.size).fill(false);
    this.joined[0] = true;
    this.allJoined = new Promise<void>((resolve, reject) => {
      this.resolveJoin = resolve;
      this.rejectJoin = reject;
    });
    // Nobody awaits this promise when rank 0 fails for another reason first.
    this.allJoined.catch(() => {});
  }

  listen(hostname: string, port: number, connectTimeoutMs: number): void {
    try {
      this.listener = Bun.listen<ServerConnection>({
        hostname,
        port,
        socket: {
          binaryType: "uint8array",
          open: (socket) => this.accept(socket),
          data: (socket, chunk) => this.receive(socket, chunk),
          drain: (socket) => socket.data.writer.drain(),
          close: (socket) => this.disconnected(socket),
          error: (socket) => this.disconnected(socket),
        },
      });
    } catch (error) {
      const reason = (error as { code?: string }).code === "EADDRINUSE" ? "address already in use" : String(error);
      throw new GroupError(
        `rank 0 could not open the group's store on ${hostname}:${port}: ${reason} (choose another MASTER_PORT)`,
        "listen",
      );
    }
    if (this.joinedCount === this.options.size) {
      this.finishJoin();
      return;
    }
    this.joinTimer = setTimeout(() => this.joinTimedOut(connectTimeoutMs), connectTimeoutMs);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.joinTimer) clearTimeout(this.joinTimer);
    this.listener?.stop(false);
    this.listener = null;
    // Parts already queued still reach their ranks: end each connection once its queue drains.
    for (const socket of this.connections) {
      try {
        socket.data.writer.end();
      } catch {
        socket.terminate();
      }
    }
  }

  private accept(socket: Socket<ServerConnection>): void {
    const connection: ServerConnection = {
      rank: null,
      peer: `${socket.remoteAddress}:${socket.remotePort}`,
      decoder: new FrameDecoder(this.options.maxFrameBytes),
      writer: new SocketWriter(socket as Socket<unknown>, (backlogged) =>
        backlogged ? socket.ref() : socket.unref(),
      ),
      leaving: false,
      dead: false,
    };
    socket.data = connection;
    socket.setNoDelay(true);
    socket.unref();
    this.connections.add(socket);
  }

  private receive(socket: Socket<ServerConnection>, chunk: Uint8Array): void {
    const connection = socket.data;
    if (connection.dead) return;
    try {
      for (const frame of connection.decoder.push(chunk)) this.handle(socket, frame);
    } catch (error) {
      this.reject(socket, error instanceof Error ? error.message : String(error));
    }
  }

  private handle(socket: Socket<ServerConnection>, frame: Frame): void {
    const connection = socket.data;
    const { size } = this.options;
    if (connection.rank === null) {
      if (frame.type !== FrameType.Hello) {
        throw new FrameError(`expected HELLO first, got ${FRAME_TYPE_NAMES[frame.type]}`);
      }
      if (frame.rank >= size) throw new FrameError(`rank ${frame.rank} out of range [0, ${size})`);
      if (frame.arg !== size) {
        throw new FrameError(`rank ${frame.rank} has WORLD_SIZE ${frame.arg} but the group has size ${size}`);
      }
      if (frame.arg2 !== this.options.ranksPerNode) {
        throw new FrameError(
          `rank ${frame.rank} has ${frame.arg2} ranks per node but rank 0 has ${this.options.ranksPerNode}`,
        );
      }
      if (this.joined[frame.rank]) {
        throw new FrameError(`duplicate rank ${frame.rank}: that rank already joined the group`);
      }
      connection.rank = frame.rank;
      this.joined[frame.rank] = true;
      const writer = connection.writer;
      this.hub.sinks[frame.rank] = {
        part: (seq, source, kind, root, payload) =>
          writer.send({ type: FrameType.Part, kind, rank: source, seq, arg: root, arg2: 0 }, payload, true),
        gone: (rank, reason) =>
          writer.send({ type: FrameType.Gone, kind: 0, rank, seq: 0, arg: reason, arg2: 0 }, EMPTY, true),
        error: (message) => sendError(writer, message),
      };
      if (++this.joinedCount === size) this.finishJoin();
      return;
    }
    const rank = connection.rank;
    if (frame.rank !== rank) {
      throw new FrameError(`frame claims rank ${frame.rank} on the connection of rank ${rank}`);
    }
    switch (frame.type) {
      case FrameType.Contribute:
        if (!isKind(frame.kind)) throw new FrameError(`unknown collective kind ${frame.kind}`);
        if (frame.arg >= size) throw new FrameError(`broadcast root ${frame.arg} out of range [0, ${size})`);
        this.hub.contribute(rank, frame.seq, frame.kind, frame.arg, frame.payload);
        return;
      case FrameType.Leave:
        connection.leaving = true;
        this.hub.leave(rank, GoneReason.Closed);
        return;
      default:
        throw new FrameError(`unexpected ${FRAME_TYPE_NAMES[frame.type]} frame from rank ${rank}`);
    }
  }

  /** A malformed frame: tell the sender why, close its connection, and tell the others. */
  private reject(socket: Socket<ServerConnection>, reason: string): void {
    const connection = socket.data;
    connection.dead = true;
    const who = connection.rank === null ? `a connection from ${connection.peer}` : `rank ${connection.rank}`;
    const message = `the group's store rejected ${who}: ${reason}`;
    try {
      sendError(connection.writer, message);
      connection.writer.end();
    } catch {
      socket.terminate();
    }
    if (connection.rank !== null) {
      this.hub.leave(connection.rank, GoneReason.ProtocolError);
    } else {
      this.options.onRejectedConnection(message);
    }
  }

  private disconnected(socket: Socket<ServerConnection>): void {
    if (!this.connections.delete(socket)) return;
    const connection = socket.data;
    if (connection.rank !== null && !connection.dead) {
      connection.dead = true;
      this.hub.leave(connection.rank, connection.leaving ? GoneReason.Closed : GoneReason.ConnectionLost);
    }
  }

  private finishJoin(): void {
    if (this.joinTimer) clearTimeout(this.joinTimer);
    this.joinTimer = null;
    // Every rank is in: nobody else may connect.
    this.listener?.stop(false);
    this.listener = null;
    for (const socket of this.connections) {
      if (socket.data.rank !== null) {
        socket.data.writer.send({ type: FrameType.Ready, kind: 0, rank: 0, seq: 0, arg: 0, arg2: 0 }, EMPTY, true);
      }
    }
    this.resolveJoin();
  }

  private joinTimedOut(connectTimeoutMs: number): void {
    const missing = this.joined.flatMap((joined, rank) => (joined ? [] : [rank]));
    const message =
      `${describeRanks(missing)} never joined the group at ${this.options.where} ` +
      `(waited ${connectTimeoutMs} ms)`;
    for (const socket of this.connections) {
      if (socket.data.rank !== null) {
        sendError(socket.data.writer, message);
      }
    }
    this.rejectJoin(new GroupError(message, "join-timeout", missing));
    this.close();
  }
}

function sendError(writer: SocketWriter, message: string): void {
  writer.send(
    { type: FrameType.Error, kind: 0, rank: 0, seq: 0, arg: 0, arg2: 0 },
    new TextEncoder().encode(message),
    true,
  );
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/**
 * A group of processes (one per rank, any hosts) meeting at a TCP store held by rank 0.
 * `await TcpGroup.connect(...)` (or `initGroupFromEnv()`) resolves once every rank has joined.
 */
export class TcpGroup extends EndpointGroup {
  readonly rank: number;
  readonly size: number;
  readonly ranksPerNode: number;
  protected readonly endpoint: RankEndpoint;
  /** "host:port" of the store, for messages. */
  readonly storeAddress: string;

  private store: Store | null = null;
  private socket: Socket<undefined> | null = null;
  private writer: SocketWriter | null = null;
  private decoder: FrameDecoder;
  private closing = false;
  private busy = false;
  private backlogged = false;
  private onJoinFrame: ((frame: Frame) => void) | null = null;
  private onJoinClose: (() => void) | null = null;

  private constructor(options: TcpGroupOptions) {
    super();
    this.rank = options.rank;
    this.size = options.size;
    this.ranksPerNode = options.ranksPerNode ?? options.size;
    this.storeAddress = `${options.masterAddr}:${options.masterPort}`;
    const maxFrameBytes = options.maxFrameBytes ?? DEFAULT_MAX_FRAME_BYTES;
    this.decoder = new FrameDecoder(maxFrameBytes);
    this.endpoint = new RankEndpoint(
      this.rank,
      this.size,
      options.timeoutMs ?? DEFAULT_TIMEOUT_MS,
      maxFrameBytes,
      (seq, kind, root, payload) => this.contribute(seq, kind, root, payload),
      (busy) => {
        this.busy = busy;
        this.updateRef();
      },
    );
  }

  /** Join the group; resolves once every rank has joined. See `TcpGroupOptions`. */
  static async connect(options: TcpGroupOptions): Promise<TcpGroup> {
    const ranksPerNode = options.ranksPerNode ?? options.size;
    checkLayout(options.rank, options.size, ranksPerNode, "TcpGroup.connect");
    if (typeof options.masterAddr !== "string" || options.masterAddr === "") {
      throw new TypeError(`TcpGroup.connect: masterAddr must be a host name or address, got ${describeValue(options.masterAddr)}`);
    }
    if (!Number.isInteger(options.masterPort) || options.masterPort < 1 || options.masterPort > 65535) {
      throw new RangeError(`TcpGroup.connect: masterPort must be an integer in [1, 65535], got ${String(options.masterPort)}`);
    }
    const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    checkPositiveInteger(timeoutMs, "TcpGroup.connect: timeoutMs");
    const connectTimeoutMs = options.connectTimeoutMs ?? timeoutMs;
    checkPositiveInteger(connectTimeoutMs, "TcpGroup.connect: connectTimeoutMs");
    const maxFrameBytes = options.maxFrameBytes ?? DEFAULT_MAX_FRAME_BYTES;
    checkPositiveInteger(maxFrameBytes, "TcpGroup.connect: maxFrameBytes");

    const group = new TcpGroup({ ...options, ranksPerNode, timeoutMs, maxFrameBytes });
    if (options.rank === 0) await group.hostStore(options, connectTimeoutMs, maxFrameBytes);
    else await group.join(options, connectTimeoutMs);
    return group;
  }

  close(): void {
    if (this.closing) return;
    this.closing = true;
    this.endpoint.close();
    if (this.store) {
      this.store.hub.leave(0, GoneReason.Closed);
      this.store.close();
    }
    if (this.writer && this.socket) {
      try {
        this.writer.send({ type: FrameType.Leave, kind: 0, rank: this.rank, seq: 0, arg: 0, arg2: 0 }, EMPTY, true);
        this.writer.end();
      } catch {
        this.socket.terminate();
      }
    }
  }

  private async hostStore(options: TcpGroupOptions, connectTimeoutMs: number, maxFrameBytes: number): Promise<void> {
    const store = new Store({
      size: this.size,
      ranksPerNode: this.ranksPerNode,
      maxFrameBytes,
      where: this.storeAddress,
      onRejectedConnection: options.onRejectedConnection ?? ((message) => console.warn(`bun-ep group: ${message}`)),
    });
    this.store = store;
    const endpoint = this.endpoint;
    // Rank 0 talks to the hub in process. Hub payloads may still be queued for sockets: copy.
    store.hub.sinks[0] = {
      part: (seq, source, kind, root, payload) =>
        endpoint.deliver(seq, source, kind, root, payload.byteLength ? payload.slice() : EMPTY),
      gone: (rank, reason) => endpoint.rankGone(rank, reason),
      error: (message, code) => endpoint.fail(message, code),
    };
    const listenAddr = options.listenAddr ?? (isLoopback(options.masterAddr) ? options.masterAddr : "0.0.0.0");
    store.listen(listenAddr, options.masterPort, connectTimeoutMs);
    await store.allJoined;
  }

  private contribute(seq: number, kind: Kind, root: number, payload: Uint8Array): void {
    if (this.store) {
      this.store.hub.contribute(0, seq, kind, root, payload);
      return;
    }
    // The payload is a private snapshot (RankEndpoint copied it): queue it without copying.
    const frame = { type: FrameType.Contribute, kind, rank: this.rank, seq, arg: root, arg2: 0 };
    if (!this.writer!.send(frame, payload, true)) {
      throw new GroupError(`lost the connection to the group's store at ${this.storeAddress} (rank 0)`, "store-lost", [0]);
    }
  }

  /** Ranks 1..size-1: reach the store (retrying), say HELLO, wait for READY. */
  private async join(options: TcpGroupOptions, connectTimeoutMs: number): Promise<void> {
    const deadline = Date.now() + connectTimeoutMs;
    let attempts = 0;
    let lastError = "";
    let backoffMs = 25;
    for (;;) {
      attempts += 1;
      try {
        this.socket = await Bun.connect({
          hostname: options.masterAddr,
          port: options.masterPort,
          socket: {
            binaryType: "uint8array",
            data: (_socket, chunk) => this.receive(chunk),
            drain: () => this.writer?.drain(),
            close: () => this.disconnected(),
            error: () => this.disconnected(),
            connectError: () => {},
          },
        });
        break;
      } catch (error) {
        lastError = (error as { code?: string }).code ?? String(error);
      }
      if (Date.now() + backoffMs > deadline) {
        throw new GroupError(
          `rank ${this.rank} could not reach the group's store at ${this.storeAddress} within ` +
            `${connectTimeoutMs} ms (${attempts} attempts; last error: ${lastError}); ` +
            `is rank 0 running, and are MASTER_ADDR/MASTER_PORT right?`,
          "unreachable",
          [0],
        );
      }
      await sleep(backoffMs);
      backoffMs = Math.min(backoffMs * 2, 500);
    }
    const socket = this.socket;
    socket.setNoDelay(true);
    this.writer = new SocketWriter(socket as Socket<unknown>, (backlogged) => {
      this.backlogged = backlogged;
      this.updateRef();
    });
    // Rank 0 names the missing ranks when the join times out; give its message time to arrive.
    const joinGraceMs = 2000;
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        finish();
        socket.terminate();
        reject(
          new GroupError(
            `rank ${this.rank} reached the group's store at ${this.storeAddress} but the group did not form ` +
              `within ${connectTimeoutMs} ms`,
            "join-timeout",
          ),
        );
      }, Math.max(0, deadline - Date.now()) + joinGraceMs);
      const finish = () => {
        clearTimeout(timer);
        this.onJoinFrame = null;
        this.onJoinClose = null;
      };
      this.onJoinFrame = (frame) => {
        finish();
        if (frame.type === FrameType.Ready) {
          resolve();
        } else {
          socket.terminate();
          const message =
            frame.type === FrameType.Error
              ? new TextDecoder().decode(frame.payload)
              : `unexpected ${FRAME_TYPE_NAMES[frame.type]} frame before READY`;
          const missing = /^ranks? ([\d, ]+) never joined/.exec(message)?.[1];
          reject(
            new GroupError(
              frame.type === FrameType.Error ? message : `the group's store at ${this.storeAddress} sent an ${message}`,
              missing ? "join-timeout" : "protocol",
              missing ? missing.split(", ").map(Number) : [],
            ),
          );
        }
      };
      this.onJoinClose = () => {
        finish();
        reject(
          new GroupError(
            `the group's store at ${this.storeAddress} closed the connection of rank ${this.rank} before ` +
              `every rank joined`,
            "store-lost",
            [0],
          ),
        );
      };
      this.writer!.send(
        { type: FrameType.Hello, kind: 0, rank: this.rank, seq: 0, arg: this.size, arg2: this.ranksPerNode },
        EMPTY,
        true,
      );
    });
    this.updateRef();
  }

  private receive(chunk: Uint8Array): void {
    let frames: Frame[];
    try {
      frames = this.decoder.push(chunk);
      for (const frame of frames) this.handle(frame);
    } catch (error) {
      const reason = error instanceof Error ? error.message : String(error);
      const failure = `bad frame from the group's store at ${this.storeAddress}: ${reason}`;
      if (this.onJoinFrame) {
        this.onJoinFrame({ type: FrameType.Error, kind: 0, rank: 0, seq: 0, arg: 0, arg2: 0, payload: new TextEncoder().encode(failure) });
      } else {
        this.endpoint.fail(failure, "protocol", [0]);
      }
      this.socket?.terminate();
    }
  }

  private handle(frame: Frame): void {
    if (this.onJoinFrame) {
      this.onJoinFrame(frame);
      return;
    }
    switch (frame.type) {
      case FrameType.Part:
        if (frame.rank >= this.size || frame.rank === this.rank) {
          throw new FrameError(`PART from rank ${frame.rank}, which is out of range or this rank`);
        }
        if (!isKind(frame.kind)) throw new FrameError(`PART of unknown collective kind ${frame.kind}`);
        this.endpoint.deliver(frame.seq, frame.rank, frame.kind, frame.arg, frame.payload);
        return;
      case FrameType.Gone:
        if (frame.rank >= this.size) throw new FrameError(`GONE for rank ${frame.rank}, out of range`);
        this.endpoint.rankGone(frame.rank, frame.arg);
        return;
      case FrameType.Error: {
        const message = new TextDecoder().decode(frame.payload);
        this.endpoint.fail(message, message.startsWith("collective mismatch") ? "mismatch" : "protocol");
        return;
      }
      default:
        throw new FrameError(`unexpected ${FRAME_TYPE_NAMES[frame.type]} frame from the store`);
    }
  }

  private disconnected(): void {
    if (this.onJoinClose) {
      this.onJoinClose();
      return;
    }
    if (this.closing) return;
    this.closing = true;
    this.endpoint.fail(`lost the connection to the group's store at ${this.storeAddress} (rank 0)`, "store-lost", [0]);
  }

  /** Keep the process alive only while a collective waits or bytes wait to be sent. */
  private updateRef(): void {
    if (!this.socket) return;
    if (this.busy || this.backlogged) this.socket.ref();
    else this.socket.unref();
  }
}

// ---------------------------------------------------------------------------------------------
// torchrun-style environment

/** Options of `initGroupFromEnv`: those of `TcpGroup.connect` that the environment does not give. */
export interface EnvGroupOptions
  extends Pick<TcpGroupOptions, "timeoutMs" | "connectTimeoutMs" | "maxFrameBytes" | "listenAddr" | "onRejectedConnection"> {
  /** Where to read the variables. Default: `process.env`. */
  env?: Record<string, string | undefined>;
}

/** The rank layout the environment describes (what `initGroupFromEnv` connects with). */
export interface EnvLayout {
  rank: number;
  size: number;
  localRank: number;
  localSize: number;
  ranksPerNode: number;
  masterAddr: string;
  masterPort: number;
}

function readInteger(
  env: Record<string, string | undefined>,
  name: string,
  min: number,
  max: number,
  required: boolean,
): number | undefined {
  const text = env[name];
  if (text === undefined || text === "") {
    if (!required) return undefined;
    throw new Error(
      `${name} is not set: start ranks with \`bun-ep run --nproc N script.ts\` ` +
        `(or set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT as torchrun does)`,
    );
  }
  const value = Number(text.trim());
  if (!/^\s*\d+\s*$/.test(text) || !Number.isSafeInteger(value) || value < min || value > max) {
    throw new Error(`${name}=${JSON.stringify(text)} is invalid: expected an integer in [${min}, ${max}]`);
  }
  return value;
}

/** Read and check RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, BUN_EP_RANKS_PER_NODE. */
export function readEnvLayout(env: Record<string, string | undefined> = process.env): EnvLayout {
  const size = readInteger(env, "WORLD_SIZE", 1, 2 ** 31, true)!;
  const rank = readInteger(env, "RANK", 0, size - 1, true)!;
  const localSize = readInteger(env, "LOCAL_WORLD_SIZE", 1, size, false);
  const localRank = readInteger(env, "LOCAL_RANK", 0, (localSize ?? size) - 1, false);
  const explicitPerNode = readInteger(env, "BUN_EP_RANKS_PER_NODE", 1, size, false);
  const ranksPerNode = explicitPerNode ?? localSize ?? size;
  if (size % ranksPerNode !== 0) {
    const source = explicitPerNode !== undefined ? "BUN_EP_RANKS_PER_NODE" : "LOCAL_WORLD_SIZE";
    throw new Error(`${source}=${ranksPerNode} does not divide WORLD_SIZE=${size}`);
  }
  const masterAddr = env.MASTER_ADDR?.trim();
  if (!masterAddr) {
    throw new Error("MASTER_ADDR is not set: it must be the host name or address of rank 0");
  }
  const masterPort = readInteger(env, "MASTER_PORT", 1, 65535, true)!;
  return {
    rank,
    size,
    localRank: localRank ?? rank % ranksPerNode,
    localSize: localSize ?? ranksPerNode,
    ranksPerNode,
    masterAddr,
    masterPort,
  };
}

/**
 * Join the group the torchrun variables describe (as set by `bun-ep run` or torchrun):
 * RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (required), LOCAL_RANK, LOCAL_WORLD_SIZE (optional).
 * ranksPerNode = BUN_EP_RANKS_PER_NODE if set, else LOCAL_WORLD_SIZE, else WORLD_SIZE.
 */
export async function initGroupFromEnv(options: EnvGroupOptions = {}): Promise<TcpGroup> {
  const { env, ...rest } = options;
  const layout = readEnvLayout(env ?? process.env);
  return TcpGroup.connect({
    rank: layout.rank,
    size: layout.size,
    ranksPerNode: layout.ranksPerNode,
    masterAddr: layout.masterAddr,
    masterPort: layout.masterPort,
    ...rest,
  });
}
