// Normal kernels across nodes: layout (per rank and per node), prepare + notify, dispatch (bf16, fp8
// with scales, cached) forwarded RDMA -> NVL, combine NVL -> RDMA with the home rank adding every
// rank's contribution in ascending rank order. Protocol and buffer maps:
// cuda/include/bun_ep_internode.h and internode_common.cuh. In short, per call `seq`:
//  - start: every rank publishes "started seq" to the ranks of its node (NVL flag) and to its rail
//    peers (same local index on the other nodes, NVSHMEM signal), and waits for theirs: a peer that
//    started seq has finished every earlier call, so nothing it still reads gets overwritten;
//  - notify: every rank puts its counts (per rank, per node, per expert of the receiver) into every
//    rank's slot, then derives every offset it needs from the full count matrix;
//  - dispatch block c: sends its tokens (own node: straight into the final rows; other nodes: packed
//    into the send area, one put + signal per node), forwards the tokens that rail peers' channel
//    puts brought here, flags its writes done to every rank of the node, then copies out this rank's
//    staged rows;
//  - combine block c: writes its received rows into the forwarders' gather areas (pairs), forwards
//    gathered pairs of home ranks on other nodes (one put + signal per node), then sums home tokens.
#include <cuda_bf16.h>
#include "common.cuh"
#include "bf16x8.cuh"
#include "internode_common.cuh"

#ifndef BUN_EP_WITH_NVSHMEM
#define BUN_EP_WITH_NVSHMEM 0
#endif
#if BUN_EP_WITH_NVSHMEM
#include <nvshmem.h>
#include <nvshmemx.h>
#endif

namespace bun_ep {
namespace internode {
namespace {

constexpr int kLayoutThreads = 256;
constexpr int kPrepareThreads = 256;
constexpr int kNotifyThreads = 1024;
constexpr int kDataThreads = 512;
constexpr int kDataWarps = kDataThreads / 32;
constexpr int kMaxTopk = 64;

__device__ __forceinline__ int64_t share_begin(int64_t count, int part, int parts) { return count * part / parts; }

// ---- layout (needs no NVSHMEM): one thread per token ---------------------------------------------------
__global__ void layout_zero_kernel(bunEpInternodeLayoutArgs_t a) {
  const int64_t numNodes = a.numRanks / a.ranksPerNode;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < a.numExperts + a.numRanks + numNodes;
       i += int64_t(gridDim.x) * blockDim.x) {
    if (i < a.numExperts) a.numTokensPerExpert[i] = 0;
    else if (i < a.numExperts + a.numRanks) a.numTokensPerRank[i - a.numExperts] = 0;
    else a.numTokensPerNode[i - a.numExperts - a.numRanks] = 0;
  }
}

__device__ void report_layout_error(const bunEpInternodeLayoutArgs_t& a, int64_t token, int64_t expert) {
  if (a.hostRecord == nullptr) return;
  volatile int32_t* rec = a.hostRecord;
  if (rec[BUN_EP_REC_ERROR_CODE] != 0) return;  // first error wins (a rare race only loses detail)
  rec[BUN_EP_REC_ERROR_RANK] = static_cast<int32_t>(a.rank);
  rec[BUN_EP_REC_ERROR_A] = static_cast<int32_t>(token);
  rec[BUN_EP_REC_ERROR_B] = static_cast<int32_t>(expert);
  rec[BUN_EP_REC_ERROR_STEP] = BUN_EP_NORMAL_STEP_LAYOUT;
  __threadfence_system();
  rec[BUN_EP_REC_ERROR_CODE] = BUN_EP_NORMAL_ERR_BAD_TOPK;
  __threadfence_system();
}

__global__ void __launch_bounds__(kLayoutThreads) layout_kernel(bunEpInternodeLayoutArgs_t a) {
  const int64_t token = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (token >= a.numTokens) return;
  const int64_t expertsPerRank = a.numExperts / a.numRanks;
  uint8_t* row = a.isTokenInRank + token * a.numRanks;
  for (int64_t r = 0; r < a.numRanks; ++r) row[r] = 0;
  const int64_t* experts = a.topkIdx + token * a.topk;
  for (int k = 0; k < a.topk; ++k) {
    const int64_t expert = experts[k];
    if (expert == -1) continue;
    if (expert < -1 || expert >= a.numExperts) {
      report_layout_error(a, token, expert);
      continue;
    }
    atomicAdd(&a.numTokensPerExpert[expert], 1);
    const int64_t rank = expert / expertsPerRank;
    const int64_t node = rank / a.ranksPerNode;
    bool rankSeen = false, nodeSeen = false;
    for (int k2 = 0; k2 < k; ++k2) {
      const int64_t other = experts[k2];
      if (other < 0 || other >= a.numExperts) continue;
      rankSeen |= other / expertsPerRank == rank;
      nodeSeen |= other / expertsPerRank / a.ranksPerNode == node;
    }
    if (!rankSeen) {
      row[rank] = 1;
      atomicAdd(&a.numTokensPerRank[rank], 1);
    }
    if (!nodeSeen) atomicAdd(&a.numTokensPerNode[node], 1);
  }
}

#if BUN_EP_WITH_NVSHMEM

// Tell bun_ep_features() that this library has the internode kernels.
FeatureRegistration registered_feature(BUN_EP_FEATURE_INTERNODE);

struct Topology {
  int me, numRanks, ranksPerNode, numNodes, myNode, myLocal;
};

__device__ __forceinline__ Topology topology_of(const bunEpInternodeComm_t& comm) {
  Topology t;
  t.me = static_cast<int>(comm.rank);
  t.numRanks = static_cast<int>(comm.numRanks);
  t.ranksPerNode = static_cast<int>(comm.ranksPerNode);
  t.numNodes = t.numRanks / t.ranksPerNode;
  t.myNode = t.me / t.ranksPerNode;
  t.myLocal = t.me % t.ranksPerNode;
  return t;
}

// ---- prepare: one warp per target (each rank, then each node) ---------------------------------------
// Position of every token among this rank's tokens to that target (rankSlot / nodeSlot), the totals,
// and for nodes the per-channel starts (channel c covers tokens [T*c/C, T*(c+1)/C)).
__global__ void __launch_bounds__(kPrepareThreads) prepare_kernel(bunEpInternodeNotifyArgs_t a) {
  const int numRanks = static_cast<int>(a.comm.numRanks);
  const int ranksPerNode = static_cast<int>(a.comm.ranksPerNode);
  const int numNodes = numRanks / ranksPerNode;
  const int target = blockIdx.x * num_warps() + warp_id();
  if (target >= numRanks + numNodes) return;
  const bool isNode = target >= numRanks;
  const int id = isNode ? target - numRanks : target;
  const int64_t expertsPerTarget = (a.numExperts / numRanks) * (isNode ? ranksPerNode : 1);
  const int stride = isNode ? numNodes : numRanks;
  int* slots = a.handle + kInfoInts + (isNode ? a.numTokens * numRanks : 0);
  const unsigned lowerLanes = (1u << lane_id()) - 1u;
  int running = 0;
  for (int64_t base = 0; base < a.numTokens; base += 32) {
    const int64_t token = base + lane_id();
    bool goes = false;
    if (token < a.numTokens) {
      for (int k = 0; k < a.topk; ++k) {
        const int64_t expert = a.topkIdx[token * a.topk + k];
        goes |= expert >= 0 && expert < a.numExperts && expert / expertsPerTarget == id;
      }
    }
    const unsigned ballot = __ballot_sync(kFullMask, goes);
    const int position = running + __popc(ballot & lowerLanes);
    if (token < a.numTokens) slots[token * stride + id] = goes ? position : ~position;
    running += __popc(ballot);
  }
  __syncwarp();
  if (lane_id() == 0) a.handle[(isNode ? kInfoMyNodeTotals : kInfoMyTotals) + id] = running;
  if (isNode) {
    const int numChannels = static_cast<int>(a.numChannels);
    for (int c = lane_id(); c <= numChannels; c += 32) {
      const int64_t first = share_begin(a.numTokens, c, numChannels);
      a.handle[kInfoChanNodeStart + c * kMaxNodes + id] =
          first < a.numTokens ? slot_position(slots[first * stride + id]) : running;
    }
  }
}

// ---- notify: one block --------------------------------------------------------------------------------
__global__ void __launch_bounds__(kNotifyThreads) notify_kernel(bunEpInternodeNotifyArgs_t a) {
  extern __shared__ int expertCounts[];  // [numExperts]
  // Per rank: rows it receives, pairs it gathers (as forwarder), tokens it sends to / receives from
  // other nodes, pairs it receives back in combine.
  __shared__ int need[5][kMaxRanks];
  __shared__ int proceed;
  const bunEpInternodeComm_t& comm = a.comm;
  const Topology topo = topology_of(comm);
  const int numRanks = topo.numRanks, L = topo.ranksPerNode, numNodes = topo.numNodes;
  const int numExperts = static_cast<int>(a.numExperts);
  const int localExperts = numExperts / numRanks;
  const int set = notify_set(comm.seq);
  int* info = a.handle;
  void* rdma = comm.rdmaBuffer;

  for (int e = threadIdx.x; e < numExperts; e += blockDim.x) expertCounts[e] = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < a.numTokens * a.topk; i += blockDim.x) {
    const int64_t expert = a.topkIdx[i];
    if (expert == -1) continue;
    if (expert < -1 || expert >= numExperts) {
      record_error(comm, BUN_EP_NORMAL_ERR_BAD_TOPK, topo.me, i / a.topk, expert, BUN_EP_NORMAL_STEP_NOTIFY);
      continue;
    }
    // A row counts once per local expert it holds: a repeated id within one token counts once.
    const int64_t first = i - i % a.topk;
    bool repeated = false;
    for (int64_t j = first; j < i && !repeated; ++j) repeated = a.topkIdx[j] == expert;
    if (!repeated) atomicAdd(&expertCounts[expert], 1);
  }
  __syncthreads();

