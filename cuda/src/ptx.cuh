// Device helpers shared by the kernels: memory-ordering loads/stores across GPUs and processes,
// streaming 16-byte copies, and bounded spin-waits. Small functions, no macros.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace bun_ep {

// ---- ordering (system scope: peers may be other processes or other GPUs) ----------------------
__device__ __forceinline__ int ld_acquire_sys(const int* p) {
  int v;
  asm volatile("ld.acquire.sys.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ int64_t ld_acquire_sys(const int64_t* p) {
  int64_t v;
  asm volatile("ld.acquire.sys.global.b64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ int ld_volatile(const int* p) {
  int v;
  asm volatile("ld.volatile.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_release_sys(int* p, int v) {
  asm volatile("st.release.sys.global.b32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void st_relaxed_sys(int* p, int v) {
  asm volatile("st.relaxed.sys.global.b32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
// 64-bit words that carry (call number << 32 | count): relaxed where the number alone matters.
__device__ __forceinline__ int64_t ld_relaxed_sys(const int64_t* p) {
  int64_t v;
  asm volatile("ld.relaxed.sys.global.b64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_release_sys(int64_t* p, int64_t v) {
  asm volatile("st.release.sys.global.b64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ void st_relaxed_sys(int64_t* p, int64_t v) {
  asm volatile("st.relaxed.sys.global.b64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ int atomic_add_release_sys(int* p, int v) {
  int old;
  asm volatile("atom.add.release.sys.global.s32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}
__device__ __forceinline__ void fence_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }
// Adds `v` after every write this thread made, or saw made (a __syncthreads before it covers the
// whole block's writes), is visible system-wide: a release reduction, no value returned.
__device__ __forceinline__ void red_add_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// GPU scope: for ranks that all share this GPU (every thread that reads the flag is on this GPU), a
// release needs the writes before it performed in this GPU's memory system only; at system scope it
// also waits for system-wide visibility (about 0.4 us per block at the end of an EP2 dispatch on
// H200, session 8).
__device__ __forceinline__ void red_add_release_gpu(uint64_t* p, uint64_t v) {
  asm volatile("red.release.gpu.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ void st_release_gpu(int64_t* p, int64_t v) {
  asm volatile("st.release.gpu.global.b64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// ---- streaming copies ---------------------------------------------------------------------------
// Loads that bypass L1 (the data is read once); stores that do not allocate in L1.
__device__ __forceinline__ int4 ld_nc_int4(const int4* p) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
__device__ __forceinline__ void st_na_int4(int4* p, const int4& v) {
  asm volatile("st.global.L1::no_allocate.v4.s32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w));
}

// Relaxed 16-byte load that skips L1: data other SMs, GPUs or processes wrote during this kernel.
__device__ __forceinline__ int4 ld_na_int4(const int4* p) {
  int4 v;
  asm volatile("ld.global.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// ---- warps -----------------------------------------------------------------------------------------
constexpr unsigned kFullMask = 0xffffffffu;
__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x & 31u); }
__device__ __forceinline__ int warp_id() { return static_cast<int>(threadIdx.x >> 5); }
__device__ __forceinline__ int num_warps() { return static_cast<int>(blockDim.x >> 5); }

// ---- programmatic dependent launch (sm_90+) ------------------------------------------------------
// A kernel launched with programmatic stream serialization may start while the stream's previous
// kernel drains: this waits until that kernel is complete and its memory visible. A no-op for a
// kernel launched without the attribute (and before sm_90, where the attribute does not exist).
__device__ __forceinline__ void await_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// ---- time and bounded waits ----------------------------------------------------------------------
__device__ __forceinline__ uint64_t globaltimer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

// Spin until `*flag >= target` (acquire, system scope) or `timeout_ns` passes.
// Returns true on success, false on timeout: the caller records which rank never arrived.
__device__ __forceinline__ bool wait_at_least(const int* flag, int target, uint64_t timeout_ns) {
  if (ld_acquire_sys(flag) >= target) return true;
  const uint64_t start = globaltimer_ns();
  while (ld_acquire_sys(flag) < target) {
    if (globaltimer_ns() - start > timeout_ns) return false;
  }
  return true;
}

// Spin until `*counter >= target` (acquire, system scope) or `timeout_ns` passes.
__device__ __forceinline__ bool wait_at_least(const uint64_t* counter, uint64_t target, uint64_t timeout_ns) {
  const auto* word = reinterpret_cast<const int64_t*>(counter);
  if ((uint64_t)ld_acquire_sys(word) >= target) return true;
  const uint64_t start = globaltimer_ns();
  while ((uint64_t)ld_acquire_sys(word) < target) {
    if (globaltimer_ns() - start > timeout_ns) return false;
  }
  return true;
}

}  // namespace bun_ep
