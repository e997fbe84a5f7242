// ds3 CPU backend: the kernels of simd_impl.h for AVX2 + FMA, 8 lanes. Compiled with
// -mavx2 -mfma (CMakeLists.txt); used only where the CPU reports those features.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "simd.h"

namespace ds3 {
namespace isa_avx2 {
namespace {
struct V {
  static constexpr int L = 8;
  using R = __m256;
  static R zero() { return _mm256_setzero_ps(); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R set1(float f) { return _mm256_set1_ps(f); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static float hsum(R v) {  // 8 -> 4 -> 2 -> 1, pairwise halves
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    b = _mm_add_ps(b, _mm_movehl_ps(b, b));
    b = _mm_add_ss(b, _mm_movehdup_ps(b));
    return _mm_cvtss_f32(b);
  }
  static R fp8(const uint8_t* p) {
    __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    v = _mm256_and_si256(_mm256_slli_epi32(v, 20), _mm256_set1_epi32(int32_t(0x87F00000u)));
    return _mm256_castsi256_ps(v);
  }
  static R bf16(const uint16_t* p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  }
};
constexpr int TB = 2;  // 4 x 2 accumulators + 4 weights + 1 input of 16 registers
}  // namespace
#include "simd_impl.h"
const Kern table = {"avx2", decode, gemm, linear, scratch_rows, dot, axpy, wsum, axpy_row};
}  // namespace isa_avx2
}  // namespace ds3
#endif
