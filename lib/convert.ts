// Exact conversions between f32 and the 16/8-bit formats, bit for bit as CUDA does them, and the
// FP8 (e4m3) per-128-channel quantization of docs/ARCHITECTURE.md ("Low-latency dispatch").
//
// bf16 and e4m3 values travel as raw bit patterns (Uint16Array / Uint8Array). Scalar functions take
// and return JS numbers; a number given where an f32 is meant is first rounded to f32 (Math.fround),
// as passing it to a `float` parameter would. Every f32 operation is rounded once with Math.fround
// (JS numbers are f64, whose single operations on f32 inputs round to f32 exactly as an f32 operation
// would: f64 has more than 2*24+2 significand bits). There is no fused multiply-add anywhere.

import { HostTensor } from "./tensor.ts";

// One scratch word to move between an f32 and its bits.
const scratchF32 = new Float32Array(1);
const scratchU32 = new Uint32Array(scratchF32.buffer);

/** The IEEE bits of f32(x). NaN inputs give some NaN pattern (callers test for NaN first). */
export function f32Bits(x: number): number {
  scratchF32[0] = x;
  return scratchU32[0]!;
}

/** The f32 whose IEEE bits are `bits` (a NaN pattern gives NaN; its payload is not kept by JS). */
export function f32FromBits(bits: number): number {
  scratchU32[0] = bits >>> 0;
  return scratchF32[0]!;
}

// ---------------------------------------------------------------------------------------------
// bf16: 1 sign, 8 exponent (bias 127), 7 mantissa bits: the top half of an f32.

/** bf16 bits whose value is NaN. */
export function isBf16NaN(bits: number): boolean {
  return (bits & 0x7fff) > 0x7f80;
}

/** Exact widening: the f32 with the same top 16 bits. NaN stays NaN; ±Inf and subnormals exact. */
export function bf16ToF32(bits: number): number {
  return f32FromBits((bits & 0xffff) << 16);
}

/** The canonical NaN that CUDA's `cvt.rn.bf16.f32` (and its host fallback) writes for any NaN input. */
export const BF16_CANONICAL_NAN = 0x7fff;

/**
 * bf16(x), as CUDA's `__float2bfloat16_rn`: round to nearest, ties to even, on the f32 bits.
 * NaN (any sign or payload) -> 0x7FFF. ±Inf -> ±Inf (0x7F80 / 0xFF80). Finite values beyond the
 * largest bf16 round to ±Inf (above max + half an ulp, or exactly at it since max is odd).
 * Subnormals are kept and rounded like any other value (no flush to zero); ±0 keeps its sign.
 */
export function f32ToBf16(x: number): number {
  if (x !== x) return BF16_CANONICAL_NAN;
  const bits = f32Bits(x);
  const truncated = bits >>> 16;
  const remainder = bits & 0xffff; // the dropped bits; 0x8000 is exactly half an ulp
  if (remainder > 0x8000 || (remainder === 0x8000 && (truncated & 1) !== 0)) return (truncated + 1) & 0xffff;
  return truncated;
}

// ---------------------------------------------------------------------------------------------
// e4m3 (OCP FP8 E4M3 "fn"): 1 sign, 4 exponent (bias 7), 3 mantissa bits; no Inf; S.1111.111 is
// NaN (0x7F, 0xFF); largest finite ±448 (0x7E / 0xFE); smallest subnormal 2^-9.

export const E4M3_MAX = 448;
/** The NaN pattern CUDA writes for a NaN input (sign dropped). */
export const E4M3_NAN = 0x7f;

/** e4m3 bits whose value is NaN. */
export function isE4m3NaN(bits: number): boolean {
  return (bits & 0x7f) === 0x7f;
}

/** Exact widening to f32 (every e4m3 value is an f32). 0x7F/0xFF -> NaN; subnormals exact. */
export function e4m3ToF32(bits: number): number {
  const sign = bits & 0x80 ? -1 : 1;
  const exponent = (bits >> 3) & 0xf;
  const mantissa = bits & 0x7;
  if (exponent === 0xf && mantissa === 0x7) return NaN;
  if (exponent === 0) return sign * mantissa * 2 ** -9; // subnormal: m/8 * 2^(1-7)
  return sign * (8 + mantissa) * 2 ** (exponent - 10); // (1 + m/8) * 2^(e-7)
}

// Thresholds on |f32 bits|, the same as cuda_fp8.hpp's (there on f64 bits).
const E4M3_OVERFLOW_BITS = 0x43e80000; // 464 = 448 + half an ulp: above it, saturate
const E4M3_UNDERFLOW_BITS = 0x3a800000; // 2^-10 = half the smallest subnormal: at or below, 0
const E4M3_MIN_NORMAL_BITS = 0x3c800000; // 2^-6

