/* Part of bun_ep.h (included inside its extern "C" block); see the rules there.
 *
 * Normal (high-throughput) kernels across nodes: layout per node, notify, dispatch, combine.
 * Implemented in cuda/src/internode.cu (+ internode_common.cuh); bound in lib/native/internode.ts;
 * driven by lib/backend/cuda_internode.ts. Needs a build with NVSHMEM (BUN_EP_WITH_NVSHMEM=1) except
 * for the layout; without it every other call returns bunEpNotSupported.
 *
 * Ranks: rank r sits on node r / ranksPerNode with local index r % ranksPerNode. Two symmetric
 * NVSHMEM allocations per rank (same size and offsets on every rank):
 *  - the NVL buffer: reached by the ranks of the same node through nvshmem_ptr (peer pointers);
 *  - the RDMA buffer: reached by ranks of other nodes only through NVSHMEM puts and signals.
 *
 * Design ("staged, forwarded", no rings): notify gives every rank every rank's counts (tokens per
 * rank and per node), so each sender knows where each of its rows lands.
 *  Dispatch: a token of rank (n, i) for node m != n is packed once into the sender's RDMA send area
 *  and put (one put + signal per channel and node) to rank (m, i), its forwarder, which copies it
 *  into the final staging row of each rank of node m that needs it (NVL). Tokens for the sender's own
 *  node go straight to those rows. Each rank then copies its staged rows out, grouped by source rank.
 *  Combine: every rank writes each received row into its forwarder's gather area (one slot per
 *  (token, rank) pair: per-rank contributions are kept, so the home rank can add them in ascending
 *  rank order, bit for bit as the spec says); forwarders put each home rank's pairs back in one put
 *  per block; the home rank adds biases, then the pairs in rank order, in f32, and rounds once.
 *
 * Flags hold the seq of the call that set them (monotonic, never reset); every wait is bounded and
 * a timeout or bad input lands in the host record (same slots as the intranode kernels:
 * BUN_EP_REC_* and BUN_EP_NORMAL_ERR_* of bun_ep_normal.h, plus the slots below).
 */
#ifndef BUN_EP_INTERNODE_H
#define BUN_EP_INTERNODE_H

#define BUN_EP_INTERNODE_MAX_NODES 32
#define BUN_EP_INTERNODE_MAX_RANKS_PER_NODE 8
#define BUN_EP_INTERNODE_MAX_RANKS (BUN_EP_INTERNODE_MAX_NODES * BUN_EP_INTERNODE_MAX_RANKS_PER_NODE)
#define BUN_EP_INTERNODE_MAX_CHANNELS 128
#define BUN_EP_INTERNODE_MAX_LOCAL_EXPERTS 1024
/* Bytes at the start of the NVL buffer reserved for flags (zeroed at creation). */
#define BUN_EP_INTERNODE_NVL_CONTROL_BYTES (64 * 1024)

/* Extra int32 slots of the host record (the rest as BUN_EP_REC_*): the largest need over all ranks
 * of each area, in rows or pairs, and the rank that has it. */
#define BUN_EP_INTERNODE_REC_MAX_GATHER 16      /* combine pairs gathered on one forwarder (NVL) */
#define BUN_EP_INTERNODE_REC_MAX_GATHER_RANK 17
#define BUN_EP_INTERNODE_REC_MAX_RDMA_SEND 18   /* dispatch tokens one rank sends to other nodes */
#define BUN_EP_INTERNODE_REC_MAX_RDMA_SEND_RANK 19
#define BUN_EP_INTERNODE_REC_MAX_RDMA_RECV 20   /* dispatch tokens one forwarder receives from other nodes */
#define BUN_EP_INTERNODE_REC_MAX_RDMA_RECV_RANK 21
#define BUN_EP_INTERNODE_REC_MAX_COMBINE_RECV 22 /* combine pairs one home rank receives from other nodes */
#define BUN_EP_INTERNODE_REC_MAX_COMBINE_RECV_RANK 23

