// ds3 CUDA backend: shared device helpers (number formats, weight descriptors, reductions).
#pragma once
#include <stdint.h>
#include <string.h>

#include "ops.h"
#include "vendor.cuh"

namespace ds3cu {

// ---- number formats ---------------------------------------------------------------------
#if defined(DS3_SOFT_FORMATS)
// AMD and the host emulator: exact software conversions with the semantics of cuda_fp8 / cuda_bf16
// (e4m3fn: bias 7, max 448, 0x7f/0xff NaN; encoding round-to-nearest-even, saturating at +-448, NaN -> 0x7f;
// bf16: round-to-nearest-even). gfx942 (MI300) weights are stored as e4m3fnuz (converted at load: 0x80 -> 0,
// other bytes unchanged, block scales doubled): DS3_FP8_FNUZ selects that decoding for weights.
#if defined(__gfx940__) || defined(__gfx941__) || defined(__gfx942__)
#define DS3_FP8_FNUZ 1
#endif
__device__ __forceinline__ float ldexp_i(float m, int e) {
  // m * 2^e for the small exponents of e4m3 (|e| <= 10), exact
  return e >= 0 ? m * float(1 << e) : m / float(1 << -e);
}
/** OCP e4m3fn byte -> float */
__device__ __forceinline__ float fp8_ocp_to_f32(uint8_t b) {
  const int e = (b >> 3) & 15, m = b & 7;
  float v;
  if (e == 15 && m == 7) v = __int_as_float(0x7fc00000);
  else if (e == 0) v = float(m) * (1.0f / 512.0f);
  else v = ldexp_i(1.0f + float(m) * 0.125f, e - 7);
  return (b & 0x80) ? -v : v;
}
/** e4m3fnuz byte (bias 8, 0x80 NaN, no -0, no inf, max 240) -> float */
__device__ __forceinline__ float fp8_fnuz_to_f32(uint8_t b) {
  if (b == 0x80) return __int_as_float(0x7fc00000);
  const int e = (b >> 3) & 15, m = b & 7;
  const float v = e == 0 ? float(m) * (1.0f / 1024.0f) : ldexp_i(1.0f + float(m) * 0.125f, e - 8);
  return (b & 0x80) ? -v : v;
}
/** float -> OCP e4m3fn byte, round to nearest even, saturating at +-448 (cuda_fp8's __NV_SATFINITE) */
__device__ __forceinline__ uint8_t to_fp8_bits(float x) {
  const uint32_t bits = __float_as_uint(x);
  const uint8_t sign = uint8_t((bits >> 24) & 0x80);
  const uint32_t ab = bits & 0x7fffffffu;
  if (ab > 0x7f800000u) return 0x7f;                // NaN
  if (ab >= 0x43e00000u) return uint8_t(sign | 0x7e);  // >= 448 (and inf): saturate
  const float a = __uint_as_float(ab);
  if (a < 0.015625f) {  // below 2^-6: subnormal grid of 2^-9 (a result of 8 is the smallest normal, 0x08)
    const int q = int(rintf(a * 512.0f));
    return uint8_t(sign | q);
  }
  const uint32_t r = ab + 0x7ffffu + ((ab >> 20) & 1u);  // round the mantissa to 3 bits, ties to even
  const int e = int(r >> 23) - 127 + 7;
  const int m = int((r >> 20) & 7u);
  if (e > 15 || (e == 15 && m == 7)) return uint8_t(sign | 0x7e);
  return uint8_t(sign | (e << 3) | m);
}
/** the e4m3fnuz code (0..0x7f) of |x| rounded as round_fnuz does */
__device__ __forceinline__ int fnuz_code(float x) {
  const float a = fabsf(x) * 2.0f;  // on the e4m3 grid extended by 480 (code 0x7f): exact doubling
  int code;
  if (a >= 480.0f) {
    code = 0x7f;
  } else if (a < 0.015625f) {
    code = int(rintf(a * 512.0f));
  } else {
    const uint32_t ab = __float_as_uint(a);
    const uint32_t r = ab + 0x7ffffu + ((ab >> 20) & 1u);
    const int e = int(r >> 23) - 127 + 7;
    code = e > 15 ? 0x7f : ((e << 3) | int((r >> 20) & 7u));
  }
  return code;
}
/** float -> e4m3fnuz byte (nearest, ties to even, saturating at +-240; zero is 0x00, never 0x80 = NaN) */
__device__ __forceinline__ uint8_t fnuz_bits(float x) {
  if (!(x == x)) return 0x80;
  const int code = fnuz_code(x);
  return uint8_t(code && x < 0 ? (0x80 | code) : code);
}
/** round to the nearest e4m3fnuz value (the e4m3 grid halved, up to 240), ties to even, saturating at +-240,
 *  never -0: the "fp8-fnuz" activation quantization (the CPU backend emulates the same) */
__device__ __forceinline__ float round_fnuz(float x) {
  if (!(x == x)) return x;
  const int code = fnuz_code(x);
  const int e = code >> 3, m = code & 7;
  const float v = (e == 0 ? float(m) * (1.0f / 512.0f) : ldexp_i(1.0f + float(m) * 0.125f, e - 7)) * 0.5f;
  return (x < 0 && v != 0.0f) ? -v : v;
}
/** a weight byte -> float (e4m3fnuz on gfx94x, where the bytes were converted at load; else OCP) */
__device__ __forceinline__ float fp8_to_f32(uint8_t b) {
#if defined(DS3_FP8_FNUZ)
  return fp8_fnuz_to_f32(b);
#elif defined(DS3_SIMT_EMU)
  return ds3emu::fnuz_weights ? fp8_fnuz_to_f32(b) : fp8_ocp_to_f32(b);  // the emulator runs both
#else
  return fp8_ocp_to_f32(b);
#endif
}
__device__ __forceinline__ float2 fp8x2_to_f32x2(uint16_t v) { return make_float2(fp8_to_f32(uint8_t(v & 0xff)), fp8_to_f32(uint8_t(v >> 8))); }
__device__ __forceinline__ float bf16_bits_to_f32(uint16_t v) { return __uint_as_float(uint32_t(v) << 16); }
__device__ __forceinline__ uint16_t f32_to_bf16_bits(float x) {
  const uint32_t u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
struct ds3_bf16 {
  uint16_t x;
};
#define __nv_bfloat16 ds3_bf16
__device__ __forceinline__ ds3_bf16 __float2bfloat16_rn(float x) { return ds3_bf16{f32_to_bf16_bits(x)}; }
__device__ __forceinline__ float __bfloat162float(ds3_bf16 b) { return bf16_bits_to_f32(b.x); }
__device__ __forceinline__ float f16_bits_to_f32(uint16_t v) {
  _Float16 h;
  memcpy(&h, &v, 2);
  return float(h);
}
__device__ __forceinline__ uint16_t f32_to_f16_bits(float x) {
  const _Float16 h = _Float16(x);
  uint16_t v;
  memcpy(&v, &h, 2);
  return v;
}
/** round to the nearest bf16 (ties to even), returned as float */
__device__ __forceinline__ float round_bf16(float x) { return bf16_bits_to_f32(f32_to_bf16_bits(x)); }
/** round to the nearest e4m3fn value, saturating at +-448, as float (activation quantization: always OCP) */
__device__ __forceinline__ float round_fp8(float x) { return fp8_ocp_to_f32(to_fp8_bits(x)); }
/** 16-byte weight load (CUDA: ld.global.nc.L1::no_allocate) */
__device__ __forceinline__ uint4 ld_stream16(const void* p) { return *static_cast<const uint4*>(p); }
#else
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
/** round to the nearest e4m3fn value, saturating at +-448, as float */
__device__ __forceinline__ float round_fp8(float x) { return float(__nv_fp8_e4m3(x)); }
__device__ __forceinline__ uint8_t to_fp8_bits(float x) { return __nv_fp8_e4m3(x).__x; }
__device__ __forceinline__ uint16_t f32_to_f16_bits(float x) {
  const __half h = __float2half_rn(x);
  uint16_t v;
  memcpy(&v, &h, 2);
  return v;
}
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
#endif
__device__ __forceinline__ float maybe_bf16(float x, int r) { return r ? round_bf16(x) : x; }
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

// ---- reductions -----------------------------------------------------------------------------
// over the whole warp (WARP lanes); the _w forms over aligned groups of W lanes (W a power of two <= WARP)
template <int W = WARP>
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) v += shfl_xor(v, o);
  return v;
}
template <int W = WARP>
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) v = fmaxf(v, shfl_xor(v, o));
  return v;
}

}  // namespace ds3cu
