// CUDA devices, streams, events and graphs over the runtime ABI (cuda/include/bun_ep_runtime.h).
// Handles are numbers (the cudaStream_t / cudaEvent_t / cudaGraphExec_t pointer); 0 is the
// legacy default stream. Objects that own a handle release it with close() or `using`.

import type { EventLike } from "./backend/types.ts";
import { check, checkReady, native } from "./ffi.ts";
import { DEVICE_PROPS_BYTES } from "./native/runtime.ts";

// Out-parameters of one call at a time (the JS thread is single-threaded).
const outPointer = new BigUint64Array(1);
const outInt = new Int32Array(2);
const outDouble = new Float64Array(1);

function takePointer(): number {
  return Number(outPointer[0]);
}

// ---- devices -------------------------------------------------------------------------------------------

export interface DeviceProps {
  device: number;
  name: string;
  multiProcessorCount: number;
  totalMemoryBytes: number;
  freeMemoryBytes: number;
  computeCapability: [major: number, minor: number];
  l2CacheBytes: number;
  pciBusId: number;
  pciDeviceId: number;
}

/** Number of CUDA devices (0 when there is none). Throws when the library or the driver is missing. */
export function deviceCount(): number {
  check(native().bun_ep_device_count(outInt), "cudaGetDeviceCount");
  return outInt[0]!;
}

/** The calling thread's current device. */
export function currentDevice(): number {
  check(native().bun_ep_get_device(outInt), "cudaGetDevice");
  return outInt[0]!;
}

export function setDevice(device: number): void {
  checkDevice(device);
  check(native().bun_ep_set_device(device), `cudaSetDevice(${device})`);
}

/** Run `fn` with `device` current, then restore the previous device. */
export function withDevice<T>(device: number, fn: () => T): T {
  checkDevice(device);
  const previous = currentDevice();
  if (previous === device) return fn();
  check(native().bun_ep_set_device(device), `cudaSetDevice(${device})`);
  try {
    return fn();
  } finally {
    native().bun_ep_set_device(previous);
  }
}

export function deviceProps(device: number): DeviceProps {
  checkDevice(device);
  const props = new BigInt64Array(DEVICE_PROPS_BYTES / 8);
  const name = new Uint8Array(256);
  withDevice(device, () =>
    check(native().bun_ep_device_props(device, props, name, name.length), `device properties of device ${device}`),
  );
  const nameEnd = name.indexOf(0);
  const field = (i: number): number => Number(props[i]!);
  return {
    device,
    name: new TextDecoder().decode(name.subarray(0, nameEnd < 0 ? name.length : nameEnd)),
    multiProcessorCount: field(0),
    totalMemoryBytes: field(1),
    freeMemoryBytes: field(2),
    computeCapability: [field(3), field(4)],
    l2CacheBytes: field(5),
    pciBusId: field(6),
    pciDeviceId: field(7),
  };
}

function checkDevice(device: number): void {
  if (!Number.isInteger(device) || device < 0) {
    throw new RangeError(`device: expected a CUDA device ordinal (integer >= 0), got ${String(device)}`);
  }
}

// ---- streams -------------------------------------------------------------------------------------------

export interface StreamOptions {
  /** Device of the stream; default: the current device. */
  device?: number;
  /** Lower is higher priority, clamped to the device's range (0 = normal; -1 and below: high). */
  priority?: number;
}

const streamsByDevice = new Map<number, Stream>();

/** A CUDA stream. Work on one stream runs in order; different streams may overlap. */
export class Stream {
  /** The cudaStream_t as a number; 0 = the legacy default stream. */
  readonly handle: number;
  readonly device: number;
  /** False for streams this object does not own (legacy default, wrapped handles, per-device shared). */
  readonly owned: boolean;
  #closed = false;

  private constructor(handle: number, device: number, owned: boolean) {
    this.handle = handle;
    this.device = device;
    this.owned = owned;
  }

  /** A new non-blocking stream (it never waits implicitly on the legacy default stream). */
  static create(options: StreamOptions = {}): Stream {
    const device = options.device ?? currentDevice();
    const priority = options.priority ?? 0;
    if (!Number.isInteger(priority)) throw new RangeError(`priority: expected an integer, got ${String(priority)}`);
    withDevice(device, () =>
      check(native().bun_ep_stream_create(priority, outPointer), `creating a stream on device ${device}`),
    );
    return new Stream(takePointer(), device, true);
  }

  /** One shared non-blocking stream per device, created on first use and never closed: the default
   * stream of DeviceTensor operations. */
  static forDevice(device: number): Stream {
    let stream = streamsByDevice.get(device);
    if (stream === undefined) {
      const created = Stream.create({ device });
      stream = new Stream(created.handle, device, false);
      streamsByDevice.set(device, stream);
    }
    return stream;
  }

  /** `Stream.forDevice` of the current device. */
  static default(): Stream {
    return Stream.forDevice(currentDevice());
  }

  /** The legacy default stream (handle 0) of `device`: synchronizes with other blocking streams. */
  static legacy(device: number = currentDevice()): Stream {
    return new Stream(0, device, false);
  }

  /** Wrap a stream created elsewhere (e.g. by another library); it is not destroyed by close(). */
  static fromHandle(handle: number, device: number): Stream {
    if (!Number.isSafeInteger(handle) || handle < 0) throw new RangeError(`handle: expected a stream pointer, got ${String(handle)}`);
    return new Stream(handle, device, false);
  }