/* Error code beyond BUN_EP_NORMAL_ERR_*: an RDMA-buffer area is too small.
 * rank = the rank concerned, A = rows or pairs needed, B = what fits. */
#define BUN_EP_INTERNODE_ERR_RDMA 5

/* Where a rank's internode state lives; every field 8 bytes. */
typedef struct {
  int64_t rank;
  int64_t numRanks;
  int64_t ranksPerNode;
  void* nvlBuffer;                                         /* this rank's NVL buffer */
  void* nvlPeers[BUN_EP_INTERNODE_MAX_RANKS_PER_NODE];     /* the NVL buffer of each rank of this node, by local index */
  void* rdmaBuffer;                                        /* this rank's RDMA buffer (symmetric address) */
  int64_t nvlBytes;                                        /* bytes of each NVL buffer (same on every rank) */
  int64_t rdmaBytes;                                       /* bytes of each RDMA buffer (same on every rank) */
  int32_t* hostRecord;                                     /* device pointer of the mapped pinned record */
  int32_t* workspace;                                      /* BUN_EP_NORMAL_WORKSPACE_BYTES, zeroed */
  int64_t timeoutNs;
  int64_t seq;                                             /* this call's number, same on every rank, >= 1 */
  void* stream;
} bunEpInternodeComm_t;

/* getDispatchLayout across nodes. Outputs are fully written. */
typedef struct {
  const int64_t* topkIdx;        /* [numTokens, topk] */
  int32_t* numTokensPerRank;     /* [numRanks] */
  int32_t* numTokensPerNode;     /* [numRanks / ranksPerNode] (DeepEP's numTokensPerRdmaRank) */
  int32_t* numTokensPerExpert;   /* [numExperts] */
  uint8_t* isTokenInRank;        /* [numTokens, numRanks] */
  int64_t numTokens;
  int64_t topk;
  int64_t numExperts;
  int64_t numRanks;
  int64_t ranksPerNode;
  int64_t rank;                  /* for error messages */
  int32_t* hostRecord;           /* bad topk values are reported here (may be NULL) */
  void* stream;
} bunEpInternodeLayoutArgs_t;

/* The handle: one device allocation of bun_ep_internode_handle_bytes(numTokens, numRanks, ranksPerNode)
 * bytes: int32 info[BUN_EP_INTERNODE_HANDLE_INFO_INTS] (offsets, cuda/src/internode_common.cuh),
 * then int32 rankSlot[numTokens][numRanks] and nodeSlot[numTokens][numNodes]: the position of token
 * t among this rank's tokens to that rank (node) when it goes there, else ~position. */
typedef struct {
  bunEpInternodeComm_t comm;
  const int64_t* topkIdx;        /* [numTokens, topk] */
  int32_t* handle;
  int32_t* recvCountPerExpert;   /* [numExperts / numRanks] device */
  int64_t numTokens;
  int64_t topk;
  int64_t numExperts;
  int64_t numChannels;           /* the dispatch grid that will use this handle */
  int64_t expertAlignment;
  int64_t numWorstTokens;        /* 0 = exact sizing (the host waits) */
} bunEpInternodeNotifyArgs_t;

typedef struct {
  bunEpInternodeComm_t comm;
  const int32_t* handle;
  int32_t* recvMeta;             /* [recvRows, 2] (source rank, gather pair) written here, or NULL (cached) */
  const void* x;                 /* [numTokens, hidden] bf16 or e4m3 */
  const float* xScales;          /* [numTokens, hidden/128] (fp8) or NULL */
  const int64_t* topkIdx;        /* [numTokens, topk] or NULL (cached) */
  const float* topkWeights;      /* [numTokens, topk] or NULL */
  void* recvX;                   /* [recvRows, hidden] */
  float* recvXScales;            /* [recvRows, hidden/128] or NULL */
  int64_t* recvTopkIdx;          /* [recvRows, topk] or NULL */
  float* recvTopkWeights;        /* [recvRows, topk] or NULL */
  int64_t numTokens;
  int64_t hidden;
  int64_t elementBytes;          /* 2 (bf16) or 1 (e4m3) */
  int64_t topk;                  /* 0 for a cached dispatch */
  int64_t numExperts;
  int64_t numChannels;           /* grid; must equal the handle's */
  int64_t recvRows;              /* rows of the receive tensors */
} bunEpInternodeDispatchArgs_t;

