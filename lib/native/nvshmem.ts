// bun:ffi symbol table for cuda/include/bun_ep_nvshmem.h (merged by lib/ffi.ts, the only dlopen).
import type { FFIFunction } from "bun:ffi";

export const nvshmemSymbols = {} as const satisfies Record<string, FFIFunction>;
