// Developer probe: the round trip of one global load on this GPU, for each load kind the
// low-latency kernels use (plain, L2-only, volatile, relaxed.sys, acquire.sys). One thread follows
// a chain of dependent loads (each to a new 128-byte line) through a chain that fits in L2, then
// one that does not; each again while a copy kernel streams through HBM on another stream (the
// row stores of a dispatch load the memory system the same way). Prints SM cycles per load and
// µs at the SM clock. Needs a trace build:
// BUN_EP_NVCC_FLAGS=-DBUN_EP_LL_TRACE bun run build
//   bun bench/ll_latency.ts [--loads 2000]
import { dlopen } from "bun:ffi";
import { resolve } from "node:path";
import { check, native } from "../lib/ffi.ts";
import { Stream } from "../lib/stream.ts";
import { DeviceTensor, HostTensor } from "../lib/tensor.ts";
import { describeDevices, requireGpu } from "./common.ts";

const loadsIndex = process.argv.indexOf("--loads");
const LOADS = loadsIndex >= 0 ? Number(process.argv[loadsIndex + 1]) : 2000;
const KINDS = ["ld.global", "ld.global.cg", "ld.volatile", "ld.relaxed.sys", "ld.acquire.sys"] as const;

requireGpu("bench/ll_latency.ts");
const probe = dlopen(resolve(import.meta.dir, "../build/libbun_ep.so"), {
  bun_ep_ll_debug_load_latency: { args: ["ptr", "u64", "i32", "ptr", "ptr"], returns: "i32" },
});
const lib = native();
console.log(`device: ${describeDevices()}`);

const probeStream = Stream.create();
const floodStream = Stream.create();
const FLOOD_BYTES = 2 ** 30;
const floodSrc = DeviceTensor.zeros("u8", [FLOOD_BYTES]);
const floodDst = DeviceTensor.zeros("u8", [FLOOD_BYTES]);
const out = DeviceTensor.zeros("i64", [8]);

/** A chain over `bytes` of u64 words: from each line to a line `stride` lines on (odd stride, wraps:
 * one cycle through every line). */
function chain(bytes: number): { data: DeviceTensor<"i64">; lines: number } {
  const words = bytes / 8, lines = words / 16, stride = 4099;
  const host = new HostTensor("i64", [words]);
  for (let line = 0; line < lines; line++) host.data[line * 16] = BigInt(((line + stride) % lines) * 16);
  return { data: DeviceTensor.fromHost(host), lines };
}

/** inL2: the timed pass follows the lines the warm pass loaded (in L2 now); else it starts half the
 * chain away, on lines no pass has touched (only the TLB is warm). */
function measure(label: string, data: DeviceTensor<"i64">, lines: number, inL2: boolean, flood: boolean): void {
  for (let pass = 0; pass < 2; pass++) {
    if (flood) check(lib.bun_ep_debug_copy_bytes(floodDst.ptr, floodSrc.ptr, FLOOD_BYTES, 264, floodStream.handle), "flood copy");
    const first = pass === 1 && !inL2 ? BigInt((lines / 2) * 16) : 0n;
    const rc = probe.symbols.bun_ep_ll_debug_load_latency(data.ptr, first, LOADS, out.ptr, probeStream.handle);
    if (rc !== 0) throw new Error(`bun_ep_ll_debug_load_latency: ${rc} (build with BUN_EP_NVCC_FLAGS=-DBUN_EP_LL_TRACE)`);
    probeStream.synchronize();
    floodStream.synchronize();
  }
  const cycles = out.toHost(probeStream).data;
  const clockGhz = Number(cycles[7]) / Math.max(1, Number(cycles[6]));
  const parts = KINDS.map((kind, k) => `${kind} ${cycles[k]} (${(Number(cycles[k]) / clockGhz / 1000).toFixed(2)} us)`);
  console.log(`${label} (SM clock ${clockGhz.toFixed(2)} GHz): ${parts.join(" | ")}`);
}

for (const [name, bytes, inL2] of [["8 MiB chain (L2)", 8 * 2 ** 20, true], ["1 GiB chain (HBM)", 2 ** 30, false]] as const) {
  const { data, lines } = chain(bytes);
  measure(`${name}, idle`, data, lines, inL2, false);
  measure(`${name}, beside a 1 GiB copy`, data, lines, inL2, true);
  data.free();
}
process.exit(0);
