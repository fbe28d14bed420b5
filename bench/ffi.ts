// Host cost of the FFI: one call of a trivial native function, and one asynchronous empty-kernel
// launch through TypeScript against the same launch loop written in C
// (bun_ep_debug_time_launches). Goal: TS adds under 1 µs per launch over C.
//   bun bench/ffi.ts [--launches N] [--samples S]
import { check, native } from "../lib/ffi.ts";
import { Stream } from "../lib/stream.ts";
import { describeDevices, requireGpu, markdownTable, median, percentile, timeHostNs, writeResults, type Row } from "./common.ts";

function option(name: string, fallback: number): number {
  const i = process.argv.indexOf(name);
  const value = i >= 0 ? Number(process.argv[i + 1]) : fallback;
  if (!Number.isInteger(value) || value <= 0) throw new RangeError(`${name}: expected a positive integer`);
  return value;
}

// Launch loops stay short so that the GPU's launch queue never fills: a full queue would make both
// loops wait on the GPU and hide the host cost we measure.
const launchesPerSample = option("--launches", 500);
const samples = option("--samples", 50);

requireGpu("bench/ffi.ts");
const lib = native();
const stream = Stream.create({ device: 0 });
console.log(`device: ${describeDevices()}`);

const rows: Row[] = [];
function addRow(name: string, nsSamples: number[], note: string): number {
  const ns = median(nsSamples);
  rows.push({ case: name, medianNs: ns, p10Ns: percentile(nsSamples, 10), p90Ns: percentile(nsSamples, 90), note });
  return ns;
}

// 1. Trivial calls: no arguments; one pointer argument; a status-returning call with a stream.
addRow("ffi call bun_ep_abi_version()", timeHostNs(() => lib.bun_ep_abi_version(), 100_000, samples), "no arguments");
const handle = stream.handle;
stream.synchronize();
addRow(
  "ffi call bun_ep_stream_query(stream)",
  timeHostNs(() => lib.bun_ep_stream_query(handle), 20_000, samples),
  "includes cudaStreamQuery",
);

// 2. Async empty-kernel launches: from TS (one FFI call per launch) and from C.
const tsLaunch: number[] = [];
const cLaunch: number[] = [];
const scratch = new Float64Array(1);
for (let s = -2; s < samples; s++) {
  // Interleave TS and C samples so that clock/boost drift hits both equally.
  stream.synchronize();
  const start = Bun.nanoseconds();
  for (let i = 0; i < launchesPerSample; i++) lib.bun_ep_debug_empty_kernel(handle);
  const ns = (Bun.nanoseconds() - start) / launchesPerSample;
  stream.synchronize();
  check(lib.bun_ep_debug_time_launches(launchesPerSample, handle, scratch), "bun_ep_debug_time_launches");
  if (s >= 0) {
    tsLaunch.push(ns);
    cLaunch.push(scratch[0]!);
  }
}
const tsNs = addRow("empty kernel launch from TS", tsLaunch, `${launchesPerSample} launches per sample`);
const cNs = addRow("empty kernel launch from C", cLaunch, `${launchesPerSample} launches per sample`);
const overheadNs = tsNs - cNs;
rows.push({ case: "TS overhead per launch (TS - C)", medianNs: overheadNs, p10Ns: null, p90Ns: null, note: "goal < 1000 ns" });

console.log(markdownTable(rows, ["case", "medianNs", "p10Ns", "p90Ns", "note"]));
const pass = overheadNs < 1000;
console.log(`TS-to-launch overhead over C: ${overheadNs.toFixed(0)} ns per launch: ${pass ? "PASS" : "FAIL"} (goal < 1000 ns)`);
const path = writeResults("ffi", rows, { launchesPerSample, samples, overheadNs, goalNs: 1000, pass });
console.log(`wrote ${path}`);
stream.close();
