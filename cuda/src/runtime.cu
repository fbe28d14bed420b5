// The runtime part of the C ABI (cuda/include/bun_ep_runtime.h): errors, devices, streams, events,
// memory, IPC, peer access, graphs, and the debug kernels of tests and benchmarks.
// Every function returns a status and records a message naming what failed (bun_ep_get_last_error).

#include <chrono>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>

#include "common.cuh"
#include "ptx.cuh"

#ifndef BUN_EP_WITH_NVSHMEM
#define BUN_EP_WITH_NVSHMEM 0
#endif

namespace bun_ep {

namespace {

thread_local std::string last_error_message;

uint64_t& registered_feature_bits() {
  static uint64_t bits = 0;  // function-local: safe from static-initialisation order across files
  return bits;
}

bunEpResult_t result_of_cuda(cudaError_t err) {
  switch (err) {
    case cudaErrorMemoryAllocation:
      return bunEpOutOfMemory;
    case cudaErrorNotReady:
      return bunEpNotReady;
    case cudaErrorInvalidValue:
    case cudaErrorInvalidDevice:
    case cudaErrorInvalidDevicePointer:
    case cudaErrorInvalidResourceHandle:
      return bunEpInvalidArgument;
    default:
      return bunEpCudaError;
  }
}

constexpr int kMaxDevices = 64;

// SM count per device, read once: the debug copy kernel sizes its grid with it on every launch.
int sm_count_of(int device) {
  static int cached[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) return 0;
  if (cached[device] == 0) {
    int count = 0;
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) == cudaSuccess) cached[device] = count;
    else (void)cudaGetLastError();
  }
  return cached[device];
}

// The default pool returns freed memory to the OS at every synchronization unless told to keep
// it; keeping it makes stream-ordered allocation as cheap as a caching allocator.
bunEpResult_t keep_pool_memory(int device) {
  static std::mutex mutex;
  static bool done[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) return bunEpSuccess;
  std::lock_guard<std::mutex> lock(mutex);
  if (done[device]) return bunEpSuccess;
  cudaMemPool_t pool;
  BUN_EP_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device));
  uint64_t threshold = UINT64_MAX;
  BUN_EP_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  done[device] = true;
  return bunEpSuccess;
}

bunEpResult_t device_of_stream(cudaStream_t stream, int* device) {
#if CUDART_VERSION >= 12080
  BUN_EP_CUDA_CHECK(cudaStreamGetDevice(stream, device));
#else
  (void)stream;
  BUN_EP_CUDA_CHECK(cudaGetDevice(device));
#endif
  return bunEpSuccess;
}

cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }
cudaEvent_t as_event(void* event) { return static_cast<cudaEvent_t>(event); }

}  // namespace

bunEpResult_t set_error(bunEpResult_t code, const char* fmt, ...) {
  char buffer[1024];
  va_list args;
  va_start(args, fmt);
  vsnprintf(buffer, sizeof(buffer), fmt, args);
  va_end(args);
  last_error_message = buffer;
  return code;
}

bunEpResult_t cuda_error(cudaError_t err, const char* expr, const char* file, int line) {
  // Clear a non-sticky error so that the next launch check does not report it again.
  (void)cudaGetLastError();
  const char* base = strrchr(file, '/');
  return set_error(result_of_cuda(err), "%s: %s (%s) at %s:%d", expr, cudaGetErrorName(err), cudaGetErrorString(err),
                   base ? base + 1 : file, line);
}

FeatureRegistration::FeatureRegistration(uint64_t featureBit) { registered_feature_bits() |= featureBit; }

DeviceScope::DeviceScope(int device) {
  int current = -1;
  if (device < 0 || cudaGetDevice(&current) != cudaSuccess) {
    (void)cudaGetLastError();
    return;
  }
  if (current == device) return;
  if (cudaSetDevice(device) == cudaSuccess) previous_ = current;
  else (void)cudaGetLastError();
}

DeviceScope DeviceScope::of_stream(void* stream) {
  if (stream == nullptr) return DeviceScope();
  int device = -1;
  // A stream under graph capture keeps its device; and asking it (cudaStreamGetDevice) is not
  // allowed during capture: it would invalidate the capture (seen on 2 GPUs).
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(static_cast<cudaStream_t>(stream), &capture) != cudaSuccess) {
    (void)cudaGetLastError();
    return DeviceScope();
  }
  if (capture != cudaStreamCaptureStatusNone) return DeviceScope();
