// ds3 CPU backend: the kernels of simd_impl.h for AVX-512 (F, BW, VL, DQ) + FMA, 16 lanes.
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma (CMakeLists.txt); used only
// where the CPU reports those features.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "simd.h"

namespace ds3 {
namespace isa_avx512 {
namespace {
struct V {
  static constexpr int L = 16;
  using R = __m512;
  static R zero() { return _mm512_setzero_ps(); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R set1(float f) { return _mm512_set1_ps(f); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static float hsum(R v) {  // 16 -> 8 -> 4 -> 2 -> 1, pairwise halves
    __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    b = _mm_add_ps(b, _mm_movehl_ps(b, b));
    b = _mm_add_ss(b, _mm_movehdup_ps(b));
    return _mm_cvtss_f32(b);
  }
  static R fp8(const uint8_t* p) {
    __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    v = _mm512_and_si512(_mm512_slli_epi32(v, 20), _mm512_set1_epi32(int32_t(0x87F00000u)));
    return _mm512_castsi512_ps(v);
  }
  static R bf16(const uint16_t* p) {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  }
};
constexpr int TB = 6;  // 4 x 6 accumulators + 4 weights + 1 input = 29 of 32 registers
}  // namespace
#include "simd_impl.h"
const Kern table = {"avx512", decode, gemm, linear, scratch_rows, dot, axpy, wsum, axpy_row};
}  // namespace isa_avx512
}  // namespace ds3
#endif
