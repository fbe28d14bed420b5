// The native argument structs (lib/backend/cuda_common.ts): int64 fields written from numbers as two
// 32-bit halves must read back as the same int64 on the C side (here: the BigInt64Array view).
import { describe, expect, test } from "bun:test";
import { Int64Fields, StructWriter } from "../lib/backend/cuda_common.ts";

describe("Int64Fields", () => {
  test("pointers, sizes, zero, -1 and the safe-integer limits read back exactly", () => {
    const values = [0, 1, -1, 128, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 32 + 5, 0x7f12_3456_7000, -(2 ** 40) - 3, Number.MAX_SAFE_INTEGER, Number.MIN_SAFE_INTEGER];
    const fields = new Int64Fields(values.length);
    values.forEach((v, i) => fields.set(i, v));
    expect([...fields.data]).toEqual(values.map((v) => BigInt(v)));
  });

  test("fresh random values overwrite earlier ones in place", () => {
    const fields = new Int64Fields(16);
    for (let round = 0; round < 50; round++) {
      const values = Array.from({ length: 16 }, () => Math.floor((Math.random() - 0.5) * 2 ** 53));
      values.forEach((v, i) => fields.set(i, v));
      expect([...fields.data]).toEqual(values.map((v) => BigInt(v)));
    }
  });

  test("a value that is not a safe integer, or a field out of range, is refused", () => {
    const fields = new Int64Fields(2);
    expect(() => fields.set(0, 1.5)).toThrow(/field 0 is 1.5, not a safe integer/);
    expect(() => fields.set(0, 2 ** 53)).toThrow(/not a safe integer/);
    expect(() => fields.set(1, Number.NaN)).toThrow(/not a safe integer/);
    expect(() => fields.set(2, 1)).toThrow(/field 2 of 2/);
    expect([...fields.data]).toEqual([0n, 0n]);
  });
});

describe("StructWriter", () => {
  test("numbers and bigints in order; done() insists on every field", () => {
    const w = new StructWriter(3);
    w.put(0x7f00_0000_1000).put(-1n);
    expect(() => w.done()).toThrow(/2 of 3 fields/);
    w.put(7);
    expect([...w.done()]).toEqual([0x7f00_0000_1000n, -1n, 7n]);
    expect(() => w.put(1)).toThrow(/overflow \(3 fields\)/);
  });
});
