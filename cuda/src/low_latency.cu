// Low-latency (decode) dispatch and combine over peer pointers (same process or CUDA IPC), or
// over NVSHMEM (the buffer in the symmetric heap; puts for peers without a load/store pointer).
// C ABI: cuda/include/bun_ep_low_latency.h. Semantics: docs/ARCHITECTURE.md, "Low-latency".
//
// Dispatch. Send kernel: every block reads the routing [T, K] into shared memory; per token it
// finds, for each of its experts, how many earlier tokens of this rank chose that expert (the slot
// position: packed by source rank, then source token), quantizes the row once (fp8) and writes it
// with 16-byte stores into each expert owner's staging area [El][R][M] (row + scales + (t, k)).
// The last block to finish (grid completion counter) publishes the per-(expert, rank) counts and
// then a ready flag per receiver carrying the call's sequence number, and returns: no block waits.
// Receive kernel (the hook, or launched right after the send): waits for every live source's flag,
// takes begins as the prefix of counts over source ranks, and packs staging rows into recvX.
//
// Combine. Send kernel: for every valid slot, the expert output row goes to its home rank's
// receive area [M][maxTopk] at (source token, first top-k position of that expert); the last block
// raises a flag per home rank (NVSHMEM; over peer pointers: count words and arrived counters, see
// below). Receive kernel: waits, then sums over k in order in f32 (no FMA: __fmul_rn/__fadd_rn) and
// rounds to bf16 once. Pull (peer pointers, zero-copy outputs, direct dispatch, no hook): the owner
// only publishes a marker; homes read each row where the expert wrote it (the slot their dispatch
// recorded in sentSlot).
//
// Peer pointers, no flags: every sender block adds its row (or slice) count to the receiver's
// cumulative arrived counter with one release reduction after writing them; the receiver learns
// how many to expect from call-numbered count words and waits for its running target. A word that
// never arrives names the missing rank; a counter that stops short reports rows that never came.
//
// NVSHMEM transport ("staged"): a row is built once in this rank's own send area, then each
// destination gets it by a warp copy (peers nvshmem_ptr reaches) or by nvshmemx_putmem_nbi_warp
// (other hosts, or every peer when forced); counts go by nvshmem_int_p; each block calls
// nvshmem_quiet before the grid-completion count, and the flags follow (atomic set) after a quiet,
// so a receiver that sees the flag sees every row and count of the call.
//
// Nothing is cleared between calls: flags hold the per-parity call number kept in device memory
// (each rank counts its own calls; all ranks make the same calls), so stale flags are always
// smaller. Every spin is bounded by the global timer; a timeout writes the missing rank into mapped
// host memory that bun_ep_ll_check reads.

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

#include "common.cuh"
#include "ptx.cuh"

#ifndef BUN_EP_WITH_NVSHMEM
#define BUN_EP_WITH_NVSHMEM 0
#endif

#if BUN_EP_WITH_NVSHMEM
#include <nvshmem.h>
#include <nvshmemx.h>
#endif

namespace bun_ep {
namespace ll {

static FeatureRegistration registered_feature(BUN_EP_FEATURE_LOW_LATENCY);

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxTopk = 16;
constexpr int kMaxRanks = 512;
constexpr int kMaxLocalExperts = 8192;  // the combine send's prefix of counts sits in shared memory
constexpr int kGroupSize = 128;  // channels per FP8 scale
constexpr int kUe8m0GroupsPerWord = 4;
constexpr float kAmaxFloor = 1e-4f;
constexpr float kE4m3Max = 448.0f;
// Resident blocks of kThreads we count on per SM when sizing waiting grids (conservative).
constexpr int kBlocksPerSm = 4;

enum Phase : int { kPhaseDispatch = 1, kPhaseCombine = 2 };
// The "missing rank" of a timeout where every peer started the call but some rows never arrived
// (a peer stopped in the middle of it): no single rank can be named.
constexpr int kSomeRowsMissing = -1;
// Combine over peer pointers sends each row as this many slices (one warp each) when it has fewer
// rows than warps; the arrived counter counts slices.
constexpr int kCombinePartsPerRow = 4;
// The count of a combine count word that says "no rows come from me: read them from my combine
// buffer" (a pull sender).
constexpr int kPullMarker = 0x7fffffff;
// At most this many blocks share one token's reduce in the combine receive phase.
constexpr int kMaxTokenSplits = 4;
// The copy-engine dispatch copies one blob to every peer: for at most this many ranks (beyond, the
// copies of one call would outlast the peer-store paths), and over at most this many side streams
// (H100/H200 have 3 async copy engines; a fourth stream keeps one queued).
constexpr int kMaxCopyRanks = 16;
constexpr int kMaxCopyStreams = 4;

// Developer phase trace, off in normal builds (build with BUN_EP_NVCC_FLAGS=-DBUN_EP_LL_TRACE):
// thread 0 of each block of the direct dispatch (op 0) and of the fused peer-pointer combine (op 1)
// stamps the global timer (comparable across blocks and ranks, coarse) and its SM's cycle counter
// (exact within the block) at the end of each phase, for the last kTraceCalls calls of each op;
// bun_ep_ll_debug_trace copies both out. Point 10 is the kernel's first instruction (taken before
// the call number is known, stored with point 0).
#ifdef BUN_EP_LL_TRACE
constexpr int kTraceOps = 2, kTraceCalls = 8, kTraceRanks = 8, kTraceBlocks = 256, kTracePoints = 16;
__device__ unsigned long long g_trace[kTraceOps][kTraceCalls][kTraceRanks][kTraceBlocks][kTracePoints];
__device__ unsigned long long g_trace_clock[kTraceOps][kTraceCalls][kTraceRanks][kTraceBlocks][kTracePoints];
// call: the call number of its parity, times 2, plus the parity (calls of a rank in order).
__device__ __forceinline__ void trace_stamp(int op, int rank, int call, int point, uint64_t ns, uint64_t clock) {
  if (threadIdx.x == 0 && blockIdx.x < kTraceBlocks && rank < kTraceRanks) {
    g_trace[op][call % kTraceCalls][rank][blockIdx.x][point] = ns;
    g_trace_clock[op][call % kTraceCalls][rank][blockIdx.x][point] = clock;
  }
}
#define LL_TRACE_AT(op, c, seq, point) \
  trace_stamp(op, (c).rank, 2 * (seq) + (c).parity, point, globaltimer_ns(), clock64())
#define LL_TRACE_ENTRY() const uint64_t trace_entry_ns = globaltimer_ns(), trace_entry_clock = clock64()
#define LL_TRACE_ENTRY_STORE(op, c, seq) \
  trace_stamp(op, (c).rank, 2 * (seq) + (c).parity, 10, trace_entry_ns, trace_entry_clock)
#else
#define LL_TRACE_AT(op, c, seq, point) ((void)0)
#define LL_TRACE_ENTRY() ((void)0)
#define LL_TRACE_ENTRY_STORE(op, c, seq) ((void)0)
#endif
#define LL_TRACE(c, seq, point) LL_TRACE_AT(0, c, seq, point)
#define LL_TRACE_COMBINE(c, seq, point) LL_TRACE_AT(1, c, seq, point)

__host__ __device__ constexpr int64_t align_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

// Byte offsets of everything in one rank's buffer. Identical on every rank (same config), so a
// sender computes a peer's addresses from the peer's base pointer.
struct Layout {
  int numRanks, numLocalExperts, maxTokens, hidden, maxTopk;
  int64_t slotsPerExpert;   // R * M
  int64_t stagingRowBytes;  // payload (2H) | scales (f32 [H/128], padded) | meta int4 (t, k)
  int64_t scalesOffsetInRow, metaOffsetInRow;
  // offsets inside one parity region
  int64_t staging, dispatchCounts, dispatchReady, combineRecv, combineReady;
  // Peer pointers: rows (combine: row slices) that arrived (u64, cumulative per parity: senders add
  // after their rows) and
  // each sender's slice count for this rank, as a count word per call (int64 [R]).
  int64_t dispatchArrived, combineArrived, combineCountWords;
  // Direct dispatch: per (token, top-k position) of this rank, the flat slot its row took at the
  // expert's owner (-1: none); a pull combine reads the owner's combine buffer there.
  int64_t sentSlot;
  int64_t countWords;  // direct dispatch: int64 [El][R] per source rank, (call number << 32) | count
  int64_t recvX, recvScales, recvCount, srcTokenIdx, layoutRange, slotRoute, combineBuffer, combinedX;
  int64_t sendRows, sendMeta;  // NVSHMEM transport: this rank's rows [M] and (t, k) int4 [M][maxTopk]
  // Copy-engine dispatch (peer pointers): this rank's blob (see BlobShape), one inbox per source
  // rank that the copy engines fill with that rank's blob, the inbox flags they write after it
  // (copied from this rank's flagSource word), and per receiver the last call it finished reading
  // from this rank's inboxes (acks: a sender's next blob waits for them).
  int64_t blobMaxBytes;
  int64_t sendBlob, inbox, inboxFlags, flagSource, ackWords;
  int64_t parityBytes;
  int64_t state;  // after both parities: State
  int64_t totalBytes;
};

// Local bookkeeping of one rank (never written by peers).
struct State {
  // Rows this rank has waited for so far per parity (peer pointers): the arrived counters' targets.
  uint64_t dispatchExpected[2];
  uint64_t combineExpected[2];
  int combineRecvDone[2];  // grid completion counters of the combine receive phase
  int failed;  // a wait of this rank timed out: later waits give up at once (mirrors errorWord)
  int dispatchSeq[2];
  int combineSeq[2];
  int dispatchDone[2];  // grid completion counters of the send kernels
  int combineDone[2];
  int dispatchRecvDone[2];  // grid completion counters of the copy-engine receive kernels
  int alive[kMaxRanks];
};

// A rank's blob for the copy-engine dispatch: everything a receiver needs from one call, in one
// contiguous block that is copied whole to every peer: per-expert token counts [E], then per (t, k)
// the expert id (-1: none) and the row's position among this rank's tokens of that expert, then
// the T rows (payload, then fp8 scales: f32 per group, or ue8m0 words). Its size depends on the
// call's T, K and types, which the receiver learns from the inbox flag.
struct BlobShape {
  int64_t experts, positions, rows, rowBytes, scalesOffsetInRow, totalBytes;
};

__host__ __device__ inline BlobShape blob_shape(int numExperts, int hidden, int numTokens, int numTopk, bool useFp8,
                                                bool useUe8m0) {
  BlobShape b{};
  const int64_t routingBytes = align_up((int64_t)numTokens * numTopk * 4, 16);
  b.experts = align_up((int64_t)numExperts * 4, 16);
  b.positions = b.experts + routingBytes;
  b.rows = b.positions + routingBytes;
  const int64_t scaleBytes = !useFp8 ? 0 : useUe8m0 ? hidden / (kGroupSize * kUe8m0GroupsPerWord) * 4 : hidden / kGroupSize * 4;
  b.scalesOffsetInRow = useFp8 ? hidden : 2 * hidden;
  b.rowBytes = b.scalesOffsetInRow + align_up(scaleBytes, 16);
  b.totalBytes = b.rows + (int64_t)numTokens * b.rowBytes;
  return b;
}

// The inbox flag word: (call number << 32) | (T << 8) | K of the blob it follows.
__host__ __device__ constexpr int64_t inbox_flag(int seq, int numTokens, int numTopk) {
  return ((int64_t)seq << 32) | ((int64_t)numTokens << 8) | numTopk;
}

// Whether the copy-engine dispatch can serve this config (its blob and inboxes are then allocated;
// the receive kernel's slot begins [E] fit in 48 KB of shared memory).
bool copy_engines_fit(const bunEpLowLatencyConfig_t& c) {
  return c.transport == BUN_EP_LL_TRANSPORT_PEER_POINTERS && c.numRanks <= kMaxCopyRanks && c.numExperts * 4 <= 48 * 1024;
}

Layout make_layout(const bunEpLowLatencyConfig_t& c) {
  Layout l{};
  l.numRanks = (int)c.numRanks;
  l.numLocalExperts = (int)(c.numExperts / c.numRanks);
  l.maxTokens = (int)c.maxTokensPerRank;
  l.hidden = (int)c.hidden;
  l.maxTopk = (int)c.maxTopk;
  l.slotsPerExpert = c.numRanks * c.maxTokensPerRank;
  l.scalesOffsetInRow = 2 * c.hidden;
  l.metaOffsetInRow = l.scalesOffsetInRow + align_up(c.hidden / kGroupSize * 4, 16);
  l.stagingRowBytes = l.metaOffsetInRow + 16;

  const int64_t rows = l.numLocalExperts * l.slotsPerExpert;
  int64_t offset = 0;
  auto take = [&offset](int64_t bytes) {
    offset = align_up(offset, 256);
    const int64_t at = offset;
    offset += bytes;
    return at;
  };
  l.staging = take(rows * l.stagingRowBytes);
  l.dispatchCounts = take((int64_t)l.numLocalExperts * l.numRanks * 4);
  l.dispatchReady = take((int64_t)l.numRanks * 4);
  l.countWords = take((int64_t)l.numLocalExperts * l.numRanks * 8);
  l.combineRecv = take((int64_t)l.maxTokens * l.maxTopk * l.hidden * 2);
  l.combineReady = take((int64_t)l.numRanks * 4);
  l.dispatchArrived = take(8);
  l.combineArrived = take(8);
  l.combineCountWords = take((int64_t)l.numRanks * 8);
  l.sentSlot = take((int64_t)l.maxTokens * l.maxTopk * 4);
  l.recvX = take(rows * l.hidden * 2);
  l.recvScales = take(rows * (l.hidden / kGroupSize) * 4);
  l.recvCount = take((int64_t)l.numLocalExperts * 4);
  l.srcTokenIdx = take(rows * 4);
  l.layoutRange = take((int64_t)l.numLocalExperts * l.numRanks * 2 * 4);
  l.slotRoute = take(rows * 4);
  l.combineBuffer = take(rows * l.hidden * 2);
  l.combinedX = take((int64_t)l.maxTokens * l.hidden * 2);
  l.sendRows = take((int64_t)l.maxTokens * l.stagingRowBytes);
  l.sendMeta = take((int64_t)l.maxTokens * l.maxTopk * 16);
  // bf16 rows are the largest (2H bytes against H + H/32 for fp8).
  l.blobMaxBytes = align_up(blob_shape((int)c.numExperts, l.hidden, l.maxTokens, l.maxTopk, false, false).totalBytes, 256);
  const bool copyEngines = copy_engines_fit(c);
  l.sendBlob = take(copyEngines ? l.blobMaxBytes : 0);
  l.inbox = take(copyEngines ? l.numRanks * l.blobMaxBytes : 0);
  l.inboxFlags = take((int64_t)l.numRanks * 8);
  l.flagSource = take(8);
  l.ackWords = take((int64_t)l.numRanks * 8);
  l.parityBytes = align_up(offset, 256);
  l.state = 2 * l.parityBytes;
  l.totalBytes = align_up(l.state + (int64_t)sizeof(State), 256);
  return l;
}

// What every kernel needs besides its own arguments.
struct Common {
  Layout layout;
  int rank, numExperts, parity;
  uint64_t timeoutNs;
  char* const* peers;  // device array [R]: every rank's buffer base as this process sees it; NULL: puts
  char* local;         // this rank's buffer (NVSHMEM: symmetric, so also the address puts name)
  bool staged;         // NVSHMEM transport: rows go through the send area, NULL peers get puts
  bool oneGpu;         // every rank's buffer is on this GPU: row announcements release at GPU scope
  State* state;
  volatile int* errorWord;  // mapped host memory: [0] set, [1] missing rank, [2] phase

