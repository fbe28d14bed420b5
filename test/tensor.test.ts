// Tensors on the CPU side: HostTensor behaviour and the argument checks of DeviceTensor and
// PinnedTensor that run before any native call (GPU behaviour: test/gpu/runtime.test.ts).
import { describe, expect, test } from "bun:test";
import { DTYPES, DTYPE_BYTES } from "../lib/dtype.ts";
import { DeviceTensor, HostTensor, PinnedTensor, checkDType, checkShape, numelOf } from "../lib/tensor.ts";

describe("HostTensor", () => {
  test("zeros has the right typed array for every dtype", () => {
    for (const dtype of DTYPES) {
      const t = HostTensor.zeros(dtype, [3, 5]);
      expect(t.numel).toBe(15);
      expect(t.byteLength).toBe(15 * DTYPE_BYTES[dtype]);
      expect(t.data.length).toBe(15);
      expect(t.data.byteLength).toBe(t.byteLength);
      expect(t.device).toBe("cpu");
      expect(t.contiguous).toBe(true);
    }
  });

  test("rows shares storage and has the sub-shape", () => {
    const t = new HostTensor("i32", [4, 3], Int32Array.from({ length: 12 }, (_, i) => i));
    const sub = t.rows(1, 3);
    expect(sub.shape).toEqual([2, 3]);
    expect([...sub.data]).toEqual([3, 4, 5, 6, 7, 8]);
    sub.data[0] = -1;
    expect(t.data[3]).toBe(-1);
  });

  test("reshape shares storage; clone does not", () => {
    const t = HostTensor.full("f32", [2, 2], 1.5);
    const r = t.reshape([4]);
    const c = t.clone();
    r.data[0] = 9;
    expect(t.data[0]).toBe(9);
    expect(c.data[0]).toBe(1.5);
  });

  test("wrong data length, bad shapes and dtypes are rejected naming the argument", () => {
    expect(() => new HostTensor("f32", [2, 2], new Float32Array(3))).toThrow("data: expected 4 elements");
    expect(() => checkShape([2, -1])).toThrow("shape: every dimension must be a non-negative integer, got [2, -1]");
    expect(() => checkShape([1.5])).toThrow(RangeError);
    expect(() => checkDType("f16")).toThrow('dtype: unknown dtype "f16"');
    expect(numelOf([])).toBe(1);
    expect(numelOf([3, 0])).toBe(0);
  });
});

// These throw before the library is needed, so they hold with or without a GPU.
describe("DeviceTensor and PinnedTensor argument checks", () => {
  test("fromPointer validates pointer, shape, dtype and device", () => {
    expect(() => DeviceTensor.fromPointer(-8, "f32", [2], 0)).toThrow("ptr: expected a device address");
    expect(() => DeviceTensor.fromPointer(1.5, "f32", [2], 0)).toThrow("ptr: expected a device address");
    expect(() => DeviceTensor.fromPointer(0, "f32", [2], 0)).toThrow("ptr: is 0 (NULL)");
    expect(() => DeviceTensor.fromPointer(4096, "f32", [2, -3], 0)).toThrow("shape:");
    expect(() => DeviceTensor.fromPointer(4096, "bf17" as "bf16", [2], 0)).toThrow("dtype:");
    expect(() => DeviceTensor.fromPointer(4096, "f32", [2], -1)).toThrow("device: expected a CUDA device ordinal");
  });

  test("fromPointer views: shape, rows and view arithmetic without touching memory", () => {
    const t = DeviceTensor.fromPointer(0x10000, "bf16", [6, 4], 0);
    expect(t.byteLength).toBe(48);
    expect(t.device).toBe(0);
    expect(t.freed).toBe(false);
    const rows = t.rows(2, 5);
    expect(rows.shape).toEqual([3, 4]);
    expect(rows.ptr).toBe(0x10000 + 2 * 4 * 2);
    expect(t.view([24]).ptr).toBe(0x10000);
    expect(() => t.view([5, 5])).toThrow("view: shape [5, 5] has 25 elements, the tensor [6, 4] has 24");
    expect(() => t.rows(4, 7)).toThrow("rows: expected 0 <= begin <= end <= 6, got begin 4, end 7");
    expect(() => t.rows(3, 2)).toThrow("rows:");
    // A non-owning tensor frees nothing (no native call happens).
    t.free();
    expect(t.freed).toBe(false);
  });

  test("empty and zeros reject bad shapes and dtypes before allocating", () => {
    expect(() => DeviceTensor.empty("f32", [-1], { device: 0 })).toThrow("shape:");
    expect(() => DeviceTensor.zeros("x" as "f32", [1], { device: 0 })).toThrow("dtype:");
    expect(() => DeviceTensor.empty("f32", [1], { device: -2 })).toThrow("device:");
    expect(() => PinnedTensor.zeros("f32", [2, -2])).toThrow("shape:");
    expect(() => PinnedTensor.zeros("q" as "f32", [2])).toThrow("dtype:");
  });
});
