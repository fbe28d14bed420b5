// The host backend equals the reference bit for bit: normal dispatch (bf16, fp8, cached,
// numWorstTokens, expertAlignment, layout given or computed), combine (0/1/2 biases, weights),
// low-latency (bf16, fp8, roundScale, ue8m0, hook, zeroCopy, out, a dead rank, two micro-batches),
// with LocalGroup (ranks in one process) and with one process per rank through the launcher.
// The cases themselves: test/fixtures/host_cases.ts. Seeds are fresh each run and printed on failure.

import { describe, expect, test } from "bun:test";
import { join } from "node:path";
import { EpBuffer } from "../lib/buffer.ts";
import { LocalGroup } from "../lib/group.ts";
import { launch } from "../lib/launch.ts";
import { encodeTensors, decodeTensors } from "../lib/backend/host.ts";
import { HostTensor } from "../lib/tensor.ts";
import { makeRng, randomBf16 } from "../lib/reference.ts";
import { hostCaseBufferOptions, runHostCases } from "./fixtures/host_cases.ts";

const freshSeed = () => Math.floor(Math.random() * 1e9);

describe("host backend, LocalGroup (ranks in one process)", () => {
  for (const numRanks of [2, 3, 4]) {
    test(`${numRanks} ranks equal the reference`, async () => {
      const seed = freshSeed();
      const groups = LocalGroup.create(numRanks, { timeoutMs: 10_000 });
      const buffers = await Promise.all(groups.map((group) => EpBuffer.create({ group, backend: "host", ...hostCaseBufferOptions(numRanks) })));
      expect(buffers.map((b) => b.backendKind)).toEqual(new Array(numRanks).fill("host"));
      const results = await Promise.all(buffers.map((b) => runHostCases(b, seed)));
      const failures = results.flatMap((r) => r.failures);
      if (failures.length > 0) console.error(`seed ${seed}:\n${failures.slice(0, 20).join("\n")}`);
      expect(failures).toEqual([]);
      expect(results.every((r) => r.checks > 150)).toBe(true);
      await Promise.all(buffers.map((b) => b.close()));
      for (const g of groups) g.close();
    });
  }
});

describe("host backend, one process per rank (launcher, TcpGroup)", () => {
  for (const nproc of [2, 3, 4]) {
    test(`${nproc} processes equal the reference`, async () => {
      const seed = freshSeed();
      const lines: string[] = [];
      const result = await launch({
        script: join(import.meta.dir, "fixtures", "host_worker.ts"),
        args: [String(seed)],
        nproc,
        timeoutS: 50,
        onOutput: (rank, _stream, line) => lines.push(`[rank ${rank}] ${line}`),
        onMessage: (message) => lines.push(`[launcher] ${message}`),
      });
      if (result.exitCode !== 0) console.error(`seed ${seed}:\n${lines.join("\n")}`);
      expect(result.exitCode).toBe(0);
      for (let r = 0; r < nproc; r++) expect(lines.some((l) => l.includes(`rank ${r}:`) && l.includes(", 0 failures"))).toBe(true);
    });
  }
});

test("exchange encoding round-trips tensors of every dtype, nulls and empty shapes", () => {
  const rng = makeRng(5);
  const tensors = [
    randomBf16(rng, [3, 5]),
    null,
    new HostTensor("i64", [2, 2], BigInt64Array.from([1n, -1n, 7n, 0n])),
    new HostTensor("u8", [3], Uint8Array.from([1, 2, 3])),
    new HostTensor("f32", [0, 4]),
    new HostTensor("fp8_e4m3", [1, 3], Uint8Array.from([0x10, 0x7e, 0x80])),
    new HostTensor("i32", [2], Int32Array.from([-5, 9])),
  ];
  const bytes = encodeTensors(tensors);
  // An odd offset (as a socket may hand back) must decode too.
  const shifted = new Uint8Array(bytes.byteLength + 1);
  shifted.set(bytes, 1);
  for (const input of [bytes, shifted.subarray(1)]) {
    const back = decodeTensors(input, 0);
    expect(back.length).toBe(tensors.length);
    back.forEach((t, i) => {
      const want = tensors[i]!;
      if (want === null) return expect(t).toBeNull();
      expect(t!.dtype).toBe(want.dtype);
      expect([...t!.shape]).toEqual([...want.shape]);
      expect(Array.from(t!.data as ArrayLike<number | bigint>)).toEqual(Array.from(want.data as ArrayLike<number | bigint>));
    });
  }
  expect(() => decodeTensors(new Uint8Array(16), 3)).toThrow(/rank 3.*magic/);
});
