/* Part of bun_ep.h (included inside its extern "C" block); see the rules there.
 *
 * Normal (high-throughput) kernels inside one host: layout, notify, dispatch, combine.
 * Implemented in cuda/src/layout.cu and cuda/src/intranode.cu; bound in lib/native/normal.ts;
 * driven by lib/backend/cuda.ts.
 *
 * Design ("staged, no ring"): every rank owns one registered buffer (cudaMalloc, shared with the
 * other ranks by CUDA IPC or by plain pointer). Its first BUN_EP_NORMAL_CONTROL_BYTES hold flags and
 * counts; the rest is a staging area that holds, per call, every row this rank receives at its
 * final row number. The notify step gives every rank the full count matrix, so each sender knows the
 * exact row each of its tokens takes on each receiver: senders store rows straight into that row of
 * the receiver's staging area (no ring, no per-token flow control), flag each channel done, and the
 * receiver copies its rows out into fresh tensors channel by channel as they complete.
 *
 * Two ways a row can land (each rank picks for itself, per call, and publishes its choice in its
 * control region before it signals "started seq", so peers adapt):
 *  - dispatch, "direct": the receive tensors lie in the receiver's own registered buffer (an arena
 *    after the staging area, managed by lib/backend/cuda.ts), so senders store straight into the
 *    final rows and there is no copy-out (2 HBM passes per received byte instead of 4); "staged"
 *    (the fallback when the arena is full): senders store into the staging area, the receiver copies
 *    out into the receive tensors.
 *  - combine, "pull": the combine input x (and topkWeights) of a rank lie in its registered buffer
 *    (e.g. x IS a dispatch output); the home rank reads those rows straight from the peer and
 *    reduces, then tells the peer it is done reading; "push" (else): the peer stores its rows into
 *    the home rank's staging area and the home rank reduces from there.
 * `bufferBytes` below is the end of the staging area; the arena after it is not the kernels' business.
 *
 * Every call carries `seq`, a per-buffer call counter that all ranks advance identically; flags hold
 * the seq of the call that wrote them (monotonic, never reset). Every wait is bounded by timeoutNs;
 * a timeout (or bad input found on the device) is written to the rank's error record in mapped pinned
 * memory and makes every later wait of that buffer give up at once: the buffer is then unusable.
 */
#ifndef BUN_EP_NORMAL_H
#define BUN_EP_NORMAL_H

#define BUN_EP_NORMAL_MAX_RANKS 8
#define BUN_EP_NORMAL_MAX_CHANNELS 160
#define BUN_EP_NORMAL_MAX_LOCAL_EXPERTS 1024
/* Bytes at the start of each registered buffer reserved for flags and counts (zeroed at creation). */
#define BUN_EP_NORMAL_CONTROL_BYTES (256 * 1024)
/* Bytes of the mapped pinned record each rank's kernels write for the host. */
#define BUN_EP_NORMAL_HOST_RECORD_BYTES 8192
/* Device workspace bytes per rank (abort flag). */
#define BUN_EP_NORMAL_WORKSPACE_BYTES 256

/* Int32 slots of the host record. */
#define BUN_EP_REC_NOTIFY_SEQ 0        /* seq of the last notify whose counts below are valid (written last) */
#define BUN_EP_REC_NUM_RECV 1          /* rows this rank receives */
#define BUN_EP_REC_MAX_RECV 2          /* largest receive count over all ranks */
#define BUN_EP_REC_MAX_RECV_RANK 3     /* the rank that has it */
#define BUN_EP_REC_ERROR_CODE 8        /* 0 = none, else BUN_EP_NORMAL_ERR_* (first error wins) */
#define BUN_EP_REC_ERROR_RANK 9        /* the rank concerned (the one that never arrived, ...) */
#define BUN_EP_REC_ERROR_A 10          /* detail values, see the error codes */
#define BUN_EP_REC_ERROR_B 11
#define BUN_EP_REC_ERROR_SEQ 12        /* seq of the call that failed */
#define BUN_EP_REC_ERROR_STEP 13       /* BUN_EP_NORMAL_STEP_* */
#define BUN_EP_REC_EXPERT_COUNTS 32    /* [numLocalExperts] received per local expert (aligned) */

