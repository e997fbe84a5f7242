// ds3 GPU backends: device-side names that differ between CUDA, HIP (AMD, wave64) and the host SIMT emulator.
// Model of the idea: llama.cpp's ggml-cuda/vendors/hip.h; here only what the kernels use, and every lane
// operation goes through a wrapper that is right at WARP = 64:
//   shfl_xor / shfl_up / shfl   all lanes of the warp take part (full mask on CUDA)
//   ballot                      lanemask_t: 32-bit on CUDA, 64-bit on AMD
//   lowest_lane / highest_lane  index of the lowest / highest set lane of a mask (mask != 0)
//   match_any / group_add2      the lanes that hold the same key; sums of two values over such a group
//                               (CUDA: __match_any_sync / __reduce_add_sync; AMD has neither: loops over the
//                               distinct keys / groups of the wave, a ballot or a full-width butterfly sum each)
// Number formats: CUDA uses cuda_fp8/cuda_bf16; AMD and the emulator use exact software conversions (see common.cuh).
#pragma once
#include "vendor.h"

#if defined(DS3_SIMT_EMU)
// simt_emu.h (included by vendor.h) provides threadIdx & co, __syncthreads, atomics, and both the CUDA
// (__shfl_xor_sync ...) and the HIP (__shfl_xor, 64-bit __ballot ...) lane intrinsics.
#elif defined(DS3_HIP)
#include <hip/hip_runtime.h>
#include <hip/hip_fp16.h>
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#endif
#include <stdint.h>

// which implementation of the lane wrappers: the HIP one on AMD and in the emulator at width 64 (so the
// emulator runs the code AMD runs), the CUDA one on NVIDIA and in the emulator at width 32
#if defined(DS3_HIP) || (defined(DS3_SIMT_EMU) && DS3_EMU_WARP == 64)
#define DS3_LANES_HIP 1
#endif
// software number formats (no cuda_fp8 / cuda_bf16)
#if defined(DS3_HIP) || defined(DS3_SIMT_EMU)
#define DS3_SOFT_FORMATS 1
#endif

namespace ds3cu {

#if defined(DS3_LANES_HIP)
static_assert(WARP == 64, "the HIP lane wrappers are written for wave64");
typedef unsigned long long lanemask_t;
// MFMA operand / accumulator vectors (the emulator implements __builtin_amdgcn_mfma_f32_32x32x8bf16_1k on GCC vectors)
#if defined(DS3_SIMT_EMU)
typedef short mf_bf16x4 __attribute__((vector_size(8)));
typedef float mf_f32x16 __attribute__((vector_size(64)));
#else
typedef short mf_bf16x4 __attribute__((ext_vector_type(4)));
typedef float mf_f32x16 __attribute__((ext_vector_type(16)));
#endif
template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int o) { return __shfl_xor(v, o); }
template <typename T>
__device__ __forceinline__ T shfl_up(T v, int o) { return __shfl_up(v, o); }
template <typename T>
__device__ __forceinline__ T shfl(T v, int src) { return __shfl(v, src); }
__device__ __forceinline__ lanemask_t ballot(bool p) { return (lanemask_t)__ballot(p); }
__device__ __forceinline__ int lowest_lane(lanemask_t m) { return __ffsll((unsigned long long)m) - 1; }
__device__ __forceinline__ int highest_lane(lanemask_t m) { return 63 - __clzll((long long)m); }
__device__ __forceinline__ int popc(lanemask_t m) { return __popcll(m); }
__device__ __forceinline__ unsigned warp_sum_u(unsigned v) {
#pragma unroll
  for (int o = WARP / 2; o > 0; o >>= 1) v += shfl_xor(v, o);
  return v;
}
/** the lanes whose key equals this lane's (__match_any_sync): one round per distinct key in the wave */
__device__ __forceinline__ lanemask_t match_any(unsigned key) {
  lanemask_t todo = ~lanemask_t(0), g = 0;
  while (todo) {
    const unsigned k = shfl(key, lowest_lane(todo));
    const lanemask_t m = ballot(key == k);
    if (key == k) g = m;
    todo &= ~m;
  }
  return g;
}
/** sa, sb = sums of a, b over the lanes of this lane's group g (__reduce_add_sync(g, .), 32-bit wrap-around); the
 *  groups must partition the wave (as match_any's do). One round per group, each a full-width butterfly. */
__device__ __forceinline__ void group_add2(lanemask_t g, unsigned a, unsigned b, unsigned& sa, unsigned& sb) {
  lanemask_t todo = ~lanemask_t(0);
  sa = sb = 0;
  while (todo) {
    const lanemask_t gm = shfl(g, lowest_lane(todo));
    const bool mine = g == gm;
    const unsigned ta = warp_sum_u(mine ? a : 0u), tb = warp_sum_u(mine ? b : 0u);
    if (mine) sa = ta, sb = tb;
    todo &= ~gm;
  }
}
#else
static_assert(WARP == 32, "the CUDA lane wrappers are written for 32-lane warps");
typedef unsigned lanemask_t;
template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
template <typename T>
__device__ __forceinline__ T shfl_up(T v, int o) { return __shfl_up_sync(0xffffffffu, v, o); }
template <typename T>
__device__ __forceinline__ T shfl(T v, int src) { return __shfl_sync(0xffffffffu, v, src); }
__device__ __forceinline__ lanemask_t ballot(bool p) { return __ballot_sync(0xffffffffu, p); }
__device__ __forceinline__ int lowest_lane(lanemask_t m) { return __ffs(m) - 1; }
__device__ __forceinline__ int highest_lane(lanemask_t m) { return 31 - __clz(m); }
__device__ __forceinline__ int popc(lanemask_t m) { return __popc(m); }
__device__ __forceinline__ lanemask_t match_any(unsigned key) { return __match_any_sync(0xffffffffu, key); }
__device__ __forceinline__ void group_add2(lanemask_t g, unsigned a, unsigned b, unsigned& sa, unsigned& sb) {
  sa = __reduce_add_sync(g, a);
  sb = __reduce_add_sync(g, b);
}
#endif

}  // namespace ds3cu
