// Helpers shared by the normal-kernel engines of the CUDA backend (lib/backend/cuda.ts for one node,
// lib/backend/cuda_internode.ts for several): argument structs (the low-latency engine's too), the
// host record the kernels write, and the ordering of the comm stream against the compute stream.

import { BunEpError, Status } from "../ffi.ts";
import { NORMAL_STEP_NAMES, NormalError, Rec } from "../native/normal.ts";
import { Event, type Stream } from "../stream.ts";
import { DeviceTensor, type Tensor } from "../tensor.ts";
import type { EventLike } from "./types.ts";

/**
 * The int64 fields of a native argument struct (`data`, passed as a pointer), written from numbers
 * as two 32-bit halves. A BigInt per field cost about 50 ns: the twelve fields of a low-latency call
 * took 0.6 us this way, 0.02 us as halves (a loop of the same writes, Bun 1.4.5, session 6), where
 * the whole call costs the host 8-9 us. Values must be safe integers (pointers, sizes, flags, -1).
 */
export class Int64Fields {
  readonly data: BigInt64Array;
  readonly #words: Uint32Array;
  constructor(fields: number) {
    this.data = new BigInt64Array(fields);
    this.#words = new Uint32Array(this.data.buffer);
  }
  set(index: number, value: number): void {
    if (!Number.isSafeInteger(value)) throw new RangeError(`internal: argument field ${index} is ${value}, not a safe integer`);
    if (index < 0 || index >= this.data.length) throw new RangeError(`internal: argument field ${index} of ${this.data.length}`);
    const high = Math.floor(value / 4294967296);
    this.#words[2 * index] = value - high * 4294967296; // little-endian: the low half first
    this.#words[2 * index + 1] = high >>> 0;
  }
}

