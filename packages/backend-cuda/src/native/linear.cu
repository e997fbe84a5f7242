// ds3 CUDA backend: linear layers y = x @ W^T.
//  - gemv_kernel: few rows (decode). Bandwidth-bound: each warp streams two weight rows with
//    16-byte loads (L1 no-allocate) and dots them with up to 8 activation rows at a time; fp32 math.
//    Grouped form for MoE: blockIdx.y = active expert, its routed tokens gathered by index; a fused
//    gate/up variant writes silu(x W1^T) * (x W3^T).
//  - simt_kernel: fp32 tiled GEMM (64x64x16) for many rows when no reduced precision is allowed (exact mode).
//  - tc_kernel: tensor cores (mma.sync) for many rows in the fast modes: FP8 e4m3 x FP8 e4m3 with DeepSeek's
//    per-128 scales promoted in fp32 after every 128-deep K block (sm_89+), or BF16 activations x FP8/BF16
//    weights. 64x128x128 tiles, cp.async double buffering.
#include <algorithm>
#include <cstdio>
#include <stdexcept>

#include "common.cuh"

namespace ds3cu {

// ---- GEMV ---------------------------------------------------------------------------------------------
template <int WT>
struct Raw16 {
  static constexpr int NV = WT == W_F8 ? 1 : WT == W_F32 ? 4 : 2;
  uint4 v[NV];
};

template <int WT>
__device__ __forceinline__ void load_raw16(const WDesc& w, int64_t row, int k, Raw16<WT>& r) {
  constexpr int EB = WT == W_F8 ? 1 : WT == W_F32 ? 4 : 2;
  const uint8_t* p = static_cast<const uint8_t*>(w.data) + (row * w.cols + k) * EB;
#pragma unroll
  for (int i = 0; i < Raw16<WT>::NV; i++) r.v[i] = ld_stream16(p + 16 * i);
}

/** the 16 weights of a chunk as float (FP8 times its block scale) */
template <int WT>
__device__ __forceinline__ void dequant16(const WDesc& w, int64_t row, int k, const Raw16<WT>& r, float* out) {
  if constexpr (WT == W_F8) {
    const float s = w.scale[((row + w.o0) >> 7) * w.sc + (k >> 7)];
    const uint32_t u[4] = {r.v[0].x, r.v[0].y, r.v[0].z, r.v[0].w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
      float2 a = fp8x2_to_f32x2(uint16_t(u[i] & 0xffff));
      float2 b = fp8x2_to_f32x2(uint16_t(u[i] >> 16));
      out[4 * i + 0] = a.x * s;
      out[4 * i + 1] = a.y * s;
      out[4 * i + 2] = b.x * s;
      out[4 * i + 3] = b.y * s;
    }
  } else if constexpr (WT == W_BF16) {
#pragma unroll
    for (int i = 0; i < 2; i++) {
      const uint32_t u[4] = {r.v[i].x, r.v[i].y, r.v[i].z, r.v[i].w};
#pragma unroll
      for (int j = 0; j < 4; j++) {
        out[8 * i + 2 * j] = __uint_as_float(u[j] << 16);
        out[8 * i + 2 * j + 1] = __uint_as_float(u[j] & 0xffff0000u);
      }
    }
  } else if constexpr (WT == W_F16) {
#pragma unroll
    for (int i = 0; i < 2; i++) {
      const uint32_t u[4] = {r.v[i].x, r.v[i].y, r.v[i].z, r.v[i].w};
#pragma unroll
      for (int j = 0; j < 4; j++) {
        out[8 * i + 2 * j] = f16_bits_to_f32(uint16_t(u[j] & 0xffff));
        out[8 * i + 2 * j + 1] = f16_bits_to_f32(uint16_t(u[j] >> 16));
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; i++) {
      out[4 * i + 0] = __uint_as_float(r.v[i].x);
      out[4 * i + 1] = __uint_as_float(r.v[i].y);
      out[4 * i + 2] = __uint_as_float(r.v[i].z);
      out[4 * i + 3] = __uint_as_float(r.v[i].w);
    }
  }
}

// blocks of 8 warps (256 threads on CUDA, 512 on AMD); each lane streams 16-element chunks, a warp WARP * 16
template <int WT, int MC, bool DUAL, int KS, int UD = 1>
__global__ void __launch_bounds__(8 * WARP, (MC <= 2 || (MC <= 4 && !DUAL)) ? 2 : 1) gemv_kernel(const GemmArgs p) {
  // KS > 1: the KS warps of a row slot split K (few output rows: more blocks in flight), summed in shared memory
  __shared__ float red[KS > 1 ? 8 * 2 * MC * (DUAL ? 2 : 1) : 1];
  constexpr int R = 2;  // weight rows per warp
  // 16-element chunks in flight per lane and row (the fused pair streams two weights)
  constexpr int U = WT == W_F8 ? (DUAL ? UD : 4) : (DUAL ? 1 : 2);
  int e = 0, off = 0, cnt = p.M;
  if (p.g.nActive) {
    if (int(blockIdx.y) >= __ldg(p.g.nActive)) return;
    e = p.g.slotExpert[blockIdx.y];
    off = p.g.slotOff[blockIdx.y];
    cnt = p.g.slotCnt[blockIdx.y];
  }
  const WDesc w = p.wtab[e * p.wstride + p.woff];
  WDesc w2 = w;
  if constexpr (DUAL) w2 = p.wtab[e * p.wstride + p.woff2];
  const int z = blockIdx.z;
  const float* __restrict__ x = p.x + z * p.xz;
  float* __restrict__ y = p.y + z * p.yz;
  const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
  const int K = p.K;
  constexpr int SLOTS = 8 / KS;  // row slots per block
  const int slot = warp / KS, ks = warp % KS;
  const int perSlice = ((K / 16 + KS - 1) / KS) * 16;
  const int kBeg = ks * perSlice, kEnd = min(K, kBeg + perSlice);
  const int groups = (p.N + SLOTS * R - 1) / (SLOTS * R);
  // a block walks several row groups: the dependent loads above are paid once per block
  for (int grp = blockIdx.x; grp < groups; grp += gridDim.x) {
  const int n0 = (grp * SLOTS + slot) * R;
  if (n0 >= p.N) continue;  // block-uniform when KS > 1 (one row slot per block)
  const int nr = min(R, p.N - n0);
  const int64_t wr0 = p.wrow0 + int64_t(z) * p.wzrows + n0;

  for (int m0 = 0; m0 < cnt; m0 += MC) {
    const int mc = min(MC, cnt - m0);
    const float* xr[MC];
#pragma unroll
    for (int m = 0; m < MC; m++) {
      int row = off + m0 + (m < mc ? m : 0);
      if (p.g.rowIdx) row = p.g.rowIdx[row];
      xr[m] = x + int64_t(row) * p.ldx;
    }
    float acc[R][MC], acc2[R][MC];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
      for (int m = 0; m < MC; m++) acc[r][m] = acc2[r][m] = 0.f;

    for (int kb = kBeg + lane * 16; kb < kEnd; kb += WARP * 16 * U) {
      Raw16<WT> raw[U][R], raw2[U][R];
#pragma unroll
      for (int u = 0; u < U; u++) {
        const int k = kb + u * WARP * 16;
#pragma unroll
        for (int r = 0; r < R; r++)
          if (k < kEnd && r < nr) {
            load_raw16<WT>(w, wr0 + r, k, raw[u][r]);
            if constexpr (DUAL) load_raw16<WT>(w2, wr0 + r, k, raw2[u][r]);
          }
      }
#pragma unroll
      for (int u = 0; u < U; u++) {
        const int k = kb + u * WARP * 16;
        if (k >= kEnd) break;
        float wf[R][16], wf2[DUAL ? R : 1][16];
#pragma unroll
        for (int r = 0; r < R; r++) {
          if (r < nr) {
            dequant16<WT>(w, wr0 + r, k, raw[u][r], wf[r]);
            if constexpr (DUAL) dequant16<WT>(w2, wr0 + r, k, raw2[u][r], wf2[r]);
          } else {
#pragma unroll
            for (int i = 0; i < 16; i++) {
              wf[r][i] = 0.f;
              if constexpr (DUAL) wf2[r][i] = 0.f;
            }
          }
        }
#pragma unroll
        for (int m = 0; m < MC; m++) {
          if (m < mc) {
            float xv[16];
            const float4* xp = reinterpret_cast<const float4*>(xr[m] + k);
#pragma unroll
            for (int i = 0; i < 4; i++) {
              float4 t = __ldg(xp + i);
              xv[4 * i] = t.x;
              xv[4 * i + 1] = t.y;
              xv[4 * i + 2] = t.z;
              xv[4 * i + 3] = t.w;
            }
#pragma unroll
            for (int r = 0; r < R; r++)
#pragma unroll
              for (int i = 0; i < 16; i++) {
                acc[r][m] = fmaf(xv[i], wf[r][i], acc[r][m]);
                if constexpr (DUAL) acc2[r][m] = fmaf(xv[i], wf2[r][i], acc2[r][m]);
              }
          }
        }
      }
    }
    if constexpr (KS > 1) {
#pragma unroll
      for (int m = 0; m < MC; m++)
        if (m < mc)
#pragma unroll
          for (int r = 0; r < R; r++) {
            const float v = warp_sum(acc[r][m]);
            float v2 = 0.f;
            if constexpr (DUAL) v2 = warp_sum(acc2[r][m]);
            if (lane == 0) {
              red[(warp * 2 + r) * MC + m] = v;
              if constexpr (DUAL) red[8 * 2 * MC + (warp * 2 + r) * MC + m] = v2;
            }
          }
      __syncthreads();
      if (ks == 0) {
#pragma unroll
        for (int m = 0; m < MC; m++)
#pragma unroll
          for (int r = 0; r < R; r++) {
            float v = 0.f, v2 = 0.f;
            for (int w = warp; w < warp + KS; w++) {
              v += red[(w * 2 + r) * MC + m];
              if constexpr (DUAL) v2 += red[8 * 2 * MC + (w * 2 + r) * MC + m];
            }
            acc[r][m] = v;
            acc2[r][m] = v2;
          }
      }
      __syncthreads();
    }
#pragma unroll
    for (int m = 0; m < MC; m++) {
      if (m < mc && (KS == 1 || ks == 0)) {
#pragma unroll
        for (int r = 0; r < R; r++) {
          float v = KS > 1 ? acc[r][m] : warp_sum(acc[r][m]);
          float v2 = 0.f;
          if constexpr (DUAL) v2 = KS > 1 ? acc2[r][m] : warp_sum(acc2[r][m]);
          if (lane == 0 && r < nr) {
            float o;
            if constexpr (DUAL) {
              const float g = maybe_bf16(v, p.round), u = maybe_bf16(v2, p.round);
              o = maybe_bf16(silu(g) * u, p.round);
            } else {
              o = maybe_bf16(v, p.round);
            }
            y[int64_t(off + m0 + m) * p.ldy + n0 + r] = o;
          }
        }
      }
    }
  }
  }
}

static int g_sms = 132;
void set_sm_count(int n) { g_sms = n; }
static GemvTuning g_tune;
GemvTuning gemv_tuning() { return g_tune; }
void set_gemv_tuning(const GemvTuning& t) { g_tune = t; }

template <int WT, int MC, bool DUAL>
static void gemv_go(cudaStream_t s, const GemmArgs& a, int slots, int z) {
  int groups = (a.N + GEMV_ROWS_PER_BLOCK - 1) / GEMV_ROWS_PER_BLOCK;
  // few output rows and a long K: split K over the warps of a block (2 rows per block). With ksLongK also
  // for FP8 rows streamed one token at a time with K >= 4096: blocks of 2 rows balance the last wave of a
  // few-thousand-row matrix (16-row blocks leave up to a third of the GPU idle in the tail)
  const bool longK = g_tune.ksLongK && WT == W_F8 && MC == 1 && a.K >= 4096;
  const bool ks = !DUAL && MC != 2 && (groups * slots * z < 2 * g_sms || longK) && a.K >= 2048;
  if (ks) groups = (a.N + 1) / 2;
  // about 4 blocks per SM in all, each walking several row groups
  const int per = std::max(1, (4 * g_sms + slots * z - 1) / (slots * z));
  dim3 grid(std::min(groups, std::max(per, (groups + 7) / 8)), slots, z);
  if constexpr (!DUAL && MC != 2) {
    if (ks) {
      gemv_kernel<WT, MC, false, 8><<<grid, 8 * WARP, 0, s>>>(a);
      return;
    }
  }
  if constexpr (WT == W_F8 && DUAL && MC == 1) {
    if (g_tune.dualU == 2) {
      gemv_kernel<WT, MC, DUAL, 1, 2><<<grid, 8 * WARP, 0, s>>>(a);
      return;
    }
  }
  gemv_kernel<WT, MC, DUAL, 1><<<grid, 8 * WARP, 0, s>>>(a);
}

template <int WT>
static void gemv_wt(cudaStream_t s, const GemmArgs& a, bool dual, int slots, int z, int mc) {
  if (dual) {
    if (mc == 1) gemv_go<WT, 1, true>(s, a, slots, z);
    else if (mc <= 2) gemv_go<WT, 2, true>(s, a, slots, z);
    else gemv_go<WT, 8, true>(s, a, slots, z);
  } else {
    if (mc == 1) gemv_go<WT, 1, false>(s, a, slots, z);
    else if (mc <= 4) gemv_go<WT, 4, false>(s, a, slots, z);
    else gemv_go<WT, 8, false>(s, a, slots, z);
  }
}

void launch_gemv(cudaStream_t s, const GemmArgs& a, int wtype, bool dual, int slots, int z, int mc) {
  switch (wtype) {
    case W_F8: gemv_wt<W_F8>(s, a, dual, slots, z, mc); break;
    case W_BF16: gemv_wt<W_BF16>(s, a, dual, slots, z, mc); break;
    case W_F16: gemv_wt<W_F16>(s, a, dual, slots, z, mc); break;
    default: gemv_wt<W_F32>(s, a, dual, slots, z, mc); break;
  }
}

// The rows of this block's M tile (simt_kernel, tc_kernel, mfma_kernel): a grouped (MoE) launch maps blockIdx.y
// to a tile of an expert's slot (expert e, its rows off .. off + cnt, tile mt of them); a plain launch is expert 0,
// rows 0 .. M, tile blockIdx.y. False: blockIdx.y is past the grouped launch's tile count (nothing to do).
__device__ __forceinline__ bool gemm_tile(const GemmArgs& p, int& e, int& off, int& cnt, int& mt) {
  e = 0, off = 0, cnt = p.M, mt = blockIdx.y;
  if (p.g.nTiles) {
    if (int(blockIdx.y) >= __ldg(p.g.nTiles)) return false;
    const int slot = p.g.tileSlot[blockIdx.y];
    mt = p.g.tileM[blockIdx.y];
    e = p.g.slotExpert[slot];
    off = p.g.slotOff[slot];
    cnt = p.g.slotCnt[slot];
  }
  return true;
}

// ---- SIMT tiled GEMM (fp32, exact) ----------------------------------------------------------------------
template <int WT>
__global__ void __launch_bounds__(256) simt_kernel(const GemmArgs p) {
  constexpr int BK = 16;
  __shared__ float As[BK][SIMT_BM + 4];
  __shared__ float Bs[BK][SIMT_BN + 4];
  int e, off, cnt, mt;
  if (!gemm_tile(p, e, off, cnt, mt)) return;
  const int rbase = mt * SIMT_BM;
  if (rbase >= cnt) return;
  const WDesc w = p.wtab[e * p.wstride + p.woff];
  const int z = blockIdx.z;
  const float* __restrict__ x = p.x + z * p.xz;
  float* __restrict__ y = p.y + z * p.yz;
  const int n0 = blockIdx.x * SIMT_BN;
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int lr = tid >> 2, lk = (tid & 3) * 4;
  const int ar = rbase + lr;
  const bool va = ar < cnt;
  int xrow = off + (va ? ar : 0);
  if (p.g.rowIdx) xrow = p.g.rowIdx[xrow];
  const float* xp = x + int64_t(xrow) * p.ldx;
  const int bn = n0 + lr;
  const bool vb = bn < p.N;
  const int64_t wrow = p.wrow0 + int64_t(z) * p.wzrows + (vb ? bn : 0);
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; i++)
#pragma unroll
    for (int j = 0; j < 4; j++) acc[i][j] = 0.f;
  for (int k0 = 0; k0 < p.K; k0 += BK) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int k = k0 + lk + i;
      As[lk + i][lr] = (va && k < p.K) ? xp[k] : 0.f;
      Bs[lk + i][lr] = (vb && k < p.K) ? w_at_t<WT>(w, wrow, k) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk++) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; i++) av[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; j++) bv[j] = Bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const int r = rbase + ty + 16 * i;
    if (r >= cnt) continue;
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const int n = n0 + tx + 16 * j;
      if (n < p.N) y[int64_t(off + r) * p.ldy + n] = maybe_bf16(acc[i][j], p.round);
    }
  }
}

