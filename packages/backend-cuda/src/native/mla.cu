// ds3 CUDA backend: Multi-head Latent Attention in the absorbed form over the paged latent cache.
//  1. cache_write: each token's [kv (normed latent), pe (roped)] into its slot of `layer`.
//  2. absorb: qa[t, h] = q_nope[t, h] @ wkv_b[h, :nope]   ([T, H, C]).
//  3. attn: one block per (token, group of heads, split of the context); a 32-position tile of the
//     latent cache is staged in shared memory once and used by all heads of the group; online softmax.
//     Splits (flash-decoding) keep the GPU busy when there are few tokens; a combine kernel merges them.
//  4. (addon) the value projection out[t, h] = o_lat[t, h] @ wkv_b[h, nope:]^T runs on the GEMV/SIMT kernels.
#include <cfloat>
#include <stdexcept>

#include "common.cuh"

namespace ds3cu {

__global__ void cache_write_kernel(const float* __restrict__ kv, const float* __restrict__ pe, int C, int R, void* cache, int bf16,
                                   int64_t layerOff, CacheMeta m) {
  const int t = blockIdx.x, W = C + R;
  const int p = m.pos[t];
  const int64_t slot = int64_t(m.bt[int64_t(m.seq[t]) * m.maxBlocks + p / m.bs]) * m.bs + p % m.bs;
  const int64_t o = layerOff + slot * W;
  for (int i = threadIdx.x; i < W; i += blockDim.x) {
    const float v = i < C ? kv[int64_t(t) * C + i] : pe[int64_t(t) * R + i - C];
    if (bf16) static_cast<__nv_bfloat16*>(cache)[o + i] = __float2bfloat16_rn(v);
    else static_cast<float*>(cache)[o + i] = v;
  }
}
void launch_cache_write(cudaStream_t s, const float* kv, const float* pe, int T, int C, int R, void* cache, int bf16,
                        int64_t layerOff, const CacheMeta& m) {
  if (T > 0) cache_write_kernel<<<T, 256, 0, s>>>(kv, pe, C, R, cache, bf16, layerOff, m);
}

constexpr int ABS_TT = 8;
template <int WT>
__global__ void __launch_bounds__(256) mla_absorb_kernel(const float* __restrict__ q, int T, int H, int QW, int nope,
                                                         const WDesc* __restrict__ wd, int HD, int C, float* __restrict__ qa) {
  extern __shared__ float qsm[];  // [ABS_TT][nope]
  const int h = blockIdx.x, t0 = blockIdx.y * ABS_TT;
  const int nt = min(ABS_TT, T - t0);
  for (int i = threadIdx.x; i < ABS_TT * nope; i += blockDim.x) {
    const int tt = i / nope, k = i - tt * nope;
    qsm[i] = tt < nt ? q[int64_t(t0 + tt) * H * QW + int64_t(h) * QW + k] : 0.f;
  }
  __syncthreads();
  const WDesc w = *wd;
  for (int c0 = 0; c0 < C; c0 += 512) {
    const int ca = c0 + threadIdx.x, cb = ca + 256;
    float acc[ABS_TT][2];
#pragma unroll
    for (int tt = 0; tt < ABS_TT; tt++) acc[tt][0] = acc[tt][1] = 0.f;
    for (int i0 = 0; i0 < nope; i0 += 8) {
      float wa[8], wb[8];  // eight rows' loads in flight before the first use
#pragma unroll
      for (int u = 0; u < 8; u++) {
        const int64_t row = int64_t(h) * HD + i0 + u;
        const bool ok = i0 + u < nope;
        wa[u] = ok && ca < C ? w_at_t<WT>(w, row, ca) : 0.f;
        wb[u] = ok && cb < C ? w_at_t<WT>(w, row, cb) : 0.f;
      }
#pragma unroll
      for (int u = 0; u < 8; u++) {
        if (i0 + u >= nope) break;
#pragma unroll
        for (int tt = 0; tt < ABS_TT; tt++) {
          const float qv = qsm[tt * nope + i0 + u];
          acc[tt][0] = fmaf(qv, wa[u], acc[tt][0]);
          acc[tt][1] = fmaf(qv, wb[u], acc[tt][1]);
        }
      }
    }
#pragma unroll
    for (int tt = 0; tt < ABS_TT; tt++) {
      if (tt >= nt) break;
      float* o = qa + (int64_t(t0 + tt) * H + h) * C;
      if (ca < C) o[ca] = acc[tt][0];
      if (cb < C) o[cb] = acc[tt][1];
    }
  }
}
// Vectorized absorb: thread = (8-channel chunk, row group); rows i = rg, rg + nRG, ...; 8 tokens per block;
// row groups reduced through shared memory. Needs C / 8 to divide 256.
constexpr int ABV_TT = 8;
constexpr int kAbsorbSmem = kMaxSmemBytes < 160u * 1024 ? int(kMaxSmemBytes) : 160 * 1024;  // 160 KB on CUDA, 64 KB on AMD
template <int WT>
__global__ void __launch_bounds__(256) mla_absorb_vec_kernel(const float* __restrict__ q, int T, int H, int QW, int nope,
                                                             const WDesc* __restrict__ wd, int HD, int C, float* __restrict__ qa) {
  extern __shared__ float sm[];
  float* qsm = sm;                  // [ABV_TT][nope]
  float* red = sm + ABV_TT * nope;  // [nRG][ABV_TT][C]
  const int h = blockIdx.x, t0 = blockIdx.y * ABV_TT;
  const int nt = min(ABV_TT, T - t0);
  for (int i = threadIdx.x; i < ABV_TT * nope; i += blockDim.x) {
    const int tt = i / nope, k = i - tt * nope;
    qsm[i] = tt < nt ? q[int64_t(t0 + tt) * H * QW + int64_t(h) * QW + k] : 0.f;
  }
  __syncthreads();
  const WDesc w = *wd;
  const int cpr = C / 8, nRG = 256 / cpr;
  const int cc = threadIdx.x % cpr, rg = threadIdx.x / cpr;
  const int c0 = cc * 8;
  float acc[ABV_TT][8];
#pragma unroll
  for (int tt = 0; tt < ABV_TT; tt++)
#pragma unroll
    for (int e = 0; e < 8; e++) acc[tt][e] = 0.f;
#pragma unroll 4
  for (int i = rg; i < nope; i += nRG) {
    const int64_t row = int64_t(h) * HD + i;
    float wv[8];
    if constexpr (WT == W_F8) {
      const uint2 raw = *reinterpret_cast<const uint2*>(static_cast<const uint8_t*>(w.data) + row * w.cols + c0);
      const float sc = w.scale[((row + w.o0) >> 7) * w.sc + (c0 >> 7)];
      const uint32_t u[2] = {raw.x, raw.y};
#pragma unroll
      for (int k = 0; k < 2; k++) {
        const float2 a = fp8x2_to_f32x2(uint16_t(u[k] & 0xffff)), b = fp8x2_to_f32x2(uint16_t(u[k] >> 16));
        wv[4 * k] = a.x * sc;
        wv[4 * k + 1] = a.y * sc;
        wv[4 * k + 2] = b.x * sc;
        wv[4 * k + 3] = b.y * sc;
      }
    } else {
#pragma unroll
      for (int e = 0; e < 8; e++) wv[e] = w_at_t<WT>(w, row, c0 + e);
    }
#pragma unroll
    for (int tt = 0; tt < ABV_TT; tt++) {
      const float qv = qsm[tt * nope + i];
#pragma unroll
      for (int e = 0; e < 8; e++) acc[tt][e] = fmaf(qv, wv[e], acc[tt][e]);
    }
  }
#pragma unroll
  for (int tt = 0; tt < ABV_TT; tt++)
#pragma unroll
    for (int e = 0; e < 8; e++) red[(rg * ABV_TT + tt) * C + c0 + e] = acc[tt][e];
  __syncthreads();
  for (int i = threadIdx.x; i < nt * C; i += blockDim.x) {
    const int tt = i / C, c = i - tt * C;
    float v = 0.f;
    for (int r = 0; r < nRG; r++) v += red[(r * ABV_TT + tt) * C + c];
    qa[(int64_t(t0 + tt) * H + h) * C + c] = v;
  }
}

// One token, FP8 wkv_b (decode at batch 1): a block per head, thread = (16-channel chunk, row group), every
// row of the thread's group loaded (16 bytes each) before the first use: 16 loads in flight per thread
// instead of 4 of 8 bytes. Needs C % 16 == 0, C / 16 dividing 256 and nope a multiple of 256 / (C / 16).
template <int RPT>
__global__ void __launch_bounds__(256) mla_absorb1_f8_kernel(const float* __restrict__ q, int H, int QW, int nope,
                                                            const WDesc* __restrict__ wd, int HD, int C, float* __restrict__ qa) {
  extern __shared__ float sm[];
  float* qsm = sm;         // [nope]
  float* red = sm + nope;  // [nRG][C]
  const int h = blockIdx.x;
  for (int i = threadIdx.x; i < nope; i += blockDim.x) qsm[i] = q[int64_t(h) * QW + i];
  const WDesc w = *wd;
  const int cpr = C / 16, nRG = 256 / cpr;
  const int cc = threadIdx.x % cpr, rg = threadIdx.x / cpr;
  const int c0 = cc * 16;
  uint4 raw[RPT];
  float sc[RPT];
#pragma unroll
  for (int u = 0; u < RPT; u++) {
    const int i = rg + u * nRG;
    const int64_t row = int64_t(h) * HD + i;
    if (i < nope) {
      raw[u] = ld_stream16(static_cast<const uint8_t*>(w.data) + row * w.cols + c0);
      sc[u] = w.scale[((row + w.o0) >> 7) * w.sc + (c0 >> 7)];
    } else {
      raw[u] = make_uint4(0, 0, 0, 0);
      sc[u] = 0.f;
    }
  }
  __syncthreads();
  float acc[16];
#pragma unroll
  for (int e = 0; e < 16; e++) acc[e] = 0.f;
#pragma unroll
  for (int u = 0; u < RPT; u++) {
    const int i = rg + u * nRG;
    if (i >= nope) break;
    const float qv = qsm[i];
    const uint32_t v[4] = {raw[u].x, raw[u].y, raw[u].z, raw[u].w};
#pragma unroll
    for (int k = 0; k < 4; k++) {
      const float2 a = fp8x2_to_f32x2(uint16_t(v[k] & 0xffff)), b = fp8x2_to_f32x2(uint16_t(v[k] >> 16));
      acc[4 * k] = fmaf(qv, a.x * sc[u], acc[4 * k]);
      acc[4 * k + 1] = fmaf(qv, a.y * sc[u], acc[4 * k + 1]);
      acc[4 * k + 2] = fmaf(qv, b.x * sc[u], acc[4 * k + 2]);
      acc[4 * k + 3] = fmaf(qv, b.y * sc[u], acc[4 * k + 3]);
    }
  }
#pragma unroll
  for (int e = 0; e < 16; e++) red[rg * C + c0 + e] = acc[e];
  __syncthreads();
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float v = 0.f;
    for (int r = 0; r < nRG; r++) v += red[r * C + c];
    qa[int64_t(h) * C + c] = v;
  }
}

