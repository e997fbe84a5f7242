// ds3 CUDA backend: embedding, RMSNorm, rope, residual add, SiLU-and-multiply, copies, argmax,
// device-side random weights (benchmarks) and FP8 dequantization.
#include <cmath>

#include "common.cuh"

namespace ds3cu {

static inline int blocks_for(int64_t n, int threads) { return int(std::min<int64_t>((n + threads - 1) / threads, 1 << 20)); }

__global__ void embed_kernel(const WDesc* __restrict__ wd, int64_t vrows, int D, const int* __restrict__ ids, int64_t vocabStart,
                             float* __restrict__ y, int round) {
  const int t = blockIdx.x;
  const WDesc w = *wd;
  const int64_t r = int64_t(ids[t]) - vocabStart;
  const bool ok = r >= 0 && r < vrows;
  for (int d = threadIdx.x; d < D; d += blockDim.x) y[int64_t(t) * D + d] = ok ? maybe_bf16(w_at(w, r, d), round) : 0.f;
}
void launch_embed(cudaStream_t s, const WDesc* table, int, int64_t vrows, int D, const int* ids, int T, int64_t vocabStart, float* y,
                  int round) {
  if (T > 0) embed_kernel<<<T, 256, 0, s>>>(table, vrows, D, ids, vocabStart, y, round);
}

__device__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  const int w = threadIdx.x / WARP, l = threadIdx.x % WARP;
  __syncthreads();
  if (l == 0) red[w] = v;
  __syncthreads();
  const int nw = (blockDim.x + WARP - 1) / WARP;
  float r = 0.f;
  for (int i = 0; i < nw; i++) r += red[i];
  return r;
}

__global__ void rms_norm_kernel(const float* __restrict__ x, int D, const WDesc* __restrict__ wd, float eps, float* __restrict__ y,
                                int round) {
  __shared__ float red[32];  // per warp (<= 1024 / WARP)
  const int t = blockIdx.x;
  const float* xr = x + int64_t(t) * D;
  const WDesc w = *wd;  // issued early: its latency overlaps the sum below
  constexpr int KEEP = 16;  // values kept in registers between the two passes (D <= 16 * blockDim)
  float v[KEEP];
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < KEEP; i++) {
    const int d = threadIdx.x + i * blockDim.x;
    v[i] = d < D ? xr[d] : 0.f;
    ss = fmaf(v[i], v[i], ss);
  }
  for (int d = threadIdx.x + KEEP * blockDim.x; d < D; d += blockDim.x) ss = fmaf(xr[d], xr[d], ss);
  ss = block_sum(ss, red);
  const float inv = 1.0f / sqrtf(ss / float(D) + eps);
#pragma unroll
  for (int i = 0; i < KEEP; i++) {
    const int d = threadIdx.x + i * blockDim.x;
    if (d < D) y[int64_t(t) * D + d] = maybe_bf16(w_at(w, 0, d) * (v[i] * inv), round);
  }
  for (int d = threadIdx.x + KEEP * blockDim.x; d < D; d += blockDim.x)
    y[int64_t(t) * D + d] = maybe_bf16(w_at(w, 0, d) * (xr[d] * inv), round);
}
void launch_rms_norm(cudaStream_t s, const float* x, int T, int D, const WDesc* w, int, float eps, float* y, int round) {
  if (T > 0) rms_norm_kernel<<<T, D >= 2048 ? 512 : 256, 0, s>>>(x, D, w, eps, y, round);
}

__global__ void add_kernel(const float* __restrict__ a, const float* __restrict__ b, int64_t n, float* __restrict__ y, int round) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = maybe_bf16(a[i] + b[i], round);
}
void launch_add(cudaStream_t s, const float* a, const float* b, int64_t n, float* y, int round) {
  if (n > 0) add_kernel<<<blocks_for(n, 256), 256, 0, s>>>(a, b, n, y, round);
}

__global__ void silu_mul_kernel(const float* __restrict__ g, const float* __restrict__ u, int64_t n, float* __restrict__ y,
                                int round) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = maybe_bf16(silu(g[i]) * u[i], round);
}
void launch_silu_mul(cudaStream_t s, const float* g, const float* u, int64_t n, float* y, int round) {
  if (n > 0) silu_mul_kernel<<<blocks_for(n, 256), 256, 0, s>>>(g, u, n, y, round);
}

__global__ void concat_kernel(const float* __restrict__ a, const float* __restrict__ b, int ca, int cb, float* __restrict__ y) {
  const int t = blockIdx.x, C = ca + cb;
  for (int c = threadIdx.x; c < C; c += blockDim.x)
    y[int64_t(t) * C + c] = c < ca ? a[int64_t(t) * ca + c] : b[int64_t(t) * cb + c - ca];
}
void launch_concat(cudaStream_t s, const float* a, const float* b, int T, int ca, int cb, float* y) {
  if (T > 0) concat_kernel<<<T, 256, 0, s>>>(a, b, ca, cb, y);
}

