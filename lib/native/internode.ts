// bun:ffi symbol table for cuda/include/bun_ep_internode.h (merged by lib/ffi.ts, the only dlopen).
import type { FFIFunction } from "bun:ffi";

export const internodeSymbols = {} as const satisfies Record<string, FFIFunction>;
