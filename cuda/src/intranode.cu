// Normal kernels inside one host: notify, dispatch (bf16, fp8 + scales, cached), combine.
// Design and protocol: cuda/include/bun_ep_normal.h (top comment). In short:
//  - every kernel starts by publishing "I have started call seq" in its own control region and by
//    waiting (bounded) for every peer to have done the same before writing into that peer's buffer:
//    a peer that started call seq has finished every earlier call, so nothing it still reads is
//    overwritten;
//  - notify gives every rank every rank's per-destination totals, so each sender knows the exact
//    final row of each of its tokens on each receiver;
//  - dispatch: block c (channel c) stores the rows of its token range straight into those rows of
//    each receiver's staging area, flags (source, channel) done, then copies out the rows that the
//    same channel of every source wrote here, source by source;
//  - combine: every rank stores its received rows into the home rank's staging area (rows grouped by
//    the rank that sends them back), flags done; the home rank sums them per token in rank order.
#include <cuda_bf16.h>
#include "common.cuh"
#include "bf16x8.cuh"
#include "intranode_common.cuh"

namespace bun_ep {
namespace normal {
namespace {

// Tell bun_ep_features() that this library has the intranode normal kernels.
FeatureRegistration registered_feature(BUN_EP_FEATURE_INTRANODE);

constexpr int kNotifyThreads = 1024;
constexpr int kDefaultThreads = 512;

__device__ __forceinline__ char* buffer_at(const bunEpNormalComm_t& comm, int rank) {
  return static_cast<char*>(comm.peerBuffers[rank]);
}

// Bitmask of the ranks that token `token` goes to; counts its experts into `expertCounts` when
// given, and reports (then skips) values outside [-1, numExperts).
__device__ __forceinline__ uint32_t token_rank_mask(const bunEpNotifyArgs_t& a, int64_t token, int* expertCounts) {
  const int numExperts = static_cast<int>(a.numExperts);
  const int expertsPerRank = numExperts / static_cast<int>(a.comm.numRanks);
  uint32_t mask = 0;
  for (int k = 0; k < a.topk; ++k) {
    const int64_t expert = a.topkIdx[token * a.topk + k];
    if (expert == -1) continue;
    if (expert < -1 || expert >= numExperts) {
      if (expertCounts != nullptr)
        record_error(a.comm.hostRecord, a.comm.workspace, BUN_EP_NORMAL_ERR_BAD_TOPK, static_cast<int>(a.comm.rank),
                     static_cast<int>(token), static_cast<int>(expert), a.comm.seq, BUN_EP_NORMAL_STEP_NOTIFY);
      continue;
    }
    if (expertCounts != nullptr) atomicAdd(&expertCounts[expert], 1);
    mask |= 1u << (expert / expertsPerRank);
  }
  return mask;
}

__device__ __forceinline__ int64_t channel_begin(int64_t numTokens, int channel, int numChannels) {
  return numTokens * channel / numChannels;
}

// ---- notify: one block --------------------------------------------------------------------------
__device__ __forceinline__ void notify_block(const bunEpNotifyArgs_t& a) {
  extern __shared__ int shared[];
  __shared__ int totals[kMaxRanks];
  __shared__ int proceed;
  const bunEpNormalComm_t& comm = a.comm;
  const int me = static_cast<int>(comm.rank);
  const int numRanks = static_cast<int>(comm.numRanks);
  const int numExperts = static_cast<int>(a.numExperts);
  const int localExperts = numExperts / numRanks;
  const int numChannels = static_cast<int>(a.numChannels);
  const int seq = static_cast<int>(comm.seq);
  int* expertCounts = shared;                                     // [numExperts]
  int* channelCounts = shared + numExperts;                       // [channel][rank]
  int* channelStart = channelCounts + numChannels * numRanks;     // [channel][rank], exclusive prefix
  int* info = a.handle;
  int* homeSlot = a.handle + kInfoInts;
  char* myBuffer = buffer_at(comm, me);

  if (threadIdx.x == 0) st_release_sys(ready_flag(myBuffer), seq);
  for (int i = threadIdx.x; i < numExperts + 2 * numChannels * numRanks; i += blockDim.x) shared[i] = 0;
  __syncthreads();

  // 1. Tokens per (channel, destination rank); pairs per expert. One warp per channel.
  for (int c = warp_id(); c < numChannels; c += num_warps()) {
    const int64_t begin = channel_begin(a.numTokens, c, numChannels);
    const int64_t end = channel_begin(a.numTokens, c + 1, numChannels);
    int counts[kMaxRanks] = {};
    for (int64_t base = begin; base < end; base += 32) {
      const int64_t token = base + lane_id();
      const uint32_t mask = token < end ? token_rank_mask(a, token, expertCounts) : 0u;
#pragma unroll
      for (int r = 0; r < kMaxRanks; ++r) counts[r] += __popc(__ballot_sync(kFullMask, (mask >> r) & 1u));
    }
    if (lane_id() == 0)
      for (int r = 0; r < numRanks; ++r) channelCounts[c * numRanks + r] = counts[r];
  }
  __syncthreads();

  // 2. Where each channel's tokens start among this rank's tokens to each destination.
  if (threadIdx.x < numRanks) {
    const int r = threadIdx.x;
    int running = 0;
    for (int c = 0; c < numChannels; ++c) {
      channelStart[c * numRanks + r] = running;
      running += channelCounts[c * numRanks + r];
    }
    totals[r] = running;
  }
  __syncthreads();

  // 3. homeSlot[t][r]: position of token t among this rank's tokens to r (-1: not sent there).
  for (int c = warp_id(); c < numChannels; c += num_warps()) {
    const int64_t begin = channel_begin(a.numTokens, c, numChannels);
    const int64_t end = channel_begin(a.numTokens, c + 1, numChannels);
    int running[kMaxRanks];
#pragma unroll
    for (int r = 0; r < kMaxRanks; ++r) running[r] = r < numRanks ? channelStart[c * numRanks + r] : 0;
    const unsigned lowerLanes = (1u << lane_id()) - 1u;
    for (int64_t base = begin; base < end; base += 32) {
      const int64_t token = base + lane_id();
      const uint32_t mask = token < end ? token_rank_mask(a, token, nullptr) : 0u;
#pragma unroll
      for (int r = 0; r < kMaxRanks; ++r) {
        if (r >= numRanks) break;
        const unsigned ballot = __ballot_sync(kFullMask, (mask >> r) & 1u);
        if (token < end) homeSlot[token * numRanks + r] = ((mask >> r) & 1u) ? running[r] + __popc(ballot & lowerLanes) : -1;
        running[r] += __popc(ballot);
      }
    }
  }

  // 4. Once every peer has started this call, write this rank's counts into its slot on every peer.
  if (threadIdx.x < numRanks) wait_flag(ready_flag(buffer_at(comm, threadIdx.x)), seq, comm, threadIdx.x, BUN_EP_NORMAL_STEP_NOTIFY);
  __syncthreads();
  if (threadIdx.x == 0) proceed = !aborted(comm.workspace);
  __syncthreads();
  if (!proceed) return;
  for (int q = 0; q < numRanks; ++q) {
    int* slot = notify_slot(buffer_at(comm, q), me);
    for (int i = threadIdx.x; i < numRanks; i += blockDim.x) slot[kSlotTotals + i] = totals[i];
    for (int c = threadIdx.x; c < numChannels; c += blockDim.x) slot[kSlotChannels + c] = channelCounts[c * numRanks + q];
    for (int e = threadIdx.x; e < localExperts; e += blockDim.x) slot[kSlotExperts + e] = expertCounts[q * localExperts + e];
  }
  __syncthreads();
  if (threadIdx.x < numRanks) {
    __threadfence_system();
    st_release_sys(notify_slot(buffer_at(comm, threadIdx.x), me) + kSlotFlag, seq);
  }

  // 5. Wait for every rank's slot here.
  if (threadIdx.x < numRanks)
    wait_flag(notify_slot(myBuffer, threadIdx.x) + kSlotFlag, seq, comm, threadIdx.x, BUN_EP_NORMAL_STEP_NOTIFY);
  __syncthreads();
  if (threadIdx.x == 0) proceed = !aborted(comm.workspace);
  __syncthreads();
  if (!proceed) return;

  // 6. Offsets for dispatch and combine, per-expert counts, the host record.
  auto slotValue = [&](int source, int index) { return ld_volatile(notify_slot(myBuffer, source) + index); };
  if (threadIdx.x == 0) {
    int numRecv = 0;
    for (int s = 0; s < numRanks; ++s) {
      const int fromSource = slotValue(s, kSlotTotals + me);
      info[kInfoRecvSrcBase + s] = numRecv;
      info[kInfoRecvSrcCount + s] = fromSource;
      numRecv += fromSource;
      int before = 0;  // rows on s's combine staging from ranks < me
      for (int r = 0; r < me; ++r) before += slotValue(s, kSlotTotals + r);
      info[kInfoCombineDestBase + s] = before;
    }
    int maxRecv = -1, maxRecvRank = 0;
    for (int r = 0; r < numRanks; ++r) {
      int recvOfR = 0, beforeMe = 0;
      for (int s = 0; s < numRanks; ++s) {
        const int v = slotValue(s, kSlotTotals + r);
        recvOfR += v;
        if (s < me) beforeMe += v;
      }
      info[kInfoSendRowBase + r] = beforeMe;
      if (recvOfR > maxRecv) maxRecv = recvOfR, maxRecvRank = r;
    }
    int homeBase = 0;
    for (int r = 0; r < numRanks; ++r) {
      info[kInfoHomeBlockBase + r] = homeBase;
      homeBase += totals[r];
    }
    info[kInfoNumRecv] = numRecv;
    info[kInfoNumChannels] = numChannels;
    info[kInfoNumTokens] = static_cast<int>(a.numTokens);
    info[kInfoMaxRecv] = maxRecv;
    if (a.numWorstTokens > 0 && numRecv > a.numWorstTokens)
      record_error(comm.hostRecord, comm.workspace, BUN_EP_NORMAL_ERR_WORST_OVERFLOW, me, numRecv,
                   static_cast<int>(a.numWorstTokens), comm.seq, BUN_EP_NORMAL_STEP_NOTIFY);
    if (a.numWorstTokens > 0 && maxRecv > a.stagingRows)
      record_error(comm.hostRecord, comm.workspace, BUN_EP_NORMAL_ERR_STAGING, maxRecvRank, maxRecv,
                   static_cast<int>(a.stagingRows), comm.seq, BUN_EP_NORMAL_STEP_NOTIFY);
    volatile int32_t* rec = comm.hostRecord;
    rec[BUN_EP_REC_NUM_RECV] = numRecv;
    rec[BUN_EP_REC_MAX_RECV] = maxRecv;
    rec[BUN_EP_REC_MAX_RECV_RANK] = maxRecvRank;
  }
  if (threadIdx.x < numRanks) {
    const int s = threadIdx.x;
    int row = 0;
    for (int s2 = 0; s2 < s; ++s2) row += slotValue(s2, kSlotTotals + me);
    for (int c = 0; c < numChannels; ++c) {
      const int count = slotValue(s, kSlotChannels + c);
      info[kInfoChannelBegin + s * kMaxChannels + c] = row;
      info[kInfoChannelCount + s * kMaxChannels + c] = count;
      row += count;
    }
  }
  for (int e = threadIdx.x; e < localExperts; e += blockDim.x) {
    int count = 0;
    for (int s = 0; s < numRanks; ++s) count += slotValue(s, kSlotExperts + e);
    const int alignment = static_cast<int>(a.expertAlignment);
    const int aligned = (count + alignment - 1) / alignment * alignment;
    a.recvCountPerExpert[e] = aligned;
    static_cast<volatile int32_t*>(comm.hostRecord)[BUN_EP_REC_EXPERT_COUNTS + e] = aligned;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    static_cast<volatile int32_t*>(comm.hostRecord)[BUN_EP_REC_NOTIFY_SEQ] = seq;
    __threadfence_system();
  }
}

// ---- shared pieces of dispatch and combine ---------------------------------------------------------
__device__ __forceinline__ void copy_layout(PublishedLayout& to, const PublishedLayout* from) {
  const volatile int64_t* src = reinterpret_cast<const volatile int64_t*>(from);
  int64_t* dst = reinterpret_cast<int64_t*>(&to);
#pragma unroll
  for (int i = 0; i < int(sizeof(PublishedLayout) / 8); ++i) dst[i] = src[i];
}

// Block-wide: block 0 publishes this rank's layout for call seq, then "started seq"; every block
// waits (bounded) until every peer has started seq too and copies the peers' layouts into `peers`
// (shared memory). A peer that started call seq has finished every earlier call, so nothing it still
// reads is overwritten, and its layout stays put until this rank has signalled it (see the header).
// Returns false (in every thread) when the buffer aborted.
__device__ __forceinline__ bool start_call(const bunEpNormalComm_t& comm, int step, const PublishedLayout& mine,
                                           PublishedLayout* peers, int block) {
  __shared__ int proceed;
  const int seq = static_cast<int>(comm.seq);
  if (block == 0 && threadIdx.x == 0) {
    *published_layout(buffer_at(comm, comm.rank)) = mine;  // ordered before the flag by the release
    st_release_sys(ready_flag(buffer_at(comm, comm.rank)), seq);
  }
  if (threadIdx.x < comm.numRanks) {
    const int peer = threadIdx.x;
    if (wait_flag(ready_flag(buffer_at(comm, peer)), seq, comm, peer, step))
      copy_layout(peers[peer], published_layout(buffer_at(comm, peer)));
  }
  __syncthreads();
  if (threadIdx.x == 0) proceed = !aborted(comm.workspace);
  __syncthreads();
  return proceed != 0;
}

// Block-wide: make this block's stores visible, then set `flagOf(peer)` to seq on every peer.
template <typename FlagOf>
__device__ __forceinline__ void signal_peers(const bunEpNormalComm_t& comm, FlagOf flagOf) {
  __syncthreads();
  if (threadIdx.x < comm.numRanks) {
    __threadfence_system();
    st_release_sys(flagOf(static_cast<int>(threadIdx.x)), static_cast<int>(comm.seq));
  }
}

// Block-wide: wait for flagOf(rank, block) >= seq for every rank and every block of the grid.
// Returns false (in every thread) when some wait gave up.
template <typename FlagOf>
__device__ __forceinline__ bool wait_all_blocks(const bunEpNormalComm_t& comm, int numRanks, int numBlocks, int step,
                                                FlagOf flagOf) {
  __shared__ int allArrived;
  if (threadIdx.x == 0) allArrived = 1;
  __syncthreads();
  for (int i = threadIdx.x; i < numRanks * numBlocks; i += blockDim.x)
    if (!wait_flag(flagOf(i / numBlocks, i % numBlocks), static_cast<int>(comm.seq), comm, i / numBlocks, step))
      allArrived = 0;
  __syncthreads();
  return allArrived != 0;
}

// Copy one row of `numVectors` int4 from src to every destination in dsts[0..kRanks) that is not
// null, with kUnroll loads in flight per lane (the row is read once, written once per destination).
template <int kUnroll, int kRanks, bool kSourceIsInput>
__device__ __forceinline__ void copy_row_to_many(const int4* src, int4* const (&dsts)[kRanks], int64_t numVectors) {
  for (int64_t i = lane_id(); i < numVectors; i += 32 * kUnroll) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t at = i + u * 32;
      if (at < numVectors) v[u] = kSourceIsInput ? ld_nc_int4(src + at) : ld_na_int4(src + at);
    }
#pragma unroll
    for (int r = 0; r < kRanks; ++r) {
      if (dsts[r] == nullptr) continue;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t at = i + u * 32;
        if (at < numVectors) st_na_int4(dsts[r] + at, v[u]);
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ T* field_row(char* buffer, int64_t offset, int64_t rowBytes, int64_t row) {
  return offset < 0 ? nullptr : reinterpret_cast<T*>(buffer + offset + row * rowBytes);
}

// ---- dispatch: one block per channel --------------------------------------------------------------
template <int kRanks>
__device__ __forceinline__ void dispatch_block(const bunEpDispatchArgs_t& a, const PublishedLayout& mine, int channel,
                                               int numChannels) {
  __shared__ int sendRowBase[kMaxRanks];
  __shared__ PublishedLayout peers[kMaxRanks];
  __shared__ int sourceArrived;
  const bunEpNormalComm_t& comm = a.comm;
  const int me = static_cast<int>(comm.rank);
  const int seq = static_cast<int>(comm.seq);
  const int* info = a.handle;
  const int* homeSlot = a.handle + kInfoInts;
  const int numExperts = static_cast<int>(a.numExperts);
  const int localExperts = numExperts / kRanks;
  const int64_t xBytes = a.hidden * a.elementBytes;
  const int64_t vectorsPerRow = xBytes / 16;
  const int scalesPerRow = a.xScales != nullptr ? static_cast<int>(a.hidden / 128) : 0;
  const int topk = static_cast<int>(a.topk);
  char* myBuffer = buffer_at(comm, me);

  if (threadIdx.x < kRanks) sendRowBase[threadIdx.x] = info[kInfoSendRowBase + threadIdx.x];
  const bool proceed = start_call(comm, BUN_EP_NORMAL_STEP_DISPATCH, mine, peers, channel);

  // Send: one warp per token of this channel, straight into each receiver's final row (its staging
  // area, or its receive tensors when it published a direct layout).
  if (proceed) {
    const int64_t begin = channel_begin(a.numTokens, channel, numChannels);
    const int64_t end = channel_begin(a.numTokens, channel + 1, numChannels);
    for (int64_t token = begin + warp_id(); token < end; token += num_warps()) {
      const int mySlot = lane_id() < kRanks ? homeSlot[token * kRanks + lane_id()] : -1;
      int64_t destRow[kRanks];
      int4* destX[kRanks];
#pragma unroll
      for (int r = 0; r < kRanks; ++r) {
        const int slot = __shfl_sync(kFullMask, mySlot, r);
        destRow[r] = slot >= 0 ? int64_t(sendRowBase[r]) + slot : -1;
        if (destRow[r] >= peers[r].rows) {
          // Staged: the staging area is too small (also checked on the host). Direct: the receiver's
          // numWorstTokens is too small, which its notify step reports.
          if (lane_id() == 0 && !peers[r].direct)
            record_error(comm.hostRecord, comm.workspace, BUN_EP_NORMAL_ERR_STAGING, r, int(destRow[r] + 1),
                         int(peers[r].rows), comm.seq, BUN_EP_NORMAL_STEP_DISPATCH);
          destRow[r] = -1;
        }
        destX[r] = destRow[r] < 0 ? nullptr : field_row<int4>(buffer_at(comm, r), peers[r].xOffset, peers[r].xBytes, destRow[r]);
      }
      copy_row_to_many<4, kRanks, true>(
          reinterpret_cast<const int4*>(static_cast<const char*>(a.x) + token * xBytes), destX, vectorsPerRow);
      for (int j = lane_id(); j < scalesPerRow; j += 32) {
        const float scale = a.xScales[token * scalesPerRow + j];
#pragma unroll
        for (int r = 0; r < kRanks; ++r) {
          float* dst = destRow[r] < 0 ? nullptr
                                      : field_row<float>(buffer_at(comm, r), peers[r].scalesOffset, peers[r].scaleBytes, destRow[r]);
          if (dst != nullptr) dst[j] = scale;
        }
      }
      if (a.topkIdx != nullptr) {
        for (int k = lane_id(); k < topk; k += 32) {
          const int64_t expert = a.topkIdx[token * topk + k];
          const float weight = a.topkWeights != nullptr ? a.topkWeights[token * topk + k] : 0.0f;
#pragma unroll
          for (int r = 0; r < kRanks; ++r) {
            if (destRow[r] < 0) continue;
            const bool local = expert >= 0 && expert < numExperts && expert / localExperts == r;
            int64_t* idx = field_row<int64_t>(buffer_at(comm, r), peers[r].idxOffset, peers[r].idxBytes, destRow[r]);
            float* w = field_row<float>(buffer_at(comm, r), peers[r].weightsOffset, peers[r].weightBytes, destRow[r]);
            if (idx != nullptr) idx[k] = local ? expert - int64_t(r) * localExperts : -1;
            if (w != nullptr) w[k] = local ? weight : 0.0f;
          }
        }
      }
    }
  }
  // An aborted rank signals nothing: its peers then time out naming it instead of using missing rows.
  if (proceed) signal_peers(comm, [&](int peer) { return dispatch_done(buffer_at(comm, peer), me, channel); });

  // Receive: wait for this channel of every source; when staged, copy its rows out of the staging area.
  for (int source = 0; source < kRanks && proceed; ++source) {
    if (threadIdx.x == 0)
      sourceArrived = wait_flag(dispatch_done(myBuffer, source, channel), seq, comm, source, BUN_EP_NORMAL_STEP_DISPATCH);
    __syncthreads();
    if (!sourceArrived) break;
    if (mine.direct) continue;  // the rows are already in the receive tensors
    const int64_t rowBegin = info[kInfoChannelBegin + source * kMaxChannels + channel];
    const int64_t rowEnd = rowBegin + info[kInfoChannelCount + source * kMaxChannels + channel];
    for (int64_t row = rowBegin + warp_id(); row < rowEnd; row += num_warps()) {
      if (row >= a.recvRows || row >= mine.rows) continue;  // numWorstTokens overflow: reported by notify
      int4* dst[1] = {reinterpret_cast<int4*>(static_cast<char*>(a.recvX) + row * xBytes)};
      copy_row_to_many<4, 1, false>(field_row<const int4>(myBuffer, mine.xOffset, mine.xBytes, row), dst, vectorsPerRow);
      // Each field only when this rank published it (then its receive tensor exists too).
      if (mine.scalesOffset >= 0) {
        const float* src = field_row<const float>(myBuffer, mine.scalesOffset, mine.scaleBytes, row);
        const int recvScales = static_cast<int>(mine.scaleBytes / 4);
        for (int j = lane_id(); j < recvScales; j += 32) a.recvXScales[row * recvScales + j] = src[j];
      }
      if (mine.idxOffset >= 0) {
        const int64_t* src = field_row<const int64_t>(myBuffer, mine.idxOffset, mine.idxBytes, row);
        for (int k = lane_id(); k < topk; k += 32) a.recvTopkIdx[row * topk + k] = src[k];
      }
      if (mine.weightsOffset >= 0) {
        const float* src = field_row<const float>(myBuffer, mine.weightsOffset, mine.weightBytes, row);
        for (int k = lane_id(); k < topk; k += 32) a.recvTopkWeights[row * topk + k] = src[k];
      }
    }
    __syncthreads();
  }
}

// ---- combine -------------------------------------------------------------------------------------
// Push the rows this rank received from each home rank (this block's share) into that home's staging.
template <int kRanks>
__device__ __forceinline__ void combine_push(const bunEpCombineArgs_t& a, const StagingLayout& st, int block,
                                             int numBlocks) {
  const bunEpNormalComm_t& comm = a.comm;
  const int me = static_cast<int>(comm.rank);
  const int* info = a.handle;
  const int topk = static_cast<int>(a.topk);
  for (int step = 1; step <= kRanks; ++step) {
    const int home = (me + step) % kRanks;  // spread the blocks' first writes over the peers
    const int64_t base = info[kInfoRecvSrcBase + home];
    const int64_t count = info[kInfoRecvSrcCount + home];
    const int64_t destBase = info[kInfoCombineDestBase + home];
    const int64_t begin = count * block / numBlocks;
    const int64_t end = count * (block + 1) / numBlocks;
    char* homeBuffer = buffer_at(comm, home);
    for (int64_t j = begin + warp_id(); j < end; j += num_warps()) {
      const int64_t destRow = destBase + j;
      if (destRow >= st.rows) {
        if (lane_id() == 0)
          record_error(comm.hostRecord, comm.workspace, BUN_EP_NORMAL_ERR_STAGING, home, int(destRow + 1), int(st.rows),
                       comm.seq, BUN_EP_NORMAL_STEP_COMBINE);
        continue;
      }
      int4* dst[1] = {reinterpret_cast<int4*>(homeBuffer + st.xOffset + destRow * st.xBytes)};
      copy_row_to_many<4, 1, true>(reinterpret_cast<const int4*>(a.x + (base + j) * a.hidden), dst, st.xBytes / 16);
      if (topk > 0) {
        float* w = reinterpret_cast<float*>(homeBuffer + st.weightsOffset + destRow * st.weightBytes);
        for (int k = lane_id(); k < topk; k += 32) w[k] = a.topkWeights[(base + j) * topk + k];
      }
    }
  }
}

// Vectors per rank each lane loads before reducing: about eight 16-byte loads in flight per lane.
template <int kRanks>
constexpr int kCombineUnroll = kRanks <= 2 ? 4 : (kRanks <= 4 ? 2 : 1);

template <int kRanks>
__device__ __forceinline__ void combine_block(const bunEpCombineArgs_t& a, const StagingLayout& st,
                                              const PublishedLayout& mine, int block, int numBlocks) {
  __shared__ int homeBase[kMaxRanks];
  __shared__ int sendRowBase[kMaxRanks];
  __shared__ PublishedLayout peers[kMaxRanks];
  const bunEpNormalComm_t& comm = a.comm;
  const int me = static_cast<int>(comm.rank);
  const int* info = a.handle;
  const int* homeSlot = a.handle + kInfoInts;
  const int64_t vectorsPerRow = st.xBytes / 16;
  const int topk = static_cast<int>(a.topk);
  char* myBuffer = buffer_at(comm, me);

  if (threadIdx.x < kRanks) {
    homeBase[threadIdx.x] = info[kInfoHomeBlockBase + threadIdx.x];
    sendRowBase[threadIdx.x] = info[kInfoSendRowBase + threadIdx.x];
  }
  if (!start_call(comm, BUN_EP_NORMAL_STEP_COMBINE, mine, peers, block)) return;

  // Push (unless this rank lets the home ranks pull), then tell every home this block is done.
  if (!mine.direct) combine_push<kRanks>(a, st, block, numBlocks);
  signal_peers(comm, [&](int peer) { return combine_done(buffer_at(comm, peer), me, block); });

  // Reduce: wait for every (rank, block) of this call, then sum each home token in rank order, each
  // rank's row read from this rank's staging (push) or straight from that rank's buffer (pull).
  const bool arrived = wait_all_blocks(comm, kRanks, numBlocks, BUN_EP_NORMAL_STEP_COMBINE,
                                       [&](int rank, int b) { return combine_done(myBuffer, rank, b); });
  if (!arrived) return;

  const int64_t begin = a.numTokens * block / numBlocks;
  const int64_t end = a.numTokens * (block + 1) / numBlocks;
  for (int64_t token = begin + warp_id(); token < end; token += num_warps()) {
    const int mySlot = lane_id() < kRanks ? homeSlot[token * kRanks + lane_id()] : -1;
    const int4* rows[kRanks];
    const float* weightRows[kRanks];
#pragma unroll
    for (int r = 0; r < kRanks; ++r) {
      const int slot = __shfl_sync(kFullMask, mySlot, r);
      rows[r] = nullptr;
      weightRows[r] = nullptr;
      if (slot < 0) continue;
      if (peers[r].direct) {
        const int64_t row = int64_t(sendRowBase[r]) + slot;  // where r received (me, token)
        rows[r] = field_row<const int4>(buffer_at(comm, r), peers[r].xOffset, peers[r].xBytes, row);
        weightRows[r] = field_row<const float>(buffer_at(comm, r), peers[r].weightsOffset, peers[r].weightBytes, row);
      } else {
        const int64_t row = int64_t(homeBase[r]) + slot;
        if (row >= st.rows) continue;  // reported by the pusher
        rows[r] = reinterpret_cast<const int4*>(myBuffer + st.xOffset + row * st.xBytes);
        weightRows[r] = reinterpret_cast<const float*>(myBuffer + st.weightsOffset + row * st.weightBytes);
      }
    }
    const int4* bias0 = a.bias0 != nullptr ? reinterpret_cast<const int4*>(a.bias0 + token * a.hidden) : nullptr;
    const int4* bias1 = a.bias1 != nullptr ? reinterpret_cast<const int4*>(a.bias1 + token * a.hidden) : nullptr;
    int4* out = reinterpret_cast<int4*>(a.combinedX + token * a.hidden);
    // Sum in a fixed order (bias0, bias1, then ranks ascending) and round once.
    const auto reduce_store = [&](int64_t i, const int4 (&parts)[kRanks]) {
      float acc[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] = 0.0f;
      if (bias0 != nullptr) add_bf16x8(acc, ld_nc_int4(bias0 + i));
      if (bias1 != nullptr) add_bf16x8(acc, ld_nc_int4(bias1 + i));
#pragma unroll
      for (int r = 0; r < kRanks; ++r)
        if (rows[r] != nullptr) add_bf16x8(acc, parts[r]);
      st_na_int4(out + i, pack_bf16x8(acc));
    };
    // Pulled rows come over NVLink when the ranks sit on different GPUs: reads there are
    // latency-bound, so each lane keeps kCombineUnroll vectors of every rank in flight (2x H200,
    // 2026-11-23: one vector per rank pulled 286 GB/s at EP2, 0.97x DeepEP's push).
    int64_t i = lane_id();
    for (; i + 32 * (kCombineUnroll<kRanks> - 1) < vectorsPerRow; i += 32 * kCombineUnroll<kRanks>) {
      int4 parts[kCombineUnroll<kRanks>][kRanks];
#pragma unroll
      for (int u = 0; u < kCombineUnroll<kRanks>; ++u)
#pragma unroll
        for (int r = 0; r < kRanks; ++r)
          if (rows[r] != nullptr) parts[u][r] = ld_na_int4(rows[r] + i + 32 * u);
#pragma unroll
      for (int u = 0; u < kCombineUnroll<kRanks>; ++u) reduce_store(i + 32 * u, parts[u]);
    }
    for (; i < vectorsPerRow; i += 32) {
      int4 parts[kRanks];
#pragma unroll
      for (int r = 0; r < kRanks; ++r)
        if (rows[r] != nullptr) parts[r] = ld_na_int4(rows[r] + i);
      reduce_store(i, parts);
    }
    if (a.combinedTopkWeights != nullptr) {
      for (int k = lane_id(); k < topk; k += 32) {
        float acc = 0.0f;
#pragma unroll
        for (int r = 0; r < kRanks; ++r)
          if (weightRows[r] != nullptr) acc = __fadd_rn(acc, weightRows[r][k]);
        a.combinedTopkWeights[token * topk + k] = acc;
      }
    }
  }

  // Tell every rank this block has finished reading its rows; a rank whose rows were pulled must
  // not finish (and let its x be overwritten or freed) before every home block has read them.
  signal_peers(comm, [&](int peer) { return combine_read(buffer_at(comm, peer), me, block); });
  if (mine.direct)
    wait_all_blocks(comm, kRanks, numBlocks, BUN_EP_NORMAL_STEP_COMBINE,
                    [&](int home, int b) { return combine_read(myBuffer, home, b); });
}

// ---- kernels: one launch runs the same step for every rank of this process on this device ----------
// Why one launch: the ranks' kernels wait on each other, so all of them must run at once. Launched on
// separate streams, that holds only by luck: streams share a few hardware queues (fewer still under
// MPS), and a rank's kernel can sit in a queue behind a peer's spinning kernel or behind a stream
// wait on it, and never start. One grid with every local rank's blocks has no such order between
// them; the host sizes it so that all blocks are resident at once (see lib/backend/cuda.ts, LaunchBatch).
// Ranks in other processes or on other devices run their own launch; nothing on their queues waits on
// this launch before it was made, so they cannot be blocked behind it.
// Entry i of a batch is the i-th local rank's arguments; block b serves entry b / blocksPerRank.
struct NotifyBatch {
  bunEpNotifyArgs_t entries[kMaxRanks];
};
struct DispatchEntry {
  bunEpDispatchArgs_t args;
  PublishedLayout mine;
};
struct DispatchBatch {
  DispatchEntry entries[kMaxRanks];
  int64_t blocksPerRank;
};
struct CombineEntry {
  bunEpCombineArgs_t args;
  StagingLayout st;
  PublishedLayout mine;
};
struct CombineBatch {
  CombineEntry entries[kMaxRanks];
  int64_t blocksPerRank;
};
static_assert(sizeof(CombineBatch) <= 4096 && sizeof(DispatchBatch) <= 4096 && sizeof(NotifyBatch) <= 4096,
              "a batch must fit the 4 KiB kernel parameter space");

__global__ void __launch_bounds__(kNotifyThreads) notify_kernel(const __grid_constant__ NotifyBatch batch) {
  notify_block(batch.entries[blockIdx.x]);
}

// kSingle: the batch has one entry (a rank alone in its process on this device: processes, one rank
// per GPU). Its arguments then sit at fixed parameter offsets that instructions read directly; an
// entry picked by blockIdx turns every argument read in the copy loops into an indexed constant load
// (batch 3: EP2/EP4 dispatch in processes 10-30% slower than before batching).
template <bool kSingle, typename Entry>
__device__ __forceinline__ const Entry& entry_of(const Entry (&entries)[kMaxRanks], int blocksPerRank) {
  return kSingle ? entries[0] : entries[blockIdx.x / blocksPerRank];
}

template <int kRanks, bool kSingle>
__global__ void __launch_bounds__(kDefaultThreads) dispatch_kernel(const __grid_constant__ DispatchBatch batch) {
  const int blocksPerRank = static_cast<int>(batch.blocksPerRank);
  const DispatchEntry& e = entry_of<kSingle>(batch.entries, blocksPerRank);
  const int channel = kSingle ? static_cast<int>(blockIdx.x) : static_cast<int>(blockIdx.x) % blocksPerRank;
  dispatch_block<kRanks>(e.args, e.mine, channel, blocksPerRank);
}

template <int kRanks, bool kSingle>
__global__ void __launch_bounds__(kDefaultThreads) combine_kernel(const __grid_constant__ CombineBatch batch) {
  const int blocksPerRank = static_cast<int>(batch.blocksPerRank);
  const CombineEntry& e = entry_of<kSingle>(batch.entries, blocksPerRank);
  const int channel = kSingle ? static_cast<int>(blockIdx.x) : static_cast<int>(blockIdx.x) % blocksPerRank;
  combine_block<kRanks>(e.args, e.st, e.mine, channel, blocksPerRank);
}

// ---- host side -------------------------------------------------------------------------------------
bunEpResult_t check_comm(const bunEpNormalComm_t& comm, const char* what) {
  BUN_EP_REQUIRE(comm.numRanks >= 1 && comm.numRanks <= kMaxRanks, "%s: numRanks must be in [1, %d], got %lld", what,
                 kMaxRanks, (long long)comm.numRanks);
  BUN_EP_REQUIRE(comm.rank >= 0 && comm.rank < comm.numRanks, "%s: rank must be in [0, %lld), got %lld", what,
                 (long long)comm.numRanks, (long long)comm.rank);
  for (int r = 0; r < comm.numRanks; ++r)
    BUN_EP_REQUIRE(comm.peerBuffers[r] != nullptr, "%s: peerBuffers[%d] is NULL", what, r);
  BUN_EP_REQUIRE(comm.bufferBytes > BUN_EP_NORMAL_CONTROL_BYTES, "%s: bufferBytes must exceed %d, got %lld", what,
                 BUN_EP_NORMAL_CONTROL_BYTES, (long long)comm.bufferBytes);
  BUN_EP_REQUIRE(comm.hostRecord != nullptr && comm.workspace != nullptr, "%s: hostRecord and workspace are required",
                 what);
  BUN_EP_REQUIRE(comm.seq >= 1 && comm.seq < (int64_t(1) << 31), "%s: seq must be in [1, 2^31), got %lld", what,
                 (long long)comm.seq);
  BUN_EP_REQUIRE(comm.timeoutNs > 0, "%s: timeoutNs must be > 0, got %lld", what, (long long)comm.timeoutNs);
  return bunEpSuccess;
}

int threads_of(int64_t requested) {
  if (requested <= 0) return kDefaultThreads;
  const int64_t rounded = requested / 32 * 32;
  return static_cast<int>(rounded < 64 ? 64 : (rounded > kDefaultThreads ? kDefaultThreads : rounded));
}

template <template <int> class Launcher, typename... Args>
bunEpResult_t launch_for_ranks(int numRanks, Args&&... args) {
  switch (numRanks) {
    case 1: return Launcher<1>::run(args...);
    case 2: return Launcher<2>::run(args...);
    case 3: return Launcher<3>::run(args...);
    case 4: return Launcher<4>::run(args...);
    case 5: return Launcher<5>::run(args...);
    case 6: return Launcher<6>::run(args...);
    case 7: return Launcher<7>::run(args...);
    case 8: return Launcher<8>::run(args...);
    default: return set_error(bunEpInvalidArgument, "numRanks must be in [1, 8], got %d", numRanks);
  }
}

// The layout this rank publishes for a dispatch: its staging area, or its receive tensors (direct).
bunEpResult_t dispatch_layout(const bunEpDispatchArgs_t& a, PublishedLayout& out) {
  // Which fields this rank receives follows from its own receive tensors, never from its own inputs:
  // a rank with 0 tokens has a NULL topkIdx (0-byte tensor) yet receives rows with indices. (Deriving
  // the index stride from its inputs made it 0 there, so every sender wrote every row's indices and
  // weights over row 0.)
  const bool fp8 = a.elementBytes == 1;
  const bool receivesIdx = a.recvTopkIdx != nullptr && a.topk > 0;
  const bool receivesWeights = a.recvTopkWeights != nullptr && a.topk > 0;
  out = PublishedLayout{};
  out.xBytes = a.hidden * a.elementBytes;
  out.scaleBytes = fp8 ? (a.hidden / 128) * 4 : 0;
  out.idxBytes = receivesIdx ? a.topk * 8 : 0;
  out.weightBytes = receivesWeights ? a.topk * 4 : 0;
  if (!a.recvDirect) {
    const StagingLayout st = staging_layout(a.comm.bufferBytes, out.xBytes, out.scaleBytes, out.idxBytes, out.weightBytes);
    out.xOffset = st.xOffset;
    out.scalesOffset = fp8 ? st.scalesOffset : -1;
    out.idxOffset = receivesIdx ? st.idxOffset : -1;
    out.weightsOffset = receivesWeights ? st.weightsOffset : -1;
    out.rows = st.rows;
    out.direct = 0;
    return bunEpSuccess;
  }
  const char* base = static_cast<const char*>(a.comm.peerBuffers[a.comm.rank]);
  auto offsetOf = [&](const void* p, const char* name, int64_t& offset) -> bunEpResult_t {
    offset = -1;
    if (p == nullptr || a.recvRows == 0) return bunEpSuccess;
    offset = static_cast<const char*>(p) - base;
    BUN_EP_REQUIRE(offset >= a.comm.bufferBytes && offset % 16 == 0,
                   "dispatch: recvDirect needs %s inside this rank's registered buffer after the staging area "
                   "(offset %lld, staging ends at %lld)", name, (long long)offset, (long long)a.comm.bufferBytes);
    return bunEpSuccess;
  };
  BUN_EP_TRY(offsetOf(a.recvX, "recvX", out.xOffset));
  BUN_EP_TRY(offsetOf(fp8 ? a.recvXScales : nullptr, "recvXScales", out.scalesOffset));
  BUN_EP_TRY(offsetOf(receivesIdx ? a.recvTopkIdx : nullptr, "recvTopkIdx", out.idxOffset));
  BUN_EP_TRY(offsetOf(receivesWeights ? a.recvTopkWeights : nullptr, "recvTopkWeights", out.weightsOffset));
  out.rows = a.recvRows;
  out.direct = 1;
  return bunEpSuccess;
}

// The layout this rank publishes for a combine: where home ranks pull its rows from (direct), or
// nothing (it pushes into their staging areas).
bunEpResult_t combine_layout(const bunEpCombineArgs_t& a, PublishedLayout& out) {
  out = PublishedLayout{};
  out.xOffset = out.scalesOffset = out.idxOffset = out.weightsOffset = -1;
  out.xBytes = a.hidden * 2;
  out.weightBytes = a.topk * 4;
  if (!a.xDirect) return bunEpSuccess;
  const char* base = static_cast<const char*>(a.comm.peerBuffers[a.comm.rank]);
  out.xOffset = reinterpret_cast<const char*>(a.x) - base;
  BUN_EP_REQUIRE(a.x != nullptr && out.xOffset >= a.comm.bufferBytes && out.xOffset % 16 == 0,
                 "combine: xDirect needs x inside this rank's registered buffer after the staging area (offset %lld)",
                 (long long)out.xOffset);
  if (a.topkWeights != nullptr) {
    out.weightsOffset = reinterpret_cast<const char*>(a.topkWeights) - base;
    BUN_EP_REQUIRE(out.weightsOffset >= a.comm.bufferBytes,
                   "combine: xDirect needs topkWeights inside this rank's registered buffer too (offset %lld)",
                   (long long)out.weightsOffset);
  }
  out.rows = INT64_MAX;
  out.direct = 1;
  return bunEpSuccess;
}

// Blocks of one kernel that can be resident at once on the current device: every block of a batch
// spins until the others have run, so a batch that does not fit would wait forever.
template <typename Kernel>
bunEpResult_t check_resident(Kernel kernel, int threads, size_t sharedBytes, int64_t blocks, const char* what) {
  int device = 0, numSMs = 0, perSM = 0;
  BUN_EP_CUDA_CHECK(cudaGetDevice(&device));
  BUN_EP_CUDA_CHECK(cudaDeviceGetAttribute(&numSMs, cudaDevAttrMultiProcessorCount, device));
  BUN_EP_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&perSM, kernel, threads, sharedBytes));
  BUN_EP_REQUIRE(blocks <= int64_t(perSM) * numSMs,
                 "%s: %lld blocks (numSMs x ranks of this process on device %d) cannot all run at once there "
                 "(at most %d per SM x %d SMs); lower config.numSMs",
                 what, (long long)blocks, device, perSM, numSMs);
  return bunEpSuccess;
}

template <int kRanks>
struct DispatchLauncher {
  static bunEpResult_t run(const DispatchBatch& batch, int64_t count, int threads, cudaStream_t stream) {
    const int64_t blocks = count * batch.blocksPerRank;
    return count == 1 ? launch<true>(batch, blocks, threads, stream) : launch<false>(batch, blocks, threads, stream);
  }
  template <bool kSingle>
  static bunEpResult_t launch(const DispatchBatch& batch, int64_t blocks, int threads, cudaStream_t stream) {
    BUN_EP_TRY(check_resident(dispatch_kernel<kRanks, kSingle>, threads, 0, blocks, "dispatch"));
    dispatch_kernel<kRanks, kSingle><<<static_cast<int>(blocks), threads, 0, stream>>>(batch);
    BUN_EP_LAUNCH_CHECK();
    return bunEpSuccess;
  }
};

template <int kRanks>
struct CombineLauncher {
  static bunEpResult_t run(const CombineBatch& batch, int64_t count, int threads, cudaStream_t stream) {
    const int64_t blocks = count * batch.blocksPerRank;
    return count == 1 ? launch<true>(batch, blocks, threads, stream) : launch<false>(batch, blocks, threads, stream);
  }
  template <bool kSingle>
  static bunEpResult_t launch(const CombineBatch& batch, int64_t blocks, int threads, cudaStream_t stream) {
    BUN_EP_TRY(check_resident(combine_kernel<kRanks, kSingle>, threads, 0, blocks, "combine"));
    combine_kernel<kRanks, kSingle><<<static_cast<int>(blocks), threads, 0, stream>>>(batch);
    BUN_EP_LAUNCH_CHECK();
    return bunEpSuccess;
  }
};

// The entries of one batch must be distinct ranks of one group that agree on the grid.
bunEpResult_t check_batch_entry(const bunEpNormalComm_t& first, const bunEpNormalComm_t& comm, int64_t index,
                                int64_t blocks, int64_t firstBlocks, int64_t threads, int64_t firstThreads,
                                const char* what) {
  BUN_EP_REQUIRE(comm.numRanks == first.numRanks && comm.seq == first.seq,
                 "%s: batch entry %lld has numRanks %lld and seq %lld, entry 0 has %lld and %lld", what,
                 (long long)index, (long long)comm.numRanks, (long long)comm.seq, (long long)first.numRanks,
                 (long long)first.seq);
  BUN_EP_REQUIRE(blocks == firstBlocks && threads == firstThreads,
                 "%s: every rank must use the same numSMs and threads; batch entry %lld (rank %lld) has %lld and %lld, "
                 "entry 0 has %lld and %lld",
                 what, (long long)index, (long long)comm.rank, (long long)blocks, (long long)threads,
                 (long long)firstBlocks, (long long)firstThreads);
  return bunEpSuccess;
}

bunEpResult_t check_count(int64_t count, const char* what) {
  BUN_EP_REQUIRE(count >= 1 && count <= kMaxRanks, "%s: count must be in [1, %d], got %lld", what, kMaxRanks,
                 (long long)count);
  return bunEpSuccess;
}

}  // namespace
}  // namespace normal
}  // namespace bun_ep

