// ds3 CUDA backend: sampling on the device (temperature, top-k, top-p, min-p), so that only token ids
// (and their logprobs) cross back. Semantics of @ds3/core's Sampler (vLLM's order: top-k, then top-p,
// then min-p), including the order in which it walks the candidates with the uniform draw u, so that
// the same u picks the same id up to float64 rounding:
//   w_i = exp((l_i - max) / T) in float64; T < 1e-5: greedy (argmax, ties to the lowest id);
//   "sorted order" = logit descending, ties to the lowest id;
//   top-k (0 < k < V): the first k in sorted order; walked in sorted order;
//   top-p: the shortest prefix (in sorted order) of the candidates whose weight reaches p * their mass;
//     without top-k the CPU keeps whole buckets of -ln(w) (1/64 nat) in index order and sorts only the
//     boundary bucket: walked as (buckets above the boundary, index order) then (boundary bucket, sorted);
//   min-p: keeps w >= min_p (order kept); no filter at all: index order over every id.
// The draw: the first candidate in walk order at which the running sum of w exceeds u * mass.
// One block of 1024 threads per row; float64 weights are kept in a scratch row. Sorted-order prefixes
// are found by a radix search over an order-preserving 32-bit key (4 passes of 8 bits; mass histograms
// accumulate in shared memory with float64 atomics, so their low bits may vary from run to run), ties
// on the key are resolved in index order by a block scan.
#include <cfloat>

#include "common.cuh"

