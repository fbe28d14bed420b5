// Internode normal kernels on one GPU: ranks as processes (one NVSHMEM PE each, MPS on) split into
// virtual nodes by BUN_EP_RANKS_PER_NODE, so ranks of different nodes talk only through NVSHMEM puts
// and signals (the P2P transport stands in for RDMA). Each rank checks its outputs against
// lib/reference.ts (fixtures/internode_rank.ts). Skipped, with the reason, where the library has no
// NVSHMEM or there is no GPU.
import { describe, expect, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { resolve } from "node:path";
import { internodeAvailability } from "../../lib/backend/cuda_internode.ts";
import { describeGpu, gpuSkipReason } from "./gpu_env.ts";

const seedBase = Number(process.env.BUN_EP_TEST_SEED ?? Date.now() % 100_000);
const iterations = Number(process.env.BUN_EP_INTERNODE_ITERATIONS ?? 200);
const root = resolve(import.meta.dir, "..", "..");
const fixture = resolve(import.meta.dir, "fixtures/internode_rank.ts");

function runRanks(nodes: number, ranksPerNode: number, mode: string[], seed: number, timeoutS: number): void {
  const nproc = nodes * ranksPerNode;
  const run = spawnSync(
    "bun",
    [resolve(root, "bin/bun-ep.ts"), "run", "--nproc", String(nproc), "--ranks-per-gpu", String(nproc), fixture, String(seed), ...mode],
    {
      cwd: root,
      encoding: "utf8",
      timeout: timeoutS * 1000,
      env: {
        ...process.env,
        BUN_EP_RANKS_PER_NODE: String(ranksPerNode),
        // One GPU, no NIC needed: every PE is reached through the P2P transport.
        NVSHMEM_REMOTE_TRANSPORT: process.env.NVSHMEM_REMOTE_TRANSPORT ?? "none",
        NVSHMEM_DISABLE_NVLS: "1",
      },
    },
  );
  if (run.status !== 0) {
    console.error(`${nodes}x${ranksPerNode} ${mode.join(" ")} seed ${seed} (status ${run.status}${run.signal ? `, ${run.signal}` : ""})\n`, run.stdout, run.stderr);
    // MPS refuses new clients for a moment after one was killed mid-kernel: let the next test start clean.
    Bun.sleepSync(3000);
  } else console.log(run.stdout.split("\n").filter((l) => l.includes("internode_rank ok")).join("\n"));
  expect(run.status).toBe(0);
  for (let r = 0; r < nproc; r++) expect(run.stdout).toContain(`[rank ${r}] internode_rank ok`);
}

// Checked only where GPU tests run at all (describeGpu prints its own reason elsewhere).
const availability = gpuSkipReason() === null ? internodeAvailability() : { ok: true as const };
const describeInternode = (name: string, fn: () => void): void => {
  if (availability.ok) return describeGpu(name, fn);
  console.log(`[skip] ${name}: ${availability.reason}`);
  describe.skip(name, fn);
};

describeInternode(
  "internode normal kernels, virtual nodes x ranks as processes on one GPU (NVSHMEM; MPS on)",
  () => {
    for (const [nodes, perNode] of [[2, 1], [2, 2], [4, 1]] as const) {
      test(`${nodes} nodes x ${perNode} ranks: layout, bf16/fp8, cached, numWorstTokens, skewed and empty routing, combine`, () => {
        runRanks(nodes, perNode, ["suite"], seedBase, 60);
      }, 70_000);
    }
    test("2 nodes x 2 ranks through the CUDA backend (what EpBuffer uses): it picks the internode kernels from the group layout", () => {
      runRanks(2, 2, ["backend"], seedBase + 3, 60);
    }, 70_000);
    test(`2 nodes x 2 ranks: ${iterations} random iterations on one engine`, () => {
      runRanks(2, 2, ["iterations", String(iterations)], seedBase + 7, 110);
    }, 120_000);
  },
);