using namespace bun_ep;
using namespace bun_ep::normal;

extern "C" BUN_EP_API bunEpResult_t bun_ep_normal_constants(int64_t* out, int64_t count) {
  BUN_EP_REQUIRE(out != nullptr && count >= 7, "bun_ep_normal_constants: out must hold 7 values, got %lld",
                 (long long)count);
  out[0] = BUN_EP_NORMAL_CONTROL_BYTES;
  out[1] = BUN_EP_NORMAL_HOST_RECORD_BYTES;
  out[2] = BUN_EP_NORMAL_WORKSPACE_BYTES;
  out[3] = kMaxRanks;
  out[4] = kMaxChannels;
  out[5] = kMaxLocalExperts;
  out[6] = kInfoInts;
  return bunEpSuccess;
}

extern "C" BUN_EP_API int64_t bun_ep_normal_handle_bytes(int64_t numTokens, int64_t numRanks) {
  return 4 * (int64_t(kInfoInts) + numTokens * numRanks);
}

extern "C" BUN_EP_API int64_t bun_ep_normal_staging_rows(int64_t bufferBytes, int64_t hidden, int64_t elementBytes,
                                                         int64_t hasScales, int64_t topk, int64_t hasWeights) {
  return staging_layout(bufferBytes, hidden * elementBytes, hasScales ? (hidden / 128) * 4 : 0, topk * 8,
                        hasWeights ? topk * 4 : 0)
      .rows;
}