void launch_mla_absorb(cudaStream_t s, const float* q, int T, int H, int QW, int nope, const WDesc* w, int wtype, int HD, int C,
                       float* qa) {
  if (T <= 0) return;
  if (T == 1 && wtype == W_F8 && C % 16 == 0 && C / 16 <= 256 && 256 % (C / 16) == 0) {
    const int nRG = 256 / (C / 16);
    const int rpt = (nope + nRG - 1) / nRG;
    const size_t sm = sizeof(float) * (size_t(nope) + size_t(nRG) * C);
    if (sm <= 48 * 1024 && rpt <= 32) {
      if (rpt <= 16) mla_absorb1_f8_kernel<16><<<H, 256, sm, s>>>(q, H, QW, nope, w, HD, C, qa);
      else mla_absorb1_f8_kernel<32><<<H, 256, sm, s>>>(q, H, QW, nope, w, HD, C, qa);
      return;
    }
  }
  if (C % 8 == 0 && C / 8 <= 256 && 256 % (C / 8) == 0) {
    dim3 grid(H, (T + ABV_TT - 1) / ABV_TT);
    const size_t sm = sizeof(float) * (size_t(ABV_TT) * nope + size_t(256 / (C / 8)) * ABV_TT * C);
    static thread_local int configuredDev = -1;
    int dev = 0;
    cudaGetDevice(&dev);
    if (configuredDev != dev) {
      cudaFuncSetAttribute(mla_absorb_vec_kernel<W_F8>, cudaFuncAttributeMaxDynamicSharedMemorySize, kAbsorbSmem);
      cudaFuncSetAttribute(mla_absorb_vec_kernel<W_BF16>, cudaFuncAttributeMaxDynamicSharedMemorySize, kAbsorbSmem);
      cudaFuncSetAttribute(mla_absorb_vec_kernel<W_F16>, cudaFuncAttributeMaxDynamicSharedMemorySize, kAbsorbSmem);
      cudaFuncSetAttribute(mla_absorb_vec_kernel<W_F32>, cudaFuncAttributeMaxDynamicSharedMemorySize, kAbsorbSmem);
      configuredDev = dev;
    }
    if (sm <= kAbsorbSmem) {
      switch (wtype) {
        case W_F8: mla_absorb_vec_kernel<W_F8><<<grid, 256, sm, s>>>(q, T, H, QW, nope, w, HD, C, qa); return;
        case W_BF16: mla_absorb_vec_kernel<W_BF16><<<grid, 256, sm, s>>>(q, T, H, QW, nope, w, HD, C, qa); return;
        case W_F16: mla_absorb_vec_kernel<W_F16><<<grid, 256, sm, s>>>(q, T, H, QW, nope, w, HD, C, qa); return;
        default: mla_absorb_vec_kernel<W_F32><<<grid, 256, sm, s>>>(q, T, H, QW, nope, w, HD, C, qa); return;
      }
    }
  }
  dim3 grid(H, (T + ABS_TT - 1) / ABS_TT);
  const size_t sm = size_t(ABS_TT) * nope * sizeof(float);
  switch (wtype) {
    case W_F8: mla_absorb_kernel<W_F8><<<grid, 256, sm, s>>>(q, T, H, QW, nope, w, HD, C, qa); break;
    case W_BF16: mla_absorb_kernel<W_BF16><<<grid, 256, sm, s>>>(q, T, H, QW, nope, w, HD, C, qa); break;
    case W_F16: mla_absorb_kernel<W_F16><<<grid, 256, sm, s>>>(q, T, H, QW, nope, w, HD, C, qa); break;
    default: mla_absorb_kernel<W_F32><<<grid, 256, sm, s>>>(q, T, H, QW, nope, w, HD, C, qa); break;
  }
}

