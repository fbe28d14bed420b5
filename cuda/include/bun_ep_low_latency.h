/* Part of bun_ep.h (included inside its extern "C" block); see the rules there.
 *
 * Low-latency (decode) dispatch/combine: cuda/src/low_latency.cu; bound in TypeScript by
 * lib/native/low_latency.ts and driven by lib/backend/cuda_ll.ts.
 *
 * One context per rank. Its registered buffer (bun_ep_ll_buffer_bytes bytes, allocated by the
 * caller with bun_ep_malloc so that peers can open it through CUDA IPC) holds, for each of the two
 * parities: the dispatch staging rows peers write into, per-(local expert, source rank) counts and
 * per-source ready flags, the combine receive rows [maxTokensPerRank][maxTopk], and this rank's
 * preallocated outputs (recvX, scales, counts, handle arrays, combine buffer, combinedX).
 * Flags carry a per-parity call sequence number kept on the device, so nothing is cleared between
 * calls and every launch can be captured into a CUDA graph (no host sync, no allocation).
 *
 * Peer pointers, hook mode (send and receive as two calls): the dispatch's rows travel on the copy
 * engines. The send call launches a kernel that packs this rank's rows once, then queues copies to
 * every live peer on side streams forked from `stream` (created with the context); the receive
 * call joins them into `stream` first. So a send and its receive belong in the same CUDA graph,
 * and a send of a parity whose receive has not run is refused (bunEpInvalidArgument). Environment,
 * read at bun_ep_ll_create: BUN_EP_LL_COPY_ENGINES=0 (never: peer stores), =all (also without hook).
 */
#ifndef BUN_EP_LOW_LATENCY_H
#define BUN_EP_LOW_LATENCY_H

/* Transport of the context. PEER_POINTERS: every peerBuffers[r] is rank r's buffer (same process
 * or CUDA IPC). NVSHMEM: localBuffer comes from bun_ep_nvshmem_malloc (NVSHMEM started in this
 * process as PE `rank` of `numRanks`); peerBuffers[r] is nvshmem_ptr's load/store pointer to rank r's
 * copy, or 0 for a peer reached by NVSHMEM puts (another host; all 0 forces puts for every peer, to
 * test that path on one machine). bunEpNotSupported in a build without NVSHMEM. */
#define BUN_EP_LL_TRANSPORT_PEER_POINTERS 0
#define BUN_EP_LL_TRANSPORT_NVSHMEM 1

/* Phases of one call: the send kernel, the receive kernel, or both (no hook). */
#define BUN_EP_LL_PHASE_SEND 1
#define BUN_EP_LL_PHASE_RECV 2

typedef struct {
  int64_t rank;
  int64_t numRanks;
  int64_t numExperts;       /* multiple of numRanks */
  int64_t maxTokensPerRank; /* M */
  int64_t hidden;           /* H, a multiple of 128 */
  int64_t maxTopk;          /* largest top-k a call may use (combine receive rows per token) */
  int64_t timeoutNs;        /* every device spin-wait gives up after this long */
  int64_t numSMs;           /* of this rank's device: sizes the grids */
  int64_t ranksOnDevice;    /* ranks whose blocks share this GPU: waiting grids shrink so all fit */
  int64_t transport;        /* BUN_EP_LL_TRANSPORT_* */
  void* localBuffer;        /* this rank's registered buffer (bun_ep_ll_buffer_bytes bytes) */
  const uint64_t* peerBuffers; /* host array [numRanks]: each rank's buffer as this process sees it */
} bunEpLowLatencyConfig_t;

/* Bytes of the registered buffer for `config` (only the sizes are read). */
BUN_EP_API bunEpResult_t bun_ep_ll_buffer_bytes(const bunEpLowLatencyConfig_t* config, uint64_t* bytes);

/* A context over an allocated buffer; the buffer's flags are cleared here (stream 0, synchronous).
 * Destroy it with bun_ep_ll_destroy (the buffer stays the caller's). */