  // 1. This rank's slot for each destination q, built locally, then one put + signal per q.
  for (int q = 0; q < numRanks; ++q) {
    int* slot = at_offset<int>(rdma, rdma_send_slot_offset(q, numRanks));
    for (int r = threadIdx.x; r < numRanks; r += blockDim.x) slot[kSlotTotals + r] = info[kInfoMyTotals + r];
    for (int m = threadIdx.x; m < numNodes; m += blockDim.x) slot[kSlotNodes + m] = info[kInfoMyNodeTotals + m];
    for (int e = threadIdx.x; e < localExperts; e += blockDim.x) slot[kSlotExperts + e] = expertCounts[q * localExperts + e];
  }
  __syncthreads();
  const size_t slotBytes = size_t(kSlotExperts + localExperts) * 4;
  for (int q = warp_id(); q < numRanks; q += num_warps()) {
    nvshmemx_putmem_signal_nbi_warp(at_offset<int>(rdma, rdma_recv_slot_offset(set, topo.me, numRanks)),
                                    at_offset<int>(rdma, rdma_send_slot_offset(q, numRanks)), slotBytes,
                                    rdma_notify_sig(rdma, set, topo.me), uint64_t(comm.seq), NVSHMEM_SIGNAL_SET, q);
  }

  // 2. Every rank's slot here.
  for (int s = threadIdx.x; s < numRanks; s += blockDim.x)
    wait_seq(rdma_notify_sig(rdma, set, s), comm, s, BUN_EP_NORMAL_STEP_NOTIFY);
  __syncthreads();
  if (threadIdx.x == 0) proceed = !aborted(comm);
  __syncthreads();
  if (!proceed) {
    if (threadIdx.x == 0) nvshmem_quiet();
    return;
  }

  auto slotOf = [&](int source) { return at_offset<const int>(rdma, rdma_recv_slot_offset(set, source, numRanks)); };
  auto count = [&](int source, int rank) { return ld_volatile(slotOf(source) + kSlotTotals + rank); };
  auto nodeCount = [&](int source, int node) { return ld_volatile(slotOf(source) + kSlotNodes + node); };
  // Pairs (token, rank) of `source` on ranks of `node`.
  auto pairs = [&](int source, int node) {
    int sum = 0;
    for (int j = 0; j < L; ++j) sum += count(source, node * L + j);
    return sum;
  };

  // 3. Per rank: my first row there, and every rank's needs (for the capacity checks).
  for (int r = threadIdx.x; r < numRanks; r += blockDim.x) {
    const int node = r / L, local = r % L;
    int before = 0, received = 0;
    for (int s = 0; s < numRanks; ++s) {
      const int c = count(s, r);
      if (s < topo.me) before += c;
      received += c;
    }
    info[kInfoSendRowBase + r] = before;
    int gathered = 0, rdmaSent = 0, rdmaReceived = 0, combineReceived = 0;
    for (int n = 0; n < numNodes; ++n) {
      gathered += pairs(n * L + local, node);
      if (n == node) continue;
      rdmaSent += nodeCount(r, n);
      rdmaReceived += nodeCount(n * L + local, node);
      combineReceived += pairs(r, n);
    }
    need[0][r] = received;
    need[1][r] = gathered;
    need[2][r] = rdmaSent;
    need[3][r] = rdmaReceived;
    need[4][r] = combineReceived;
  }

  // 4. Per node x: the offsets of this rank's areas (see kInfo* in internode_common.cuh).
  for (int x = threadIdx.x; x < numNodes; x += blockDim.x) {
    const int myNode = topo.myNode, myLocal = topo.myLocal;
    const int railPeer = x * L + myLocal;  // my forwarder on node x, or home rank of node x whose forwarder I am
    int rdmaRecvBase = 0, rdmaSendBase = 0, rdmaPutBase = 0, combineRecvBase = 0, combinePutBase = 0;
    for (int n = 0; n < x; ++n) {
      if (n == myNode) continue;
      rdmaRecvBase += nodeCount(n * L + myLocal, myNode);
      rdmaSendBase += nodeCount(topo.me, n);
      combineRecvBase += pairs(topo.me, n);
    }
    for (int n = 0; n < myNode; ++n) {
      if (n == x) continue;
      rdmaPutBase += nodeCount(n * L + myLocal, x);
      combinePutBase += pairs(railPeer, n);
    }
    info[kInfoRdmaRecvBase + x] = rdmaRecvBase;
    info[kInfoRdmaRecvCount + x] = x == myNode ? 0 : nodeCount(railPeer, myNode);
    info[kInfoRdmaSendBase + x] = rdmaSendBase;
    info[kInfoRdmaPutBase + x] = rdmaPutBase;
    info[kInfoCombineRecvBase + x] = combineRecvBase;
    info[kInfoCombinePutBase + x] = combinePutBase;
    info[kInfoGatherCount + x] = pairs(railPeer, myNode);
    for (int i = 0; i < L; ++i) {
      int gatherBase = 0;
      for (int n = 0; n < x; ++n) gatherBase += pairs(n * L + i, myNode);
      info[kInfoGatherBase + i * kMaxNodes + x] = gatherBase;
    }
  }

