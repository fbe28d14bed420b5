/*
 * bun-ep C ABI: the only contract between TypeScript (lib/ffi.ts) and the native code.
 * Modelled on nccl.h: opaque handles, plain C types, every function returns bunEpResult_t,
 * bun_ep_get_last_error() gives the message of the last failure on the calling thread,
 * an explicit stream (cudaStream_t as void*) on every asynchronous call.
 *
 * Rules for every part of this header (and the parts it includes):
 * - Argument structs passed by pointer contain only 8-byte fields (int64_t, uint64_t, double,
 *   pointers) so TypeScript fills them with a BigInt64Array/DataView at offsets 8*i, no padding.
 * - Out-parameters are pointers to caller-owned memory; nothing is allocated for TS to free.
 * - Bump BUN_EP_ABI_VERSION on any change of a signature or struct layout.
 */
#ifndef BUN_EP_H
#define BUN_EP_H

#include <stdint.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define BUN_EP_ABI_VERSION 3

#if defined(__GNUC__)
#define BUN_EP_API __attribute__((visibility("default")))
#else
#define BUN_EP_API
#endif

typedef enum {
  bunEpSuccess = 0,
  bunEpInvalidArgument = 1, /* an argument is out of range; the message names it */
  bunEpCudaError = 2,       /* a CUDA runtime call failed; the message has cudaGetErrorString */
  bunEpTimeout = 3,         /* a bounded wait expired; the message names the rank that never arrived */
  bunEpNotSupported = 4,    /* feature not built in (e.g. NVSHMEM) or not available on this device */
  bunEpOutOfMemory = 5,
  bunEpInternalError = 6,
  bunEpNvshmemError = 7,
  bunEpNotReady = 8,        /* a query found work still in flight (not an error) */
  bunEpUnusable = 9         /* an earlier timeout/corruption made this object unusable; recreate it */
} bunEpResult_t;

/* Element types, same codes as lib/dtype.ts DTYPE_CODE. */
typedef enum {
  bunEpBf16 = 0,
  bunEpFp8E4m3 = 1,
  bunEpF32 = 2,
  bunEpI32 = 3,
  bunEpI64 = 4,
  bunEpU8 = 5
} bunEpDataType_t;

/* Feature bits reported by bun_ep_features(). */
#define BUN_EP_FEATURE_CUDA        (1ull << 0)
#define BUN_EP_FEATURE_NVSHMEM     (1ull << 1)
#define BUN_EP_FEATURE_INTRANODE   (1ull << 2)
#define BUN_EP_FEATURE_LOW_LATENCY (1ull << 3)
#define BUN_EP_FEATURE_INTERNODE   (1ull << 4)

/* ---- runtime: cuda/src/runtime.cu ---------------------------------------------------------- */
#include "bun_ep_runtime.h"

/* ---- expert-parallel kernels (one header per transport concern) ----------------------------- */
#include "bun_ep_normal.h"
#include "bun_ep_low_latency.h"
#include "bun_ep_nvshmem.h"
#include "bun_ep_internode.h"

#ifdef __cplusplus
}
#endif

#endif /* BUN_EP_H */