// cache positions per tile: 32 where shared memory is large (Hopper); 16 on AMD (64 KB of LDS: the tile of
// 32 fp32 positions x 577 alone is 74 KB), where heads per block are limited by mla_attn_max_heads
constexpr int AJ = kMaxSmemBytes >= 100u * 1024 ? 32 : 16;
constexpr int AHG = 16;     // most heads per block
constexpr int ATHR = 256;   // threads; each owns channels tid and tid + 256 (C <= 512)
// lanes = (head slot, position): a warp scores HPW heads at once (1 on CUDA; 4 on AMD: 64 lanes, 16 positions)
constexpr int ANW = ATHR / WARP;                  // warps per block
constexpr int HPW = WARP / AJ;                    // heads per warp and pass
constexpr int HPP = ANW * HPW;                    // heads per pass
constexpr int AHH = (AHG + HPP - 1) / HPP;        // passes (2 on CUDA, 1 on AMD)
static_assert(AJ <= WARP && WARP % AJ == 0 && AJ % 4 == 0 && (AJ & (AJ - 1)) == 0, "attention tile vs warp width");

static size_t attn_smem(int hg, int W) { return sizeof(float) * (size_t(hg) * W + size_t(AJ) * (W + 1) + size_t(hg) * AJ + 3 * hg); }
int mla_attn_max_heads(int C, int R) {
#if defined(DS3_HAVE_MMA)
  return AHG;  // CUDA: 16 fit (attention shared memory is raised to what the group needs)
#else
  int hg = AHG;
  while (hg > 1 && attn_smem(hg, C + R) > kMaxSmemBytes) hg--;
  return hg;
#endif
}