/**
 * e4m3(x), as CUDA's `__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3)` (sm_89+ `cvt.rn.satfinite
 * .e4m3x2.f32` and the header's host fallback agree): round to nearest, ties to even.
 * NaN (any sign) -> 0x7F. |x| > 464 including ±Inf -> ±448 (0x7E / 0xFE); values in (448, 464] round
 * to 448 by the ordinary tie-to-even rule. |x| <= 2^-10 -> ±0 (sign kept: -tiny gives 0x80).
 * Subnormals (|x| < 2^-6) round to multiples of 2^-9; rounding up out of the subnormal range gives
 * the smallest normal 2^-6.
 */
export function f32ToE4m3(x: number): number {
  if (x !== x) return E4M3_NAN;
  const bits = f32Bits(x);
  const sign = (bits >>> 31) << 7;
  const magnitude = bits & 0x7fffffff;
  if (magnitude > E4M3_OVERFLOW_BITS) return sign | 0x7e;
  if (magnitude <= E4M3_UNDERFLOW_BITS) return sign;
  if (magnitude >= E4M3_MIN_NORMAL_BITS) {
    const exponent = (magnitude >>> 23) - 127 + 7;
    const mantissa = (magnitude >>> 20) & 0x7;
    const remainder = magnitude & 0xfffff; // dropped bits; 0x80000 is half an ulp
    let result = (exponent << 3) | mantissa;
    if (remainder > 0x80000 || (remainder === 0x80000 && (mantissa & 1) !== 0)) result += 1;
    return sign | result;
  }
  // Subnormal: the value in units of 2^-9 (exact in f64), rounded to an integer 1..8 (8 encodes
  // 2^-6, the smallest normal, which is also the right bit pattern).
  const units = Math.abs(f32FromBits(magnitude)) * 512;
  let rounded = Math.floor(units);
  const fraction = units - rounded;
  if (fraction > 0.5 || (fraction === 0.5 && (rounded & 1) !== 0)) rounded += 1;
  return sign | rounded;
}

// ---------------------------------------------------------------------------------------------
// Array versions (bit-exact: bf16 -> f32 moves bits, so even NaN payloads survive).

export function bf16ArrayToF32(bits: Uint16Array): Float32Array {
  const out = new Float32Array(bits.length);
  const outBits = new Uint32Array(out.buffer);
  for (let i = 0; i < bits.length; i++) outBits[i] = bits[i]! << 16;
  return out;
}

export function f32ArrayToBf16(values: ArrayLike<number>): Uint16Array {
  const out = new Uint16Array(values.length);
  for (let i = 0; i < values.length; i++) out[i] = f32ToBf16(values[i]!);
  return out;
}

export function e4m3ArrayToF32(bits: Uint8Array): Float32Array {
  const out = new Float32Array(bits.length);
  for (let i = 0; i < bits.length; i++) out[i] = e4m3ToF32(bits[i]!);
  return out;
}

export function f32ArrayToE4m3(values: ArrayLike<number>): Uint8Array {
  const out = new Uint8Array(values.length);
  for (let i = 0; i < values.length; i++) out[i] = f32ToE4m3(values[i]!);
  return out;
}

/** A bf16 tensor holding bf16(values) (values rounded to f32 first), of the given shape. */
export function bf16Tensor(shape: readonly number[], values: ArrayLike<number>): HostTensor<"bf16"> {
  return new HostTensor("bf16", shape, f32ArrayToBf16(values));
}

/** The exact f32 values of a bf16 or fp8 tensor (f32 tensors are copied). */
export function toF32Tensor(t: HostTensor): HostTensor<"f32"> {
  switch (t.dtype) {
    case "bf16":
      return new HostTensor("f32", t.shape, bf16ArrayToF32(t.data as Uint16Array));
    case "fp8_e4m3":
      return new HostTensor("f32", t.shape, e4m3ArrayToF32(t.data as Uint8Array));
    case "f32":
      return new HostTensor("f32", t.shape, (t.data as Float32Array).slice());
    default:
      throw new TypeError(`toF32Tensor: dtype ${t.dtype} is not a floating-point type (bf16, fp8_e4m3, f32)`);
  }
}