__global__ void slice_kernel(const float* __restrict__ x, int C, int c0, int w, float* __restrict__ y) {
  const int t = blockIdx.x;
  for (int c = threadIdx.x; c < w; c += blockDim.x) y[int64_t(t) * w + c] = x[int64_t(t) * C + c0 + c];
}
void launch_slice(cudaStream_t s, const float* x, int T, int C, int c0, int c1, float* y) {
  if (T > 0 && c1 > c0) slice_kernel<<<T, 256, 0, s>>>(x, C, c0, c1 - c0, y);
}

__global__ void rows_kernel(const float* __restrict__ x, int C, const int* __restrict__ rows, float* __restrict__ y) {
  const int i = blockIdx.x;
  const int64_t r = rows[i];
  for (int c = threadIdx.x; c < C; c += blockDim.x) y[int64_t(i) * C + c] = x[r * C + c];
}
void launch_rows(cudaStream_t s, const float* x, int C, const int* rows, int n, float* y) {
  if (n > 0) rows_kernel<<<n, 256, 0, s>>>(x, C, rows, y);
}

// interleaved pairs (2i, 2i+1) of columns [off, off + rd) of each head, angle = pos * invFreq[i] in fp32,
// cos/sin in double (as the CPU reference) times attnFactor
__global__ void rope_kernel(const float* __restrict__ x, int H, int hd, int off, int rd, const int* __restrict__ pos,
                            const float* __restrict__ inv, float attn, float* __restrict__ y, int round) {
  extern __shared__ float cs[];  // [half] cos, [half] sin
  const int t = blockIdx.x, half = rd / 2, W = H * hd;
  const int cb = blockIdx.y * 2048, ce = min(W, cb + 2048);
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float ang = float(pos[t]) * inv[i];
    double sv, cv;
    sincos(double(ang), &sv, &cv);
    cs[i] = float(cv) * attn;
    cs[half + i] = float(sv) * attn;
  }
  __syncthreads();
  const float* xr = x + int64_t(t) * W;
  float* yr = y + int64_t(t) * W;
  for (int c = cb + threadIdx.x; c < ce; c += blockDim.x) {
    const int h = c / hd, j = c - h * hd - off;
    float v = xr[c];
    if (j >= 0 && j < rd) {
      const int i = j >> 1;
      const float* b = xr + h * hd + off + 2 * i;
      const float a0 = b[0], a1 = b[1];
      v = (j & 1) ? a0 * cs[half + i] + a1 * cs[i] : a0 * cs[i] - a1 * cs[half + i];
    }
    yr[c] = maybe_bf16(v, round);
  }
}
void launch_rope(cudaStream_t s, const float* x, int T, int H, int hd, int off, int rd, const int* pos, const float* inv, float attn,
                 float* y, int round) {
  if (T > 0) rope_kernel<<<dim3(T, (H * hd + 2047) / 2048), 256, size_t(rd) * sizeof(float), s>>>(x, H, hd, off, rd, pos, inv, attn, y, round);
}

__device__ __forceinline__ void argmax_merge(float& bv, int& bi, float v, int i) {
  if (v > bv || (v == bv && i < bi)) bv = v, bi = i;
}
__device__ void block_argmax_to(float best, int idx, float* outv, int* outi) {
  __shared__ float bv[32];
  __shared__ int bi[32];
  for (int o = WARP / 2; o > 0; o >>= 1) argmax_merge(best, idx, shfl_xor(best, o), shfl_xor(idx, o));
  const int w = threadIdx.x / WARP, l = threadIdx.x % WARP;
  if (l == 0) bv[w] = best, bi[w] = idx;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < int(blockDim.x / WARP); i++) argmax_merge(best, idx, bv[i], bi[i]);
    *outv = best;
    *outi = idx;
  }
}
// stage 1: blockIdx.y = chunk of the row; stage 2: one warp (WARP threads) per row over the chunks (ties: lowest index; NaN never wins)
__global__ void argmax_partial_kernel(const float* __restrict__ x, int N, float* pv, int* pi) {
  const int chunks = gridDim.y, c = blockIdx.y;
  const int per = (N + chunks - 1) / chunks, b = c * per, e = min(N, b + per);
  const float* r = x + int64_t(blockIdx.x) * N;
  float best = -INFINITY;
  int idx = 0x7fffffff;
  for (int i = b + threadIdx.x; i < e; i += blockDim.x) argmax_merge(best, idx, r[i], i);
  block_argmax_to(best, idx, pv + blockIdx.x * chunks + c, pi + blockIdx.x * chunks + c);
}
__global__ void argmax_final_kernel(const float* pv, const int* pi, int chunks, int* out) {
  float best = -INFINITY;
  int idx = 0x7fffffff;
  for (int i = threadIdx.x; i < chunks; i += WARP) argmax_merge(best, idx, pv[blockIdx.x * chunks + i], pi[blockIdx.x * chunks + i]);
  for (int o = WARP / 2; o > 0; o >>= 1) argmax_merge(best, idx, shfl_xor(best, o), shfl_xor(idx, o));
  if (threadIdx.x == 0) out[blockIdx.x] = idx == 0x7fffffff ? 0 : idx;
}
__global__ void gather_cols_kernel(const float* __restrict__ g, int ws, int rows, int cols, float* __restrict__ y) {
  const int r = blockIdx.x, W = ws * cols;
  for (int c = threadIdx.x; c < W; c += blockDim.x) {
    const int k = c / cols;
    y[int64_t(r) * W + c] = g[(int64_t(k) * rows + r) * cols + (c - k * cols)];
  }
}
void launch_gather_cols(cudaStream_t s, const float* g, int ws, int rows, int cols, float* y) {
  if (rows > 0 && cols > 0) gather_cols_kernel<<<rows, 256, 0, s>>>(g, ws, rows, cols, y);
}

