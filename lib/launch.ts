// The multi-process launcher behind `bun-ep run`: N Bun processes of one script on this host, with
// the torchrun variables TcpGroup reads, output prefixed per rank, and all-or-nothing exit: when one
// rank fails the others are stopped, so a crashed rank never leaves the rest waiting on a collective.

import { constants as osConstants } from "node:os";
import type { Subprocess } from "bun";

/** Options of `launch`. */
export interface LaunchOptions {
  /** The script every rank runs (path as given to `bun`). */
  script: string;
  /** Arguments after the script, the same for every rank. */
  args?: string[];
  /** Number of ranks (processes) to start, >= 1. */
  nproc: number;
  /** Ranks sharing one GPU: BUN_EP_DEVICE = floor(LOCAL_RANK / ranksPerGpu). Default 1. */
  ranksPerGpu?: number;
  /** Port of rank 0's store (MASTER_PORT). Default: a free port, found by binding port 0. */
  masterPort?: number;
  /** Stop every rank and fail after this many seconds. Default: no limit. */
  timeoutS?: number;
  /** How long stopped ranks get between SIGTERM and SIGKILL, in ms. Default 5000. */
  graceMs?: number;
  /** Environment the ranks start from (the rank variables are added). Default: `process.env`. */
  env?: Record<string, string | undefined>;
  /** The Bun executable. Default: `process.execPath` (the Bun running the launcher). */
  bunPath?: string;
  /** Working directory of the ranks. Default: the launcher's. */
  cwd?: string;
  /**
   * Receives each complete output line of a rank (without its newline; a last line without one is
   * flushed at exit). Default: written as `[rank i] line` to the launcher's stdout or stderr.
   */
  onOutput?: (rank: number, stream: "stdout" | "stderr", line: string) => void;
  /** Receives the launcher's own messages (why it stopped). Default: written to stderr. */
  onMessage?: (message: string) => void;
  /** Forward SIGINT and SIGTERM received by this process to the ranks. Default false (true in the CLI). */
  forwardSignals?: boolean;
  /** Stops every rank (SIGTERM, then SIGKILL after the grace period) when aborted; the launch fails. */
  signal?: AbortSignal;
}

/** How one rank ended. */
export interface RankExit {
  rank: number;
  pid: number;
  /** Exit code, or null when a signal ended it. */
  exitCode: number | null;
  /** The signal that ended it ("SIGTERM", ...), or null. */
  signal: string | null;
  /** True when the launcher stopped it because of another rank, a signal or the time limit. */
  stoppedByLauncher: boolean;
}

/** The outcome of a launch. */
export interface LaunchResult {
  /** 0 only when every rank exited 0; else the failed rank's code (128 + signal for a signal),
   *  130/143 when interrupted by SIGINT/SIGTERM, 124 on the time limit, 1 when aborted. */
  exitCode: number;
  /** The rank whose failure stopped the others, or null. */
  failedRank: number | null;
  /** Why the launch failed (the line printed), or null on success. */
  message: string | null;
  /** MASTER_PORT the ranks were given. */
  masterPort: number;
  ranks: RankExit[];
}

/** A TCP port that was free a moment ago on `hostname` (bind port 0, read it, close). */
export function findFreePort(hostname = "127.0.0.1"): number {
  const listener = Bun.listen({ hostname, port: 0, socket: { data() {} } });
  const port = listener.port;
  listener.stop(true);
  return port;
}

function checkInteger(value: number | undefined, name: string, min: number, max = Number.MAX_SAFE_INTEGER): void {
  if (value === undefined) return;
  if (typeof value !== "number" || !Number.isInteger(value) || value < min || value > max) {
    throw new RangeError(`launch: ${name} must be an integer in [${min}, ${max}], got ${String(value)}`);
  }
}

function signalNumber(signal: string): number {
  return (osConstants.signals as Record<string, number | undefined>)[signal] ?? 0;
}

function describeRankList(ranks: readonly number[]): string {
  return ranks.length === 1 ? `rank ${ranks[0]}` : `ranks ${ranks.join(", ")}`;
}

/** Calls `onLine` with each complete line of `stream`, then with the unterminated rest. */
async function pumpLines(stream: ReadableStream<Uint8Array>, onLine: (line: string) => void): Promise<void> {
  const decoder = new TextDecoder();
  let partial = "";
  for await (const chunk of stream) {
    partial += decoder.decode(chunk, { stream: true });
    let newline = partial.indexOf("\n");
    while (newline >= 0) {
      onLine(partial.slice(0, newline));
      partial = partial.slice(newline + 1);
      newline = partial.indexOf("\n");
    }
  }
  partial += decoder.decode();
  if (partial.length > 0) onLine(partial);
}

/**
 * Start `nproc` ranks of `script` and wait for them all. Each gets RANK, WORLD_SIZE, LOCAL_RANK,
 * LOCAL_WORLD_SIZE, MASTER_ADDR (127.0.0.1), MASTER_PORT and BUN_EP_DEVICE. Never rejects for a
 * rank's failure: the result says what happened.
 */