// ---------------------------------------------------------------------------------------------
// FP8 quantization (docs/ARCHITECTURE.md, "Low-latency dispatch", Payload):
//   amax  = max(max_i |f32(x[i])| over the 128-channel group, 1e-4)
//   scale = f32(amax / 448)                      dequantization scale
//   roundScale or ue8m0: scale = 2^ceil(log2(scale))
//   q[i]  = e4m3(f32(x[i] * f32(1 / scale)))     with roundScale (1/scale is an exact power of two)
//   q[i]  = e4m3(f32(x[i] * f32(448 / amax)))    without
//   dequantize: f32(f32(q) * scale)
// NaN/Inf in x (not expected in practice): amax skips NaN as CUDA's fmaxf does, so a NaN element
// only makes its own q 0x7F (NaN * m = NaN). An Inf element makes amax and the scale Inf (with
// roundScale, 2^128 = Inf; UE8M0 byte 255), the multiplier 0: finite elements quantize to ±0 and
// the Inf one to 0x7F (Inf * 0 = NaN).

export const FP8_GROUP_SIZE = 128;
/** Groups packed per i32 word of UE8M0 scales. */
export const UE8M0_GROUPS_PER_WORD = 4;
/** The floor on a group's amax, as f32. */
export const FP8_AMAX_FLOOR = Math.fround(1e-4);

export interface Fp8QuantizeOptions {
  /** Round each scale up to a power of two (implied by ue8m0). */
  roundScale: boolean;
  /** Return scales as packed UE8M0 exponents, i32 [T, H/512] (implies roundScale). */
  ue8m0: boolean;
}

/** 2^ceil(log2(s)) for a positive finite normal f32 s, exactly (from the bits, not Math.log2). */
export function powerOfTwoCeil(s: number): number {
  const bits = f32Bits(s);
  const exponent = ((bits >>> 23) & 0xff) - 127;
  const exact = (bits & 0x7fffff) === 0;
  return Math.fround(2 ** (exact ? exponent : exponent + 1)); // as f32: 2^128 is Inf
}

/** The dequantization scale of a group with maximum magnitude `amax` (before the 1e-4 floor). */
export function fp8GroupScale(amax: number, roundScale: boolean): number {
  const flooredAmax = Math.max(Math.fround(amax), FP8_AMAX_FLOOR);
  const scale = Math.fround(flooredAmax / E4M3_MAX);
  return roundScale ? powerOfTwoCeil(scale) : scale;
}

/**
 * Quantize one group: `x` (bf16 bits, usually 128 of them) into `q` (e4m3 bits, same length).
 * Returns the f32 dequantization scale (a power of two when roundScale).
 */
export function quantizeFp8Group(x: Uint16Array, q: Uint8Array, roundScale: boolean): number {
  let amax = 0;
  for (let i = 0; i < x.length; i++) {
    const magnitude = Math.abs(bf16ToF32(x[i]!));
    if (magnitude > amax) amax = magnitude; // false for NaN: skipped, as fmaxf(amax, NaN) = amax
  }
  amax = Math.max(amax, FP8_AMAX_FLOOR);
  const scale = fp8GroupScale(amax, roundScale);
  const multiplier = roundScale ? Math.fround(1 / scale) : Math.fround(E4M3_MAX / amax);
  for (let i = 0; i < x.length; i++) q[i] = f32ToE4m3(Math.fround(bf16ToF32(x[i]!) * multiplier));
  return scale;
}

/** The UE8M0 byte of a power-of-two scale: its biased exponent log2(scale) + 127. */
export function ue8m0Byte(scale: number): number {
  const bits = f32Bits(scale);
  if ((bits & 0x807fffff) !== 0 || bits === 0) {
    throw new RangeError(`ue8m0Byte: scale must be a positive normal power of two, got ${scale}`);
  }
  return bits >>> 23;
}

/** The scale a UE8M0 byte stands for: 2^(byte - 127) (byte 0 gives 2^-127, 255 gives 2^128). */
export function ue8m0ToScale(byte: number): number {
  return Math.fround(2 ** ((byte & 0xff) - 127)); // as f32: byte 255 is Inf
}

/** Pack per-group power-of-two scales [rows, groups] into i32 words [rows, groups/4], little-endian bytes. */
export function packUe8m0(scales: HostTensor<"f32">): HostTensor<"i32"> {
  const [rows = 0, groups = 0] = scales.shape;
  if (scales.shape.length !== 2 || groups % UE8M0_GROUPS_PER_WORD !== 0) {
    throw new RangeError(`packUe8m0: scales must be [rows, groups] with groups a multiple of 4, got [${scales.shape.join(", ")}]`);
  }
  const words = groups / UE8M0_GROUPS_PER_WORD;
  const packed = new HostTensor("i32", [rows, words]);
  for (let r = 0; r < rows; r++) {
    for (let w = 0; w < words; w++) {
      let word = 0;
      for (let j = 0; j < UE8M0_GROUPS_PER_WORD; j++) {
        word |= ue8m0Byte(scales.data[r * groups + w * UE8M0_GROUPS_PER_WORD + j]!) << (8 * j);
      }
      packed.data[r * words + w] = word;
    }
  }
  return packed;
}