  __device__ char* parity_base(char* buffer) const { return buffer + parity * layout.parityBytes; }
  __device__ char* local_region() const { return parity_base(local); }
  __device__ int64_t parity_offset() const { return parity * layout.parityBytes; }
};

struct DispatchParams {
  Common c;
  const int64_t* topkIdx;
  const __nv_bfloat16* x;
  int numTokens, numTopk;
  bool useFp8, roundScale, useUe8m0;
  int* cumulativeRecvStats;
  unsigned long long* waitStats;
  int recvSplitsPerExpert;
};

struct CombineParams {
  Common c;
  const __nv_bfloat16* x;
  const int64_t* topkIdx;
  const float* topkWeights;
  __nv_bfloat16* out;
  int numTokens, numTopk;
  // Peer pointers, no hook, x is this rank's combine buffer and the parity's dispatch was direct:
  // homes read their rows straight from x (one pass) instead of this rank pushing them.
  bool pull;
};

// ---- device helpers --------------------------------------------------------------------------

// NVSHMEM operations of the staged transport. `symmetric` is this rank's address of the object;
// NVSHMEM writes `pe`'s copy. Without NVSHMEM they are never reached (the host refuses the
// transport), and trap if they were.
#if BUN_EP_WITH_NVSHMEM
__device__ __forceinline__ void put_warp(void* symmetric, const void* src, size_t bytes, int pe) {
  nvshmemx_putmem_nbi_warp(symmetric, src, bytes, pe);
}
__device__ __forceinline__ void put_int(int* symmetric, int value, int pe) { nvshmem_int_p(symmetric, value, pe); }
__device__ __forceinline__ void put_flag(int* symmetric, int value, int pe) { nvshmem_int_atomic_set(symmetric, value, pe); }
__device__ __forceinline__ void quiet() { nvshmem_quiet(); }
#else
__device__ __forceinline__ void put_warp(void*, const void*, size_t, int) { __trap(); }
__device__ __forceinline__ void put_int(int*, int, int) { __trap(); }
__device__ __forceinline__ void put_flag(int*, int, int) { __trap(); }
__device__ __forceinline__ void quiet() { __trap(); }
#endif

// Staged transport: every put of this block is complete (delivered) before the block goes on.
__device__ __forceinline__ void quiet_block(const Common& c) {
  if (!c.staged) return;
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) quiet();
  __syncthreads();
}

// An int of `owner`'s buffer at byte `offset`: a plain store (peer pointer) or a put.
__device__ __forceinline__ void write_peer_int(const Common& c, int owner, int64_t offset, int value) {
  char* peer = c.peers[owner];
  if (peer != nullptr) {
    *reinterpret_cast<int*>(peer + offset) = value;
  } else {
    put_int(reinterpret_cast<int*>(c.local + offset), value, owner);
  }
}

// A ready flag of `owner`'s buffer at byte `offset`: release store or NVSHMEM atomic set.
__device__ __forceinline__ void raise_peer_flag(const Common& c, int owner, int64_t offset, int value) {
  char* peer = c.peers[owner];
  if (peer != nullptr) {
    st_release_sys(reinterpret_cast<int*>(peer + offset), value);
  } else {
    put_flag(reinterpret_cast<int*>(c.local + offset), value, owner);
  }
}

// Only the first timeout of this rank names the missing rank. Waits that give up because `failed` is
// already set, or that expire alongside the first, call this too with their own (often innocent)
// rank; a plain check of errorWord[0] let them overwrite the name while the first writer's host
// stores were still in flight, so the claim is an atomic on the (device-local) failed word.
__device__ __forceinline__ void record_timeout(State* state, volatile int* errorWord, int missingRank, int phase) {
  if (atomicExch(&state->failed, 1) != 0) return;
  if (errorWord[0] != 0) return;  // failed was cleared (bun_ep_ll_clean) after an earlier timeout
  errorWord[1] = missingRank;
  errorWord[2] = phase;
  __threadfence_system();
  errorWord[0] = 1;
  __threadfence_system();
}

// Copy n int4 from src to dst by one warp, four loads in flight per lane.
template <bool kSrcCoherent>
__device__ __forceinline__ void warp_copy_int4(int4* dst, const int4* src, int n, int lane) {
  int i = lane;
  for (; i + 96 < n; i += 128) {
    int4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = kSrcCoherent ? __ldcg(src + i + 32 * u) : ld_nc_int4(src + i + 32 * u);
#pragma unroll
    for (int u = 0; u < 4; ++u) st_na_int4(dst + i + 32 * u, v[u]);
  }
  // The rest (under 4 per lane): loads first, then stores (a load-store loop would wait each time).
  int4 v[3];
#pragma unroll
  for (int u = 0; u < 3; ++u)
    if (i + 32 * u < n) v[u] = kSrcCoherent ? __ldcg(src + i + 32 * u) : ld_nc_int4(src + i + 32 * u);
#pragma unroll
  for (int u = 0; u < 3; ++u)
    if (i + 32 * u < n) st_na_int4(dst + i + 32 * u, v[u]);
}

// One token's top-k expert ids as loaded, held in registers: a kernel's start issues every load it
// needs before it uses any (one round trip, not one per value).
struct RoutingRow {
  int64_t ids[kMaxTopk];
};
__device__ __forceinline__ RoutingRow load_routing_row(const int64_t* topkIdx, int t, int numTopk) {
  RoutingRow row;
#pragma unroll
  for (int k = 0; k < kMaxTopk; ++k) row.ids[k] = k < numTopk ? topkIdx[(int64_t)t * numTopk + k] : -1;
  return row;
}

// Token t's entries of the block's routing in shared memory: valid expert ids, -1 for none, out of
// range, or an expert repeated earlier in the same row (a token goes to an expert once, at its
// first position). The K ids are compared in registers.
__device__ __forceinline__ void store_routing_row(const RoutingRow& row, int t, int numTopk, int numExperts, int* s_topk) {
  int ids[kMaxTopk];  // valid ids; -1 for none or out of range (never equal to a valid id)
#pragma unroll
  for (int k = 0; k < kMaxTopk; ++k) ids[k] = (row.ids[k] >= 0 && row.ids[k] < numExperts) ? (int)row.ids[k] : -1;
#pragma unroll
  for (int k = 0; k < kMaxTopk; ++k) {
    if (k >= numTopk) break;
    int value = ids[k];
#pragma unroll
    for (int j = 0; j < k; ++j)
      if (ids[j] == value) value = -1;
    s_topk[t * numTopk + k] = value;
  }
}

// The block's routing in shared memory (store_routing_row), a thread per token: tokens from
// `firstToken` (a caller that loaded its first row with its other start loads stores that one
// itself and passes threadIdx.x + blockDim.x).
__device__ void load_routing(const int64_t* topkIdx, int numTokens, int numTopk, int numExperts, int* s_topk,
                             int firstToken = threadIdx.x) {
  for (int t = firstToken; t < numTokens; t += blockDim.x)
    store_routing_row(load_routing_row(topkIdx, t, numTopk), t, numTopk, numExperts, s_topk);
}

// s_expertCount[e] = this rank's tokens for expert e (s_topk from load_routing), by the whole block;
// synced before and after.
__device__ void count_tokens_per_expert(const int* s_topk, int numEntries, int numExperts, int* s_expertCount) {
  for (int e = threadIdx.x; e < numExperts; e += blockDim.x) s_expertCount[e] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < numEntries; i += blockDim.x)
    if (s_topk[i] >= 0) atomicAdd(&s_expertCount[s_topk[i]], 1);
  __syncthreads();
}

// Grid completion: true in exactly one block (the last to arrive), after every block's writes
// are visible system-wide. The counter is reset by that block for the next launch.
// acq_rel fences (not sequentially consistent ones): each block's fence before the counter and the
// last block's fence after it synchronize through the counter, which is all the flags need.
__device__ bool last_block_to_finish(int* counter, int* s_flag) {
  fence_sys();
  __syncthreads();
  if (threadIdx.x == 0) *s_flag = atomicAdd(counter, 1) == (int)gridDim.x - 1;
  __syncthreads();
  if (!*s_flag) return false;
  fence_sys();
  if (threadIdx.x == 0) *counter = 0;
  return true;
}

// Call-number bookkeeping only (no flags follow, so no fences): thread 0 of each block calls it once
// after the block's work; true in the last block to arrive, after every block read the call number.
// That block resets the counter for the next launch.
__device__ __forceinline__ bool last_block_arrived(int* counter) {
  if (atomicAdd(counter, 1) != (int)gridDim.x - 1) return false;
  *counter = 0;
  return true;
}

// The call-number bookkeeping of a kernel, by thread 0 after its block's work: the last block of
// the grid to arrive at `done` records `seq` in `number` (the parity's next call reads it first).
__device__ __forceinline__ void record_call_number(int& done, int& number, int seq) {
  if (threadIdx.x == 0 && last_block_arrived(&done)) number = seq;
}

// Peer pointers: after __syncthreads (every row of the block written), add the block's row count per
// destination rank to that rank's arrived counter at `counterOffset` (release: the rows come first).
// `peers`: c.peers or a shared-memory copy of it.
__device__ __forceinline__ void announce_rows(const Common& c, char* const* peers, const int* s_rowsTo, int64_t counterOffset) {
  for (int q = threadIdx.x; q < c.layout.numRanks; q += blockDim.x)
    if (s_rowsTo[q] > 0) {
      auto* counter = reinterpret_cast<uint64_t*>(peers[q] + c.parity_offset() + counterOffset);
      if (c.oneGpu)
        red_add_release_gpu(counter, (uint64_t)s_rowsTo[q]);
      else
        red_add_release_sys(counter, (uint64_t)s_rowsTo[q]);
    }
}

__device__ __forceinline__ float power_of_two_ceil(float s) {
  const uint32_t bits = __float_as_uint(s);
  const uint32_t exponent = (bits >> 23) + ((bits & 0x7fffffu) != 0 ? 1u : 0u);
  return __uint_as_float(exponent << 23);
}

__device__ __forceinline__ void unpack_bf16x8(const int4& v, float* out) {
  const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(pairs[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// s_out[i] = sum of in[0..i) for i in 0..n (s_out[n] the total), by warp 0; the caller syncs after.
// Each lane sums a contiguous chunk, then the chunk sums are scanned across the warp.
__device__ void warp_exclusive_scan(const int* in, int n, int* s_out) {
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x;
  const int chunk = (n + 31) / 32;
  const int begin = min(n, lane * chunk), end = min(n, begin + chunk);
  int sum = 0;
  for (int i = begin; i < end; ++i) sum += in[i];
  int inclusive = sum;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int other = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  int running = inclusive - sum;
  for (int i = begin; i < end; ++i) {
    const int value = in[i];
    s_out[i] = running;
    running += value;
  }
  if (lane == 31) s_out[n] = inclusive;
}

// The sum of `value` over the block, returned to every thread (every thread calls it). Shuffles,
// then one partial per warp: a shared 64-bit atomicAdd per thread serialized (seen on H200: 5-7 us
// with 128 adders, the largest cost of an EP2 dispatch).
__device__ unsigned long long block_sum(unsigned long long value) {
  __shared__ unsigned long long s_partial[kWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  __syncthreads();  // an earlier call's reads of s_partial are done
  if ((threadIdx.x & 31) == 0) s_partial[threadIdx.x / 32] = value;
  __syncthreads();
  unsigned long long total = 0;
  for (int w = 0; w < (int)blockDim.x / 32; ++w) total += s_partial[w];
  return total;
}

// ---- dispatch: send ----------------------------------------------------------------------------

// Adds v to a shared counter, lane by lane (atomicAdd is turned into a warp sum plus one atomic by
// the compiler, and the warp sum is what cost: see count_earlier_tokens).
__device__ __forceinline__ void shared_add(int* counter, int v) {
  asm volatile("red.shared.add.u32 [%0], %1;" ::"r"((unsigned)__cvta_generic_to_shared(counter)), "r"(v) : "memory");
}

// s_pos[k] += how many of this rank's tokens before t chose token t's k-th expert: the row's slot
// position among this rank's rows for that expert. The caller zeroes s_pos (synced) and syncs after.
// One pass over the earlier entries, each compared with the token's K ids in registers (a pass per
// top-k position cost up to 2 us for the last tokens of 128 at top-8). Valid ids of a row are
// distinct (load_routing), so an entry matches at most one k. kBound >= K: the positions compared
// (8 for DeepEP's top-8 halves the pass's instructions against kMaxTopk; the pass is issue-bound,
// two blocks per SM at EP2).
// Two 16-bit counters per register keep the kernel within its 64 registers without spills (a thread
// sees at most T * K / blockDim entries, and T * K ints fit in shared memory: far below 65536).
// afterScan(counts): called once the pass is done (the trace build stamps a point there).
struct NoTracePoint {
  __device__ void operator()(unsigned) const {}
};
template <int kBound, typename AfterScan>
__device__ __forceinline__ void count_earlier_tokens_of(const int* s_topk, int t, int K, int* s_pos, AfterScan afterScan) {
  constexpr int kNever = -2;  // matches no entry (entries are valid ids or -1)
  int mine[kBound];
  unsigned counts[kBound / 2];
#pragma unroll
  for (int k = 0; k < kBound; ++k) {
    const int e = k < K ? s_topk[t * K + k] : kNever;
    mine[k] = e >= 0 ? e : kNever;
  }
#pragma unroll
  for (int k = 0; k < kBound / 2; ++k) counts[k] = 0;
#pragma unroll 2
  for (int i = threadIdx.x; i < t * K; i += blockDim.x) {
    const int e = s_topk[i];
#pragma unroll
    for (int k = 0; k < kBound; ++k) counts[k / 2] += e == mine[k] ? (1u << (16 * (k % 2))) : 0u;
  }
  afterScan(counts[0]);
  // Each thread adds its own non-zero counts: matches are few (about t * K * K / numExperts in the
  // whole block), and a warp sum per position (8 dependent __reduce_add_sync) cost a sender block
  // about 1,200 cycles even with nothing to add (session 7's cycle trace, H200).
#pragma unroll
  for (int k = 0; k < kBound; ++k) {
    const int count = (int)((counts[k / 2] >> (16 * (k % 2))) & 0xffffu);
    if (count != 0) shared_add(&s_pos[k], count);
  }
}
template <typename AfterScan = NoTracePoint>
__device__ __forceinline__ void count_earlier_tokens(const int* s_topk, int t, int K, int* s_pos,
                                                     AfterScan afterScan = {}) {
  if (K <= 8)
    count_earlier_tokens_of<8>(s_topk, t, K, s_pos, afterScan);
  else
    count_earlier_tokens_of<kMaxTopk>(s_topk, t, K, s_pos, afterScan);
}

// Where token t's row goes, per top-k position: the owner rank (-1: no expert, or its owner is
// dead) and the row's byte offset in the owner's buffer (its slot: the number of earlier tokens
// with that expert). s_dest: what the send loops write (peer rows; staged: this rank's send row
// once, in s_dest[0]). Collective over the block.
__device__ void plan_token(const DispatchParams& p, const int* s_topk, const int* s_alive, int t, int* s_pos,
                           char** s_dest, int* s_owner, int64_t* s_offset) {
  const Common& c = p.c;
  const int K = p.numTopk;
  if (threadIdx.x < kMaxTopk) s_pos[threadIdx.x] = 0;
  __syncthreads();
  // All 16 positions here: the K <= 8 branch made the hook path's send kernel spill (8 bytes, ptxas).
  count_earlier_tokens_of<kMaxTopk>(s_topk, t, K, s_pos, NoTracePoint{});
  __syncthreads();
  if (threadIdx.x < K) {
    const int k = threadIdx.x;
    const int e = s_topk[t * K + k];
    char* dest = nullptr;
    int owner = e >= 0 ? e / c.layout.numLocalExperts : -1;
    if (owner >= 0 && !s_alive[owner]) owner = -1;
    int64_t offset = 0;
    if (owner >= 0) {
      const int localExpert = e % c.layout.numLocalExperts;
      const int64_t row = ((int64_t)localExpert * c.layout.numRanks + c.rank) * c.layout.maxTokens + s_pos[k];
      offset = c.parity_offset() + c.layout.staging + row * c.layout.stagingRowBytes;
      if (!c.staged) dest = c.peers[owner] + offset;
    }
    s_owner[k] = owner;
    s_offset[k] = offset;
    s_dest[k] = dest;
  }
  __syncthreads();
  if (c.staged && threadIdx.x == 0) {
    bool any = false;
    for (int k = 0; k < K; ++k) any = any || s_owner[k] >= 0;
    s_dest[0] = any ? c.local_region() + c.layout.sendRows + (int64_t)t * c.layout.stagingRowBytes : nullptr;
    for (int k = 1; k < K; ++k) s_dest[k] = nullptr;
  }
  if (c.staged) __syncthreads();
}

// Staged transport: token t's row is complete in this rank's send row; each warp takes top-k
// positions and moves the payload (and fp8 scales) and the (t, k) meta to that position's owner.
__device__ void forward_token(const DispatchParams& p, int t, const int* s_owner, const int64_t* s_offset) {
  const Common& c = p.c;
  const Layout& l = c.layout;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const char* row = c.local_region() + l.sendRows + (int64_t)t * l.stagingRowBytes;
  const int64_t payloadBytes = p.useFp8 ? l.hidden : 2 * l.hidden;
  const int64_t scaleBytes = p.useFp8 ? align_up(l.hidden / kGroupSize * 4, 16) : 0;
  for (int k = warp; k < p.numTopk; k += kWarps) {
    const int owner = s_owner[k];
    if (owner < 0) continue;
    int4* meta = reinterpret_cast<int4*>(c.local_region() + l.sendMeta) + (int64_t)t * l.maxTopk + k;
    if (lane == 0) *meta = make_int4(t, k, 0, 0);
    __syncwarp();
    const int64_t offset = s_offset[k];
    char* peer = c.peers[owner];
    if (peer != nullptr) {
      char* dst = peer + offset;
      warp_copy_int4<true>(reinterpret_cast<int4*>(dst), reinterpret_cast<const int4*>(row), (int)(payloadBytes / 16), lane);
      if (scaleBytes > 0)
        warp_copy_int4<true>(reinterpret_cast<int4*>(dst + l.scalesOffsetInRow),
                             reinterpret_cast<const int4*>(row + l.scalesOffsetInRow), (int)(scaleBytes / 16), lane);
      if (lane == 0) *reinterpret_cast<int4*>(dst + l.metaOffsetInRow) = *meta;
    } else {
      char* symmetric = c.local + offset;
      put_warp(symmetric, row, payloadBytes, owner);
      if (scaleBytes > 0) put_warp(symmetric + l.scalesOffsetInRow, row + l.scalesOffsetInRow, scaleBytes, owner);
      put_warp(symmetric + l.metaOffsetInRow, meta, 16, owner);
    }
  }
}

// bf16: every thread moves 8 channels (one int4) to each destination.
__device__ void send_row_bf16(const DispatchParams& p, int t, char* const* s_dest) {
  const int H = p.c.layout.hidden;
  const int4* src = reinterpret_cast<const int4*>(p.x + (int64_t)t * H);
  for (int v = threadIdx.x; v < H / 8; v += blockDim.x) {
    const int4 value = ld_nc_int4(src + v);
    for (int k = 0; k < p.numTopk; ++k)
      if (s_dest[k] != nullptr) st_na_int4(reinterpret_cast<int4*>(s_dest[k]) + v, value);
  }
}

// 16 channels of a row quantized to e4m3 (one int4) and the scale of their 128-channel group.
struct Fp8Chunk {
  int4 packed;
  float scale;
};

// Chunk v (channels 16v..16v+15) of `src`. Every lane of the warp calls it (the group's amax is
// reduced over 8 lanes); an inactive lane contributes 0 and its result is unused.
// The 16 channels of chunk v, kept packed (8 registers, not 16 floats); zeros when inactive.
struct RawChunk {
  int4 raw[2];
};
__device__ __forceinline__ RawChunk load_chunk(const int4* src, int v, bool active) {
  RawChunk r{{make_int4(0, 0, 0, 0), make_int4(0, 0, 0, 0)}};
  if (active) {
    r.raw[0] = ld_nc_int4(src + 2 * v);
    r.raw[1] = ld_nc_int4(src + 2 * v + 1);
  }
  return r;
}

__device__ __forceinline__ Fp8Chunk quantize_loaded(const RawChunk& loaded, bool active, bool roundScale);

__device__ __forceinline__ Fp8Chunk quantize_chunk(const int4* src, int v, bool active, bool roundScale) {
  return quantize_loaded(load_chunk(src, v, active), active, roundScale);
}

__device__ __forceinline__ Fp8Chunk quantize_loaded(const RawChunk& loaded, bool active, bool roundScale) {
  const int4* raw = loaded.raw;
  float amax = 0.0f;
  if (active) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float2 pair = __bfloat1622float2(reinterpret_cast<const __nv_bfloat162*>(raw)[i]);
      amax = fmaxf(amax, fmaxf(fabsf(pair.x), fabsf(pair.y)));
    }
  }
#pragma unroll
  for (int mask = 4; mask >= 1; mask >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, mask));
  amax = fmaxf(amax, kAmaxFloor);
  float scale = __fdiv_rn(amax, kE4m3Max);
  float multiplier;
  if (roundScale) {
    scale = power_of_two_ceil(scale);
    multiplier = __frcp_rn(scale);  // exact for a power of two
  } else {
    multiplier = __fdiv_rn(kE4m3Max, amax);
  }
  uint32_t words[4];
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    uint32_t word = 0;
#pragma unroll
    for (int b = 0; b < 4; b += 2) {
      const float2 pair = __bfloat1622float2(reinterpret_cast<const __nv_bfloat162*>(raw)[(4 * w + b) / 2]);
      const __nv_fp8_storage_t q0 = __nv_cvt_float_to_fp8(__fmul_rn(pair.x, multiplier), __NV_SATFINITE, __NV_E4M3);
      const __nv_fp8_storage_t q1 = __nv_cvt_float_to_fp8(__fmul_rn(pair.y, multiplier), __NV_SATFINITE, __NV_E4M3);
      word |= ((uint32_t)q0 | ((uint32_t)q1 << 8)) << (8 * b);
    }
    words[w] = word;
  }
  return Fp8Chunk{make_int4((int)words[0], (int)words[1], (int)words[2], (int)words[3]), scale};
}

