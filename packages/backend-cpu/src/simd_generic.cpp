// ds3 CPU backend: the kernels of simd_impl.h in portable C++ (4 lanes; NEON on ARM, plain
// loops elsewhere, which the compiler maps to the baseline SIMD), and the run-time choice of
// a kernel table.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__ARM_NEON) || defined(__aarch64__)
#include <arm_neon.h>
#define DS3_NEON 1
#endif

#include "simd.h"

namespace ds3 {
namespace isa_generic {
namespace {
#ifdef DS3_NEON
struct V {
  static constexpr int L = 4;
  using R = float32x4_t;
  static R zero() { return vdupq_n_f32(0.0f); }
  static R load(const float* p) { return vld1q_f32(p); }
  static void store(float* p, R v) { vst1q_f32(p, v); }
  static R fma(R a, R b, R c) { return vfmaq_f32(c, a, b); }
  static R set1(float f) { return vdupq_n_f32(f); }
  static R mul(R a, R b) { return vmulq_f32(a, b); }
  static float hsum(R v) {  // (0 + 2) + (1 + 3)
    float32x2_t h = vadd_f32(vget_low_f32(v), vget_high_f32(v));
    return vget_lane_f32(h, 0) + vget_lane_f32(h, 1);
  }
  static R fp8(const uint8_t* p) {
    int8x8_t b = vreinterpret_s8_u8(vld1_u8_lo4(p));
    int32x4_t v = vmovl_s16(vget_low_s16(vmovl_s8(b)));
    uint32x4_t u = vandq_u32(vshlq_n_u32(vreinterpretq_u32_s32(v), 20), vdupq_n_u32(0x87F00000u));
    return vreinterpretq_f32_u32(u);
  }
  static R bf16(const uint16_t* p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
  static uint8x8_t vld1_u8_lo4(const uint8_t* p) {
    uint32_t w;
    std::memcpy(&w, p, 4);
    return vreinterpret_u8_u32(vdup_n_u32(w));
  }
};
#else
struct V {
  static constexpr int L = 4;
  struct R {
    float v[4];
  };
  static R zero() { return R{{0, 0, 0, 0}}; }
  static R load(const float* p) {
    R r;
    std::memcpy(r.v, p, 16);
    return r;
  }
  static void store(float* p, R v) { std::memcpy(p, v.v, 16); }
  static R fma(R a, R b, R c) {  // two roundings here (no FMA in the baseline ISA); still one fixed order
    for (int i = 0; i < 4; i++) c.v[i] = a.v[i] * b.v[i] + c.v[i];
    return c;
  }
  static R set1(float f) { return R{{f, f, f, f}}; }
  static R mul(R a, R b) {
    for (int i = 0; i < 4; i++) a.v[i] *= b.v[i];
    return a;
  }
  static float hsum(R v) { return (v.v[0] + v.v[2]) + (v.v[1] + v.v[3]); }
  static R fp8(const uint8_t* p) {
    R r;
    for (int i = 0; i < 4; i++) {
      uint32_t u = (uint32_t(int32_t(int8_t(p[i]))) << 20) & 0x87F00000u;
      std::memcpy(&r.v[i], &u, 4);
    }
    return r;
  }
  static R bf16(const uint16_t* p) {
    R r;
    for (int i = 0; i < 4; i++) {
      uint32_t u = uint32_t(p[i]) << 16;
      std::memcpy(&r.v[i], &u, 4);
    }
    return r;
  }
};
#endif
constexpr int TB = 4;
}  // namespace
#include "simd_impl.h"
const Kern table = {"generic", decode, gemm, linear, scratch_rows, dot, axpy, wsum, axpy_row};
}  // namespace isa_generic

// ---- run-time choice --------------------------------------------------------------------
namespace {
bool runs(const char* isa) {
  if (!std::strcmp(isa, "generic")) return true;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (!std::strcmp(isa, "avx2")) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (!std::strcmp(isa, "avx512"))
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
#endif
  return false;
}
const Kern* table_of(const char* isa) {
#if defined(__x86_64__) || defined(_M_X64)
  if (!std::strcmp(isa, "avx512")) return &isa_avx512::table;
  if (!std::strcmp(isa, "avx2")) return &isa_avx2::table;
#endif
  if (!std::strcmp(isa, "generic")) return &isa_generic::table;
  return nullptr;
}
const char* const ORDER[] = {"avx512", "avx2", "generic"};
}  // namespace

const Kern* find_kern(const char* isa) {
  if (!isa || !*isa || !std::strcmp(isa, "auto")) {
    for (const char* n : ORDER)
      if (table_of(n) && runs(n)) return table_of(n);
    return &isa_generic::table;
  }
  return table_of(isa) && runs(isa) ? table_of(isa) : nullptr;
}

const char* available_isas() {
  static char buf[64];
  if (!buf[0]) {
    for (const char* n : ORDER)
      if (table_of(n) && runs(n)) {
        if (buf[0]) std::strcat(buf, ",");
        std::strcat(buf, n);
      }
  }
  return buf;
}

}  // namespace ds3