__global__ void __launch_bounds__(ATHR) mla_attn_kernel(const AttnArgs a) {
  extern __shared__ __align__(16) float sm[];
  const int C = a.C, W = a.C + a.R, WP = W + 1, hg = a.hg, H = a.H;
  float* qs = sm;               // [hg][W]
  float* kvs = qs + hg * W;     // [AJ][WP]
  float* ps = kvs + AJ * WP;    // [hg][AJ]
  float* al = ps + hg * AJ;     // [hg]
  float* ls = al + hg;          // [hg]
  float* ms = ls + hg;          // [hg]
  const int t = blockIdx.x, h0 = blockIdx.y * hg, split = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> WARP_LOG2, lane = tid & (WARP - 1);
  const int jl = lane & (AJ - 1), hs = lane / AJ;  // position in the tile, head slot of this lane (AJ: a power of 2)
  const int P = a.m.pos[t] + 1;
  const int jb = split * a.splitLen, je = min(P, jb + a.splitLen);
  const int seq = a.m.seq[t];
  for (int i = tid; i < hg * W; i += ATHR) {
    const int h = i / W, k = i - h * W;
    qs[i] = k < C ? a.qa[(int64_t(t) * H + h0 + h) * C + k] : a.q[int64_t(t) * H * a.QW + int64_t(h0 + h) * a.QW + a.nope + (k - C)];
  }
  float m_run[AHH], l_run[AHH];
#pragma unroll
  for (int hh = 0; hh < AHH; hh++) m_run[hh] = -INFINITY, l_run[hh] = 0.f;
  float o[AHG][2];
#pragma unroll
  for (int h = 0; h < AHG; h++) o[h][0] = o[h][1] = 0.f;

  for (int j0 = jb; j0 < je; j0 += AJ) {
    __syncthreads();
    for (int jj = warp; jj < AJ; jj += ANW) {
      const int j = j0 + jj;
      float* dst = kvs + jj * WP;
      if (j < je) {
        const int64_t slot = int64_t(a.m.bt[int64_t(seq) * a.m.maxBlocks + j / a.m.bs]) * a.m.bs + j % a.m.bs;
        const int64_t o0 = a.layerOff + slot * W;
        if (a.cbf16) {
          const __nv_bfloat16* src = static_cast<const __nv_bfloat16*>(a.cache) + o0;
          for (int k = lane; k < W; k += WARP) dst[k] = __bfloat162float(src[k]);
        } else {
          const float* src = static_cast<const float*>(a.cache) + o0;
          for (int k = lane; k < W; k += WARP) dst[k] = src[k];
        }
      } else {
        for (int k = lane; k < W; k += WARP) dst[k] = 0.f;
      }
    }
    __syncthreads();
#pragma unroll
    for (int hh = 0; hh < AHH; hh++) {
      const int h = warp * HPW + hs + hh * HPP;
      const bool hv = h < hg;
      // with one head per warp the branch is warp-uniform; with several, every lane runs the warp reductions
      if (HPW > 1 || hv) {
        const float* qh = qs + (hv ? h : 0) * W;
        const float* kr = kvs + jl * WP;
        float s0 = 0.f, s1 = 0.f;
        for (int k = 0; k < W; k += 4) {
          const float4 q4 = *reinterpret_cast<const float4*>(qh + k);
          s0 = fmaf(q4.x, kr[k], s0);
          s1 = fmaf(q4.y, kr[k + 1], s1);
          s0 = fmaf(q4.z, kr[k + 2], s0);
          s1 = fmaf(q4.w, kr[k + 3], s1);
        }
        const bool valid = hv && j0 + jl < je;
        const float sc = valid ? (s0 + s1) * a.scale : -INFINITY;
        const float mn = fmaxf(m_run[hh], warp_max<AJ>(sc));
        const float alpha = expf(m_run[hh] - mn);
        const float pj = valid ? expf(sc - mn) : 0.f;
        l_run[hh] = l_run[hh] * alpha + warp_sum<AJ>(pj);
        m_run[hh] = mn;
        if (hv) {
          ps[h * AJ + jl] = pj;
          if (jl == 0) al[h] = alpha;
        }
      }
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < 2; r++) {
      const int c = tid + r * ATHR;
      if (c >= C) continue;
#pragma unroll
      for (int h = 0; h < AHG; h++)
        if (h < hg) o[h][r] *= al[h];
      for (int jj = 0; jj < AJ; jj += 4) {
        const float k0 = kvs[jj * WP + c], k1 = kvs[(jj + 1) * WP + c], k2 = kvs[(jj + 2) * WP + c], k3 = kvs[(jj + 3) * WP + c];
#pragma unroll
        for (int h = 0; h < AHG; h++) {
          if (h < hg) {
            const float4 p4 = *reinterpret_cast<const float4*>(ps + h * AJ + jj);
            o[h][r] = fmaf(p4.x, k0, fmaf(p4.y, k1, fmaf(p4.z, k2, fmaf(p4.w, k3, o[h][r]))));
          }
        }
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int hh = 0; hh < AHH; hh++) {
    const int h = warp * HPW + hs + hh * HPP;
    if (h < hg && jl == 0) {
      ls[h] = l_run[hh];
      ms[h] = m_run[hh];
    }
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < 2; r++) {
    const int c = tid + r * ATHR;
    if (c >= C) continue;
#pragma unroll
    for (int h = 0; h < AHG; h++) {
      if (h >= hg) break;
      const int64_t th = int64_t(t) * H + h0 + h;
      if (a.nsplit == 1) {
        a.out[th * C + c] = o[h][r] / ls[h];
      } else {
        a.part_o[(th * a.nsplit + split) * C + c] = o[h][r];
        if (c == 0) {
          a.part_ml[(th * a.nsplit + split) * 2] = ms[h];
          a.part_ml[(th * a.nsplit + split) * 2 + 1] = ls[h];
        }
      }
    }
  }
}

__global__ void mla_combine_kernel(const float* __restrict__ part_o, const float* __restrict__ part_ml, int nsplit, int C,
                                   float* __restrict__ out) {
  const int64_t th = blockIdx.x;
  const float* ml = part_ml + th * nsplit * 2;
  float M = -INFINITY;
  for (int s = 0; s < nsplit; s++)
    if (ml[2 * s + 1] > 0.f) M = fmaxf(M, ml[2 * s]);
  float L = 0.f;
  for (int s = 0; s < nsplit; s++)
    if (ml[2 * s + 1] > 0.f) L += ml[2 * s + 1] * expf(ml[2 * s] - M);
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float v = 0.f;
    for (int s = 0; s < nsplit; s++)
      if (ml[2 * s + 1] > 0.f) v += part_o[(th * nsplit + s) * C + c] * expf(ml[2 * s] - M);
    out[th * C + c] = v / L;
  }
}

void launch_mla_attn(cudaStream_t s, const AttnArgs& a) {
  if (a.T <= 0) return;
  const size_t sm = attn_smem(a.hg, a.C + a.R);
  static thread_local size_t configured = 0;
  static thread_local int configuredDev = -1;
  int dev = 0;
  cudaGetDevice(&dev);
  if (sm > 48 * 1024 && (configuredDev != dev || sm > configured)) {
    cudaFuncSetAttribute(mla_attn_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(sm));
    configured = sm;
    configuredDev = dev;
  }
  dim3 grid(a.T, a.H / a.hg, a.nsplit);
  mla_attn_kernel<<<grid, ATHR, sm, s>>>(a);
  if (a.nsplit > 1) mla_combine_kernel<<<a.T * a.H, 256, 0, s>>>(a.part_o, a.part_ml, a.nsplit, a.C, a.out);
}

// ---- tensor-core attention (bf16 latent cache, the fast modes) -----------------------------------------------
#if defined(DS3_HAVE_MMA)
// One block per (token, group of <= 16 heads, split): the 16 query rows (heads) in bf16 against
// 64-position tiles of the cache staged by cp.async; S = Q K^T and O += P V on mma.sync m16n8k16
// (fp32 accumulators), online softmax in fp32 between them. 8 warps: warp w owns positions
// [8w, 8w + 8) of S and channels [w C/8, (w + 1) C/8) of O.
constexpr int TJ = 64;
__device__ __forceinline__ void mma_bf16_16816(float* d, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void cp_async16z(void* smem, const void* gmem, bool valid) {
  const unsigned sa = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sa), "l"(gmem), "r"(valid ? 16 : 0));
}
static size_t attn_tc_smem(int W) {
  const size_t ld = size_t(W) + 8;
  return (16 + TJ) * ld * 2 + 16 * TJ * 4 + 16 * (TJ + 8) * 2 + 3 * 16 * 4;
}