#define BUN_EP_NORMAL_ERR_TIMEOUT 1        /* rank = who never arrived */
#define BUN_EP_NORMAL_ERR_BAD_TOPK 2       /* A = token, B = value (truncated to i32) */
#define BUN_EP_NORMAL_ERR_WORST_OVERFLOW 3 /* rank = receiver, A = rows it needs, B = numWorstTokens */
#define BUN_EP_NORMAL_ERR_STAGING 4        /* rank = receiver, A = rows it needs, B = rows that fit */

#define BUN_EP_NORMAL_STEP_LAYOUT 1
#define BUN_EP_NORMAL_STEP_NOTIFY 2
#define BUN_EP_NORMAL_STEP_DISPATCH 3
#define BUN_EP_NORMAL_STEP_COMBINE 4

/* Where a rank's normal-kernel state lives; every field 8 bytes. Shared by notify/dispatch/combine. */
typedef struct {
  int64_t rank;
  int64_t numRanks;
  void* peerBuffers[BUN_EP_NORMAL_MAX_RANKS]; /* registered buffer of each rank, as this rank sees it */
  int64_t bufferBytes;                        /* end of control + staging area (same on every rank) */
  int32_t* hostRecord;                        /* device pointer of this rank's mapped pinned record */
  int32_t* workspace;                         /* BUN_EP_NORMAL_WORKSPACE_BYTES of device memory, zeroed */
  int64_t timeoutNs;
  int64_t seq;                                /* this call's number (same on every rank), >= 1 */
  void* stream;                               /* the launch stream (only args[0]'s is used, see below) */
} bunEpNormalComm_t;

/* getDispatchLayout. Outputs are fully written (no memset needed). */
typedef struct {
  const int64_t* topkIdx;       /* [numTokens, topk] */
  int32_t* numTokensPerRank;    /* [numRanks] */
  int32_t* numTokensPerExpert;  /* [numExperts] */
  uint8_t* isTokenInRank;       /* [numTokens, numRanks] */
  int64_t numTokens;
  int64_t topk;
  int64_t numExperts;
  int64_t numRanks;
  int64_t rank;                 /* for error messages */
  int32_t* hostRecord;          /* bad topk values are reported here (may be NULL) */
  void* stream;
} bunEpLayoutArgs_t;

/* Per-dispatch routing state that cached dispatch and combine reuse ("the handle"), one device
 * allocation of bun_ep_normal_handle_bytes(numTokens, numRanks) bytes laid out as:
 *   int32 info[BUN_EP_NORMAL_HANDLE_INFO_INTS]   counts and offsets (cuda/src/intranode.cu, HandleInfo)
 *   int32 homeSlot[numTokens][numRanks]          position of token t among this rank's tokens sent to r, or -1
 */
#define BUN_EP_NORMAL_HANDLE_INFO_INTS (16 + 5 * BUN_EP_NORMAL_MAX_RANKS + 2 * BUN_EP_NORMAL_MAX_RANKS * BUN_EP_NORMAL_MAX_CHANNELS)

typedef struct {
  bunEpNormalComm_t comm;
  const int64_t* topkIdx;       /* [numTokens, topk] */
  int32_t* handle;              /* bun_ep_normal_handle_bytes(numTokens, numRanks) bytes */
  int32_t* recvCountPerExpert;  /* [numExperts / numRanks] device: received (pair) count per local expert, aligned */
  int64_t numTokens;
  int64_t topk;
  int64_t numExperts;
  int64_t numChannels;          /* the dispatch grid that will use this handle */
  int64_t expertAlignment;
  int64_t numWorstTokens;       /* 0 = exact sizing (host waits) */
  int64_t stagingRows;          /* rows the staging area fits for this call's row shape */
} bunEpNotifyArgs_t;