// fp8: every thread quantizes 16 channels (8 threads per 128-channel group) and stores 16 bytes
// to each destination; the first thread of a group also stores the group's scale.
__device__ void send_row_fp8(const DispatchParams& p, int t, char* const* s_dest) {
  const int H = p.c.layout.hidden;
  const bool roundScale = p.roundScale || p.useUe8m0;
  const int4* src = reinterpret_cast<const int4*>(p.x + (int64_t)t * H);
  for (int base = 0; base < H / 16; base += blockDim.x) {
    const int v = base + threadIdx.x;
    const bool active = v < H / 16;
    const Fp8Chunk chunk = quantize_chunk(src, v, active, roundScale);
    if (!active) continue;
    const bool groupLeader = (v % (kGroupSize / 16)) == 0;
    for (int k = 0; k < p.numTopk; ++k) {
      char* dest = s_dest[k];
      if (dest == nullptr) continue;
      st_na_int4(reinterpret_cast<int4*>(dest) + v, chunk.packed);
      if (groupLeader)
        reinterpret_cast<float*>(dest + p.c.layout.scalesOffsetInRow)[v / (kGroupSize / 16)] = chunk.scale;
    }
  }
}

// The send phase; `seq` is this call's number (read by the caller before any block can finish).
__device__ void dispatch_send(const DispatchParams& p, int seq, int* s_dynamic) {
  __shared__ int s_alive[kMaxRanks];
  __shared__ int s_pos[kMaxTopk];
  __shared__ char* s_dest[kMaxTopk];
  __shared__ int s_owner[kMaxTopk];
  __shared__ int64_t s_offset[kMaxTopk];
  __shared__ int s_last;
  const Common& c = p.c;
  const int R = c.layout.numRanks, K = p.numTopk, T = p.numTokens;
  int* s_topk = s_dynamic;              // [T * K]
  int* s_expertCount = s_dynamic + T * K;  // [numExperts], last block only

  const bool selfAlive = c.state->alive[c.rank] != 0;
  for (int r = threadIdx.x; r < R; r += blockDim.x) s_alive[r] = selfAlive && c.state->alive[r] != 0;
  load_routing(p.topkIdx, T, K, c.numExperts, s_topk);
  __syncthreads();

  for (int t = blockIdx.x; t < T; t += gridDim.x) {
    plan_token(p, s_topk, s_alive, t, s_pos, s_dest, s_owner, s_offset);
    if (p.useFp8) {
      send_row_fp8(p, t, s_dest);
    } else {
      send_row_bf16(p, t, s_dest);
    }
    if (c.staged) {
      __syncthreads();  // the send row is complete
      forward_token(p, t, s_owner, s_offset);
    } else if (threadIdx.x < K && s_dest[threadIdx.x] != nullptr) {
      *reinterpret_cast<int4*>(s_dest[threadIdx.x] + c.layout.metaOffsetInRow) = make_int4(t, threadIdx.x, 0, 0);
    }
    __syncthreads();  // s_dest and the send row are rewritten for the next token
  }

  quiet_block(c);
  if (!last_block_to_finish(&c.state->dispatchDone[c.parity], &s_last)) return;

  // Every row of this call is visible: publish counts, then the flags that cover them.
  count_tokens_per_expert(s_topk, T * K, c.numExperts, s_expertCount);
  const int El = c.layout.numLocalExperts;
  for (int e = threadIdx.x; e < c.numExperts; e += blockDim.x) {
    const int owner = e / El;
    if (!s_alive[owner]) continue;
    write_peer_int(c, owner, c.parity_offset() + c.layout.dispatchCounts + ((int64_t)(e % El) * R + c.rank) * 4,
                   s_expertCount[e]);
  }
  __threadfence_system();
  __syncthreads();
  quiet_block(c);
  for (int q = threadIdx.x; q < R; q += blockDim.x) {
    if (!s_alive[q]) continue;
    raise_peer_flag(c, q, c.parity_offset() + c.layout.dispatchReady + (int64_t)c.rank * 4, seq);
  }
  if (threadIdx.x == 0) c.state->dispatchSeq[c.parity] = seq;
}

// Every block reads the call number before any block can reach the grid-completion counter.
__device__ __forceinline__ int next_seq(const int* counter) {
  const int seq = ld_volatile(counter) + 1;
  __syncthreads();
  return seq;
}

__global__ void __launch_bounds__(kThreads, kBlocksPerSm) dispatch_send_kernel(DispatchParams p) {
  extern __shared__ int s_dynamic[];
  await_previous_kernel();
  dispatch_send(p, next_seq(&p.c.state->dispatchSeq[p.c.parity]), s_dynamic);
}

// ---- dispatch: receive -------------------------------------------------------------------------

// Moves one staging row (source rank s, its j-th token for this expert) to packed slot `slot`.
__device__ void unpack_row(const DispatchParams& p, char* region, int localExpert, int s, int j, int slot, int lane) {
  const Layout& l = p.c.layout;
  const int H = l.hidden;
  const char* row = region + l.staging +
                    (((int64_t)localExpert * l.numRanks + s) * l.maxTokens + j) * l.stagingRowBytes;
  const int64_t flatSlot = (int64_t)localExpert * l.slotsPerExpert + slot;
  const int payloadBytes = p.useFp8 ? H : 2 * H;
  warp_copy_int4<true>(reinterpret_cast<int4*>(region + l.recvX + flatSlot * payloadBytes),
                       reinterpret_cast<const int4*>(row), payloadBytes / 16, lane);
  if (p.useFp8) {
    const float* scales = reinterpret_cast<const float*>(row + l.scalesOffsetInRow);
    const int numGroups = H / kGroupSize;
    if (p.useUe8m0) {
      const int numWords = numGroups / kUe8m0GroupsPerWord;
      uint32_t* out = reinterpret_cast<uint32_t*>(region + l.recvScales) + flatSlot * numWords;
      for (int w = lane; w < numWords; w += 32) {
        uint32_t word = 0;
#pragma unroll
        for (int b = 0; b < kUe8m0GroupsPerWord; ++b)
          word |= ((__float_as_uint(__ldcg(scales + kUe8m0GroupsPerWord * w + b)) >> 23) & 0xffu) << (8 * b);
        out[w] = word;
      }
    } else {
      float* out = reinterpret_cast<float*>(region + l.recvScales) + flatSlot * numGroups;
      for (int g = lane; g < numGroups; g += 32) out[g] = __ldcg(scales + g);
    }
  }
  if (lane == 0) {
    const int4 meta = __ldcg(reinterpret_cast<const int4*>(row + l.metaOffsetInRow));
    reinterpret_cast<int*>(region + l.srcTokenIdx)[flatSlot] = meta.x;
    reinterpret_cast<int*>(region + l.slotRoute)[flatSlot] = (s << 16) | meta.y;
  }
}

