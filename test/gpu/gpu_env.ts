// Every GPU test goes through here: it runs only where libbun_ep.so loads and a CUDA device
// exists, and otherwise is skipped with the reason printed once.
import { describe } from "bun:test";
import { native, nativeAvailability } from "../../lib/ffi.ts";

let cachedReason: string | null | undefined;

/** Number of CUDA devices the library sees (0 when it cannot load or there is no driver). */
export function gpuCount(): number {
  if (nativeAvailability().ok !== true) return 0;
  const count = new Int32Array(1);
  native().bun_ep_device_count(count);
  return count[0] ?? 0;
}

/** Null when GPU tests can run here, else why not. */
export function gpuSkipReason(): string | null {
  if (cachedReason !== undefined) return cachedReason;
  const availability = nativeAvailability();
  if (!availability.ok) {
    cachedReason = `libbun_ep.so not loadable (run bun run build): ${availability.reason}`;
    return cachedReason;
  }
  const lib = native();
  const count = new Int32Array(1);
  const status = lib.bun_ep_device_count(count);
  if (status !== 0) {
    cachedReason = `no CUDA device: ${String(lib.bun_ep_get_last_error())}`;
  } else if ((count[0] ?? 0) < 1) {
    cachedReason = "no CUDA device";
  } else {
    cachedReason = null;
  }
  return cachedReason;
}

const printed = new Set<string>();

/** `describe` when GPU tests can run here, else `describe.skip` after printing `[skip] <name>: <reason>`. */
export function describeGpu(name: string, fn: () => void): void {
  const reason = gpuSkipReason();
  if (reason === null) {
    describe(name, fn);
    return;
  }
  if (!printed.has(name)) {
    printed.add(name);
    console.log(`[skip] ${name}: ${reason}`);
  }
  describe.skip(name, fn);
}