BUN_EP_API bunEpResult_t bun_ep_ll_create(const bunEpLowLatencyConfig_t* config, void** context);
BUN_EP_API bunEpResult_t bun_ep_ll_destroy(void* context);

/* Where the preallocated outputs of one parity live (device pointers inside the buffer). */
typedef struct {
  void* recvX;          /* [El, R*M, H] bf16 or fp8 (bf16-sized) */
  void* recvXScales;    /* f32 [El, R*M, H/128] or i32 [El, R*M, H/512] */
  void* recvCount;      /* i32 [El] */
  void* srcTokenIdx;    /* i32 [El, R*M] */
  void* layoutRange;    /* i32 [El, R, 2] */
  void* combineBuffer;  /* bf16 [El, R*M, H]: zero-copy combine input */
  void* combinedX;      /* bf16 [M, H]: combine output when the caller gives none */
} bunEpLowLatencyViews_t;

BUN_EP_API bunEpResult_t bun_ep_ll_views(void* context, int32_t parity, bunEpLowLatencyViews_t* views);

typedef struct {
  const void* x;              /* bf16 [T, H] */
  const void* topkIdx;        /* i64 [T, K] */
  int64_t numTokens;          /* T <= maxTokensPerRank */
  int64_t numTopk;            /* K <= maxTopk */
  int64_t parity;             /* 0 or 1 */
  int64_t useFp8;
  int64_t roundScale;
  int64_t useUe8m0;           /* implies roundScale; hidden a multiple of 512 */
  void* cumulativeRecvStats;  /* i32 [El] added to, or NULL */
  void* waitStats;            /* i64 [R] ns added to, or NULL */
  int64_t phases;             /* BUN_EP_LL_PHASE_* bits */
  void* stream;
} bunEpLowLatencyDispatchArgs_t;

BUN_EP_API bunEpResult_t bun_ep_ll_dispatch(void* context, const bunEpLowLatencyDispatchArgs_t* args);

typedef struct {
  const void* x;              /* bf16 [El, R*M, H] expert outputs (send phase), e.g. the combine buffer */
  const void* topkIdx;        /* i64 [T, K]: this rank's routing (receive phase) */
  const void* topkWeights;    /* f32 [T, K] */
  int64_t numTokens;
  int64_t numTopk;
  int64_t parity;             /* the parity of the dispatch whose handle this is */
  void* out;                  /* bf16 [T, H]; NULL = the parity's combinedX */
  int64_t phases;
  void* stream;
} bunEpLowLatencyCombineArgs_t;

BUN_EP_API bunEpResult_t bun_ep_ll_combine(void* context, const bunEpLowLatencyCombineArgs_t* args);

/* alive[r] != 0: rank r takes part. Synchronous copy to the device; applies to later launches
 * (and to graphs captured before: the kernels read the mask from device memory). */
BUN_EP_API bunEpResult_t bun_ep_ll_set_rank_mask(void* context, const int32_t* alive);

/* Reset flags and sequence numbers (collective: every rank calls it between two barriers, with
 * no call in flight). Ordered on `stream`. */
BUN_EP_API bunEpResult_t bun_ep_ll_clean(void* context, void* stream);

/* bunEpSuccess, or bunEpTimeout naming the rank a kernel of this context waited for in vain
 * (the context is then unusable: every later call returns bunEpUnusable). Reads mapped memory
 * the kernels write; never synchronizes. */
BUN_EP_API bunEpResult_t bun_ep_ll_check(void* context);

/* The mapped host memory bun_ep_ll_check reads (int32 [4]; word 0 is nonzero once a wait of this
 * context timed out), so a caller can test it per call without a native call and call
 * bun_ep_ll_check only when it is set. Valid until bun_ep_ll_destroy. */
BUN_EP_API bunEpResult_t bun_ep_ll_error_word(void* context, const int32_t** word);

#endif /* BUN_EP_LOW_LATENCY_H */