void launch_simt(cudaStream_t s, const GemmArgs& a, int wtype, int mtiles, int z) {
  dim3 grid((a.N + SIMT_BN - 1) / SIMT_BN, mtiles, z);
  switch (wtype) {
    case W_F8: simt_kernel<W_F8><<<grid, 256, 0, s>>>(a); break;
    case W_BF16: simt_kernel<W_BF16><<<grid, 256, 0, s>>>(a); break;
    case W_F16: simt_kernel<W_F16><<<grid, 256, 0, s>>>(a); break;
    default: simt_kernel<W_F32><<<grid, 256, 0, s>>>(a); break;
  }
}

// ---- tensor cores -------------------------------------------------------------------------------------------
// sums the split-K partials in a fixed order (deterministic), then rounds (tc_kernel's and mfma_kernel's split-K)
__global__ void splitk_reduce_kernel(const float* __restrict__ ws, int splits, int M, int N, float* __restrict__ y, int64_t ldy, int round) {
  const int64_t n = int64_t(M) * N;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float v = 0.f;
    for (int z = 0; z < splits; z++) v += ws[z * n + i];
    const int64_t r = i / N, c = i - r * N;
    y[r * ldy + c] = maybe_bf16(v, round);
  }
}

#if defined(DS3_HAVE_MMA)
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned sa = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int sz = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sa), "l"(gmem), "r"(sz));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void mma_bf16(float* d, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma_fp8(float* d, const uint32_t* a, const uint32_t* b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  // GPUs without FP8 tensor cores: the same k32 product as two bf16 k16 products (e4m3 is exact in bf16).
  // The k order inside each half is permuted identically for A and B, which a dot product allows.
  uint32_t a0[4] = {fp8x2_to_bf16x2(uint16_t(a[0])), fp8x2_to_bf16x2(uint16_t(a[1])), fp8x2_to_bf16x2(uint16_t(a[0] >> 16)),
                    fp8x2_to_bf16x2(uint16_t(a[1] >> 16))};
  uint32_t b0[2] = {fp8x2_to_bf16x2(uint16_t(b[0])), fp8x2_to_bf16x2(uint16_t(b[0] >> 16))};
  mma_bf16(d, a0, b0);
  uint32_t a1[4] = {fp8x2_to_bf16x2(uint16_t(a[2])), fp8x2_to_bf16x2(uint16_t(a[3])), fp8x2_to_bf16x2(uint16_t(a[2] >> 16)),
                    fp8x2_to_bf16x2(uint16_t(a[3] >> 16))};
  uint32_t b1[2] = {fp8x2_to_bf16x2(uint16_t(b[1])), fp8x2_to_bf16x2(uint16_t(b[1] >> 16))};
  mma_bf16(d, a1, b1);
#endif
}

template <bool FP8A, bool WBF16>
struct TcCfg {
  // K is staged BK deep and promoted into fp32 per 128-deep scale block
  // (256-deep stages for FP8 were tried: slower on the H100, 1 block per SM; kept general via SUB)
  static constexpr int BK = 128;
  static constexpr int SUB = BK / 128;
  static constexpr int NST = WBF16 ? 3 : 4;  // cp.async pipeline depth
  static constexpr int A_EB = FP8A ? 1 : 2;
  static constexpr int B_EB = WBF16 ? 2 : 1;
  static constexpr int A_LD = BK * A_EB + 16;  // bytes per smem row (+16: conflict-free fragment loads)
  static constexpr int B_LD = BK * B_EB + 16;
  static constexpr int A_STAGE = TC_BM * A_LD;
  static constexpr int B_STAGE = TC_BN * B_LD;
  static constexpr int SMEM = NST * (A_STAGE + B_STAGE);
};

template <bool FP8A, bool WBF16>
__global__ void __launch_bounds__(256, 2) tc_kernel(const GemmArgs p) {
  using C = TcCfg<FP8A, WBF16>;
  static_assert(!(FP8A && WBF16), "FP8 activations need FP8 weights");
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* sA = smem;
  uint8_t* sB = smem + C::NST * C::A_STAGE;

  int e, off, cnt, mt;
  if (!gemm_tile(p, e, off, cnt, mt)) return;
  const int rbase = mt * TC_BM;
  if (rbase >= cnt) return;
  const WDesc w = p.wtab[e * p.wstride + p.woff];
  const int N = p.N, K = p.K;
  const int n0 = blockIdx.x * TC_BN;
  const int rowsA = min(TC_BM, cnt - rbase);
  const int rowsB = min(TC_BN, N - n0);
  const int64_t arow0 = int64_t(off) + rbase;
  const uint8_t* Ag = static_cast<const uint8_t*>(p.a) + arow0 * K * C::A_EB;
  const int64_t wrow0 = p.wrow0 + n0;
  const uint8_t* Bg = static_cast<const uint8_t*>(w.data) + wrow0 * K * C::B_EB;
  const int nkb = (K + C::BK - 1) / C::BK;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, tq = lane & 3;
  const int wm = warp & 1, wn = warp >> 1;
  // m16 tiles of this warp that hold valid rows (grouped GEMMs at decode have a few rows per expert)
  const bool act0 = wm * 32 < rowsA, act1 = wm * 32 + 16 < rowsA;

  auto load_stage = [&](int st, int kb) {
    uint8_t* a = sA + st * C::A_STAGE;
    uint8_t* b = sB + st * C::B_STAGE;
    constexpr int ACH = C::BK * C::A_EB / 16;
    const int rowsLoad = min(TC_BM, (rowsA + 15) / 16 * 16);  // whole m16 tiles; rows past them are never read
    for (int c = tid; c < rowsLoad * ACH; c += 256) {
      const int r = c / ACH, cc = c % ACH;
      const int kbyte = kb * C::BK * C::A_EB + cc * 16;
      const bool v = r < rowsA && kbyte < K * C::A_EB;
      cp_async16(a + r * C::A_LD + cc * 16, v ? Ag + int64_t(r) * K * C::A_EB + kbyte : Ag, v);
    }
    constexpr int BCH = C::BK * C::B_EB / 16;
    for (int c = tid; c < TC_BN * BCH; c += 256) {
      const int r = c / BCH, cc = c % BCH;
      const int kbyte = kb * C::BK * C::B_EB + cc * 16;
      const bool v = r < rowsB && kbyte < K * C::B_EB;
      cp_async16(b + r * C::B_LD + cc * 16, v ? Bg + int64_t(r) * K * C::B_EB + kbyte : Bg, v);
    }
    cp_async_commit();
  };

  float acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; i++)
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
      for (int c = 0; c < 4; c++) acc[i][j][c] = 0.f;

  // split-K: this block's range of 128-deep K blocks
  const int kper = (nkb + p.splits - 1) / p.splits;
  const int kb0 = blockIdx.z * kper, kb1 = min(nkb, kb0 + kper);
  const int nk = max(0, kb1 - kb0);
#pragma unroll
  for (int st = 0; st < C::NST - 1; st++) {
    if (st < nk) load_stage(st, kb0 + st);
    else cp_async_commit();
  }
  for (int it = 0; it < nk; it++) {
    const int kb = kb0 + it;
    cp_async_wait<C::NST - 2>();
    __syncthreads();  // stage it is in; stage it-1 is free for the load below
    {
      const int nx = it + C::NST - 1;
      if (nx < nk) load_stage(nx % C::NST, kb0 + nx);
      else cp_async_commit();
    }
    const uint8_t* a0 = sA + (it % C::NST) * C::A_STAGE;
    const uint8_t* b0 = sB + (it % C::NST) * C::B_STAGE;
#pragma unroll
    for (int sub = 0; sub < C::SUB; sub++) {
    const int kbs = kb * C::SUB + sub;  // 128-deep scale block
    if (C::SUB > 1 && kbs * 128 >= K) break;
    const uint8_t* a = a0 + sub * 128 * C::A_EB;
    const uint8_t* b = b0 + sub * 128 * C::B_EB;
    float pacc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
      for (int j = 0; j < 4; j++)
#pragma unroll
        for (int c = 0; c < 4; c++) pacc[i][j][c] = 0.f;

    if constexpr (FP8A) {
#pragma unroll
      for (int ks = 0; ks < 128 / 32; ks++) {
        uint32_t af[2][4], bf[4][2];
#pragma unroll
        for (int i = 0; i < 2; i++) {
          if (!(i == 0 ? act0 : act1)) continue;
          const uint8_t* r0 = a + (wm * 32 + i * 16 + g) * C::A_LD + ks * 32 + tq * 4;
          const uint8_t* r1 = r0 + 8 * C::A_LD;
          af[i][0] = *reinterpret_cast<const uint32_t*>(r0);
          af[i][1] = *reinterpret_cast<const uint32_t*>(r1);
          af[i][2] = *reinterpret_cast<const uint32_t*>(r0 + 16);
          af[i][3] = *reinterpret_cast<const uint32_t*>(r1 + 16);
        }
#pragma unroll
        for (int j = 0; j < 4; j++) {
          const uint8_t* r = b + (wn * 32 + j * 8 + g) * C::B_LD + ks * 32 + tq * 4;
          bf[j][0] = *reinterpret_cast<const uint32_t*>(r);
          bf[j][1] = *reinterpret_cast<const uint32_t*>(r + 16);
        }
#pragma unroll
        for (int i = 0; i < 2; i++)
          if (i == 0 ? act0 : act1)
#pragma unroll
            for (int j = 0; j < 4; j++) mma_fp8(pacc[i][j], af[i], bf[j]);
      }
    } else {
#pragma unroll
      for (int ks = 0; ks < 128 / 16; ks++) {
        uint32_t af[2][4], bf[4][2];
#pragma unroll
        for (int i = 0; i < 2; i++) {
          if (!(i == 0 ? act0 : act1)) continue;
          const uint8_t* r0 = a + (wm * 32 + i * 16 + g) * C::A_LD + (ks * 16 + tq * 2) * 2;
          const uint8_t* r1 = r0 + 8 * C::A_LD;
          af[i][0] = *reinterpret_cast<const uint32_t*>(r0);
          af[i][1] = *reinterpret_cast<const uint32_t*>(r1);
          af[i][2] = *reinterpret_cast<const uint32_t*>(r0 + 16);
          af[i][3] = *reinterpret_cast<const uint32_t*>(r1 + 16);
        }
#pragma unroll
        for (int j = 0; j < 4; j++) {
          if constexpr (WBF16) {
            const uint8_t* r = b + (wn * 32 + j * 8 + g) * C::B_LD + (ks * 16 + tq * 2) * 2;
            bf[j][0] = *reinterpret_cast<const uint32_t*>(r);
            bf[j][1] = *reinterpret_cast<const uint32_t*>(r + 16);
          } else {
            const uint8_t* r = b + (wn * 32 + j * 8 + g) * C::B_LD + ks * 16 + tq * 2;
            bf[j][0] = fp8x2_to_bf16x2(*reinterpret_cast<const uint16_t*>(r));
            bf[j][1] = fp8x2_to_bf16x2(*reinterpret_cast<const uint16_t*>(r + 8));
          }
        }
#pragma unroll
        for (int i = 0; i < 2; i++)
          if (i == 0 ? act0 : act1)
#pragma unroll
            for (int j = 0; j < 4; j++) mma_bf16(pacc[i][j], af[i], bf[j]);
      }
    }
    // promote this 128-deep block into the fp32 accumulators with its scales
    float sa[2][2], sw[4][2];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
      for (int hh = 0; hh < 2; hh++) {
        const int r = wm * 32 + i * 16 + g + hh * 8;
        sa[i][hh] = 1.f;
        if constexpr (FP8A) sa[i][hh] = r < rowsA ? __ldg(p.as + (arow0 + r) * p.ksb + kbs) : 0.f;
      }
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
      for (int h = 0; h < 2; h++) {
        const int n = n0 + wn * 32 + j * 8 + tq * 2 + h;
        sw[j][h] = 1.f;
        if constexpr (!WBF16) sw[j][h] = n < N ? __ldg(w.scale + ((p.wrow0 + n + w.o0) >> 7) * w.sc + kbs) : 0.f;
      }
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
      for (int j = 0; j < 4; j++)
#pragma unroll
        for (int c = 0; c < 4; c++) acc[i][j][c] = fmaf(pacc[i][j][c], sa[i][c >> 1] * sw[j][c & 1], acc[i][j][c]);
    }
  }
  cp_async_wait<0>();
#pragma unroll
  for (int i = 0; i < 2; i++)
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
      const int r = wm * 32 + i * 16 + g + hh * 8;
      if (r >= rowsA) continue;
      float* yr = p.splits > 1 ? p.ws + (int64_t(blockIdx.z) * p.M + arow0 + r) * N : p.y + (arow0 + r) * p.ldy;
#pragma unroll
      for (int j = 0; j < 4; j++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
          const int n = n0 + wn * 32 + j * 8 + tq * 2 + h;
          if (n < N) yr[n] = p.splits > 1 ? acc[i][j][hh * 2 + h] : maybe_bf16(acc[i][j][hh * 2 + h], p.round);
        }
    }
}