__global__ void __launch_bounds__(256) mla_attn_tc_kernel(const AttnArgs a) {
  extern __shared__ __align__(16) uint8_t smb[];
  const int C = a.C, W = a.C + a.R, LD = W + 8, hg = a.hg, H = a.H;
  __nv_bfloat16* Qs = reinterpret_cast<__nv_bfloat16*>(smb);  // [16][LD]
  __nv_bfloat16* Ks = Qs + 16 * LD;                            // [TJ][LD]
  float* Ss = reinterpret_cast<float*>(Ks + TJ * LD);          // [16][TJ]
  __nv_bfloat16* Ps = reinterpret_cast<__nv_bfloat16*>(Ss + 16 * TJ);  // [16][TJ + 8]
  float* al = reinterpret_cast<float*>(Ps + 16 * (TJ + 8));   // [16]
  float* Ls = al + 16;
  float* Ms = Ls + 16;
  const int t = blockIdx.x, h0 = blockIdx.y * hg, split = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  const int P = a.m.pos[t] + 1;
  const int jb = split * a.splitLen, je = min(P, jb + a.splitLen);
  const int seq = a.m.seq[t];
  for (int i = tid; i < 16 * W; i += 256) {
    const int r = i / W, k = i - r * W;
    float v = 0.f;
    if (r < hg)
      v = k < C ? a.qa[(int64_t(t) * H + h0 + r) * C + k] : a.q[int64_t(t) * H * a.QW + int64_t(h0 + r) * a.QW + a.nope + (k - C)];
    Qs[r * LD + k] = __float2bfloat16_rn(v);
  }
  const int NT = C / 64;  // O n-tiles (8 channels) per warp
  float o[8][4];
#pragma unroll
  for (int i = 0; i < 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  const int chunks = W / 8;  // 16-byte chunks per cache row
  const __nv_bfloat16* cache = static_cast<const __nv_bfloat16*>(a.cache) + a.layerOff;

  for (int j0 = jb; j0 < je; j0 += TJ) {
    for (int i = tid; i < TJ * chunks; i += 256) {
      const int jj = i / chunks, cc = i - jj * chunks;
      const int j = j0 + jj;
      const bool v = j < je;
      const __nv_bfloat16* src = cache;
      if (v) src = cache + (int64_t(a.m.bt[int64_t(seq) * a.m.maxBlocks + j / a.m.bs]) * a.m.bs + j % a.m.bs) * W + cc * 8;
      cp_async16z(Ks + jj * LD + cc * 8, src, v);
    }
    asm volatile("cp.async.commit_group;\n" ::);
    asm volatile("cp.async.wait_group 0;\n" ::);
    __syncthreads();
    // S = Q K^T for positions [8 warp, 8 warp + 8)
    {
      float s[4] = {0.f, 0.f, 0.f, 0.f};
      const __nv_bfloat16* kr = Ks + (warp * 8 + g) * LD;
      for (int ks = 0; ks < W / 16; ks++) {
        const int k = ks * 16 + tq * 2;
        uint32_t af[4], bf[2];
        af[0] = *reinterpret_cast<const uint32_t*>(Qs + g * LD + k);
        af[1] = *reinterpret_cast<const uint32_t*>(Qs + (g + 8) * LD + k);
        af[2] = *reinterpret_cast<const uint32_t*>(Qs + g * LD + k + 8);
        af[3] = *reinterpret_cast<const uint32_t*>(Qs + (g + 8) * LD + k + 8);
        bf[0] = *reinterpret_cast<const uint32_t*>(kr + k);
        bf[1] = *reinterpret_cast<const uint32_t*>(kr + k + 8);
        mma_bf16_16816(s, af, bf);
      }
      const int c0 = warp * 8 + tq * 2;
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int r = g + (e >> 1) * 8, c = c0 + (e & 1);
        Ss[r * TJ + c] = j0 + c < je ? s[e] * a.scale : -INFINITY;
      }
    }
    __syncthreads();
    // online softmax: warp w owns rows 2w, 2w + 1
#pragma unroll
    for (int rr = 0; rr < 2; rr++) {
      const int r = warp * 2 + rr;
      const float v0 = Ss[r * TJ + lane], v1 = Ss[r * TJ + lane + 32];
      const float mn = fmaxf(m_run[rr], warp_max(fmaxf(v0, v1)));
      const float alpha = expf(m_run[rr] - mn);
      const float p0 = v0 == -INFINITY ? 0.f : expf(v0 - mn);
      const float p1 = v1 == -INFINITY ? 0.f : expf(v1 - mn);
      l_run[rr] = l_run[rr] * alpha + warp_sum(p0 + p1);
      m_run[rr] = mn;
      Ps[r * (TJ + 8) + lane] = __float2bfloat16_rn(p0);
      Ps[r * (TJ + 8) + lane + 32] = __float2bfloat16_rn(p1);
      if (lane == 0) al[r] = alpha;
    }
    __syncthreads();
    // O = O * alpha + P V for channels [warp C/8, (warp + 1) C/8)
    {
      const float a0 = al[g], a1 = al[g + 8];
#pragma unroll
      for (int nt = 0; nt < 8; nt++) {
        if (nt >= NT) break;
        o[nt][0] *= a0;
        o[nt][1] *= a0;
        o[nt][2] *= a1;
        o[nt][3] *= a1;
      }
#pragma unroll
      for (int ks = 0; ks < TJ / 16; ks++) {
        const int k = ks * 16 + tq * 2;
        uint32_t af[4];
        af[0] = *reinterpret_cast<const uint32_t*>(Ps + g * (TJ + 8) + k);
        af[1] = *reinterpret_cast<const uint32_t*>(Ps + (g + 8) * (TJ + 8) + k);
        af[2] = *reinterpret_cast<const uint32_t*>(Ps + g * (TJ + 8) + k + 8);
        af[3] = *reinterpret_cast<const uint32_t*>(Ps + (g + 8) * (TJ + 8) + k + 8);
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
          if (nt >= NT) break;
          const int n = warp * (C / 8) + nt * 8 + g;
          const uint16_t* kv = reinterpret_cast<const uint16_t*>(Ks);
          uint32_t bf[2];
          bf[0] = uint32_t(kv[k * LD + n]) | (uint32_t(kv[(k + 1) * LD + n]) << 16);
          bf[1] = uint32_t(kv[(k + 8) * LD + n]) | (uint32_t(kv[(k + 9) * LD + n]) << 16);
          mma_bf16_16816(o[nt], af, bf);
        }
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int rr = 0; rr < 2; rr++)
    if (lane == 0) {
      Ls[warp * 2 + rr] = l_run[rr];
      Ms[warp * 2 + rr] = m_run[rr];
    }
  __syncthreads();
#pragma unroll
  for (int nt = 0; nt < 8; nt++) {
    if (nt >= NT) break;
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const int r = g + (e >> 1) * 8;
      if (r >= hg) continue;
      const int c = warp * (C / 8) + nt * 8 + tq * 2 + (e & 1);
      const int64_t th = int64_t(t) * H + h0 + r;
      if (a.nsplit == 1) {
        a.out[th * C + c] = o[nt][e] / Ls[r];
      } else {
        a.part_o[(th * a.nsplit + split) * C + c] = o[nt][e];
        if (c == 0) {
          a.part_ml[(th * a.nsplit + split) * 2] = Ms[r];
          a.part_ml[(th * a.nsplit + split) * 2 + 1] = Ls[r];
        }
      }
    }
  }
}