namespace {
bunEpResult_t check_notify(const bunEpNotifyArgs_t& a, size_t& sharedBytes) {
  BUN_EP_TRY(check_comm(a.comm, "notify"));
  BUN_EP_REQUIRE(a.numExperts % a.comm.numRanks == 0 && a.numExperts >= a.comm.numRanks,
                 "notify: numExperts (%lld) must be a positive multiple of numRanks (%lld)", (long long)a.numExperts,
                 (long long)a.comm.numRanks);
  BUN_EP_REQUIRE(a.numExperts / a.comm.numRanks <= kMaxLocalExperts,
                 "notify: numExperts / numRanks must be <= %d, got %lld", kMaxLocalExperts,
                 (long long)(a.numExperts / a.comm.numRanks));
  BUN_EP_REQUIRE(a.numChannels >= 1 && a.numChannels <= kMaxChannels, "notify: numChannels must be in [1, %d], got %lld",
                 kMaxChannels, (long long)a.numChannels);
  BUN_EP_REQUIRE(a.numTokens >= 0 && a.numTokens < (int64_t(1) << 30), "notify: numTokens out of range: %lld",
                 (long long)a.numTokens);
  BUN_EP_REQUIRE(a.expertAlignment >= 1, "notify: expertAlignment must be >= 1, got %lld", (long long)a.expertAlignment);
  BUN_EP_REQUIRE(a.handle != nullptr && a.recvCountPerExpert != nullptr, "notify: handle and recvCountPerExpert are required");
  BUN_EP_REQUIRE(a.numTokens == 0 || a.topkIdx != nullptr, "notify: topkIdx is NULL");
  sharedBytes = sizeof(int) * (a.numExperts + 2 * a.numChannels * a.comm.numRanks);
  BUN_EP_REQUIRE(sharedBytes <= 48 * 1024, "notify: numExperts (%lld) too large for one block's shared memory",
                 (long long)a.numExperts);
  return bunEpSuccess;
}
}  // namespace