  // 5. Received pairs per local expert (aligned), for the device and the host.
  for (int e = threadIdx.x; e < localExperts; e += blockDim.x) {
    int sum = 0;
    for (int s = 0; s < numRanks; ++s) sum += ld_volatile(slotOf(s) + kSlotExperts + e);
    const int alignment = static_cast<int>(a.expertAlignment);
    const int aligned = (sum + alignment - 1) / alignment * alignment;
    a.recvCountPerExpert[e] = aligned;
    static_cast<volatile int32_t*>(comm.hostRecord)[BUN_EP_REC_EXPERT_COUNTS + e] = aligned;
  }
  __syncthreads();

  // 6. The host record: this rank's count, the largest need of each area (and whose), then the seq.
  if (threadIdx.x == 0) {
    const int numRecv = need[0][topo.me];
    info[kInfoNumRecv] = numRecv;
    info[kInfoNumChannels] = static_cast<int>(a.numChannels);
    info[kInfoNumTokens] = static_cast<int>(a.numTokens);
    volatile int32_t* rec = comm.hostRecord;
    const int slots[5][2] = {{BUN_EP_REC_MAX_RECV, BUN_EP_REC_MAX_RECV_RANK},
                             {BUN_EP_INTERNODE_REC_MAX_GATHER, BUN_EP_INTERNODE_REC_MAX_GATHER_RANK},
                             {BUN_EP_INTERNODE_REC_MAX_RDMA_SEND, BUN_EP_INTERNODE_REC_MAX_RDMA_SEND_RANK},
                             {BUN_EP_INTERNODE_REC_MAX_RDMA_RECV, BUN_EP_INTERNODE_REC_MAX_RDMA_RECV_RANK},
                             {BUN_EP_INTERNODE_REC_MAX_COMBINE_RECV, BUN_EP_INTERNODE_REC_MAX_COMBINE_RECV_RANK}};
    for (int area = 0; area < 5; ++area) {
      int best = -1, who = 0;
      for (int r = 0; r < numRanks; ++r)
        if (need[area][r] > best) best = need[area][r], who = r;
      rec[slots[area][0]] = best;
      rec[slots[area][1]] = who;
    }
    if (a.numWorstTokens > 0 && numRecv > a.numWorstTokens)
      record_error(comm, BUN_EP_NORMAL_ERR_WORST_OVERFLOW, topo.me, numRecv, a.numWorstTokens, BUN_EP_NORMAL_STEP_NOTIFY);
    rec[BUN_EP_REC_NUM_RECV] = numRecv;
    __threadfence_system();
    rec[BUN_EP_REC_NOTIFY_SEQ] = static_cast<int32_t>(comm.seq);
    __threadfence_system();
    nvshmem_quiet();
  }
}

// ---- shared pieces of dispatch and combine --------------------------------------------------------
// Block-wide: publish "started seq" (block 0) to the node (NVL flag) and the rail peers (signal), and
// wait until all of them have started it too. False (in every thread) when the buffer aborted.
__device__ bool start_call(const bunEpInternodeComm_t& comm, const Topology& topo, int step) {
  __shared__ int proceedShared;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    st_release_sys(nvl_ready(comm.nvlBuffer), static_cast<int>(comm.seq));
    for (int n = 0; n < topo.numNodes; ++n)
      if (n != topo.myNode)
        nvshmemx_signal_op(rdma_ready_sig(comm.rdmaBuffer, topo.myNode), uint64_t(comm.seq), NVSHMEM_SIGNAL_SET,
                           n * topo.ranksPerNode + topo.myLocal);
  }
  const int t = threadIdx.x;
  if (t < topo.ranksPerNode) {
    wait_seq(nvl_ready(comm.nvlPeers[t]), comm, topo.myNode * topo.ranksPerNode + t, step);
  } else if (t >= 32 && t < 32 + topo.numNodes && t - 32 != topo.myNode) {
    wait_seq(rdma_ready_sig(comm.rdmaBuffer, t - 32), comm, (t - 32) * topo.ranksPerNode + topo.myLocal, step);
  }
  __syncthreads();
  if (t == 0) proceedShared = !aborted(comm);
  __syncthreads();
  return proceedShared != 0;
}

// Block-wide: wait for `count` flags (flagOf(i), waited rank rankOf(i)). False when any gave up.
template <typename FlagOf, typename RankOf>
__device__ bool wait_all(const bunEpInternodeComm_t& comm, int count, FlagOf flagOf, RankOf rankOf, int step) {
  __shared__ int allArrived;
  if (threadIdx.x == 0) allArrived = 1;
  __syncthreads();
  for (int i = threadIdx.x; i < count; i += blockDim.x)
    if (!wait_seq(flagOf(i), comm, rankOf(i), step)) allArrived = 0;
  __syncthreads();
  const bool ok = allArrived != 0;
  __syncthreads();
  return ok;
}

// Block-wide: make this block's stores visible, then set flagOf(local rank) to seq on every rank of the node.
template <typename FlagOf>
__device__ void signal_node(const bunEpInternodeComm_t& comm, const Topology& topo, FlagOf flagOf) {
  __syncthreads();
  if (threadIdx.x < topo.ranksPerNode) {
    __threadfence_system();
    st_release_sys(flagOf(static_cast<int>(threadIdx.x)), static_cast<int>(comm.seq));
  }
}

// Block-wide put of `bytes` (possibly 0) plus a signal set to seq.
__device__ void put_with_signal(void* dest, const void* src, size_t bytes, uint64_t* signal, int64_t seq, int pe) {
  if (bytes > 0) {
    nvshmemx_putmem_signal_nbi_block(dest, src, bytes, signal, uint64_t(seq), NVSHMEM_SIGNAL_SET, pe);
  } else if (threadIdx.x == 0) {
    nvshmemx_signal_op(signal, uint64_t(seq), NVSHMEM_SIGNAL_SET, pe);
  }
}

// Warp: copy `numVectors` int4 from src to every non-null destination (the row is read once).
template <bool kSourceIsInput>
__device__ __forceinline__ void copy_to_many(const int4* src, int4* const* dsts, int numDsts, int64_t numVectors) {
  constexpr int kUnroll = 4;
  for (int64_t i = lane_id(); i < numVectors; i += 32 * kUnroll) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t at = i + u * 32;
      if (at < numVectors) v[u] = kSourceIsInput ? ld_nc_int4(src + at) : ld_na_int4(src + at);
    }
    for (int d = 0; d < numDsts; ++d) {
      if (dsts[d] == nullptr) continue;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t at = i + u * 32;
        if (at < numVectors) st_na_int4(dsts[d] + at, v[u]);
      }
    }
  }
}

// One token as a sender or forwarder holds it: x row, scales, global topk ids, weights.
struct TokenSource {
  const int4* x;
  const float* scales;        // or null
  const int64_t* topkIdx;     // or null (cached)
  const float* topkWeights;   // or null
};

