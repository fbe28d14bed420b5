// Exact f32 <-> bf16 / e4m3 conversions (as CUDA's __float2bfloat16_rn and
// __nv_cvt_float_to_fp8(.., __NV_SATFINITE, __NV_E4M3)) and the FP8 quantization of the spec.
// Expected values come from definitions written here (by value: nearest neighbour, ties to even),
// not from the implementation's bit tricks.

import { describe, expect, test } from "bun:test";
import {
  bf16ArrayToF32,
  bf16ToF32,
  dequantizeFp8,
  e4m3ArrayToF32,
  e4m3ToF32,
  f32ArrayToBf16,
  f32ArrayToE4m3,
  f32Bits,
  f32FromBits,
  f32ToBf16,
  f32ToE4m3,
  fp8GroupScale,
  packUe8m0,
  quantizeFp8,
  quantizeFp8Group,
  unpackUe8m0,
} from "../lib/convert.ts";
import { HostTensor } from "../lib/tensor.ts";

const seed = Number(process.env.BUN_EP_TEST_SEED ?? Math.floor(Math.random() * 2 ** 31));

/** mulberry32, local to this file so the test does not lean on lib/reference.ts. */
function rng(s: number): () => number {
  let state = s >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let z = state;
    z = Math.imul(z ^ (z >>> 15), z | 1);
    z ^= z + Math.imul(z ^ (z >>> 7), z | 61);
    return ((z ^ (z >>> 14)) >>> 0) / 4294967296;
  };
}

function withSeed(fn: () => void): void {
  try {
    fn();
  } catch (e) {
    console.error(`convert.test: failed with seed ${seed} (rerun with BUN_EP_TEST_SEED=${seed})`);
    throw e;
  }
}

/** The value a bf16 pattern stands for, from its fields. */
function bf16Value(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 7) & 0xff;
  const mantissa = bits & 0x7f;
  if (exponent === 0xff) return mantissa === 0 ? sign * Infinity : NaN;
  if (exponent === 0) return sign * mantissa * 2 ** -133; // m/128 * 2^-126
  return sign * (1 + mantissa / 128) * 2 ** (exponent - 127);
}

/** The value an e4m3 pattern stands for, from its fields. */
function e4m3Value(bits: number): number {
  const sign = bits & 0x80 ? -1 : 1;
  const exponent = (bits >> 3) & 0xf;
  const mantissa = bits & 0x7;
  if (exponent === 15 && mantissa === 7) return NaN;
  if (exponent === 0) return sign * (mantissa / 8) * 2 ** -6;
  return sign * (1 + mantissa / 8) * 2 ** (exponent - 7);
}

/** Nearest of sorted finite candidates (value, bits), ties to the even bit pattern. */
function nearestEven(x: number, candidates: { value: number; bits: number }[]): number {
  let lo = 0;
  let hi = candidates.length - 1;
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1;
    if (candidates[mid]!.value <= x) lo = mid;
    else hi = mid;
  }
  const a = candidates[lo]!;
  const b = candidates[hi]!;
  const da = Math.abs(x - a.value);
  const db = Math.abs(b.value - x);
  if (da < db) return a.bits;
  if (db < da) return b.bits;
  return (a.bits & 1) === 0 ? a.bits : b.bits;
}

const E4M3_FINITE_POSITIVE = Array.from({ length: 0x7f }, (_, bits) => ({ value: e4m3Value(bits), bits })); // 0x00..0x7E