#if CUDART_VERSION >= 12080
  if (cudaStreamGetDevice(static_cast<cudaStream_t>(stream), &device) != cudaSuccess) {
    (void)cudaGetLastError();
    return DeviceScope();
  }
#endif
  return DeviceScope(device);
}

DeviceScope::~DeviceScope() {
  if (previous_ >= 0) (void)cudaSetDevice(previous_);
}

// ---- debug kernels ------------------------------------------------------------------------------

namespace {

__global__ void write_sequence_kernel(int32_t* ptr, int64_t count, int32_t start) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    ptr[i] = start + static_cast<int32_t>(i);
  }
}

__global__ void increment_kernel(int32_t* counter) { *counter += 1; }

__global__ void empty_kernel() {}

__global__ void spin_kernel(uint64_t ns) {
  const uint64_t start = globaltimer_ns();
  while (globaltimer_ns() - start < ns) {
  }
}

constexpr int kCopyUnroll = 4;

// 16-byte vectors, kCopyUnroll loads in flight per thread before the stores.
__global__ void copy_int4_kernel(int4* dst, const int4* src, uint64_t count) {
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  uint64_t i = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x;
  for (; i + (kCopyUnroll - 1) * stride < count; i += kCopyUnroll * stride) {
    int4 v[kCopyUnroll];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) v[u] = ld_nc_int4(src + i + u * stride);
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) st_na_int4(dst + i + u * stride, v[u]);
  }
  for (; i < count; i += stride) st_na_int4(dst + i, ld_nc_int4(src + i));
}

__global__ void copy_bytes_kernel(uint8_t* dst, const uint8_t* src, uint64_t bytes) {
  for (uint64_t i = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; i < bytes;
       i += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    dst[i] = src[i];
  }
}

}  // namespace
}  // namespace bun_ep

using namespace bun_ep;

// ---- version, features, errors --------------------------------------------------------------------

extern "C" {

int32_t bun_ep_abi_version(void) { return BUN_EP_ABI_VERSION; }

uint64_t bun_ep_features(void) {
  uint64_t bits = BUN_EP_FEATURE_CUDA | registered_feature_bits();
#if BUN_EP_WITH_NVSHMEM
  bits |= BUN_EP_FEATURE_NVSHMEM;
#endif
  return bits;
}

const char* bun_ep_get_last_error(void) { return last_error_message.c_str(); }

const char* bun_ep_result_name(bunEpResult_t result) {
  switch (result) {
    case bunEpSuccess: return "bunEpSuccess";
    case bunEpInvalidArgument: return "bunEpInvalidArgument";
    case bunEpCudaError: return "bunEpCudaError";
    case bunEpTimeout: return "bunEpTimeout";
    case bunEpNotSupported: return "bunEpNotSupported";
    case bunEpOutOfMemory: return "bunEpOutOfMemory";
    case bunEpInternalError: return "bunEpInternalError";
    case bunEpNvshmemError: return "bunEpNvshmemError";
    case bunEpNotReady: return "bunEpNotReady";
    case bunEpUnusable: return "bunEpUnusable";
  }
  return "bunEpUnknownResult";
}

// ---- devices --------------------------------------------------------------------------------------

bunEpResult_t bun_ep_device_count(int32_t* count) {
  BUN_EP_REQUIRE(count != nullptr, "bun_ep_device_count: count must not be NULL");
  *count = 0;
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err == cudaErrorNoDevice) {
    (void)cudaGetLastError();
    return bunEpSuccess;
  }
  if (err != cudaSuccess) return cuda_error(err, "cudaGetDeviceCount", __FILE__, __LINE__);
  *count = n;
  return bunEpSuccess;
}

static bunEpResult_t require_device(int32_t device, const char* what) {
  int n = 0;
  BUN_EP_CUDA_CHECK(cudaGetDeviceCount(&n));
  BUN_EP_REQUIRE(device >= 0 && device < n, "%s: device must be in [0, %d), got %d", what, n, device);
  return bunEpSuccess;
}

bunEpResult_t bun_ep_set_device(int32_t device) {
  cudaError_t err = cudaSetDevice(device);
  if (err == cudaErrorInvalidDevice) {
    // Prefer the message that names the valid range; clear the non-sticky error first so the
    // next launch check does not report it again.
    (void)cudaGetLastError();
    BUN_EP_TRY(require_device(device, "bun_ep_set_device"));
  }
  if (err != cudaSuccess) return cuda_error(err, "cudaSetDevice", __FILE__, __LINE__);
  return bunEpSuccess;
}