// One home token's output: per vector, sum over k in order in f32 (w * x, no FMA), round once.
// Each thread takes kVecs vectors (blockDim apart) and loads kRows rows of each before summing.
// s_rows[k]: the row of top-k position k (NULL: none), in this rank's receive area or a peer's buffer.
template <int kVecs, int kRows>
__device__ __forceinline__ void combine_token(const int4* const* s_rows, int begin, int end, int K, const float* s_weight,
                                              int4* out) {
  for (int v0 = begin + threadIdx.x; v0 < end; v0 += blockDim.x * kVecs) {
    float acc[kVecs][8];
#pragma unroll
    for (int j = 0; j < kVecs; ++j)
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[j][i] = 0.0f;
    for (int k0 = 0; k0 < K; k0 += kRows) {
      int4 packed[kVecs][kRows];
#pragma unroll
      for (int j = 0; j < kVecs; ++j) {
        const int v = v0 + j * blockDim.x;
#pragma unroll
        for (int u = 0; u < kRows; ++u) {
          const int4* row = k0 + u < K ? s_rows[k0 + u] : nullptr;
          packed[j][u] = row != nullptr && v < end ? __ldcg(row + v) : make_int4(0, 0, 0, 0);
        }
      }
#pragma unroll
      for (int u = 0; u < kRows; ++u) {
        if (k0 + u >= K || s_rows[k0 + u] == nullptr) continue;
        const float w = s_weight[k0 + u];
#pragma unroll
        for (int j = 0; j < kVecs; ++j) {
          float values[8];
          unpack_bf16x8(packed[j][u], values);
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[j][i] = __fadd_rn(acc[j][i], __fmul_rn(w, values[i]));
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kVecs; ++j) {
      const int v = v0 + j * blockDim.x;
      if (v >= end) continue;
      __nv_bfloat162 outPairs[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) outPairs[i] = __floats2bfloat162_rn(acc[j][2 * i], acc[j][2 * i + 1]);
      out[v] = *reinterpret_cast<const int4*>(outPairs);
    }
  }
}

// The receive phase of call `seq`.
__device__ void dispatch_recv(const DispatchParams& p, int seq) {
  __shared__ int s_count[kMaxRanks];
  __shared__ int s_begin[kMaxRanks + 1];
  const Common& c = p.c;
  const Layout& l = c.layout;
  const int R = l.numRanks;
  char* region = c.local_region();
  const bool selfAlive = c.state->alive[c.rank] != 0;
  const int* ready = reinterpret_cast<const int*>(region + l.dispatchReady);
  const int* counts = reinterpret_cast<const int*>(region + l.dispatchCounts);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int splits = p.recvSplitsPerExpert;

  for (int item = blockIdx.x; item < l.numLocalExperts * splits; item += gridDim.x) {
    const int localExpert = item / splits, split = item % splits;
    for (int s = threadIdx.x; s < R; s += blockDim.x) {
      int count = 0;
      if (selfAlive && c.state->alive[s]) {
        const uint64_t start = globaltimer_ns();
        if (ld_volatile(&c.state->failed) == 0 && wait_at_least(ready + s, seq, c.timeoutNs)) {
          count = ld_volatile(counts + localExpert * R + s);
        } else {
          record_timeout(c.state, c.errorWord, s, kPhaseDispatch);
        }
        if (item == 0 && p.waitStats != nullptr) atomicAdd(p.waitStats + s, (unsigned long long)(globaltimer_ns() - start));
      }
      s_count[s] = count;
    }
    __syncthreads();
    warp_exclusive_scan(s_count, R, s_begin);
    __syncthreads();
    const int total = s_begin[R];
    if (split == 0) {
      int* range = reinterpret_cast<int*>(region + l.layoutRange) + (int64_t)localExpert * R * 2;
      for (int s = threadIdx.x; s < R; s += blockDim.x) {
        range[2 * s] = s_begin[s];
        range[2 * s + 1] = s_count[s];
      }
      if (threadIdx.x == 0) {
        reinterpret_cast<int*>(region + l.recvCount)[localExpert] = total;
        if (p.cumulativeRecvStats != nullptr) atomicAdd(p.cumulativeRecvStats + localExpert, total);
      }
    }
    int s = 0;
    for (int slot = split * kWarps + warp; slot < total; slot += splits * kWarps) {
      while (slot >= s_begin[s + 1]) ++s;  // slots ascend, so the source rank only moves forward
      unpack_row(p, region, localExpert, s, slot - s_begin[s], slot, lane);
    }
    __syncthreads();  // s_count/s_begin are reused by the next item
  }
}

__global__ void __launch_bounds__(kThreads, kBlocksPerSm) dispatch_recv_kernel(DispatchParams p) {
  await_previous_kernel();
  dispatch_recv(p, ld_volatile(&p.c.state->dispatchSeq[p.c.parity]));
}

// ---- acks between copy-engine dispatches (dispatch through the copy engines: below) ------------

__device__ __forceinline__ const char* blob_of(const Common& c, int source) {
  const char* region = c.local_region();
  return source == c.rank ? region + c.layout.sendBlob : region + c.layout.inbox + (int64_t)source * c.layout.blobMaxBytes;
}

// The receivers of the previous call of this parity are done with this rank's inboxes (bounded).
__device__ void await_acks(const Common& c, int seq, const int* s_alive) {
  const auto* acks = reinterpret_cast<const int64_t*>(c.local_region() + c.layout.ackWords);
  for (int q = threadIdx.x; q < c.layout.numRanks; q += blockDim.x) {
    if (q == c.rank || !s_alive[q]) continue;
    if (ld_relaxed_sys(acks + q) >= seq - 1) continue;
    if (ld_volatile(&c.state->failed) != 0) continue;
    const uint64_t start = globaltimer_ns();
    while (ld_relaxed_sys(acks + q) < seq - 1)
      if (globaltimer_ns() - start > c.timeoutNs) {
        record_timeout(c.state, c.errorWord, q, kPhaseDispatch);
        break;
      }
  }
}

// This rank read call `seq` of its inboxes: every live source may copy its next blob of the parity.
__device__ __forceinline__ void send_acks(const Common& c, int seq, const int* s_alive) {
  for (int q = threadIdx.x; q < c.layout.numRanks; q += blockDim.x)
    if (q != c.rank && s_alive[q]) {
      auto* word = reinterpret_cast<int64_t*>(c.peers[q] + c.parity_offset() + c.layout.ackWords) + c.rank;
      if (c.oneGpu)
        st_release_gpu(word, (int64_t)seq);
      else
        st_release_sys(word, (int64_t)seq);
    }
}

// ---- dispatch without hook over peer pointers: rows straight into the receivers' packed slots ----
//
// Sender blocks (every block but the last) and one receiver block (the last).
// Phase 1 (no waits): the receiver block counts this rank's tokens per expert (shared histogram) and
// publishes each count to the expert's owner as one 64-bit word (call number << 32 | count).
// Phase 2: per batch of up to kPlanBatch of its tokens, a sender block waits (bounded) for the counts
// of the lower source ranks for those tokens' experts at their owners, so slot = (sum of those
// counts) + (earlier tokens of this rank with that expert), and stores each row, its scales and its
// handle entries (source token, top-k position) straight into the owner's recvX / recvXScales /
// srcTokenIdx / slot routes: no staging, no second pass. Each sender block then adds its rows per
// receiver to that receiver's arrived counter. Meanwhile the receiver block waits for every live
// source's count words of this rank's experts (in parallel), writes recvCount and layoutRange from
// them, and waits until the counter holds every row they announce.
// Every rank waits for every live source's count words, so no rank starts call n + 2 of a parity (and
// rewrites its count words) before every rank has finished reading call n's; and a sender writes a
// receiver's slots only after the receiver's own count word of this call is seen (the receiver has
// launched this call: its earlier work on this parity's outputs, in its stream order, is done).


__device__ __forceinline__ int64_t count_word(int seq, int count) { return ((int64_t)seq << 32) | (uint32_t)count; }

// The count of a count word written by rank `s` for call `seq` (bounded wait; on a timeout `s` is
// recorded for `phase` and 0 returned: the call's results are void). Only a word not yet written
// reads the failure word (an earlier wait of this rank timed out: do not wait again), beside each
// re-read, so the ready path is one load.
__device__ int wait_count_word(const Common& c, const int64_t* word, int s, int seq, int phase) {
  int64_t value = ld_relaxed_sys(word);
  if ((int)(value >> 32) >= seq) return (int)(uint32_t)value;
  const uint64_t start = globaltimer_ns();
  while (true) {
    const int failed = ld_volatile(&c.state->failed);
    value = ld_relaxed_sys(word);
    if ((int)(value >> 32) >= seq) return (int)(uint32_t)value;
    if (failed != 0) return 0;
    if (globaltimer_ns() - start > c.timeoutNs) {
      record_timeout(c.state, c.errorWord, s, phase);
      return 0;
    }
  }
}

// Source `s`'s count for local expert `localExpert` of call `seq`, from the count words at `owner`.
// s_peers: the kernel's shared copy of c.peers (a global load of the peer's base would come first).
__device__ int wait_count(const Common& c, char* const* s_peers, int owner, int localExpert, int s, int seq) {
  const int64_t* word = reinterpret_cast<const int64_t*>(s_peers[owner] + c.parity_offset() + c.layout.countWords) +
                        (int64_t)localExpert * c.layout.numRanks + s;
  return wait_count_word(c, word, s, seq, kPhaseDispatch);
}

// Phase 1: this rank's per-expert token counts to the experts' owners, by one block (the receiver
// block: a sender block doing it started its own rows last). s_expertCount: [numExperts].
__device__ void publish_counts(const DispatchParams& p, int seq, const int* s_topk, const int* s_alive,
                               char* const* s_peers, int* s_expertCount) {
  const Common& c = p.c;
  const int E = c.numExperts, El = c.layout.numLocalExperts, R = c.layout.numRanks;
  count_tokens_per_expert(s_topk, p.numTokens * p.numTopk, E, s_expertCount);
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    const int owner = e / El;
    if (!s_alive[owner]) continue;
    int64_t* word = reinterpret_cast<int64_t*>(s_peers[owner] + c.parity_offset() + c.layout.countWords) +
                    (int64_t)(e % El) * R + c.rank;
    st_relaxed_sys(word, count_word(seq, s_expertCount[e]));
  }
}

// Tokens a sender block plans together: one round of count-word waits for all of them, then their
// rows back to back (a block with several tokens, e.g. 8 ranks sharing one GPU, waited per token).
constexpr int kPlanBatch = 8;

// Where each of the block's n <= kPlanBatch tokens tFirst + j * stride goes per top-k position:
// s_dest[j][k] the owner's recvX row (NULL: none), s_scales[j][k] its scales row; writes the handle
// entries at the owners and this rank's sentSlot, and counts rows per owner in s_rowsTo.
// Collective over the block.
__device__ void plan_tokens_direct(const DispatchParams& p, int seq, const int* s_topk, const int* s_alive,
                                   char* const* s_peers, int tFirst,
                                   int stride, int n, int (*s_pos)[kMaxTopk], int (*s_begin)[kMaxTopk],
                                   char* (*s_dest)[kMaxTopk], char* (*s_scales)[kMaxTopk], int* s_rowsTo) {
  const Common& c = p.c;
  const Layout& l = c.layout;
  const int K = p.numTopk, El = l.numLocalExperts, R = l.numRanks, me = c.rank;
  for (int i = threadIdx.x; i < n * kMaxTopk; i += blockDim.x) {
    s_pos[i / kMaxTopk][i % kMaxTopk] = 0;
    s_begin[i / kMaxTopk][i % kMaxTopk] = 0;
  }
  if (tFirst == (int)blockIdx.x) LL_TRACE(c, seq, 13);
  __syncthreads();
  if (tFirst == (int)blockIdx.x) LL_TRACE(c, seq, 14);
  for (int j = 0; j < n; ++j) {
    // Point 15: the first token's pass done (it reads the counts, so it is not stamped early).
    const auto scanned = [&](unsigned counts) {
      if (j == 0 && tFirst == (int)blockIdx.x && counts != 0xffffffffu) LL_TRACE(c, seq, 15);
    };
    count_earlier_tokens(s_topk, tFirst + j * stride, K, s_pos[j], scanned);
  }
  if (tFirst == (int)blockIdx.x) LL_TRACE(c, seq, 8);  // sender blocks' points 8 and 9: first batch only
  // Begins: the counts of source ranks below this one, one (token, k, source) triple per thread. The
  // owner's own word is awaited too: the owner has then started this call, so it is done (in its
  // stream order) with whatever it did with this parity's outputs before.
  for (int i = threadIdx.x; i < n * K * R; i += blockDim.x) {
    const int j = i / (K * R), k = (i / R) % K, s = i % R;
    const int e = s_topk[(tFirst + j * stride) * K + k];
    if (e < 0 || (s >= me && s != e / El) || !s_alive[e / El] || !s_alive[s]) continue;
    const int count = wait_count(c, s_peers, e / El, e % El, s, seq);
    if (s < me && count != 0) atomicAdd(&s_begin[j][k], count);
  }
  __syncthreads();
  if (tFirst == (int)blockIdx.x) LL_TRACE(c, seq, 9);
  for (int i = threadIdx.x; i < n * K; i += blockDim.x) {
    const int j = i / K, k = i % K, t = tFirst + j * stride;
    const int e = s_topk[t * K + k];
    const int owner = e >= 0 ? e / El : -1;
    char* dest = nullptr;
    char* scales = nullptr;
    int64_t flat = 0;
    if (owner >= 0 && s_alive[owner]) {
      // Stale counts after a timeout could overflow the expert's slots: the row is then dropped.
      const int slot = s_begin[j][k] + s_pos[j][k];
      if (slot < l.slotsPerExpert) {
        flat = (int64_t)(e % El) * l.slotsPerExpert + slot;
        char* region = s_peers[owner] + c.parity_offset();
        const int numGroups = l.hidden / kGroupSize;
        dest = region + l.recvX + flat * (p.useFp8 ? l.hidden : 2 * l.hidden);
        scales = region + l.recvScales + flat * (p.useUe8m0 ? numGroups / kUe8m0GroupsPerWord : numGroups) * 4;
        reinterpret_cast<int*>(region + l.srcTokenIdx)[flat] = t;
        reinterpret_cast<int*>(region + l.slotRoute)[flat] = (me << 16) | k;
        atomicAdd(&s_rowsTo[owner], 1);
      }
    }
    s_dest[j][k] = dest;
    s_scales[j][k] = scales;
    reinterpret_cast<int*>(c.local_region() + l.sentSlot)[(int64_t)t * l.maxTopk + k] = dest != nullptr ? (int)flat : -1;
  }
  __syncthreads();
}

// This thread's second chunk of row t (v = threadIdx.x + blockDim.x; zeros past the row).
__device__ __forceinline__ RawChunk second_chunk(const DispatchParams& p, int t) {
  const int H = p.c.layout.hidden, v = threadIdx.x + blockDim.x;
  return load_chunk(reinterpret_cast<const int4*>(p.x + (int64_t)t * H), v, v < H / 16);
}

// fp8 into packed slots: payload, then f32 scales (group leaders) or, with ue8m0, one word of four
// exponent bytes per warp (H is then a multiple of 512, so a warp's 32 chunks are 4 whole groups).
// `first`, `second`: this thread's first two chunks (v and v + blockDim), loaded by the caller ahead
// of the token's waits (at hidden 7168 that is the whole row: no load waits after the plan). Each
// later chunk is loaded one step ahead, so a load is always in flight while the previous one is
// quantized; the last step loads the first chunk of the row at `nextRow` (when not NULL), which is
// returned.
__device__ RawChunk send_row_fp8_direct(const DispatchParams& p, int t, char* const* s_dest, char* const* s_scales,
                                        const RawChunk& first, const RawChunk& second, const int4* nextRow) {
  const int H = p.c.layout.hidden;
  const bool roundScale = p.roundScale || p.useUe8m0;
  const int lane = threadIdx.x % 32;
  const int4* src = reinterpret_cast<const int4*>(p.x + (int64_t)t * H);
  RawChunk next = first;
  for (int base = 0; base < H / 16; base += blockDim.x) {
    const int v = base + threadIdx.x;
    const bool active = v < H / 16;
    const RawChunk current = next;
    if (base + (int)blockDim.x < H / 16) {
      next = base == 0 ? second : load_chunk(src, v + blockDim.x, v + (int)blockDim.x < H / 16);
    } else if (nextRow != nullptr) {
      next = load_chunk(nextRow, threadIdx.x, (int)threadIdx.x < H / 16);
    }
    const Fp8Chunk chunk = quantize_loaded(current, active, roundScale);
    uint32_t exponents = 0;
    if (p.useUe8m0) {
      const uint32_t mine = (__float_as_uint(chunk.scale) >> 23) & 0xffu;
#pragma unroll
      for (int b = 0; b < kUe8m0GroupsPerWord; ++b)
        exponents |= __shfl_sync(0xffffffffu, mine, b * (kGroupSize / 16)) << (8 * b);
    }
    if (!active) continue;
    const bool groupLeader = (v % (kGroupSize / 16)) == 0;
    for (int k = 0; k < p.numTopk; ++k) {
      char* dest = s_dest[k];
      if (dest == nullptr) continue;
      st_na_int4(reinterpret_cast<int4*>(dest) + v, chunk.packed);
      if (p.useUe8m0) {
        if (lane == 0) reinterpret_cast<uint32_t*>(s_scales[k])[v / 32] = exponents;
      } else if (groupLeader) {
        reinterpret_cast<float*>(s_scales[k])[v / (kGroupSize / 16)] = chunk.scale;
      }
    }
  }
  return next;
}

// The grid's receiver block, while the others send: every live source's count words of this call (a
// missing source is named), the handle's ranges and per-expert received counts from them, then
// (thread 0) the arrived counter up to every row those counts announce: senders add their rows after
// writing them, so the rows are all in. The counter is cumulative: its target is this rank's running
// total per parity. s_counts: [El * R].
__device__ void finish_direct_receive(const DispatchParams& p, int seq, const int* s_alive, char* const* s_peers,
                                      int* s_counts) {
  const Common& c = p.c;
  const Layout& l = c.layout;
  const int R = l.numRanks, El = l.numLocalExperts;
  char* region = c.local_region();
  // One (expert, source) count word per thread: the waits overlap (a loop over sources per expert
  // made R waits in a row, the floor's largest cost at EP8).
  for (int i = threadIdx.x; i < El * R; i += blockDim.x) {
    const int e = i / R, s = i % R;
    int count = 0;
    if (s_alive[s]) {
      // Expert 0's waits give the wait time per source rank (stats).
      const bool timed = e == 0 && p.waitStats != nullptr;
      const uint64_t start = timed ? globaltimer_ns() : 0;
      count = wait_count(c, s_peers, c.rank, e, s, seq);
      if (timed) atomicAdd(p.waitStats + s, (unsigned long long)(globaltimer_ns() - start));
    }
    s_counts[i] = count;
  }
  __syncthreads();
  LL_TRACE(c, seq, 6);
  int* range = reinterpret_cast<int*>(region + l.layoutRange);
  unsigned long long mine = 0;
  for (int e = threadIdx.x; e < El; e += blockDim.x) {
    int running = 0;
    for (int s = 0; s < R; ++s) {
      const int count = s_counts[e * R + s];
      range[((int64_t)e * R + s) * 2] = running;
      range[((int64_t)e * R + s) * 2 + 1] = count;
      running += count;
    }
    reinterpret_cast<int*>(region + l.recvCount)[e] = running;
    if (p.cumulativeRecvStats != nullptr) atomicAdd(p.cumulativeRecvStats + e, running);
    mine += (unsigned long long)running;
  }
  const unsigned long long total = block_sum(mine);
  LL_TRACE(c, seq, 8);
  if (threadIdx.x == 0) {
    const uint64_t target = c.state->dispatchExpected[c.parity] + total;
    c.state->dispatchExpected[c.parity] = target;
    const auto* arrived = reinterpret_cast<const uint64_t*>(region + l.dispatchArrived);
    if (ld_volatile(&c.state->failed) != 0 || !wait_at_least(arrived, target, c.timeoutNs))
      record_timeout(c.state, c.errorWord, kSomeRowsMissing, kPhaseDispatch);
  }
  LL_TRACE(c, seq, 9);
}

__global__ void __launch_bounds__(kThreads, kBlocksPerSm) dispatch_direct_kernel(DispatchParams p) {
  extern __shared__ int s_dynamic[];
  __shared__ int s_alive[kMaxRanks];
  __shared__ int s_pos[kPlanBatch][kMaxTopk];
  __shared__ int s_begin[kPlanBatch][kMaxTopk];
  __shared__ char* s_dest[kPlanBatch][kMaxTopk];
  __shared__ char* s_scales[kPlanBatch][kMaxTopk];
  __shared__ int s_rowsTo[kMaxRanks];
  __shared__ char* s_peers[kMaxRanks];  // c.peers: no global load before each peer address
  const Common& c = p.c;
  const int R = c.layout.numRanks, K = p.numTopk, T = p.numTokens, H = c.layout.hidden;
  int* s_topk = s_dynamic;                 // [T * K]
  int* s_expertCount = s_dynamic + T * K;  // [numExperts]
  // The last block only receives, so its waits for the count words and its writes of the handle's
  // ranges overlap the senders' stores (after a token of its own they were on the critical path).
  const int senders = (int)gridDim.x - 1;
  const bool receiver = (int)blockIdx.x == senders;
  await_previous_kernel();
  LL_TRACE_ENTRY();
  // The call's start: the call number, both alive flags, the peer base and the first routing row of
  // each thread are all loaded before any is used, then stored under one sync: one round trip. (Each
  // store right after its load made warp 0 wait four in a row.) No block records the call number (at
  // its end) before all its threads have passed that sync, so every thread reads the old one.
  const int seq = ld_volatile(&c.state->dispatchSeq[c.parity]) + 1;
  const int selfFlag = c.state->alive[c.rank];
  const int firstRank = threadIdx.x, firstToken = threadIdx.x;
  int firstFlag = 0;
  char* firstPeer = nullptr;
  if (firstRank < R) {
    firstFlag = c.state->alive[firstRank];
    firstPeer = c.peers[firstRank];
  }
  const bool routes = firstToken < T;  // every block: the receiver publishes the counts
  RoutingRow firstRow;
  if (routes) firstRow = load_routing_row(p.topkIdx, firstToken, K);
  LL_TRACE(c, seq, 0);
  LL_TRACE_ENTRY_STORE(0, c, seq);
  for (int r = firstRank; r < R; r += blockDim.x) {
    const int flag = r == firstRank ? firstFlag : c.state->alive[r];
    s_alive[r] = (selfFlag != 0) & (flag != 0);
    s_peers[r] = r == firstRank ? firstPeer : c.peers[r];
    s_rowsTo[r] = 0;
  }
  if (routes) {
    store_routing_row(firstRow, firstToken, K, c.numExperts, s_topk);
    load_routing(p.topkIdx, T, K, c.numExperts, s_topk, firstToken + blockDim.x);
  }
  __syncthreads();
  if (receiver) {
    // This rank's counts, here rather than in a sender block: block 0 did it and was the last to
    // start its rows (trace, session 8). First thing: the peers' senders wait for them.
    publish_counts(p, seq, s_topk, s_alive, s_peers, s_expertCount);
    LL_TRACE(c, seq, 2);
    // This call reads no inbox, and the previous one of the parity (in stream order) is done: a
    // peer's next copy-engine blob of this parity may come (see await_acks). After the counts: the
    // release store's fence would delay them.
    send_acks(c, seq, s_alive);
    LL_TRACE(c, seq, 11);
    __syncthreads();  // the histogram is read before the count words overwrite it
    // Call-number bookkeeping before the waits: this block finishes last, and the atomic's round
    // trip would follow its final wait.
    record_call_number(c.state->dispatchDone[c.parity], c.state->dispatchSeq[c.parity], seq);
    // Its shared routing and histogram space holds the El * R = numExperts count words now.
    finish_direct_receive(p, seq, s_alive, s_peers, s_dynamic);
    LL_TRACE(c, seq, 7);
    return;
  }
  LL_TRACE(c, seq, 1);

  // This block's tokens: blockIdx.x + j * senders, in batches of kPlanBatch.
  const int numMine = (T - (int)blockIdx.x + senders - 1) / senders;
  const auto row_of = [&](int t) { return reinterpret_cast<const int4*>(p.x + (int64_t)t * H); };
  for (int batch = 0; batch < numMine; batch += kPlanBatch) {
    const int n = min(kPlanBatch, numMine - batch), tFirst = (int)blockIdx.x + batch * senders;
    // The first row's first two chunks are read before the planning waits (their loads overlap them).
    RawChunk first = p.useFp8 ? load_chunk(row_of(tFirst), threadIdx.x, (int)threadIdx.x < H / 16) : RawChunk{};
    RawChunk second = p.useFp8 ? second_chunk(p, tFirst) : RawChunk{};
    if (batch == 0) LL_TRACE(c, seq, 12);
    plan_tokens_direct(p, seq, s_topk, s_alive, s_peers, tFirst, senders, n, s_pos, s_begin, s_dest, s_scales, s_rowsTo);
    if (batch == 0) LL_TRACE(c, seq, 3);
    for (int j = 0; j < n; ++j) {
      const int t = tFirst + j * senders;
      if (p.useFp8) {
        if (j > 0) second = second_chunk(p, t);
        first = send_row_fp8_direct(p, t, s_dest[j], s_scales[j], first, second, j + 1 < n ? row_of(t + senders) : nullptr);
      } else {
        send_row_bf16(p, t, s_dest[j]);
      }
    }
    __syncthreads();  // s_dest is rewritten by the next batch
    if (batch == 0) LL_TRACE(c, seq, 4);
  }

  // The loop ended with __syncthreads: every row, scale and handle entry of this block is written.
  announce_rows(c, s_peers, s_rowsTo, c.layout.dispatchArrived);
  LL_TRACE(c, seq, 5);
  record_call_number(c.state->dispatchDone[c.parity], c.state->dispatchSeq[c.parity], seq);
  LL_TRACE(c, seq, 7);
}

// No hook: one kernel sends, then (every block, after the grid's last block has published) receives.
// Its grid fits the waiting-block budget, so every rank's blocks are resident together.
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) dispatch_fused_kernel(DispatchParams p) {
  extern __shared__ int s_dynamic[];
  await_previous_kernel();
  const int seq = next_seq(&p.c.state->dispatchSeq[p.c.parity]);
  dispatch_send(p, seq, s_dynamic);
  dispatch_recv(p, seq);
}

// ---- dispatch through the copy engines (peer pointers; hook, and optionally without) -----------
//
// Send kernel (no waits on this call's peers): builds this rank's blob (BlobShape) once in its own
// buffer: the per-expert counts, each (t, k)'s expert and position among this rank's tokens of that
// expert, and the rows (quantized once). After it, the host queues per peer two copies on side
// streams (copy engines, no SM): the blob into the peer's inbox for this rank, then the flag word
// (call number, T, K) into the peer's inbox flag; stream order puts the flag after the blob.
// Receive kernel (hook(), or right after the copies without hook): waits for every live source's
// inbox flag, takes slot begins as the prefix of counts over source ranks, places each row at every
// local expert it goes to, writes the handle and this rank's sentSlot (the slot each of its own rows
// took at its owner: a pull combine reads there), then acks the call to every source.
// A source's next blob of this parity is copied only after every receiver acked this one: the send
// kernel waits for the acks (normally long there: they come from the receivers' previous hook).

__global__ void __launch_bounds__(kThreads, kBlocksPerSm) dispatch_blob_send_kernel(DispatchParams p) {
  extern __shared__ int s_dynamic[];
  __shared__ int s_alive[kMaxRanks];
  __shared__ int s_pos[kMaxTopk];
  __shared__ char* s_dest[kMaxTopk];
  __shared__ char* s_scales[kMaxTopk];
  const Common& c = p.c;
  const Layout& l = c.layout;
  const int R = l.numRanks, K = p.numTopk, T = p.numTokens, E = c.numExperts;
  int* s_topk = s_dynamic;                 // [T * K]
  int* s_expertCount = s_dynamic + T * K;  // [E], block 0
  await_previous_kernel();
  const int seq = next_seq(&c.state->dispatchSeq[c.parity]);
  char* blob = c.local_region() + l.sendBlob;
  const BlobShape b = blob_shape(E, l.hidden, T, K, p.useFp8, p.useUe8m0);
  int* experts = reinterpret_cast<int*>(blob + b.experts);
  int* positions = reinterpret_cast<int*>(blob + b.positions);

  const bool selfAlive = c.state->alive[c.rank] != 0;
  for (int r = threadIdx.x; r < R; r += blockDim.x) s_alive[r] = selfAlive && c.state->alive[r] != 0;
  if (threadIdx.x < kMaxTopk) {
    s_dest[threadIdx.x] = nullptr;
    s_scales[threadIdx.x] = nullptr;
  }
  load_routing(p.topkIdx, T, K, E, s_topk);
  __syncthreads();

  for (int t = blockIdx.x; t < T; t += gridDim.x) {
    char* row = blob + b.rows + (int64_t)t * b.rowBytes;
    const RawChunk first = p.useFp8 ? load_chunk(reinterpret_cast<const int4*>(p.x + (int64_t)t * l.hidden),
                                                 threadIdx.x, (int)threadIdx.x < l.hidden / 16)
                                    : RawChunk{};
    if (threadIdx.x < kMaxTopk) s_pos[threadIdx.x] = 0;
    if (threadIdx.x == 0) {
      s_dest[0] = row;
      s_scales[0] = row + b.scalesOffsetInRow;
    }
    __syncthreads();
    count_earlier_tokens(s_topk, t, K, s_pos);
    __syncthreads();
    if (threadIdx.x < K) {
      experts[t * K + threadIdx.x] = s_topk[t * K + threadIdx.x];
      positions[t * K + threadIdx.x] = s_pos[threadIdx.x];
    }
    if (p.useFp8) {
      send_row_fp8_direct(p, t, s_dest, s_scales, first, second_chunk(p, t), nullptr);
    } else {
      send_row_bf16(p, t, s_dest);
    }
    __syncthreads();  // s_pos is reset for the next token
  }

  if (blockIdx.x == 0) {
    int* counts = reinterpret_cast<int*>(blob);
    count_tokens_per_expert(s_topk, T * K, E, s_expertCount);
    for (int e = threadIdx.x; e < E; e += blockDim.x) counts[e] = s_expertCount[e];
    if (threadIdx.x == 0) *reinterpret_cast<int64_t*>(c.local_region() + l.flagSource) = inbox_flag(seq, T, K);
    await_acks(c, seq, s_alive);
  }
  record_call_number(c.state->dispatchDone[c.parity], c.state->dispatchSeq[c.parity], seq);
}