export async function launch(options: LaunchOptions): Promise<LaunchResult> {
  const { nproc } = options;
  checkInteger(nproc, "nproc", 1, 4096);
  if (nproc === undefined) throw new RangeError("launch: nproc is required");
  const ranksPerGpu = options.ranksPerGpu ?? 1;
  checkInteger(ranksPerGpu, "ranksPerGpu", 1);
  checkInteger(options.masterPort, "masterPort", 1, 65535);
  if (options.timeoutS !== undefined && !(options.timeoutS > 0)) {
    throw new RangeError(`launch: timeoutS must be a positive number of seconds, got ${String(options.timeoutS)}`);
  }
  const graceMs = options.graceMs ?? 5000;
  checkInteger(graceMs, "graceMs", 0);
  if (typeof options.script !== "string" || options.script === "") {
    throw new TypeError("launch: script must be the path of the script every rank runs");
  }

  const masterAddr = "127.0.0.1";
  const masterPort = options.masterPort ?? findFreePort(masterAddr);
  const onOutput =
    options.onOutput ??
    ((rank: number, stream: "stdout" | "stderr", line: string) =>
      (stream === "stdout" ? process.stdout : process.stderr).write(`[rank ${rank}] ${line}\n`));
  const onMessage = options.onMessage ?? ((message: string) => process.stderr.write(`${message}\n`));
  const baseEnv = options.env ?? process.env;

  const children: Subprocess<"ignore", "pipe", "pipe">[] = [];
  const exits: (RankExit | undefined)[] = new Array(nproc);
  let stopping: { reason: string; exitCode: number; failedRank: number | null; stopped: number[] } | null = null;
  let killTimer: ReturnType<typeof setTimeout> | null = null;
  const killed: number[] = [];

  const running = () => children.flatMap((child, rank) => (exits[rank] === undefined && child.exitCode === null && child.signalCode === null ? [rank] : []));

  /** Stop every rank still running: SIGTERM now, SIGKILL after the grace period. */
  const stopAll = (reason: string, exitCode: number, failedRank: number | null, signal: NodeJS.Signals = "SIGTERM") => {
    if (stopping) return;
    const stopped = running();
    stopping = { reason, exitCode, failedRank, stopped };
    for (const rank of stopped) children[rank]!.kill(signal);
    killTimer = setTimeout(() => {
      for (const rank of running()) {
        killed.push(rank);
        children[rank]!.kill("SIGKILL");
      }
    }, graceMs);
  };

  const pumps: Promise<void>[] = [];
  const exited: Promise<void>[] = [];
  for (let rank = 0; rank < nproc; rank++) {
    const env: Record<string, string> = {};
    for (const [key, value] of Object.entries(baseEnv)) if (value !== undefined) env[key] = value;
    Object.assign(env, {
      RANK: String(rank),
      WORLD_SIZE: String(nproc),
      LOCAL_RANK: String(rank),
      LOCAL_WORLD_SIZE: String(nproc),
      MASTER_ADDR: masterAddr,
      MASTER_PORT: String(masterPort),
      BUN_EP_DEVICE: String(Math.floor(rank / ranksPerGpu)),
    });
    let child: Subprocess<"ignore", "pipe", "pipe">;
    try {
      child = Bun.spawn({
        cmd: [options.bunPath ?? process.execPath, options.script, ...(options.args ?? [])],
        env,
        cwd: options.cwd,
        stdin: "ignore",
        stdout: "pipe",
        stderr: "pipe",
      });
    } catch (error) {
      stopAll(`bun-ep run: could not start rank ${rank}: ${String(error)}`, 1, rank);
      break;
    }
    children.push(child);
    pumps.push(pumpLines(child.stdout, (line) => onOutput(rank, "stdout", line)));
    pumps.push(pumpLines(child.stderr, (line) => onOutput(rank, "stderr", line)));
    exited.push(
      child.exited.then(() => {
        const signal = child.signalCode === null ? null : String(child.signalCode);
        exits[rank] = {
          rank,
          pid: child.pid,
          exitCode: signal ? null : child.exitCode,
          signal,
          stoppedByLauncher: stopping?.stopped.includes(rank) ?? false,
        };
        if (stopping) return;
        if (signal) {
          stopAll(`rank ${rank} was killed by ${signal}`, 128 + signalNumber(signal), rank);
        } else if (child.exitCode !== 0) {
          stopAll(`rank ${rank} exited with code ${child.exitCode}`, child.exitCode ?? 1, rank);
        }
      }),
    );
  }

  const signalHandlers: [NodeJS.Signals, () => void][] = [];
  if (options.forwardSignals) {
    for (const signal of ["SIGINT", "SIGTERM"] as const) {
      const handler = () => {
        if (stopping) {
          // A second Ctrl-C: do not wait for the grace period.
          for (const rank of running()) children[rank]!.kill("SIGKILL");
          return;
        }
        stopAll(`interrupted by ${signal}`, 128 + signalNumber(signal), null, signal);
      };
      process.on(signal, handler);
      signalHandlers.push([signal, handler]);
    }
  }
  const timeLimit =
    options.timeoutS !== undefined
      ? setTimeout(() => stopAll(`timed out after ${options.timeoutS} s`, 124, null), options.timeoutS * 1000)
      : null;

  const onAbort = () => stopAll("aborted", 1, null);
  if (options.signal?.aborted) onAbort();
  options.signal?.addEventListener("abort", onAbort);

  try {
    await Promise.all(exited);
    await Promise.all(pumps);
  } finally {
    if (timeLimit) clearTimeout(timeLimit);
    if (killTimer) clearTimeout(killTimer);
    for (const [signal, handler] of signalHandlers) process.off(signal, handler);
    options.signal?.removeEventListener("abort", onAbort);
  }

  const ranks = exits.filter((exit): exit is RankExit => exit !== undefined);
  const final = stopping as { reason: string; exitCode: number; failedRank: number | null; stopped: number[] } | null;
  if (!final) return { exitCode: 0, failedRank: null, message: null, masterPort, ranks };
  let message = `bun-ep run: ${final.reason}`;
  if (final.stopped.length > 0) message += `; stopped ${describeRankList(final.stopped)}`;
  if (killed.length > 0) message += ` (${describeRankList(killed)} ignored SIGTERM and got SIGKILL after ${graceMs} ms)`;
  onMessage(message);
  return { exitCode: final.exitCode || 1, failedRank: final.failedRank, message, masterPort, ranks };
}