bunEpResult_t bun_ep_get_device(int32_t* device) {
  BUN_EP_REQUIRE(device != nullptr, "bun_ep_get_device: device must not be NULL");
  int d = 0;
  BUN_EP_CUDA_CHECK(cudaGetDevice(&d));
  *device = d;
  return bunEpSuccess;
}

bunEpResult_t bun_ep_device_props(int32_t device, bunEpDeviceProps_t* props, char* name, uint64_t nameCapacity) {
  BUN_EP_REQUIRE(props != nullptr, "bun_ep_device_props: props must not be NULL");
  BUN_EP_TRY(require_device(device, "bun_ep_device_props"));
  BUN_EP_CUDA_CHECK(cudaSetDevice(device));
  cudaDeviceProp p;
  BUN_EP_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  size_t freeBytes = 0, totalBytes = 0;
  BUN_EP_CUDA_CHECK(cudaMemGetInfo(&freeBytes, &totalBytes));
  props->multiProcessorCount = p.multiProcessorCount;
  props->totalMemoryBytes = static_cast<int64_t>(totalBytes);
  props->freeMemoryBytes = static_cast<int64_t>(freeBytes);
  props->computeCapabilityMajor = p.major;
  props->computeCapabilityMinor = p.minor;
  props->l2CacheBytes = p.l2CacheSize;
  props->pciBusId = p.pciBusID;
  props->pciDeviceId = p.pciDeviceID;
  if (name != nullptr && nameCapacity > 0) {
    snprintf(name, nameCapacity, "%s", p.name);
  }
  return bunEpSuccess;
}

bunEpResult_t bun_ep_device_synchronize(void) {
  BUN_EP_CUDA_CHECK(cudaDeviceSynchronize());
  return bunEpSuccess;
}

// ---- streams --------------------------------------------------------------------------------------

bunEpResult_t bun_ep_stream_priority_range(int32_t* least, int32_t* greatest) {
  BUN_EP_REQUIRE(least != nullptr && greatest != nullptr, "bun_ep_stream_priority_range: outputs must not be NULL");
  int l = 0, g = 0;
  BUN_EP_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&l, &g));
  *least = l;
  *greatest = g;
  return bunEpSuccess;
}

bunEpResult_t bun_ep_stream_create(int32_t priority, void** stream) {
  BUN_EP_REQUIRE(stream != nullptr, "bun_ep_stream_create: stream must not be NULL");
  int least = 0, greatest = 0;
  BUN_EP_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  // Lower numbers are higher priority: clamp into [greatest, least].
  int clamped = priority < greatest ? greatest : (priority > least ? least : priority);
  cudaStream_t s = nullptr;
  BUN_EP_CUDA_CHECK(cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, clamped));
  *stream = s;
  return bunEpSuccess;
}

bunEpResult_t bun_ep_stream_destroy(void* stream) {
  BUN_EP_REQUIRE(stream != nullptr, "bun_ep_stream_destroy: the legacy default stream (0) cannot be destroyed");
  BUN_EP_CUDA_CHECK(cudaStreamDestroy(as_stream(stream)));
  return bunEpSuccess;
}

bunEpResult_t bun_ep_stream_synchronize(void* stream) {
  const DeviceScope device_scope = DeviceScope::of_stream(stream);
  BUN_EP_CUDA_CHECK(cudaStreamSynchronize(as_stream(stream)));
  return bunEpSuccess;
}

bunEpResult_t bun_ep_stream_query(void* stream) {
  cudaError_t err = cudaStreamQuery(as_stream(stream));
  if (err == cudaErrorNotReady) return bunEpNotReady;
  if (err != cudaSuccess) return cuda_error(err, "cudaStreamQuery", __FILE__, __LINE__);
  return bunEpSuccess;
}

// ---- events ---------------------------------------------------------------------------------------

bunEpResult_t bun_ep_event_create(int32_t enableTiming, void** event) {
  BUN_EP_REQUIRE(event != nullptr, "bun_ep_event_create: event must not be NULL");
  cudaEvent_t e = nullptr;
  BUN_EP_CUDA_CHECK(cudaEventCreateWithFlags(&e, enableTiming ? cudaEventDefault : cudaEventDisableTiming));
  *event = e;
  return bunEpSuccess;
}