// Moves one blob row (or its `part`-th slice of `parts`) with a warp to the `numDest` flat slots
// `flat` (top-k positions `kOf`) it takes here: loads once, stores to each. Scales and handle
// entries go with part 0.
__device__ void place_blob_row(const DispatchParams& p, const char* row, const BlobShape& b, int part, int parts,
                               const int64_t* flat, const int* kOf, int numDest, int s, int t, int lane) {
  const Layout& l = p.c.layout;
  char* region = p.c.local_region();
  const int payloadInt4 = (int)(b.scalesOffsetInRow / 16);
  const int sliceInt4 = (payloadInt4 + parts - 1) / parts;
  const int begin = part * sliceInt4, end = min(payloadInt4, begin + sliceInt4);
  const int4* src = reinterpret_cast<const int4*>(row);
  int4* recvX = reinterpret_cast<int4*>(region + l.recvX);
  for (int v0 = begin + lane; v0 < end; v0 += 32 * 4) {
    int4 values[4];
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (v0 + 32 * u < end) values[u] = __ldcg(src + v0 + 32 * u);
    for (int d = 0; d < numDest; ++d) {
      int4* dst = recvX + flat[d] * payloadInt4;
#pragma unroll
      for (int u = 0; u < 4; ++u)
        if (v0 + 32 * u < end) st_na_int4(dst + v0 + 32 * u, values[u]);
    }
  }
  if (part != 0) return;
  if (p.useFp8) {
    const int numGroups = l.hidden / kGroupSize;
    const int words = p.useUe8m0 ? numGroups / kUe8m0GroupsPerWord : numGroups;
    const int* scales = reinterpret_cast<const int*>(row + b.scalesOffsetInRow);
    for (int w = lane; w < words; w += 32) {
      const int value = __ldcg(scales + w);
      for (int d = 0; d < numDest; ++d) reinterpret_cast<int*>(region + l.recvScales)[flat[d] * words + w] = value;
    }
  }
  if (lane < numDest) {
    reinterpret_cast<int*>(region + l.srcTokenIdx)[flat[lane]] = t;
    reinterpret_cast<int*>(region + l.slotRoute)[flat[lane]] = (s << 16) | kOf[lane];
  }
}

__global__ void __launch_bounds__(kThreads, kBlocksPerSm) dispatch_blob_recv_kernel(DispatchParams p) {
  extern __shared__ int s_begin[];  // [El * R]: slot begin of (local expert, source rank)
  __shared__ int s_alive[kMaxRanks];
  __shared__ int s_tokens[kMaxCopyRanks];
  __shared__ int s_topkOf[kMaxCopyRanks];
  __shared__ int s_tokenBegin[kMaxCopyRanks + 1];
  __shared__ int64_t s_flat[kWarps][kMaxTopk];
  __shared__ int s_k[kWarps][kMaxTopk];
  __shared__ int s_last;
  const Common& c = p.c;
  const Layout& l = c.layout;
  const int R = l.numRanks, El = l.numLocalExperts, me = c.rank;
  await_previous_kernel();
  const int seq = ld_volatile(&c.state->dispatchSeq[c.parity]);
  char* region = c.local_region();
  const bool selfAlive = c.state->alive[me] != 0;
  for (int r = threadIdx.x; r < R; r += blockDim.x) s_alive[r] = selfAlive && c.state->alive[r] != 0;
  __syncthreads();

  // Every live source's flag: its blob is in this rank's inbox (own blob: in place).
  const auto* flags = reinterpret_cast<const int64_t*>(region + l.inboxFlags);
  for (int s = threadIdx.x; s < R; s += blockDim.x) {
    int tokens = 0, topk = 0;
    if (s == me && selfAlive) {
      tokens = p.numTokens;
      topk = p.numTopk;
    } else if (s_alive[s]) {
      // A valid flag's low word is never 0 (K >= 1); a timeout returns 0 (tokens and topk 0).
      const uint64_t start = globaltimer_ns();
      const int low = wait_count_word(c, flags + s, s, seq, kPhaseDispatch);
      tokens = (low >> 8) & 0xffffff;
      topk = low & 0xff;
      if (blockIdx.x == 0 && p.waitStats != nullptr) atomicAdd(p.waitStats + s, (unsigned long long)(globaltimer_ns() - start));
    }
    s_tokens[s] = tokens;
    s_topkOf[s] = topk;
  }
  fence_sys();  // acquire: the blobs before this rank's reads of them
  __syncthreads();
  if (threadIdx.x == 0) {
    int running = 0;
    for (int s = 0; s < R; ++s) {
      s_tokenBegin[s] = running;
      running += s_tokens[s];
    }
    s_tokenBegin[R] = running;
  }
  // Slot begins: prefix over source ranks of their counts for each local expert.
  for (int e = threadIdx.x; e < El; e += blockDim.x) {
    int running = 0;
    for (int s = 0; s < R; ++s) {
      const int count = s_topkOf[s] > 0 ? __ldcg(reinterpret_cast<const int*>(blob_of(c, s)) + me * El + e) : 0;
      s_begin[e * R + s] = running;
      running += count;
      if (blockIdx.x == 0) {
        int* range = reinterpret_cast<int*>(region + l.layoutRange) + ((int64_t)e * R + s) * 2;
        range[0] = s_begin[e * R + s];
        range[1] = count;
      }
    }
    if (blockIdx.x == 0) {
      reinterpret_cast<int*>(region + l.recvCount)[e] = running;
      if (p.cumulativeRecvStats != nullptr) atomicAdd(p.cumulativeRecvStats + e, running);
    }
  }
  __syncthreads();

  // One warp per (source token, slice); a token's row goes to each of its experts here.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int numWarps = gridDim.x * kWarps, globalWarp = blockIdx.x * kWarps + warp;
  const int totalTokens = s_tokenBegin[R];
  const int parts = max(1, min(kCombinePartsPerRow, numWarps / max(1, totalTokens)));
  for (int work = globalWarp; work < totalTokens * parts; work += numWarps) {
    const int item = work / parts, part = work % parts;
    int s = 0;
    while (item >= s_tokenBegin[s + 1]) ++s;
    const int t = item - s_tokenBegin[s], K = s_topkOf[s];
    const char* blob = blob_of(c, s);
    const BlobShape b = blob_shape(c.numExperts, l.hidden, s_tokens[s], K, p.useFp8, p.useUe8m0);
    const int* experts = reinterpret_cast<const int*>(blob + b.experts) + (int64_t)t * K;
    const int* positions = reinterpret_cast<const int*>(blob + b.positions) + (int64_t)t * K;
    const int e = lane < K ? __ldcg(experts + lane) : -1;
    const int position = lane < K ? __ldcg(positions + lane) : 0;
    const bool local = e >= 0 && e / El == me;
    int64_t myFlat = 0;
    if (local) myFlat = (int64_t)(e % El) * l.slotsPerExpert + s_begin[(e % El) * R + s] + position;
    // Own tokens: the slot each row takes at its owner, for a pull combine.
    if (s == me && part == 0 && lane < K) {
      int slot = -1;
      if (e >= 0 && s_alive[e / El]) {
        slot = position;
        for (int q = 0; q < me; ++q)
          if (s_topkOf[q] > 0) slot += __ldcg(reinterpret_cast<const int*>(blob_of(c, q)) + e);
        slot += (e % El) * (int)l.slotsPerExpert;
      }
      reinterpret_cast<int*>(region + l.sentSlot)[(int64_t)t * l.maxTopk + lane] = slot;
    }
    const unsigned mask = __ballot_sync(0xffffffffu, local);
    if (mask == 0) continue;  // warp-uniform
    // This warp's destinations in shared memory (a run-time indexed register array would spill).
    if (local) {
      const int d = __popc(mask & ((1u << lane) - 1u));
      s_flat[warp][d] = myFlat;
      s_k[warp][d] = lane;
    }
    __syncwarp();
    place_blob_row(p, blob + b.rows + (int64_t)t * b.rowBytes, b, part, parts, s_flat[warp], s_k[warp], __popc(mask),
                   s, t, lane);
    __syncwarp();  // s_flat/s_k are rewritten by the warp's next item
  }

  // Every block has read its rows: the last one acks the call to every live source.
  if (!last_block_to_finish(&c.state->dispatchRecvDone[c.parity], &s_last)) return;
  send_acks(c, seq, s_alive);
}

// ---- combine -------------------------------------------------------------------------------------

// Copy n int4 by one warp with four non-coherent loads in flight per lane (expert outputs were
// written by earlier kernels; the destination is a peer's receive area). Eight in flight held 32
// registers: within the combine kernels' 64 that made them spill (each spilled value then costs an
// L1 round trip, an L2 one under the largest shared-memory split).
__device__ __forceinline__ void warp_copy_int4_wide(int4* dst, const int4* src, int n, int lane) {
  constexpr int kInFlight = 4;
  int i = lane;
  for (; i + 32 * (kInFlight - 1) < n; i += 32 * kInFlight) {
    int4 v[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) v[u] = ld_nc_int4(src + i + 32 * u);
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) st_na_int4(dst + i + 32 * u, v[u]);
  }
  int4 v[kInFlight - 1];  // the rest, loads first
#pragma unroll
  for (int u = 0; u < kInFlight - 1; ++u)
    if (i + 32 * u < n) v[u] = ld_nc_int4(src + i + 32 * u);
#pragma unroll
  for (int u = 0; u < kInFlight - 1; ++u)
    if (i + 32 * u < n) st_na_int4(dst + i + 32 * u, v[u]);
}

// The send phase of call `seq`: every valid (expert, slot) row goes to its home rank. The rows of all
// local experts form one flat list (prefix of recvCount in shared memory) spread over every warp of
// the grid, so a few busy experts never leave most warps idle. kStaged: the NVSHMEM transport
// (p.c.staged); the peer-pointer instantiation has none of its code (no NVSHMEM calls, whose saved
// registers made the fused kernel spill 400 bytes per thread).
// recordSeq false (the fused peer-pointer kernel): the call number is recorded by the receive
// phase's last block instead (one grid-completion atomic per call, and none before the waits).
template <bool kStaged>
__device__ void combine_send(const CombineParams& p, int seq, int* s_prefix, bool recordSeq) {
  __shared__ int s_last;
  __shared__ int s_rowsTo[kMaxRanks];
  const Common& c = p.c;
  const Layout& l = c.layout;
  const int R = l.numRanks, El = l.numLocalExperts;
  char* region = c.local_region();
  const bool selfAlive = c.state->alive[c.rank] != 0;
  if (!kStaged)
    for (int q = threadIdx.x; q < R; q += blockDim.x) s_rowsTo[q] = 0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int globalWarp = blockIdx.x * kWarps + warp, numWarps = gridDim.x * kWarps;
  const int rowInt4 = l.hidden * 2 / 16;
  const int* route = reinterpret_cast<const int*>(region + l.slotRoute);
  const int* srcToken = reinterpret_cast<const int*>(region + l.srcTokenIdx);

  if (p.pull) {
    // Nothing moves: every live home learns (release: x, written by earlier kernels, is visible to
    // it before the word) that it reads its rows from this rank's combine buffer.
    if (blockIdx.x == 0)
      for (int q = threadIdx.x; q < R; q += blockDim.x)
        if (selfAlive && c.state->alive[q])
          st_release_sys(reinterpret_cast<int64_t*>(c.peers[q] + c.parity_offset() + l.combineCountWords) + c.rank,
                             count_word(seq, kPullMarker));
    if (recordSeq) record_call_number(c.state->combineDone[c.parity], c.state->combineSeq[c.parity], seq);
    return;
  }
  warp_exclusive_scan(reinterpret_cast<const int*>(region + l.recvCount), El, s_prefix);
  __syncthreads();
  const int total = selfAlive ? s_prefix[El] : 0;
  // Peer pointers: with fewer rows than warps, each row goes as kCombinePartsPerRow slices, one warp
  // each (a tiny call's latency is then one slice's copy, not a whole row's); bigger calls send
  // whole rows (a slice's bookkeeping loads would not pay off).
  const int parts = !kStaged && total * kCombinePartsPerRow <= numWarps ? kCombinePartsPerRow : 1;
  const int partInt4 = (rowInt4 + parts - 1) / parts;
  if (!kStaged && blockIdx.x == 0) {
    // Every live home first learns how many slices this rank sends it in this call (from the
    // handle's ranges), as a count word: it waits for the word (naming a rank that never starts the
    // call), then for that many slices on its arrived counter.
    const int* range = reinterpret_cast<const int*>(region + l.layoutRange);
    for (int q = warp; q < R; q += kWarps) {
      if (!selfAlive || !c.state->alive[q]) continue;  // warp-uniform
      int rows = 0;
      for (int e = lane; e < El; e += 32) rows += range[((int64_t)e * R + q) * 2 + 1];
      rows = __reduce_add_sync(0xffffffffu, rows);
      auto* word = reinterpret_cast<int64_t*>(c.peers[q] + c.parity_offset() + l.combineCountWords) + c.rank;
      if (lane == 0) st_relaxed_sys(word, count_word(seq, rows * parts));
    }
  }
  for (int work = globalWarp; work < total * parts; work += numWarps) {
    const int item = work / parts, part = work % parts;
    // The expert whose range holds `item`: the last e with s_prefix[e] <= item.
    int lo = 0, hi = El - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (s_prefix[mid] <= item) lo = mid; else hi = mid - 1;
    }
    const int e = lo;
    const int64_t flat = (int64_t)e * l.slotsPerExpert + (item - s_prefix[e]);
    const int r = route[flat], s = r >> 16, k = r & 0xffff;
    if (!c.state->alive[s]) continue;
    const int t = srcToken[flat];
    const int64_t offset = c.parity_offset() + l.combineRecv + ((int64_t)t * l.maxTopk + k) * l.hidden * 2;
    const __nv_bfloat16* src = p.x + flat * l.hidden;
    char* peer = c.peers[s];
    if (!kStaged || peer != nullptr) {
      const int begin = part * partInt4;
      warp_copy_int4_wide(reinterpret_cast<int4*>(peer + offset) + begin, reinterpret_cast<const int4*>(src) + begin,
                          min(partInt4, rowInt4 - begin), lane);
      if (lane == 0 && !kStaged) atomicAdd(&s_rowsTo[s], 1);  // counts slices
      continue;
    }
    // A put reads a symmetric source: the combine buffer's own row (copied there unless the
    // expert outputs already are the combine buffer: zero-copy).
    auto* staged = reinterpret_cast<__nv_bfloat16*>(region + l.combineBuffer) + flat * l.hidden;
    if (src != staged) {
      warp_copy_int4<false>(reinterpret_cast<int4*>(staged), reinterpret_cast<const int4*>(src), rowInt4, lane);
      __syncwarp();
    }
    put_warp(c.local + offset, staged, (size_t)l.hidden * 2, s);
  }

  if (!kStaged) {
    // Peer pointers: no flags; each block announces its slices to their homes' arrived counters.
    __syncthreads();
    announce_rows(c, c.peers, s_rowsTo, l.combineArrived);
    if (recordSeq) record_call_number(c.state->combineDone[c.parity], c.state->combineSeq[c.parity], seq);
    return;
  }
  quiet_block(c);
  if (!last_block_to_finish(&c.state->combineDone[c.parity], &s_last)) return;
  for (int s = threadIdx.x; s < R; s += blockDim.x) {
    if (!selfAlive || !c.state->alive[s]) continue;
    raise_peer_flag(c, s, c.parity_offset() + l.combineReady + (int64_t)c.rank * 4, seq);
  }
  if (threadIdx.x == 0) c.state->combineSeq[c.parity] = seq;
}

// Rows summed per pass: their loads are all issued before the (ordered) sum.
constexpr int kCombineRowsInFlight = 8;

// The receive phase of call `seq`: wait for every live rank's flag, then per home token sum its
// rows over k in order in f32 (no FMA) and round to bf16 once.
// The top-k position whose row holds token t's output of expert topkIdx[t][k] (a repeated expert's
// row sits at its first position), or -1 when none arrives (no expert, out of range, a dead owner).
__device__ __forceinline__ int combine_row_of(const CombineParams& p, bool selfAlive, int t, int k) {
  const int K = p.numTopk, El = p.c.layout.numLocalExperts;
  const int64_t e = p.topkIdx[(int64_t)t * K + k];
  if (!selfAlive || e < 0 || e >= p.c.numExperts || !p.c.state->alive[e / El]) return -1;
  for (int j = 0; j < k; ++j)
    if (p.topkIdx[(int64_t)t * K + j] == e) return j;
  return k;
}

