// The launcher: rank variables, output prefixes, all-or-nothing exit, signals, no orphans; the CLI.
import { describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { launch } from "../lib/launch.ts";

const ROOT = resolve(import.meta.dir, "..");
const CLI = join(ROOT, "bin", "bun-ep.ts");
const RANK_SCRIPT = join(import.meta.dir, "fixtures", "launch_rank.ts");

function pidFolder(): string {
  return mkdtempSync(join(tmpdir(), "bun-ep-launch-"));
}

/** The pids the ranks wrote, by rank. */
function readPids(folder: string): Map<number, number> {
  const pids = new Map<number, number>();
  for (const name of readdirSync(folder)) {
    pids.set(Number(name.replace(".pid", "")), Number(readFileSync(join(folder, name), "utf8")));
  }
  return pids;
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

function expectNoOrphans(folder: string, expectedRanks: number): void {
  const pids = readPids(folder);
  expect(pids.size).toBe(expectedRanks);
  for (const [rank, pid] of pids) expect(isAlive(pid), `rank ${rank} (pid ${pid}) still running`).toBe(false);
  rmSync(folder, { recursive: true, force: true });
}

async function runCli(args: string[], env: Record<string, string> = {}) {
  const child = Bun.spawn({
    cmd: [process.execPath, CLI, ...args],
    env: { ...process.env, ...env },
    stdout: "pipe",
    stderr: "pipe",
  });
  const [stdout, stderr] = await Promise.all([new Response(child.stdout).text(), new Response(child.stderr).text()]);
  await child.exited;
  return { exitCode: child.exitCode, stdout, stderr, child };
}

async function waitFor(condition: () => boolean, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`condition not met within ${timeoutMs} ms`);
    await Bun.sleep(20);
  }
}

