// The only dlopen of bun-ep. Loads build/libbun_ep.so (or $BUN_EP_LIB) lazily on first use, so
// CPU-only users never need it; checks the ABI version before binding the full symbol table,
// which merges one table per native concern (lib/native/*.ts).

import { dlopen, type Library } from "bun:ffi";
import { existsSync } from "node:fs";
import { resolve } from "node:path";
import { lowLatencySymbols } from "./native/low_latency.ts";
import { normalSymbols } from "./native/normal.ts";
import { nvshmemSymbols } from "./native/nvshmem.ts";
import { internodeSymbols } from "./native/internode.ts";
import { runtimeSymbols } from "./native/runtime.ts";

/** Must equal BUN_EP_ABI_VERSION in cuda/include/bun_ep.h. */
export const ABI_VERSION = 3;

const allSymbols = { ...runtimeSymbols, ...normalSymbols, ...lowLatencySymbols, ...nvshmemSymbols, ...internodeSymbols };

type RawSymbols = Library<typeof allSymbols>["symbols"];
/** bun:ffi types "ptr" arguments as its branded Pointer; at run time a plain number (a device or
 * host address, or a CUDA handle) is accepted, and that is what this package passes around. */
type AcceptNumbers<F> = F extends (...args: infer A) => infer R ? (...args: { [K in keyof A]: A[K] | number }) => R : F;
export type NativeSymbols = { readonly [K in keyof RawSymbols]: AcceptNumbers<RawSymbols[K]> };

/** bunEpResult_t codes (cuda/include/bun_ep.h). */
export const Status = {
  Success: 0,
  InvalidArgument: 1,
  CudaError: 2,
  Timeout: 3,
  NotSupported: 4,
  OutOfMemory: 5,
  InternalError: 6,
  NvshmemError: 7,
  NotReady: 8,
  Unusable: 9,
} as const;
export type StatusName = keyof typeof Status;

const STATUS_NAME_OF_CODE = new Map<number, StatusName>(
  Object.entries(Status).map(([name, code]) => [code, name as StatusName]),
);

/** A failed native call: `code` is the status name, the message has the library's last error. */
export class BunEpError extends Error {
  readonly code: StatusName | "Unknown";
  readonly status: number;
  constructor(status: number, what: string, detail: string) {
    const code = STATUS_NAME_OF_CODE.get(status) ?? "Unknown";
    super(`${what} failed (${code}${code === "Unknown" ? ` ${status}` : ""})${detail ? `: ${detail}` : ""}`);
    this.name = "BunEpError";
    this.code = code;
    this.status = status;
  }
}

/** Throw a BunEpError unless `status` is success. `what` names the operation, e.g. "cudaMalloc of x". */
export function check(status: number, what: string): void {
  if (status !== Status.Success) throw new BunEpError(status, what, lastError());
}

/** For queries: true when done, false when still in flight (bunEpNotReady), throws otherwise. */
export function checkReady(status: number, what: string): boolean {
  if (status === Status.NotReady) return false;
  check(status, what);
  return true;
}

function lastError(): string {
  try {
    return String(native().bun_ep_get_last_error() ?? "");
  } catch {
    return "";
  }
}

/** Where the library is looked for: $BUN_EP_LIB, else <package root>/build/libbun_ep.so. */
export function libraryPath(): string {
  const fromEnv = process.env.BUN_EP_LIB;
  if (fromEnv !== undefined && fromEnv !== "") return resolve(fromEnv);
  return resolve(import.meta.dir, "..", "build", "libbun_ep.so");
}

const BUILD_HINT = "run `bunx bun-ep build` (or `bun run build` in a checkout), or set BUN_EP_LIB";

let loaded: NativeSymbols | null = null;
let loadError: Error | null = null;

function load(): NativeSymbols {
  const path = libraryPath();
  if (!existsSync(path)) {
    throw new Error(`bun-ep native library not found at ${path}: ${BUILD_HINT}`);
  }
  let probe: Library<{ bun_ep_abi_version: { args: []; returns: "i32" } }>;
  try {
    probe = dlopen(path, { bun_ep_abi_version: { args: [], returns: "i32" } });
  } catch (err) {
    throw new Error(`bun-ep native library at ${path} could not be loaded: ${(err as Error).message}; ${BUILD_HINT}`);
  }
  const version = probe.symbols.bun_ep_abi_version();
  if (version !== ABI_VERSION) {
    probe.close();
    throw new Error(
      `bun-ep native library at ${path} has ABI version ${version} but this package expects ${ABI_VERSION}: ` +
        `rebuild it (${BUILD_HINT})`,
    );
  }
  try {
    return dlopen(path, allSymbols).symbols as NativeSymbols;
  } catch (err) {
    throw new Error(
      `bun-ep native library at ${path} (ABI ${version}) lacks a symbol this package binds: ` +
        `${(err as Error).message}; rebuild it (${BUILD_HINT})`,
    );
  } finally {
    probe.close();
  }
}

/** The bound native functions; loads the library on first call and throws a clear Error if it cannot. */
export function native(): NativeSymbols {
  if (loaded !== null) return loaded;
  if (loadError !== null) throw loadError;
  try {
    loaded = load();
    return loaded;
  } catch (err) {
    loadError = err as Error;
    throw loadError;
  }
}

/** Whether the native library loads, without throwing. */
export function nativeAvailability(): { ok: true } | { ok: false; reason: string } {
  try {
    native();
    return { ok: true };
  } catch (err) {
    return { ok: false, reason: (err as Error).message };
  }
}

export interface Features {
  cuda: boolean;
  nvshmem: boolean;
  intranode: boolean;
  lowLatency: boolean;
  internode: boolean;
  /** The raw BUN_EP_FEATURE_* bits. */
  bits: bigint;
}

/** What the loaded library was built with (BUN_EP_FEATURE_* bits of bun_ep_features()). */
export function features(): Features {
  const bits = BigInt(native().bun_ep_features());
  const has = (bit: number): boolean => (bits & (1n << BigInt(bit))) !== 0n;
  return { cuda: has(0), nvshmem: has(1), intranode: has(2), lowLatency: has(3), internode: has(4), bits };
}