// Peer pointers: every live sender's count word of call `seq` (naming a rank that never writes it),
// then the arrived counter up to the slices those words announce. Returns the new cumulative target,
// which the grid's last block stores once the block's work is done (finish_recv).
// s_pull[s] is set for senders that let this rank read its rows from their combine buffer.
__device__ uint64_t combine_wait_rows(const CombineParams& p, int seq, bool selfAlive, bool hasWork, int* s_pull) {
  const Common& c = p.c;
  const Layout& l = c.layout;
  char* region = c.local_region();
  for (int s = threadIdx.x; s < l.numRanks; s += blockDim.x) s_pull[s] = 0;
  __syncthreads();
  unsigned long long mySlices = 0;
  if (selfAlive) {
    const auto* words = reinterpret_cast<const int64_t*>(region + l.combineCountWords);
    for (int s = threadIdx.x; s < l.numRanks; s += blockDim.x) {
      if (!c.state->alive[s]) continue;
      const int slices = wait_count_word(c, words + s, s, seq, kPhaseCombine);
      if (slices == kPullMarker) {
        fence_sys();  // acquire: the sender's expert outputs before this rank's reads of them
        s_pull[s] = 1;
      } else {
        mySlices += (unsigned long long)slices;
      }
    }
  }
  const uint64_t base = c.state->combineExpected[c.parity];
  const unsigned long long slices = block_sum(mySlices);  // syncs: s_pull is complete too
  if (threadIdx.x == 0) {
    const auto* arrived = reinterpret_cast<const uint64_t*>(region + l.combineArrived);
    if (hasWork && (ld_volatile(&c.state->failed) != 0 || !wait_at_least(arrived, base + slices, c.timeoutNs)))
      record_timeout(c.state, c.errorWord, kSomeRowsMissing, kPhaseCombine);
  }
  __syncthreads();
  return base + slices;
}

// The receive phase's grid completion, in two halves. Thread 0 takes a ticket once the block's
// target is known, so the atomic's round trip overlaps the block's reduce (taken after it, the
// round trip was the last thing every block waited for). After the reduce, the holder of the last
// ticket resets the counter and stores the new target, and the call number `seq` unless it is
// negative (the send phase recorded it). Other threads hold ticket -1.
__device__ __forceinline__ int take_recv_ticket(const Common& c) {
  return threadIdx.x == 0 ? atomicAdd(&c.state->combineRecvDone[c.parity], 1) : -1;
}
__device__ __forceinline__ void finish_recv(const Common& c, int ticket, uint64_t target, int seq) {
  if (ticket != (int)gridDim.x - 1) return;
  c.state->combineRecvDone[c.parity] = 0;
  c.state->combineExpected[c.parity] = target;
  if (seq >= 0) c.state->combineSeq[c.parity] = seq;
}

// recordSeq: the fused peer-pointer kernel, whose send phase left the call number to this phase.
template <bool kStaged>
__device__ void combine_recv(const CombineParams& p, int seq, bool recordSeq) {
  __shared__ int s_row[kMaxTopk];
  __shared__ int s_owner[kMaxTopk];
  __shared__ int s_slot[kMaxTopk];
  __shared__ float s_weight[kMaxTopk];
  __shared__ const int4* s_rows[kMaxTopk];
  __shared__ int s_pull[kMaxRanks];
  const Common& c = p.c;
  const Layout& l = c.layout;
  const int R = l.numRanks, K = p.numTopk, H = l.hidden;
  char* region = c.local_region();
  const bool selfAlive = c.state->alive[c.rank] != 0;
  const bool failedBefore = ld_volatile(&c.state->failed) != 0;
  const int* ready = reinterpret_cast<const int*>(region + l.combineReady);
  const auto load_token = [&](int t) {
    if (threadIdx.x < K) {
      const int k = threadIdx.x;
      const int row = combine_row_of(p, selfAlive, t, k);
      s_row[k] = row;
      s_owner[k] = row >= 0 ? (int)(p.topkIdx[(int64_t)t * K + k] / l.numLocalExperts) : -1;
      s_slot[k] = row >= 0 ? reinterpret_cast<const int*>(region + l.sentSlot)[(int64_t)t * l.maxTopk + row] : -1;
      s_weight[k] = p.topkWeights[(int64_t)t * K + k];
    }
  };
  // With more blocks than tokens, a token's vectors are split over up to kMaxTokenSplits blocks
  // (across GPUs the reads are latency-bound: more blocks, more loads in flight).
  const int splits = max(1, min(kMaxTokenSplits, (int)gridDim.x / max(1, p.numTokens)));
  const int items = p.numTokens * splits;
  const bool hasWork = (int)blockIdx.x < items;
  // The block's first token's routing is read before the wait (its loads overlap it).
  int loaded = hasWork ? (int)blockIdx.x / splits : -1;
  if (hasWork) load_token(loaded);

  // Thread 0's new arrived target, kept in shared memory across the reduce (in a register it made
  // the fused kernel spill).
  __shared__ uint64_t s_target;
  int ticket = -1;
  if (!kStaged) {
    const uint64_t target = combine_wait_rows(p, seq, selfAlive, hasWork, s_pull);
    LL_TRACE_COMBINE(c, seq, 2);
    if (threadIdx.x == 0) s_target = target;
    ticket = take_recv_ticket(c);
  } else {
    for (int s = threadIdx.x; s < R; s += blockDim.x) s_pull[s] = 0;
    if (hasWork) {
      for (int s = threadIdx.x; s < R; s += blockDim.x) {
        if (!selfAlive || !c.state->alive[s]) continue;
        if (failedBefore || !wait_at_least(ready + s, seq, c.timeoutNs)) record_timeout(c.state, c.errorWord, s, kPhaseCombine);
      }
    }
    __syncthreads();
  }

  const char* rows = region + l.combineRecv;
  const int rowInt4 = H / 8, chunk = (rowInt4 + splits - 1) / splits;
  for (int item = blockIdx.x; item < items; item += gridDim.x) {
    const int t = item / splits, begin = (item % splits) * chunk, end = min(rowInt4, begin + chunk);
    if (t != loaded) {
      load_token(t);
      loaded = t;
      __syncthreads();
    }
    const int4* tokenRows = reinterpret_cast<const int4*>(rows + (int64_t)t * l.maxTopk * H * 2);
    int4* out = reinterpret_cast<int4*>(p.out + (int64_t)t * H);
    if (threadIdx.x < K) {
      // A pushed row sits in this rank's receive area; a pull sender's row in its combine buffer,
      // at the slot this rank's dispatch gave it.
      const int k = threadIdx.x, row = s_row[k], owner = s_owner[k];
      const int4* src = nullptr;
      if (row >= 0 && !s_pull[owner]) src = tokenRows + (int64_t)row * (H / 8);
      if (row >= 0 && s_pull[owner] && s_slot[k] >= 0)
        src = reinterpret_cast<const int4*>(c.peers[owner] + c.parity_offset() + l.combineBuffer) + (int64_t)s_slot[k] * (H / 8);
      s_rows[k] = src;
    }
    __syncthreads();
    // Row loads in flight per thread: 4 up to top-4, 8 above. Wider variants (4 x 2 vectors, 2 x 4)
    // held more registers than the kernel's 64 and spilled.
    if (K <= 2) {
      combine_token<2, 2>(s_rows, begin, end, K, s_weight, out);
    } else if (K <= 4) {
      combine_token<1, 4>(s_rows, begin, end, K, s_weight, out);
    } else {
      combine_token<1, kCombineRowsInFlight>(s_rows, begin, end, K, s_weight, out);
    }
    __syncthreads();
  }
  LL_TRACE_COMBINE(c, seq, 3);
  if (!kStaged) finish_recv(c, ticket, s_target, recordSeq ? seq : -1);
}

// The kernels come in two instantiations: kStaged == p.c.staged (the host picks, combine_kernels).
template <bool kStaged>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) combine_send_kernel(CombineParams p) {
  extern __shared__ int s_dynamic[];
  await_previous_kernel();
  combine_send<kStaged>(p, next_seq(&p.c.state->combineSeq[p.c.parity]), s_dynamic, true);
}

template <bool kStaged>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) combine_recv_kernel(CombineParams p) {
  await_previous_kernel();
  combine_recv<kStaged>(p, ld_volatile(&p.c.state->combineSeq[p.c.parity]), false);
}

// No hook: send, then receive in the same kernel (grid within the waiting-block budget).
template <bool kStaged>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) combine_fused_kernel(CombineParams p) {
  extern __shared__ int s_dynamic[];
  await_previous_kernel();
  LL_TRACE_ENTRY();
  const int seq = next_seq(&p.c.state->combineSeq[p.c.parity]);
  LL_TRACE_COMBINE(p.c, seq, 0);
  LL_TRACE_ENTRY_STORE(1, p.c, seq);
  // Peer pointers: the receive phase's last block records the call number (see combine_send).
  combine_send<kStaged>(p, seq, s_dynamic, kStaged);
  LL_TRACE_COMBINE(p.c, seq, 1);
  combine_recv<kStaged>(p, seq, !kStaged);
  LL_TRACE_COMBINE(p.c, seq, 7);
}

// The combine kernels of one transport.
struct CombineKernels {
  void (*send)(CombineParams);
  void (*recv)(CombineParams);
  void (*fused)(CombineParams);
};
template <bool kStaged>
constexpr CombineKernels kCombineKernels{combine_send_kernel<kStaged>, combine_recv_kernel<kStaged>,
                                         combine_fused_kernel<kStaged>};
CombineKernels combine_kernels(bool staged) { return staged ? kCombineKernels<true> : kCombineKernels<false>; }

// ---- host side -------------------------------------------------------------------------------------

struct Context {
  bunEpLowLatencyConfig_t config;
  Layout layout;
  int device;
  char* local;
  char** peersDevice;
  int* errorHost;
  int* errorDevice;
  bool unusable;
  // The last dispatch of each parity recorded in sentSlot where each of this rank's rows went
  // (direct or copy-engine dispatch): a pull combine may read there.
  bool sentSlotValid[2];
  int dispatchSendSmem;
  int waitingBlockBudget;  // blocks of kThreads one rank may keep spinning
  // Copy-engine dispatch: possible for this context; also used without hook (else direct).
  bool copyEngines;
  bool copyEnginesWithoutHook;
  // Kernels launched with programmatic stream serialization (sm_90+; BUN_EP_LL_PROGRAMMATIC_LAUNCH=0: off).
  bool programmaticLaunch;
  bool oneGpu;  // Common::oneGpu
  int numCopyStreams;
  cudaStream_t copyStreams[kMaxCopyStreams];
  cudaEvent_t sendDone[2];
  cudaEvent_t copiesDone[2][kMaxCopyStreams];
  int copiesInFlight[2];  // side streams holding copies of the parity's send that hook() must join
  bool hookPending[2];    // a hook-mode send of the parity awaits its receive step
  std::vector<int> hostAlive;     // the rank mask as last set (which peers get copies)
  std::vector<char*> peersHost;  // every rank's buffer base as this process sees it
};

// Launches one of this file's kernels (kThreads per block) on `stream`. With ctx->programmaticLaunch
// the launch may be processed while the stream's previous kernel drains (its blocks are scheduled
// once that kernel's blocks have all exited; no early trigger, so no more blocks are resident than
// without it). Every kernel here starts with await_previous_kernel(), so it reads nothing early.
// Inside a graph the edge becomes a programmatic one: the ~1 us between kernels of one stream shrinks.
template <typename Params>
bunEpResult_t launch(const Context* ctx, void (*kernel)(Params), int grid, size_t smem, cudaStream_t stream,
                     const Params& p) {
  cudaLaunchAttribute attribute = {};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3((unsigned)grid);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = ctx->programmaticLaunch ? 1 : 0;
  BUN_EP_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p));
  return bunEpSuccess;
}

// A dispatch kernel's shared memory: the routing of `numTokens` x `numTopk` and one count per expert.
size_t dispatch_smem(int64_t numTokens, int64_t numTopk, int64_t numExperts) {
  return (size_t)(numTokens * numTopk + numExperts) * sizeof(int);
}

// The most any call of this config takes (the kernels opt in to it above 48 KB).
int64_t dispatch_send_smem(const bunEpLowLatencyConfig_t& c) {
  return (int64_t)dispatch_smem(c.maxTokensPerRank, c.maxTopk, c.numExperts);
}

bunEpResult_t check_config(const bunEpLowLatencyConfig_t* c) {
  BUN_EP_REQUIRE(c != nullptr, "config: expected a bunEpLowLatencyConfig_t pointer, got NULL");
  BUN_EP_REQUIRE(c->numRanks >= 1 && c->numRanks <= kMaxRanks, "numRanks: expected 1..%d, got %lld", kMaxRanks,
                 (long long)c->numRanks);
  BUN_EP_REQUIRE(c->rank >= 0 && c->rank < c->numRanks, "rank: expected 0..%lld, got %lld",
                 (long long)c->numRanks - 1, (long long)c->rank);
  BUN_EP_REQUIRE(c->numExperts >= c->numRanks && c->numExperts % c->numRanks == 0,
                 "numExperts: expected a positive multiple of numRanks %lld, got %lld", (long long)c->numRanks,
                 (long long)c->numExperts);
  BUN_EP_REQUIRE(c->maxTokensPerRank >= 1 && c->maxTokensPerRank <= 65535,
                 "maxTokensPerRank: expected 1..65535, got %lld", (long long)c->maxTokensPerRank);
  BUN_EP_REQUIRE(c->hidden >= kGroupSize && c->hidden % kGroupSize == 0,
                 "hidden: expected a positive multiple of %d, got %lld", kGroupSize, (long long)c->hidden);
  BUN_EP_REQUIRE(c->maxTopk >= 1 && c->maxTopk <= kMaxTopk, "maxTopk: expected 1..%d, got %lld", kMaxTopk,
                 (long long)c->maxTopk);
  BUN_EP_REQUIRE(c->numExperts / c->numRanks <= kMaxLocalExperts,
                 "numExperts / numRanks: expected at most %d local experts, got %lld", kMaxLocalExperts,
                 (long long)(c->numExperts / c->numRanks));
  BUN_EP_REQUIRE(c->timeoutNs > 0, "timeoutNs: expected > 0, got %lld", (long long)c->timeoutNs);
  BUN_EP_REQUIRE(dispatch_send_smem(*c) <= 200 * 1024,
                 "maxTokensPerRank * maxTopk + numExperts: %lld exceeds the %d ints of shared memory the send "
                 "kernel may use",
                 (long long)(c->maxTokensPerRank * c->maxTopk + c->numExperts), 200 * 1024 / 4);
  BUN_EP_REQUIRE(c->transport == BUN_EP_LL_TRANSPORT_PEER_POINTERS || c->transport == BUN_EP_LL_TRANSPORT_NVSHMEM,
                 "transport: expected BUN_EP_LL_TRANSPORT_PEER_POINTERS (0) or _NVSHMEM (1), got %lld",
                 (long long)c->transport);
  return bunEpSuccess;
}

// The NVSHMEM transport needs this build to have NVSHMEM, NVSHMEM started in this process as PE
// `rank` of `numRanks` (bun_ep_nvshmem_init), and localBuffer from bun_ep_nvshmem_malloc.
bunEpResult_t check_nvshmem_transport(const bunEpLowLatencyConfig_t& c) {
#if BUN_EP_WITH_NVSHMEM
  if (nvshmemx_init_status() < NVSHMEM_STATUS_IS_INITIALIZED)
    return set_error(bunEpInvalidArgument,
                     "transport: NVSHMEM for rank %lld, but NVSHMEM is not initialised in this process (call "
                     "bun_ep_nvshmem_init first)",
                     (long long)c.rank);
  BUN_EP_REQUIRE(nvshmem_my_pe() == c.rank && nvshmem_n_pes() == c.numRanks,
                 "rank/numRanks: %lld of %lld, but this process is NVSHMEM PE %d of %d", (long long)c.rank,
                 (long long)c.numRanks, nvshmem_my_pe(), nvshmem_n_pes());
  BUN_EP_REQUIRE(c.localBuffer == nullptr || nvshmem_ptr(c.localBuffer, nvshmem_my_pe()) != nullptr,
                 "localBuffer: expected a block of the NVSHMEM symmetric heap (bun_ep_nvshmem_malloc)");
  return bunEpSuccess;
#else
  return set_error(bunEpNotSupported,
                   "transport: the NVSHMEM low-latency path (rank %lld) is not available: this libbun_ep.so was built "
                   "without NVSHMEM; rebuild with NVSHMEM_DIR set, or use peer pointers inside one host",
                   (long long)c.rank);
#endif
}

// What dispatch and combine check alike: token count, top-k, buffer parity, phases.
bunEpResult_t check_call(const bunEpLowLatencyConfig_t& cfg, int64_t numTokens, int64_t numTopk, int64_t parity,
                         int64_t phases) {
  BUN_EP_REQUIRE(numTokens >= 0 && numTokens <= cfg.maxTokensPerRank, "numTokens: expected 0..maxTokensPerRank %lld, got %lld",
                 (long long)cfg.maxTokensPerRank, (long long)numTokens);
  BUN_EP_REQUIRE(numTopk >= 1 && numTopk <= cfg.maxTopk, "numTopk: expected 1..maxTopk %lld, got %lld",
                 (long long)cfg.maxTopk, (long long)numTopk);
  BUN_EP_REQUIRE(parity == 0 || parity == 1, "parity: expected 0 or 1, got %lld", (long long)parity);
  BUN_EP_REQUIRE((phases & ~(int64_t)(BUN_EP_LL_PHASE_SEND | BUN_EP_LL_PHASE_RECV)) == 0 && phases != 0,
                 "phases: expected BUN_EP_LL_PHASE_SEND and/or _RECV bits, got %lld", (long long)phases);
  return bunEpSuccess;
}

Context* context_of(void* handle) { return static_cast<Context*>(handle); }

bunEpResult_t enter(Context* ctx) {
  BUN_EP_REQUIRE(ctx != nullptr, "context: expected a context from bun_ep_ll_create, got NULL");
  if (ctx->unusable)
    return set_error(bunEpUnusable,
                     "low-latency context of rank %lld: an earlier wait timed out (rank %d never arrived); "
                     "recreate the buffer",
                     (long long)ctx->config.rank, ctx->errorHost[1]);
  BUN_EP_CUDA_CHECK(cudaSetDevice(ctx->device));
  return bunEpSuccess;
}

Common common_of(const Context* ctx, int parity) {
  Common c{};
  c.layout = ctx->layout;
  c.rank = (int)ctx->config.rank;
  c.numExperts = (int)ctx->config.numExperts;
  c.parity = parity;
  c.timeoutNs = (uint64_t)ctx->config.timeoutNs;
  c.peers = ctx->peersDevice;
  c.local = ctx->local;
  c.staged = ctx->config.transport == BUN_EP_LL_TRANSPORT_NVSHMEM;
  c.oneGpu = ctx->oneGpu;
  c.state = reinterpret_cast<State*>(ctx->local + ctx->layout.state);
  c.errorWord = ctx->errorDevice;
  return c;
}

