// bun:ffi symbol table for cuda/include/bun_ep_nvshmem.h (merged by lib/ffi.ts, the only dlopen),
// and the field indices of its argument struct (every field 8 bytes: fill a BigInt64Array).
import type { FFIFunction } from "bun:ffi";

const status = "i32" as const;

export const nvshmemSymbols = {
  bun_ep_nvshmem_get_unique_id: { args: ["ptr"], returns: status },
  bun_ep_nvshmem_init: { args: ["ptr", "ptr"], returns: status },
  bun_ep_nvshmem_finalize: { args: ["ptr"], returns: status },
  bun_ep_nvshmem_info: { args: ["ptr", "ptr"], returns: status },
  bun_ep_nvshmem_malloc: { args: ["u64", "ptr"], returns: status },
  bun_ep_nvshmem_free: { args: ["ptr"], returns: status },
  bun_ep_nvshmem_ptr: { args: ["ptr", "i64", "ptr"], returns: status },
  bun_ep_nvshmem_barrier_all: { args: ["ptr"], returns: status },
} as const satisfies Record<string, FFIFunction>;

/** BUN_EP_NVSHMEM_UNIQUE_ID_BYTES. */
export const NVSHMEM_UNIQUE_ID_BYTES = 128;

/** bunEpNvshmemInitArgs_t field indices. */
export const NVSHMEM_INIT = {
  uniqueId: 0,
  rank: 1,
  numRanks: 2,
  device: 3,
  heapBytes: 4,
  fields: 5,
} as const;