describe("bf16", () => {
  test("widening matches the field definition for all 65536 patterns", () => {
    for (let bits = 0; bits < 0x10000; bits++) {
      const expected = bf16Value(bits);
      const got = bf16ToF32(bits);
      if (Number.isNaN(expected)) expect(got).toBeNaN();
      else if (!Object.is(got, expected)) throw new Error(`bf16ToF32(0x${bits.toString(16)}) = ${got}, expected ${expected}`);
    }
  });

  test("every finite/infinite pattern round-trips exactly; every NaN gives 0x7FFF", () => {
    const all = Uint16Array.from({ length: 0x10000 }, (_, i) => i);
    const back = f32ArrayToBf16(bf16ArrayToF32(all));
    for (let bits = 0; bits < 0x10000; bits++) {
      const isNaN = (bits & 0x7fff) > 0x7f80;
      const expected = isNaN ? 0x7fff : bits;
      if (back[bits] !== expected) throw new Error(`round trip of 0x${bits.toString(16)} gave 0x${back[bits]!.toString(16)}`);
      if (f32ToBf16(bf16ToF32(bits)) !== expected) throw new Error(`scalar round trip of 0x${bits.toString(16)}`);
    }
  });

  test("array widening keeps NaN payloads bit for bit", () => {
    const f = bf16ArrayToF32(Uint16Array.of(0x7fc1, 0xffa5, 0x7f81));
    const words = new Uint32Array(f.buffer);
    expect([...words]).toEqual([0x7fc10000, 0xffa50000, 0x7f810000]);
  });

  test("midpoints between neighbours round to the even one; just off them, to the nearer", () => {
    // Every pair of adjacent finite bf16 values (both signs, subnormals included; the largest
    // finite one's upper neighbour is Inf): midpoint and the f32 neighbours of the midpoint.
    for (let bits = 0; bits < 0x10000; bits++) {
      if ((bits & 0x7fff) >= 0x7f80) continue; // Inf/NaN have no upper neighbour here
      const upper = bits + 1; // next magnitude, same sign (0x7F7F+1 = Inf)
      const lower = bf16ToF32(bits);
      const higher = bf16ToF32(upper);
      const midpoint = (lower + higher) / 2; // exact in f32: one more bit than bf16
      if (Math.fround(midpoint) !== midpoint) throw new Error(`midpoint not an f32 at 0x${bits.toString(16)}`);
      const even = (bits & 1) === 0 ? bits : upper;
      const midBits = f32Bits(midpoint);
      const towardLower = f32FromBits(midBits - 1); // magnitude one f32 ulp smaller
      const towardUpper = f32FromBits(midBits + 1);
      if (Number.isFinite(higher)) {
        expect(f32ToBf16(midpoint)).toBe(even);
        expect(f32ToBf16(towardLower)).toBe(bits);
        expect(f32ToBf16(towardUpper)).toBe(upper);
      } else {
        // Largest finite bf16 (0x7F7F, odd) and Inf: CUDA rounds on the bits as if Inf were the
        // next value, so max + half an ulp (0x7F7F8000, an f32) ties up to Inf; just below stays.
        const maxPlusHalf = f32FromBits(((bits << 16) | 0x8000) >>> 0);
        expect(f32ToBf16(maxPlusHalf)).toBe(upper);
        expect(f32ToBf16(f32FromBits(((bits << 16) | 0x7fff) >>> 0))).toBe(bits);
      }
    }
  });

  test("random f32 values round to the nearest bf16, ties to even", () =>
    withSeed(() => {
      const next = rng(seed);
      for (let i = 0; i < 200_000; i++) {
        const bits = Math.floor(next() * 2 ** 32) >>> 0;
        const x = f32FromBits(bits);
        if (!Number.isFinite(x)) continue;
        const truncated = bits >>> 16;
        if ((truncated & 0x7fff) === 0x7f7f && (bits & 0xffff) >= 0x8000) continue; // overflow: covered above
        const lo = { value: bf16ToF32(truncated), bits: truncated };
        const hi = { value: bf16ToF32(truncated + 1), bits: truncated + 1 };
        const candidates = x < 0 ? [hi, lo] : [lo, hi]; // ascending by value
        const expected = nearestEven(x, candidates);
        if (f32ToBf16(x) !== expected) throw new Error(`f32ToBf16(${x}) = 0x${f32ToBf16(x).toString(16)}, expected 0x${expected.toString(16)}`);
      }
    }));

  test("special values: NaN of any sign/payload -> 0x7FFF, ±Inf kept, overflow -> Inf, ±0 and subnormals kept", () => {
    expect(f32ToBf16(NaN)).toBe(0x7fff);
    expect(f32ToBf16(f32FromBits(0xffc00000))).toBe(0x7fff);
    expect(f32ToBf16(f32FromBits(0x7f800001))).toBe(0x7fff);
    expect(f32ToBf16(Infinity)).toBe(0x7f80);
    expect(f32ToBf16(-Infinity)).toBe(0xff80);
    expect(f32ToBf16(f32FromBits(0x7f7fffff))).toBe(0x7f80); // f32 max
    expect(f32ToBf16(-f32FromBits(0x7f7fffff))).toBe(0xff80);
    expect(f32ToBf16(0)).toBe(0);
    expect(f32ToBf16(-0)).toBe(0x8000);
    expect(f32ToBf16(f32FromBits(0x00010000))).toBe(0x0001); // smallest bf16 subnormal
    expect(f32ToBf16(f32FromBits(0x00008000))).toBe(0x0000); // half of it: tie to even (0)
    expect(f32ToBf16(f32FromBits(0x00018000))).toBe(0x0002); // 1.5 of it: tie to even (2)
    expect(f32ToBf16(f32FromBits(0x00008001))).toBe(0x0001);
    expect(f32ToBf16(1e-45)).toBe(0); // f32's smallest subnormal
    expect(f32ToBf16(1.00390625)).toBe(0x3f80); // 1 + 2^-8: tie, 1.0 is even
    expect(f32ToBf16(1.01171875)).toBe(0x3f82); // 1 + 3*2^-8: tie, rounds up to even
  });
});