extern "C" BUN_EP_API bunEpResult_t bun_ep_normal_notify(const bunEpNotifyArgs_t* args, int64_t count) {
  BUN_EP_REQUIRE(args != nullptr, "bun_ep_normal_notify: args is NULL");
  BUN_EP_TRY(check_count(count, "notify"));
  NotifyBatch batch{};
  size_t sharedBytes = 0;
  for (int64_t i = 0; i < count; ++i) {
    size_t entryShared = 0;
    BUN_EP_TRY(check_notify(args[i], entryShared));
    BUN_EP_TRY(check_batch_entry(args[0].comm, args[i].comm, i, args[i].numChannels, args[0].numChannels, 0, 0, "notify"));
    sharedBytes = entryShared > sharedBytes ? entryShared : sharedBytes;
    batch.entries[i] = args[i];
  }
  BUN_EP_TRY(check_resident(notify_kernel, kNotifyThreads, sharedBytes, count, "notify"));
  notify_kernel<<<static_cast<int>(count), kNotifyThreads, sharedBytes, static_cast<cudaStream_t>(args[0].comm.stream)>>>(batch);
  BUN_EP_LAUNCH_CHECK();
  return bunEpSuccess;
}

namespace {
bunEpResult_t check_dispatch(const bunEpDispatchArgs_t& a) {
  BUN_EP_TRY(check_comm(a.comm, "dispatch"));
  BUN_EP_REQUIRE(a.elementBytes == 1 || a.elementBytes == 2, "dispatch: elementBytes must be 1 or 2, got %lld",
                 (long long)a.elementBytes);
  BUN_EP_REQUIRE((a.hidden * a.elementBytes) % 16 == 0 && a.hidden > 0,
                 "dispatch: hidden * elementBytes must be a positive multiple of 16 bytes, got hidden %lld",
                 (long long)a.hidden);
  BUN_EP_REQUIRE(a.elementBytes == 2 || (a.hidden % 128 == 0 && a.xScales != nullptr),
                 "dispatch: fp8 needs hidden %% 128 == 0 (got %lld) and xScales", (long long)a.hidden);
  BUN_EP_REQUIRE(a.numChannels >= 1 && a.numChannels <= kMaxChannels, "dispatch: numChannels must be in [1, %d], got %lld",
                 kMaxChannels, (long long)a.numChannels);
  BUN_EP_REQUIRE(a.handle != nullptr && (a.numTokens == 0 || a.x != nullptr), "dispatch: handle and x are required");
  BUN_EP_REQUIRE(a.recvRows == 0 || a.recvX != nullptr, "dispatch: recvX is NULL");
  BUN_EP_REQUIRE(a.topk >= 0 && a.topk <= 64, "dispatch: topk must be in [0, 64], got %lld", (long long)a.topk);
  BUN_EP_REQUIRE(a.recvDirect == 0 || a.recvDirect == 1, "dispatch: recvDirect must be 0 or 1, got %lld",
                 (long long)a.recvDirect);
  return bunEpSuccess;
}
}  // namespace

