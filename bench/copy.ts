// Device copy ceilings that later kernels are measured against:
//  - D2D on one GPU with cudaMemcpyAsync and with a 16-byte-vector copy kernel, several sizes;
//  - "two ranks at once on one GPU": two streams copying concurrently, GB/s per stream (the
//    ceiling of EP2 with both ranks on one GPU);
//  - peer copy over NVLink between GPU 0 and 1 when there are two or more GPUs.
// GB/s counts bytes copied (10^9 bytes/s); "rw" also counts the read: 2 x bytes.
//   bun bench/copy.ts [--max-mib N] [--iterations N]
import { check, native } from "../lib/ffi.ts";
import { Event, Stream, deviceCount, withDevice } from "../lib/stream.ts";
import { DeviceTensor } from "../lib/tensor.ts";
import { PeerBuffer } from "../lib/backend/cuda_peers.ts";
import { describeDevices, requireGpu, formatBytes, markdownTable, median, percentile, timeOnStream, writeResults, type Row } from "./common.ts";

function option(name: string, fallback: number): number {
  const i = process.argv.indexOf(name);
  const value = i >= 0 ? Number(process.argv[i + 1]) : fallback;
  if (!Number.isInteger(value) || value <= 0) throw new RangeError(`${name}: expected a positive integer`);
  return value;
}

const maxMiB = option("--max-mib", 1024);
const iterationsOption = option("--iterations", 20);
const SIZES = [1, 16, 64, 256, 1024].map((m) => m * 2 ** 20).filter((b) => b <= maxMiB * 2 ** 20);

requireGpu("bench/copy.ts");
const lib = native();
console.log(`device: ${describeDevices()}`);
const rows: Row[] = [];

type Method = "memcpyAsync" | "kernel";

function enqueueCopy(method: Method, dst: number, src: number, bytes: number, stream: Stream, numBlocks = 0): void {
  if (method === "memcpyAsync") check(lib.bun_ep_memcpy_async(dst, src, bytes, stream.handle), "memcpy");
  else check(lib.bun_ep_debug_copy_bytes(dst, src, bytes, numBlocks, stream.handle), "copy kernel");
}

/** More iterations for small copies so that each sample is long enough to time. */
function iterationsFor(bytes: number): number {
  return bytes <= 16 * 2 ** 20 ? Math.max(iterationsOption, 100) : iterationsOption;
}

function gbps(bytes: number, ms: number): number {
  return bytes / (ms * 1e-3) / 1e9;
}

function row(kind: string, method: string, bytes: number, times: number[], ceilingGbps: number | null): Row {
  const ms = median(times);
  const rate = gbps(bytes, ms);
  return {
    case: kind,
    method,
    size: formatBytes(bytes),
    bytes,
    medianMs: ms,
    p10Ms: percentile(times, 10),
    p90Ms: percentile(times, 90),
    gbps: rate,
    rwGbps: 2 * rate,
    ratioToMemcpy: ceilingGbps === null ? null : rate / ceilingGbps,
  };
}

// ---- 1. D2D on GPU 0 ---------------------------------------------------------------------------------
{
  const stream = Stream.create({ device: 0 });
  const largest = SIZES[SIZES.length - 1]!;
  const src = DeviceTensor.empty("u8", [largest], { device: 0, stream });
  const dst = DeviceTensor.empty("u8", [largest], { device: 0, stream });
  src.fillBytes(1);
  for (const bytes of SIZES) {
    const iterations = iterationsFor(bytes);
    const memcpyTimes = timeOnStream(stream, () => enqueueCopy("memcpyAsync", dst.ptr, src.ptr, bytes, stream), { iterations });
    const memcpyRow = row("d2d", "memcpyAsync", bytes, memcpyTimes, null);
    const kernelTimes = timeOnStream(stream, () => enqueueCopy("kernel", dst.ptr, src.ptr, bytes, stream), { iterations });
    rows.push(memcpyRow, row("d2d", "kernel int4", bytes, kernelTimes, memcpyRow.gbps as number));
  }
  src.free();
  dst.free();
  stream.synchronize();
  stream.close();
}