describe("e4m3", () => {
  test("widening matches the field definition for all 256 patterns", () => {
    const all = Uint8Array.from({ length: 256 }, (_, i) => i);
    const widened = e4m3ArrayToF32(all);
    for (let bits = 0; bits < 256; bits++) {
      const expected = e4m3Value(bits);
      if (Number.isNaN(expected)) {
        expect(e4m3ToF32(bits)).toBeNaN();
        expect(widened[bits]).toBeNaN();
      } else {
        expect(Object.is(e4m3ToF32(bits), expected)).toBe(true);
        expect(Object.is(widened[bits], expected)).toBe(true);
      }
    }
    expect(e4m3ToF32(0x7e)).toBe(448);
    expect(e4m3ToF32(0xfe)).toBe(-448);
    expect(e4m3ToF32(0x38)).toBe(1);
    expect(e4m3ToF32(0x08)).toBe(2 ** -6);
    expect(e4m3ToF32(0x01)).toBe(2 ** -9);
  });

  test("every pattern round-trips exactly; NaN (0x7F, 0xFF) gives 0x7F", () => {
    const back = f32ArrayToE4m3(e4m3ArrayToF32(Uint8Array.from({ length: 256 }, (_, i) => i)));
    for (let bits = 0; bits < 256; bits++) expect(back[bits]).toBe((bits & 0x7f) === 0x7f ? 0x7f : bits);
  });

  test("midpoints between neighbours round to the even pattern; just off them, to the nearer", () => {
    for (const sign of [1, -1]) {
      for (let bits = 0; bits < 0x7e; bits++) {
        const lower = sign * e4m3Value(bits);
        const higher = sign * e4m3Value(bits + 1);
        const midpoint = (lower + higher) / 2;
        const signBit = sign < 0 ? 0x80 : 0;
        const even = (bits & 1) === 0 ? bits : bits + 1;
        expect(f32ToE4m3(midpoint)).toBe(signBit | even);
        const midBits = f32Bits(midpoint);
        expect(f32ToE4m3(f32FromBits(midBits - 1))).toBe(signBit | bits); // magnitude just below
        expect(f32ToE4m3(f32FromBits(midBits + 1))).toBe(signBit | (bits + 1));
      }
    }
  });

  test("saturation to ±448: (448, 464] ties/rounds to 448, above 464 and ±Inf saturate", () => {
    expect(f32ToE4m3(448)).toBe(0x7e);
    expect(f32ToE4m3(460)).toBe(0x7e);
    expect(f32ToE4m3(464)).toBe(0x7e); // tie between 448 (even) and 480 (not finite)
    expect(f32ToE4m3(f32FromBits(f32Bits(464) + 1))).toBe(0x7e);
    expect(f32ToE4m3(1e30)).toBe(0x7e);
    expect(f32ToE4m3(f32FromBits(0x7f7fffff))).toBe(0x7e);
    expect(f32ToE4m3(Infinity)).toBe(0x7e);
    expect(f32ToE4m3(-500)).toBe(0xfe);
    expect(f32ToE4m3(-Infinity)).toBe(0xfe);
  });

  test("NaN of any sign -> 0x7F; ±0 and underflow keep the sign", () => {
    expect(f32ToE4m3(NaN)).toBe(0x7f);
    expect(f32ToE4m3(f32FromBits(0xffc00000))).toBe(0x7f);
    expect(f32ToE4m3(0)).toBe(0x00);
    expect(f32ToE4m3(-0)).toBe(0x80);
    expect(f32ToE4m3(2 ** -10)).toBe(0x00); // half the smallest subnormal: tie to even (0)
    expect(f32ToE4m3(-(2 ** -10))).toBe(0x80);
    expect(f32ToE4m3(f32FromBits(f32Bits(2 ** -10) + 1))).toBe(0x01);
    expect(f32ToE4m3(1e-30)).toBe(0x00);
    expect(f32ToE4m3(-1e-30)).toBe(0x80);
    expect(f32ToE4m3(1e-45)).toBe(0x00); // f32 subnormal input
  });

  test("subnormals: multiples of 2^-9, ties to even, rounding up into the smallest normal", () => {
    const unit = 2 ** -9;
    expect(f32ToE4m3(1.5 * unit)).toBe(0x02);
    expect(f32ToE4m3(2.5 * unit)).toBe(0x02);
    expect(f32ToE4m3(3.5 * unit)).toBe(0x04);
    expect(f32ToE4m3(6.5 * unit)).toBe(0x06);
    expect(f32ToE4m3(7.5 * unit)).toBe(0x08); // tie between 7 (odd) and 8 = 2^-6 (0x08)
    expect(f32ToE4m3(7.4 * unit)).toBe(0x07);
    expect(f32ToE4m3(-5 * unit)).toBe(0x85);
  });

  test("random f32 values round to the nearest e4m3, ties to even, saturating", () =>
    withSeed(() => {
      const next = rng(seed ^ 0x5bd1e995);
      const candidates = [...E4M3_FINITE_POSITIVE].sort((a, b) => a.value - b.value);
      for (let i = 0; i < 200_000; i++) {
        // Magnitudes spread over the whole e4m3 range and beyond, both signs.
        const x = Math.fround((next() < 0.5 ? -1 : 1) * 2 ** (next() * 22 - 12) * (1 + next()));
        const magnitude = Math.abs(x);
        const expectedMagnitudeBits = magnitude >= 448 ? 0x7e : nearestEven(magnitude, candidates);
        const expected = (x < 0 ? 0x80 : 0) | expectedMagnitudeBits;
        if (f32ToE4m3(x) !== expected) throw new Error(`f32ToE4m3(${x}) = 0x${f32ToE4m3(x).toString(16)}, expected 0x${expected.toString(16)}`);
      }
    }));
});