extern "C" BUN_EP_API bunEpResult_t bun_ep_normal_dispatch(const bunEpDispatchArgs_t* args, int64_t count) {
  BUN_EP_REQUIRE(args != nullptr, "bun_ep_normal_dispatch: args is NULL");
  BUN_EP_TRY(check_count(count, "dispatch"));
  DispatchBatch batch{};
  batch.blocksPerRank = args[0].numChannels;
  for (int64_t i = 0; i < count; ++i) {
    BUN_EP_TRY(check_dispatch(args[i]));
    BUN_EP_TRY(check_batch_entry(args[0].comm, args[i].comm, i, args[i].numChannels, args[0].numChannels,
                                 threads_of(args[i].threadsPerBlock), threads_of(args[0].threadsPerBlock), "dispatch"));
    batch.entries[i].args = args[i];
    BUN_EP_TRY(dispatch_layout(args[i], batch.entries[i].mine));
  }
  return launch_for_ranks<DispatchLauncher>(static_cast<int>(args[0].comm.numRanks), batch, count,
                                            threads_of(args[0].threadsPerBlock),
                                            static_cast<cudaStream_t>(args[0].comm.stream));
}


namespace {
bunEpResult_t check_combine(const bunEpCombineArgs_t& a) {
  BUN_EP_TRY(check_comm(a.comm, "combine"));
  BUN_EP_REQUIRE(a.hidden > 0 && a.hidden % 8 == 0, "combine: hidden must be a positive multiple of 8, got %lld",
                 (long long)a.hidden);
  BUN_EP_REQUIRE(a.numBlocks >= 1 && a.numBlocks <= kMaxChannels, "combine: numBlocks must be in [1, %d], got %lld",
                 kMaxChannels, (long long)a.numBlocks);
  BUN_EP_REQUIRE(a.handle != nullptr, "combine: handle is required");
  BUN_EP_REQUIRE(a.bias1 == nullptr || a.bias0 != nullptr, "combine: bias1 given without bias0");
  BUN_EP_REQUIRE(a.topk >= 0 && a.topk <= 64, "combine: topk must be in [0, 64], got %lld", (long long)a.topk);
  BUN_EP_REQUIRE(a.xDirect == 0 || a.xDirect == 1, "combine: xDirect must be 0 or 1, got %lld", (long long)a.xDirect);
  return bunEpSuccess;
}
}  // namespace

