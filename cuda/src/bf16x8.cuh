// Eight bf16 values packed in an int4: widened to f32 and added in order (__fadd_rn, no FMA), and
// packed back with one round-to-nearest-even each. Shared by the normal combines (intranode and
// internode), whose sums the spec fixes bit for bit.
#pragma once

#include <cuda_bf16.h>
#include <cstdint>

namespace bun_ep {

__device__ __forceinline__ float bf16_bits_to_f32(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

__device__ __forceinline__ void add_bf16x8(float (&acc)[8], const int4& v) {
  const uint32_t words[4] = {uint32_t(v.x), uint32_t(v.y), uint32_t(v.z), uint32_t(v.w)};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    acc[2 * i] = __fadd_rn(acc[2 * i], bf16_bits_to_f32(words[i] & 0xffffu));
    acc[2 * i + 1] = __fadd_rn(acc[2 * i + 1], bf16_bits_to_f32(words[i] >> 16));
  }
}

__device__ __forceinline__ int4 pack_bf16x8(const float (&acc)[8]) {
  uint32_t words[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(acc[2 * i]));
    const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(acc[2 * i + 1]));
    words[i] = lo | (hi << 16);
  }
  return make_int4(int(words[0]), int(words[1]), int(words[2]), int(words[3]));
}

}  // namespace bun_ep
