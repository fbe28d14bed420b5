// The NVSHMEM bootstrap (cuda/include/bun_ep_nvshmem.h): one reference-counted initialisation per
// process through a unique id carried by the rank group, symmetric allocation, peer pointers and a
// stream-ordered barrier. The low-latency NVSHMEM transport and the internode kernels build on it.

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "common.cuh"

#ifndef BUN_EP_WITH_NVSHMEM
#define BUN_EP_WITH_NVSHMEM 0
#endif

#if BUN_EP_WITH_NVSHMEM
#include <nvshmem.h>
#include <nvshmemx.h>
#endif

namespace bun_ep {
namespace nvshmem_bootstrap {

#if BUN_EP_WITH_NVSHMEM

static_assert(sizeof(nvshmemx_uniqueid_t) == BUN_EP_NVSHMEM_UNIQUE_ID_BYTES,
              "BUN_EP_NVSHMEM_UNIQUE_ID_BYTES must equal sizeof(nvshmemx_uniqueid_t)");

struct ProcessState {
  std::mutex mutex;
  int64_t users = 0;
  int64_t rank = -1;
  int64_t numRanks = 0;
  int device = -1;
};

ProcessState& process_state() {
  static ProcessState state;  // function-local: no static-initialisation order issue
  return state;
}

bunEpResult_t require_initialised(const char* what) {
  if (process_state().users > 0) return bunEpSuccess;
  return set_error(bunEpInvalidArgument, "%s: NVSHMEM is not initialised in this process (call bun_ep_nvshmem_init first)",
                   what);
}

// NVSHMEM_SYMMETRIC_SIZE is read at initialisation; an explicit environment setting wins.
void apply_heap_size(int64_t heapBytes) {
  if (heapBytes <= 0 || std::getenv("NVSHMEM_SYMMETRIC_SIZE") != nullptr) return;
  setenv("NVSHMEM_SYMMETRIC_SIZE", std::to_string(heapBytes).c_str(), 0);
}

bunEpResult_t initialise(const bunEpNvshmemInitArgs_t& args) {
  BUN_EP_CUDA_CHECK(cudaSetDevice((int)args.device));
  apply_heap_size(args.heapBytes);
  nvshmemx_uniqueid_t id;
  std::memcpy(&id, args.uniqueId, sizeof(id));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  int status = nvshmemx_set_attr_uniqueid_args((int)args.rank, (int)args.numRanks, &id, &attr);
  if (status != 0)
    return set_error(bunEpNvshmemError, "nvshmemx_set_attr_uniqueid_args(rank %lld of %lld) returned %d",
                     (long long)args.rank, (long long)args.numRanks, status);
  // nvshmemi_init_thread, not the inline nvshmemx_init_attr: that one calls exit() on failure.
  int provided = 0;
  const nvshmemi_version_t version = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                      NVSHMEM_VENDOR_PATCH_VERSION};
  nvshmemx_init_init_attr_ver_only(attr);
  status = nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided, NVSHMEMX_INIT_WITH_UNIQUEID, &attr, version);
  if (status != 0)
    return set_error(bunEpNvshmemError,
                     "NVSHMEM initialisation of PE %lld of %lld on device %lld failed (status %d): see NVSHMEM's "
                     "messages above; on one host without RDMA set NVSHMEM_REMOTE_TRANSPORT=none",
                     (long long)args.rank, (long long)args.numRanks, (long long)args.device, status);
  if (nvshmem_my_pe() != (int)args.rank || nvshmem_n_pes() != (int)args.numRanks)
    return set_error(bunEpNvshmemError, "NVSHMEM started as PE %d of %d, expected %lld of %lld", nvshmem_my_pe(),
                     nvshmem_n_pes(), (long long)args.rank, (long long)args.numRanks);
  return bunEpSuccess;
}

#else

bunEpResult_t not_built(const char* what) {
  return set_error(bunEpNotSupported,
                   "%s: this libbun_ep.so was built without NVSHMEM; rebuild with NVSHMEM_DIR set (or `pip install "
                   "nvidia-nvshmem-cu13`) for the internode kernels and the NVSHMEM low-latency transport",
                   what);
}

#endif

}  // namespace nvshmem_bootstrap
}  // namespace bun_ep

using namespace bun_ep;
using namespace bun_ep::nvshmem_bootstrap;

