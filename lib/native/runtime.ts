// bun:ffi symbol table for cuda/include/bun_ep_runtime.h (merged by lib/ffi.ts, the only dlopen).
// Every bunEpResult_t is "i32"; handles and pointers are "ptr" (numbers in TS); sizes are "u64".
import type { FFIFunction } from "bun:ffi";

const status = "i32" as const;

export const runtimeSymbols = {
  bun_ep_abi_version: { args: [], returns: "i32" },
  bun_ep_features: { args: [], returns: "u64" },
  bun_ep_get_last_error: { args: [], returns: "cstring" },
  bun_ep_result_name: { args: ["i32"], returns: "cstring" },

  bun_ep_device_count: { args: ["ptr"], returns: status },
  bun_ep_set_device: { args: ["i32"], returns: status },
  bun_ep_get_device: { args: ["ptr"], returns: status },
  bun_ep_device_props: { args: ["i32", "ptr", "ptr", "u64"], returns: status },
  bun_ep_device_synchronize: { args: [], returns: status },

  bun_ep_stream_priority_range: { args: ["ptr", "ptr"], returns: status },
  bun_ep_stream_create: { args: ["i32", "ptr"], returns: status },
  bun_ep_stream_destroy: { args: ["ptr"], returns: status },
  bun_ep_stream_synchronize: { args: ["ptr"], returns: status },
  bun_ep_stream_query: { args: ["ptr"], returns: status },

  bun_ep_event_create: { args: ["i32", "ptr"], returns: status },
  bun_ep_event_destroy: { args: ["ptr"], returns: status },
  bun_ep_event_record: { args: ["ptr", "ptr"], returns: status },
  bun_ep_stream_wait_event: { args: ["ptr", "ptr"], returns: status },
  bun_ep_event_query: { args: ["ptr"], returns: status },
  bun_ep_event_synchronize: { args: ["ptr"], returns: status },
  bun_ep_event_elapsed_ms: { args: ["ptr", "ptr", "ptr"], returns: status },

  bun_ep_malloc_async: { args: ["ptr", "u64", "ptr"], returns: status },
  bun_ep_free_async: { args: ["ptr", "ptr"], returns: status },
  bun_ep_malloc: { args: ["ptr", "u64"], returns: status },
  bun_ep_free: { args: ["ptr"], returns: status },
  bun_ep_memset_async: { args: ["ptr", "i32", "u64", "ptr"], returns: status },
  bun_ep_memcpy_async: { args: ["ptr", "ptr", "u64", "ptr"], returns: status },
  bun_ep_memcpy: { args: ["ptr", "ptr", "u64"], returns: status },
  bun_ep_host_alloc_mapped: { args: ["ptr", "ptr", "u64"], returns: status },
  bun_ep_host_free: { args: ["ptr"], returns: status },

  bun_ep_ipc_get_handle: { args: ["ptr", "ptr"], returns: status },
  bun_ep_ipc_open_handle: { args: ["ptr", "ptr"], returns: status },
  bun_ep_ipc_close_handle: { args: ["ptr"], returns: status },
  bun_ep_can_access_peer: { args: ["i32", "i32", "ptr"], returns: status },
  bun_ep_enable_peer_access: { args: ["i32"], returns: status },

  bun_ep_stream_begin_capture: { args: ["ptr"], returns: status },
  bun_ep_stream_end_capture: { args: ["ptr", "ptr"], returns: status },
  bun_ep_graph_launch: { args: ["ptr", "ptr"], returns: status },
  bun_ep_graph_destroy: { args: ["ptr"], returns: status },

  bun_ep_debug_write_sequence: { args: ["ptr", "i64", "i32", "ptr"], returns: status },
  bun_ep_debug_increment: { args: ["ptr", "ptr"], returns: status },
  bun_ep_debug_copy_bytes: { args: ["ptr", "ptr", "u64", "i32", "ptr"], returns: status },
  bun_ep_debug_empty_kernel: { args: ["ptr"], returns: status },
  bun_ep_debug_spin: { args: ["u64", "ptr"], returns: status },
  bun_ep_debug_time_launches: { args: ["i32", "ptr", "ptr"], returns: status },
} as const satisfies Record<string, FFIFunction>;

/** Byte size of bunEpDeviceProps_t (8 int64 fields). */
export const DEVICE_PROPS_BYTES = 64;
/** BUN_EP_IPC_HANDLE_BYTES. */
export const IPC_HANDLE_BYTES = 64;