// Warp: store a token into the staging rows of the ranks of this node that need it.
// destRow[j] >= 0: its row on local rank j; the meta of row j is (source, firstPair + #earlier j's).
template <bool kSourceIsInput>
__device__ void stage_token(const bunEpInternodeDispatchArgs_t& a, const Topology& topo, const RowLayout& stage,
                            int64_t stagingRows, const TokenSource& src, const int (&destRow)[kMaxLocal], int source,
                            int firstPair) {
  const int L = topo.ranksPerNode;
  int4* dsts[kMaxLocal];
  for (int j = 0; j < L; ++j) {
    dsts[j] = nullptr;
    if (destRow[j] < 0) continue;
    if (destRow[j] >= stagingRows) {
      if (lane_id() == 0)
        record_error(a.comm, BUN_EP_NORMAL_ERR_STAGING, topo.myNode * L + j, destRow[j] + 1, stagingRows,
                     BUN_EP_NORMAL_STEP_DISPATCH);
      continue;
    }
    dsts[j] = reinterpret_cast<int4*>(static_cast<char*>(a.comm.nvlPeers[j]) + kNvlDataOffset + destRow[j] * stage.bytes);
  }
  copy_to_many<kSourceIsInput>(src.x, dsts, L, stage.xBytes / 16);
  const int scalesPerRow = static_cast<int>(stage.scaleBytes / 4);
  const int topk = static_cast<int>(stage.idxBytes / 8);
  const int64_t expertsPerRank = topk > 0 ? a.numExperts / topo.numRanks : 1;
  int pair = firstPair;
  for (int j = 0; j < L; ++j) {
    if (destRow[j] < 0) continue;
    const int thisPair = pair++;
    if (dsts[j] == nullptr) continue;
    char* row = reinterpret_cast<char*>(dsts[j]);
    for (int i = lane_id(); i < scalesPerRow; i += 32)
      reinterpret_cast<float*>(row + stage.scalesOffset)[i] = src.scales[i];
    const int64_t rank = topo.myNode * L + j;
    for (int k = lane_id(); k < topk; k += 32) {
      const int64_t expert = src.topkIdx[k];
      const bool local = expert >= 0 && expert < a.numExperts && expert / expertsPerRank == rank;
      reinterpret_cast<int64_t*>(row + stage.idxOffset)[k] = local ? expert - rank * expertsPerRank : -1;
      reinterpret_cast<float*>(row + stage.weightsOffset)[k] =
          local && src.topkWeights != nullptr ? src.topkWeights[k] : 0.0f;
    }
    if (lane_id() == 0) {
      reinterpret_cast<int*>(row + stage.intsOffset)[0] = source;
      reinterpret_cast<int*>(row + stage.intsOffset)[1] = thisPair;
    }
  }
}

// Warp: the rows of `token` on the ranks of `node` (-1: not there) and its first gather pair there.
__device__ int dest_rows_on(const int* info, const int* rankSlot, int numRanks, int L, int64_t token, int node,
                            int (&destRow)[kMaxLocal]) {
  int mine = -1, position = 0;
  if (lane_id() < L) {
    const int rank = node * L + lane_id();
    const int entry = rankSlot[token * numRanks + rank];
    position = slot_position(entry);
    mine = entry >= 0 ? info[kInfoSendRowBase + rank] + entry : -1;
  }
  int firstPair = 0;
  for (int j = 0; j < L; ++j) {
    destRow[j] = __shfl_sync(kFullMask, mine, j);
    firstPair += __shfl_sync(kFullMask, position, j);
  }
  return firstPair;
}

