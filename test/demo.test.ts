// `bun run demo` works on a machine without a GPU (host backend) and its check passes; the
// single-process form (--local) works for other rank counts; bad flags fail with the usage.

import { expect, test } from "bun:test";
import { join } from "node:path";

const root = join(import.meta.dir, "..");

function run(args: string[]): { exitCode: number; out: string } {
  const proc = Bun.spawnSync([process.execPath, ...args], { cwd: root, stdout: "pipe", stderr: "pipe", env: { ...process.env } });
  return { exitCode: proc.exitCode ?? -1, out: proc.stdout.toString() + proc.stderr.toString() };
}

test("bun run demo: 2 processes through the launcher, check passed", () => {
  const { exitCode, out } = run(["run", "demo"]);
  if (exitCode !== 0) console.error(out);
  expect(exitCode).toBe(0);
  expect(out).toMatch(/\[rank 0\] backend: (host|cuda) \(/);
  expect(out).toContain("tokens sent");
  expect(out).toContain("time per step, median of 5");
  expect(out).toContain("all equal bit for bit");
  expect(out).toContain("[rank 0] check passed");
});

test("demo with --local: 3 ranks in one process, host backend, other sizes", () => {
  const { exitCode, out } = run(["examples/moe-layer.ts", "--local", "--ranks", "3", "--experts", "6", "--topk", "3", "--tokens", "24", "--hidden", "64", "--steps", "2", "--seed", "9", "--backend", "host"]);
  if (exitCode !== 0) console.error(out);
  expect(exitCode).toBe(0);
  expect(out).toContain("3 ranks, 24 tokens/rank, hidden 64, 6 experts (top-3)");
  expect(out).toContain("backend: host (requested)");
  expect(out).toContain("check passed");
});

test("demo rejects bad flags and impossible sizes", () => {
  const bad = run(["examples/moe-layer.ts", "--local", "--tokens", "many"]);
  expect(bad.exitCode).toBe(2);
  expect(bad.out).toContain("usage:");
  const sizes = run(["examples/moe-layer.ts", "--local", "--ranks", "3", "--experts", "8"]);
  expect(sizes.exitCode).toBe(2);
  expect(sizes.out).toContain("multiple of the number of ranks");
});
