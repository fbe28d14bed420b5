// bun:ffi symbol table for cuda/include/bun_ep_low_latency.h (merged by lib/ffi.ts, the only dlopen),
// and the field indices of its argument structs (every field 8 bytes: fill them with Int64Fields,
// lib/backend/cuda_common.ts).
import type { FFIFunction } from "bun:ffi";

const status = "i32" as const;

export const lowLatencySymbols = {
  bun_ep_ll_buffer_bytes: { args: ["ptr", "ptr"], returns: status },
  bun_ep_ll_create: { args: ["ptr", "ptr"], returns: status },
  bun_ep_ll_destroy: { args: ["ptr"], returns: status },
  bun_ep_ll_views: { args: ["ptr", "i32", "ptr"], returns: status },
  bun_ep_ll_dispatch: { args: ["ptr", "ptr"], returns: status },
  bun_ep_ll_combine: { args: ["ptr", "ptr"], returns: status },
  bun_ep_ll_set_rank_mask: { args: ["ptr", "ptr"], returns: status },
  bun_ep_ll_clean: { args: ["ptr", "ptr"], returns: status },
  bun_ep_ll_check: { args: ["ptr"], returns: status },
  bun_ep_ll_error_word: { args: ["ptr", "ptr"], returns: status },
} as const satisfies Record<string, FFIFunction>;

/** BUN_EP_LL_TRANSPORT_*. */
export const LL_TRANSPORT = { peerPointers: 0, nvshmem: 1 } as const;
/** BUN_EP_LL_PHASE_* bits. */
export const LL_PHASE = { send: 1, recv: 2 } as const;

/** bunEpLowLatencyConfig_t field indices. */
export const LL_CONFIG = {
  rank: 0,
  numRanks: 1,
  numExperts: 2,
  maxTokensPerRank: 3,
  hidden: 4,
  maxTopk: 5,
  timeoutNs: 6,
  numSMs: 7,
  ranksOnDevice: 8,
  transport: 9,
  localBuffer: 10,
  peerBuffers: 11,
  fields: 12,
} as const;

/** bunEpLowLatencyViews_t field indices. */
export const LL_VIEWS = {
  recvX: 0,
  recvXScales: 1,
  recvCount: 2,
  srcTokenIdx: 3,
  layoutRange: 4,
  combineBuffer: 5,
  combinedX: 6,
  fields: 7,
} as const;

/** bunEpLowLatencyDispatchArgs_t field indices. */
export const LL_DISPATCH = {
  x: 0,
  topkIdx: 1,
  numTokens: 2,
  numTopk: 3,
  parity: 4,
  useFp8: 5,
  roundScale: 6,
  useUe8m0: 7,
  cumulativeRecvStats: 8,
  waitStats: 9,
  phases: 10,
  stream: 11,
  fields: 12,
} as const;

/** bunEpLowLatencyCombineArgs_t field indices. */
export const LL_COMBINE = {
  x: 0,
  topkIdx: 1,
  topkWeights: 2,
  numTokens: 3,
  numTopk: 4,
  parity: 5,
  out: 6,
  phases: 7,
  stream: 8,
  fields: 9,
} as const;