describe("FP8 quantization", () => {
  /** bf16 [T, H] whose groups have very different magnitudes, some all zero, some tiny. */
  function groupedInput(next: () => number, numTokens: number, hidden: number): HostTensor<"bf16"> {
    const x = new HostTensor("bf16", [numTokens, hidden]);
    for (let t = 0; t < numTokens; t++) {
      for (let g = 0; g < hidden / 128; g++) {
        const kind = next();
        const magnitude = kind < 0.1 ? 0 : kind < 0.2 ? 1e-6 : 2 ** Math.floor(next() * 40 - 20);
        for (let i = 0; i < 128; i++) {
          const normal = Math.sqrt(-2 * Math.log(1 - next())) * Math.cos(2 * Math.PI * next());
          x.data[t * hidden + g * 128 + i] = f32ToBf16(normal * magnitude);
        }
      }
    }
    return x;
  }

  function groupAmax(x: HostTensor<"bf16">, t: number, g: number): number {
    const hidden = x.shape[1]!;
    let amax = 0;
    for (let i = 0; i < 128; i++) amax = Math.max(amax, Math.abs(bf16Value(x.data[t * hidden + g * 128 + i]!)));
    return amax;
  }

  const isPowerOfTwo = (s: number) => s > 0 && Number.isInteger(Math.log2(s)) && 2 ** Math.log2(s) === s;

  for (const roundScale of [false, true]) {
    test(`scales, values and error bound (roundScale ${roundScale})`, () =>
      withSeed(() => {
        const next = rng(seed + (roundScale ? 1 : 0));
        const [numTokens, hidden] = [6, 1024];
        const x = groupedInput(next, numTokens, hidden);
        const { q, scales } = quantizeFp8(x, { roundScale, ue8m0: false });
        expect(q.dtype).toBe("fp8_e4m3");
        expect(scales.dtype).toBe("f32");
        expect(scales.shape).toEqual([numTokens, hidden / 128]);
        const deq = dequantizeFp8(q, scales, { ue8m0: false });
        for (let t = 0; t < numTokens; t++) {
          for (let g = 0; g < hidden / 128; g++) {
            const amax = Math.max(groupAmax(x, t, g), Math.fround(1e-4));
            const plainScale = Math.fround(amax / 448);
            const scale = scales.data[t * (hidden / 128) + g]!;
            if (roundScale) {
              // The power of two s with plainScale <= s < 2 * plainScale.
              expect(isPowerOfTwo(scale)).toBe(true);
              expect(scale >= plainScale && scale < 2 * plainScale).toBe(true);
            } else {
              expect(scale).toBe(plainScale);
            }
            const multiplier = roundScale ? 1 / scale : Math.fround(448 / amax);
            for (let i = 0; i < 128; i++) {
              const n = t * hidden + g * 128 + i;
              const value = bf16Value(x.data[n]!);
              // q is e4m3 of the f32 product (roundScale: the division by a power of two is exact).
              expect(q.data[n]).toBe(f32ToE4m3(Math.fround(value * multiplier)));
              // Error bound. y = f32(x * m) has |y| <= 448 (1 + 2^-22). e4m3 rounding moves y by at
              // most half an ulp: |y| * 2^-4 in the normal range, 2^-10 among subnormals, and at
              // most 16 (half the ulp of [256, 448]) anywhere. Dequantizing multiplies by
              // scale ~ 1/m (relative mismatch <= 2^-22 for the plain scale, 0 for a power of two)
              // and rounds once more (2^-24 relative). So, per element and per group:
              //   |x - deq| <= |x| (2^-4 + 2^-20) + scale * 2^-10 (1 + 2^-20)
              //   |x - deq| <= scale * 16 (1 + 2^-16)
              const error = Math.abs(value - deq.data[n]!);
              const elementBound = Math.abs(value) * (2 ** -4 + 2 ** -20) + scale * 2 ** -10 * (1 + 2 ** -20);
              const groupBound = scale * 16 * (1 + 2 ** -16);
              if (!(error <= elementBound && error <= groupBound)) {
                throw new Error(`x[${t}, ${g * 128 + i}] = ${value}: |x - deq| = ${error} exceeds ${Math.min(elementBound, groupBound)} (scale ${scale})`);
              }
              if (roundScale) {
                // Power-of-two scales make dequantization exact: deq is x rounded on the scaled grid.
                expect(deq.data[n]).toBe(e4m3Value(f32ToE4m3(value / scale)) * scale);
              }
            }
          }
        }
      }));
  }

  test("UE8M0: packed bytes decode to the power-of-two scales, q unchanged", () =>
    withSeed(() => {
      const next = rng(seed + 7);
      const [numTokens, hidden] = [5, 2048];
      const x = groupedInput(next, numTokens, hidden);
      const rounded = quantizeFp8(x, { roundScale: true, ue8m0: false });
      const packed = quantizeFp8(x, { roundScale: false, ue8m0: true }); // ue8m0 implies roundScale
      expect(packed.scales.dtype).toBe("i32");
      expect(packed.scales.shape).toEqual([numTokens, hidden / 512]);
      expect([...packed.q.data]).toEqual([...rounded.q.data]);
      const words = packed.scales.data as Int32Array;
      for (let t = 0; t < numTokens; t++) {
        for (let g = 0; g < hidden / 128; g++) {
          const byte = (words[t * (hidden / 512) + (g >> 2)]! >>> (8 * (g & 3))) & 0xff;
          expect(2 ** (byte - 127)).toBe(rounded.scales.data[t * (hidden / 128) + g]!);
        }
      }
      expect([...unpackUe8m0(packed.scales as HostTensor<"i32">).data]).toEqual([...rounded.scales.data]);
      expect([...packUe8m0(rounded.scales as HostTensor<"f32">).data]).toEqual([...words]);
      const deqPacked = dequantizeFp8(packed.q, packed.scales, { ue8m0: true });
      const deqRounded = dequantizeFp8(rounded.q, rounded.scales, { ue8m0: false });
      expect([...deqPacked.data]).toEqual([...deqRounded.data]);
    }));

  test("all-zero group: amax floors at 1e-4, q is zero", () => {
    const x = new HostTensor("bf16", [1, 512]);
    const plain = quantizeFp8(x, { roundScale: false, ue8m0: false });
    expect([...plain.scales.data]).toEqual(new Array(4).fill(Math.fround(Math.fround(1e-4) / 448)));
    expect(plain.q.data.every((b) => b === 0)).toBe(true);
    const rounded = quantizeFp8(x, { roundScale: true, ue8m0: false });
    expect([...rounded.scales.data]).toEqual(new Array(4).fill(2 ** -22)); // 2^-23 < 1e-4/448 <= 2^-22
    const packed = quantizeFp8(x, { roundScale: true, ue8m0: true });
    expect(packed.scales.data[0]).toBe((105 | (105 << 8) | (105 << 16) | (105 << 24)) | 0); // 127 - 22
    expect(fp8GroupScale(0, false)).toBe(Math.fround(Math.fround(1e-4) / 448));
  });

  test("amax 448 with power-of-two scales gives scale 1 and exact values", () => {
    const x = new Uint16Array(128);
    x[0] = f32ToBf16(448);
    x[1] = f32ToBf16(-3.25);
    const q = new Uint8Array(128);
    expect(quantizeFp8Group(x, q, true)).toBe(1);
    expect(q[0]).toBe(0x7e);
    expect(e4m3ToF32(q[1]!)).toBe(-3.25);
  });

  test("NaN and Inf elements: NaN is skipped by amax and gives 0x7F; Inf makes the scale Inf", () => {
    const x = new Uint16Array(128);
    x[0] = f32ToBf16(2);
    x[1] = 0x7fc0; // NaN
    x[2] = f32ToBf16(-1);
    const q = new Uint8Array(128);
    expect(quantizeFp8Group(x, q, false)).toBe(Math.fround(2 / 448));
    expect(q[0]).toBe(0x7e);
    expect(q[1]).toBe(0x7f);
    expect(e4m3ToF32(q[2]!)).toBe(-224);
    x[1] = 0x7f80; // +Inf
    expect(quantizeFp8Group(x, q, true)).toBe(Infinity);
    expect([q[0], q[1], q[2]]).toEqual([0x00, 0x7f, 0x80]);
  });

  test("bad shapes are rejected with the argument named", () => {
    expect(() => quantizeFp8(new HostTensor("bf16", [2, 192]), { roundScale: false, ue8m0: false })).toThrow(/hidden must be a multiple of 128/);
    expect(() => quantizeFp8(new HostTensor("bf16", [2, 256]), { roundScale: true, ue8m0: true })).toThrow(/multiple of 512/);
    const { q, scales } = quantizeFp8(new HostTensor("bf16", [2, 512]), { roundScale: true, ue8m0: false });
    expect(() => dequantizeFp8(q, scales, { ue8m0: true })).toThrow(/scales must be i32/);
  });
});