describe("bun-ep run", () => {
  test("sets the rank variables, prefixes every line, keeps stdout and stderr apart", async () => {
    const folder = pidFolder();
    const { exitCode, stdout, stderr } = await runCli([
      "run",
      "--nproc",
      "3",
      "--ranks-per-gpu=2",
      RANK_SCRIPT,
      "env",
      folder,
      "extra",
      "--flag-for-the-script",
    ]);
    expect(exitCode).toBe(0);
    const outLines = stdout.trimEnd().split("\n");
    const errLines = stderr.trimEnd().split("\n");
    expect(outLines.length).toBe(6);
    expect(errLines.sort()).toEqual(["[rank 0] to stderr from 0", "[rank 1] to stderr from 1", "[rank 2] to stderr from 2"]);
    const ports = new Set<string>();
    for (let rank = 0; rank < 3; rank++) {
      const jsonLine = outLines.find((line) => line.startsWith(`[rank ${rank}] {`));
      expect(jsonLine, `rank ${rank}'s JSON line`).toBeDefined();
      const { env, args } = JSON.parse(jsonLine!.slice(`[rank ${rank}] `.length));
      expect(env).toMatchObject({
        RANK: String(rank),
        WORLD_SIZE: "3",
        LOCAL_RANK: String(rank),
        LOCAL_WORLD_SIZE: "3",
        MASTER_ADDR: "127.0.0.1",
        BUN_EP_DEVICE: String(Math.floor(rank / 2)),
      });
      expect(Number(env.MASTER_PORT)).toBeGreaterThan(0);
      ports.add(env.MASTER_PORT);
      expect(args).toEqual(["extra", "--flag-for-the-script"]);
      // The unterminated last line is flushed at exit, prefixed.
      expect(outLines).toContain(`[rank ${rank}] no newline ${rank}`);
    }
    expect(ports.size).toBe(1);
    expectNoOrphans(folder, 3);
  });

  test("one rank throws: the others are stopped, exit non-zero, the message names the rank", async () => {
    const folder = pidFolder();
    const started = performance.now();
    const { exitCode, stdout, stderr } = await runCli(["run", "--nproc", "4", RANK_SCRIPT, "fail", folder], { FAIL_RANK: "2" });
    expect(performance.now() - started).toBeLessThan(15_000); // not the 60 s the others sleep
    expect(exitCode).toBe(1);
    expect(stderr).toContain("[rank 2] error: rank 2 fails on purpose");
    expect(stderr.trimEnd().split("\n").at(-1)).toBe("bun-ep run: rank 2 exited with code 1; stopped ranks 0, 1, 3");
    expect(stdout).toBe("");
    expectNoOrphans(folder, 4);
  }, 20_000);

  test("SIGINT is forwarded: every rank stops and bun-ep exits 130", async () => {
    const folder = pidFolder();
    const child = Bun.spawn({
      cmd: [process.execPath, CLI, "run", "--nproc", "2", RANK_SCRIPT, "fail", folder],
      env: { ...process.env, FAIL_RANK: "99" },
      stdout: "pipe",
      stderr: "pipe",
    });
    await waitFor(() => readdirSync(folder).length === 2, 10_000);
    child.kill("SIGINT");
    const stderr = await new Response(child.stderr).text();
    await child.exited;
    expect(child.exitCode).toBe(130);
    expect(stderr).toContain("bun-ep run: interrupted by SIGINT; stopped ranks 0, 1");
    expectNoOrphans(folder, 2);
  }, 20_000);

  test("ranks join a TcpGroup through the variables", async () => {
    const lines: string[] = [];
    const result = await launch({
      nproc: 4,
      script: RANK_SCRIPT,
      args: ["group"],
      onOutput: (rank, stream, line) => lines.push(`${stream} ${rank} ${line}`),
      onMessage: (message) => lines.push(message),
    });
    expect(result.exitCode, lines.join("\n")).toBe(0);
    expect(lines.sort()).toEqual([0, 1, 2, 3].map((rank) => `stdout ${rank} gathered 0,10,20,30`));
    expect(result.ranks.map((exit) => exit.exitCode)).toEqual([0, 0, 0, 0]);
  }, 20_000);

  test("a rank that ignores SIGTERM gets SIGKILL after the grace period", async () => {
    const folder = pidFolder();
    const messages: string[] = [];
    const abort = new AbortController();
    let ready = 0;
    const result = await launch({
      nproc: 2,
      script: RANK_SCRIPT,
      args: ["ignore-term", folder],
      graceMs: 300,
      signal: abort.signal,
      // Stop them only once both have installed their SIGTERM handler.
      onOutput: (_rank, _stream, line) => {
        if (line === "ready" && ++ready === 2) abort.abort();
      },
      onMessage: (message) => messages.push(message),
    });
    expect(result.exitCode).toBe(1);
    expect(result.failedRank).toBeNull();
    expect(messages).toEqual([
      "bun-ep run: aborted; stopped ranks 0, 1 (ranks 0, 1 ignored SIGTERM and got SIGKILL after 300 ms)",
    ]);
    expect(result.ranks.map((exit) => exit.signal)).toEqual(["SIGKILL", "SIGKILL"]);
    expectNoOrphans(folder, 2);
  }, 20_000);

  test("the failed rank's exit code is the launcher's; ranks that already finished are not 'stopped'", async () => {
    const messages: string[] = [];
    const result = await launch({ nproc: 3, script: RANK_SCRIPT, args: ["exit-code"], onOutput: () => {}, onMessage: (m) => messages.push(m) });
    expect(result.exitCode).toBe(5);
    expect(result.failedRank).toBe(1);
    expect(messages).toEqual(["bun-ep run: rank 1 exited with code 5"]);
  }, 20_000);

  test("the time limit stops every rank with exit code 124", async () => {
    const messages: string[] = [];
    const result = await launch({
      nproc: 2,
      script: RANK_SCRIPT,
      args: ["fail"],
      env: { ...process.env, FAIL_RANK: "99" },
      timeoutS: 1,
      onOutput: () => {},
      onMessage: (message) => messages.push(message),
    });
    expect(result.exitCode).toBe(124);
    expect(messages).toEqual(["bun-ep run: timed out after 1 s; stopped ranks 0, 1"]);
    expect(result.ranks.map((exit) => exit.signal)).toEqual(["SIGTERM", "SIGTERM"]);
  }, 20_000);

  test("bad options are named", async () => {
    expect(launch({ nproc: 0, script: RANK_SCRIPT })).rejects.toThrow("launch: nproc must be an integer in [1, 4096], got 0");
    expect(launch({ nproc: 2, ranksPerGpu: 1.5, script: RANK_SCRIPT })).rejects.toThrow("ranksPerGpu must be an integer");
  });
});

describe("bun-ep CLI", () => {
  test("--version prints the package version; help prints usage", async () => {
    const pkg = JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")) as { version: string };
    const version = await runCli(["--version"]);
    expect(version.exitCode).toBe(0);
    expect(version.stdout.trim()).toBe(pkg.version);
    const help = await runCli(["help"]);
    expect(help.exitCode).toBe(0);
    expect(help.stdout).toContain("usage: bun-ep <command>");
  });

  test("unknown commands and options are named, with the usage, exit 2", async () => {
    for (const [args, expected] of [
      [["frobnicate"], 'bun-ep: unknown command "frobnicate"'],
      [["run", "--nproc", "2", "--gpus", "4", "x.ts"], "bun-ep: unknown option for run: --gpus"],
      [["run", RANK_SCRIPT], "bun-ep: run: --nproc N is required"],
      [["run", "--nproc", "two", RANK_SCRIPT], 'bun-ep: --nproc must be an integer >= 1, got "two"'],
      [["run", "--nproc", "2"], "bun-ep: run: missing the script to run"],
      [[], "bun-ep: missing command"],
    ] as const) {
      const { exitCode, stderr } = await runCli([...args]);
      expect(exitCode, args.join(" ")).toBe(2);
      expect(stderr.split("\n")[0]).toBe(expected);
      expect(stderr).toContain("usage: bun-ep <command>");
    }
  });

  test("the bin entry is executable with a bun shebang", () => {
    expect(readFileSync(CLI, "utf8").startsWith("#!/usr/bin/env bun\n")).toBe(true);
    expect(existsSync(CLI)).toBe(true);
  });
});
