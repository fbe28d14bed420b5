// bun:ffi symbol table for cuda/include/bun_ep_normal.h (merged by lib/ffi.ts, the only dlopen).
// Argument structs are BigInt64Arrays filled by lib/backend/cuda.ts (8-byte fields, header order).
import type { FFIFunction } from "bun:ffi";

const status = "i32" as const;

export const normalSymbols = {
  bun_ep_normal_constants: { args: ["ptr", "i64"], returns: status },
  bun_ep_normal_handle_bytes: { args: ["i64", "i64"], returns: "i64" },
  bun_ep_normal_staging_rows: { args: ["i64", "i64", "i64", "i64", "i64", "i64"], returns: "i64" },
  bun_ep_normal_layout: { args: ["ptr"], returns: status },
  /** (args: `count` structs back to back, count): one launch for the ranks of this process on this device. */
  bun_ep_normal_notify: { args: ["ptr", "i64"], returns: status },
  /** (args: `count` structs back to back, count): one launch for the ranks of this process on this device. */
  bun_ep_normal_dispatch: { args: ["ptr", "i64"], returns: status },
  /** (args: `count` structs back to back, count): one launch for the ranks of this process on this device. */
  bun_ep_normal_combine: { args: ["ptr", "i64"], returns: status },
} as const satisfies Record<string, FFIFunction>;

/** BUN_EP_NORMAL_MAX_RANKS: peer pointer fields in bunEpNormalComm_t. */
export const NORMAL_MAX_RANKS = 8;
/** BUN_EP_NORMAL_MAX_CHANNELS: the most SMs (blocks) a normal kernel may use. */
export const NORMAL_MAX_CHANNELS = 160;
/** BUN_EP_NORMAL_CONTROL_BYTES at the start of every registered buffer. */
export const NORMAL_CONTROL_BYTES = 256 * 1024;
export const NORMAL_HOST_RECORD_BYTES = 8192;
export const NORMAL_WORKSPACE_BYTES = 256;

/** Int32 slots of the host record (BUN_EP_REC_*). */
export const Rec = {
  notifySeq: 0,
  numRecv: 1,
  maxRecv: 2,
  maxRecvRank: 3,
  errorCode: 8,
  errorRank: 9,
  errorA: 10,
  errorB: 11,
  errorSeq: 12,
  errorStep: 13,
  expertCounts: 32,
} as const;

/** BUN_EP_NORMAL_ERR_*. */
export const NormalError = { timeout: 1, badTopk: 2, worstOverflow: 3, staging: 4 } as const;
/** BUN_EP_NORMAL_STEP_*, by code. */
export const NORMAL_STEP_NAMES: Readonly<Record<number, string>> = { 1: "layout", 2: "notify", 3: "dispatch", 4: "combine" };