// Flags, counters and sequence numbers (not the data: stale rows are never read).
bunEpResult_t clear_flags(Context* ctx, cudaStream_t stream) {
  const Layout& l = ctx->layout;
  for (int parity = 0; parity < 2; ++parity) {
    char* region = ctx->local + parity * l.parityBytes;
    BUN_EP_CUDA_CHECK(cudaMemsetAsync(region + l.dispatchReady, 0, l.numRanks * 4, stream));
    BUN_EP_CUDA_CHECK(cudaMemsetAsync(region + l.combineReady, 0, l.numRanks * 4, stream));
    BUN_EP_CUDA_CHECK(cudaMemsetAsync(region + l.dispatchArrived, 0, 8, stream));
    BUN_EP_CUDA_CHECK(cudaMemsetAsync(region + l.combineArrived, 0, 8, stream));
    BUN_EP_CUDA_CHECK(cudaMemsetAsync(region + l.combineCountWords, 0, l.numRanks * 8, stream));
    BUN_EP_CUDA_CHECK(cudaMemsetAsync(region + l.dispatchCounts, 0, (size_t)l.numLocalExperts * l.numRanks * 4, stream));
    BUN_EP_CUDA_CHECK(cudaMemsetAsync(region + l.countWords, 0, (size_t)l.numLocalExperts * l.numRanks * 8, stream));
    BUN_EP_CUDA_CHECK(cudaMemsetAsync(region + l.recvCount, 0, (size_t)l.numLocalExperts * 4, stream));
    BUN_EP_CUDA_CHECK(cudaMemsetAsync(region + l.inboxFlags, 0, (size_t)l.numRanks * 8, stream));
    BUN_EP_CUDA_CHECK(cudaMemsetAsync(region + l.flagSource, 0, 8, stream));
    BUN_EP_CUDA_CHECK(cudaMemsetAsync(region + l.ackWords, 0, (size_t)l.numRanks * 8, stream));
  }
  BUN_EP_CUDA_CHECK(cudaMemsetAsync(ctx->local + l.state, 0, offsetof(State, alive), stream));
  return bunEpSuccess;
}

// Copy-engine dispatch: side streams and events of a context (create), and their release.
bunEpResult_t create_copy_engines(Context* ctx) {
  const char* mode = std::getenv("BUN_EP_LL_COPY_ENGINES");
  ctx->copyEngines = copy_engines_fit(ctx->config) && !(mode != nullptr && std::strcmp(mode, "0") == 0);
  ctx->copyEnginesWithoutHook = ctx->copyEngines && mode != nullptr && std::strcmp(mode, "all") == 0;
  if (!ctx->copyEngines) return bunEpSuccess;
  ctx->numCopyStreams = (int)std::max<int64_t>(1, std::min<int64_t>(kMaxCopyStreams, ctx->config.numRanks - 1));
  for (int i = 0; i < ctx->numCopyStreams; ++i)
    BUN_EP_CUDA_CHECK(cudaStreamCreateWithFlags(&ctx->copyStreams[i], cudaStreamNonBlocking));
  for (int parity = 0; parity < 2; ++parity) {
    BUN_EP_CUDA_CHECK(cudaEventCreateWithFlags(&ctx->sendDone[parity], cudaEventDisableTiming));
    for (int i = 0; i < ctx->numCopyStreams; ++i)
      BUN_EP_CUDA_CHECK(cudaEventCreateWithFlags(&ctx->copiesDone[parity][i], cudaEventDisableTiming));
  }
  return bunEpSuccess;
}

void destroy_copy_engines(Context* ctx) {
  for (int i = 0; i < ctx->numCopyStreams; ++i) {
    if (ctx->copyStreams[i] != nullptr) cudaStreamDestroy(ctx->copyStreams[i]);
    for (int parity = 0; parity < 2; ++parity)
      if (ctx->copiesDone[parity][i] != nullptr) cudaEventDestroy(ctx->copiesDone[parity][i]);
  }
  for (int parity = 0; parity < 2; ++parity)
    if (ctx->sendDone[parity] != nullptr) cudaEventDestroy(ctx->sendDone[parity]);
}

// After the send kernel on `stream`: per live peer, the blob into its inbox for this rank, then the
// flag word, on side streams (a peer per stream in turn; each sender starts at the next rank up, so
// the copies into one receiver do not all come first from everyone).
bunEpResult_t queue_blob_copies(Context* ctx, const DispatchParams& p, cudaStream_t stream) {
  const Layout& l = ctx->layout;
  const int parity = p.c.parity, R = l.numRanks, me = p.c.rank;
  const BlobShape b = blob_shape(p.c.numExperts, l.hidden, p.numTokens, p.numTopk, p.useFp8, p.useUe8m0);
  const int64_t parityOffset = (int64_t)parity * l.parityBytes;
  const char* region = ctx->local + parityOffset;
  ctx->copiesInFlight[parity] = 0;
  if (!ctx->hostAlive[me] || R == 1) return bunEpSuccess;
  BUN_EP_CUDA_CHECK(cudaEventRecord(ctx->sendDone[parity], stream));
  int queued = 0;
  for (int step = 1; step < R; ++step) {
    const int q = (me + step) % R;
    if (!ctx->hostAlive[q]) continue;
    cudaStream_t side = ctx->copyStreams[queued % ctx->numCopyStreams];
    if (queued < ctx->numCopyStreams) BUN_EP_CUDA_CHECK(cudaStreamWaitEvent(side, ctx->sendDone[parity], 0));
    char* peerRegion = ctx->peersHost[q] + parityOffset;
    BUN_EP_CUDA_CHECK(cudaMemcpyAsync(peerRegion + l.inbox + (int64_t)me * l.blobMaxBytes, region + l.sendBlob,
                                      (size_t)b.totalBytes, cudaMemcpyDeviceToDevice, side));
    BUN_EP_CUDA_CHECK(cudaMemcpyAsync(peerRegion + l.inboxFlags + (int64_t)me * 8, region + l.flagSource, 8,
                                      cudaMemcpyDeviceToDevice, side));
    ++queued;
  }
  const int used = std::min(queued, ctx->numCopyStreams);
  for (int i = 0; i < used; ++i) BUN_EP_CUDA_CHECK(cudaEventRecord(ctx->copiesDone[parity][i], ctx->copyStreams[i]));
  ctx->copiesInFlight[parity] = used;
  return bunEpSuccess;
}

// Dispatch through the copy engines: the send kernel and the copies (phase SEND), the join of the
// copies and the receive kernel (phase RECV; a hook's later call, or at once without hook).
bunEpResult_t dispatch_by_copy_engines(Context* ctx, const DispatchParams& p, int64_t phases, cudaStream_t stream) {
  const int parity = p.c.parity;
  const Layout& l = ctx->layout;
  if (phases & BUN_EP_LL_PHASE_SEND) {
    const size_t sendSmem = dispatch_smem(p.numTokens, p.numTopk, p.c.numExperts);
    const int grid = std::max(1, std::min(p.numTokens, ctx->waitingBlockBudget * 2));
    BUN_EP_TRY(launch(ctx, dispatch_blob_send_kernel, grid, sendSmem, stream, p));
    BUN_EP_TRY(queue_blob_copies(ctx, p, stream));
    ctx->sentSlotValid[parity] = true;
  }
  if (!(phases & BUN_EP_LL_PHASE_RECV)) return bunEpSuccess;
  for (int i = 0; i < ctx->copiesInFlight[parity]; ++i)
    BUN_EP_CUDA_CHECK(cudaStreamWaitEvent(stream, ctx->copiesDone[parity][i], 0));
  ctx->copiesInFlight[parity] = 0;
  // Every block waits for the flags: within the waiting-block budget; enough warps for every row
  // that can come (R * M) as kCombinePartsPerRow slices.
  const int64_t warpsWanted = (int64_t)l.numRanks * l.maxTokens * kCombinePartsPerRow;
  const int grid = (int)std::max<int64_t>(1, std::min<int64_t>(ctx->waitingBlockBudget, (warpsWanted + kWarps - 1) / kWarps));
  BUN_EP_TRY(launch(ctx, dispatch_blob_recv_kernel, grid, (size_t)p.c.numExperts * sizeof(int), stream, p));
  return bunEpSuccess;
}

// A testing knob: `*value` from the environment variable `name` when it is set and not empty (an
// integer in [min, max], else an error naming it and the range), else left as it is.
bunEpResult_t env_int(const char* name, long min, long max, const char* unit, int* value) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') return bunEpSuccess;
  char* end = nullptr;
  const long n = std::strtol(text, &end, 10);
  BUN_EP_REQUIRE(*end == '\0' && n >= min && n <= max, "%s: expected an integer from %ld to %ld (%s), got \"%s\"", name,
                 min, max, unit, text);
  *value = (int)n;
  return bunEpSuccess;
}

// Every kernel of this file, and whether it is launched with the dispatch's shared memory (the
// routing of up to maxTokensPerRank x maxTopk tokens: above 48 KB a kernel must opt in to it).
struct LowLatencyKernel {
  const void* kernel;
  const char* what;  // for errors: the attribute call that failed
  bool dispatchSmem;
};
const LowLatencyKernel kLowLatencyKernels[] = {
    {(const void*)dispatch_send_kernel, "cudaFuncSetAttribute(dispatch_send_kernel)", true},
    {(const void*)dispatch_recv_kernel, "cudaFuncSetAttribute(dispatch_recv_kernel)", false},
    {(const void*)dispatch_direct_kernel, "cudaFuncSetAttribute(dispatch_direct_kernel)", true},
    {(const void*)dispatch_fused_kernel, "cudaFuncSetAttribute(dispatch_fused_kernel)", true},
    {(const void*)dispatch_blob_send_kernel, "cudaFuncSetAttribute(dispatch_blob_send_kernel)", true},
    {(const void*)dispatch_blob_recv_kernel, "cudaFuncSetAttribute(dispatch_blob_recv_kernel)", false},
    {(const void*)combine_send_kernel<false>, "cudaFuncSetAttribute(combine_send_kernel)", false},
    {(const void*)combine_recv_kernel<false>, "cudaFuncSetAttribute(combine_recv_kernel)", false},
    {(const void*)combine_fused_kernel<false>, "cudaFuncSetAttribute(combine_fused_kernel)", false},
    {(const void*)combine_send_kernel<true>, "cudaFuncSetAttribute(combine_send_kernel, NVSHMEM)", false},
    {(const void*)combine_recv_kernel<true>, "cudaFuncSetAttribute(combine_recv_kernel, NVSHMEM)", false},
    {(const void*)combine_fused_kernel<true>, "cudaFuncSetAttribute(combine_fused_kernel, NVSHMEM)", false},
};

// True when every rank's buffer is memory of `device` (ranks of one process or of several under MPS
// sharing this GPU): then every thread that reads a row announcement runs on this GPU. Both what the
// rank group counted (ranksOnDevice) and where each peer buffer lives must say so; NVSHMEM peers
// never qualify (their flags arrive by puts).
bunEpResult_t every_rank_on_this_gpu(const bunEpLowLatencyConfig_t& c, int device, bool* oneGpu) {
  *oneGpu = false;
  if (c.transport == BUN_EP_LL_TRANSPORT_NVSHMEM || c.ranksOnDevice != c.numRanks) return bunEpSuccess;
  for (int64_t r = 0; r < c.numRanks; ++r) {
    cudaPointerAttributes attributes{};
    const cudaError_t err = cudaPointerGetAttributes(&attributes, reinterpret_cast<const void*>(c.peerBuffers[r]));
    if (err != cudaSuccess) {
      cudaGetLastError();  // not a pointer CUDA knows: keep system scope
      return bunEpSuccess;
    }
    if (attributes.type != cudaMemoryTypeDevice || attributes.device != device) return bunEpSuccess;
  }
  *oneGpu = true;
  return bunEpSuccess;
}

// Ranks sharing a GPU: the largest shared-memory carveout (L1/shared split) for every kernel here.
// An SM takes a block only where the split it was given when idle leaves room, and waiting blocks
// of several ranks can hold every SM (the budget bounds their count, not the SMs they land on).
// With BUN_EP_LL_COPY_ENGINES=all, 4 ranks x 33 blocks of the small receive kernel on 132 SMs left
// no SM split large enough for a peer's send kernel (17 KB of shared memory), and they waited for
// it until the timeout (8 ranks, 512 tokens; H200, BENCHMARKS.md "session 5"). A peer's own compute
// kernel between dispatch and combine (a GEMM with much shared memory) can meet the same. One
// split for all cured it; a preference sized to our need did not. Its cost: 28 KB of L1, the
// combine 8-14% slower on one GPU while its kernels spilled (they no longer do). A rank alone on
// its GPU waits only on other GPUs, so it keeps the driver's choice. The attribute is per kernel
// and device, set once per process.
// Testing: BUN_EP_LL_CARVEOUT=N (0..100) sets N percent for every kernel, however many ranks share
// the GPU (to measure a split's cost, or whether it keeps ranks sharing a GPU apart).
bunEpResult_t set_shared_carveout(int device, int64_t ranksOnDevice) {
  static std::mutex mutex;
  static uint64_t devicesSet = 0;  // bit d: device d has its carveout
  int percent = ranksOnDevice > 1 ? (int)cudaSharedmemCarveoutMaxShared : -1;
  BUN_EP_TRY(env_int("BUN_EP_LL_CARVEOUT", 0, 100, "percent of the SM's shared memory", &percent));
  if (percent < 0) return bunEpSuccess;
  const uint64_t bit = device >= 0 && device < 64 ? 1ull << device : 0;
  std::lock_guard<std::mutex> lock(mutex);
  if ((devicesSet & bit) != 0) return bunEpSuccess;
  for (const LowLatencyKernel& k : kLowLatencyKernels) {
    const cudaError_t err = cudaFuncSetAttribute(k.kernel, cudaFuncAttributePreferredSharedMemoryCarveout, percent);
    if (err != cudaSuccess) return cuda_error(err, k.what, __FILE__, __LINE__);
  }
  devicesSet |= bit;
  return bunEpSuccess;
}

}  // namespace ll
}  // namespace bun_ep

using namespace bun_ep;
using namespace bun_ep::ll;

extern "C" {

bunEpResult_t bun_ep_ll_buffer_bytes(const bunEpLowLatencyConfig_t* config, uint64_t* bytes) {
  BUN_EP_TRY(check_config(config));
  BUN_EP_REQUIRE(bytes != nullptr, "bytes: expected a uint64_t pointer, got NULL");
  *bytes = (uint64_t)make_layout(*config).totalBytes;
  return bunEpSuccess;
}

bunEpResult_t bun_ep_ll_create(const bunEpLowLatencyConfig_t* config, void** context) {
  BUN_EP_TRY(check_config(config));
  BUN_EP_REQUIRE(context != nullptr, "context: expected a void* pointer, got NULL");
  BUN_EP_REQUIRE(config->localBuffer != nullptr, "localBuffer: expected the rank's registered buffer, got NULL");
  BUN_EP_REQUIRE(config->peerBuffers != nullptr, "peerBuffers: expected an array of %lld pointers, got NULL",
                 (long long)config->numRanks);
  const bool nvshmemTransport = config->transport == BUN_EP_LL_TRANSPORT_NVSHMEM;
  if (nvshmemTransport) BUN_EP_TRY(check_nvshmem_transport(*config));
  // NVSHMEM: a NULL peer is reached by puts; peer pointers: every peer needs its buffer.
  for (int64_t r = 0; r < config->numRanks && !nvshmemTransport; ++r)
    BUN_EP_REQUIRE(config->peerBuffers[r] != 0, "peerBuffers[%lld]: expected rank %lld's buffer, got NULL",
                   (long long)r, (long long)r);
  // Testing: BUN_EP_LL_WAITING_BLOCKS=N caps every waiting grid at N blocks, so that small shapes send
  // several tokens per block (batched planning, next-row loads) and every waiting kernel loops.
  int waitingBlocksCap = 0;
  BUN_EP_TRY(env_int("BUN_EP_LL_WAITING_BLOCKS", 2, 1 << 20, "blocks per waiting grid", &waitingBlocksCap));
  int programmaticLaunch = 1;
  BUN_EP_TRY(env_int("BUN_EP_LL_PROGRAMMATIC_LAUNCH", 0, 1, "0: plain launches, 1: programmatic", &programmaticLaunch));
  int gpuScope = 1;
  BUN_EP_TRY(env_int("BUN_EP_LL_GPU_SCOPE", 0, 1, "0: system-scope releases, 1: GPU scope where every rank is on this GPU",
                     &gpuScope));

  Context* ctx = new Context{};
  ctx->config = *config;
  ctx->config.peerBuffers = nullptr;
  ctx->peersHost.resize(config->numRanks);
  for (int64_t r = 0; r < config->numRanks; ++r) ctx->peersHost[r] = reinterpret_cast<char*>(config->peerBuffers[r]);
  ctx->hostAlive.assign(config->numRanks, 1);
  ctx->layout = make_layout(*config);
  ctx->local = static_cast<char*>(config->localBuffer);
  auto fail = [ctx](bunEpResult_t status) {
    destroy_copy_engines(ctx);
    if (ctx->peersDevice != nullptr) cudaFree(ctx->peersDevice);
    if (ctx->errorHost != nullptr) cudaFreeHost(ctx->errorHost);
    delete ctx;
    return status;
  };
  auto cuda = [&](cudaError_t err, const char* what) {
    return err == cudaSuccess ? bunEpSuccess : cuda_error(err, what, __FILE__, __LINE__);
  };
  bunEpResult_t status = cuda(cudaGetDevice(&ctx->device), "cudaGetDevice");
  int computeMajor = 0;
  if (status == bunEpSuccess)
    status = cuda(cudaDeviceGetAttribute(&computeMajor, cudaDevAttrComputeCapabilityMajor, ctx->device),
                  "cudaDeviceGetAttribute(compute capability)");
  ctx->programmaticLaunch = programmaticLaunch == 1 && computeMajor >= 9;
  if (status == bunEpSuccess) status = cuda(cudaMalloc(&ctx->peersDevice, config->numRanks * sizeof(char*)), "cudaMalloc(peers)");
  if (status == bunEpSuccess)
    status = cuda(cudaMemcpy(ctx->peersDevice, config->peerBuffers, config->numRanks * sizeof(char*), cudaMemcpyHostToDevice),
                  "cudaMemcpy(peers)");
  if (status == bunEpSuccess && gpuScope == 1) status = every_rank_on_this_gpu(*config, ctx->device, &ctx->oneGpu);
  if (status == bunEpSuccess)
    status = cuda(cudaHostAlloc(&ctx->errorHost, 64, cudaHostAllocMapped | cudaHostAllocPortable), "cudaHostAlloc(error word)");
  if (status == bunEpSuccess) {
    std::memset(ctx->errorHost, 0, 64);
    status = cuda(cudaHostGetDevicePointer(&ctx->errorDevice, ctx->errorHost, 0), "cudaHostGetDevicePointer(error word)");
  }
  if (status == bunEpSuccess) {
    ctx->dispatchSendSmem = (int)dispatch_send_smem(*config);
    for (const LowLatencyKernel& k : kLowLatencyKernels)
      if (status == bunEpSuccess && k.dispatchSmem && ctx->dispatchSendSmem > 48 * 1024)
        status = cuda(cudaFuncSetAttribute(k.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024), k.what);
  }
  if (status == bunEpSuccess) status = set_shared_carveout(ctx->device, config->ranksOnDevice);
  if (status == bunEpSuccess) status = create_copy_engines(ctx);
  if (status == bunEpSuccess) status = clear_flags(ctx, 0);
  if (status == bunEpSuccess) {
    std::vector<int> alive(kMaxRanks, 0);
    for (int64_t r = 0; r < config->numRanks; ++r) alive[r] = 1;
    status = cuda(cudaMemcpy(ctx->local + ctx->layout.state + offsetof(State, alive), alive.data(),
                             kMaxRanks * sizeof(int), cudaMemcpyHostToDevice),
                  "cudaMemcpy(alive)");
  }
  // Resident blocks per SM to count on: kBlocksPerSm, or fewer where a waiting dispatch kernel's
  // shared memory (the routing of maxTokensPerRank tokens) leaves room for fewer.
  int blocksPerSm = kBlocksPerSm;
  for (int i = 0; i < 2 && status == bunEpSuccess; ++i) {
    int resident = 0;
    status = cuda(i == 0 ? cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, dispatch_direct_kernel, kThreads,
                                                                           (size_t)ctx->dispatchSendSmem)
                         : cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, dispatch_fused_kernel, kThreads,
                                                                           (size_t)ctx->dispatchSendSmem),
                  "cudaOccupancyMaxActiveBlocksPerMultiprocessor(dispatch)");
    blocksPerSm = std::min(blocksPerSm, std::max(1, resident));
  }
  if (status == bunEpSuccess) status = cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  if (status != bunEpSuccess) return fail(status);
  const int64_t ranksOnDevice = std::max<int64_t>(1, config->ranksOnDevice);
  const int64_t numSMs = std::max<int64_t>(1, config->numSMs);
  // Waiting blocks of all ranks on this GPU take at most half its slots: senders always fit.
  ctx->waitingBlockBudget = (int)std::max<int64_t>(1, numSMs * blocksPerSm / (2 * ranksOnDevice));
  if (waitingBlocksCap > 0) ctx->waitingBlockBudget = std::min(ctx->waitingBlockBudget, waitingBlocksCap);
  *context = ctx;
  return bunEpSuccess;
}

