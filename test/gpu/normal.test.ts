// Normal (high-throughput) kernels on the GPU against lib/reference.ts: several ranks on one GPU in
// one process (LocalGroup) and as processes (CUDA IPC; MPS on). Fresh seeds each run, printed on
// failure; outputs come from poisoned pool memory so an unwritten element fails.
//
// Run parts alone: BUN_EP_NORMAL_TESTS=<comma list of tags> (tags: r2, r3, r4, r8, arena,
// iterations, timeout, process2, process4; "process" = both process counts), or `bun test -t <name>`.
// Each test prints where its host time went (inputs, device calls, reference, copies + compare).
import { describe, expect, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { resolve } from "node:path";
import { EpBuffer } from "../../lib/buffer.ts";
import { LocalGroup } from "../../lib/group.ts";
import { makeRng, randomRouting, referenceCombineRank, referenceDispatchRank } from "../../lib/reference.ts";
import { deviceProps } from "../../lib/stream.ts";
import { DeviceTensor, HostTensor } from "../../lib/tensor.ts";
import { describeGpu } from "./gpu_env.ts";
import { describeCase, fastCombineRank, fastRandomBf16, resetCaseTimes, runNormalCase, type NormalCase } from "./fixtures/normal_case.ts";

const DEVICE = Number(process.env.BUN_EP_DEVICE ?? 0);
// GPUs to spread ranks over (issue 8): rank r of one process runs on device r % NUM_GPUS; processes
// get ceil(nproc / NUM_GPUS) ranks per GPU from the launcher. 1 (default): every rank on DEVICE.
const NUM_GPUS = Math.max(1, Number(process.env.BUN_EP_NUM_GPUS ?? 1));
const deviceOf = (rank: number): number => (NUM_GPUS > 1 ? rank % NUM_GPUS : DEVICE);
const usedDevices = (numRanks: number): number[] => [...new Set(Array.from({ length: numRanks }, (_, r) => deviceOf(r)))];
const freeMemory = (devices: number[]): number => devices.reduce((sum, d) => sum + deviceProps(d).freeMemoryBytes, 0);
const seedBase = Number(process.env.BUN_EP_SEED ?? (Date.now() % 1_000_000));

// BUN_EP_NORMAL_TESTS selects tests by tag; unset or empty runs them all.
const selectedTags = (process.env.BUN_EP_NORMAL_TESTS ?? "").split(",").map((t) => t.trim()).filter((t) => t !== "");
const selected = (tag: string): boolean => selectedTags.length === 0 || selectedTags.includes(tag) || selectedTags.some((t) => tag.startsWith(t));
/** `test` when its tag is selected, else `test.skip` (named so the skip shows why). */
const testTagged = (tag: string) => (selected(tag) ? test : test.skip);

// Device waits give up after 10 s: a hang fails fast instead of eating the run's time limit.
async function makeBuffers(numRanks: number, numNvlBytes = 256 << 20, timeoutMs = 10_000): Promise<EpBuffer[]> {
  const groups = LocalGroup.create(numRanks, { timeoutMs: 60_000 });
  return Promise.all(groups.map((group) => EpBuffer.create({ group, backend: "cuda", device: deviceOf(group.rank), numNvlBytes, timeoutMs })));
}

async function closeAll(buffers: EpBuffer[]): Promise<void> {
  await Promise.all(buffers.map((b) => b.close()));
}

function base(numRanks: number): NormalCase {
  return {
    numRanks, tokens: Array.from({ length: numRanks }, (_, r) => 200 + 31 * r), hidden: 2048, topk: 8, numExperts: 8 * numRanks,
    fp8: false, weights: true, biases: 0, expertAlignment: 1, worst: false, cached: false, maskProbability: 0, numSMs: numRanks >= 8 ? 4 : 8,
  };
}

async function check(buffers: EpBuffer[], cases: NormalCase[], seed: number): Promise<void> {
  const problems: string[] = [];
  for (const [i, c] of cases.entries()) {
    const failures = await runNormalCase(buffers, c, seed + i);
    if (failures.length > 0) problems.push(`${describeCase(c)} (seed ${seed + i}):\n  ${failures.slice(0, 6).join("\n  ")}`);
  }
  console.log(`  [times] ${resetCaseTimes()}`);
  if (problems.length > 0) console.error(problems.join("\n"));
  expect(problems).toEqual([]);
}

// The GPU tests compare combine against fastCombineRank (typed arrays); it must equal the spec's.
describe("normal test fixture", () => {
  test("fastCombineRank equals lib/reference.ts referenceCombineRank bit for bit", () => {
    const rng = makeRng(seedBase);
    for (const [numRanks, hidden, topk, numBiases] of [[2, 256, 8, 0], [3, 384, 6, 1], [4, 128, 1, 2], [8, 256, 8, 2]] as const) {
      const tokens = Array.from({ length: numRanks }, (_, r) => (r === 1 ? 0 : 20 + 7 * r));
      const numExperts = 4 * numRanks;
      const dispatch = tokens.map((t) => ({
        x: fastRandomBf16(rng, [t, hidden]), xScales: null, topkIdx: randomRouting(rng, t, numExperts, topk, { maskProbability: 0.2 }),
        topkWeights: (() => { const w = new HostTensor("f32", [t, topk]); for (let i = 0; i < w.numel; i++) w.data[i] = rng.normal(); return w; })(),
      }));
      const refs = tokens.map((_, r) => referenceDispatchRank(r, dispatch, numExperts));
      const inputs = refs.map((ref) => ({ x: fastRandomBf16(rng, [ref.recvSrcRank.length, hidden]), topkWeights: ref.recvTopkWeights, recvSrcRank: ref.recvSrcRank, recvSrcToken: ref.recvSrcToken }));
      for (let home = 0; home < numRanks; home++) {
        const biases = Array.from({ length: numBiases }, () => fastRandomBf16(rng, [tokens[home]!, hidden]));
        const want = referenceCombineRank(home, tokens[home]!, inputs, biases);
        const got = fastCombineRank(home, tokens[home]!, inputs, biases);
        expect(Buffer.from(got.combinedX.data.buffer).equals(Buffer.from(want.combinedX.data.buffer))).toBe(true);
        expect(Buffer.from(got.combinedTopkWeights!.data.buffer).equals(Buffer.from(want.combinedTopkWeights!.data.buffer))).toBe(true);
      }
    }
  });
});

describeGpu(`normal kernels, ranks of one process on ${NUM_GPUS === 1 ? "one GPU" : `${NUM_GPUS} GPUs`}`, () => {
  testTagged("r2")("2 ranks: bf16/fp8, weights, biases, alignment, cached, worst, hidden 2048/4096/7168, topk 1/6/8", async () => {
    const buffers = await makeBuffers(2, 512 << 20);
    try {
      const b = base(2);
      await check(buffers, [
        b,
        { ...b, fp8: true, cached: true },
        { ...b, hidden: 4096, topk: 6, biases: 1, expertAlignment: 8, cached: true },
        { ...b, hidden: 7168, topk: 1, biases: 2, maskProbability: 0.3 },
        { ...b, hidden: 7168, fp8: true, worst: true, cached: true, weights: false },
        { ...b, tokens: [0, 300], biases: 1 },
        { ...b, skewToExpert: 3, topk: 6 },
        { ...b, maskProbability: 1 },
        { ...b, numSMs: 24, tokens: [1000, 700], cached: true },
        { ...b, combineInput: "recv", cached: true },
        { ...b, hidden: 4096, topk: 6, combineInput: "alloc", worst: true, biases: 2 },
        { ...b, hidden: 7168, combineInput: "mixed", biases: 1, maskProbability: 0.2 },
        { ...b, combineInput: "recv", worst: true, weights: false },
      ], seedBase);
    } finally {
      await closeAll(buffers);
    }
  }, 240_000);

  for (const numRanks of [3, 4, 8]) {
    testTagged(`r${numRanks}`)(`${numRanks} ranks: bf16/fp8, biases, cached, worst, empty rank, skew`, async () => {
      const buffers = await makeBuffers(numRanks);
      try {
        const b = base(numRanks);
        await check(buffers, [
          { ...b, cached: true, biases: 1 },
          { ...b, fp8: true, hidden: 4096, topk: 6, worst: true },
          { ...b, tokens: b.tokens.map((t, r) => (r === numRanks - 1 ? 0 : t)), skewToExpert: 0, maskProbability: 0.2, biases: 2 },
          { ...b, combineInput: "recv", cached: true },
          { ...b, combineInput: "mixed", worst: true, biases: 1 },
        ], seedBase + numRanks * 100);
      } finally {
        await closeAll(buffers);
      }
    }, 240_000);
  }

  testTagged("arena")("a full arena: dispatch falls back to the staged copy, combine to push; exact either way", async () => {
    const buffers = await makeBuffers(2, 64 << 20);
    try {
      // Hold (almost) the whole arena (half of the 64 MiB after the control region).
      const hogs = buffers.map((b) => b.allocCombineInput(Math.floor((63 << 19) / 2048), 1024).x as DeviceTensor);
      const b: NormalCase = { ...base(2), hidden: 1024, combineInput: "alloc" };
      // [0, 300]: a rank with no tokens (NULL topkIdx) still receives indices and weights (batch 2's bug).
      await check(buffers, [b, { ...b, fp8: true, cached: true }, { ...b, combineInput: "recv" }, { ...b, tokens: [0, 300], combineInput: "upload" }], seedBase + 11);
      for (const h of hogs) h.free();
      await check(buffers, [b, { ...b, combineInput: "recv" }], seedBase + 12);
    } finally {
      await closeAll(buffers);
    }
  }, 120_000);

  testTagged("iterations")("1,000 iterations of random routing with the same buffers: exact each time, no device memory growth", async () => {
    const buffers = await makeBuffers(2);
    try {
      const b: NormalCase = { ...base(2), hidden: 1024, tokens: [64, 48], topk: 4, numExperts: 16, numSMs: 4, biases: 1 };
      // One warm-up so the allocator pool reaches its steady state before measuring.
      await check(buffers, [b], seedBase + 7);
      const freeBefore = freeMemory(usedDevices(2));
      const rng = makeRng(seedBase + 8);
      const problems: string[] = [];
      const sources = ["upload", "recv", "alloc", "mixed"] as const;
      for (let i = 0; i < 1000 && problems.length === 0; i++) {
        const c: NormalCase = { ...b, tokens: [rng.int(96), rng.int(96)], maskProbability: rng.next() * 0.3, cached: i % 3 === 0, worst: i % 5 === 0, combineInput: sources[i % 4]! };
        const failures = await runNormalCase(buffers, c, seedBase + 1000 + i);
        if (failures.length > 0) problems.push(`iteration ${i} ${describeCase(c)} (seed ${seedBase + 1000 + i}): ${failures.slice(0, 4).join("; ")}`);
      }
      const freeAfter = freeMemory(usedDevices(2));
      expect(problems).toEqual([]);
      // The stream-ordered pool may keep a little; a leak per iteration would show as many MiB.
      expect(freeBefore - freeAfter).toBeLessThan(64 << 20);
    } finally {
      await closeAll(buffers);
    }
  }, 600_000);

  testTagged("timeout")("a rank that never dispatches: the others fail naming it, and the buffer is unusable after", async () => {
    const buffers = await makeBuffers(3, 64 << 20, 1500);
    try {
      const rng = makeRng(seedBase + 9);
      const calls = buffers.slice(0, 2).map((b) => {
        const topkIdx = b.fromHost(randomRouting(rng, 32, 24, 4));
        const x = b.fromHost(new HostTensor("bf16", [32, 256]));
        return b.dispatch({ x, topkIdx, numExperts: 24, config: { ...b.getDispatchConfig(), numSMs: 2 } });
      });
      const outcomes = await Promise.allSettled(calls);
      for (const o of outcomes) {
        expect(o.status).toBe("rejected");
        expect(String((o as PromiseRejectedResult).reason)).toContain("rank 2");
      }
      await expect(buffers[0]!.dispatch({ x: buffers[0]!.fromHost(new HostTensor("bf16", [1, 256])), topkIdx: buffers[0]!.fromHost(randomRouting(rng, 1, 24, 4)), numExperts: 24 })).rejects.toThrow(/unusable/);
    } finally {
      // The buffers of a timed-out group cannot meet again; close without the collective barrier.
      await Promise.race([closeAll(buffers), Bun.sleep(3000)]);
    }
  }, 60_000);
});

describeGpu(`normal kernels, ranks as processes on ${NUM_GPUS === 1 ? "one GPU" : `${NUM_GPUS} GPUs`} (CUDA IPC; MPS on)`, () => {
  for (const nproc of [2, 4]) {
    testTagged(`process${nproc}`)(`${nproc} processes`, () => {
      const root = resolve(import.meta.dir, "..", "..");
      const run = spawnSync(
        "bun",
        [resolve(root, "bin/bun-ep.ts"), "run", "--nproc", String(nproc), "--ranks-per-gpu", String(Math.ceil(nproc / NUM_GPUS)), resolve(import.meta.dir, "fixtures/normal_rank.ts"), String(seedBase)],
        { cwd: root, encoding: "utf8", timeout: 120_000 },
      );
      if (run.status !== 0) console.error(`seed ${seedBase}\n`, run.stdout, run.stderr);
      expect(run.status).toBe(0);
      for (let r = 0; r < nproc; r++) expect(run.stdout).toContain(`[rank ${r}] normal_rank ok`);
    }, 130_000);
  }
});