typedef struct {
  bunEpNormalComm_t comm;
  const int32_t* handle;        /* from notify (or the cached handle) */
  const void* x;                /* [numTokens, hidden] bf16 or e4m3 */
  const float* xScales;         /* [numTokens, hidden/128] (fp8) or NULL */
  const int64_t* topkIdx;       /* [numTokens, topk] or NULL (cached) */
  const float* topkWeights;     /* [numTokens, topk] or NULL */
  void* recvX;                  /* [recvRows, hidden] */
  float* recvXScales;           /* [recvRows, hidden/128] or NULL */
  int64_t* recvTopkIdx;         /* [recvRows, topk] or NULL */
  float* recvTopkWeights;       /* [recvRows, topk] or NULL */
  int64_t numTokens;
  int64_t hidden;
  int64_t elementBytes;         /* 2 (bf16) or 1 (e4m3) */
  int64_t topk;
  int64_t numExperts;
  int64_t numChannels;          /* grid size: one block per channel; must equal the handle's */
  int64_t recvRows;             /* rows of the receive tensors (numRecvTokens or numWorstTokens) */
  int64_t threadsPerBlock;      /* 0 = default */
  int64_t recvDirect;           /* 1: every non-NULL receive tensor lies in this rank's registered buffer
                                   (peerBuffers[rank]); senders write there, no staging, no copy-out */
} bunEpDispatchArgs_t;

typedef struct {
  bunEpNormalComm_t comm;
  const int32_t* handle;
  const uint16_t* x;            /* [numRecvRows, hidden] bf16 */
  const float* topkWeights;     /* [numRecvRows, topk] or NULL */
  const uint16_t* bias0;        /* [numTokens, hidden] bf16 or NULL */
  const uint16_t* bias1;        /* [numTokens, hidden] bf16 or NULL (only with bias0) */
  uint16_t* combinedX;          /* [numTokens, hidden] */
  float* combinedTopkWeights;   /* [numTokens, topk] or NULL */
  int64_t numTokens;            /* home tokens of this rank */
  int64_t hidden;
  int64_t topk;
  int64_t numBlocks;            /* grid size (SMs) */
  int64_t threadsPerBlock;      /* 0 = default */
  int64_t xDirect;              /* 1: x (and topkWeights when given) lie in this rank's registered buffer;
                                   home ranks pull the rows from there (no push into their staging) */
} bunEpCombineArgs_t;

/* Fixed numbers of this build: out[0] control bytes, out[1] host record bytes, out[2] workspace bytes,
 * out[3] max ranks, out[4] max channels, out[5] max local experts, out[6] handle info ints. */
BUN_EP_API bunEpResult_t bun_ep_normal_constants(int64_t* out, int64_t count);
/* Bytes of the handle allocation for numTokens tokens and numRanks ranks. */
BUN_EP_API int64_t bun_ep_normal_handle_bytes(int64_t numTokens, int64_t numRanks);
/* Rows of the staging area for one row shape (x bytes per row, scales, topk entries): every rank
 * computes the same number for the same call. */
BUN_EP_API int64_t bun_ep_normal_staging_rows(int64_t bufferBytes, int64_t hidden, int64_t elementBytes,
                                              int64_t hasScales, int64_t topk, int64_t hasWeights);

BUN_EP_API bunEpResult_t bun_ep_normal_layout(const bunEpLayoutArgs_t* args);
/* notify, dispatch and combine take `count` argument structs (1..BUN_EP_NORMAL_MAX_RANKS), one per
 * rank of the calling process on the current device, all of the same call (same seq), and run them as
 * ONE kernel launch on args[0].comm.stream: the ranks' kernels wait on each other, and only one grid
 * guarantees that they all run at once (separate streams share hardware queues, so one rank's kernel
 * could wait behind another's forever). The caller orders the other ranks' streams around it with
 * events. The grid (count x blocks per rank) must fit on the device at once, else bunEpInvalidArgument.
 * Ranks in other processes make their own call. */
/* Exchange counts with every rank; fills the handle, recvCountPerExpert and the host record. */
BUN_EP_API bunEpResult_t bun_ep_normal_notify(const bunEpNotifyArgs_t* args, int64_t count);
BUN_EP_API bunEpResult_t bun_ep_normal_dispatch(const bunEpDispatchArgs_t* args, int64_t count);
BUN_EP_API bunEpResult_t bun_ep_normal_combine(const bunEpCombineArgs_t* args, int64_t count);

#endif /* BUN_EP_NORMAL_H */