bunEpResult_t bun_ep_ll_destroy(void* context) {
  Context* ctx = context_of(context);
  if (ctx == nullptr) return bunEpSuccess;
  cudaSetDevice(ctx->device);
  destroy_copy_engines(ctx);
  cudaError_t err = cudaFree(ctx->peersDevice);
  cudaError_t errHost = cudaFreeHost(ctx->errorHost);
  delete ctx;
  BUN_EP_CUDA_CHECK(err);
  BUN_EP_CUDA_CHECK(errHost);
  return bunEpSuccess;
}

bunEpResult_t bun_ep_ll_views(void* context, int32_t parity, bunEpLowLatencyViews_t* views) {
  Context* ctx = context_of(context);
  BUN_EP_REQUIRE(ctx != nullptr, "context: expected a context from bun_ep_ll_create, got NULL");
  BUN_EP_REQUIRE(parity == 0 || parity == 1, "parity: expected 0 or 1, got %d", parity);
  BUN_EP_REQUIRE(views != nullptr, "views: expected a bunEpLowLatencyViews_t pointer, got NULL");
  const Layout& l = ctx->layout;
  char* region = ctx->local + parity * l.parityBytes;
  views->recvX = region + l.recvX;
  views->recvXScales = region + l.recvScales;
  views->recvCount = region + l.recvCount;
  views->srcTokenIdx = region + l.srcTokenIdx;
  views->layoutRange = region + l.layoutRange;
  views->combineBuffer = region + l.combineBuffer;
  views->combinedX = region + l.combinedX;
  return bunEpSuccess;
}

bunEpResult_t bun_ep_ll_dispatch(void* context, const bunEpLowLatencyDispatchArgs_t* args) {
  Context* ctx = context_of(context);
  BUN_EP_TRY(enter(ctx));
  const DeviceScope device_scope(ctx->device);
  BUN_EP_REQUIRE(args != nullptr, "args: expected a bunEpLowLatencyDispatchArgs_t pointer, got NULL");
  const bunEpLowLatencyConfig_t& cfg = ctx->config;
  BUN_EP_TRY(check_call(cfg, args->numTokens, args->numTopk, args->parity, args->phases));
  BUN_EP_REQUIRE(args->numTokens == 0 || (args->x != nullptr && args->topkIdx != nullptr),
                 "x/topkIdx: expected device pointers for %lld tokens, got NULL", (long long)args->numTokens);
  BUN_EP_REQUIRE(!args->useUe8m0 || cfg.hidden % (kGroupSize * kUe8m0GroupsPerWord) == 0,
                 "useUe8m0: hidden must be a multiple of %d, got %lld", kGroupSize * kUe8m0GroupsPerWord,
                 (long long)cfg.hidden);

  DispatchParams p{};
  p.c = common_of(ctx, (int)args->parity);
  p.topkIdx = static_cast<const int64_t*>(args->topkIdx);
  p.x = static_cast<const __nv_bfloat16*>(args->x);
  p.numTokens = (int)args->numTokens;
  p.numTopk = (int)args->numTopk;
  p.useFp8 = args->useFp8 != 0;
  p.roundScale = args->roundScale != 0;
  p.useUe8m0 = args->useUe8m0 != 0;
  p.cumulativeRecvStats = static_cast<int*>(args->cumulativeRecvStats);
  p.waitStats = static_cast<unsigned long long*>(args->waitStats);
  const int El = ctx->layout.numLocalExperts;
  p.recvSplitsPerExpert = std::max(1, ctx->waitingBlockBudget / El);
  cudaStream_t stream = static_cast<cudaStream_t>(args->stream);

  // A hook-mode send leaves its parity's receive step pending: the parity's next send would
  // overwrite what that step still reads.
  const int parity = (int)args->parity;
  if (args->phases & BUN_EP_LL_PHASE_SEND)
    BUN_EP_REQUIRE(!ctx->hookPending[parity],
                   "parity %d: the previous hook-mode low-latency dispatch of this buffer parity has not run its "
                   "receive step; call its hook() before the next dispatch of the same parity",
                   parity);
  else
    BUN_EP_REQUIRE(ctx->hookPending[parity],
                   "parity %d: no hook-mode low-latency dispatch of this buffer parity awaits its receive step",
                   parity);
  ctx->hookPending[parity] = args->phases == BUN_EP_LL_PHASE_SEND;
  const bool hookPhase = args->phases != (BUN_EP_LL_PHASE_SEND | BUN_EP_LL_PHASE_RECV);
  if (!p.c.staged && ctx->copyEngines && (hookPhase || ctx->copyEnginesWithoutHook))
    return dispatch_by_copy_engines(ctx, p, args->phases, stream);
  const size_t sendSmem = dispatch_smem(p.numTokens, p.numTopk, cfg.numExperts);
  if (args->phases == (BUN_EP_LL_PHASE_SEND | BUN_EP_LL_PHASE_RECV) && !p.c.staged) {
    // Peer pointers, no hook: rows go straight into the receivers' packed slots. One sender block
    // per token (within the budget, so every rank's blocks are resident together), plus the
    // receiver block.
    const int senders = std::max(1, std::min(p.numTokens, ctx->waitingBlockBudget - 1));
    BUN_EP_TRY(launch(ctx, dispatch_direct_kernel, senders + 1, sendSmem, stream, p));
    ctx->sentSlotValid[args->parity] = true;
    return bunEpSuccess;
  }
  ctx->sentSlotValid[args->parity] = false;
  if (args->phases == (BUN_EP_LL_PHASE_SEND | BUN_EP_LL_PHASE_RECV)) {
    // One kernel: no second launch, no kernel boundary between the phases.
    const int grid = std::min(std::max(p.numTokens, El * p.recvSplitsPerExpert), ctx->waitingBlockBudget);
    BUN_EP_TRY(launch(ctx, dispatch_fused_kernel, std::max(1, grid), sendSmem, stream, p));
    return bunEpSuccess;
  }
  if (args->phases & BUN_EP_LL_PHASE_SEND) {
    const int grid = std::max(1, p.numTokens);
    BUN_EP_TRY(launch(ctx, dispatch_send_kernel, grid, sendSmem, stream, p));
  }
  if (args->phases & BUN_EP_LL_PHASE_RECV) {
    // El <= budget: every (expert, split) its own block; else blocks loop over experts.
    const int grid = std::min(El * p.recvSplitsPerExpert, ctx->waitingBlockBudget);
    BUN_EP_TRY(launch(ctx, dispatch_recv_kernel, std::max(1, grid), 0, stream, p));
  }
  return bunEpSuccess;
}

bunEpResult_t bun_ep_ll_combine(void* context, const bunEpLowLatencyCombineArgs_t* args) {
  Context* ctx = context_of(context);
  BUN_EP_TRY(enter(ctx));
  const DeviceScope device_scope(ctx->device);
  BUN_EP_REQUIRE(args != nullptr, "args: expected a bunEpLowLatencyCombineArgs_t pointer, got NULL");
  const bunEpLowLatencyConfig_t& cfg = ctx->config;
  BUN_EP_TRY(check_call(cfg, args->numTokens, args->numTopk, args->parity, args->phases));
  BUN_EP_REQUIRE(!(args->phases & BUN_EP_LL_PHASE_SEND) || args->x != nullptr,
                 "x: expected the expert outputs [El, R*M, H] for the send phase, got NULL");
  BUN_EP_REQUIRE(!(args->phases & BUN_EP_LL_PHASE_RECV) || args->numTokens == 0 ||
                     (args->topkIdx != nullptr && args->topkWeights != nullptr),
                 "topkIdx/topkWeights: expected device pointers for the receive phase, got NULL");

  CombineParams p{};
  p.c = common_of(ctx, (int)args->parity);
  p.x = static_cast<const __nv_bfloat16*>(args->x);
  p.topkIdx = static_cast<const int64_t*>(args->topkIdx);
  p.topkWeights = static_cast<const float*>(args->topkWeights);
  p.numTokens = (int)args->numTokens;
  p.numTopk = (int)args->numTopk;
  const Layout& l = ctx->layout;
  p.out = args->out != nullptr ? static_cast<__nv_bfloat16*>(args->out)
                               : reinterpret_cast<__nv_bfloat16*>(ctx->local + args->parity * l.parityBytes + l.combinedX);
  cudaStream_t stream = static_cast<cudaStream_t>(args->stream);
  // Pull (one pass: homes read the rows where the experts wrote them) when the outputs are this
  // rank's combine buffer (zero-copy) and the parity's dispatch recorded each row's slot (direct or
  // copy-engine dispatch). With a hook the send only publishes the markers; hook() reads and sums.
  p.pull = !p.c.staged && ctx->sentSlotValid[args->parity] &&
           static_cast<const char*>(args->x) == ctx->local + args->parity * l.parityBytes + l.combineBuffer;
  // The send phase spreads rows over every warp of its grid; the prefix of counts is (El + 1) ints.
  // Grid by the work: at most R * M * min(maxTopk, El) rows arrive here (a warp each) and the
  // receive phase takes a block per token; tiny calls then pay for few blocks' fences.
  const size_t sendSmem = (size_t)(l.numLocalExperts + 1) * sizeof(int);
  const int64_t rowsBound = (int64_t)l.numRanks * l.maxTokens * std::min(l.maxTopk, l.numLocalExperts);
  const int64_t workBlocks = std::max<int64_t>(p.numTokens, (rowsBound + kWarps - 1) / kWarps);
  const int grid = (int)std::max<int64_t>(1, std::min<int64_t>(workBlocks, ctx->waitingBlockBudget));
  const CombineKernels kernels = combine_kernels(p.c.staged);
  if (args->phases == (BUN_EP_LL_PHASE_SEND | BUN_EP_LL_PHASE_RECV)) {
    BUN_EP_TRY(launch(ctx, kernels.fused, grid, sendSmem, stream, p));
    return bunEpSuccess;
  }
  if (args->phases & BUN_EP_LL_PHASE_SEND) {
    // A pull send only publishes its markers (block 0).
    BUN_EP_TRY(launch(ctx, kernels.send, p.pull ? 1 : grid, sendSmem, stream, p));
  }
  if ((args->phases & BUN_EP_LL_PHASE_RECV) && p.numTokens > 0) {
    BUN_EP_TRY(launch(ctx, kernels.recv, std::min(p.numTokens * kMaxTokenSplits, grid), 0, stream, p));
  }
  return bunEpSuccess;
}

bunEpResult_t bun_ep_ll_set_rank_mask(void* context, const int32_t* alive) {
  Context* ctx = context_of(context);
  BUN_EP_TRY(enter(ctx));
  BUN_EP_REQUIRE(alive != nullptr, "alive: expected an int32 array of %lld entries, got NULL",
                 (long long)ctx->config.numRanks);
  std::vector<int> values(ctx->config.numRanks);
  for (int64_t r = 0; r < ctx->config.numRanks; ++r) values[r] = alive[r] != 0 ? 1 : 0;
  ctx->hostAlive = values;
  BUN_EP_CUDA_CHECK(cudaMemcpy(ctx->local + ctx->layout.state + offsetof(State, alive), values.data(),
                               values.size() * sizeof(int), cudaMemcpyHostToDevice));
  return bunEpSuccess;
}

bunEpResult_t bun_ep_ll_clean(void* context, void* stream) {
  Context* ctx = context_of(context);
  BUN_EP_REQUIRE(ctx != nullptr, "context: expected a context from bun_ep_ll_create, got NULL");
  BUN_EP_CUDA_CHECK(cudaSetDevice(ctx->device));
  for (int parity = 0; parity < 2; ++parity) {
    ctx->hookPending[parity] = false;
    ctx->copiesInFlight[parity] = 0;
  }
  return clear_flags(ctx, static_cast<cudaStream_t>(stream));
}

bunEpResult_t bun_ep_ll_check(void* context) {
  Context* ctx = context_of(context);
  BUN_EP_REQUIRE(ctx != nullptr, "context: expected a context from bun_ep_ll_create, got NULL");
  const volatile int* word = ctx->errorHost;
  if (word[0] == 0 && !ctx->unusable) return bunEpSuccess;
  ctx->unusable = true;
  const char* phase = word[2] == kPhaseCombine ? "combine" : "dispatch";
  if (word[1] == kSomeRowsMissing)
    return set_error(bunEpTimeout,
                     "low-latency %s on rank %lld: every rank started the call but some rows never arrived within "
                     "%.1f ms (a peer stopped in the middle of it); this buffer is unusable, recreate it",
                     phase, (long long)ctx->config.rank, ctx->config.timeoutNs / 1e6);
  return set_error(bunEpTimeout,
                   "low-latency %s on rank %lld: rank %d never arrived within %.1f ms (dead, or not calling the "
                   "same sequence of low-latency calls); this buffer is unusable, recreate it",
                   phase, (long long)ctx->config.rank, word[1], ctx->config.timeoutNs / 1e6);
}

bunEpResult_t bun_ep_ll_error_word(void* context, const int32_t** word) {
  Context* ctx = context_of(context);
  BUN_EP_REQUIRE(ctx != nullptr, "context: expected a context from bun_ep_ll_create, got NULL");
  BUN_EP_REQUIRE(word != nullptr, "word: expected an int32_t* pointer, got NULL");
  *word = ctx->errorHost;
  return bunEpSuccess;
}

#ifdef BUN_EP_LL_TRACE
// Developer probe (bench/ll_latency.ts; trace builds only, like bun_ep_ll_debug_trace): one thread
// follows the index chain `chain` (u64 words, chain[i] = the next index) from index `first` for
// `count` dependent loads with each load kind the kernels use, and
// writes the mean SM cycles per load of kind k to out[k]: 0 ld.global, 1 ld.global.cg (L2, no L1),
// 2 ld.volatile, 3 ld.relaxed.sys, 4 ld.acquire.sys. out[5]: the last index (keeps the loads live);
// out[6], out[7]: the kernel's ns and SM cycles.
__device__ __forceinline__ uint64_t probe_load(const uint64_t* p, int kind) {
  uint64_t v;
  switch (kind) {
    case 0: v = *p; break;
    case 1: asm volatile("ld.global.cg.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory"); break;
    case 2: asm volatile("ld.volatile.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory"); break;
    case 3: asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory"); break;
    default: asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory"); break;
  }
  return v;
}

__global__ void load_latency_kernel(const uint64_t* chain, uint64_t first, int count, unsigned long long* out) {
  uint64_t index = first;
  const uint64_t firstNs = globaltimer_ns();
  const unsigned long long firstCycle = clock64();
  for (int kind = 0; kind < 5; ++kind) {
    const unsigned long long start = clock64();
    for (int i = 0; i < count; ++i) index = probe_load(chain + index, kind);
    out[kind] = (clock64() - start) / (unsigned long long)count;
  }
  out[5] = index;
  out[6] = globaltimer_ns() - firstNs;  // out[7] / out[6]: the SM clock in cycles per ns
  out[7] = clock64() - firstCycle;
}

BUN_EP_API int bun_ep_ll_debug_load_latency(const void* chain, uint64_t first, int32_t count, void* out, void* stream) {
  if (chain == nullptr || out == nullptr || count <= 0) return -1;
  load_latency_kernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(static_cast<const uint64_t*>(chain), first, count,
                                                                      static_cast<unsigned long long*>(out));
  return cudaGetLastError() == cudaSuccess ? 0 : -2;
}

// Developer trace build only: the direct dispatch's phase stamps (see g_trace), u64
// [calls][ranks][blocks][points] ns; 0 where no block stamped.
// The cycle stamps (g_trace_clock) follow the timer stamps in `host`.
BUN_EP_API int bun_ep_ll_debug_trace(void* host, uint64_t bytes) {
  if (bytes < 2 * sizeof(g_trace)) return -1;
  if (cudaMemcpyFromSymbol(host, g_trace, sizeof(g_trace)) != cudaSuccess) return -2;
  if (cudaMemcpyFromSymbol(static_cast<char*>(host) + sizeof(g_trace), g_trace_clock, sizeof(g_trace)) != cudaSuccess)
    return -2;
  return (int)(2 * sizeof(g_trace));
}
#endif

}  // extern "C"
