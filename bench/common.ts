// Shared by the bench/ scripts: statistics, CUDA-event timing, device description, the JSON
// result file (bench/results/<name>.json) and a markdown table for the terminal.
import { mkdirSync, writeFileSync } from "node:fs";
import { relative, resolve } from "node:path";
import { Event, Stream, deviceCount, deviceProps } from "../lib/stream.ts";

export function median(values: readonly number[]): number {
  return percentile(values, 50);
}

/** Linear-interpolated percentile p in [0, 100]. */
export function percentile(values: readonly number[], p: number): number {
  if (values.length === 0) throw new RangeError("percentile: no values");
  const sorted = [...values].sort((a, b) => a - b);
  const position = ((sorted.length - 1) * p) / 100;
  const below = Math.floor(position);
  const above = Math.min(sorted.length - 1, below + 1);
  return sorted[below]! + (sorted[above]! - sorted[below]!) * (position - below);
}

export interface TimingOptions {
  /** Untimed runs first (caches, pools, clocks). */
  warmup?: number;
  iterations?: number;
}

/**
 * Milliseconds of each of `iterations` runs of `enqueue` on `stream`, measured by CUDA events
 * around each run, after `warmup` untimed runs. `enqueue` only submits work (asynchronous).
 */
export function timeOnStream(stream: Stream, enqueue: () => void, options: TimingOptions = {}): number[] {
  const warmup = options.warmup ?? 3;
  const iterations = options.iterations ?? 20;
  for (let i = 0; i < warmup; i++) enqueue();
  const events = Array.from({ length: iterations + 1 }, () => Event.create({ device: stream.device, timing: true }));
  events[0]!.record(stream);
  for (let i = 0; i < iterations; i++) {
    enqueue();
    events[i + 1]!.record(stream);
  }
  events[iterations]!.synchronize();
  const times = Array.from({ length: iterations }, (_, i) => events[i]!.elapsedMs(events[i + 1]!));
  for (const e of events) e.close();
  return times;
}

/** Host nanoseconds per call of `fn`, `calls` calls per sample, `samples` samples after one warm-up sample. */
export function timeHostNs(fn: () => void, calls: number, samples: number): number[] {
  const out: number[] = [];
  for (let s = -1; s < samples; s++) {
    const start = Bun.nanoseconds();
    for (let i = 0; i < calls; i++) fn();
    const ns = (Bun.nanoseconds() - start) / calls;
    if (s >= 0) out.push(ns);
  }
  return out;
}

/** "NVIDIA H100 80GB HBM3 (x2)" and similar. */
export function describeDevices(): string {
  const count = deviceCount();
  if (count === 0) return "no CUDA device";
  const props = deviceProps(0);
  return `${props.name}, ${props.multiProcessorCount} SMs, sm_${props.computeCapability.join("")}${count > 1 ? ` (x${count})` : ""}`;
}

export type Row = Record<string, string | number | boolean | null>;

/** bench/results/<name>.json: { device, date, command, rows }; returns the path written. */
export function writeResults(name: string, rows: readonly Row[], extra: Record<string, unknown> = {}): string {
  const dir = resolve(import.meta.dir, "results");
  mkdirSync(dir, { recursive: true });
  const path = resolve(dir, `${name}.json`);
  const command = ["bun", relative(process.cwd(), process.argv[1] ?? "") || process.argv[1], ...process.argv.slice(2)].join(" ");
  const body = { device: describeDevices(), date: new Date().toISOString(), command, bun: Bun.version, ...extra, rows };
  writeFileSync(path, `${JSON.stringify(body, null, 2)}\n`);
  return path;
}

function formatCell(value: Row[string] | undefined): string {
  if (value === null || value === undefined) return "";
  if (typeof value === "number") {
    if (Number.isInteger(value)) return String(value);
    const abs = Math.abs(value);
    return abs >= 100 ? value.toFixed(1) : abs >= 1 ? value.toFixed(2) : value.toFixed(3);
  }
  return String(value);
}

/** A markdown table of `rows` (columns: `columns`, default the keys of the first row). */
export function markdownTable(rows: readonly Row[], columns?: readonly string[]): string {
  const cols = columns ?? Object.keys(rows[0] ?? {});
  const lines = [`| ${cols.join(" | ")} |`, `| ${cols.map(() => "---").join(" | ")} |`];
  for (const row of rows) lines.push(`| ${cols.map((c) => formatCell(row[c])).join(" | ")} |`);
  return lines.join("\n");
}

export function formatBytes(bytes: number): string {
  if (bytes >= 2 ** 30) return `${bytes / 2 ** 30} GiB`;
  if (bytes >= 2 ** 20) return `${bytes / 2 ** 20} MiB`;
  if (bytes >= 2 ** 10) return `${bytes / 2 ** 10} KiB`;
  return `${bytes} B`;
}

/** Exit with a clear message when there is no GPU or no built library. */
export function requireGpu(script: string): void {
  let reason: string | null = null;
  try {
    if (deviceCount() === 0) reason = "no CUDA device";
  } catch (err) {
    reason = (err as Error).message;
  }
  if (reason !== null) {
    console.error(`${script} needs a CUDA GPU and the built library: ${reason}`);
    process.exit(1);
  }
}
