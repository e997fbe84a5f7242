// ds3 CUDA backend: mixture of experts.
//  - moe_route: fused routing per token (sigmoid/softmax, correction bias, group-limited top-k,
//    renormalization, route scale) over router logits computed by the linear kernels.
//  - moe_plan: one block turns the routing into a grouped-GEMM plan on the device (no host sync):
//    per local expert its tokens (sorted pair order), the active experts, and (expert, 64-row tile)
//    work items for the tiled kernels.
//  - moe_combine: y[t] = sum_k w[t,k] * expert_out[pair(t,k)], in slot order (batch invariant).
#include "common.cuh"

namespace ds3cu {

__device__ void block_argmax(float v, int i, float* rv, int* ri, float& bv, int& bi) {
  for (int o = WARP / 2; o > 0; o >>= 1) {
    const float v2 = shfl_xor(v, o);
    const int i2 = shfl_xor(i, o);
    if (v2 > v || (v2 == v && i2 < i)) v = v2, i = i2;
  }
  const int w = threadIdx.x / WARP, l = threadIdx.x % WARP;
  __syncthreads();
  if (l == 0) rv[w] = v, ri[w] = i;
  __syncthreads();
  bv = rv[0];
  bi = ri[0];
  for (int k = 1; k < int(blockDim.x / WARP); k++)
    if (rv[k] > bv || (rv[k] == bv && ri[k] < bi)) bv = rv[k], bi = ri[k];
}

__device__ float block_reduce(float v, float* red, bool isMax) {
  for (int o = WARP / 2; o > 0; o >>= 1) {
    const float v2 = shfl_xor(v, o);
    v = isMax ? fmaxf(v, v2) : v + v2;
  }
  const int w = threadIdx.x / WARP, l = threadIdx.x % WARP;
  __syncthreads();
  if (l == 0) red[w] = v;
  __syncthreads();
  float r = red[0];
  for (int k = 1; k < int(blockDim.x / WARP); k++) r = isMax ? fmaxf(r, red[k]) : r + red[k];
  return r;
}

__global__ void moe_route_kernel(const float* __restrict__ logits, int E, const float* __restrict__ bias, int topk, int ng, int tg,
                                 int sigmoid, int norm, float scale, float* __restrict__ out) {
  extern __shared__ float sh[];  // scores[E], choices[E]
  float* scs = sh;
  float* gs = sh + E;
  __shared__ float rv[32];
  __shared__ int ri[32];
  __shared__ int keep[64];
  __shared__ int sel[64];
  const int t = blockIdx.x, e = threadIdx.x;
  const float lg = e < E ? logits[int64_t(t) * E + e] : -INFINITY;
  float sc;
  if (sigmoid) {
    sc = e < E ? 1.0f / (1.0f + expf(-lg)) : 0.f;
  } else {
    const float mx = block_reduce(lg, rv, true);
    const float ex = e < E ? expf(lg - mx) : 0.f;
    const float s = block_reduce(ex, rv, false);
    sc = ex / s;
  }
  float ch = e < E ? sc + (bias ? bias[e] : 0.f) : -INFINITY;
  if (e < E) scs[e] = sc;
  __syncthreads();
  if (ng > 1) {
    const int per = E / ng;
    if (e < E) gs[e] = ch;
    __syncthreads();
    // group scores (one thread per group, serial over the group, as the reference)
    __shared__ float gsc[64];
    if (e < ng) {
      const float* v = gs + e * per;
      float a = -INFINITY, b2 = -INFINITY;
      if (bias) {
        for (int k = 0; k < per; k++) {
          if (v[k] > a) {
            b2 = a;
            a = v[k];
          } else if (v[k] > b2) {
            b2 = v[k];
          }
        }
        gsc[e] = per > 1 ? a + b2 : a;
      } else {
        for (int k = 0; k < per; k++) a = fmaxf(a, v[k]);
        gsc[e] = a;
      }
    }
    __syncthreads();
    if (e == 0) {
      for (int g = 0; g < ng; g++) keep[g] = 0;
      for (int k = 0; k < tg; k++) {
        int bi = -1;
        float bv = -INFINITY;
        for (int g = 0; g < ng; g++)
          if (!keep[g] && (bi < 0 || gsc[g] > bv)) bv = gsc[g], bi = g;
        keep[bi] = 1;
      }
    }
    __syncthreads();
    if (e < E && !keep[e / per]) ch = -INFINITY;
  }
  bool taken = false;
  for (int k = 0; k < topk; k++) {
    float bv;
    int bi;
    block_argmax(taken || e >= E ? -INFINITY : ch, taken || e >= E ? 0x7fffffff : e, rv, ri, bv, bi);
    if (e == bi) taken = true;
    if (e == 0) sel[k] = bi;
  }
  __syncthreads();
  if (e == 0) {
    float s = 0.f;
    for (int k = 0; k < topk; k++) s += scs[sel[k]];
    float* o = out + int64_t(t) * 2 * topk;
    for (int k = 0; k < topk; k++) {
      float w = scs[sel[k]];
      if (norm) w /= (s + 1e-20f);
      o[k] = w * scale;
      o[topk + k] = float(sel[k]);
    }
  }
}

void launch_moe_route(cudaStream_t s, const float* logits, int T, int E, const float* bias, int topk, int ng, int tg, int sigmoid,
                      int norm, float scale, float* out) {
  if (T <= 0) return;
  const int threads = ((E + WARP - 1) / WARP) * WARP;  // whole warps: the reductions read every lane
  moe_route_kernel<<<T, threads, size_t(2 * E) * sizeof(float), s>>>(logits, E, bias, topk, ng, tg, sigmoid, norm, scale, out);
}

__global__ void __launch_bounds__(1024) moe_plan_kernel(const float* __restrict__ routing, int T, int topk, int first, int nLocal,
                                                        int bm, MoePlan p) {
  extern __shared__ int shi[];
  int* cnt = shi;
  int* off = cnt + nLocal;
  int* fill = off + nLocal;
  const int tid = threadIdx.x;
  for (int e = tid; e < nLocal; e += blockDim.x) cnt[e] = 0, fill[e] = 0;
  __syncthreads();
  const int P = T * topk;
  for (int i = tid; i < P; i += blockDim.x) {
    const int t = i / topk, k = i - t * topk;
    const int e = int(routing[int64_t(t) * 2 * topk + topk + k]) - first;
    if (e >= 0 && e < nLocal) atomicAdd(&cnt[e], 1);
  }
  __syncthreads();
  if (tid < WARP) {
    // warp 0 scans the experts WARP at a time: row offsets, active slots, (slot, m-tile) work items
    int o = 0, na = 0, nt = 0;
    for (int base = 0; base < nLocal; base += WARP) {
      const int e = base + tid;
      const int c = e < nLocal ? cnt[e] : 0;
      const int act = c > 0 ? 1 : 0, tl = (c + bm - 1) / bm;
      int sc = c, sa = act, st = tl;  // inclusive scans
      for (int d = 1; d < WARP; d <<= 1) {
        const int x1 = shfl_up(sc, d), x2 = shfl_up(sa, d), x3 = shfl_up(st, d);
        if (tid >= d) sc += x1, sa += x2, st += x3;
      }
      const int myOff = o + sc - c, mySlot = na + sa - act, myTile = nt + st - tl;
      if (e < nLocal) {
        off[e] = myOff;
        if (act) {
          p.slotExpert[mySlot] = e;
          p.slotOff[mySlot] = myOff;
          p.slotCnt[mySlot] = c;
          for (int m = 0; m < tl; m++) {
            p.tileSlot[myTile + m] = mySlot;
            p.tileM[myTile + m] = m;
          }
        }
      }
      o += shfl(sc, WARP - 1);
      na += shfl(sa, WARP - 1);
      nt += shfl(st, WARP - 1);
    }
    if (tid == 0) {
      p.counters[0] = na;
      p.counters[1] = nt;
      p.counters[2] = o;
    }
  }
  __syncthreads();
  for (int i = tid; i < P; i += blockDim.x) {
    const int t = i / topk, k = i - t * topk;
    const int e = int(routing[int64_t(t) * 2 * topk + topk + k]) - first;
    if (e >= 0 && e < nLocal) {
      const int pos = off[e] + atomicAdd(&fill[e], 1);
      p.pairTok[pos] = t;
      p.pairOf[i] = pos;
    } else {
      p.pairOf[i] = -1;
    }
  }
}

void launch_moe_plan(cudaStream_t s, const float* routing, int T, int topk, int first, int nLocal, int bm, const MoePlan& p) {
  moe_plan_kernel<<<1, 1024, size_t(3) * nLocal * sizeof(int), s>>>(routing, T, topk, first, nLocal, bm, p);
}

__global__ void moe_combine_kernel(const float* __restrict__ Y, const int* __restrict__ pairOf, const float* __restrict__ routing,
                                   int topk, int D, float* __restrict__ out, int round) {
  const int t = blockIdx.x;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int k = 0; k < topk; k++) {
      const int pr = pairOf[t * topk + k];
      if (pr >= 0) acc += routing[int64_t(t) * 2 * topk + k] * Y[int64_t(pr) * D + d];
    }
    out[int64_t(t) * D + d] = maybe_bf16(acc, round);
  }
}
void launch_moe_combine(cudaStream_t s, const float* Y, const int* pairOf, const float* routing, int T, int topk, int D, float* out,
                        int round) {
  if (T > 0) moe_combine_kernel<<<T, 256, 0, s>>>(Y, pairOf, routing, topk, D, out, round);
}

}  // namespace ds3cu