/** Fills an argument struct of 8-byte fields in header order. */
export class StructWriter {
  readonly #fields: Int64Fields;
  #at = 0;
  constructor(fields: number) {
    this.#fields = new Int64Fields(fields);
  }
  get data(): BigInt64Array {
    return this.#fields.data;
  }
  put(value: number | bigint): this {
    if (this.#at >= this.data.length) throw new Error(`internal: argument struct overflow (${this.data.length} fields)`);
    if (typeof value === "bigint") this.data[this.#at++] = value;
    else this.#fields.set(this.#at++, value);
    return this;
  }
  /** The filled struct; every field must have been written. */
  done(): BigInt64Array {
    if (this.#at !== this.data.length) throw new Error(`internal: argument struct has ${this.#at} of ${this.data.length} fields`);
    return this.data;
  }
  get length(): number {
    return this.#at;
  }
}

/** Device address of a tensor argument; 0 for an absent one. */
export const ptrOf = (t: Tensor | null | undefined): number => (t == null ? 0 : (t as DeviceTensor).ptr);

/** Short synchronous spin, then yield to the event loop between polls. */
export async function pollUntil(done: () => boolean, timeoutMs: number): Promise<boolean> {
  const spinEnd = performance.now() + 0.05;
  while (performance.now() < spinEnd) if (done()) return true;
  const deadline = performance.now() + timeoutMs;
  let polls = 0;
  while (!done()) {
    if (performance.now() > deadline) return false;
    // setImmediate keeps latency low at first; then back off to 1 ms timers.
    await new Promise<void>((resolve) => (polls++ < 2000 ? setImmediate(resolve) : setTimeout(resolve, 1)));
  }
  return true;
}

// ---- the host record ------------------------------------------------------------------------------

/** How one engine words the errors its kernels record. */
export interface RecordedErrorWording {
  /** The step named when the record names none, e.g. "a normal kernel". */
  unknownStep: string;
  /** Put before the step's name in timeout, topk and unknown-code messages: "" or "internode ". */
  stepPrefix: string;
  /** What a staging overflow ran out of, e.g. "staging rows". */
  stagingWhat: string;
  /** More about why rank `who` never arrived (e.g. its launch is held back in this process), or "". */
  whyMissing?: (who: number) => string;
  /** Codes beyond NormalError that this engine records; undefined for an unknown code. */
  extra?: (code: number, who: number, a: number, b: number, step: string) => { status: number; message: string } | undefined;
}

/**
 * The first error the kernels wrote into the host record `rec` as an error to throw, or null when
 * there is none. `rank` is this rank; timeoutMs and numNvlBytes are the buffer's.
 */
export function recordedError(rec: Int32Array, rank: number, timeoutMs: number, numNvlBytes: number, wording: RecordedErrorWording): BunEpError | null {
  const code = rec[Rec.errorCode] ?? 0;
  if (code === 0) return null;
  const who = rec[Rec.errorRank] ?? -1;
  const a = rec[Rec.errorA] ?? 0;
  const b = rec[Rec.errorB] ?? 0;
  const step = NORMAL_STEP_NAMES[rec[Rec.errorStep] ?? 0] ?? wording.unknownStep;
  const prefix = wording.stepPrefix;
  const tail = "; this EpBuffer is unusable now, create a new one";
  let message: string;
  let status: number = Status.InternalError;
  if (code === NormalError.timeout) {
    status = Status.Timeout;
    message = `rank ${rank}: ${prefix}${step} timed out after ${timeoutMs} ms waiting for rank ${who}, which never arrived (call ${rec[Rec.errorSeq]})${wording.whyMissing?.(who) ?? ""}`;
  } else if (code === NormalError.badTopk) {
    status = Status.InvalidArgument;
    message = `rank ${who}: topkIdx: token ${a} has expert ${b}, expected a value in [-1, numExperts) (found by the ${prefix}${step} kernel)`;
  } else if (code === NormalError.worstOverflow) {
    status = Status.InvalidArgument;
    message = `numWorstTokens: rank ${who} receives ${a} rows but numWorstTokens is ${b}; pass numWorstTokens >= ${a}`;
  } else if (code === NormalError.staging) {
    status = Status.InvalidArgument;
    message = `numNvlBytes: rank ${who} needs ${a} ${wording.stagingWhat} in ${step} but only ${b} fit in numNvlBytes = ${numNvlBytes}; raise numNvlBytes`;
  } else {
    const other = wording.extra?.(code, who, a, b, step);
    status = other?.status ?? status;
    message = other?.message ?? `rank ${rank}: unknown error code ${code} from ${prefix}${step}`;
  }
  return new BunEpError(status, `rank ${rank} EpBuffer`, message + tail);
}

/**
 * Waits until the host record shows notify call `seq` done or an error recorded. The device gives up
 * after timeoutMs and names the missing rank; the host waits a little longer. False when it gave up.
 */
export function pollNotify(rec: Int32Array, seq: number, timeoutMs: number): Promise<boolean> {
  const arrived = (): boolean => rec[Rec.notifySeq]! >= seq || rec[Rec.errorCode]! !== 0;
  return pollUntil(arrived, notifyHostLimitMs(timeoutMs));
}

/** How long the host waits for a notify step (see pollNotify). */
export function notifyHostLimitMs(timeoutMs: number): number {
  return timeoutMs * 1.5 + 2000;
}

/** The error of a notify step (`step`, e.g. "the notify step") that never finished and recorded nothing. */
export function notifyTimeoutError(rank: number, step: string, timeoutMs: number): BunEpError {
  return new BunEpError(
    Status.Timeout,
    `rank ${rank} dispatch`,
    `${step} did not finish within ${notifyHostLimitMs(timeoutMs)} ms and the device reported no missing rank ` +
      `(was the kernel ever scheduled? several processes on one GPU need MPS); this EpBuffer is unusable now`,
  );
}

// ---- stream ordering ------------------------------------------------------------------------------

type CommDType = "bf16" | "fp8_e4m3" | "f32" | "i32" | "i64" | "u8";

/** A rank's comm stream ordered against its compute stream, and the tensors allocated on it. */
export class CommOrder {
  readonly device: number;
  readonly commStream: Stream;
  readonly computeStream: Stream;
  /** The comm stream waits on the compute stream through it when a call has no previousEvent. */
  readonly #orderEvent: Event;

  constructor(device: number, commStream: Stream, computeStream: Stream) {
    this.device = device;
    this.commStream = commStream;
    this.computeStream = computeStream;
    this.#orderEvent = Event.create({ device });
  }

  /** Order the comm stream after `previousEvent`, or else after the compute stream. */
  waitBefore(previousEvent: EventLike | null): void {
    if (previousEvent !== null) {
      previousEvent.waitOn(this.commStream.handle);
      return;
    }
    // No event: order after this rank's compute stream (where fromHost and the user's work run).
    this.#orderEvent.record(this.computeStream);
    this.#orderEvent.waitOn(this.commStream);
  }

  /** The event of the call's end (asyncFinish), or null once the compute stream waits for it. */
  finish(asyncFinish: boolean): EventLike | null {
    const event = Event.create({ device: this.device }).record(this.commStream);
    if (asyncFinish) return event;
    event.waitOn(this.computeStream);
    event.close();
    return null;
  }

  empty<D extends CommDType>(dtype: D, shape: readonly number[]): DeviceTensor<D> {
    return DeviceTensor.empty(dtype, shape, { device: this.device, stream: this.commStream });
  }

  /** A fresh copy of `t`, made on the comm stream. */
  copyOf(t: DeviceTensor<"i32">): DeviceTensor<"i32"> {
    return this.empty("i32", t.shape).copyFrom(t, this.commStream);
  }

  close(): void {
    this.#orderEvent.close();
  }
}