bunEpResult_t bun_ep_event_destroy(void* event) {
  BUN_EP_REQUIRE(event != nullptr, "bun_ep_event_destroy: event must not be NULL");
  BUN_EP_CUDA_CHECK(cudaEventDestroy(as_event(event)));
  return bunEpSuccess;
}

bunEpResult_t bun_ep_event_record(void* event, void* stream) {
  const DeviceScope device_scope = DeviceScope::of_stream(stream);
  BUN_EP_REQUIRE(event != nullptr, "bun_ep_event_record: event must not be NULL");
  BUN_EP_CUDA_CHECK(cudaEventRecord(as_event(event), as_stream(stream)));
  return bunEpSuccess;
}

bunEpResult_t bun_ep_stream_wait_event(void* stream, void* event) {
  const DeviceScope device_scope = DeviceScope::of_stream(stream);
  BUN_EP_REQUIRE(event != nullptr, "bun_ep_stream_wait_event: event must not be NULL");
  BUN_EP_CUDA_CHECK(cudaStreamWaitEvent(as_stream(stream), as_event(event), 0));
  return bunEpSuccess;
}

bunEpResult_t bun_ep_event_query(void* event) {
  BUN_EP_REQUIRE(event != nullptr, "bun_ep_event_query: event must not be NULL");
  cudaError_t err = cudaEventQuery(as_event(event));
  if (err == cudaErrorNotReady) return bunEpNotReady;
  if (err != cudaSuccess) return cuda_error(err, "cudaEventQuery", __FILE__, __LINE__);
  return bunEpSuccess;
}

bunEpResult_t bun_ep_event_synchronize(void* event) {
  BUN_EP_REQUIRE(event != nullptr, "bun_ep_event_synchronize: event must not be NULL");
  BUN_EP_CUDA_CHECK(cudaEventSynchronize(as_event(event)));
  return bunEpSuccess;
}

bunEpResult_t bun_ep_event_elapsed_ms(void* start, void* end, double* ms) {
  BUN_EP_REQUIRE(start != nullptr && end != nullptr && ms != nullptr,
                 "bun_ep_event_elapsed_ms: start, end and ms must not be NULL");
  float elapsed = 0.0f;
  BUN_EP_CUDA_CHECK(cudaEventElapsedTime(&elapsed, as_event(start), as_event(end)));
  *ms = elapsed;
  return bunEpSuccess;
}

// ---- memory ---------------------------------------------------------------------------------------

bunEpResult_t bun_ep_malloc_async(void** ptr, uint64_t bytes, void* stream) {
  const DeviceScope device_scope = DeviceScope::of_stream(stream);
  BUN_EP_REQUIRE(ptr != nullptr, "bun_ep_malloc_async: ptr must not be NULL");
  *ptr = nullptr;
  if (bytes == 0) return bunEpSuccess;
  int device = 0;
  BUN_EP_TRY(device_of_stream(as_stream(stream), &device));
  BUN_EP_TRY(keep_pool_memory(device));
  cudaError_t err = cudaMallocAsync(ptr, bytes, as_stream(stream));
  if (err == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();
    return set_error(bunEpOutOfMemory, "bun_ep_malloc_async: out of device memory allocating %llu bytes on device %d",
                     static_cast<unsigned long long>(bytes), device);
  }
  if (err != cudaSuccess) return cuda_error(err, "cudaMallocAsync", __FILE__, __LINE__);
  return bunEpSuccess;
}

bunEpResult_t bun_ep_free_async(void* ptr, void* stream) {
  const DeviceScope device_scope = DeviceScope::of_stream(stream);
  if (ptr == nullptr) return bunEpSuccess;
  BUN_EP_CUDA_CHECK(cudaFreeAsync(ptr, as_stream(stream)));
  return bunEpSuccess;
}

bunEpResult_t bun_ep_malloc(void** ptr, uint64_t bytes) {
  BUN_EP_REQUIRE(ptr != nullptr, "bun_ep_malloc: ptr must not be NULL");
  *ptr = nullptr;
  if (bytes == 0) return bunEpSuccess;
  cudaError_t err = cudaMalloc(ptr, bytes);
  if (err == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();
    int device = -1;
    (void)cudaGetDevice(&device);
    return set_error(bunEpOutOfMemory, "bun_ep_malloc: out of device memory allocating %llu bytes on device %d",
                     static_cast<unsigned long long>(bytes), device);
  }
  if (err != cudaSuccess) return cuda_error(err, "cudaMalloc", __FILE__, __LINE__);
  return bunEpSuccess;
}

