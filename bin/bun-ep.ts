#!/usr/bin/env bun
// The `bun-ep` command: `run` starts ranks (lib/launch.ts), `build` builds the native library.

import { join, resolve } from "node:path";
import { launch, type LaunchOptions } from "../lib/launch.ts";

const packageRoot = resolve(import.meta.dir, "..");

const USAGE = `usage: bun-ep <command> [...]

commands:
  run [options] script.ts [args...]   start N ranks of script.ts on this host
  build [args...]                     build build/libbun_ep.so (bun scripts/build.ts args...;
                                      see \`bun-ep build --help\`)
  help                                print this text
  --version                           print the version

run options (before the script; everything after it goes to the script):
  --nproc N            number of ranks (processes) to start; required
  --ranks-per-gpu K    ranks sharing one GPU: BUN_EP_DEVICE = floor(LOCAL_RANK / K); default 1
  --master-port P      port of rank 0's group store; default: a free port
  --timeout-s S        stop every rank and fail after S seconds; default: no limit

Each rank gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT and
BUN_EP_DEVICE; its output lines are prefixed "[rank i] ". When one rank fails the others are
stopped (SIGTERM, then SIGKILL) and bun-ep exits non-zero naming the rank.`;

/** A command-line mistake: printed with the usage, exit code 2. */
class UsageError extends Error {}

function parseNumber(flag: string, text: string | undefined, min: number, integer: boolean): number {
  if (text === undefined || text === "") throw new UsageError(`${flag} needs a value`);
  const value = Number(text);
  if (!Number.isFinite(value) || value < min || (integer && !Number.isInteger(value))) {
    throw new UsageError(`${flag} must be ${integer ? "an integer" : "a number"} >= ${min}, got "${text}"`);
  }
  return value;
}

/** Parse `run`'s arguments: options up to the script, the rest belongs to the script. */
export function parseRunArgs(argv: string[]): LaunchOptions {
  let nproc: number | undefined;
  let ranksPerGpu: number | undefined;
  let masterPort: number | undefined;
  let timeoutS: number | undefined;
  let index = 0;
  while (index < argv.length) {
    const arg = argv[index]!;
    if (arg === "--") {
      index += 1;
      break;
    }
    if (!arg.startsWith("-")) break;
    const equals = arg.indexOf("=");
    const flag = equals >= 0 ? arg.slice(0, equals) : arg;
    const takeValue = (): string | undefined => {
      if (equals >= 0) return arg.slice(equals + 1);
      index += 1;
      return argv[index];
    };
    switch (flag) {
      case "--nproc":
        nproc = parseNumber(flag, takeValue(), 1, true);
        break;
      case "--ranks-per-gpu":
        ranksPerGpu = parseNumber(flag, takeValue(), 1, true);
        break;
      case "--master-port":
        masterPort = parseNumber(flag, takeValue(), 1, true);
        if (masterPort > 65535) throw new UsageError(`--master-port must be at most 65535, got ${masterPort}`);
        break;
      case "--timeout-s":
        timeoutS = parseNumber(flag, takeValue(), Number.MIN_VALUE, false);
        break;
      default:
        throw new UsageError(`unknown option for run: ${arg}`);
    }
    index += 1;
  }
  const script = argv[index];
  if (script === undefined) throw new UsageError("run: missing the script to run");
  if (nproc === undefined) throw new UsageError("run: --nproc N is required");
  return { script, args: argv.slice(index + 1), nproc, ranksPerGpu, masterPort, timeoutS, forwardSignals: true };
}

async function readVersion(): Promise<string> {
  const pkg = (await Bun.file(join(packageRoot, "package.json")).json()) as { version?: string };
  return pkg.version ?? "unknown";
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  switch (command) {
    case "run": {
      const result = await launch(parseRunArgs(rest));
      return result.exitCode;
    }
    case "build": {
      const child = Bun.spawn({
        cmd: [process.execPath, join(packageRoot, "scripts", "build.ts"), ...rest],
        stdio: ["inherit", "inherit", "inherit"],
      });
      // Ctrl-C reaches the build through the terminal; do not die before it does.
      const ignore = () => {};
      process.on("SIGINT", ignore);
      const code = await child.exited;
      process.off("SIGINT", ignore);
      return child.signalCode ? 1 : code;
    }
    case "help":
    case "--help":
    case "-h":
      console.log(USAGE);
      return 0;
    case "--version":
    case "-v":
      console.log(await readVersion());
      return 0;
    case undefined:
      throw new UsageError("missing command");
    default:
      throw new UsageError(`unknown command "${command}"`);
  }
}

if (import.meta.main) {
  try {
    process.exitCode = await main(process.argv.slice(2));
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    console.error(`bun-ep: ${error.message}\n\n${USAGE}`);
    process.exitCode = 2;
  }
}
