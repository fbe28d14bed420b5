/* Part of bun_ep.h (included inside its extern "C" block); see the rules there.
 *
 * The runtime: version and features, errors, devices, streams, events, memory, CUDA IPC, peer
 * access, graph capture, and a few debug kernels used by tests and benchmarks.
 * Implemented in cuda/src/runtime.cu; bound in TypeScript by lib/native/runtime.ts.
 *
 * Handles (streams, events, graphs) are opaque `void*`. A stream handle is a cudaStream_t; 0 is the
 * legacy default stream. Functions that end in `_async` are ordered on the stream they are given.
 * Calls that allocate, open IPC handles, enable peer access or create streams/events act on the
 * calling thread's current device (bun_ep_set_device).
 */
#ifndef BUN_EP_RUNTIME_H
#define BUN_EP_RUNTIME_H

/* Bytes of a CUDA IPC memory handle (cudaIpcMemHandle_t). */
#define BUN_EP_IPC_HANDLE_BYTES 64

/* ---- version, features, errors -------------------------------------------------------------- */

/* BUN_EP_ABI_VERSION of the library; lib/ffi.ts refuses a library whose number differs. */
BUN_EP_API int32_t bun_ep_abi_version(void);
/* BUN_EP_FEATURE_* bits built into this library. */
BUN_EP_API uint64_t bun_ep_features(void);
/* Message of the last failure on the calling thread ("" if none). Valid until that thread's next failure. */
BUN_EP_API const char* bun_ep_get_last_error(void);
/* Static name of a status, e.g. "bunEpCudaError". */
BUN_EP_API const char* bun_ep_result_name(bunEpResult_t result);

/* ---- devices -------------------------------------------------------------------------------- */

typedef struct {
  int64_t multiProcessorCount;
  int64_t totalMemoryBytes;
  int64_t freeMemoryBytes; /* at the time of the call */
  int64_t computeCapabilityMajor;
  int64_t computeCapabilityMinor;
  int64_t l2CacheBytes;
  int64_t pciBusId;
  int64_t pciDeviceId;
} bunEpDeviceProps_t;

/* Number of CUDA devices; 0 with bunEpSuccess when the driver sees none. A missing or too old
 * driver gives bunEpCudaError, *count = 0 and the reason in the last error. */
BUN_EP_API bunEpResult_t bun_ep_device_count(int32_t* count);
BUN_EP_API bunEpResult_t bun_ep_set_device(int32_t device);
BUN_EP_API bunEpResult_t bun_ep_get_device(int32_t* device);
/* Properties of `device`; its name (NUL-terminated, truncated to fit) into name[nameCapacity]
 * when name is not NULL. Also makes `device` current. */
BUN_EP_API bunEpResult_t bun_ep_device_props(int32_t device, bunEpDeviceProps_t* props, char* name,
                                             uint64_t nameCapacity);
BUN_EP_API bunEpResult_t bun_ep_device_synchronize(void);

/* ---- streams -------------------------------------------------------------------------------- */

/* Priorities of the current device: numerically lower is higher priority. */
BUN_EP_API bunEpResult_t bun_ep_stream_priority_range(int32_t* least, int32_t* greatest);
/* A non-blocking stream (no implicit sync with the legacy default stream) on the current device.
 * priority is clamped to the device's range. */
BUN_EP_API bunEpResult_t bun_ep_stream_create(int32_t priority, void** stream);
BUN_EP_API bunEpResult_t bun_ep_stream_destroy(void* stream);
BUN_EP_API bunEpResult_t bun_ep_stream_synchronize(void* stream);
/* bunEpSuccess when all work on the stream is done, bunEpNotReady when some is still in flight. */
BUN_EP_API bunEpResult_t bun_ep_stream_query(void* stream);

/* ---- events --------------------------------------------------------------------------------- */

/* enableTiming = 0 makes a cheaper event that bun_ep_event_elapsed_ms cannot use. */
BUN_EP_API bunEpResult_t bun_ep_event_create(int32_t enableTiming, void** event);
BUN_EP_API bunEpResult_t bun_ep_event_destroy(void* event);
BUN_EP_API bunEpResult_t bun_ep_event_record(void* event, void* stream);
/* Work submitted to `stream` later waits for `event`'s last record. */
BUN_EP_API bunEpResult_t bun_ep_stream_wait_event(void* stream, void* event);
/* bunEpSuccess when the event's work is done, bunEpNotReady when not yet. */
BUN_EP_API bunEpResult_t bun_ep_event_query(void* event);
BUN_EP_API bunEpResult_t bun_ep_event_synchronize(void* event);
/* Milliseconds between two completed timing events. */
BUN_EP_API bunEpResult_t bun_ep_event_elapsed_ms(void* start, void* end, double* ms);

/* ---- memory --------------------------------------------------------------------------------- */

