// Tensors: HostTensor (CPU memory, used by the host backend and the reference), DeviceTensor
// (CUDA device memory) and PinnedTensor (mapped pinned host memory, a typed array the GPU writes).
// All tensors are dense and row-major; shapes are plain number arrays.

import { toArrayBuffer } from "bun:ffi";
import { DTYPE_BYTES, DTYPES, allocTyped, typedView, type DType, type TypedArrayFor } from "./dtype.ts";
import { check, native } from "./ffi.ts";
import { Stream, currentDevice, type StreamLike } from "./stream.ts";

/** "cpu", or a CUDA device ordinal. */
export type Device = "cpu" | number;

/** What every tensor kind has: enough to validate shapes and dtypes without touching the data. */
export interface Tensor<D extends DType = DType> {
  readonly dtype: D;
  readonly shape: readonly number[];
  readonly device: Device;
  /** Number of elements (product of the shape). */
  readonly numel: number;
  readonly byteLength: number;
  /** False for a strided view; every kernel and the reference need contiguous inputs. */
  readonly contiguous: boolean;
  /** Releases device or pinned memory (a view frees nothing); a no-op for host tensors. */
  free(): void;
  [Symbol.dispose](): void;
}

export function numelOf(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

export function checkShape(shape: readonly number[], what = "shape"): void {
  for (const d of shape) {
    if (!Number.isSafeInteger(d) || d < 0) {
      throw new RangeError(`${what}: every dimension must be a non-negative integer, got [${shape.join(", ")}]`);
    }
  }
}

export function checkDType(dtype: string, what = "dtype"): asserts dtype is DType {
  if (!(DTYPES as readonly string[]).includes(dtype)) {
    throw new TypeError(`${what}: unknown dtype ${JSON.stringify(dtype)}; expected one of ${DTYPES.join(", ")}`);
  }
}

/** A tensor in ordinary CPU memory, backed by a typed array (bf16/e4m3 as raw bits). */
export class HostTensor<D extends DType = DType> implements Tensor<D> {
  readonly dtype: D;
  readonly shape: readonly number[];
  readonly device = "cpu" as const;
  readonly numel: number;
  readonly contiguous = true;
  readonly data: TypedArrayFor<D>;

  constructor(dtype: D, shape: readonly number[], data?: TypedArrayFor<D>) {
    checkDType(dtype);
    checkShape(shape);
    this.dtype = dtype;
    this.shape = Object.freeze([...shape]);
    this.numel = numelOf(shape);
    if (data === undefined) {
      this.data = allocTyped(dtype, this.numel);
    } else {
      if (data.length !== this.numel) {
        throw new RangeError(
          `data: expected ${this.numel} elements for shape [${shape.join(", ")}], got ${data.length}`,
        );
      }
      this.data = data;
    }
  }

  get byteLength(): number {
    return this.numel * DTYPE_BYTES[this.dtype];
  }

  static zeros<D extends DType>(dtype: D, shape: readonly number[]): HostTensor<D> {
    return new HostTensor(dtype, shape);
  }

  /** A new tensor with every element set to `value` (a bit pattern for bf16/e4m3). */
  static full<D extends DType>(dtype: D, shape: readonly number[], value: number | bigint): HostTensor<D> {
    const t = new HostTensor(dtype, shape);
    (t.data as { fill(v: number | bigint): unknown }).fill(value);
    return t;
  }

  clone(): HostTensor<D> {
    return new HostTensor(this.dtype, this.shape, this.data.slice() as TypedArrayFor<D>);
  }

  /** The same storage under another shape with the same element count. */
  reshape(shape: readonly number[]): HostTensor<D> {
    return new HostTensor(this.dtype, shape, this.data);
  }

  /** Rows [begin, end) of the first dimension, sharing storage. */
  rows(begin: number, end: number): HostTensor<D> {
    const rowNumel = this.shape.length === 0 ? 1 : this.numel / Math.max(1, this.shape[0]!);
    const sub = this.data.subarray(begin * rowNumel, end * rowNumel) as TypedArrayFor<D>;
    return new HostTensor(this.dtype, [end - begin, ...this.shape.slice(1)], sub);
  }

  /** Host tensors need no freeing; present so that every tensor can be used with `using`. */
  free(): void {}
  [Symbol.dispose](): void {}
}

// ---- device memory -------------------------------------------------------------------------------------

/** One device allocation, shared by a tensor and its views. */
interface Allocation {
  readonly ptr: number;
  readonly byteLength: number;
  readonly device: number;
  /** The stream it was allocated on: cudaFreeAsync orders the free after that stream's work. */
  readonly stream: Stream;
  freed: boolean;
}

/** Only a warning: freeing from a finalizer could race with work still using the memory. */
const leakWarnings = new FinalizationRegistry<{ byteLength: number; device: number; shape: string }>((leak) => {
  console.warn(
    `bun-ep: a DeviceTensor ${leak.shape} (${leak.byteLength} bytes on device ${leak.device}) was garbage-collected ` +
      "without free(): its memory stays allocated until the process exits. Call free() or declare it with `using`.",
  );
});

const outPointer = new BigUint64Array(1);
const outPointer2 = new BigUint64Array(1);

export interface DeviceTensorOptions {
  /** CUDA device ordinal; default: the stream's device, else the current device. */
  device?: number;
  /** Stream that orders the allocation (and the copy/fill); default Stream.forDevice(device). */
  stream?: Stream;
}

function shapeText(shape: readonly number[]): string {
  return `[${shape.join(", ")}]`;
}

function resolvePlacement(options: DeviceTensorOptions): { device: number; stream: Stream } {
  const device = options.device ?? options.stream?.device ?? currentDevice();
  if (!Number.isInteger(device) || device < 0) {
    throw new RangeError(`device: expected a CUDA device ordinal (integer >= 0), got ${String(device)}`);
  }
  const stream = options.stream ?? Stream.forDevice(device);
  if (stream.device !== device) {
    throw new RangeError(`stream: belongs to device ${stream.device} but the tensor is for device ${device}`);
  }
  return { device, stream };
}

function handleOf(stream: StreamLike): number {
  return typeof stream === "number" ? stream : stream.handle;
}

/**
 * A dense row-major tensor in CUDA device memory. `ptr` is the device address (a number).
 * Operations are asynchronous on the tensor's stream unless a stream is given, except toHost().
 * Free with free() or `using`; views (view, rows) share the memory and free nothing.
 */
export class DeviceTensor<D extends DType = DType> implements Tensor<D> {
  readonly dtype: D;
  readonly shape: readonly number[];
  readonly device: number;
  readonly numel: number;
  readonly contiguous = true;
  /** Device address of element 0. */
  readonly ptr: number;
  /** Default stream of this tensor's operations; null until first needed for fromPointer tensors. */
  #stream: Stream | null;
  /** Set for memory this package allocated; null for fromPointer tensors and views. */
  readonly #allocation: Allocation | null;
  /** The allocation a view shares (to report use after free); null when not owned by this package. */
  readonly #backing: Allocation | null;

  private constructor(
    dtype: D,
    shape: readonly number[],
    ptr: number,
    device: number,
    stream: Stream | null,
    allocation: Allocation | null,
    backing: Allocation | null,
  ) {
    this.dtype = dtype;
    this.shape = Object.freeze([...shape]);
    this.numel = numelOf(shape);
    this.ptr = ptr;
    this.device = device;
    this.#stream = stream;
    this.#allocation = allocation;
    this.#backing = backing;
  }

  get byteLength(): number {
    return this.numel * DTYPE_BYTES[this.dtype];
  }

  /** Default stream of this tensor's asynchronous operations: the one it was allocated on, else
   * the one given to fromPointer, else Stream.forDevice(device). */
  get stream(): Stream {
    this.#stream ??= Stream.forDevice(this.device);
    return this.#stream;
  }

  /** True once the memory was freed (through this tensor or the one it views). */
  get freed(): boolean {
    return this.#backing?.freed ?? false;
  }

  /** Uninitialised memory, allocated in stream order (cudaMallocAsync). */
  static empty<D extends DType>(dtype: D, shape: readonly number[], options: DeviceTensorOptions = {}): DeviceTensor<D> {
    checkDType(dtype);
    checkShape(shape);
    const { device, stream } = resolvePlacement(options);
    const byteLength = numelOf(shape) * DTYPE_BYTES[dtype];
    check(
      native().bun_ep_malloc_async(outPointer, byteLength, stream.handle),
      `allocating DeviceTensor ${dtype} ${shapeText(shape)} (${byteLength} bytes) on device ${device}`,
    );
    const ptr = Number(outPointer[0]);
    const allocation: Allocation = { ptr, byteLength, device, stream, freed: false };
    const tensor = new DeviceTensor(dtype, shape, ptr, device, stream, allocation, allocation);
    if (byteLength > 0) leakWarnings.register(tensor, { byteLength, device, shape: `${dtype} ${shapeText(shape)}` }, allocation);
    return tensor;
  }

  /** Zero-filled memory (the fill is ordered on the tensor's stream). */
  static zeros<D extends DType>(dtype: D, shape: readonly number[], options: DeviceTensorOptions = {}): DeviceTensor<D> {
    const tensor = DeviceTensor.empty(dtype, shape, options);
    tensor.fillBytes(0);
    return tensor;
  }

  /** A device copy of a host tensor. The host data may be reused as soon as this returns. */
  static fromHost<D extends DType>(host: HostTensor<D> | PinnedTensor<D>, options: DeviceTensorOptions = {}): DeviceTensor<D> {
    const tensor = DeviceTensor.empty(host.dtype, host.shape, options);
    tensor.copyFrom(host);
    if (host instanceof HostTensor) {
      // Pageable copies are staged before cudaMemcpyAsync returns; wait anyway so that a caller that
      // changes the typed array right after never races the DMA.
      tensor.stream.synchronize();
    }
    return tensor;
  }

  /**
   * A tensor over memory someone else owns (the user's allocator, another library): never freed
   * here. The caller keeps the memory alive while the tensor is used.
   */
  static fromPointer<D extends DType>(
    ptr: number,
    dtype: D,
    shape: readonly number[],
    device: number,
    options: { stream?: Stream } = {},
  ): DeviceTensor<D> {
    checkDType(dtype);
    checkShape(shape);
    if (!Number.isSafeInteger(ptr) || ptr < 0) throw new RangeError(`ptr: expected a device address (number), got ${String(ptr)}`);
    if (ptr === 0 && numelOf(shape) > 0) throw new RangeError(`ptr: is 0 (NULL) for a non-empty tensor ${shapeText(shape)}`);
    if (!Number.isInteger(device) || device < 0) {
      throw new RangeError(`device: expected a CUDA device ordinal (integer >= 0), got ${String(device)}`);
    }
    if (options.stream !== undefined && options.stream.device !== device) {
      throw new RangeError(`stream: belongs to device ${options.stream.device} but the tensor is on device ${device}`);
    }
    return new DeviceTensor(dtype, shape, ptr, device, options.stream ?? null, null, null);
  }

  /** The same memory under another shape with the same element count. */
  view(shape: readonly number[]): DeviceTensor<D> {
    checkShape(shape);
    this.#checkAlive("view");
    if (numelOf(shape) !== this.numel) {
      throw new RangeError(`view: shape ${shapeText(shape)} has ${numelOf(shape)} elements, the tensor ${shapeText(this.shape)} has ${this.numel}`);
    }
    return new DeviceTensor(this.dtype, shape, this.ptr, this.device, this.#stream, null, this.#backing);
  }

  /** Rows [begin, end) of the first dimension, sharing memory. */
  rows(begin: number, end: number): DeviceTensor<D> {
    this.#checkAlive("rows");
    if (this.shape.length === 0) throw new RangeError("rows: a 0-dimensional tensor has no rows");
    const numRows = this.shape[0]!;
    if (!Number.isInteger(begin) || !Number.isInteger(end) || begin < 0 || end < begin || end > numRows) {
      throw new RangeError(`rows: expected 0 <= begin <= end <= ${numRows}, got begin ${begin}, end ${end}`);
    }
    const rowBytes = numRows === 0 ? 0 : this.byteLength / numRows;
    const shape = [end - begin, ...this.shape.slice(1)];
    return new DeviceTensor(this.dtype, shape, this.ptr + begin * rowBytes, this.device, this.#stream, null, this.#backing);
  }

  /** Copy from a tensor of the same dtype and element count (any kind), ordered on `stream`. */
  copyFrom(source: Tensor<D>, stream: StreamLike = this.stream): this {
    this.#checkAlive("copyFrom");
    checkSameLayout(this, source, "copyFrom");
    if (this.byteLength === 0) return this;
    const what = `copying ${source.byteLength} bytes into DeviceTensor ${this.dtype} ${shapeText(this.shape)}`;
    const lib = native();
    if (source instanceof HostTensor) {
      check(lib.bun_ep_memcpy_async(this.ptr, source.data, this.byteLength, handleOf(stream)), what);
    } else if (source instanceof PinnedTensor) {
      check(lib.bun_ep_memcpy_async(this.ptr, source.hostPtr, this.byteLength, handleOf(stream)), what);
    } else if (source instanceof DeviceTensor) {
      source.#checkAlive("copyFrom (source)");
      check(lib.bun_ep_memcpy_async(this.ptr, source.ptr, this.byteLength, handleOf(stream)), what);
    } else {
      throw new TypeError("copyFrom: source must be a HostTensor, PinnedTensor or DeviceTensor");
    }
    return this;
  }

  /** Set every byte to `byte` (0..255), ordered on `stream`. */
  fillBytes(byte: number, stream: StreamLike = this.stream): this {
    this.#checkAlive("fillBytes");
    if (!Number.isInteger(byte) || byte < 0 || byte > 255) throw new RangeError(`fillBytes: byte must be an integer in [0, 255], got ${byte}`);
    check(
      native().bun_ep_memset_async(this.ptr, byte, this.byteLength, handleOf(stream)),
      `filling DeviceTensor ${this.dtype} ${shapeText(this.shape)}`,
    );
    return this;
  }

  /** Alias of fillBytes, named after cudaMemset. */
  memset(byte: number, stream: StreamLike = this.stream): this {
    return this.fillBytes(byte, stream);
  }

  /** A host copy, after all work so far on `stream` (default: the tensor's stream). Synchronous. */
  toHost(stream: StreamLike = this.stream): HostTensor<D> {
    this.#checkAlive("toHost");
    const host = new HostTensor(this.dtype, this.shape);
    if (this.byteLength > 0) {
      const lib = native();
      const what = `copying DeviceTensor ${this.dtype} ${shapeText(this.shape)} to the host`;
      check(lib.bun_ep_memcpy_async(host.data, this.ptr, this.byteLength, handleOf(stream)), what);
      check(lib.bun_ep_stream_synchronize(handleOf(stream)), what);
    }
    return host;
  }

  /**
   * Release the memory (stream-ordered after the work on `stream`, default the allocation's stream).
   * Work on other streams that uses it must be finished or ordered before. A no-op for views,
   * fromPointer tensors, and a second call.
   */
  free(stream?: StreamLike): void {
    const allocation = this.#allocation;
    if (allocation === null || allocation.freed) return;
    allocation.freed = true;
    leakWarnings.unregister(allocation);
    check(
      native().bun_ep_free_async(allocation.ptr, handleOf(stream ?? allocation.stream)),
      `freeing DeviceTensor ${this.dtype} ${shapeText(this.shape)} on device ${allocation.device}`,
    );
  }

  [Symbol.dispose](): void {
    this.free();
  }

  #checkAlive(what: string): void {
    if (this.#backing?.freed) {
      throw new Error(`${what}: DeviceTensor ${this.dtype} ${shapeText(this.shape)} was already freed`);
    }
  }
}

function checkSameLayout(target: Tensor, source: Tensor, what: string): void {
  if (source.dtype !== target.dtype || source.numel !== target.numel) {
    throw new RangeError(
      `${what}: source is ${source.dtype} ${shapeText(source.shape)}, expected ${target.dtype} with ${target.numel} elements ` +
        `(like ${shapeText(target.shape)})`,
    );
  }
  if (!source.contiguous) throw new RangeError(`${what}: source must be contiguous`);
}

// ---- mapped pinned host memory ---------------------------------------------------------------------

/**
 * Mapped pinned host memory: `data` is a typed array over it (no copy) for the CPU, `devicePtr` the
 * address kernels of any device use. What a kernel writes shows up in `data` once the kernel's
 * writes are visible (after its stream or event completes, or through a flag it wrote last).
 */
export class PinnedTensor<D extends DType = DType> implements Tensor<D> {
  readonly dtype: D;
  readonly shape: readonly number[];
  readonly device = "cpu" as const;
  readonly numel: number;
  readonly contiguous = true;
  readonly hostPtr: number;
  readonly devicePtr: number;
  /** Views the pinned memory itself; empty (length 0) once freed. */
  readonly data: TypedArrayFor<D>;
  readonly #buffer: ArrayBuffer;
  #freed = false;

  private constructor(dtype: D, shape: readonly number[], hostPtr: number, devicePtr: number, buffer: ArrayBuffer) {
    this.dtype = dtype;
    this.shape = Object.freeze([...shape]);
    this.numel = numelOf(shape);
    this.hostPtr = hostPtr;
    this.devicePtr = devicePtr;
    this.#buffer = buffer;
    this.data = typedView(dtype, buffer, 0, this.numel);
  }

  get byteLength(): number {
    return this.numel * DTYPE_BYTES[this.dtype];
  }

  get freed(): boolean {
    return this.#freed;
  }

  /** Zero-filled mapped pinned memory (cudaHostAlloc mapped | portable). */
  static zeros<D extends DType>(dtype: D, shape: readonly number[]): PinnedTensor<D> {
    checkDType(dtype);
    checkShape(shape);
    // At least one byte so that even an empty tensor has distinct, valid pointers.
    const byteLength = Math.max(1, numelOf(shape) * DTYPE_BYTES[dtype]);
    check(
      native().bun_ep_host_alloc_mapped(outPointer, outPointer2, byteLength),
      `allocating PinnedTensor ${dtype} ${shapeText(shape)} (${byteLength} bytes)`,
    );
    const hostPtr = Number(outPointer[0]);
    const devicePtr = Number(outPointer2[0]);
    const buffer = toArrayBuffer(hostPtr, 0, byteLength);
    new Uint8Array(buffer).fill(0);
    return new PinnedTensor(dtype, shape, hostPtr, devicePtr, buffer);
  }

  /** Pinned memory holding a copy of `host`. */
  static fromHost<D extends DType>(host: HostTensor<D>): PinnedTensor<D> {
    const pinned = PinnedTensor.zeros(host.dtype, host.shape);
    (pinned.data as unknown as { set(a: ArrayLike<number | bigint>): void }).set(host.data as ArrayLike<number | bigint>);
    return pinned;
  }

  /** A HostTensor over the same memory (no copy), for code that takes host tensors. */
  asHost(): HostTensor<D> {
    if (this.#freed) throw new Error("asHost: PinnedTensor was already freed");
    return new HostTensor(this.dtype, this.shape, this.data);
  }

  /** Release the memory. The typed arrays over it are detached first (length 0), so a late read
   * cannot touch freed memory. The caller makes sure no kernel still uses it. */
  free(): void {
    if (this.#freed) return;
    this.#freed = true;
    this.#buffer.transfer(0);
    check(native().bun_ep_host_free(this.hostPtr), `freeing PinnedTensor ${this.dtype} ${shapeText(this.shape)}`);
  }

  [Symbol.dispose](): void {
    this.free();
  }
}
