// Pieces of the internode normal kernels (internode.cu) that host and device compute alike: the
// maps of the NVL and RDMA buffers, the record layouts, the handle's info offsets; plus the error
// record and the bounded waits over this file's comm struct. Protocol: cuda/include/bun_ep_internode.h.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>
#include "bun_ep.h"
#include "ptx.cuh"

namespace bun_ep {
namespace internode {

constexpr int kMaxNodes = BUN_EP_INTERNODE_MAX_NODES;
constexpr int kMaxLocal = BUN_EP_INTERNODE_MAX_RANKS_PER_NODE;
constexpr int kMaxRanks = BUN_EP_INTERNODE_MAX_RANKS;
constexpr int kMaxChannels = BUN_EP_INTERNODE_MAX_CHANNELS;
constexpr int kMaxLocalExperts = BUN_EP_INTERNODE_MAX_LOCAL_EXPERTS;

__host__ __device__ __forceinline__ int64_t align_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

// ---- NVL buffer: flags (ints), then the data area --------------------------------------------------
// Dispatch uses the data area as staging rows (final row order); combine as the gather area (pairs).
constexpr int64_t kNvlReadyOffset = 0;                 // int: seq of the call this rank has started
constexpr int64_t kNvlDispatchDoneOffset = 1024;        // int [writer local rank][channel]
constexpr int64_t kNvlGatherDoneOffset = kNvlDispatchDoneOffset + int64_t(kMaxLocal) * kMaxChannels * 4;
constexpr int64_t kNvlDataOffset = BUN_EP_INTERNODE_NVL_CONTROL_BYTES;
static_assert(kNvlGatherDoneOffset + int64_t(kMaxLocal) * kMaxChannels * 4 <= kNvlDataOffset, "NVL control overflow");

__host__ __device__ __forceinline__ int* nvl_ready(void* nvl) {
  return reinterpret_cast<int*>(static_cast<char*>(nvl) + kNvlReadyOffset);
}
__host__ __device__ __forceinline__ int* nvl_dispatch_done(void* nvl, int writer, int channel) {
  return reinterpret_cast<int*>(static_cast<char*>(nvl) + kNvlDispatchDoneOffset) + writer * kMaxChannels + channel;
}
__host__ __device__ __forceinline__ int* nvl_gather_done(void* nvl, int writer, int block) {
  return reinterpret_cast<int*>(static_cast<char*>(nvl) + kNvlGatherDoneOffset) + writer * kMaxChannels + block;
}

// ---- RDMA buffer: signals (u64), notify slots, then the data area ---------------------------------
// Notify slot of source s (ints): [0, kMaxRanks) tokens of s per rank, [kSlotNodes, +kMaxNodes) tokens
// of s per node, [kSlotExperts, +kMaxLocalExperts) pairs of s for each local expert of the receiver.
constexpr int kSlotTotals = 0;
constexpr int kSlotNodes = kMaxRanks;
constexpr int kSlotExperts = kMaxRanks + kMaxNodes;
constexpr int kSlotInts = kSlotExperts + kMaxLocalExperts;

constexpr int64_t kRdmaReadySigOffset = 0;             // u64 [source node]: that node's rail peer started seq
constexpr int64_t kRdmaNotifySigOffset = 4096;         // u64 [2][source rank]
constexpr int64_t kRdmaDispatchSigOffset = 8192;       // u64 [source node][channel]
constexpr int64_t kRdmaCombineSigOffset = kRdmaDispatchSigOffset + int64_t(kMaxNodes) * kMaxChannels * 8;
constexpr int64_t kRdmaSlotsOffset = kRdmaCombineSigOffset + int64_t(kMaxNodes) * kMaxChannels * 8;
static_assert(kRdmaNotifySigOffset + 2 * kMaxRanks * 8 <= kRdmaDispatchSigOffset, "notify signals overflow");

// Received slots: two sets alternating with bit 1 of seq (a rank can be one notify ahead of another
// only when a notify's data step was skipped, and then the two notifies' seqs differ by 2).
__host__ __device__ __forceinline__ int notify_set(int64_t seq) { return static_cast<int>((seq >> 1) & 1); }
__host__ __device__ __forceinline__ int64_t rdma_recv_slot_offset(int set, int source, int numRanks) {
  return kRdmaSlotsOffset + (int64_t(set) * numRanks + source) * kSlotInts * 4;
}
__host__ __device__ __forceinline__ int64_t rdma_send_slot_offset(int dest, int numRanks) {
  return kRdmaSlotsOffset + (int64_t(2) * numRanks + dest) * kSlotInts * 4;
}
__host__ __device__ __forceinline__ int64_t rdma_control_bytes(int numRanks) {
  return align_up(kRdmaSlotsOffset + int64_t(3) * numRanks * kSlotInts * 4, 64 * 1024);
}

template <typename T>
__host__ __device__ __forceinline__ T* at_offset(void* base, int64_t offset) {
  return reinterpret_cast<T*>(static_cast<char*>(base) + offset);
}
__host__ __device__ __forceinline__ uint64_t* rdma_ready_sig(void* rdma, int node) {
  return at_offset<uint64_t>(rdma, kRdmaReadySigOffset) + node;
}
__host__ __device__ __forceinline__ uint64_t* rdma_notify_sig(void* rdma, int set, int source) {
  return at_offset<uint64_t>(rdma, kRdmaNotifySigOffset) + set * kMaxRanks + source;
}
__host__ __device__ __forceinline__ uint64_t* rdma_dispatch_sig(void* rdma, int node, int channel) {
  return at_offset<uint64_t>(rdma, kRdmaDispatchSigOffset) + node * kMaxChannels + channel;
}
__host__ __device__ __forceinline__ uint64_t* rdma_combine_sig(void* rdma, int node, int block) {
  return at_offset<uint64_t>(rdma, kRdmaCombineSigOffset) + node * kMaxChannels + block;
}

// ---- records: one struct of arrays per row, every field 16-byte aligned ---------------------------
struct RowLayout {
  int64_t xOffset, scalesOffset, idxOffset, weightsOffset, intsOffset;
  int64_t xBytes, scaleBytes, idxBytes, weightBytes, intBytes;
  int64_t bytes;  // of one row
};

__host__ __device__ inline RowLayout row_layout(int64_t xBytes, int64_t scaleBytes, int64_t idxBytes,
                                                int64_t weightBytes, int64_t intBytes) {
  RowLayout r{};
  r.xBytes = xBytes;
  r.scaleBytes = scaleBytes;
  r.idxBytes = idxBytes;
  r.weightBytes = weightBytes;
  r.intBytes = intBytes;
  r.xOffset = 0;
  r.scalesOffset = align_up(r.xOffset + xBytes, 16);
  r.idxOffset = align_up(r.scalesOffset + scaleBytes, 16);
  r.weightsOffset = align_up(r.idxOffset + idxBytes, 16);
  r.intsOffset = align_up(r.weightsOffset + weightBytes, 16);
  r.bytes = align_up(r.intsOffset + intBytes, 16);
  return r;
}

// Dispatch staging row (NVL): x, scales, local topk idx, weights, meta = (source rank, gather pair).
__host__ __device__ inline RowLayout staging_row(int64_t hidden, int64_t elementBytes, int64_t topk) {
  return row_layout(hidden * elementBytes, elementBytes == 1 ? (hidden / 128) * 4 : 0, topk * 8, topk * 4, 2 * 4);
}
// Dispatch RDMA record: x, scales, global topk idx, weights, then the row on each rank of the target
// node (-1: not there) and the token's first gather pair on that node.
__host__ __device__ inline RowLayout rdma_record(int64_t hidden, int64_t elementBytes, int64_t topk, int64_t ranksPerNode) {
  return row_layout(hidden * elementBytes, elementBytes == 1 ? (hidden / 128) * 4 : 0, topk * 8, topk * 4,
                    (ranksPerNode + 1) * 4);
}
// Combine pair (gather area, RDMA combine area): one rank's contribution to one home token.
__host__ __device__ inline RowLayout combine_pair(int64_t hidden, int64_t topk) {
  return row_layout(hidden * 2, 0, 0, topk * 4, 0);
}

struct Capacities {
  int64_t stagingRows, gatherPairs, rdmaSendRows, rdmaRecvRows, combineRecvPairs, rdmaControlBytes;
};

__host__ __device__ inline int64_t rows_in(int64_t bytes, int64_t rowBytes) {
  return bytes <= 0 || rowBytes <= 0 ? 0 : bytes / rowBytes;
}

// Dispatch RDMA: send area = first half of the data area, receive area = second half.
__host__ __device__ inline int64_t rdma_half_bytes(int64_t rdmaBytes, int numRanks) {
  return (rdmaBytes - rdma_control_bytes(numRanks)) / 2 / 16 * 16;
}

__host__ __device__ inline Capacities capacities(int64_t nvlBytes, int64_t rdmaBytes, int numRanks, int ranksPerNode,
                                                 int64_t hidden, int64_t elementBytes, int64_t topk) {
  Capacities c{};
  const int64_t nvlData = nvlBytes - kNvlDataOffset;
  const int64_t rdmaData = rdmaBytes - rdma_control_bytes(numRanks);
  c.stagingRows = rows_in(nvlData, staging_row(hidden, elementBytes, topk).bytes);
  c.gatherPairs = rows_in(nvlData, combine_pair(hidden, topk).bytes);
  const int64_t half = rdma_half_bytes(rdmaBytes, numRanks);
  c.rdmaSendRows = rows_in(half, rdma_record(hidden, elementBytes, topk, ranksPerNode).bytes);
  c.rdmaRecvRows = c.rdmaSendRows;
  c.combineRecvPairs = rows_in(rdmaData, combine_pair(hidden, topk).bytes);
  c.rdmaControlBytes = rdma_control_bytes(numRanks);
  return c;
}

// ---- handle info (ints at the start of the handle allocation) -------------------------------------
constexpr int kInfoNumRecv = 0;
constexpr int kInfoNumChannels = 1;
constexpr int kInfoNumTokens = 2;
constexpr int kInfoSendRowBase = 16;                                    // [r] first row of my tokens on r
constexpr int kInfoMyTotals = kInfoSendRowBase + kMaxRanks;             // [r] my tokens to r
constexpr int kInfoMyNodeTotals = kInfoMyTotals + kMaxRanks;            // [m] my tokens to node m
constexpr int kInfoRdmaSendBase = kInfoMyNodeTotals + kMaxNodes;        // [m] my send-area row of node m's tokens
constexpr int kInfoRdmaPutBase = kInfoRdmaSendBase + kMaxNodes;         // [m] where they land on my forwarder of m
constexpr int kInfoRdmaRecvBase = kInfoRdmaPutBase + kMaxNodes;         // [n] rows from node n in my receive area
constexpr int kInfoRdmaRecvCount = kInfoRdmaRecvBase + kMaxNodes;       // [n]
constexpr int kInfoGatherBase = kInfoRdmaRecvCount + kMaxNodes;         // [local i][n] pairs of home (n, i) on forwarder (myNode, i)
constexpr int kInfoGatherCount = kInfoGatherBase + kMaxLocal * kMaxNodes;  // [n] pairs of home (n, myLocal) here
constexpr int kInfoCombineRecvBase = kInfoGatherCount + kMaxNodes;      // [m] pairs from node m in my RDMA area
constexpr int kInfoCombinePutBase = kInfoCombineRecvBase + kMaxNodes;   // [n] where my pairs for home (n, myLocal) land
constexpr int kInfoChanNodeStart = kInfoCombinePutBase + kMaxNodes;     // [c][m], c in [0, numChannels]: my tokens to m before channel c
constexpr int kInfoInts = kInfoChanNodeStart + (kMaxChannels + 1) * kMaxNodes;
static_assert(kInfoInts <= BUN_EP_INTERNODE_HANDLE_INFO_INTS, "handle info overflow");

// rankSlot / nodeSlot entries: position when the token goes there, else ~position (tokens before it
// that go there, either way).
__host__ __device__ __forceinline__ int slot_position(int entry) { return entry >= 0 ? entry : ~entry; }

// ---- errors and bounded waits ------------------------------------------------------------------------
constexpr int kWorkspaceAbort = 0;
constexpr int kWorkspaceClaim = 1;

// First error of this buffer into the host record: fields first, code last (the host polls the code).
__device__ __forceinline__ void record_error(const bunEpInternodeComm_t& comm, int code, int rank, int64_t a,
                                             int64_t b, int step) {
  if (comm.hostRecord == nullptr) return;
  if (atomicCAS(&comm.workspace[kWorkspaceClaim], 0, 1) != 0) return;
  volatile int32_t* rec = comm.hostRecord;
  rec[BUN_EP_REC_ERROR_RANK] = rank;
  rec[BUN_EP_REC_ERROR_A] = static_cast<int32_t>(a);
  rec[BUN_EP_REC_ERROR_B] = static_cast<int32_t>(b);
  rec[BUN_EP_REC_ERROR_SEQ] = static_cast<int32_t>(comm.seq);
  rec[BUN_EP_REC_ERROR_STEP] = step;
  __threadfence_system();
  rec[BUN_EP_REC_ERROR_CODE] = code;
  __threadfence_system();
}

__device__ __forceinline__ bool aborted(const bunEpInternodeComm_t& comm) {
  return ld_volatile(&comm.workspace[kWorkspaceAbort]) != 0;
}

__device__ __forceinline__ int64_t load_acquire(const int* p) { return ld_acquire_sys(p); }
__device__ __forceinline__ int64_t load_acquire(const uint64_t* p) {
  return ld_acquire_sys(reinterpret_cast<const int64_t*>(p));
}

// Spin until *flag >= seq. Gives up when the buffer aborted, or after timeoutNs: then records which
// rank never arrived and aborts the buffer (every later wait gives up at once).
template <typename Flag>
__device__ __forceinline__ bool wait_seq(const Flag* flag, const bunEpInternodeComm_t& comm, int waitedRank, int step) {
  if (load_acquire(flag) >= comm.seq) return true;
  const uint64_t start = globaltimer_ns();
  for (uint32_t spins = 0;; ++spins) {
    if (load_acquire(flag) >= comm.seq) return true;
    if ((spins & 63u) == 0) {
      if (aborted(comm)) return false;
      if (globaltimer_ns() - start > static_cast<uint64_t>(comm.timeoutNs)) {
        record_error(comm, BUN_EP_NORMAL_ERR_TIMEOUT, waitedRank, 0, 0, step);
        atomicExch(&comm.workspace[kWorkspaceAbort], 1);
        return false;
      }
    }
  }
}

}  // namespace internode
}  // namespace bun_ep