bool mla_attn_tc_ok(int C, int R, int hg, int cbf16) { return cbf16 && C % 64 == 0 && C <= 512 && (C + R) % 16 == 0 && hg <= 16; }

void launch_mla_attn_tc(cudaStream_t s, const AttnArgs& a) {
  if (a.T <= 0) return;
  const size_t sm = attn_tc_smem(a.C + a.R);
  static thread_local size_t configured = 0;
  static thread_local int configuredDev = -1;
  int dev = 0;
  cudaGetDevice(&dev);
  if (sm > 48 * 1024 && (configuredDev != dev || sm > configured)) {
    cudaFuncSetAttribute(mla_attn_tc_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(sm));
    configured = sm;
    configuredDev = dev;
  }
  dim3 grid(a.T, a.H / a.hg, a.nsplit);
  mla_attn_tc_kernel<<<grid, 256, sm, s>>>(a);
  if (a.nsplit > 1) mla_combine_kernel<<<a.T * a.H, 256, 0, s>>>(a.part_o, a.part_ml, a.nsplit, a.C, a.out);
}

#else
// AMD (and the emulator): the SIMT attention runs for every cache (the addon reports compute capability 0)
bool mla_attn_tc_ok(int, int, int, int) { return false; }
void launch_mla_attn_tc(cudaStream_t, const AttnArgs&) {
  throw std::runtime_error("the tensor-core attention is built only for CUDA (on ROCm the SIMT attention runs)");
}
#endif

}  // namespace ds3cu