// ---- dispatch: one block per channel ----------------------------------------------------------------
__global__ void __launch_bounds__(kDataThreads)
    dispatch_kernel(bunEpInternodeDispatchArgs_t a, RowLayout stage, RowLayout record, Capacities cap) {
  const bunEpInternodeComm_t& comm = a.comm;
  const Topology topo = topology_of(comm);
  const int L = topo.ranksPerNode, numRanks = topo.numRanks, numNodes = topo.numNodes;
  const int channel = blockIdx.x, numChannels = gridDim.x;
  const int* info = a.handle;
  const int* rankSlot = a.handle + kInfoInts;
  const int* nodeSlot = rankSlot + a.numTokens * numRanks;
  const int topk = static_cast<int>(a.topk);
  const int scalesPerRow = static_cast<int>(stage.scaleBytes / 4);
  char* rdma = static_cast<char*>(comm.rdmaBuffer);
  char* sendArea = rdma + rdma_control_bytes(numRanks);
  char* recvArea = sendArea + rdma_half_bytes(comm.rdmaBytes, numRanks);
  const int64_t tokenBytes = stage.xBytes;

  bool proceed = start_call(comm, topo, BUN_EP_NORMAL_STEP_DISPATCH);

  // 1. Send: own node straight into the final rows; other nodes packed into the send area.
  if (proceed) {
    const int64_t begin = share_begin(a.numTokens, channel, numChannels);
    const int64_t end = share_begin(a.numTokens, channel + 1, numChannels);
    for (int64_t token = begin + warp_id(); token < end; token += num_warps()) {
      TokenSource src{reinterpret_cast<const int4*>(static_cast<const char*>(a.x) + token * tokenBytes),
                      scalesPerRow > 0 ? a.xScales + token * scalesPerRow : nullptr,
                      topk > 0 ? a.topkIdx + token * topk : nullptr,
                      topk > 0 && a.topkWeights != nullptr ? a.topkWeights + token * topk : nullptr};
      for (int node = 0; node < numNodes; ++node) {
        const int nodePosition = nodeSlot[token * numNodes + node];
        if (nodePosition < 0) continue;
        int destRow[kMaxLocal];
        const int firstPair = dest_rows_on(info, rankSlot, numRanks, L, token, node, destRow);
        if (node == topo.myNode) {
          stage_token<true>(a, topo, stage, cap.stagingRows, src, destRow, topo.me, firstPair);
          continue;
        }
        const int64_t row = int64_t(info[kInfoRdmaSendBase + node]) + nodePosition;
        if (row >= cap.rdmaSendRows) {
          if (lane_id() == 0)
            record_error(comm, BUN_EP_INTERNODE_ERR_RDMA, topo.me, row + 1, cap.rdmaSendRows, BUN_EP_NORMAL_STEP_DISPATCH);
          continue;
        }
        char* rec = sendArea + row * record.bytes;
        int4* dst[1] = {reinterpret_cast<int4*>(rec + record.xOffset)};
        copy_to_many<true>(src.x, dst, 1, record.xBytes / 16);
        for (int i = lane_id(); i < scalesPerRow; i += 32) reinterpret_cast<float*>(rec + record.scalesOffset)[i] = src.scales[i];
        for (int k = lane_id(); k < topk; k += 32) {
          reinterpret_cast<int64_t*>(rec + record.idxOffset)[k] = src.topkIdx[k];
          reinterpret_cast<float*>(rec + record.weightsOffset)[k] = src.topkWeights != nullptr ? src.topkWeights[k] : 0.0f;
        }
        int* ints = reinterpret_cast<int*>(rec + record.intsOffset);
        if (lane_id() == 0) {
          for (int j = 0; j < L; ++j) ints[j] = destRow[j];
          ints[L] = firstPair;
        }
      }
    }
  }
  __syncthreads();

  // 2. One put + signal per other node: this channel's packed tokens for it.
  if (proceed) {
    for (int node = 0; node < numNodes; ++node) {
      if (node == topo.myNode) continue;
      const int64_t first = info[kInfoChanNodeStart + channel * kMaxNodes + node];
      const int64_t last = info[kInfoChanNodeStart + (channel + 1) * kMaxNodes + node];
      const int64_t sendRow = info[kInfoRdmaSendBase + node] + first;
      const int64_t recvRow = info[kInfoRdmaPutBase + node] + first;
      int64_t rows = last - first;
      if (recvRow + rows > cap.rdmaRecvRows || sendRow + rows > cap.rdmaSendRows) {
        if (threadIdx.x == 0)
          record_error(comm, BUN_EP_INTERNODE_ERR_RDMA, node * L + topo.myLocal, recvRow + rows, cap.rdmaRecvRows,
                       BUN_EP_NORMAL_STEP_DISPATCH);
        rows = 0;
      }
      put_with_signal(recvArea + recvRow * record.bytes, sendArea + sendRow * record.bytes, size_t(rows * record.bytes),
                      rdma_dispatch_sig(rdma, topo.myNode, channel), comm.seq, node * L + topo.myLocal);
    }
  }

  // 3. Forward: the tokens that rail peers put here go to the ranks of this node that need them.
  for (int node = 0; node < numNodes && proceed; ++node) {
    if (node == topo.myNode) continue;
    const int source = node * L + topo.myLocal;
    proceed = wait_all(
        comm, numChannels, [&](int c) { return rdma_dispatch_sig(rdma, node, c); }, [&](int) { return source; },
        BUN_EP_NORMAL_STEP_DISPATCH);
    if (!proceed) break;
    const int64_t count = info[kInfoRdmaRecvCount + node];
    const int64_t base = info[kInfoRdmaRecvBase + node];
    for (int64_t k = share_begin(count, channel, numChannels) + warp_id(); k < share_begin(count, channel + 1, numChannels);
         k += num_warps()) {
      if (base + k >= cap.rdmaRecvRows) continue;  // reported by the sender
      const char* rec = recvArea + (base + k) * record.bytes;
      const int* ints = reinterpret_cast<const int*>(rec + record.intsOffset);
      int destRow[kMaxLocal];
      for (int j = 0; j < L; ++j) destRow[j] = ld_volatile(ints + j);
      const int firstPair = ld_volatile(ints + L);
      TokenSource src{reinterpret_cast<const int4*>(rec + record.xOffset),
                      reinterpret_cast<const float*>(rec + record.scalesOffset),
                      reinterpret_cast<const int64_t*>(rec + record.idxOffset),
                      reinterpret_cast<const float*>(rec + record.weightsOffset)};
      stage_token<false>(a, topo, stage, cap.stagingRows, src, destRow, source, firstPair);
    }
  }

  // 4. This channel's writes into the node's staging are done; an aborted rank signals nothing, so
  // its peers time out naming it instead of using missing rows.
  if (proceed) signal_node(comm, topo, [&](int j) { return nvl_dispatch_done(comm.nvlPeers[j], topo.myLocal, channel); });

  // 5. Receive: once every writer of this node has finished every channel, copy this block's share out.
  if (proceed)
    proceed = wait_all(
        comm, L * numChannels, [&](int i) { return nvl_dispatch_done(comm.nvlBuffer, i / numChannels, i % numChannels); },
        [&](int i) { return topo.myNode * L + i / numChannels; }, BUN_EP_NORMAL_STEP_DISPATCH);
  if (proceed) {
    const int64_t numRecv = info[kInfoNumRecv];
    const char* staging = static_cast<const char*>(comm.nvlBuffer) + kNvlDataOffset;
    for (int64_t row = share_begin(numRecv, channel, numChannels) + warp_id();
         row < share_begin(numRecv, channel + 1, numChannels); row += num_warps()) {
      if (row >= a.recvRows || row >= cap.stagingRows) continue;  // reported by notify / the writers
      const char* src = staging + row * stage.bytes;
      int4* dst[1] = {reinterpret_cast<int4*>(static_cast<char*>(a.recvX) + row * tokenBytes)};
      copy_to_many<false>(reinterpret_cast<const int4*>(src + stage.xOffset), dst, 1, stage.xBytes / 16);
      // Fields by shape (fp8, topk > 0: checked on the host to have their tensors); weights are optional.
      if (scalesPerRow > 0)
        for (int i = lane_id(); i < scalesPerRow; i += 32)
          a.recvXScales[row * scalesPerRow + i] = reinterpret_cast<const float*>(src + stage.scalesOffset)[i];
      if (topk > 0)
        for (int k = lane_id(); k < topk; k += 32)
          a.recvTopkIdx[row * topk + k] = reinterpret_cast<const int64_t*>(src + stage.idxOffset)[k];
      if (topk > 0 && a.recvTopkWeights != nullptr)
        for (int k = lane_id(); k < topk; k += 32)
          a.recvTopkWeights[row * topk + k] = reinterpret_cast<const float*>(src + stage.weightsOffset)[k];
      if (topk > 0 && lane_id() < 2)
        a.recvMeta[row * 2 + lane_id()] = reinterpret_cast<const int*>(src + stage.intsOffset)[lane_id()];
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) nvshmem_quiet();
}

// ---- combine ---------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kDataThreads) combine_kernel(bunEpInternodeCombineArgs_t a, RowLayout pair, Capacities cap) {
  __shared__ const char* contributions[kDataWarps][kMaxTopk];
  const bunEpInternodeComm_t& comm = a.comm;
  const Topology topo = topology_of(comm);
  const int L = topo.ranksPerNode, numRanks = topo.numRanks, numNodes = topo.numNodes;
  const int block = blockIdx.x, numBlocks = gridDim.x;
  const int* info = a.handle;
  const int* rankSlot = a.handle + kInfoInts;
  const int topk = static_cast<int>(a.topk);
  const int64_t vectorsPerRow = a.hidden * 2 / 16;
  char* rdma = static_cast<char*>(comm.rdmaBuffer);
  char* combineArea = rdma + rdma_control_bytes(numRanks);
  char* myGather = static_cast<char*>(comm.nvlBuffer) + kNvlDataOffset;

  bool proceed = start_call(comm, topo, BUN_EP_NORMAL_STEP_COMBINE);

  // 1. Every received row goes to the gather area of its forwarder (the rank of this node with the
  //    home rank's local index), at the pair dispatch recorded for it.
  if (proceed) {
    int64_t numRecv = info[kInfoNumRecv];
    if (numRecv > a.numRecvRows) numRecv = a.numRecvRows;
    for (int64_t row = share_begin(numRecv, block, numBlocks) + warp_id(); row < share_begin(numRecv, block + 1, numBlocks);
         row += num_warps()) {
      const int source = a.recvMeta[row * 2];
      const int pairIndex = a.recvMeta[row * 2 + 1];
      const int forwarder = source % L;
      const int64_t at = int64_t(info[kInfoGatherBase + forwarder * kMaxNodes + source / L]) + pairIndex;
      if (at >= cap.gatherPairs) {
        if (lane_id() == 0)
          record_error(comm, BUN_EP_NORMAL_ERR_STAGING, topo.myNode * L + forwarder, at + 1, cap.gatherPairs,
                       BUN_EP_NORMAL_STEP_COMBINE);
        continue;
      }
      char* dst = static_cast<char*>(comm.nvlPeers[forwarder]) + kNvlDataOffset + at * pair.bytes;
      int4* dsts[1] = {reinterpret_cast<int4*>(dst + pair.xOffset)};
      copy_to_many<true>(reinterpret_cast<const int4*>(a.x + row * a.hidden), dsts, 1, vectorsPerRow);
      if (a.topkWeights != nullptr)
        for (int k = lane_id(); k < topk; k += 32)
          reinterpret_cast<float*>(dst + pair.weightsOffset)[k] = a.topkWeights[row * topk + k];
    }
  }
  if (proceed) signal_node(comm, topo, [&](int j) { return nvl_gather_done(comm.nvlPeers[j], topo.myLocal, block); });

  // 2. As forwarder: once the whole node has gathered, put each other node's home rank its pairs.
  if (proceed)
    proceed = wait_all(
        comm, L * numBlocks, [&](int i) { return nvl_gather_done(comm.nvlBuffer, i / numBlocks, i % numBlocks); },
        [&](int i) { return topo.myNode * L + i / numBlocks; }, BUN_EP_NORMAL_STEP_COMBINE);
  if (proceed) {
    for (int node = 0; node < numNodes; ++node) {
      if (node == topo.myNode) continue;
      const int64_t count = info[kInfoGatherCount + node];
      const int64_t first = share_begin(count, block, numBlocks);
      int64_t pairs = share_begin(count, block + 1, numBlocks) - first;
      const int64_t from = info[kInfoGatherBase + topo.myLocal * kMaxNodes + node] + first;
      const int64_t to = info[kInfoCombinePutBase + node] + first;
      if (to + pairs > cap.combineRecvPairs || from + pairs > cap.gatherPairs) {
        if (threadIdx.x == 0)
          record_error(comm, BUN_EP_INTERNODE_ERR_RDMA, node * L + topo.myLocal, to + pairs, cap.combineRecvPairs,
                       BUN_EP_NORMAL_STEP_COMBINE);
        pairs = 0;
      }
      put_with_signal(combineArea + to * pair.bytes, myGather + from * pair.bytes, size_t(pairs * pair.bytes),
                      rdma_combine_sig(rdma, topo.myNode, block), comm.seq, node * L + topo.myLocal);
    }
  }

  // 3. As home rank: wait for every other node's pairs, then sum each token in ascending rank order.
  if (proceed && numNodes > 1)
    proceed = wait_all(
        comm, (numNodes - 1) * numBlocks,
        [&](int i) {
          const int k = i / numBlocks;
          return rdma_combine_sig(rdma, k < topo.myNode ? k : k + 1, i % numBlocks);
        },
        [&](int i) {
          const int k = i / numBlocks;
          return (k < topo.myNode ? k : k + 1) * L + topo.myLocal;
        },
        BUN_EP_NORMAL_STEP_COMBINE);
  if (proceed) {
    const char** mine = contributions[warp_id()];
    const unsigned lowerLanes = (1u << lane_id()) - 1u;
    for (int64_t token = share_begin(a.numTokens, block, numBlocks) + warp_id();
         token < share_begin(a.numTokens, block + 1, numBlocks); token += num_warps()) {
      // Where each rank's contribution to this token lies, in ascending rank order.
      int numParts = 0;
      for (int base = 0; base < numRanks; base += 32) {
        const int rank = base + lane_id();
        const char* where = nullptr;
        if (rank < numRanks && rankSlot[token * numRanks + rank] >= 0) {
          const int node = rank / L, local = rank % L;
          int pairIndex = 0;
          for (int j = 0; j < L; ++j) pairIndex += slot_position(rankSlot[token * numRanks + node * L + j]);
          for (int j = 0; j < local; ++j) pairIndex += rankSlot[token * numRanks + node * L + j] >= 0 ? 1 : 0;
          const int64_t at = node == topo.myNode
                                 ? int64_t(info[kInfoGatherBase + topo.myLocal * kMaxNodes + node]) + pairIndex
                                 : int64_t(info[kInfoCombineRecvBase + node]) + pairIndex;
          const bool fits = node == topo.myNode ? at < cap.gatherPairs : at < cap.combineRecvPairs;
          if (fits) where = (node == topo.myNode ? myGather : combineArea) + at * pair.bytes;
        }
        const unsigned present = __ballot_sync(kFullMask, where != nullptr);
        const int slot = numParts + __popc(present & lowerLanes);
        if (where != nullptr && slot < kMaxTopk) mine[slot] = where;
        numParts += __popc(present);
      }
      if (numParts > kMaxTopk) numParts = kMaxTopk;  // a token reaches at most topk <= 64 ranks
      __syncwarp();
      const int4* bias0 = a.bias0 != nullptr ? reinterpret_cast<const int4*>(a.bias0 + token * a.hidden) : nullptr;
      const int4* bias1 = a.bias1 != nullptr ? reinterpret_cast<const int4*>(a.bias1 + token * a.hidden) : nullptr;
      int4* out = reinterpret_cast<int4*>(a.combinedX + token * a.hidden);
      for (int64_t i = lane_id(); i < vectorsPerRow; i += 32) {
        float acc[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = 0.0f;
        if (bias0 != nullptr) add_bf16x8(acc, ld_nc_int4(bias0 + i));
        if (bias1 != nullptr) add_bf16x8(acc, ld_nc_int4(bias1 + i));
        for (int p = 0; p < numParts; ++p)
          add_bf16x8(acc, ld_na_int4(reinterpret_cast<const int4*>(mine[p] + pair.xOffset) + i));
        st_na_int4(out + i, pack_bf16x8(acc));
      }
      if (a.combinedTopkWeights != nullptr) {
        for (int k = lane_id(); k < topk; k += 32) {
          float acc = 0.0f;
          for (int p = 0; p < numParts; ++p)
            acc = __fadd_rn(acc, __int_as_float(ld_volatile(reinterpret_cast<const int*>(mine[p] + pair.weightsOffset) + k)));
          a.combinedTopkWeights[token * topk + k] = acc;
        }
      }
      __syncwarp();
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) nvshmem_quiet();
}

#endif  // BUN_EP_WITH_NVSHMEM

// ---- host side -------------------------------------------------------------------------------------
bunEpResult_t check_comm(const bunEpInternodeComm_t& comm, const char* what) {
  BUN_EP_REQUIRE(comm.ranksPerNode >= 1 && comm.ranksPerNode <= kMaxLocal,
                 "%s: ranksPerNode must be in [1, %d], got %lld", what, kMaxLocal, (long long)comm.ranksPerNode);
  BUN_EP_REQUIRE(comm.numRanks >= 1 && comm.numRanks % comm.ranksPerNode == 0 &&
                     comm.numRanks / comm.ranksPerNode <= kMaxNodes,
                 "%s: numRanks must be a multiple of ranksPerNode (%lld) with at most %d nodes, got %lld", what,
                 (long long)comm.ranksPerNode, kMaxNodes, (long long)comm.numRanks);
  BUN_EP_REQUIRE(comm.rank >= 0 && comm.rank < comm.numRanks, "%s: rank must be in [0, %lld), got %lld", what,
                 (long long)comm.numRanks, (long long)comm.rank);
  for (int j = 0; j < comm.ranksPerNode; ++j)
    BUN_EP_REQUIRE(comm.nvlPeers[j] != nullptr, "%s: nvlPeers[%d] is NULL", what, j);
  BUN_EP_REQUIRE(comm.nvlBuffer != nullptr && comm.rdmaBuffer != nullptr, "%s: nvlBuffer and rdmaBuffer are required", what);
  BUN_EP_REQUIRE(comm.nvlBytes > kNvlDataOffset, "%s: nvlBytes must exceed %lld, got %lld", what,
                 (long long)kNvlDataOffset, (long long)comm.nvlBytes);
  BUN_EP_REQUIRE(comm.rdmaBytes > rdma_control_bytes(static_cast<int>(comm.numRanks)),
                 "%s: rdmaBytes must exceed %lld for %lld ranks, got %lld", what,
                 (long long)rdma_control_bytes(static_cast<int>(comm.numRanks)), (long long)comm.numRanks,
                 (long long)comm.rdmaBytes);
  BUN_EP_REQUIRE(comm.hostRecord != nullptr && comm.workspace != nullptr, "%s: hostRecord and workspace are required", what);
  BUN_EP_REQUIRE(comm.seq >= 1 && comm.seq < (int64_t(1) << 31), "%s: seq must be in [1, 2^31), got %lld", what,
                 (long long)comm.seq);
  BUN_EP_REQUIRE(comm.timeoutNs > 0, "%s: timeoutNs must be > 0, got %lld", what, (long long)comm.timeoutNs);
  return bunEpSuccess;
}

Capacities capacities_of(const bunEpInternodeComm_t& comm, int64_t hidden, int64_t elementBytes, int64_t topk) {
  return capacities(comm.nvlBytes, comm.rdmaBytes, static_cast<int>(comm.numRanks), static_cast<int>(comm.ranksPerNode),
                    hidden, elementBytes, topk);
}

#if !BUN_EP_WITH_NVSHMEM
bunEpResult_t no_nvshmem(const char* what) {
  return set_error(bunEpNotSupported,
                   "%s: this libbun_ep.so was built without NVSHMEM, so the internode kernels are not in it; rebuild "
                   "with NVSHMEM_DIR set (or `pip install nvidia-nvshmem-cu13`)",
                   what);
}
#endif

}  // namespace
}  // namespace internode
}  // namespace bun_ep