void launch_argmax(cudaStream_t s, const float* x, int T, int N, int chunks, float* pv, int* pi, int* out) {
  if (T <= 0) return;
  argmax_partial_kernel<<<dim3(T, chunks), 256, 0, s>>>(x, N, pv, pi);
  argmax_final_kernel<<<T, WARP, 0, s>>>(pv, pi, chunks, out);
}

// ---- random weights on the device (benchmarks: nothing large crosses from the host) ------------------------
__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
/** uniform in [-1, 1) */
__device__ __forceinline__ float urand(uint64_t seed, uint64_t i) {
  return float(mix64(seed * 0x100000001b3ull ^ mix64(i)) >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

__global__ void fill_random_kernel(void* out, int dtype, int64_t n, uint64_t seed, float amp) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i * 4 < n; i += int64_t(gridDim.x) * blockDim.x) {
    for (int k = 0; k < 4; k++) {
      const int64_t j = i * 4 + k;
      if (j >= n) break;
      const float u = urand(seed, uint64_t(j));
      if (dtype == W_F8) static_cast<uint8_t*>(out)[j] = to_fp8_bits(u * 448.0f);
      else if (dtype == W_BF16) static_cast<__nv_bfloat16*>(out)[j] = __float2bfloat16_rn(u * amp);
      else if (dtype == W_F16) static_cast<uint16_t*>(out)[j] = f32_to_f16_bits(u * amp);
      else static_cast<float*>(out)[j] = u * amp;
    }
  }
}
void launch_fill_random(cudaStream_t s, void* out, int dtype, int64_t n, uint64_t seed, float amp) {
  if (n > 0) fill_random_kernel<<<blocks_for((n + 3) / 4, 256), 256, 0, s>>>(out, dtype, n, seed, amp);
}

__global__ void fill_const_kernel(float* out, int64_t n, float v) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) out[i] = v;
}
void launch_fill_const(cudaStream_t s, float* out, int64_t n, float v) {
  if (n > 0) fill_const_kernel<<<blocks_for(n, 256), 256, 0, s>>>(out, n, v);
}

__global__ void fill_cache_random_kernel(void* cache, int bf16, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float u = urand(seed, uint64_t(i));
    if (bf16) static_cast<__nv_bfloat16*>(cache)[i] = __float2bfloat16_rn(u);
    else static_cast<float*>(cache)[i] = u;
  }
}
void launch_fill_cache_random(cudaStream_t s, void* cache, int bf16, int64_t n, uint64_t seed) {
  if (n > 0) fill_cache_random_kernel<<<blocks_for(n, 256), 256, 0, s>>>(cache, bf16, n, seed);
}

// e4m3fnuz (bias 8) holds every e4m3fn value halved, with the same byte: the scales double; 0x80 (-0 in OCP) is
// NaN in fnuz and becomes +0. (OCP NaN bytes 0x7f/0xff would turn into +-240: checkpoints hold none.)
__global__ void fp8_to_fnuz_kernel(uint8_t* __restrict__ w, int64_t n, float* __restrict__ scale, int64_t ns) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    if (w[i] == 0x80) w[i] = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < ns; i += int64_t(gridDim.x) * blockDim.x) scale[i] *= 2.0f;
}
void launch_fp8_to_fnuz(cudaStream_t s, uint8_t* w, int64_t n, float* scale, int64_t nscale) {
  if (n > 0) fp8_to_fnuz_kernel<<<blocks_for(n, 256), 256, 0, s>>>(w, n, scale, nscale);
}

__global__ void dequant_kernel(const uint8_t* __restrict__ w, const float* __restrict__ scale, int64_t rows, int64_t cols, int sc,
                               int o0, int o1, float* __restrict__ out) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols;
    out[i] = fp8_to_f32(w[i]) * scale[((r + o0) >> 7) * sc + ((c + o1) >> 7)];
  }
}
void launch_dequant_f32(cudaStream_t s, const uint8_t* w, const float* scale, int64_t rows, int64_t cols, int sc, int o0, int o1,
                        float* out) {
  if (rows * cols > 0) dequant_kernel<<<blocks_for(rows * cols, 256), 256, 0, s>>>(w, scale, rows, cols, sc, o0, o1, out);
}

}  // namespace ds3cu
