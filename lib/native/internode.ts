// bun:ffi symbol table for cuda/include/bun_ep_internode.h (merged by lib/ffi.ts, the only dlopen),
// and the field counts of its argument structs (every field 8 bytes: fill a BigInt64Array in header order).
import type { FFIFunction } from "bun:ffi";

const status = "i32" as const;

export const internodeSymbols = {
  bun_ep_internode_constants: { args: ["ptr", "i64"], returns: status },
  bun_ep_internode_handle_bytes: { args: ["i64", "i64", "i64"], returns: "i64" },
  bun_ep_internode_capacities: { args: ["i64", "i64", "i64", "i64", "i64", "i64", "i64", "ptr"], returns: status },
  bun_ep_internode_layout: { args: ["ptr"], returns: status },
  bun_ep_internode_notify: { args: ["ptr"], returns: status },
  bun_ep_internode_dispatch: { args: ["ptr"], returns: status },
  bun_ep_internode_combine: { args: ["ptr"], returns: status },
} as const satisfies Record<string, FFIFunction>;

/** BUN_EP_INTERNODE_MAX_NODES, _MAX_RANKS_PER_NODE, _MAX_CHANNELS, _MAX_LOCAL_EXPERTS, _NVL_CONTROL_BYTES. */
export const INTERNODE_MAX_NODES = 32;
export const INTERNODE_MAX_RANKS_PER_NODE = 8;
export const INTERNODE_MAX_CHANNELS = 128;
export const INTERNODE_MAX_LOCAL_EXPERTS = 1024;
export const INTERNODE_NVL_CONTROL_BYTES = 64 * 1024;

/** Fields of bunEpInternodeComm_t: rank, numRanks, ranksPerNode, nvlBuffer, nvlPeers[8], rdmaBuffer,
 * nvlBytes, rdmaBytes, hostRecord, workspace, timeoutNs, seq, stream. */
export const INTERNODE_COMM_FIELDS = 4 + INTERNODE_MAX_RANKS_PER_NODE + 8;
/** Fields after the comm struct in each argument struct. */
export const INTERNODE_LAYOUT_FIELDS = 13;
export const INTERNODE_NOTIFY_EXTRA_FIELDS = 9;
export const INTERNODE_DISPATCH_EXTRA_FIELDS = 17;
export const INTERNODE_COMBINE_EXTRA_FIELDS = 13;

/** bunEpInternodeCapacities_t field indices. */
export const InternodeCapacity = {
  stagingRows: 0,
  gatherPairs: 1,
  rdmaSendRows: 2,
  rdmaRecvRows: 3,
  combineRecvPairs: 4,
  rdmaControlBytes: 5,
  fields: 6,
} as const;

/** Host-record slots beyond lib/native/normal.ts `Rec` (BUN_EP_INTERNODE_REC_*): largest need, and whose. */
export const InternodeRec = {
  maxGather: 16,
  maxGatherRank: 17,
  maxRdmaSend: 18,
  maxRdmaSendRank: 19,
  maxRdmaRecv: 20,
  maxRdmaRecvRank: 21,
  maxCombineRecv: 22,
  maxCombineRecvRank: 23,
} as const;

/** BUN_EP_INTERNODE_ERR_RDMA: an area of the RDMA buffer is too small (rank, needed, fits). */
export const INTERNODE_ERR_RDMA = 5;