using namespace bun_ep;
using namespace bun_ep::internode;

extern "C" BUN_EP_API bunEpResult_t bun_ep_internode_constants(int64_t* out, int64_t count) {
  BUN_EP_REQUIRE(out != nullptr && count >= 7, "bun_ep_internode_constants: out must hold 7 values, got %lld",
                 (long long)count);
  out[0] = kMaxNodes;
  out[1] = kMaxLocal;
  out[2] = kMaxChannels;
  out[3] = kMaxLocalExperts;
  out[4] = kNvlDataOffset;
  out[5] = BUN_EP_INTERNODE_HANDLE_INFO_INTS;
  out[6] = BUN_EP_WITH_NVSHMEM;
  return bunEpSuccess;
}

extern "C" BUN_EP_API int64_t bun_ep_internode_handle_bytes(int64_t numTokens, int64_t numRanks, int64_t ranksPerNode) {
  const int64_t numNodes = ranksPerNode > 0 ? numRanks / ranksPerNode : 0;
  return 4 * (int64_t(BUN_EP_INTERNODE_HANDLE_INFO_INTS) + numTokens * (numRanks + numNodes));
}

extern "C" BUN_EP_API bunEpResult_t bun_ep_internode_capacities(int64_t nvlBytes, int64_t rdmaBytes, int64_t numRanks,
                                                                int64_t ranksPerNode, int64_t hidden,
                                                                int64_t elementBytes, int64_t topk,
                                                                bunEpInternodeCapacities_t* out) {
  BUN_EP_REQUIRE(out != nullptr, "bun_ep_internode_capacities: out is NULL");
  BUN_EP_REQUIRE(numRanks >= 1 && numRanks <= kMaxRanks && ranksPerNode >= 1 && ranksPerNode <= kMaxLocal,
                 "bun_ep_internode_capacities: numRanks %lld / ranksPerNode %lld out of range", (long long)numRanks,
                 (long long)ranksPerNode);
  const Capacities c = capacities(nvlBytes, rdmaBytes, static_cast<int>(numRanks), static_cast<int>(ranksPerNode), hidden,
                                  elementBytes, topk);
  out->stagingRows = c.stagingRows;
  out->gatherPairs = c.gatherPairs;
  out->rdmaSendRows = c.rdmaSendRows;
  out->rdmaRecvRows = c.rdmaRecvRows;
  out->combineRecvPairs = c.combineRecvPairs;
  out->rdmaControlBytes = c.rdmaControlBytes;
  return bunEpSuccess;
}

