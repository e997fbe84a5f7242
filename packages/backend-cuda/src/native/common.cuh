// ds3 CUDA backend: shared device helpers (number formats, weight descriptors, reductions).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "ops.h"

namespace ds3cu {

// ---- number formats ---------------------------------------------------------------------
__device__ __forceinline__ float fp8_to_f32(uint8_t b) {
  __nv_fp8_e4m3 v;
  v.__x = b;
  return float(v);
}
__device__ __forceinline__ float2 fp8x2_to_f32x2(uint16_t v) {
  __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(v, __NV_E4M3);
  __half2 hh;
  memcpy(&hh, &h, 4);
  return __half22float2(hh);
}
__device__ __forceinline__ uint32_t fp8x2_to_bf16x2(uint16_t v) {
  float2 f = fp8x2_to_f32x2(v);
  __nv_bfloat162 b = __floats2bfloat162_rn(f.x, f.y);  // exact: e4m3 fits in bf16
  uint32_t u;
  memcpy(&u, &b, 4);
  return u;
}
__device__ __forceinline__ float bf16_bits_to_f32(uint16_t v) { return __uint_as_float(uint32_t(v) << 16); }
__device__ __forceinline__ float f16_bits_to_f32(uint16_t v) {
  __half h;
  memcpy(&h, &v, 2);
  return __half2float(h);
}
/** round to the nearest bf16 (ties to even), returned as float */
__device__ __forceinline__ float round_bf16(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }
__device__ __forceinline__ float maybe_bf16(float x, int r) { return r ? round_bf16(x) : x; }
/** round to the nearest e4m3fn value, saturating at +-448, as float */
__device__ __forceinline__ float round_fp8(float x) { return float(__nv_fp8_e4m3(x)); }
__device__ __forceinline__ uint8_t to_fp8_bits(float x) { return __nv_fp8_e4m3(x).__x; }
__device__ __forceinline__ float silu(float g) { return g / (1.0f + expf(-g)); }

// ---- weights ------------------------------------------------------------------------------
/** dequantized element (row, col) of a weight; FP8 uses its 128x128 block scale */
__device__ __forceinline__ float w_at(const WDesc& w, int64_t r, int64_t c) {
  switch (w.dtype) {
    case W_F8: {
      float s = w.scale[((r + w.o0) >> 7) * w.sc + (c >> 7)];
      return fp8_to_f32(static_cast<const uint8_t*>(w.data)[r * w.cols + c]) * s;
    }
    case W_BF16:
      return bf16_bits_to_f32(static_cast<const uint16_t*>(w.data)[r * w.cols + c]);
    case W_F16:
      return f16_bits_to_f32(static_cast<const uint16_t*>(w.data)[r * w.cols + c]);
    default:
      return static_cast<const float*>(w.data)[r * w.cols + c];
  }
}

template <int WT>
__device__ __forceinline__ float w_at_t(const WDesc& w, int64_t r, int64_t c) {
  if constexpr (WT == W_F8) {
    const float s = w.scale[((r + w.o0) >> 7) * w.sc + (c >> 7)];
    return fp8_to_f32(static_cast<const uint8_t*>(w.data)[r * w.cols + c]) * s;
  } else if constexpr (WT == W_BF16) {
    return bf16_bits_to_f32(static_cast<const uint16_t*>(w.data)[r * w.cols + c]);
  } else if constexpr (WT == W_F16) {
    return f16_bits_to_f32(static_cast<const uint16_t*>(w.data)[r * w.cols + c]);
  } else {
    return static_cast<const float*>(w.data)[r * w.cols + c];
  }
}

__device__ __forceinline__ uint4 ld_stream16(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// ---- reductions -----------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

}  // namespace ds3cu