// ---- 2. two streams at once on GPU 0 (two ranks sharing one GPU) ---------------------------------------
{
  const streams = [Stream.create({ device: 0 }), Stream.create({ device: 0 })];
  const concurrentSizes = SIZES.filter((b) => b >= 16 * 2 ** 20);
  const largest = concurrentSizes[concurrentSizes.length - 1] ?? SIZES[SIZES.length - 1]!;
  const buffers = streams.map((stream) => ({
    src: DeviceTensor.empty("u8", [largest], { device: 0, stream }).fillBytes(2),
    dst: DeviceTensor.empty("u8", [largest], { device: 0, stream }),
  }));
  const singleRate = new Map<string, number>();
  for (const r of rows) if (r.case === "d2d") singleRate.set(`${r.method}/${r.bytes}`, r.gbps as number);
  for (const bytes of concurrentSizes) {
    for (const method of ["memcpyAsync", "kernel"] as const) {
      const iterations = iterationsFor(bytes);
      const go = Event.create({ device: 0 });
      const starts = streams.map(() => Event.create({ device: 0, timing: true }));
      const ends = streams.map(() => Event.create({ device: 0, timing: true }));
      // Warm up both, then start both streams from one event so their copies overlap.
      streams.forEach((s, i) => {
        for (let w = 0; w < 3; w++) enqueueCopy(method, buffers[i]!.dst.ptr, buffers[i]!.src.ptr, bytes, s);
      });
      streams.forEach((s) => s.synchronize());
      go.record(streams[0]!);
      streams.forEach((s, i) => {
        go.waitOn(s);
        starts[i]!.record(s);
        for (let k = 0; k < iterations; k++) enqueueCopy(method, buffers[i]!.dst.ptr, buffers[i]!.src.ptr, bytes, s);
        ends[i]!.record(s);
      });
      ends.forEach((e) => e.synchronize());
      const perStreamMs = streams.map((_, i) => starts[i]!.elapsedMs(ends[i]!) / iterations);
      const single = singleRate.get(`${method === "kernel" ? "kernel int4" : "memcpyAsync"}/${bytes}`) ?? null;
      perStreamMs.forEach((ms, i) => {
        const r = row("2 streams, one GPU", `${method === "kernel" ? "kernel int4" : method}, stream ${i}`, bytes, [ms], single);
        rows.push({ ...r, ratioToMemcpy: null, ratioToSingleStream: single === null ? null : (r.gbps as number) / single });
      });
      const aggregate = (2 * bytes * iterations) / (Math.max(...streams.map((_, i) => starts[i]!.elapsedMs(ends[i]!))) * 1e-3) / 1e9;
      rows.push({ case: "2 streams, one GPU", method: `${method === "kernel" ? "kernel int4" : method}, both`, size: formatBytes(bytes), bytes, gbps: aggregate, rwGbps: 2 * aggregate });
      [go, ...starts, ...ends].forEach((e) => e.close());
    }
  }
  buffers.forEach((b) => {
    b.src.free();
    b.dst.free();
  });
  streams.forEach((s) => {
    s.synchronize();
    s.close();
  });
}

// ---- 3. peer copy over NVLink ---------------------------------------------------------------------------
const gpus = deviceCount();
if (gpus < 2) {
  console.log(`peer copy: skipped (${gpus} GPU${gpus === 1 ? "" : "s"}; needs 2)`);
} else {
  const canAccess = new Int32Array(1);
  check(lib.bun_ep_can_access_peer(0, 1, canAccess), "can access peer");
  if (canAccess[0] !== 1) {
    console.log("peer copy: skipped (GPU 0 cannot access GPU 1 directly)");
  } else {
    withDevice(0, () => check(lib.bun_ep_enable_peer_access(1), "enable peer access 0->1"));
    withDevice(1, () => check(lib.bun_ep_enable_peer_access(0), "enable peer access 1->0"));
    // cudaMalloc'd buffers (PeerBuffer): stream-ordered pool memory is not reachable from a peer
    // device unless its pool grants access (seen on 2x H200: cudaErrorInvalidValue).
    const bytes = Math.min(256 * 2 ** 20, SIZES[SIZES.length - 1]!);
    const streams = [Stream.create({ device: 0 }), Stream.create({ device: 1 })];
    const src = [PeerBuffer.allocate(0, bytes), PeerBuffer.allocate(1, bytes)];
    const dst = [PeerBuffer.allocate(0, bytes), PeerBuffer.allocate(1, bytes)];
    const iterations = iterationsFor(bytes);
    const stream = streams[0]!;
    const cases: [string, Method, number, number][] = [
      ["memcpyAsync 0->1", "memcpyAsync", dst[1]!.ptr, src[0]!.ptr],
      ["kernel push 0->1 (GPU 0 writes)", "kernel", dst[1]!.ptr, src[0]!.ptr],
      ["kernel pull 1->0 (GPU 0 reads)", "kernel", dst[0]!.ptr, src[1]!.ptr],
    ];
    for (const [name, method, to, from] of cases) {
      const times = timeOnStream(stream, () => enqueueCopy(method, to, from, bytes, stream), { iterations });
      rows.push(row("peer NVLink", name, bytes, times, null));
    }
    // Both GPUs push to each other at once (what EP2 dispatch and combine do): GB/s per direction.
    for (const method of ["memcpyAsync", "kernel"] as const) {
      const samples: number[] = [];
      for (let i = 0; i < 3 + iterations; i++) {
        streams.forEach((s) => s.synchronize());
        const starts = streams.map((s) => Event.create({ device: s.device, timing: true }).record(s));
        streams.forEach((s, g) => enqueueCopy(method, dst[1 - g]!.ptr, src[g]!.ptr, bytes, s));
        const ends = streams.map((s) => Event.create({ device: s.device, timing: true }).record(s));
        ends.forEach((e) => e.synchronize());
        if (i >= 3) samples.push(Math.max(...streams.map((_, g) => starts[g]!.elapsedMs(ends[g]!))));
        [...starts, ...ends].forEach((e) => e.close());
      }
      rows.push(row("peer NVLink", `${method === "kernel" ? "kernel push" : "memcpyAsync"} both directions at once (per direction)`, bytes, samples, null));
    }
    for (const b of [...src, ...dst]) b.free();
    streams.forEach((s) => s.close());
  }
}

console.log(markdownTable(rows, ["case", "method", "size", "medianMs", "gbps", "rwGbps", "ratioToMemcpy", "ratioToSingleStream"]));
console.log("GB/s = bytes copied / time (10^9 B/s); rwGbps counts read + write (2 x bytes).");
console.log(`wrote ${writeResults("copy", rows, { maxMiB, iterations: iterationsOption })}`);