bunEpResult_t bun_ep_free(void* ptr) {
  if (ptr == nullptr) return bunEpSuccess;
  BUN_EP_CUDA_CHECK(cudaFree(ptr));
  return bunEpSuccess;
}

bunEpResult_t bun_ep_memset_async(void* ptr, int32_t value, uint64_t bytes, void* stream) {
  const DeviceScope device_scope = DeviceScope::of_stream(stream);
  if (bytes == 0) return bunEpSuccess;
  BUN_EP_REQUIRE(ptr != nullptr, "bun_ep_memset_async: ptr is NULL for %llu bytes", static_cast<unsigned long long>(bytes));
  BUN_EP_CUDA_CHECK(cudaMemsetAsync(ptr, value, bytes, as_stream(stream)));
  return bunEpSuccess;
}

bunEpResult_t bun_ep_memcpy_async(void* dst, const void* src, uint64_t bytes, void* stream) {
  const DeviceScope device_scope = DeviceScope::of_stream(stream);
  if (bytes == 0) return bunEpSuccess;
  BUN_EP_REQUIRE(dst != nullptr && src != nullptr, "bun_ep_memcpy_async: dst and src must not be NULL (%llu bytes)",
                 static_cast<unsigned long long>(bytes));
  BUN_EP_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, as_stream(stream)));
  return bunEpSuccess;
}

bunEpResult_t bun_ep_memcpy(void* dst, const void* src, uint64_t bytes) {
  if (bytes == 0) return bunEpSuccess;
  BUN_EP_REQUIRE(dst != nullptr && src != nullptr, "bun_ep_memcpy: dst and src must not be NULL (%llu bytes)",
                 static_cast<unsigned long long>(bytes));
  BUN_EP_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault));
  return bunEpSuccess;
}

bunEpResult_t bun_ep_host_alloc_mapped(void** hostPtr, void** devicePtr, uint64_t bytes) {
  BUN_EP_REQUIRE(hostPtr != nullptr && devicePtr != nullptr,
                 "bun_ep_host_alloc_mapped: hostPtr and devicePtr must not be NULL");
  BUN_EP_REQUIRE(bytes > 0, "bun_ep_host_alloc_mapped: bytes must be > 0, got 0");
  *hostPtr = nullptr;
  *devicePtr = nullptr;
  void* host = nullptr;
  BUN_EP_CUDA_CHECK(cudaHostAlloc(&host, bytes, cudaHostAllocMapped | cudaHostAllocPortable));
  void* device = nullptr;
  cudaError_t err = cudaHostGetDevicePointer(&device, host, 0);
  if (err != cudaSuccess) {
    cudaFreeHost(host);
    if (err != cudaSuccess) return cuda_error(err, "cudaHostGetDevicePointer", __FILE__, __LINE__);
  }
  *hostPtr = host;
  *devicePtr = device;
  return bunEpSuccess;
}

bunEpResult_t bun_ep_host_free(void* hostPtr) {
  if (hostPtr == nullptr) return bunEpSuccess;
  BUN_EP_CUDA_CHECK(cudaFreeHost(hostPtr));
  return bunEpSuccess;
}

// ---- CUDA IPC and peer access -----------------------------------------------------------------------

static_assert(sizeof(cudaIpcMemHandle_t) == BUN_EP_IPC_HANDLE_BYTES, "BUN_EP_IPC_HANDLE_BYTES must match CUDA");

bunEpResult_t bun_ep_ipc_get_handle(void* devicePtr, uint8_t* handle) {
  BUN_EP_REQUIRE(devicePtr != nullptr && handle != nullptr, "bun_ep_ipc_get_handle: devicePtr and handle must not be NULL");
  cudaIpcMemHandle_t h;
  BUN_EP_CUDA_CHECK(cudaIpcGetMemHandle(&h, devicePtr));
  memcpy(handle, &h, sizeof(h));
  return bunEpSuccess;
}

