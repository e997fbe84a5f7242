// ds3 CPU backend: the kernels of simd.h, written once over a vector type V. Included by each
// ISA's translation unit after it defines, in an anonymous namespace:
//   struct V { static constexpr int L;  // lanes
//     using R = ...;                     // register type
//     static R zero(); static R load(const float*); static void store(float*, R);
//     static R fma(R a, R b, R c);       // a * b + c, one rounding
//     static R set1(float); static R mul(R, R);
//     static float hsum(R);              // a fixed reduction tree
//     static R fp8(const uint8_t*);      // L e4m3 codes -> fp32 * 2^-120 (exact: scale by 2^120)
//     static R bf16(const uint16_t*);    // L bf16 -> fp32 (exact)
//   };
//   constexpr int TB;                   // tokens per register tile (rows per tile: 4)
// Nothing here uses the STL or a header's inline functions (see simd.h). The including TU has
// already included <cstring> and simd.h (this file is included inside its namespace).

namespace {

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

float scalar_fp8(uint8_t b) {  // the same value as V::fp8 (times 2^-120), one code
  uint32_t u = ((uint32_t(int32_t(int8_t(b))) << 20) & 0x87F00000u);
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
float scalar_bf16(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
float scalar_f16(uint16_t h) {
  uint32_t s = uint32_t(h >> 15) << 31, e = (h >> 10) & 31, m = h & 1023, u;
  if (e == 31) u = s | 0x7f800000u | (m << 13);
  else if (e != 0) u = s | ((e + 112) << 23) | (m << 13);
  else if (m == 0) u = s;
  else {  // subnormal: normalize
    int sh = 0;
    while (!(m & 1024)) { m <<= 1; sh++; }
    u = s | (uint32_t(113 - sh) << 23) | ((m & 1023) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
float round_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffff) > 0x7f800000) u |= 0x400000;
  else u += 0x7fff + ((u >> 16) & 1);
  u &= 0xffff0000u;
  std::memcpy(&f, &u, 4);
  return f;
}
// software prefetch of the next 4-row tile (the same columns, 4 rows further): a tile's 4
// streams are one row each, too short for the hardware prefetcher to ramp up on. Measured on
// this Zen 5 at batch 1 (FP8, 128 MiB, 1 thread): 7 -> 16-21 GB/s; prefetching 512 bytes
// ahead in the same rows reached 9.
inline void prefetch_rows(const void* const* wp, int64_t byte_off) {
  for (int j = 0; j < 4; j++) __builtin_prefetch(static_cast<const char*>(wp[j]) + byte_off);
}
const float TWO_120 = 1.329227995784916e36f;  // 2^120

// ---- decode: weight rows -> fp32 ------------------------------------------------------
void decode(const ds3::WView& w, int64_t r0, int64_t nr, float* out) {
  const int64_t K = w.cols;
  for (int64_t i = 0; i < nr; i++) {
    const int64_t r = r0 + i;
    float* o = out + i * K;
    switch (w.dtype) {
      case 3:
        std::memcpy(o, w.data + size_t(r * K) * 4, size_t(K) * 4);
        break;
      case 1: {
        const uint16_t* p = reinterpret_cast<const uint16_t*>(w.data) + r * K;
        int64_t c = 0;
        for (; c + V::L <= K; c += V::L) V::store(o + c, V::bf16(p + c));
        for (; c < K; c++) o[c] = scalar_bf16(p[c]);
        break;
      }
      case 2: {
        const uint16_t* p = reinterpret_cast<const uint16_t*>(w.data) + r * K;
        for (int64_t c = 0; c < K; c++) o[c] = scalar_f16(p[c]);
        break;
      }
      default: {  // FP8 e4m3 with 128x128 block scales; a block's scale applied to its columns
        const uint8_t* p = w.data + r * K;
        const float* srow = w.scale + ((r + w.orow) / 128) * w.scols;
        int64_t c = 0;
        while (c < K) {
          const int64_t blk = (c + w.ocol) / 128, end = min64(K, (blk + 1) * 128 - w.ocol);
          const float s = srow[blk], s120 = s * TWO_120;
          if (s120 - s120 == 0.0f) {  // finite: code * 2^-120 * (s * 2^120) == code * s, exactly
            const typename V::R vs = V::set1(s120);
            for (; c + V::L <= end; c += V::L) V::store(o + c, V::mul(V::fp8(p + c), vs));
            for (; c < end; c++) o[c] = scalar_fp8(p[c]) * s120;
          } else {  // a scale >= 2^8: two steps (still exact)
            for (; c < end; c++) o[c] = (scalar_fp8(p[c]) * TWO_120) * s;
          }
        }
        break;
      }
    }
  }
}

// ---- gemm: a register tile of 4 rows x NT tokens -----------------------------------------
// Each (row, token) pair has its own accumulator, filled in k order, reduced by V::hsum, then
// the k tail added in order: the same operations whatever NT is and whichever rows share it.
template <int NT>
inline void tile(const float* const* xs, const float* const* ws, int64_t K, float (*out)[TB]) {
  typename V::R acc[4][NT];
  for (int r = 0; r < 4; r++)
    for (int t = 0; t < NT; t++) acc[r][t] = V::zero();
  int64_t k = 0;
  for (; k + V::L <= K; k += V::L) {
    const typename V::R w0 = V::load(ws[0] + k), w1 = V::load(ws[1] + k), w2 = V::load(ws[2] + k), w3 = V::load(ws[3] + k);
    for (int t = 0; t < NT; t++) {
      const typename V::R xv = V::load(xs[t] + k);
      acc[0][t] = V::fma(w0, xv, acc[0][t]);
      acc[1][t] = V::fma(w1, xv, acc[1][t]);
      acc[2][t] = V::fma(w2, xv, acc[2][t]);
      acc[3][t] = V::fma(w3, xv, acc[3][t]);
    }
  }
  for (int r = 0; r < 4; r++)
    for (int t = 0; t < NT; t++) {
      float s = V::hsum(acc[r][t]);
      for (int64_t j = k; j < K; j++) s += ws[r][j] * xs[t][j];
      out[r][t] = s;
    }
}

// f(integral_constant<nt>) for 1 <= nt <= TB: a register tile exactly as wide as the token group
template <int N>
struct IC {
  static constexpr int value = N;
};
template <int N = 1, typename F>
inline void by_tokens(int64_t nt, F&& f) {
  if constexpr (N < TB) {
    if (nt > N) return by_tokens<N + 1>(nt, f);
  }
  f(IC<N>{});
}

void gemm(const float* x, int64_t ldx, int64_t T, const float* w, int64_t ldw, int64_t nr, int64_t K, float* y, int64_t ldy, bool bf16) {
  for (int64_t t0 = 0; t0 < T; t0 += TB) {
    const int64_t nt = min64(TB, T - t0);
    const float* xs[TB];
    for (int i = 0; i < TB; i++) xs[i] = x + (t0 + min64(i, nt - 1)) * ldx;  // short groups repeat their last token
    for (int64_t r0 = 0; r0 < nr; r0 += 4) {
      const int64_t n = min64(4, nr - r0);
      const float* ws[4];
      for (int j = 0; j < 4; j++) ws[j] = w + (r0 + min64(j, n - 1)) * ldw;  // and short quads their last row
      float out[4][TB];
      by_tokens(nt, [&](auto n_) { tile<decltype(n_)::value>(xs, ws, K, out); });
      for (int64_t t = 0; t < nt; t++)
        for (int64_t j = 0; j < n; j++) {
          float v = out[j][t];
          y[(t0 + t) * ldy + r0 + j] = bf16 ? round_bf16(v) : v;
        }
    }
  }
}

// rows decoded per block: a tile of about 192 KiB (L2) for a long batch, 32 KiB (L1) for a short one
int64_t scratch_rows(int64_t T, int64_t K) {
  int64_t r = ((T > 16 ? 192 : 32) * 1024 / 4) / (K > 0 ? K : 1);
  r = r < 4 ? 4 : r > 64 ? 64 : r;
  return r & ~int64_t(3);
}

// ---- short batches: the weights decoded in registers, straight from the stored bytes ---------
// The same arithmetic as decode + tile (each weight is V::fp8 * (scale * 2^120), then the same
// accumulators in the same order), so results are bit-identical to the tiled path; used where
// every L-lane vector lies inside one scale block (ocol a multiple of L) and scales are < 2^8.
template <int NT>
inline void tile_fp8(const float* const* xs, const uint8_t* const* wp, const float* const* srow, int64_t ocol, int64_t K, float (*out)[TB]) {
  typename V::R acc[4][NT];
  for (int r = 0; r < 4; r++)
    for (int t = 0; t < NT; t++) acc[r][t] = V::zero();
  int64_t k = 0;
  while (k + V::L <= K) {
    const int64_t blk = (k + ocol) / 128, end = min64(K, (blk + 1) * 128 - ocol), vend = k + (end - k) / V::L * V::L;
    const typename V::R s0 = V::set1(srow[0][blk] * TWO_120), s1 = V::set1(srow[1][blk] * TWO_120), s2 = V::set1(srow[2][blk] * TWO_120),
                        s3 = V::set1(srow[3][blk] * TWO_120);
    for (; k < vend; k += V::L) {
      if ((k & 63) == 0) prefetch_rows(reinterpret_cast<const void* const*>(wp), k + 4 * K);
      const typename V::R w0 = V::mul(V::fp8(wp[0] + k), s0), w1 = V::mul(V::fp8(wp[1] + k), s1), w2 = V::mul(V::fp8(wp[2] + k), s2),
                          w3 = V::mul(V::fp8(wp[3] + k), s3);
      for (int t = 0; t < NT; t++) {
        const typename V::R xv = V::load(xs[t] + k);
        acc[0][t] = V::fma(w0, xv, acc[0][t]);
        acc[1][t] = V::fma(w1, xv, acc[1][t]);
        acc[2][t] = V::fma(w2, xv, acc[2][t]);
        acc[3][t] = V::fma(w3, xv, acc[3][t]);
      }
    }
    if (vend < end) break;  // the tail of the row
  }
  for (int r = 0; r < 4; r++)
    for (int t = 0; t < NT; t++) {
      float s = V::hsum(acc[r][t]);
      for (int64_t j = k; j < K; j++) s += (scalar_fp8(wp[r][j]) * (srow[r][(j + ocol) / 128] * TWO_120)) * xs[t][j];
      out[r][t] = s;
    }
}
template <int NT>
inline void tile_bf16(const float* const* xs, const uint16_t* const* wp, int64_t K, float (*out)[TB]) {
  typename V::R acc[4][NT];
  for (int r = 0; r < 4; r++)
    for (int t = 0; t < NT; t++) acc[r][t] = V::zero();
  int64_t k = 0;
  for (; k + V::L <= K; k += V::L) {
    if ((k & 31) == 0) prefetch_rows(reinterpret_cast<const void* const*>(wp), 2 * k + 8 * K);
    const typename V::R w0 = V::bf16(wp[0] + k), w1 = V::bf16(wp[1] + k), w2 = V::bf16(wp[2] + k), w3 = V::bf16(wp[3] + k);
    for (int t = 0; t < NT; t++) {
      const typename V::R xv = V::load(xs[t] + k);
      acc[0][t] = V::fma(w0, xv, acc[0][t]);
      acc[1][t] = V::fma(w1, xv, acc[1][t]);
      acc[2][t] = V::fma(w2, xv, acc[2][t]);
      acc[3][t] = V::fma(w3, xv, acc[3][t]);
    }
  }
  for (int r = 0; r < 4; r++)
    for (int t = 0; t < NT; t++) {
      float s = V::hsum(acc[r][t]);
      for (int64_t j = k; j < K; j++) s += scalar_bf16(wp[r][j]) * xs[t][j];
      out[r][t] = s;
    }
}

/** rows [r0, r1) of w against T <= TB tokens, weights decoded in registers; false where it does not apply */
bool linear_fused(const float* x, int64_t ldx, int64_t T, const ds3::WView& w, int64_t r0, int64_t r1, float* y, int64_t ldy, bool bf16) {
  if (T > TB || !(w.dtype == 1 || (w.dtype == 0 && w.scale_ok && w.ocol % V::L == 0))) return false;
  const int64_t K = w.cols;
  const float* xs[TB];
  for (int i = 0; i < TB; i++) xs[i] = x + min64(i, T - 1) * ldx;
  for (int64_t q = r0; q < r1; q += 4) {
    const int64_t n = min64(4, r1 - q);
    float out[4][TB];
    if (w.dtype == 0) {
      const uint8_t* wp[4];
      const float* sr[4];
      for (int j = 0; j < 4; j++) {
        const int64_t r = q + min64(j, n - 1);
        wp[j] = w.data + r * K;
        sr[j] = w.scale + ((r + w.orow) / 128) * w.scols;
      }
      by_tokens(T, [&](auto n_) { tile_fp8<decltype(n_)::value>(xs, wp, sr, w.ocol, K, out); });
    } else {
      const uint16_t* wp[4];
      for (int j = 0; j < 4; j++) wp[j] = reinterpret_cast<const uint16_t*>(w.data) + (q + min64(j, n - 1)) * K;
      by_tokens(T, [&](auto n_) { tile_bf16<decltype(n_)::value>(xs, wp, K, out); });
    }
    for (int64_t t = 0; t < T; t++)
      for (int64_t j = 0; j < n; j++) {
        float v = out[j][t];
        y[t * ldy + q + j] = bf16 ? round_bf16(v) : v;
      }
  }
  return true;
}

void linear(const float* x, int64_t ldx, int64_t T, const ds3::WView& w, int64_t r0, int64_t r1, float* y, int64_t ldy, bool bf16,
            float* scratch) {
  const int64_t K = w.cols;
  if (w.dtype == 3) {  // fp32: no copy
    gemm(x, ldx, T, reinterpret_cast<const float*>(w.data) + r0 * K, K, r1 - r0, K, y + r0, ldy, bf16);
    return;
  }
  if (linear_fused(x, ldx, T, w, r0, r1, y, ldy, bf16)) return;
  const int64_t RB = scratch_rows(T, K);
  for (int64_t b = r0; b < r1; b += RB) {
    const int64_t n = min64(RB, r1 - b);
    decode(w, b, n, scratch);  // a weight tile dequantized once, used by every token of the batch
    gemm(x, ldx, T, scratch, K, n, K, y + b, ldy, bf16);
  }
}

float dot(const float* a, const float* b, int64_t n) {
  typename V::R s0 = V::zero(), s1 = V::zero(), s2 = V::zero(), s3 = V::zero();
  int64_t i = 0;
  for (; i + 4 * V::L <= n; i += 4 * V::L) {
    s0 = V::fma(V::load(a + i), V::load(b + i), s0);
    s1 = V::fma(V::load(a + i + V::L), V::load(b + i + V::L), s1);
    s2 = V::fma(V::load(a + i + 2 * V::L), V::load(b + i + 2 * V::L), s2);
    s3 = V::fma(V::load(a + i + 3 * V::L), V::load(b + i + 3 * V::L), s3);
  }
  for (; i + V::L <= n; i += V::L) s0 = V::fma(V::load(a + i), V::load(b + i), s0);
  float s = (V::hsum(s0) + V::hsum(s1)) + (V::hsum(s2) + V::hsum(s3));
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

void axpy(float a, const float* x, float* y, int64_t n) {
  const typename V::R va = V::set1(a);
  int64_t i = 0;
  for (; i + V::L <= n; i += V::L) V::store(y + i, V::fma(va, V::load(x + i), V::load(y + i)));
  for (; i < n; i++) y[i] += a * x[i];
}

template <int NK>
inline void wsum_k(const float* p, int64_t ldp, const float* rows, int64_t ldr, int64_t n, int64_t C, float* out, int64_t ldo) {
  int64_t c = 0;
  for (; c + V::L <= C; c += V::L) {
    typename V::R acc[NK];
    for (int k = 0; k < NK; k++) acc[k] = V::load(out + k * ldo + c);
    for (int64_t j = 0; j < n; j++) {
      const typename V::R r = V::load(rows + j * ldr + c);
      for (int k = 0; k < NK; k++) acc[k] = V::fma(V::set1(p[k * ldp + j]), r, acc[k]);
    }
    for (int k = 0; k < NK; k++) V::store(out + k * ldo + c, acc[k]);
  }
  for (; c < C; c++)
    for (int k = 0; k < NK; k++) {
      float y = out[k * ldo + c];
      for (int64_t j = 0; j < n; j++) y += p[k * ldp + j] * rows[j * ldr + c];
      out[k * ldo + c] = y;
    }
}

void wsum(const float* p, int64_t ldp, int64_t nh, const float* rows, int64_t ldr, int64_t n, int64_t C, float* out, int64_t ldo) {
  for (int64_t k0 = 0; k0 < nh; k0 += 8) {
    const float* pk = p + k0 * ldp;
    float* ok = out + k0 * ldo;
    switch (min64(8, nh - k0)) {
      case 1: wsum_k<1>(pk, ldp, rows, ldr, n, C, ok, ldo); break;
      case 2: wsum_k<2>(pk, ldp, rows, ldr, n, C, ok, ldo); break;
      case 3: wsum_k<3>(pk, ldp, rows, ldr, n, C, ok, ldo); break;
      case 4: wsum_k<4>(pk, ldp, rows, ldr, n, C, ok, ldo); break;
      case 5: wsum_k<5>(pk, ldp, rows, ldr, n, C, ok, ldo); break;
      case 6: wsum_k<6>(pk, ldp, rows, ldr, n, C, ok, ldo); break;
      case 7: wsum_k<7>(pk, ldp, rows, ldr, n, C, ok, ldo); break;
      default: wsum_k<8>(pk, ldp, rows, ldr, n, C, ok, ldo); break;
    }
  }
}

void axpy_row(float a, const ds3::WView& w, int64_t r, float* y, float* tmp) {
  const int64_t K = w.cols;
  if (!(w.dtype == 0 && w.scale_ok && w.ocol % V::L == 0)) {
    decode(w, r, 1, tmp);
    axpy(a, tmp, y, K);
    return;
  }
  const typename V::R va = V::set1(a);
  const uint8_t* p = w.data + r * K;
  const float* srow = w.scale + ((r + w.orow) / 128) * w.scols;
  int64_t c = 0;
  while (c < K) {
    const int64_t blk = (c + w.ocol) / 128, end = min64(K, (blk + 1) * 128 - w.ocol);
    const float s120 = srow[blk] * TWO_120;
    const typename V::R vs = V::set1(s120);
    for (; c + V::L <= end; c += V::L) V::store(y + c, V::fma(va, V::mul(V::fp8(p + c), vs), V::load(y + c)));
    for (; c < end; c++) y[c] += a * (scalar_fp8(p[c]) * s120);
  }
}

}  // namespace