typedef struct {
  bunEpInternodeComm_t comm;
  const int32_t* handle;
  const int32_t* recvMeta;       /* [numRecvRows, 2] from the dispatch that made the handle */
  const uint16_t* x;             /* [numRecvRows, hidden] bf16 */
  const float* topkWeights;      /* [numRecvRows, topk] or NULL */
  const uint16_t* bias0;         /* [numTokens, hidden] or NULL */
  const uint16_t* bias1;         /* [numTokens, hidden] or NULL (only with bias0) */
  uint16_t* combinedX;           /* [numTokens, hidden] */
  float* combinedTopkWeights;    /* [numTokens, topk] or NULL */
  int64_t numTokens;
  int64_t hidden;
  int64_t topk;                  /* the dispatch's topk (sizes the pair records on every rank) */
  int64_t numBlocks;
  int64_t numRecvRows;           /* rows of x (numRecvTokens or numWorstTokens) */
} bunEpInternodeCombineArgs_t;

/* Capacities of the areas for one row shape; every rank computes the same numbers. */
typedef struct {
  int64_t stagingRows;           /* dispatch rows a rank can receive (NVL) */
  int64_t gatherPairs;           /* combine pairs one forwarder can gather (NVL) */
  int64_t rdmaSendRows;          /* dispatch tokens a rank can send to other nodes (RDMA) */
  int64_t rdmaRecvRows;          /* dispatch tokens a forwarder can receive from other nodes (RDMA) */
  int64_t combineRecvPairs;      /* combine pairs a home rank can receive from other nodes (RDMA) */
  int64_t rdmaControlBytes;      /* the RDMA buffer's control region for this numRanks */
} bunEpInternodeCapacities_t;

#define BUN_EP_INTERNODE_HANDLE_INFO_INTS 8192

/* out[0..6]: MAX_NODES, MAX_RANKS_PER_NODE, MAX_CHANNELS, MAX_LOCAL_EXPERTS, NVL_CONTROL_BYTES,
 * HANDLE_INFO_INTS, and 1 when built with NVSHMEM (else 0). */
BUN_EP_API bunEpResult_t bun_ep_internode_constants(int64_t* out, int64_t count);
BUN_EP_API int64_t bun_ep_internode_handle_bytes(int64_t numTokens, int64_t numRanks, int64_t ranksPerNode);
/* Capacities of the NVL and RDMA buffers for one row shape (topk: the dispatch's, 0 when cached). */
BUN_EP_API bunEpResult_t bun_ep_internode_capacities(int64_t nvlBytes, int64_t rdmaBytes, int64_t numRanks,
                                                     int64_t ranksPerNode, int64_t hidden, int64_t elementBytes,
                                                     int64_t topk, bunEpInternodeCapacities_t* out);
BUN_EP_API bunEpResult_t bun_ep_internode_layout(const bunEpInternodeLayoutArgs_t* args);
/* Exchange counts with every rank (prepare + notify kernels); fills the handle, recvCountPerExpert,
 * the host record. */
BUN_EP_API bunEpResult_t bun_ep_internode_notify(const bunEpInternodeNotifyArgs_t* args);
BUN_EP_API bunEpResult_t bun_ep_internode_dispatch(const bunEpInternodeDispatchArgs_t* args);
BUN_EP_API bunEpResult_t bun_ep_internode_combine(const bunEpInternodeCombineArgs_t* args);

#endif /* BUN_EP_INTERNODE_H */
