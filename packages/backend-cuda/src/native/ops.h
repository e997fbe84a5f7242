// ds3 CUDA backend: host-side launchers of the kernels (one .cu file per op family).
// Plain C++: included by the Node-API glue (addon.cpp, built by the host compiler) and by the .cu files.
#pragma once
#include "vendor.h"
#include <stdint.h>

namespace ds3cu {

enum WType : int { W_F8 = 0, W_BF16 = 1, W_F16 = 2, W_F32 = 3 };

/** A weight on the device. FP8: e4m3 bytes with fp32 128x128 block scales [sr, sc];
 *  o0 = row where the slice starts inside its first scale block (column origins are
 *  dequantized to f32 at upload, so FP8 weights here always start at a column block edge). */
struct WDesc {
  const void* data;
  const float* scale;
  int64_t rows, cols;
  int sc;
  int o0;
  int dtype;
  int pad;
};

/** Grouped (MoE) work: which rows of A each weight sees. All pointers device-side; when
 *  nActive is null the launch is dense: one group, weight 0, rows [0, M). */
struct Grouping {
  const int* nActive;     // number of active groups ("slots")
  const int* nTiles;      // number of (slot, m-tile) work items, for the tiled kernels
  const int* tileSlot;    // work item -> slot
  const int* tileM;       // work item -> m-tile inside the slot
  const int* slotExpert;  // slot -> weight index (into wtab, times wstride)
  const int* slotOff;     // slot -> first row (of A and of Y)
  const int* slotCnt;     // slot -> rows
  const int* rowIdx;      // row -> row of x to read (gather), null: identity
};

struct GemmArgs {
  // A as fp32 rows (GEMV and SIMT kernels); batched over blockIdx.z with stride xz
  const float* x = nullptr;
  int64_t ldx = 0, xz = 0;
  // A prepared for the tensor-core kernel: fp8 (with per-128 scales [rows, ksb]) or bf16, row stride K
  const void* a = nullptr;
  const float* as = nullptr;
  int ksb = 0;
  // weights: desc = wtab[expert * wstride + woff] (woff2: the second weight of a fused gate/up pair);
  // weight row used for output column n: wrow0 + z * wzrows + n
  const WDesc* wtab = nullptr;
  int wstride = 1, woff = 0, woff2 = 0;
  int wrow0 = 0, wzrows = 0;
  // Y rows [M or group rows, N], batched over z with stride yz
  float* y = nullptr;
  int64_t ldy = 0, yz = 0;
  int M = 0, N = 0, K = 0;
  Grouping g{};
  int round = 0;  // round outputs to bf16
  // tensor-core kernel, dense only: split K over blockIdx.z into fp32 partials ws[splits, M, N], summed in order
  int splits = 1;
  float* ws = nullptr;
};

constexpr int GEMV_ROWS_PER_BLOCK = 16;  // 8 warps x 2 rows
constexpr int SIMT_BM = 64, SIMT_BN = 64;
constexpr int TC_BM = 64, TC_BN = 128, TC_BK = 128;

/** tell the launchers how many SMs the device has (grid sizing) */
void set_sm_count(int n);
/** launch heuristics of the GEMV that can be switched at run time (benchmarks compare them) */
struct GemvTuning {
  int ksLongK = 0;  // FP8, one row at a time, K >= 4096: split K over the 8 warps of a block (2 rows per block)
  int dualU = 2;    // fused gate/up (MoE, one token): 16-byte chunks in flight per lane and row (1 or 2)
};
GemvTuning gemv_tuning();
void set_gemv_tuning(const GemvTuning& t);
void launch_gemv(cudaStream_t s, const GemmArgs& a, int wtype, bool dual, int slots, int z, int mc);
void launch_simt(cudaStream_t s, const GemmArgs& a, int wtype, int mtiles, int z);
/** CUDA: mma.sync; AMD: MFMA (afnuz: the fp8 activations are e4m3fnuz bytes, PREP_FP8_FNUZ) */
void launch_tc(cudaStream_t s, const GemmArgs& a, bool fp8a, bool wbf16, int mtiles, bool afnuz = false);

enum PrepMode : int { PREP_FP8 = 0, PREP_FP8_UE8M0 = 1, PREP_BF16 = 2, PREP_QDQ = 3, PREP_QDQ_UE8M0 = 4, PREP_COPY = 5, PREP_QDQ_FNUZ = 6,
                     PREP_FP8_FNUZ = 7 };
// PREP_QDQ_FNUZ: the "fp8-fnuz" mode (AMD MI300's FP8): s = max(amax, 1e-4) / 240, x -> round_fnuz(x / s) * s;
// PREP_FP8_FNUZ: the same as e4m3fnuz bytes + scales (the MFMA GEMM's input). Both only in the ROCm build.
/** rows of x (gathered by rowIdx; with silu: silu(x) * x2, rounded when `round`) prepared as the
 *  kernels want them: fp8 + scales, bf16, fp32 quantize-dequantized (act_quant emulated), or a copy. */
void launch_act_prep(cudaStream_t s, int mode, const float* x, int64_t ldx, const float* x2, int silu, const int* rowIdx,
                     const int* nRows, int rows, int K, void* out, float* scales, int round);

// ---- elementwise ----------------------------------------------------------------------------
void launch_embed(cudaStream_t s, const WDesc* table, int wtype, int64_t vrows, int D, const int* ids, int T, int64_t vocabStart,
                  float* y, int round);
void launch_rms_norm(cudaStream_t s, const float* x, int T, int D, const WDesc* w, int wtype, float eps, float* y, int round);
void launch_add(cudaStream_t s, const float* a, const float* b, int64_t n, float* y, int round);
void launch_silu_mul(cudaStream_t s, const float* g, const float* u, int64_t n, float* y, int round);
void launch_concat(cudaStream_t s, const float* a, const float* b, int T, int ca, int cb, float* y);
void launch_slice(cudaStream_t s, const float* x, int T, int C, int c0, int c1, float* y);
void launch_rows(cudaStream_t s, const float* x, int C, const int* rows, int n, float* y);
void launch_rope(cudaStream_t s, const float* x, int T, int H, int hd, int off, int rd, const int* pos, const float* inv,
                 float attn, float* y, int round);
void launch_argmax(cudaStream_t s, const float* x, int T, int N, int chunks, float* pv, int* pi, int* out);
/** [ws, rows, cols] (ranks' blocks, as ncclAllGather leaves them) -> [rows, ws * cols] */
void launch_gather_cols(cudaStream_t s, const float* g, int ws, int rows, int cols, float* y);
/** sampling on the device (sample.cu): params float64 [T, 4] = temperature, top_k, top_p, min_p; u float64 [T];
 *  scratch float64 [T, N]; ids [T] (-1: the row has NaN/+inf or nothing finite), logprobs [T] */
void launch_sample(cudaStream_t s, const float* x, int T, int N, const double* params, const double* u, double* scratch, int* ids,
                   float* logprobs);
/** OCP e4m3fn weight bytes -> e4m3fnuz in place (0x80 -> 0, others unchanged) and their block scales doubled */
void launch_fp8_to_fnuz(cudaStream_t s, uint8_t* w, int64_t n, float* scale, int64_t nscale);
void launch_fill_random(cudaStream_t s, void* out, int dtype, int64_t n, uint64_t seed, float amp);
void launch_fill_const(cudaStream_t s, float* out, int64_t n, float v);
void launch_dequant_f32(cudaStream_t s, const uint8_t* w, const float* scale, int64_t rows, int64_t cols, int sc, int o0, int o1,
                        float* out);

// ---- MLA ------------------------------------------------------------------------------------
struct CacheMeta {
  const int* pos;
  const int* seq;
  const int* bt;
  int maxBlocks;
  int bs;
};
void launch_cache_write(cudaStream_t s, const float* kv, const float* pe, int T, int C, int R, void* cache, int bf16,
                        int64_t layerOff, const CacheMeta& m);
void launch_mla_absorb(cudaStream_t s, const float* q, int T, int H, int QW, int nope, const WDesc* w, int wtype, int HD, int C,
                       float* qa);
struct AttnArgs {
  const float* qa;  // [T, H, C]
  const float* q;   // [T, H * QW], q_pe at h * QW + nope
  int QW, nope;
  const void* cache;
  int cbf16;
  int64_t layerOff;
  int C, R;
  CacheMeta m;
  int T, H, hg;
  float scale;
  int nsplit, splitLen;
  float* out;      // nsplit == 1: [T, H, C]
  float* part_o;   // nsplit > 1: [T, H, nsplit, C]
  float* part_ml;  // [T, H, nsplit, 2]
};
void launch_mla_attn(cudaStream_t s, const AttnArgs& a);
/** tensor-core variant for a bf16 cache (positions per split must be a multiple of 64) */
bool mla_attn_tc_ok(int C, int R, int hg, int cbf16);
/** most heads per attention block whose shared memory fits the device (16 on CUDA; fewer on AMD's 64 KB LDS) */
int mla_attn_max_heads(int C, int R);
void launch_mla_attn_tc(cudaStream_t s, const AttnArgs& a);
void launch_fill_cache_random(cudaStream_t s, void* cache, int bf16, int64_t n, uint64_t seed);

// ---- MoE ------------------------------------------------------------------------------------
void launch_moe_route(cudaStream_t s, const float* logits, int T, int E, const float* bias, int topk, int ng, int tg, int sigmoid,
                      int norm, float scale, float* out);
struct MoePlan {
  int* counters;    // [4]: nActive, nTiles, nPairs, spare
  int* slotExpert;  // [nLocal]
  int* slotOff;     // [nLocal]
  int* slotCnt;     // [nLocal]
  int* tileSlot;    // [maxTiles]
  int* tileM;       // [maxTiles]
  int* pairTok;     // [T * topk] sorted pair -> token
  int* pairOf;      // [T * topk] (t, k) -> sorted pair or -1
};
void launch_moe_plan(cudaStream_t s, const float* routing, int T, int topk, int first, int nLocal, int bm, const MoePlan& p);
void launch_moe_combine(cudaStream_t s, const float* Y, const int* pairOf, const float* routing, int T, int topk, int D, float* out,
                        int round);

}  // namespace ds3cu