template <bool FP8A, bool WBF16>
static void tc_go(cudaStream_t s, const GemmArgs& a, int mtiles) {
  using C = TcCfg<FP8A, WBF16>;
  static thread_local int configured = -1;
  int dev = 0;
  cudaGetDevice(&dev);
  if (configured != dev) {
    cudaFuncSetAttribute(tc_kernel<FP8A, WBF16>, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
    configured = dev;
  }
  dim3 grid((a.N + TC_BN - 1) / TC_BN, mtiles, a.splits);
  tc_kernel<FP8A, WBF16><<<grid, 256, C::SMEM, s>>>(a);
  if (a.splits > 1) {
    const int64_t n = int64_t(a.M) * a.N;
    splitk_reduce_kernel<<<int(std::min<int64_t>((n + 255) / 256, 1 << 20)), 256, 0, s>>>(a.ws, a.splits, a.M, a.N, a.y, a.ldy, a.round);
  }
}

void launch_tc(cudaStream_t s, const GemmArgs& a, bool fp8a, bool wbf16, int mtiles, bool) {
  if (fp8a) tc_go<true, false>(s, a, mtiles);
  else if (wbf16) tc_go<false, true>(s, a, mtiles);
  else tc_go<false, false>(s, a, mtiles);
}
#elif defined(DS3_LANES_HIP)
// ---- AMD matrix cores (MFMA, wave64): the same contract as tc_kernel --------------------------------------------
// v_mfma_f32_32x32x8bf16_1k on every target (gfx90a and gfx942): the A and W tiles are decoded to bf16 in LDS
// (FP8 bytes, e4m3fn or e4m3fnuz, are exact in bf16; bf16 activations as they are), products accumulate in fp32
// per 128-deep K block and are promoted with the block scales in fp32 as tc_kernel does. Block tile 64 x 128 x 128,
// 4 waves of 32 x 64 (two 32 x 32 MFMA tiles each), one LDS stage (52 KB). Operand layout used (AMD's matrix
// instruction calculator for 32x32x8 bf16_1k, one block): lane l holds A[i = l % 32][k = 4 (l / 32) + 0..3] and
// B[k = 4 (l / 32) + 0..3][j = l % 32]; D[i][j] is register 4 (i / 8) + i % 4 of lane j + 32 ((i / 4) % 2).
// fp8-fnuz on gfx942 (AF 2) multiplies the e4m3fnuz bytes themselves on v_mfma_f32_32x32x16_fp8_fp8.
// NOT RUN ON HARDWARE: the host emulator implements these same layouts, so it checks the kernel's use of them, not
// the layouts themselves. The addon uses this kernel only with DS3_ROCM_MFMA=1.
constexpr int MF_BM = 64, MF_BN = 128, MF_BK = 128, MF_LD = MF_BK + 8;  // LD: bf16 per LDS row (+16 bytes)

template <int AF>  // activations: 0 bf16, 1 fp8 e4m3fn bytes, 2 fp8 e4m3fnuz bytes (with per-128 scales)
__device__ __forceinline__ uint16_t mf_a_bits(const void* a, int64_t i) {
  if constexpr (AF == 0) return static_cast<const uint16_t*>(a)[i];
  else if constexpr (AF == 1) return f32_to_bf16_bits(fp8_ocp_to_f32(static_cast<const uint8_t*>(a)[i]));
  else return f32_to_bf16_bits(fp8_fnuz_to_f32(static_cast<const uint8_t*>(a)[i]));
}

template <int AF, bool WBF16>
__global__ void __launch_bounds__(256) mfma_kernel(const GemmArgs p) {
  __shared__ __align__(16) uint16_t sA[MF_BM * MF_LD];
  __shared__ __align__(16) uint16_t sB[MF_BN * MF_LD];
  int e, off, cnt, mt;
  if (!gemm_tile(p, e, off, cnt, mt)) return;
  const int rbase = mt * MF_BM;
  if (rbase >= cnt) return;
  const WDesc w = p.wtab[e * p.wstride + p.woff];
  const int N = p.N, K = p.K;
  const int n0 = blockIdx.x * MF_BN;
  const int rowsA = min(MF_BM, cnt - rbase), rowsB = min(MF_BN, N - n0);
  const int64_t arow0 = int64_t(off) + rbase;
  const int64_t wrow0 = p.wrow0 + n0;
  const int tid = threadIdx.x, wave = tid / WARP, lane = tid % WARP;
  const int wm = wave & 1, wn = wave >> 1;
  const int li = lane % 32, lk = (lane / 32) * 4;
  const int nkb = (K + MF_BK - 1) / MF_BK;
  const int kper = (nkb + p.splits - 1) / p.splits;
  const int kb0 = blockIdx.z * kper, kb1 = min(nkb, kb0 + kper);
  float acc[2][16];
#pragma unroll
  for (int t = 0; t < 2; t++)
#pragma unroll
    for (int r = 0; r < 16; r++) acc[t][r] = 0.f;
  for (int kb = kb0; kb < kb1; kb++) {
    mf_f32x16 pacc[2];
#pragma unroll
    for (int t = 0; t < 2; t++)
#pragma unroll
      for (int r = 0; r < 16; r++) pacc[t][r] = 0.f;
#if defined(DS3_FP8_FNUZ) || defined(DS3_SIMT_EMU)
    if constexpr (AF == 2) {
      // gfx942, fp8-fnuz: activations and weights are e4m3fnuz bytes, the format of the FP8 matrix cores
      // (v_mfma_f32_32x32x16_fp8_fp8: lane l holds A[i = l % 32][k = 8 (l / 32) + 0..7], B likewise; D as above)
      uint8_t* a8 = reinterpret_cast<uint8_t*>(sA);
      uint8_t* b8 = reinterpret_cast<uint8_t*>(sB);
      __syncthreads();
      for (int c = tid; c < MF_BM * MF_BK; c += 256) {
        const int r = c / MF_BK, kk = c % MF_BK, k = kb * MF_BK + kk;
        a8[r * 2 * MF_LD + kk] = (r < rowsA && k < K) ? static_cast<const uint8_t*>(p.a)[(arow0 + r) * K + k] : uint8_t(0);
      }
      for (int c = tid; c < MF_BN * MF_BK; c += 256) {
        const int r = c / MF_BK, kk = c % MF_BK, k = kb * MF_BK + kk;
        b8[r * 2 * MF_LD + kk] = (r < rowsB && k < K) ? static_cast<const uint8_t*>(w.data)[(wrow0 + r) * K + k] : uint8_t(0);
      }
      __syncthreads();
#pragma unroll 4
      for (int ks = 0; ks < MF_BK / 16; ks++) {
        const long af = *reinterpret_cast<const long*>(&a8[(wm * 32 + li) * 2 * MF_LD + ks * 16 + 8 * (lane / 32)]);
#pragma unroll
        for (int t = 0; t < 2; t++) {
          const long bf = *reinterpret_cast<const long*>(&b8[(wn * 64 + t * 32 + li) * 2 * MF_LD + ks * 16 + 8 * (lane / 32)]);
          pacc[t] = __builtin_amdgcn_mfma_f32_32x32x16_fp8_fp8(af, bf, pacc[t], 0, 0, 0);
        }
      }
    } else
#endif
    {
    __syncthreads();  // the previous block's fragments are read
    for (int c = tid; c < MF_BM * MF_BK; c += 256) {
      const int r = c / MF_BK, kk = c % MF_BK, k = kb * MF_BK + kk;
      sA[r * MF_LD + kk] = (r < rowsA && k < K) ? mf_a_bits<AF>(p.a, (arow0 + r) * K + k) : uint16_t(0);
    }
    for (int c = tid; c < MF_BN * MF_BK; c += 256) {
      const int r = c / MF_BK, kk = c % MF_BK, k = kb * MF_BK + kk;
      uint16_t v = 0;
      if (r < rowsB && k < K) {
        const int64_t i = (wrow0 + r) * K + k;
        if constexpr (WBF16) v = static_cast<const uint16_t*>(w.data)[i];
        else v = f32_to_bf16_bits(fp8_to_f32(static_cast<const uint8_t*>(w.data)[i]));  // the target's weight format
      }
      sB[r * MF_LD + kk] = v;
    }
    __syncthreads();
#pragma unroll 4
    for (int ks = 0; ks < MF_BK / 8; ks++) {
      const mf_bf16x4 af = *reinterpret_cast<const mf_bf16x4*>(&sA[(wm * 32 + li) * MF_LD + ks * 8 + lk]);
#pragma unroll
      for (int t = 0; t < 2; t++) {
        const mf_bf16x4 bf = *reinterpret_cast<const mf_bf16x4*>(&sB[(wn * 64 + t * 32 + li) * MF_LD + ks * 8 + lk]);
        pacc[t] = __builtin_amdgcn_mfma_f32_32x32x8bf16_1k(af, bf, pacc[t], 0, 0, 0);
      }
    }
    }
    // promote this 128-deep block with its scales (fp32), as tc_kernel
#pragma unroll
    for (int t = 0; t < 2; t++) {
      const int n = n0 + wn * 64 + t * 32 + li;
      float sw = 1.f;
      if constexpr (!WBF16) sw = n < N ? __ldg(w.scale + ((p.wrow0 + n + w.o0) >> 7) * w.sc + kb) : 0.f;
#pragma unroll
      for (int r = 0; r < 16; r++) {
        const int row = wm * 32 + 8 * (r / 4) + 4 * (lane / 32) + r % 4;
        float sa = 1.f;
        if constexpr (AF != 0) sa = row < rowsA ? __ldg(p.as + (arow0 + row) * p.ksb + kb) : 0.f;
        acc[t][r] = fmaf(pacc[t][r], sa * sw, acc[t][r]);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < 2; t++) {
    const int n = n0 + wn * 64 + t * 32 + li;
    if (n >= N) continue;
#pragma unroll
    for (int r = 0; r < 16; r++) {
      const int row = wm * 32 + 8 * (r / 4) + 4 * (lane / 32) + r % 4;
      if (row >= rowsA) continue;
      if (p.splits > 1) p.ws[(int64_t(blockIdx.z) * p.M + arow0 + row) * N + n] = acc[t][r];
      else p.y[(arow0 + row) * p.ldy + n] = maybe_bf16(acc[t][r], p.round);
    }
  }
}

template <int AF, bool WBF16>
static void mfma_go(cudaStream_t s, const GemmArgs& a, int mtiles) {
  dim3 grid((a.N + MF_BN - 1) / MF_BN, mtiles, a.splits);
  mfma_kernel<AF, WBF16><<<grid, 256, 0, s>>>(a);
  if (a.splits > 1) {
    const int64_t n = int64_t(a.M) * a.N;
    splitk_reduce_kernel<<<int(std::min<int64_t>((n + 255) / 256, 1 << 20)), 256, 0, s>>>(a.ws, a.splits, a.M, a.N, a.y, a.ldy, a.round);
  }
}
static_assert(MF_BM == TC_BM && MF_BN == TC_BN && MF_BK == TC_BK, "the addon sizes grids and split-K with the TC_* tiles");

void launch_tc(cudaStream_t s, const GemmArgs& a, bool fp8a, bool wbf16, int mtiles, bool afnuz) {
  if (fp8a) {
    if (afnuz) mfma_go<2, false>(s, a, mtiles);
    else mfma_go<1, false>(s, a, mtiles);
  } else if (wbf16) {
    mfma_go<0, true>(s, a, mtiles);
  } else {
    mfma_go<0, false>(s, a, mtiles);
  }
}
#else
void launch_tc(cudaStream_t, const GemmArgs&, bool, bool, int, bool) {
  throw std::runtime_error("no tensor-core GEMM in this build");
}
#endif

// ---- activation preparation ------------------------------------------------------------------------------------
template <int MODE>
__global__ void act_prep_kernel(const float* __restrict__ x, int64_t ldx, const float* __restrict__ x2, int silu_mul,
                                const int* __restrict__ rowIdx, const int* __restrict__ nRows, int rows, int K, void* out,
                                float* scales, int round) {
  // one warp per (row, 128-channel block): EPL channels per lane (4 at 32 lanes, 2 at 64)
  constexpr int EPL = 128 / WARP;
  const int gw = (blockIdx.x * blockDim.x + threadIdx.x) / WARP, lane = threadIdx.x % WARP;
  const int ksb = (K + 127) / 128;
  const int row = gw / ksb, kb = gw % ksb;
  if (row >= rows) return;
  if (nRows && row >= __ldg(nRows)) return;
  const int src = rowIdx ? rowIdx[row] : row;
  const float* xr = x + int64_t(src) * ldx;
  const float* ur = silu_mul ? x2 + int64_t(src) * ldx : nullptr;
  const int k0 = kb * 128 + lane * EPL;
  float v[EPL];
#pragma unroll
  for (int i = 0; i < EPL; i++) {
    const int k = k0 + i;
    float a = k < K ? xr[k] : 0.f;
    if (silu_mul) a = maybe_bf16(silu(a) * (k < K ? ur[k] : 0.f), round);
    v[i] = a;
  }
  if constexpr (MODE == PREP_COPY) {
    float* o = static_cast<float*>(out) + int64_t(row) * K;
#pragma unroll
    for (int i = 0; i < EPL; i++)
      if (k0 + i < K) o[k0 + i] = v[i];
  } else if constexpr (MODE == PREP_BF16) {
    __nv_bfloat16* o = static_cast<__nv_bfloat16*>(out) + int64_t(row) * K;
#pragma unroll
    for (int i = 0; i < EPL; i++)
      if (k0 + i < K) o[k0 + i] = __float2bfloat16_rn(v[i]);
  } else {
    float amax;
    if constexpr (EPL == 4) {
      amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
    } else {
      amax = 0.f;
#pragma unroll
      for (int i = 0; i < EPL; i++) amax = fmaxf(amax, fabsf(v[i]));
    }
    amax = fmaxf(warp_max(amax), 1e-4f);
    float s = amax / 448.0f;
    if constexpr (MODE == PREP_FP8_UE8M0 || MODE == PREP_QDQ_UE8M0) s = exp2f(ceilf(log2f(s)));
#if defined(DS3_SOFT_FORMATS)
    if constexpr (MODE == PREP_QDQ_FNUZ) {
      s = amax / 240.0f;
      float* o = static_cast<float*>(out) + int64_t(row) * K;
#pragma unroll
      for (int i = 0; i < EPL; i++)
        if (k0 + i < K) o[k0 + i] = round_fnuz(v[i] / s) * s;
    } else if constexpr (MODE == PREP_FP8_FNUZ) {
      s = amax / 240.0f;
      uint8_t* o = static_cast<uint8_t*>(out) + int64_t(row) * K;
#pragma unroll
      for (int i = 0; i < EPL; i++)
        if (k0 + i < K) o[k0 + i] = fnuz_bits(v[i] / s);
      if (lane == 0) scales[int64_t(row) * ksb + kb] = s;
    } else
#endif
    if constexpr (MODE == PREP_FP8 || MODE == PREP_FP8_UE8M0) {
      uint8_t* o = static_cast<uint8_t*>(out) + int64_t(row) * K;
#pragma unroll
      for (int i = 0; i < EPL; i++)
        if (k0 + i < K) o[k0 + i] = to_fp8_bits(v[i] / s);
      if (lane == 0) scales[int64_t(row) * ksb + kb] = s;
    } else {
      float* o = static_cast<float*>(out) + int64_t(row) * K;
#pragma unroll
      for (int i = 0; i < EPL; i++)
        if (k0 + i < K) o[k0 + i] = round_fp8(v[i] / s) * s;
    }
  }
}

void launch_act_prep(cudaStream_t s, int mode, const float* x, int64_t ldx, const float* x2, int silu_mul, const int* rowIdx,
                     const int* nRows, int rows, int K, void* out, float* scales, int round) {
  if (rows <= 0) return;
  const int64_t warps = int64_t(rows) * ((K + 127) / 128);
  const int blocks = int((warps + 7) / 8);
#define PREP_CASE(M) \
  case M: act_prep_kernel<M><<<blocks, 8 * WARP, 0, s>>>(x, ldx, x2, silu_mul, rowIdx, nRows, rows, K, out, scales, round); break;
  switch (mode) {
    PREP_CASE(PREP_FP8)
    PREP_CASE(PREP_FP8_UE8M0)
    PREP_CASE(PREP_BF16)
    PREP_CASE(PREP_QDQ)
    PREP_CASE(PREP_QDQ_UE8M0)
#if defined(DS3_SOFT_FORMATS)
    PREP_CASE(PREP_QDQ_FNUZ)
    PREP_CASE(PREP_FP8_FNUZ)
#endif
    default:
      act_prep_kernel<PREP_COPY><<<blocks, 8 * WARP, 0, s>>>(x, ldx, x2, silu_mul, rowIdx, nRows, rows, K, out, scales, round);
  }
#undef PREP_CASE
}

}  // namespace ds3cu
