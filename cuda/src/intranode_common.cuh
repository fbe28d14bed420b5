// Device helpers of the normal kernels (layout.cu, intranode.cu): the error record in mapped pinned
// memory, bounded waits that give up when the buffer has aborted, the control-region map and the
// staging-area layout (computed identically on host and device, on every rank).
#pragma once

#include <cuda_runtime.h>
#include <cstdint>
#include "bun_ep.h"
#include "ptx.cuh"

namespace bun_ep {
namespace normal {

// ---- error record ----------------------------------------------------------------------------
// workspace[0]: abort flag (every wait gives up at once when set); workspace[1]: record claim.
constexpr int kWorkspaceAbort = 0;
constexpr int kWorkspaceClaim = 1;

// Write the first error of this buffer into the host record. Fields first, code last, so the host
// (which polls the code) never sees a code with stale details.
__device__ __forceinline__ void record_error(int32_t* hostRecord, int32_t* workspace, int code, int rank, int a,
                                             int b, int64_t seq, int step) {
  if (hostRecord == nullptr) return;
  if (workspace != nullptr && atomicCAS(&workspace[kWorkspaceClaim], 0, 1) != 0) return;
  volatile int32_t* rec = hostRecord;
  rec[BUN_EP_REC_ERROR_RANK] = rank;
  rec[BUN_EP_REC_ERROR_A] = a;
  rec[BUN_EP_REC_ERROR_B] = b;
  rec[BUN_EP_REC_ERROR_SEQ] = static_cast<int32_t>(seq);
  rec[BUN_EP_REC_ERROR_STEP] = step;
  __threadfence_system();
  rec[BUN_EP_REC_ERROR_CODE] = code;
  __threadfence_system();
}

__device__ __forceinline__ bool aborted(const int32_t* workspace) {
  return ld_volatile(&workspace[kWorkspaceAbort]) != 0;
}

// Spin until *flag >= target (acquire, system scope). Gives up when the buffer aborted or after
// timeoutNs; a timeout records which rank never arrived and aborts the buffer.
__device__ __forceinline__ bool wait_flag(const int* flag, int target, const bunEpNormalComm_t& comm, int waitedRank,
                                          int step) {
  if (ld_acquire_sys(flag) >= target) return true;
  const uint64_t start = globaltimer_ns();
  for (uint32_t spins = 0;; ++spins) {
    if (ld_acquire_sys(flag) >= target) return true;
    if ((spins & 63u) == 0) {
      if (aborted(comm.workspace)) return false;
      if (globaltimer_ns() - start > static_cast<uint64_t>(comm.timeoutNs)) {
        record_error(comm.hostRecord, comm.workspace, BUN_EP_NORMAL_ERR_TIMEOUT, waitedRank, 0, 0, comm.seq, step);
        atomicExch(&comm.workspace[kWorkspaceAbort], 1);
        return false;
      }
    }
  }
}

// ---- control region (the first BUN_EP_NORMAL_CONTROL_BYTES of every registered buffer) ---------
constexpr int kMaxRanks = BUN_EP_NORMAL_MAX_RANKS;
constexpr int kMaxChannels = BUN_EP_NORMAL_MAX_CHANNELS;
constexpr int kMaxLocalExperts = BUN_EP_NORMAL_MAX_LOCAL_EXPERTS;

// One notify slot per source rank s, written by s: [0] seq flag, [8 + r] tokens of s going to r,
// [16 + c] tokens of s's channel c coming here, [16 + kMaxChannels + e] pairs of s for local expert e.
constexpr int kSlotFlag = 0;
constexpr int kSlotTotals = 8;
constexpr int kSlotChannels = 16;
constexpr int kSlotExperts = 16 + kMaxChannels;
constexpr int kSlotInts = ((kSlotExperts + kMaxLocalExperts + 31) / 32) * 32;

constexpr int64_t kReadyOffset = 0;                       // int: seq of the call this rank has started
constexpr int64_t kPublishedOffset = 128;                 // PublishedLayout of the call this rank has started
constexpr int64_t kSlotsOffset = 256;
constexpr int64_t kDispatchDoneOffset = 64 * 1024;        // int [source][channel]
constexpr int64_t kCombineDoneOffset = 96 * 1024;         // int [source][block]
constexpr int64_t kCombineReadOffset = 128 * 1024;        // int [home][block]: home finished pulling my rows
static_assert(kSlotsOffset + int64_t(kMaxRanks) * kSlotInts * 4 <= kDispatchDoneOffset, "slots overflow");
static_assert(kDispatchDoneOffset + int64_t(kMaxRanks) * kMaxChannels * 4 <= kCombineDoneOffset, "done overflow");
static_assert(kCombineDoneOffset + int64_t(kMaxRanks) * kMaxChannels * 4 <= kCombineReadOffset, "done overflow");
static_assert(kCombineReadOffset + int64_t(kMaxRanks) * kMaxChannels * 4 <= BUN_EP_NORMAL_CONTROL_BYTES,
              "control overflow");

// Where a rank's rows of the current call are, as byte offsets from the start of its registered
// buffer (-1: absent), and the row stride of each field. Written by the rank itself before it
// publishes "started seq"; read by peers after they saw that flag (see start_call in intranode.cu).
// Dispatch: where senders store the rows this rank receives (staging area, or the receive tensors
// themselves when direct). Combine: where this rank's combine input rows are when it lets home
// ranks pull them (direct), else unused (the home's own staging area is used).
struct PublishedLayout {
  int64_t xOffset, scalesOffset, idxOffset, weightsOffset;
  int64_t xBytes, scaleBytes, idxBytes, weightBytes;
  int64_t rows;    // rows the x field holds (a sender never writes past it)
  int64_t direct;  // 1: receive tensors (dispatch) / combine input (combine) in place, 0: staging / push
};
static_assert(kPublishedOffset + int64_t(sizeof(PublishedLayout)) <= kSlotsOffset, "published layout overflow");

__host__ __device__ __forceinline__ int* ready_flag(void* buffer) {
  return reinterpret_cast<int*>(static_cast<char*>(buffer) + kReadyOffset);
}
__host__ __device__ __forceinline__ int* notify_slot(void* buffer, int source) {
  return reinterpret_cast<int*>(static_cast<char*>(buffer) + kSlotsOffset) + int64_t(source) * kSlotInts;
}
__host__ __device__ __forceinline__ int* dispatch_done(void* buffer, int source, int channel) {
  return reinterpret_cast<int*>(static_cast<char*>(buffer) + kDispatchDoneOffset) + source * kMaxChannels + channel;
}
__host__ __device__ __forceinline__ int* combine_done(void* buffer, int source, int block) {
  return reinterpret_cast<int*>(static_cast<char*>(buffer) + kCombineDoneOffset) + source * kMaxChannels + block;
}
__host__ __device__ __forceinline__ int* combine_read(void* buffer, int home, int block) {
  return reinterpret_cast<int*>(static_cast<char*>(buffer) + kCombineReadOffset) + home * kMaxChannels + block;
}
__host__ __device__ __forceinline__ PublishedLayout* published_layout(void* buffer) {
  return reinterpret_cast<PublishedLayout*>(static_cast<char*>(buffer) + kPublishedOffset);
}

// ---- handle info (ints at the start of the handle allocation) ---------------------------------
constexpr int kInfoNumRecv = 0;
constexpr int kInfoNumChannels = 1;
constexpr int kInfoNumTokens = 2;
constexpr int kInfoMaxRecv = 3;
constexpr int kInfoSendRowBase = 16;                          // [r] first row of my tokens on r
constexpr int kInfoRecvSrcBase = kInfoSendRowBase + kMaxRanks;   // [s] first row from s here
constexpr int kInfoRecvSrcCount = kInfoRecvSrcBase + kMaxRanks;  // [s] rows from s here
constexpr int kInfoCombineDestBase = kInfoRecvSrcCount + kMaxRanks;  // [s] my combine rows' base on s
constexpr int kInfoHomeBlockBase = kInfoCombineDestBase + kMaxRanks; // [r] rows from r in my combine staging
constexpr int kInfoChannelBegin = kInfoHomeBlockBase + kMaxRanks;    // [s][c] first row of (s, c) here
constexpr int kInfoChannelCount = kInfoChannelBegin + kMaxRanks * kMaxChannels;  // [s][c]
constexpr int kInfoInts = kInfoChannelCount + kMaxRanks * kMaxChannels;
static_assert(kInfoInts == BUN_EP_NORMAL_HANDLE_INFO_INTS, "handle info size must match the header");

// ---- staging area (after the control region): one array per field, each 128-byte aligned -------
struct StagingLayout {
  int64_t rows;
  int64_t xOffset, scalesOffset, idxOffset, weightsOffset;  // from the buffer start
  int64_t xBytes, scaleBytes, idxBytes, weightBytes;       // per row
};

__host__ __device__ __forceinline__ int64_t align_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

__host__ __device__ inline StagingLayout staging_layout(int64_t bufferBytes, int64_t xBytes, int64_t scaleBytes,
                                                        int64_t idxBytes, int64_t weightBytes) {
  StagingLayout s{};
  s.xBytes = xBytes;
  s.scaleBytes = scaleBytes;
  s.idxBytes = idxBytes;
  s.weightBytes = weightBytes;
  const int64_t usable = bufferBytes - BUN_EP_NORMAL_CONTROL_BYTES - 4 * 128;
  const int64_t rowBytes = xBytes + scaleBytes + idxBytes + weightBytes;
  s.rows = (usable <= 0 || rowBytes <= 0) ? 0 : usable / rowBytes;
  s.xOffset = BUN_EP_NORMAL_CONTROL_BYTES;
  s.scalesOffset = align_up(s.xOffset + s.rows * xBytes, 128);
  s.idxOffset = align_up(s.scalesOffset + s.rows * scaleBytes, 128);
  s.weightsOffset = align_up(s.idxOffset + s.rows * idxBytes, 128);
  return s;
}

}  // namespace normal
}  // namespace bun_ep
