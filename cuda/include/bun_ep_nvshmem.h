/* Part of bun_ep.h (included inside its extern "C" block); see the rules there.
 *
 * The NVSHMEM bootstrap shared by the low-latency and internode kernels: cuda/src/nvshmem.cu,
 * bound by lib/native/nvshmem.ts and wrapped by lib/backend/nvshmem.ts (NvshmemContext).
 *
 * NVSHMEM allows one PE per process, so initialisation is reference-counted: the first
 * bun_ep_nvshmem_init of a process initialises NVSHMEM (unique-id bootstrap: rank 0 makes the id
 * with bun_ep_nvshmem_get_unique_id, the rank group carries it to every rank), later ones with the
 * same rank and size only count a user; bun_ep_nvshmem_finalize drops one user and finalises with
 * the last. bun_ep_nvshmem_malloc/free/init/finalize are collective over all PEs and block the
 * calling thread until every PE arrives: every process must make them in the same order.
 *
 * Built without NVSHMEM (BUN_EP_WITH_NVSHMEM=0), every function returns bunEpNotSupported with a
 * message saying so; BUN_EP_FEATURE_NVSHMEM tells which build is loaded.
 */
#ifndef BUN_EP_NVSHMEM_H
#define BUN_EP_NVSHMEM_H

/* Size of an NVSHMEM unique id (nvshmemx_uniqueid_t). */
#define BUN_EP_NVSHMEM_UNIQUE_ID_BYTES 128

typedef struct {
  const void* uniqueId; /* BUN_EP_NVSHMEM_UNIQUE_ID_BYTES from rank 0's bun_ep_nvshmem_get_unique_id */
  int64_t rank;         /* this process's PE */
  int64_t numRanks;     /* number of PEs */
  int64_t device;       /* CUDA device of this PE (made current before NVSHMEM starts) */
  int64_t heapBytes;    /* symmetric heap size, used when NVSHMEM_SYMMETRIC_SIZE is unset; 0: NVSHMEM's default */
} bunEpNvshmemInitArgs_t;

/* Fill `uniqueId` (BUN_EP_NVSHMEM_UNIQUE_ID_BYTES) with a fresh id; rank 0 only. */
BUN_EP_API bunEpResult_t bun_ep_nvshmem_get_unique_id(void* uniqueId);

/* Initialise NVSHMEM, or add a user when this process already did with the same rank and size.
 * `users` (optional) receives the number of users after the call. */
BUN_EP_API bunEpResult_t bun_ep_nvshmem_init(const bunEpNvshmemInitArgs_t* args, int64_t* users);

/* Drop one user; the last one finalises NVSHMEM (collective). `users` (optional) gets the rest. */
BUN_EP_API bunEpResult_t bun_ep_nvshmem_finalize(int64_t* users);

/* This PE and the number of PEs (bunEpInvalidArgument when NVSHMEM is not initialised). */
BUN_EP_API bunEpResult_t bun_ep_nvshmem_info(int64_t* myPe, int64_t* numPes);

/* Collective: `bytes` of the symmetric heap (same offset on every PE), zeroed, synchronised. */
BUN_EP_API bunEpResult_t bun_ep_nvshmem_malloc(uint64_t bytes, void** ptr);

/* Collective: release a bun_ep_nvshmem_malloc block. */
BUN_EP_API bunEpResult_t bun_ep_nvshmem_free(void* ptr);

/* A plain load/store pointer to `pe`'s copy of the symmetric object at `ptr`, or NULL when `pe`
 * is not reachable by peer access (then only NVSHMEM puts/gets reach it). */
BUN_EP_API bunEpResult_t bun_ep_nvshmem_ptr(const void* ptr, int64_t pe, void** remote);

/* A barrier over all PEs ordered on `stream` (also completes this PE's outstanding puts). */
BUN_EP_API bunEpResult_t bun_ep_nvshmem_barrier_all(void* stream);

#endif /* BUN_EP_NVSHMEM_H */
