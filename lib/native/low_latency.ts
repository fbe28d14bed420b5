// bun:ffi symbol table for cuda/include/bun_ep_low_latency.h (merged by lib/ffi.ts, the only dlopen).
import type { FFIFunction } from "bun:ffi";

export const lowLatencySymbols = {} as const satisfies Record<string, FFIFunction>;
