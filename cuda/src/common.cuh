// Host-side helpers shared by every .cu file: the per-thread last error, status-returning checks.
// Kernels' device helpers are in ptx.cuh.
#pragma once

#include <cuda_runtime.h>
#include <cstdarg>
#include <cstdint>
#include "bun_ep.h"

namespace bun_ep {

// Records `code` and a printf-style message as the calling thread's last error; returns `code`
// so that callers can write `return set_error(bunEpInvalidArgument, "...")`.
bunEpResult_t set_error(bunEpResult_t code, const char* fmt, ...);

// The message of a CUDA failure with the expression that produced it.
bunEpResult_t cuda_error(cudaError_t err, const char* expr, const char* file, int line);

// Each kernel file advertises what it adds to bun_ep_features() with one namespace-scope
//   static bun_ep::FeatureRegistration registered_feature(BUN_EP_FEATURE_INTRANODE);
// (runs when the library loads, so the bits always match what was linked in).
struct FeatureRegistration {
  explicit FeatureRegistration(uint64_t featureBit);
};

// Makes a device current for the enclosing scope and restores the previous one. Entry points that
// take a stream or a context use it: a rank's stream or buffer may belong to another device than the
// calling thread's current one (one process driving several GPUs), and CUDA then rejects the call
// (seen on 2 GPUs: cudaMemcpyAsync with a device-1 stream while device 0 was current failed with
// cudaErrorInvalidValue).
class DeviceScope {
 public:
  explicit DeviceScope(int device);
  // The device of `stream` (no change for the legacy/default stream, NULL).
  static DeviceScope of_stream(void* stream);
  ~DeviceScope();
  DeviceScope(DeviceScope&& other) noexcept : previous_(other.previous_) { other.previous_ = -1; }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  DeviceScope() = default;
  int previous_ = -1;
};

}  // namespace bun_ep

// Return a status from the enclosing bunEpResult_t function when a CUDA call fails.
#define BUN_EP_CUDA_CHECK(expr)                                                   \
  do {                                                                            \
    cudaError_t bun_ep_err_ = (expr);                                             \
    if (bun_ep_err_ != cudaSuccess)                                               \
      return ::bun_ep::cuda_error(bun_ep_err_, #expr, __FILE__, __LINE__);        \
  } while (0)

// After a kernel launch: catch launch-configuration errors at once.
#define BUN_EP_LAUNCH_CHECK() BUN_EP_CUDA_CHECK(cudaGetLastError())

// Reject an argument: the message must name it, say what was given and what is expected.
#define BUN_EP_REQUIRE(cond, ...)                                                 \
  do {                                                                            \
    if (!(cond)) return ::bun_ep::set_error(bunEpInvalidArgument, __VA_ARGS__);   \
  } while (0)

// Propagate a non-success status from a helper.
#define BUN_EP_TRY(expr)                                                          \
  do {                                                                            \
    bunEpResult_t bun_ep_res_ = (expr);                                           \
    if (bun_ep_res_ != bunEpSuccess) return bun_ep_res_;                          \
  } while (0)
