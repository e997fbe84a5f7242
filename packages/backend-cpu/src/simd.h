// ds3 CPU backend: the SIMD kernel table, one per instruction set, chosen at run time.
//
// Each ISA is a separate translation unit compiled with its own flags (simd_avx512.cpp,
// simd_avx2.cpp, simd_generic.cpp: portable C++, NEON on ARM); all of them instantiate the same
// kernels from simd_impl.h over a small vector type, so every op is written once. Those TUs
// include no STL and no inline function of kernels.h: nothing compiled for AVX-512 can be
// picked by the linker for a machine without it.
//
// Exactness: FP8 e4m3 and BF16 are converted to fp32 exactly (bit tricks, no table); a weight's
// value is the same fp32 number as `Weight::row` gives. Every dot product has one fixed
// summation order per (token, output row) that depends on neither the batch size nor the row
// range computed, which keeps the engine's batch invariance (a token's logits bit-identical
// alone or in any batch).
#pragma once
#include <cstdint>

namespace ds3 {

/** What a kernel needs of a weight (a plain view: kernels.h's Weight stays out of the ISA TUs). */
struct WView {
  int dtype;  // 0 F8E4M3, 1 BF16, 2 F16, 3 F32 (the order of WDType)
  int64_t rows, cols;
  const uint8_t* data;
  const float* scale;  // FP8: [srows, scols] block scales (128x128)
  int64_t scols, orow, ocol;
  bool scale_ok;  // FP8: every scale * 2^120 is finite (the one-multiply exact decode applies)
};

struct Kern {
  const char* isa;
  /** rows [r0, r0 + nr) of w, as fp32, into out (row stride w.cols) */
  void (*decode)(const WView& w, int64_t r0, int64_t nr, float* out);
  /**
   * y[t * ldy + r] = sum_k x[t * ldx + k] * w[r * ldw + k] for t < T, r < nr (K terms), rounded to
   * bf16 when asked. Per (t, r) the order of the sum is fixed: it depends on neither T nor nr.
   */
  void (*gemm)(const float* x, int64_t ldx, int64_t T, const float* w, int64_t ldw, int64_t nr, int64_t K, float* y, int64_t ldy,
               bool bf16);
  /**
   * The same products with the weight rows decoded on the fly (no fp32 copy): y[t * ldy + r] for
   * rows [r0, r1) of w. Bit-identical to decode + gemm.
   */
  void (*linear)(const float* x, int64_t ldx, int64_t T, const WView& w, int64_t r0, int64_t r1, float* y, int64_t ldy, bool bf16,
                 float* scratch);
  /** rows of scratch `linear` needs (scratch holds scratch_rows(T, K) * K floats) */
  int64_t (*scratch_rows)(int64_t T, int64_t K);
  float (*dot)(const float* a, const float* b, int64_t n);
  /** y += a * x */
  void (*axpy)(float a, const float* x, float* y, int64_t n);
  /**
   * out[k * ldo + c] += sum_j p[k * ldp + j] * rows[j * ldr + c] for k < nh, c < C, the terms added
   * in j order: bit-identical to one axpy per j, with each row read once for all nh
   */
  void (*wsum)(const float* p, int64_t ldp, int64_t nh, const float* rows, int64_t ldr, int64_t n, int64_t C, float* out, int64_t ldo);
  /** y += a * (row r of w), the row decoded in registers: bit-identical to decode + axpy (tmp: w.cols floats) */
  void (*axpy_row)(float a, const WView& w, int64_t r, float* y, float* tmp);
};

/** The kernels for `isa` ("avx512", "avx2", "generic"; "" or "auto": the best this CPU runs); null if this CPU can't. */
const Kern* find_kern(const char* isa);
/** Names of the ISAs this build contains and this CPU runs, best first, comma separated. */
const char* available_isas();

namespace isa_generic {
extern const Kern table;
}
namespace isa_avx2 {
extern const Kern table;
}
namespace isa_avx512 {
extern const Kern table;
}

}  // namespace ds3