  /** Block until all work submitted so far has finished. */
  synchronize(): void {
    this.#checkOpen();
    check(native().bun_ep_stream_synchronize(this.handle), `synchronizing stream ${this.#label()}`);
  }

  /** True when all work submitted so far has finished. */
  query(): boolean {
    this.#checkOpen();
    return checkReady(native().bun_ep_stream_query(this.handle), `querying stream ${this.#label()}`);
  }

  /** Later work on this stream waits for `event` (recorded on any stream). */
  waitEvent(event: Event): void {
    this.#checkOpen();
    event.waitOn(this.handle);
  }

  /** Record a new event on this stream (no timing). */
  recordEvent(options: { timing?: boolean } = {}): Event {
    return Event.create({ device: this.device, timing: options.timing ?? false }).record(this);
  }

  /** Start capturing this stream's work into a graph instead of running it (not the legacy stream). */
  beginCapture(): void {
    this.#checkOpen();
    if (this.handle === 0) throw new Error("beginCapture: the legacy default stream cannot be captured; use Stream.create()");
    check(native().bun_ep_stream_begin_capture(this.handle), `beginning capture on stream ${this.#label()}`);
  }

  /** Stop capturing: the captured work as a graph that launch() replays. */
  endCapture(): Graph {
    this.#checkOpen();
    check(native().bun_ep_stream_end_capture(this.handle, outPointer), `ending capture on stream ${this.#label()}`);
    return new Graph(takePointer(), this.device);
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Destroy the stream (owned streams only; pending work still completes). */
  close(): void {
    if (this.#closed || !this.owned) return;
    this.#closed = true;
    check(native().bun_ep_stream_destroy(this.handle), `destroying stream ${this.#label()}`);
  }

  [Symbol.dispose](): void {
    this.close();
  }

  #checkOpen(): void {
    if (this.#closed) throw new Error(`stream ${this.#label()} is closed`);
  }

  #label(): string {
    return `0x${this.handle.toString(16)} (device ${this.device})`;
  }
}

/** A stream or a raw stream handle. */
export type StreamLike = Stream | number;

export function streamHandle(stream: StreamLike): number {
  return typeof stream === "number" ? stream : stream.handle;
}

// ---- events --------------------------------------------------------------------------------------------

export interface EventOptions {
  /** Needed for elapsedMs(); timing events cost a little more. Default false. */
  timing?: boolean;
  device?: number;
}

/** A CUDA event: marks a point in a stream's work. */
export class Event implements EventLike {
  readonly handle: number;
  readonly device: number;
  readonly timing: boolean;
  #closed = false;

  private constructor(handle: number, device: number, timing: boolean) {
    this.handle = handle;
    this.device = device;
    this.timing = timing;
  }

  static create(options: EventOptions = {}): Event {
    const device = options.device ?? currentDevice();
    const timing = options.timing ?? false;
    withDevice(device, () =>
      check(native().bun_ep_event_create(timing ? 1 : 0, outPointer), `creating an event on device ${device}`),
    );
    return new Event(takePointer(), device, timing);
  }

  /** Mark the current end of `stream`'s work; returns this. */
  record(stream: StreamLike): this {
    this.#checkOpen();
    check(native().bun_ep_event_record(this.handle, streamHandle(stream)), "recording an event");
    return this;
  }

  /** Make `stream` wait for this event's last record before running later work. */
  waitOn(stream: StreamLike): void {
    this.#checkOpen();
    check(native().bun_ep_stream_wait_event(streamHandle(stream), this.handle), "making a stream wait on an event");
  }

  synchronize(): void {
    this.#checkOpen();
    check(native().bun_ep_event_synchronize(this.handle), "synchronizing an event");
  }

  /** True when the work before the last record has finished. */
  query(): boolean {
    this.#checkOpen();
    return checkReady(native().bun_ep_event_query(this.handle), "querying an event");
  }

  /** Milliseconds from this event to `end` (both timing events, both completed). */
  elapsedMs(end: Event): number {
    this.#checkOpen();
    if (!this.timing || !end.timing) {
      throw new Error("elapsedMs: both events must be created with { timing: true }");
    }
    check(native().bun_ep_event_elapsed_ms(this.handle, end.handle, outDouble), "measuring elapsed time between events");
    return outDouble[0]!;
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    check(native().bun_ep_event_destroy(this.handle), "destroying an event");
  }

  [Symbol.dispose](): void {
    this.close();
  }

  #checkOpen(): void {
    if (this.#closed) throw new Error("event is closed");
  }
}

// ---- graphs --------------------------------------------------------------------------------------------

/** Work captured from a stream (Stream.beginCapture/endCapture), replayed by launch(). */
export class Graph {
  /** The cudaGraphExec_t as a number. */
  readonly handle: number;
  readonly device: number;
  #closed = false;

  /** @internal use Stream.endCapture(). */
  constructor(handle: number, device: number) {
    this.handle = handle;
    this.device = device;
  }

  /** Replay the captured work on `stream`. */
  launch(stream: StreamLike): void {
    if (this.#closed) throw new Error("graph is closed");
    check(native().bun_ep_graph_launch(this.handle, streamHandle(stream)), "launching a graph");
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    check(native().bun_ep_graph_destroy(this.handle), "destroying a graph");
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