bunEpResult_t bun_ep_ipc_open_handle(const uint8_t* handle, void** devicePtr) {
  BUN_EP_REQUIRE(devicePtr != nullptr && handle != nullptr, "bun_ep_ipc_open_handle: handle and devicePtr must not be NULL");
  *devicePtr = nullptr;
  cudaIpcMemHandle_t h;
  memcpy(&h, handle, sizeof(h));
  BUN_EP_CUDA_CHECK(cudaIpcOpenMemHandle(devicePtr, h, cudaIpcMemLazyEnablePeerAccess));
  return bunEpSuccess;
}

bunEpResult_t bun_ep_ipc_close_handle(void* devicePtr) {
  if (devicePtr == nullptr) return bunEpSuccess;
  BUN_EP_CUDA_CHECK(cudaIpcCloseMemHandle(devicePtr));
  return bunEpSuccess;
}

bunEpResult_t bun_ep_can_access_peer(int32_t device, int32_t peerDevice, int32_t* canAccess) {
  BUN_EP_REQUIRE(canAccess != nullptr, "bun_ep_can_access_peer: canAccess must not be NULL");
  if (device == peerDevice) {
    *canAccess = 1;
    return bunEpSuccess;
  }
  int can = 0;
  BUN_EP_CUDA_CHECK(cudaDeviceCanAccessPeer(&can, device, peerDevice));
  *canAccess = can;
  return bunEpSuccess;
}

bunEpResult_t bun_ep_enable_peer_access(int32_t peerDevice) {
  int current = 0;
  BUN_EP_CUDA_CHECK(cudaGetDevice(&current));
  if (current == peerDevice) return bunEpSuccess;
  cudaError_t err = cudaDeviceEnablePeerAccess(peerDevice, 0);
  if (err == cudaErrorPeerAccessAlreadyEnabled) {
    (void)cudaGetLastError();
    return bunEpSuccess;
  }
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return set_error(bunEpCudaError, "bun_ep_enable_peer_access: device %d cannot access device %d: %s (%s)", current,
                     peerDevice, cudaGetErrorName(err), cudaGetErrorString(err));
  }
  return bunEpSuccess;
}

// ---- graphs ---------------------------------------------------------------------------------------

bunEpResult_t bun_ep_stream_begin_capture(void* stream) {
  const DeviceScope device_scope = DeviceScope::of_stream(stream);
  BUN_EP_REQUIRE(stream != nullptr, "bun_ep_stream_begin_capture: the legacy default stream (0) cannot be captured; "
                                    "use a stream from bun_ep_stream_create");
  BUN_EP_CUDA_CHECK(cudaStreamBeginCapture(as_stream(stream), cudaStreamCaptureModeRelaxed));
  return bunEpSuccess;
}

bunEpResult_t bun_ep_stream_end_capture(void* stream, void** graphExec) {
  const DeviceScope device_scope = DeviceScope::of_stream(stream);
  BUN_EP_REQUIRE(stream != nullptr && graphExec != nullptr,
                 "bun_ep_stream_end_capture: stream and graphExec must not be NULL");
  *graphExec = nullptr;
  cudaGraph_t graph = nullptr;
  BUN_EP_CUDA_CHECK(cudaStreamEndCapture(as_stream(stream), &graph));
  cudaGraphExec_t exec = nullptr;
  cudaError_t err = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);  // the executable graph keeps its own copy
  if (err != cudaSuccess) return cuda_error(err, "cudaGraphInstantiate", __FILE__, __LINE__);
  *graphExec = exec;
  return bunEpSuccess;
}

bunEpResult_t bun_ep_graph_launch(void* graphExec, void* stream) {
  const DeviceScope device_scope = DeviceScope::of_stream(stream);
  BUN_EP_REQUIRE(graphExec != nullptr, "bun_ep_graph_launch: graphExec must not be NULL");
  BUN_EP_CUDA_CHECK(cudaGraphLaunch(static_cast<cudaGraphExec_t>(graphExec), as_stream(stream)));
  return bunEpSuccess;
}

bunEpResult_t bun_ep_graph_destroy(void* graphExec) {
  if (graphExec == nullptr) return bunEpSuccess;
  BUN_EP_CUDA_CHECK(cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(graphExec)));
  return bunEpSuccess;
}

// ---- debug kernels ----------------------------------------------------------------------------------