extern "C" {

#if BUN_EP_WITH_NVSHMEM

bunEpResult_t bun_ep_nvshmem_get_unique_id(void* uniqueId) {
  BUN_EP_REQUIRE(uniqueId != nullptr, "uniqueId: expected %d writable bytes, got NULL", BUN_EP_NVSHMEM_UNIQUE_ID_BYTES);
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  const int status = nvshmemx_get_uniqueid(&id);
  if (status != 0) return set_error(bunEpNvshmemError, "nvshmemx_get_uniqueid returned %d", status);
  std::memcpy(uniqueId, &id, sizeof(id));
  return bunEpSuccess;
}

bunEpResult_t bun_ep_nvshmem_init(const bunEpNvshmemInitArgs_t* args, int64_t* users) {
  BUN_EP_REQUIRE(args != nullptr, "args: expected a bunEpNvshmemInitArgs_t pointer, got NULL");
  BUN_EP_REQUIRE(args->numRanks >= 1, "numRanks: expected >= 1, got %lld", (long long)args->numRanks);
  BUN_EP_REQUIRE(args->rank >= 0 && args->rank < args->numRanks, "rank: expected 0..%lld, got %lld",
                 (long long)args->numRanks - 1, (long long)args->rank);
  BUN_EP_REQUIRE(args->device >= 0, "device: expected a CUDA device index, got %lld", (long long)args->device);
  ProcessState& state = process_state();
  std::lock_guard<std::mutex> lock(state.mutex);
  if (state.users > 0) {
    BUN_EP_REQUIRE(state.rank == args->rank && state.numRanks == args->numRanks && state.device == (int)args->device,
                   "rank %lld of %lld on device %lld: NVSHMEM allows one PE per process and this process already is "
                   "PE %lld of %lld on device %d (several ranks in one process cannot use NVSHMEM; run one rank per "
                   "process, e.g. through the launcher)",
                   (long long)args->rank, (long long)args->numRanks, (long long)args->device, (long long)state.rank,
                   (long long)state.numRanks, state.device);
  } else {
    BUN_EP_REQUIRE(args->uniqueId != nullptr, "uniqueId: expected rank 0's %d-byte unique id, got NULL",
                   BUN_EP_NVSHMEM_UNIQUE_ID_BYTES);
    BUN_EP_TRY(initialise(*args));
    state.rank = args->rank;
    state.numRanks = args->numRanks;
    state.device = (int)args->device;
  }
  ++state.users;
  if (users != nullptr) *users = state.users;
  return bunEpSuccess;
}

bunEpResult_t bun_ep_nvshmem_finalize(int64_t* users) {
  ProcessState& state = process_state();
  std::lock_guard<std::mutex> lock(state.mutex);
  BUN_EP_TRY(require_initialised("bun_ep_nvshmem_finalize"));
  if (--state.users == 0) {
    BUN_EP_CUDA_CHECK(cudaSetDevice(state.device));
    nvshmem_finalize();
    state.rank = -1;
    state.numRanks = 0;
    state.device = -1;
  }
  if (users != nullptr) *users = state.users;
  return bunEpSuccess;
}

bunEpResult_t bun_ep_nvshmem_info(int64_t* myPe, int64_t* numPes) {
  BUN_EP_TRY(require_initialised("bun_ep_nvshmem_info"));
  if (myPe != nullptr) *myPe = nvshmem_my_pe();
  if (numPes != nullptr) *numPes = nvshmem_n_pes();
  return bunEpSuccess;
}

bunEpResult_t bun_ep_nvshmem_malloc(uint64_t bytes, void** ptr) {
  BUN_EP_TRY(require_initialised("bun_ep_nvshmem_malloc"));
  BUN_EP_REQUIRE(ptr != nullptr, "ptr: expected a void* pointer, got NULL");
  BUN_EP_REQUIRE(bytes > 0, "bytes: expected > 0, got 0");
  BUN_EP_CUDA_CHECK(cudaSetDevice(process_state().device));
  void* block = nvshmem_malloc(bytes);
  if (block == nullptr)
    return set_error(bunEpOutOfMemory,
                     "nvshmem_malloc(%llu bytes) on PE %d failed: the symmetric heap is too small (set "
                     "NVSHMEM_SYMMETRIC_SIZE, or heapBytes at the first initialisation)",
                     (unsigned long long)bytes, nvshmem_my_pe());
  BUN_EP_CUDA_CHECK(cudaMemset(block, 0, bytes));
  BUN_EP_CUDA_CHECK(cudaDeviceSynchronize());
  nvshmem_barrier_all();  // no PE writes into a peer's block before that peer zeroed it
  *ptr = block;
  return bunEpSuccess;
}

bunEpResult_t bun_ep_nvshmem_free(void* ptr) {
  BUN_EP_TRY(require_initialised("bun_ep_nvshmem_free"));
  if (ptr == nullptr) return bunEpSuccess;
  BUN_EP_CUDA_CHECK(cudaSetDevice(process_state().device));
  nvshmem_free(ptr);
  return bunEpSuccess;
}

bunEpResult_t bun_ep_nvshmem_ptr(const void* ptr, int64_t pe, void** remote) {
  BUN_EP_TRY(require_initialised("bun_ep_nvshmem_ptr"));
  BUN_EP_REQUIRE(remote != nullptr, "remote: expected a void* pointer, got NULL");
  BUN_EP_REQUIRE(pe >= 0 && pe < nvshmem_n_pes(), "pe: expected 0..%d, got %lld", nvshmem_n_pes() - 1, (long long)pe);
  *remote = nvshmem_ptr(ptr, (int)pe);
  return bunEpSuccess;
}

bunEpResult_t bun_ep_nvshmem_barrier_all(void* stream) {
  BUN_EP_TRY(require_initialised("bun_ep_nvshmem_barrier_all"));
  nvshmemx_barrier_all_on_stream(static_cast<cudaStream_t>(stream));
  BUN_EP_LAUNCH_CHECK();
  return bunEpSuccess;
}

#else

bunEpResult_t bun_ep_nvshmem_get_unique_id(void*) { return not_built("bun_ep_nvshmem_get_unique_id"); }
bunEpResult_t bun_ep_nvshmem_init(const bunEpNvshmemInitArgs_t*, int64_t*) { return not_built("bun_ep_nvshmem_init"); }
bunEpResult_t bun_ep_nvshmem_finalize(int64_t*) { return not_built("bun_ep_nvshmem_finalize"); }
bunEpResult_t bun_ep_nvshmem_info(int64_t*, int64_t*) { return not_built("bun_ep_nvshmem_info"); }
bunEpResult_t bun_ep_nvshmem_malloc(uint64_t, void**) { return not_built("bun_ep_nvshmem_malloc"); }
bunEpResult_t bun_ep_nvshmem_free(void*) { return not_built("bun_ep_nvshmem_free"); }
bunEpResult_t bun_ep_nvshmem_ptr(const void*, int64_t, void**) { return not_built("bun_ep_nvshmem_ptr"); }
bunEpResult_t bun_ep_nvshmem_barrier_all(void*) { return not_built("bun_ep_nvshmem_barrier_all"); }

#endif

}  // extern "C"
