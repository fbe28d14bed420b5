// Element types shared by every layer. Conversions between f32 and the 16/8-bit formats live in
// lib/convert.ts; this file only names the types and their sizes.

export type DType = "bf16" | "fp8_e4m3" | "f32" | "i32" | "i64" | "u8";

export const DTYPES: readonly DType[] = ["bf16", "fp8_e4m3", "f32", "i32", "i64", "u8"];

/** Bytes per element. */
export const DTYPE_BYTES: Readonly<Record<DType, number>> = {
  bf16: 2,
  fp8_e4m3: 1,
  f32: 4,
  i32: 4,
  i64: 8,
  u8: 1,
};

/** The typed array that views each dtype's raw storage (bf16 and e4m3 are raw bit patterns). */
export interface TypedArrayOf {
  bf16: Uint16Array;
  fp8_e4m3: Uint8Array;
  f32: Float32Array;
  i32: Int32Array;
  i64: BigInt64Array;
  u8: Uint8Array;
}
export type TypedArrayFor<D extends DType> = TypedArrayOf[D];
export type AnyTypedArray = TypedArrayOf[DType];

/** Numeric code of each dtype in the C ABI (`bunEpDataType_t` in cuda/include/bun_ep.h). */
export const DTYPE_CODE: Readonly<Record<DType, number>> = {
  bf16: 0,
  fp8_e4m3: 1,
  f32: 2,
  i32: 3,
  i64: 4,
  u8: 5,
};

/** A typed-array view of `byteLength` bytes at `byteOffset` of `buffer`, typed for `dtype`. */
export function typedView<D extends DType>(
  dtype: D,
  buffer: ArrayBufferLike,
  byteOffset: number,
  numel: number,
): TypedArrayFor<D> {
  switch (dtype) {
    case "bf16":
      return new Uint16Array(buffer, byteOffset, numel) as TypedArrayFor<D>;
    case "fp8_e4m3":
    case "u8":
      return new Uint8Array(buffer, byteOffset, numel) as TypedArrayFor<D>;
    case "f32":
      return new Float32Array(buffer, byteOffset, numel) as TypedArrayFor<D>;
    case "i32":
      return new Int32Array(buffer, byteOffset, numel) as TypedArrayFor<D>;
    case "i64":
      return new BigInt64Array(buffer, byteOffset, numel) as TypedArrayFor<D>;
    default:
      throw new TypeError(`dtype: unknown dtype ${JSON.stringify(dtype)}; expected one of ${DTYPES.join(", ")}`);
  }
}

export function allocTyped<D extends DType>(dtype: D, numel: number): TypedArrayFor<D> {
  return typedView(dtype, new ArrayBuffer(numel * DTYPE_BYTES[dtype]), 0, numel);
}