bunEpResult_t bun_ep_debug_write_sequence(int32_t* ptr, int64_t count, int32_t start, void* stream) {
  const DeviceScope device_scope = DeviceScope::of_stream(stream);
  BUN_EP_REQUIRE(count >= 0, "bun_ep_debug_write_sequence: count must be >= 0, got %lld", static_cast<long long>(count));
  if (count == 0) return bunEpSuccess;
  BUN_EP_REQUIRE(ptr != nullptr, "bun_ep_debug_write_sequence: ptr must not be NULL");
  const int threads = 256;
  const int64_t wanted = (count + threads - 1) / threads;
  const int blocks = static_cast<int>(wanted < 1024 ? wanted : 1024);
  write_sequence_kernel<<<blocks, threads, 0, as_stream(stream)>>>(ptr, count, start);
  BUN_EP_LAUNCH_CHECK();
  return bunEpSuccess;
}

bunEpResult_t bun_ep_debug_increment(int32_t* counter, void* stream) {
  const DeviceScope device_scope = DeviceScope::of_stream(stream);
  BUN_EP_REQUIRE(counter != nullptr, "bun_ep_debug_increment: counter must not be NULL");
  increment_kernel<<<1, 1, 0, as_stream(stream)>>>(counter);
  BUN_EP_LAUNCH_CHECK();
  return bunEpSuccess;
}

bunEpResult_t bun_ep_debug_copy_bytes(void* dst, const void* src, uint64_t bytes, int32_t numBlocks, void* stream) {
  const DeviceScope device_scope = DeviceScope::of_stream(stream);
  if (bytes == 0) return bunEpSuccess;
  BUN_EP_REQUIRE(dst != nullptr && src != nullptr, "bun_ep_debug_copy_bytes: dst and src must not be NULL");
  BUN_EP_REQUIRE(numBlocks >= 0, "bun_ep_debug_copy_bytes: numBlocks must be >= 0 (0 = automatic), got %d", numBlocks);
  int blocks = numBlocks;
  if (blocks == 0) {
    int device = 0;
    BUN_EP_TRY(device_of_stream(as_stream(stream), &device));
    blocks = 4 * sm_count_of(device);
    if (blocks == 0) blocks = 512;
  }
  const int threads = 512;
  const bool vectorizable = ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | bytes) & 15) == 0;
  if (vectorizable) {
    copy_int4_kernel<<<blocks, threads, 0, as_stream(stream)>>>(static_cast<int4*>(dst), static_cast<const int4*>(src),
                                                                 bytes / 16);
  } else {
    copy_bytes_kernel<<<blocks, threads, 0, as_stream(stream)>>>(static_cast<uint8_t*>(dst),
                                                                  static_cast<const uint8_t*>(src), bytes);
  }
  BUN_EP_LAUNCH_CHECK();
  return bunEpSuccess;
}

bunEpResult_t bun_ep_debug_empty_kernel(void* stream) {
  const DeviceScope device_scope = DeviceScope::of_stream(stream);
  empty_kernel<<<1, 1, 0, as_stream(stream)>>>();
  BUN_EP_LAUNCH_CHECK();
  return bunEpSuccess;
}

bunEpResult_t bun_ep_debug_spin(uint64_t ns, void* stream) {
  const DeviceScope device_scope = DeviceScope::of_stream(stream);
  spin_kernel<<<1, 1, 0, as_stream(stream)>>>(ns);
  BUN_EP_LAUNCH_CHECK();
  return bunEpSuccess;
}

bunEpResult_t bun_ep_debug_time_launches(int32_t count, void* stream, double* nsPerLaunch) {
  const DeviceScope device_scope = DeviceScope::of_stream(stream);
  BUN_EP_REQUIRE(count > 0, "bun_ep_debug_time_launches: count must be > 0, got %d", count);
  BUN_EP_REQUIRE(nsPerLaunch != nullptr, "bun_ep_debug_time_launches: nsPerLaunch must not be NULL");
  cudaStream_t s = as_stream(stream);
  empty_kernel<<<1, 1, 0, s>>>();
  BUN_EP_LAUNCH_CHECK();
  BUN_EP_CUDA_CHECK(cudaStreamSynchronize(s));
  const auto start = std::chrono::steady_clock::now();
  for (int32_t i = 0; i < count; ++i) empty_kernel<<<1, 1, 0, s>>>();
  const auto stop = std::chrono::steady_clock::now();
  BUN_EP_LAUNCH_CHECK();
  BUN_EP_CUDA_CHECK(cudaStreamSynchronize(s));
  *nsPerLaunch = std::chrono::duration<double, std::nano>(stop - start).count() / count;
  return bunEpSuccess;
}

}  // extern "C"