/* Stream-ordered allocation on the stream's device (its default pool keeps freed memory for reuse).
 * Not exportable through CUDA IPC: use bun_ep_malloc for buffers that peers open. bytes may be 0
 * (*ptr = NULL). */
BUN_EP_API bunEpResult_t bun_ep_malloc_async(void** ptr, uint64_t bytes, void* stream);
BUN_EP_API bunEpResult_t bun_ep_free_async(void* ptr, void* stream);
/* cudaMalloc on the current device (IPC-exportable); bun_ep_free releases it (synchronizing). */
BUN_EP_API bunEpResult_t bun_ep_malloc(void** ptr, uint64_t bytes);
BUN_EP_API bunEpResult_t bun_ep_free(void* ptr);
/* Set `bytes` bytes at ptr to the low byte of value. */
BUN_EP_API bunEpResult_t bun_ep_memset_async(void* ptr, int32_t value, uint64_t bytes, void* stream);
/* Copy between any two of device, pinned and pageable memory (cudaMemcpyDefault). */
BUN_EP_API bunEpResult_t bun_ep_memcpy_async(void* dst, const void* src, uint64_t bytes, void* stream);
/* Synchronous copy: returns once the bytes have arrived. */
BUN_EP_API bunEpResult_t bun_ep_memcpy(void* dst, const void* src, uint64_t bytes);
/* Mapped, portable pinned host memory: *hostPtr for the CPU, *devicePtr for kernels of any device. */
BUN_EP_API bunEpResult_t bun_ep_host_alloc_mapped(void** hostPtr, void** devicePtr, uint64_t bytes);
BUN_EP_API bunEpResult_t bun_ep_host_free(void* hostPtr);

/* ---- CUDA IPC and peer access ----------------------------------------------------------------- */

/* Write the IPC handle of a bun_ep_malloc'd pointer into handle[BUN_EP_IPC_HANDLE_BYTES]. */
BUN_EP_API bunEpResult_t bun_ep_ipc_get_handle(void* devicePtr, uint8_t* handle);
/* Open another process's handle on the current device (peer access enabled lazily by CUDA). */
BUN_EP_API bunEpResult_t bun_ep_ipc_open_handle(const uint8_t* handle, void** devicePtr);
BUN_EP_API bunEpResult_t bun_ep_ipc_close_handle(void* devicePtr);
/* *canAccess = 1 when kernels on `device` can read `peerDevice` memory directly. */
BUN_EP_API bunEpResult_t bun_ep_can_access_peer(int32_t device, int32_t peerDevice, int32_t* canAccess);
/* Let kernels on the current device access `peerDevice`'s memory; already enabled is success. */
BUN_EP_API bunEpResult_t bun_ep_enable_peer_access(int32_t peerDevice);

/* ---- graphs --------------------------------------------------------------------------------- */

/* Start capturing `stream` (relaxed mode: other threads' CUDA calls are not disturbed). */
BUN_EP_API bunEpResult_t bun_ep_stream_begin_capture(void* stream);
/* Stop capturing and instantiate: *graphExec replays the captured work. */
BUN_EP_API bunEpResult_t bun_ep_stream_end_capture(void* stream, void** graphExec);
BUN_EP_API bunEpResult_t bun_ep_graph_launch(void* graphExec, void* stream);
BUN_EP_API bunEpResult_t bun_ep_graph_destroy(void* graphExec);

/* ---- debug kernels (tests and benchmarks) -------------------------------------------------- */

/* ptr[i] = start + i for i < count (ptr: device, mapped pinned or peer memory). */
BUN_EP_API bunEpResult_t bun_ep_debug_write_sequence(int32_t* ptr, int64_t count, int32_t start, void* stream);
/* *counter += 1 by one thread (graph replay tests). */
BUN_EP_API bunEpResult_t bun_ep_debug_increment(int32_t* counter, void* stream);
/* Copy with a kernel (16-byte vectors when both pointers and bytes allow): peer pointers, copy
 * ceilings. numBlocks = 0 picks 4 blocks per SM. */
BUN_EP_API bunEpResult_t bun_ep_debug_copy_bytes(void* dst, const void* src, uint64_t bytes, int32_t numBlocks,
                                                 void* stream);
/* One block of one thread that does nothing. */
BUN_EP_API bunEpResult_t bun_ep_debug_empty_kernel(void* stream);
/* One thread that spins for `ns` nanoseconds of the GPU's global timer. */
BUN_EP_API bunEpResult_t bun_ep_debug_spin(uint64_t ns, void* stream);
/* Launch the empty kernel `count` times from C on `stream` (after one warm-up launch), synchronize,
 * and write the host nanoseconds per launch call (launch loop only, not the sync). */
BUN_EP_API bunEpResult_t bun_ep_debug_time_launches(int32_t count, void* stream, double* nsPerLaunch);

#endif /* BUN_EP_RUNTIME_H */