namespace ds3cu {

namespace {

#ifndef DS3_SAMPLE_THREADS
#define DS3_SAMPLE_THREADS 1024
#endif
constexpr int ST = DS3_SAMPLE_THREADS;  // threads per row (32 warps of 32, 16 waves of 64); the emulator test uses fewer
constexpr int NW = ST / WARP;
constexpr int NB = 4096;  // top-p buckets of the CPU reference (1/64 nat each)
// masses in shared-memory histograms: fixed point with 46 fraction bits (w <= 1, V * 2^46 < 2^63), exact and
// order independent (deterministic), added with warp-aggregated 64-bit integer atomics
constexpr double FX = 70368744177664.0;  // 2^46
constexpr double IFX = 1.0 / FX;
constexpr int INTMAX = 0x7fffffff;

/** ascending in "rank": the largest logit first; NaN ranks last */
__device__ __forceinline__ uint32_t rank_key(float l) {
  if (l != l) return 0xffffffffu;
  uint32_t b = __float_as_uint(l);
  b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);  // ascending in l
  return ~b;
}

struct Sh {
  double red[NW];
  double wtot[NW];
  unsigned long long hm[256];
  unsigned int hc[256];
  int found;
  uint32_t prefix;
  double rem;
  int cut;
  int iv;
  unsigned long long uv;
};

__device__ double warp_sum_d(double v) {
  for (int o = WARP / 2; o > 0; o >>= 1) v += shfl_xor(v, o);
  return v;
}

__device__ double block_sum_d(double v, Sh& s) {
  v = warp_sum_d(v);
  const int w = threadIdx.x / WARP, l = threadIdx.x % WARP;
  __syncthreads();
  if (l == 0) s.red[w] = v;
  __syncthreads();
  double r = 0;
  for (int i = 0; i < NW; i++) r += s.red[i];  // fixed order: deterministic
  __syncthreads();
  return r;
}

/** predicate of the candidate set, as prefixes in sorted order and index-order filters */
struct Pred {
  // sorted-order prefix: rank < tau, or rank == tau and index <= cut (tau = 0xffffffff, cut = INT_MAX: all)
  uint32_t tau = 0xffffffffu;
  int cut = INTMAX;
  double minw = -1.0;  // w >= minw
  // top-p without top-k: only w >= wlo, and bucket in [bLo, bHi]
  double wlo = -1.0;
  int bLo = 0, bHi = NB;
  bool eqOnly = false;  // and only rank == eqRank
  uint32_t eqRank = 0;
};

struct Row {
  const float* l;
  const double* w;
  const uint16_t* bk;  // buckets (top-p without top-k), or null
  int N;
  __device__ bool in(const Pred& p, int i) const { return in(p, i, rank_key(l[i])); }
  __device__ bool in(const Pred& p, int i, uint32_t r) const {
    if (!(r < p.tau || (r == p.tau && i <= p.cut))) return false;
    if (p.eqOnly && r != p.eqRank) return false;
    if (p.minw > 0 || p.wlo > 0) {
      const double wi = w[i];
      if (!(wi >= p.minw) || !(wi >= p.wlo)) return false;
    }
    if (p.bHi < NB || p.bLo > 0) {
      const int b = bk[i];
      if (b < p.bLo || b > p.bHi) return false;
    }
    return true;
  }
};

/** index-order search: the first i in pred whose running weight (count if !mass) passes rem (strict: > rem,
 *  else >= rem); -1 when the total does not. Each warp owns a contiguous range; pass 1 sums the ranges
 *  (coalesced), the warp whose range holds the crossing scans it in steps of WARP with a warp scan. */
__device__ int index_search(const Row& R, const Pred& p, bool mass, bool strict, double rem, double* tot, Sh& s) {
  const int wp = threadIdx.x / WARP, ln = threadIdx.x % WARP;
  const int per = (((R.N + NW - 1) / NW) + WARP - 1) & ~(WARP - 1);
  const int b0 = wp * per, b1 = min(R.N, b0 + per);
  double acc = 0;
  for (int i = b0 + ln; i < b1; i += WARP)
    if (R.in(p, i)) acc += mass ? R.w[i] : 1.0;
  acc = warp_sum_d(acc);
  __syncthreads();
  if (ln == 0) s.wtot[wp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double run = 0;
    int w = -1;
    for (int k = 0; k < NW; k++) {
      const double v = s.wtot[k];
      if (w < 0 && (strict ? run + v > rem : (run < rem && run + v >= rem))) {
        w = k;
        s.rem = run;  // before the crossing warp
      }
      run += v;
    }
    s.red[0] = run;
    s.iv = w;
    s.cut = -1;
  }
  __syncthreads();
  const double total = s.red[0];
  const int cw = s.iv;
  if (wp == cw) {
    double carry = s.rem;
    int last = -1;
    for (int i0 = b0; i0 < b1; i0 += WARP) {
      const int i = i0 + ln;
      const bool inp = i < b1 && R.in(p, i);
      const double v = inp ? (mass ? R.w[i] : 1.0) : 0.0;
      double inc = v;
      for (int o = 1; o < WARP; o <<= 1) {
        const double t = shfl_up(inc, o);
        if (ln >= o) inc += t;
      }
      const double run = carry + inc;
      const lanemask_t hit = ballot(inp && (strict ? run > rem : run >= rem));
      const lanemask_t anyp = ballot(inp);
      if (anyp) last = i0 + highest_lane(anyp);
      if (hit) {
        if (ln == 0) s.cut = i0 + lowest_lane(hit);
        last = -2;
        break;
      }
      carry += shfl(inc, WARP - 1);
    }
    // the range sums said it crosses here but the running sum fell short by rounding: its last element
    if (last >= 0 && ln == 0) s.cut = last;
  }
  __syncthreads();
  const int r = s.cut;
  if (tot) *tot = total;
  __syncthreads();
  return r;
}

/** sorted-order search: the shortest prefix of pred (sorted order) whose weight passes rem; returns the
 *  last element's (rank, index) in *tau / *cut (cut = INT_MAX: all ties of tau), false when even the whole
 *  set does not. Four radix passes over the rank key (8 bits each), then the ties in index order. */
__device__ bool sorted_search(const Row& R, const Pred& p, bool mass, bool strict, double rem, uint32_t* tau, int* cut, Sh& s) {
  const int wp = threadIdx.x / WARP, ln = threadIdx.x % WARP;
  uint32_t prefix = 0, mask = 0;
  for (int pass = 0; pass < 4; pass++) {
    const int shift = 24 - 8 * pass;
    for (int b = threadIdx.x; b < 256; b += ST) {
      s.hm[b] = 0;
      s.hc[b] = 0;
    }
    __syncthreads();
    for (int i0 = wp * WARP; i0 < R.N; i0 += ST) {
      const int i = i0 + ln;
      bool act = false;
      uint32_t r = 0;
      if (i < R.N) {
        r = rank_key(R.l[i]);
        act = (r & mask) == prefix && R.in(p, i, r);
      }
      const unsigned bin = act ? (r >> shift) & 255u : 256u;
      const lanemask_t g = match_any(bin);
      const bool leader = act && ln == lowest_lane(g);
      if (mass) {
        const unsigned long long q = act ? (unsigned long long)(R.w[i] * FX) : 0ull;
        const unsigned hi = unsigned(q >> 23), lo = unsigned(q & 0x7fffffu);
        unsigned hs, ls;  // (hi: at most WARP values <= 2^23 (w <= 1): no 32-bit overflow at 64 lanes)
        group_add2(g, hi, lo, hs, ls);
        if (leader) atomicAdd(&s.hm[bin], ((unsigned long long)hs << 23) + ls);
      } else if (leader) {
        atomicAdd(&s.hc[bin], unsigned(popc(g)));
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      double cum = 0;
      int chosen = -1;
      for (int b = 0; b < 256; b++) {
        const double h = mass ? double(s.hm[b]) * IFX : double(s.hc[b]);
        if (h == 0) continue;
        if (strict ? cum + h > rem : cum + h >= rem) {
          chosen = b;
          break;
        }
        cum += h;
      }
      s.found = chosen >= 0;
      if (chosen >= 0) {
        s.prefix = prefix | (uint32_t(chosen) << shift);
        s.rem = rem - cum;
      }
    }
    __syncthreads();
    const bool found = s.found;
    const uint32_t np = s.prefix;
    const double nr = s.rem;
    __syncthreads();
    if (!found) return false;
    prefix = np;
    mask |= 255u << shift;
    rem = nr;
  }
  Pred q = p;
  q.eqRank = prefix;
  q.eqOnly = true;
  const int c = index_search(R, q, mass, strict, rem, nullptr, s);
  *tau = prefix;
  *cut = c < 0 ? INTMAX : c;
  return true;
}

/** the last element of pred in sorted order (largest rank, then largest index) */
__device__ int last_sorted(const Row& R, const Pred& p, Sh& s) {
  unsigned long long best = 0;
  for (int i = threadIdx.x; i < R.N; i += ST) {
    const uint32_t r = rank_key(R.l[i]);
    if (!R.in(p, i, r)) continue;
    const unsigned long long k = ((unsigned long long)r << 32 | uint32_t(i)) + 1;
    if (k > best) best = k;
  }
  if (threadIdx.x == 0) s.uv = 0;
  __syncthreads();
  if (best) atomicMax(&s.uv, best);
  __syncthreads();
  const unsigned long long r = s.uv;
  __syncthreads();
  return r == 0 ? -1 : int(uint32_t((r - 1) & 0xffffffffu));
}

/** the last element of pred in index order */
__device__ int last_index(const Row& R, const Pred& p, Sh& s) {
  int best = -1;
  for (int i = threadIdx.x; i < R.N; i += ST)
    if (R.in(p, i)) best = i;
  if (threadIdx.x == 0) s.iv = -1;
  __syncthreads();
  if (best >= 0) atomicMax(&s.iv, best);
  __syncthreads();
  const int r = s.iv;
  __syncthreads();
  return r;
}

/** the last element (index order) among the ties of rank tau in pred */
__device__ int last_tie(const Row& R, const Pred& p, uint32_t tau, Sh& s) {
  Pred q = p;
  q.eqRank = tau;
  q.eqOnly = true;
  return last_index(R, q, s);
}

__global__ void __launch_bounds__(ST) sample_kernel(const float* __restrict__ x, int N, const double* __restrict__ params,
                                                    const double* __restrict__ uu, double* __restrict__ scratch,
                                                    uint16_t* __restrict__ bscratch, int* __restrict__ outId, float* __restrict__ outLp) {
  __shared__ Sh s;
  __shared__ unsigned long long mbuck[NB];
  const int row = blockIdx.x;
  const float* l = x + int64_t(row) * N;
  double* w = scratch + int64_t(row) * N;
  uint16_t* bk = bscratch + int64_t(row) * N;
  const double T = params[row * 4 + 0];
  const double topK = params[row * 4 + 1];
  const double topP = params[row * 4 + 2];
  const double minP = params[row * 4 + 3];
  const double u = uu[row];
  const int wp = threadIdx.x / WARP, ln = threadIdx.x % WARP;

  // max / argmax (ties to the lowest id; NaN never wins)
  float bv = -INFINITY;
  int bi = INTMAX;
  bool bad = false;
  for (int i = threadIdx.x; i < N; i += ST) {
    const float v = l[i];
    if (v != v || v == INFINITY) bad = true;
    if (v > bv || (v == bv && i < bi)) bv = v, bi = i;
  }
  for (int o = WARP / 2; o > 0; o >>= 1) {
    const float v2 = shfl_xor(bv, o);
    const int i2 = shfl_xor(bi, o);
    if (v2 > bv || (v2 == bv && i2 < bi)) bv = v2, bi = i2;
  }
  __shared__ float fred[NW];
  __shared__ int ired[NW];
  __shared__ int sbad;
  if (threadIdx.x == 0) sbad = 0;
  __syncthreads();
  if (ln == 0) fred[wp] = bv, ired[wp] = bi;
  if (bad) atomicOr(&sbad, 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int k = 1; k < NW; k++)
      if (fred[k] > bv || (fred[k] == bv && ired[k] < bi)) bv = fred[k], bi = ired[k];
    fred[0] = bv;
    ired[0] = bi;
  }
  __syncthreads();
  const float mx = fred[0];
  const int best = ired[0];
  const bool broken = sbad || mx == -INFINITY;
  __syncthreads();
  const bool greedy = broken || T < 1e-5;
  // log-sum-exp (the logprob of the pick) and, unless greedy, the weights w = exp((l - max) / T) and their total
  double se = 0, tot = 0;
  for (int i = threadIdx.x; i < N; i += ST) {
    const double d = double(l[i]) - double(mx);
    if (!broken) se += exp(d);
    if (!greedy) {
      const double v = exp(d / T);
      w[i] = v;
      tot += v;
    }
  }
  se = block_sum_d(se, s);
  tot = block_sum_d(tot, s);  // (its barriers also publish w)
  const double lse = double(mx) + log(se);
  auto finish = [&](int id) {
    if (threadIdx.x == 0) {
      outId[row] = broken ? -1 : id;
      outLp[row] = broken ? NAN : float(double(l[id]) - lse);
    }
  };
  if (greedy) {
    finish(best);
    return;
  }
  Row R{l, w, nullptr, N};
  const int K = int(topK);
  const bool useK = topK > 0 && K < N;

  Pred p;  // the candidates after each filter
  if (useK) {
    uint32_t tau;
    int cut;
    if (sorted_search(R, p, false, false, double(K), &tau, &cut, s)) p.tau = tau, p.cut = cut;
  }
  if (topP < 1) {
    if (useK) {
      double mk = 0;
      index_search(R, p, true, true, INFINITY, &mk, s);  // mass of the top-k set
      uint32_t tau;
      int cut;
      if (sorted_search(R, p, true, false, topP * mk, &tau, &cut, s)) {
        // intersect two sorted-order prefixes: the shorter one
        if (tau < p.tau || (tau == p.tau && cut < p.cut)) p.tau = tau, p.cut = cut;
      }
    } else {
      // the CPU: candidates w >= (1 - p) * total / V, bucket masses, whole buckets kept, the boundary sorted
      const double wlo = ((1 - topP) * tot) / double(N);
      for (int b = threadIdx.x; b < NB; b += ST) mbuck[b] = 0;
      __syncthreads();
      for (int i0 = wp * WARP; i0 < N; i0 += ST) {
        const int i = i0 + ln;
        bool act = false;
        unsigned b = NB;
        unsigned long long q = 0;
        if (i < N) {
          const double v = floor(((double(mx) - double(l[i])) / T) * 64.0);  // as the CPU, in float64
          b = v >= double(NB - 1) ? unsigned(NB - 1) : unsigned(v);
          bk[i] = uint16_t(b);
          act = w[i] >= wlo;
          q = act ? (unsigned long long)(w[i] * FX) : 0ull;
        }
        const unsigned key = act ? b : unsigned(NB);
        const lanemask_t g = match_any(key);
        unsigned hs, ls;
        group_add2(g, unsigned(q >> 23), unsigned(q & 0x7fffffu), hs, ls);
        if (act && ln == lowest_lane(g)) atomicAdd(&mbuck[b], ((unsigned long long)hs << 23) + ls);
      }
      __syncthreads();
      // first bucket where the remaining target <= its mass (CPU: skip while m[b] < target); warps sum
      // NB / NW-bucket segments, thread 0 walks the segments, then the buckets of one segment
      {
        unsigned long long segsum = 0;
        for (int b = wp * (NB / NW) + ln; b < (wp + 1) * (NB / NW); b += WARP) segsum += mbuck[b];
        for (int o = WARP / 2; o > 0; o >>= 1) segsum += shfl_xor(segsum, o);
        __shared__ unsigned long long segs[NW];
        if (ln == 0) segs[wp] = segsum;
        __syncthreads();
        if (threadIdx.x == 0) {
          double target = topP * tot;
          int b = 0;
          int seg = 0;
          for (; seg < NW - 1; seg++) {
            const double m = double(segs[seg]) * IFX;
            if (!(m < target)) break;
            target -= m;
          }
          for (b = seg * (NB / NW); b < NB - 1; b++) {
            const double m = double(mbuck[b]) * IFX;
            if (!(m < target)) break;
            target -= m;
          }
          s.cut = b;
          s.rem = target;
        }
        __syncthreads();
      }
      const int bEdge = s.cut;
      const double remEdge = s.rem;
      __syncthreads();
      R.bk = bk;
      Pred edge;
      edge.wlo = wlo;
      edge.bLo = edge.bHi = bEdge;
      uint32_t tau;
      int cut;
      if (sorted_search(R, edge, true, false, remEdge, &tau, &cut, s)) edge.tau = tau, edge.cut = cut;
      // walk: p (bucket < bEdge, index order), then edge (sorted); min-p applies to both
      p.wlo = wlo;
      p.bLo = 0;
      p.bHi = bEdge - 1;
      p.minw = minP > 0 ? minP : -1.0;
      Pred e2 = edge;
      e2.minw = p.minw;
      double mKeep = 0, mEdge = 0;
      if (bEdge > 0) index_search(R, p, true, true, INFINITY, &mKeep, s);
      index_search(R, e2, true, true, INFINITY, &mEdge, s);
      const double F = mKeep + mEdge;
      const double target = u * F;
      int id = -1;
      if (bEdge > 0 && mKeep > target) id = index_search(R, p, true, true, target, nullptr, s);
      if (id < 0) {
        uint32_t t2;
        int c2;
        if (sorted_search(R, e2, true, true, target - mKeep, &t2, &c2, s)) id = c2 != INTMAX ? c2 : last_tie(R, e2, t2, s);
      }
      if (id < 0) {  // rounding: the last candidate of the walk
        id = last_sorted(R, e2, s);
        if (id < 0 && bEdge > 0) id = last_index(R, p, s);
      }
      finish(id < 0 ? best : id);
      return;
    }
  }
  if (minP > 0) p.minw = minP;

  double F = 0;
  index_search(R, p, true, true, INFINITY, &F, s);
  const double target = u * F;
  int id = -1;
  if (useK || topP < 1) {
    uint32_t tau;
    int cut;
    if (sorted_search(R, p, true, true, target, &tau, &cut, s)) id = cut != INTMAX ? cut : last_tie(R, p, tau, s);
    if (id < 0) id = last_sorted(R, p, s);
  } else {
    id = index_search(R, p, true, true, target, nullptr, s);
    if (id < 0) id = minP > 0 ? last_index(R, p, s) : best;
  }
  finish(id < 0 ? best : id);
}

}  // namespace

void launch_sample(cudaStream_t s, const float* x, int T, int N, const double* params, const double* u, double* scratch, int* ids,
                   float* logprobs) {
  // scratch: float64 weights [T, N], then uint16 buckets [T, N]
  if (T > 0)
    sample_kernel<<<T, ST, 0, s>>>(x, N, params, u, scratch, reinterpret_cast<uint16_t*>(scratch + int64_t(T) * N), ids, logprobs);
}

}  // namespace ds3cu
