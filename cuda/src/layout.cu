// getDispatchLayout on the device: tokens per rank, (token, k) pairs per expert, and isTokenInRank,
// from topkIdx. -1 is skipped; values outside [-1, numExperts) are reported in the host record and
// skipped (never used as an index).
#include "common.cuh"
#include "intranode_common.cuh"

namespace bun_ep {
namespace normal {
namespace {

constexpr int kLayoutThreads = 256;

// One thread per token; per-block histograms in shared memory, then one global atomic per bin.
__global__ void __launch_bounds__(kLayoutThreads) layout_kernel(bunEpLayoutArgs_t args) {
  extern __shared__ int sharedCounts[];  // [numExperts] then [numRanks]
  const int numExperts = static_cast<int>(args.numExperts);
  const int numRanks = static_cast<int>(args.numRanks);
  const int expertsPerRank = numExperts / numRanks;
  int* expertCounts = sharedCounts;
  int* rankCounts = sharedCounts + numExperts;
  for (int i = threadIdx.x; i < numExperts + numRanks; i += blockDim.x) sharedCounts[i] = 0;
  __syncthreads();

  const int64_t token = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (token < args.numTokens) {
    uint32_t rankMask = 0;
    for (int k = 0; k < args.topk; ++k) {
      const int64_t expert = args.topkIdx[token * args.topk + k];
      if (expert == -1) continue;
      if (expert < -1 || expert >= numExperts) {
        record_error(args.hostRecord, nullptr, BUN_EP_NORMAL_ERR_BAD_TOPK, static_cast<int>(args.rank),
                     static_cast<int>(token), static_cast<int>(expert), 0, BUN_EP_NORMAL_STEP_LAYOUT);
        continue;
      }
      atomicAdd(&expertCounts[expert], 1);
      rankMask |= 1u << (expert / expertsPerRank);
    }
    for (int r = 0; r < numRanks; ++r) {
      const bool inRank = (rankMask >> r) & 1u;
      args.isTokenInRank[token * numRanks + r] = inRank ? 1 : 0;
      if (inRank) atomicAdd(&rankCounts[r], 1);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < numExperts; i += blockDim.x)
    if (expertCounts[i] != 0) atomicAdd(&args.numTokensPerExpert[i], expertCounts[i]);
  for (int r = threadIdx.x; r < numRanks; r += blockDim.x)
    if (rankCounts[r] != 0) atomicAdd(&args.numTokensPerRank[r], rankCounts[r]);
}

}  // namespace
}  // namespace normal
}  // namespace bun_ep

extern "C" BUN_EP_API bunEpResult_t bun_ep_normal_layout(const bunEpLayoutArgs_t* args) {
  using namespace bun_ep;
  BUN_EP_REQUIRE(args != nullptr, "bun_ep_normal_layout: args is NULL");
  BUN_EP_REQUIRE(args->numRanks >= 1 && args->numRanks <= 32, "layout: numRanks must be in [1, 32], got %lld",
                 (long long)args->numRanks);
  BUN_EP_REQUIRE(args->numExperts >= args->numRanks && args->numExperts % args->numRanks == 0,
                 "layout: numExperts must be a positive multiple of numRanks (%lld), got %lld",
                 (long long)args->numRanks, (long long)args->numExperts);
  BUN_EP_REQUIRE(args->numExperts <= 8192, "layout: numExperts must be <= 8192, got %lld",
                 (long long)args->numExperts);
  BUN_EP_REQUIRE(args->numTokens >= 0 && args->topk >= 0, "layout: numTokens (%lld) and topk (%lld) must be >= 0",
                 (long long)args->numTokens, (long long)args->topk);
  cudaStream_t stream = static_cast<cudaStream_t>(args->stream);
  BUN_EP_CUDA_CHECK(cudaMemsetAsync(args->numTokensPerRank, 0, sizeof(int32_t) * args->numRanks, stream));
  BUN_EP_CUDA_CHECK(cudaMemsetAsync(args->numTokensPerExpert, 0, sizeof(int32_t) * args->numExperts, stream));
  if (args->numTokens == 0) return bunEpSuccess;
  const int threads = normal::kLayoutThreads;
  const int blocks = static_cast<int>((args->numTokens + threads - 1) / threads);
  const size_t sharedBytes = sizeof(int) * (args->numExperts + args->numRanks);
  normal::layout_kernel<<<blocks, threads, sharedBytes, stream>>>(*args);
  BUN_EP_LAUNCH_CHECK();
  return bunEpSuccess;
}