/** The f32 scales [rows, words*4] that packed UE8M0 words [rows, words] stand for. */
export function unpackUe8m0(packed: HostTensor<"i32">): HostTensor<"f32"> {
  const [rows = 0, words = 0] = packed.shape;
  const groups = words * UE8M0_GROUPS_PER_WORD;
  const scales = new HostTensor("f32", [rows, groups]);
  for (let i = 0; i < rows * words; i++) {
    for (let j = 0; j < UE8M0_GROUPS_PER_WORD; j++) {
      scales.data[i * UE8M0_GROUPS_PER_WORD + j] = ue8m0ToScale(packed.data[i]! >>> (8 * j));
    }
  }
  return scales;
}

function checkFp8Hidden(hidden: number, ue8m0: boolean, what: string): void {
  const multiple = ue8m0 ? FP8_GROUP_SIZE * UE8M0_GROUPS_PER_WORD : FP8_GROUP_SIZE;
  if (hidden % multiple !== 0) {
    throw new RangeError(`${what}: hidden must be a multiple of ${multiple}${ue8m0 ? " for UE8M0 scales" : " for FP8"}, got ${hidden}`);
  }
}

export interface Fp8Quantized {
  /** fp8_e4m3 [T, H]. */
  q: HostTensor<"fp8_e4m3">;
  /** f32 [T, H/128] dequantization scales, or (ue8m0) i32 [T, H/512] packed exponents. */
  scales: HostTensor<"f32"> | HostTensor<"i32">;
}

/** Quantize bf16 x [T, H] per 128-channel group of each row (see the formulas above). */
export function quantizeFp8(x: HostTensor<"bf16">, opts: Fp8QuantizeOptions): Fp8Quantized {
  if (x.dtype !== "bf16" || x.shape.length !== 2) {
    throw new TypeError(`quantizeFp8: x must be bf16 [T, H], got ${x.dtype} [${x.shape.join(", ")}]`);
  }
  const [numTokens = 0, hidden = 0] = x.shape;
  checkFp8Hidden(hidden, opts.ue8m0, "quantizeFp8");
  const roundScale = opts.roundScale || opts.ue8m0;
  const numGroups = hidden / FP8_GROUP_SIZE;
  const q = new HostTensor("fp8_e4m3", [numTokens, hidden]);
  const scales = new HostTensor("f32", [numTokens, numGroups]);
  for (let t = 0; t < numTokens; t++) {
    for (let g = 0; g < numGroups; g++) {
      const begin = t * hidden + g * FP8_GROUP_SIZE;
      const end = begin + FP8_GROUP_SIZE;
      scales.data[t * numGroups + g] = quantizeFp8Group(x.data.subarray(begin, end), q.data.subarray(begin, end), roundScale);
    }
  }
  return { q, scales: opts.ue8m0 ? packUe8m0(scales) : scales };
}

/** f32(f32(q) * scale) per element; scales f32 [T, H/128], or i32 [T, H/512] when ue8m0. */
export function dequantizeFp8(
  q: HostTensor<"fp8_e4m3">,
  scales: HostTensor<"f32"> | HostTensor<"i32">,
  opts: { ue8m0: boolean },
): HostTensor<"f32"> {
  const [numTokens = 0, hidden = 0] = q.shape;
  checkFp8Hidden(hidden, opts.ue8m0, "dequantizeFp8");
  const expectedDtype = opts.ue8m0 ? "i32" : "f32";
  if (scales.dtype !== expectedDtype) {
    throw new TypeError(`dequantizeFp8: scales must be ${expectedDtype} with ue8m0=${opts.ue8m0}, got ${scales.dtype}`);
  }
  const groupScales = opts.ue8m0 ? unpackUe8m0(scales as HostTensor<"i32">) : (scales as HostTensor<"f32">);
  const numGroups = hidden / FP8_GROUP_SIZE;
  if (groupScales.numel !== numTokens * numGroups) {
    throw new RangeError(`dequantizeFp8: scales shape [${scales.shape.join(", ")}] does not match q [${q.shape.join(", ")}]`);
  }
  const out = new HostTensor("f32", [numTokens, hidden]);
  for (let i = 0; i < out.numel; i++) {
    const scale = groupScales.data[Math.floor(i / FP8_GROUP_SIZE)]!; // groups tile rows exactly
    out.data[i] = Math.fround(e4m3ToF32(q.data[i]!) * scale);
  }
  return out;
}
