// Tensors: HostTensor (CPU memory, used by the host backend and the reference), DeviceTensor
// (CUDA device memory) and PinnedTensor (mapped pinned host memory, a typed array the GPU writes).
// All tensors are dense and row-major; shapes are plain number arrays.

import { DTYPE_BYTES, DTYPES, allocTyped, type DType, type TypedArrayFor } from "./dtype.ts";

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