extern "C" BUN_EP_API bunEpResult_t bun_ep_internode_layout(const bunEpInternodeLayoutArgs_t* args) {
  BUN_EP_REQUIRE(args != nullptr, "bun_ep_internode_layout: args is NULL");
  const bunEpInternodeLayoutArgs_t& a = *args;
  BUN_EP_REQUIRE(a.ranksPerNode >= 1 && a.numRanks >= 1 && a.numRanks % a.ranksPerNode == 0,
                 "layout: numRanks (%lld) must be a multiple of ranksPerNode (%lld)", (long long)a.numRanks,
                 (long long)a.ranksPerNode);
  BUN_EP_REQUIRE(a.numExperts >= a.numRanks && a.numExperts % a.numRanks == 0,
                 "layout: numExperts (%lld) must be a positive multiple of numRanks (%lld)", (long long)a.numExperts,
                 (long long)a.numRanks);
  BUN_EP_REQUIRE(a.numTokens >= 0 && a.topk >= 0 && (a.numTokens == 0 || a.topkIdx != nullptr),
                 "layout: numTokens %lld / topk %lld / topkIdx invalid", (long long)a.numTokens, (long long)a.topk);
  BUN_EP_REQUIRE(a.numTokensPerRank != nullptr && a.numTokensPerNode != nullptr && a.numTokensPerExpert != nullptr &&
                     (a.numTokens == 0 || a.isTokenInRank != nullptr),
                 "layout: every output is required");
  cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  layout_zero_kernel<<<8, 256, 0, stream>>>(a);
  BUN_EP_LAUNCH_CHECK();
  if (a.numTokens > 0) {
    layout_kernel<<<static_cast<unsigned>((a.numTokens + kLayoutThreads - 1) / kLayoutThreads), kLayoutThreads, 0, stream>>>(a);
    BUN_EP_LAUNCH_CHECK();
  }
  return bunEpSuccess;
}

extern "C" BUN_EP_API bunEpResult_t bun_ep_internode_notify(const bunEpInternodeNotifyArgs_t* args) {
  BUN_EP_REQUIRE(args != nullptr, "bun_ep_internode_notify: args is NULL");
#if BUN_EP_WITH_NVSHMEM
  const bunEpInternodeNotifyArgs_t& a = *args;
  BUN_EP_TRY(check_comm(a.comm, "notify"));
  BUN_EP_REQUIRE(a.numExperts % a.comm.numRanks == 0 && a.numExperts >= a.comm.numRanks,
                 "notify: numExperts (%lld) must be a positive multiple of numRanks (%lld)", (long long)a.numExperts,
                 (long long)a.comm.numRanks);
  BUN_EP_REQUIRE(a.numExperts / a.comm.numRanks <= kMaxLocalExperts, "notify: numExperts / numRanks must be <= %d, got %lld",
                 kMaxLocalExperts, (long long)(a.numExperts / a.comm.numRanks));
  BUN_EP_REQUIRE(a.numChannels >= 1 && a.numChannels <= kMaxChannels, "notify: numChannels must be in [1, %d], got %lld",
                 kMaxChannels, (long long)a.numChannels);
  BUN_EP_REQUIRE(a.numTokens >= 0 && a.numTokens < (int64_t(1) << 28), "notify: numTokens out of range: %lld",
                 (long long)a.numTokens);
  BUN_EP_REQUIRE(a.topk >= 1 && a.topk <= kMaxTopk, "notify: topk must be in [1, %d], got %lld", kMaxTopk, (long long)a.topk);
  BUN_EP_REQUIRE(a.expertAlignment >= 1, "notify: expertAlignment must be >= 1, got %lld", (long long)a.expertAlignment);
  BUN_EP_REQUIRE(a.handle != nullptr && a.recvCountPerExpert != nullptr, "notify: handle and recvCountPerExpert are required");
  BUN_EP_REQUIRE(a.numTokens == 0 || a.topkIdx != nullptr, "notify: topkIdx is NULL");
  const size_t sharedBytes = sizeof(int) * size_t(a.numExperts);
  BUN_EP_REQUIRE(sharedBytes <= 40 * 1024, "notify: numExperts (%lld) too large for one block's shared memory (at most %d)",
                 (long long)a.numExperts, 40 * 1024 / 4);
  cudaStream_t stream = static_cast<cudaStream_t>(a.comm.stream);
  const int targets = static_cast<int>(a.comm.numRanks + a.comm.numRanks / a.comm.ranksPerNode);
  const int warpsPerBlock = kPrepareThreads / 32;
  prepare_kernel<<<(targets + warpsPerBlock - 1) / warpsPerBlock, kPrepareThreads, 0, stream>>>(a);
  BUN_EP_LAUNCH_CHECK();
  notify_kernel<<<1, kNotifyThreads, sharedBytes, stream>>>(a);
  BUN_EP_LAUNCH_CHECK();
  return bunEpSuccess;
#else
  return no_nvshmem("bun_ep_internode_notify");
#endif
}