extern "C" BUN_EP_API bunEpResult_t bun_ep_normal_combine(const bunEpCombineArgs_t* args, int64_t count) {
  BUN_EP_REQUIRE(args != nullptr, "bun_ep_normal_combine: args is NULL");
  BUN_EP_TRY(check_count(count, "combine"));
  CombineBatch batch{};
  batch.blocksPerRank = args[0].numBlocks;
  for (int64_t i = 0; i < count; ++i) {
    const bunEpCombineArgs_t& a = args[i];
    BUN_EP_TRY(check_combine(a));
    BUN_EP_TRY(check_batch_entry(args[0].comm, a.comm, i, a.numBlocks, args[0].numBlocks, threads_of(a.threadsPerBlock),
                                 threads_of(args[0].threadsPerBlock), "combine"));
    batch.entries[i].args = a;
    // topk > 0 means "with weights" on every rank alike, even on one whose input has 0 rows (a NULL
    // pointer): pushers and the home rank must compute the same staging layout.
    batch.entries[i].st = staging_layout(a.comm.bufferBytes, a.hidden * 2, 0, 0, a.topk * 4);
    BUN_EP_TRY(combine_layout(a, batch.entries[i].mine));
  }
  return launch_for_ranks<CombineLauncher>(static_cast<int>(args[0].comm.numRanks), batch, count,
                                           threads_of(args[0].threadsPerBlock),
                                           static_cast<cudaStream_t>(args[0].comm.stream));
}