extern "C" BUN_EP_API bunEpResult_t bun_ep_internode_dispatch(const bunEpInternodeDispatchArgs_t* args) {
  BUN_EP_REQUIRE(args != nullptr, "bun_ep_internode_dispatch: args is NULL");
#if BUN_EP_WITH_NVSHMEM
  const bunEpInternodeDispatchArgs_t& a = *args;
  BUN_EP_TRY(check_comm(a.comm, "dispatch"));
  BUN_EP_REQUIRE(a.elementBytes == 1 || a.elementBytes == 2, "dispatch: elementBytes must be 1 or 2, got %lld",
                 (long long)a.elementBytes);
  BUN_EP_REQUIRE(a.hidden > 0 && (a.hidden * a.elementBytes) % 16 == 0,
                 "dispatch: hidden * elementBytes must be a positive multiple of 16 bytes, got hidden %lld", (long long)a.hidden);
  // What is present follows from shapes (dtype, topk, row counts), never from a pointer alone: a
  // tensor of 0 rows has a NULL pointer (0-byte allocation), e.g. on a rank with no tokens.
  const bool fp8 = a.elementBytes == 1;
  const bool sends = a.numTokens > 0, receives = a.recvRows > 0;
  BUN_EP_REQUIRE(a.numTokens >= 0 && a.recvRows >= 0, "dispatch: numTokens (%lld) and recvRows (%lld) must be >= 0",
                 (long long)a.numTokens, (long long)a.recvRows);
  BUN_EP_REQUIRE(!fp8 || a.hidden % 128 == 0, "dispatch: fp8 x needs hidden %% 128 == 0, got hidden %lld", (long long)a.hidden);
  BUN_EP_REQUIRE(!fp8 || !sends || a.xScales != nullptr, "dispatch: fp8 x of %lld tokens needs xScales", (long long)a.numTokens);
  BUN_EP_REQUIRE(!fp8 || !receives || a.recvXScales != nullptr, "dispatch: fp8 x needs recvXScales for %lld rows",
                 (long long)a.recvRows);
  BUN_EP_REQUIRE(fp8 || a.xScales == nullptr, "dispatch: xScales given with bf16 x");
  BUN_EP_REQUIRE(a.numChannels >= 1 && a.numChannels <= kMaxChannels, "dispatch: numChannels must be in [1, %d], got %lld",
                 kMaxChannels, (long long)a.numChannels);
  BUN_EP_REQUIRE(a.handle != nullptr, "dispatch: handle is NULL");
  BUN_EP_REQUIRE(!sends || a.x != nullptr, "dispatch: x of %lld tokens is NULL", (long long)a.numTokens);
  BUN_EP_REQUIRE(!receives || a.recvX != nullptr, "dispatch: recvX of %lld rows is NULL", (long long)a.recvRows);
  BUN_EP_REQUIRE(a.topk >= 0 && a.topk <= kMaxTopk, "dispatch: topk must be in [0, %d], got %lld", kMaxTopk, (long long)a.topk);
  BUN_EP_REQUIRE(a.topk == 0 || (a.numExperts >= a.comm.numRanks && a.numExperts % a.comm.numRanks == 0),
                 "dispatch: numExperts (%lld) must be a positive multiple of numRanks (%lld)", (long long)a.numExperts,
                 (long long)a.comm.numRanks);
  BUN_EP_REQUIRE(a.topk == 0 || !sends || a.topkIdx != nullptr, "dispatch: topkIdx of %lld tokens is NULL",
                 (long long)a.numTokens);
  BUN_EP_REQUIRE(a.topk == 0 || !receives || (a.recvTopkIdx != nullptr && a.recvMeta != nullptr),
                 "dispatch: a fresh dispatch needs recvTopkIdx and recvMeta for %lld rows", (long long)a.recvRows);
  const RowLayout stage = staging_row(a.hidden, a.elementBytes, a.topk);
  const RowLayout record = rdma_record(a.hidden, a.elementBytes, a.topk, a.comm.ranksPerNode);
  const Capacities cap = capacities_of(a.comm, a.hidden, a.elementBytes, a.topk);
  dispatch_kernel<<<static_cast<int>(a.numChannels), kDataThreads, 0, static_cast<cudaStream_t>(a.comm.stream)>>>(
      a, stage, record, cap);
  BUN_EP_LAUNCH_CHECK();
  return bunEpSuccess;
#else
  return no_nvshmem("bun_ep_internode_dispatch");
#endif
}

extern "C" BUN_EP_API bunEpResult_t bun_ep_internode_combine(const bunEpInternodeCombineArgs_t* args) {
  BUN_EP_REQUIRE(args != nullptr, "bun_ep_internode_combine: args is NULL");
#if BUN_EP_WITH_NVSHMEM
  const bunEpInternodeCombineArgs_t& a = *args;
  BUN_EP_TRY(check_comm(a.comm, "combine"));
  BUN_EP_REQUIRE(a.hidden > 0 && a.hidden % 8 == 0, "combine: hidden must be a positive multiple of 8, got %lld",
                 (long long)a.hidden);
  BUN_EP_REQUIRE(a.numBlocks >= 1 && a.numBlocks <= kMaxChannels, "combine: numBlocks must be in [1, %d], got %lld",
                 kMaxChannels, (long long)a.numBlocks);
  BUN_EP_REQUIRE(a.handle != nullptr && (a.numRecvRows == 0 || (a.recvMeta != nullptr && a.x != nullptr)),
                 "combine: handle, recvMeta and x are required");
  BUN_EP_REQUIRE(a.bias1 == nullptr || a.bias0 != nullptr, "combine: bias1 given without bias0");
  BUN_EP_REQUIRE(a.topk >= 0 && a.topk <= kMaxTopk, "combine: topk must be in [0, %d], got %lld", kMaxTopk, (long long)a.topk);
  BUN_EP_REQUIRE(a.topkWeights == nullptr || a.topk > 0, "combine: topkWeights given with topk 0");
  const RowLayout pair = combine_pair(a.hidden, a.topk);
  const Capacities cap = capacities_of(a.comm, a.hidden, 2, a.topk);
  combine_kernel<<<static_cast<int>(a.numBlocks), kDataThreads, 0, static_cast<cudaStream_t>(a.comm.stream)>>>(a, pair, cap);
  BUN_EP_LAUNCH_CHECK();
  return bunEpSuccess;
#else
  return no_nvshmem("bun_ep_internode_combine");
#endif
}
