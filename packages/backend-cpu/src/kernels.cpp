// ds3 CPU backend kernels. Every kernel computes each token independently of the others in
// the batch, with a fixed summation order, so a sequence gives bit-identical results alone or
// batched (the engine's batching-invariance tests rely on it).
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace ds3 {

float FP8_LUT[256];

float fp8e4m3_to_f32(uint8_t v) {
  int s = v >> 7, e = (v >> 3) & 15, m = v & 7;
  float f;
  if (e == 15 && m == 7) f = std::numeric_limits<float>::quiet_NaN();
  else if (e == 0) f = std::ldexp(float(m) / 8.0f, -6);
  else f = std::ldexp(1.0f + float(m) / 8.0f, e - 7);
  return s ? -f : f;
}

void init_tables() {
  for (int i = 0; i < 256; i++) FP8_LUT[i] = fp8e4m3_to_f32(uint8_t(i));
}

float f16_to_f32(uint16_t h) {
  int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
  float f;
  if (e == 0) f = std::ldexp(float(m), -24);
  else if (e == 31) f = m ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  else f = std::ldexp(1.0f + float(m) / 1024.0f, e - 15);
  return s ? -f : f;
}

float round_fp8e4m3(float x) {
  if (std::isnan(x)) return x;
  float a = std::fabs(x);
  if (a >= 448.0f) return std::copysign(448.0f, x);
  if (a == 0.0f) return x;
  int e;
  std::frexp(a, &e);          // a = f * 2^e, f in [0.5, 1)
  int ex = std::max(e - 1, -6);  // unbiased exponent, subnormals below 2^-6
  float q = std::ldexp(1.0f, ex - 3);  // spacing: 3 mantissa bits
  float r = std::nearbyint(a / q) * q;  // round half to even (default rounding mode)
  return std::copysign(std::min(r, 448.0f), x);
}

float round_fp8e4m3fnuz(float x) {
  if (std::isnan(x)) return x;
  float a = std::fabs(x);
  if (a >= 240.0f) return std::copysign(240.0f, x);
  int e;
  std::frexp(a, &e);
  int ex = std::max(e - 1, -7);        // bias 8: normals from 2^-7, subnormals m * 2^-10 below
  float q = std::ldexp(1.0f, ex - 3);  // spacing: 3 mantissa bits
  float r = std::min(std::nearbyint(a / q) * q, 240.0f);  // round half to even
  return r == 0.0f ? 0.0f : std::copysign(r, x);         // no -0: zero is the one code 0x00
}

int64_t fp8_fn_to_fnuz(uint8_t* data, int64_t n, float* scale, int64_t ns) {
  int64_t nan = 0;
  for (int64_t i = 0; i < n; i++) {
    if (data[i] == 0x80) data[i] = 0x00;
    else if ((data[i] & 0x7f) == 0x7f) nan++;
  }
  for (int64_t i = 0; i < ns; i++) scale[i] *= 2.0f;
  return nan;
}

// ---- pool ---------------------------------------------------------------------------
Pool::Pool(int n, const Kern* k) : kern_(k ? k : find_kern("auto")) {
  for (int i = 1; i < n; i++) workers_.emplace_back([this, i] { loop(i); });
}
Pool::~Pool() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}
// Work is handed out in chunks to whichever thread asks first, and the caller waits only for
// chunks in flight: a worker the OS has not scheduled yet (a busy machine) delays nothing, it
// finds the job done when it wakes. No result depends on which thread ran a chunk.
void Pool::loop(int) {
  uint64_t seen = 0;
  std::unique_lock<std::mutex> l(mu_);
  for (;;) {
    cv_.wait(l, [&] { return stop_ || gen_ != seen; });
    if (stop_) return;
    seen = gen_;
    while (next_ < n_) {
      int64_t b = next_;
      next_ = std::min(n_, next_ + chunk_);
      int64_t e = next_;
      const auto* job = job_;
      pending_++;
      l.unlock();
      (*job)(b, e);
      l.lock();
      if (--pending_ == 0 && next_ >= n_) done_cv_.notify_all();
    }
  }
}
void Pool::parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn, int64_t min_chunk) {
  if (n <= 0) return;
  int threads = size();
  if (threads == 1 || n <= min_chunk) {
    fn(0, n);
    return;
  }
  int64_t chunk = std::max<int64_t>(min_chunk, (n + threads * 4 - 1) / (threads * 4));
  std::unique_lock<std::mutex> l(mu_);
  job_ = &fn;
  n_ = n;
  chunk_ = chunk;
  next_ = 0;
  pending_ = 0;
  gen_++;
  cv_.notify_all();
  while (next_ < n_) {
    int64_t b = next_;
    next_ = std::min(n_, next_ + chunk_);
    int64_t e = next_;
    l.unlock();
    fn(b, e);
    l.lock();
  }
  done_cv_.wait(l, [&] { return pending_ == 0; });
  job_ = nullptr;
  n_ = 0;
}

// ---- weights ------------------------------------------------------------------------
void Weight::row(int64_t r, float* out) const {
  const uint8_t* base = data.data() + size_t(r) * size_t(cols) * esize();
  switch (dtype) {
    case WDType::F32:
      std::memcpy(out, base, size_t(cols) * 4);
      break;
    case WDType::BF16: {
      const uint16_t* p = reinterpret_cast<const uint16_t*>(base);
      for (int64_t c = 0; c < cols; c++) out[c] = bf16_to_f32(p[c]);
      break;
    }
    case WDType::F16: {
      const uint16_t* p = reinterpret_cast<const uint16_t*>(base);
      for (int64_t c = 0; c < cols; c++) out[c] = f16_to_f32(p[c]);
      break;
    }
    case WDType::F8E4M3: {
      const float* srow = scale.data() + ((r + orow) / 128) * scols;
      int64_t c = 0;
      while (c < cols) {
        int64_t blk = (c + ocol) / 128;
        int64_t end = std::min(cols, (blk + 1) * 128 - ocol);
        float s = srow[blk];
        for (; c < end; c++) out[c] = FP8_LUT[base[c]] * s;
      }
      break;
    }
  }
}

const float* Weight::dequantized(const Kern& k) const {
  std::call_once(dq_once_, [&] {
    dq_.resize(size_t(rows * cols));
    k.decode(view(), 0, rows, dq_.data());
  });
  return dq_.data();
}

/** per-thread scratch for decoded weight tiles */
static float* scratch(size_t n) {
  thread_local std::vector<float> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

void act_quant_rows(float* x, int64_t T, int64_t K, int mode) {
  for (int64_t t = 0; t < T; t++) {
    float* r = x + t * K;
    for (int64_t b = 0; b < K; b += 128) {
      int64_t e = std::min(K, b + 128);
      float amax = 1e-4f;
      for (int64_t i = b; i < e; i++) amax = std::max(amax, std::fabs(r[i]));
      if (mode == 3) {  // e4m3fnuz (AMD MI300): max 240
        float s = amax / 240.0f;
        for (int64_t i = b; i < e; i++) r[i] = round_fp8e4m3fnuz(r[i] / s) * s;
        continue;
      }
      float s = amax / 448.0f;
      if (mode == 2) s = std::exp2(std::ceil(std::log2(s)));
      for (int64_t i = b; i < e; i++) r[i] = round_fp8e4m3(r[i] / s) * s;
    }
  }
}

/** rows per work item: one decoded tile, smaller where that leaves threads idle */
static int64_t block_rows(const Pool& p, int64_t N, int64_t T, int64_t K, int64_t items_elsewhere = 1) {
  int64_t rb = p.k().scratch_rows(T, K);
  int64_t want = int64_t(p.size()) * 4;
  if (items_elsewhere * ((N + rb - 1) / rb) < want) rb = std::max<int64_t>(4, ((N * items_elsewhere + want - 1) / want + 3) / 4 * 4);
  return std::min(rb, p.k().scratch_rows(T, K));
}

/** y[t * N + n] for rows [r0, r1) of w: one work item (the calling thread's scratch) */
static void linear_block(const Kern& k, const float* x, int64_t T, const Weight& w, float* y, int64_t r0, int64_t r1, bool bf16) {
  float* sc = w.dtype == WDType::F32 ? nullptr : scratch(size_t(k.scratch_rows(T, w.cols) * w.cols));
  k.linear(x, w.cols, T, w.view(), r0, r1, y, w.rows, bf16, sc);
}

void linear(Pool& p, const Precision& pr, const float* x, int64_t T, const Weight& w, float* y) {
  std::vector<float> xq;
  if (pr.act_quant && w.dtype == WDType::F8E4M3) {
    xq.assign(x, x + T * w.cols);
    act_quant_rows(xq.data(), T, w.cols, pr.act_quant);
    x = xq.data();
  }
  const int64_t rb = block_rows(p, w.rows, T, w.cols), nb = (w.rows + rb - 1) / rb;
  const Kern& k = p.k();
  p.parallel_for(nb, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) linear_block(k, x, T, w, y, i * rb, std::min(w.rows, (i + 1) * rb), pr.act_bf16);
  });
}

void rms_norm(Pool& p, const float* x, int64_t T, int64_t D, const Weight& w, float eps, float* y) {
  std::vector<float> g(static_cast<size_t>(w.cols));
  w.row(0, g.data());
  p.parallel_for(T, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; t++) {
      const float* r = x + t * D;
      float ss = p.k().dot(r, r, D);
      float inv = 1.0f / std::sqrt(ss / float(D) + eps);
      for (int64_t i = 0; i < D; i++) y[t * D + i] = g[i] * (r[i] * inv);
    }
  });
}

void embed(Pool& p, const Weight& table, const int32_t* ids, int64_t T, int64_t vocab_start, float* y) {
  const int64_t D = table.cols;
  p.parallel_for(T, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; t++) {
      int64_t r = int64_t(ids[t]) - vocab_start;
      if (r >= 0 && r < table.rows) table.row(r, y + t * D);
      else std::fill(y + t * D, y + (t + 1) * D, 0.0f);
    }
  });
}

void rope(Pool& p, float* x, int64_t T, int64_t heads, int64_t head_dim, int64_t off, int64_t rdim, const int32_t* pos,
          const float* inv_freq, float attn_factor) {
  const int64_t half = rdim / 2;
  p.parallel_for(T, [&](int64_t b, int64_t e) {
    std::vector<float> cs(static_cast<size_t>(half)), sn(static_cast<size_t>(half));
    for (int64_t t = b; t < e; t++) {
      for (int64_t i = 0; i < half; i++) {
        float ang = float(pos[t]) * inv_freq[i];  // fp32 product, as the reference
        cs[i] = float(std::cos(double(ang))) * attn_factor;
        sn[i] = float(std::sin(double(ang))) * attn_factor;
      }
      for (int64_t h = 0; h < heads; h++) {
        float* r = x + t * heads * head_dim + h * head_dim + off;
        for (int64_t i = 0; i < half; i++) {
          float a = r[2 * i], c = r[2 * i + 1];
          r[2 * i] = a * cs[i] - c * sn[i];
          r[2 * i + 1] = a * sn[i] + c * cs[i];
        }
      }
    }
  });
}

// ---- cache ----------------------------------------------------------------------------
void Cache::write(int64_t layer, int64_t slot, const float* v, int64_t n) {
  size_t o = size_t((layer * slots() + slot) * width);
  if (bf16)
    for (int64_t i = 0; i < n; i++) b16[o + i] = f32_to_bf16(v[i]);
  else
    std::memcpy(f32.data() + o, v, size_t(n) * 4);
}
const float* Cache::row(int64_t layer, int64_t slot, float* tmp) const {
  size_t o = static_cast<size_t>((layer * slots() + slot) * width);
  if (!bf16) return f32.data() + o;
  for (int64_t i = 0; i < width; i++) tmp[i] = bf16_to_f32(b16[o + i]);
  return tmp;
}
void Cache::read(int64_t layer, int64_t slot, float* v, int64_t n) const {
  size_t o = size_t((layer * slots() + slot) * width);
  if (bf16)
    for (int64_t i = 0; i < n; i++) v[i] = bf16_to_f32(b16[o + i]);
  else
    std::memcpy(v, f32.data() + o, size_t(n) * 4);
}

// ---- MLA, absorbed ------------------------------------------------------------------------
void mla(Pool& p, const Precision& pr, const float* q, const float* kv, const float* pe, int64_t T, const Weight& wkv_b,
         Cache& cache, int64_t layer, const AttnMeta& m, const MlaDims& d, float* out) {
  const Kern& K = p.k();
  const int64_t C = d.kv_lora, R = d.rope, W = C + R, bs = cache.block_size;
  auto slot_of = [&](int64_t s, int64_t pos) -> int64_t {
    int64_t blk = m.block_tables[s * m.max_blocks + pos / bs];
    return blk * bs + pos % bs;
  };
  // 1. write this step's latents
  std::vector<float> tmp(static_cast<size_t>(W));
  for (int64_t t = 0; t < T; t++) {
    std::memcpy(tmp.data(), kv + t * C, size_t(C) * 4);
    std::memcpy(tmp.data() + C, pe + t * R, size_t(R) * 4);
    cache.write(layer, slot_of(m.seq_idx[t], m.positions[t]), tmp.data(), W);
  }
  // 2. wkv_b for this rank's heads. A long batch uses an fp32 copy, made once at first use and
  // kept with the weight; a short one (decode) reads the stored FP8 rows, decoded in registers
  // (a quarter of the bytes). Both give bit-identical results (simd.h), so batch invariance holds.
  const int64_t hd = d.nope + d.v;
  const bool stored = T <= 8 && wkv_b.dtype == WDType::F8E4M3;
  const float* wb = stored ? nullptr : wkv_b.dequantized(K);
  const WView wv = wkv_b.view();
  auto head_rows = [&](int64_t r0, int64_t n) {  // rows [r0, r0 + n) of wkv_b as a weight of their own
    WView v = wv;
    v.rows = n;
    v.data = wv.data + r0 * wv.cols;
    v.orow = wv.orow + r0;
    return v;
  };
  const int64_t qw = d.nope + d.rope;
  // 3. attention per (token, block of heads): each run of cache rows (one cache block) is
  // scored against the block's heads with one gemm; per (token, head, position) the order of
  // every sum is fixed, whatever the batch and however heads are grouped
  const int64_t HB = std::max<int64_t>(1, std::min<int64_t>(8, (d.heads * T + p.size() - 1) / p.size()));
  const int64_t nhb = (d.heads + HB - 1) / HB;
  p.parallel_for(T * nhb, [&](int64_t b, int64_t e) {
    std::vector<float> qa(static_cast<size_t>(HB * C)), qp(static_cast<size_t>(HB * R)), olat(static_cast<size_t>(HB * C)), sc, sr;
    std::vector<float> rows(cache.bf16 ? static_cast<size_t>(bs * W) : 0);
    std::vector<float> mx(static_cast<size_t>(HB)), sum(static_cast<size_t>(HB)), rowtmp(static_cast<size_t>(C));
    for (int64_t tb = b; tb < e; tb++) {
      int64_t t = tb / nhb, h0 = (tb % nhb) * HB, nh = std::min(HB, d.heads - h0);
      int64_t s = m.seq_idx[t], P = m.positions[t];
      for (int64_t k = 0; k < nh; k++) {
        const float* qn = q + t * d.heads * qw + (h0 + k) * qw;
        float* qk = qa.data() + k * C;
        std::fill(qk, qk + C, 0.0f);
        for (int64_t i = 0; i < d.nope; i++) {
          if (stored) K.axpy_row(qn[i], wv, (h0 + k) * hd + i, qk, rowtmp.data());
          else K.axpy(qn[i], wb + ((h0 + k) * hd + i) * C, qk, C);
        }
        std::memcpy(qp.data() + k * R, qn + d.nope, size_t(R) * 4);
      }
      const int64_t n = P + 1;
      sc.resize(static_cast<size_t>(nh * n));
      sr.resize(static_cast<size_t>(nh * n));
      // the cache rows of positions [j0, j1) (one cache block): a pointer into the cache, or converted
      auto run = [&](int64_t j0, int64_t j1) -> const float* {
        int64_t slot = slot_of(s, j0);
        if (!cache.bf16) return cache.f32.data() + size_t((layer * cache.slots() + slot) * W);
        for (int64_t j = j0; j < j1; j++) cache.read(layer, slot + (j - j0), rows.data() + (j - j0) * W, W);
        return rows.data();
      };
      for (int64_t j0 = 0; j0 < n; j0 += bs - j0 % bs) {
        int64_t j1 = std::min(n, (j0 / bs + 1) * bs);
        const float* rw = run(j0, j1);
        K.gemm(qa.data(), C, nh, rw, W, j1 - j0, C, sc.data() + j0, n, false);
        K.gemm(qp.data(), R, nh, rw + C, W, j1 - j0, R, sr.data() + j0, n, false);
      }
      for (int64_t k = 0; k < nh; k++) {
        float mk = -std::numeric_limits<float>::infinity(), sk = 0;
        float* v = sc.data() + k * n;
        const float* vr = sr.data() + k * n;
        for (int64_t j = 0; j < n; j++) mk = std::max(mk, v[j] = (v[j] + vr[j]) * d.scale);
        for (int64_t j = 0; j < n; j++) sk += (v[j] = std::exp(v[j] - mk));
        mx[k] = mk;
        sum[k] = sk;
      }
      for (int64_t k = 0; k < nh; k++)
        for (int64_t j = 0; j < n; j++) sc[k * n + j] /= sum[k];
      std::fill(olat.begin(), olat.begin() + nh * C, 0.0f);
      for (int64_t j0 = 0; j0 < n; j0 += bs - j0 % bs) {
        int64_t j1 = std::min(n, (j0 / bs + 1) * bs);
        K.wsum(sc.data() + j0, n, nh, run(j0, j1), W, j1 - j0, C, olat.data(), C);
      }
      for (int64_t k = 0; k < nh; k++) {
        float* o = out + t * d.heads * d.v + (h0 + k) * d.v;
        if (stored)
          K.linear(olat.data() + k * C, C, 1, head_rows((h0 + k) * hd + d.nope, d.v), 0, d.v, o, d.v, pr.act_bf16,
                   scratch(size_t(K.scratch_rows(1, C) * C)));
        else
          K.gemm(olat.data() + k * C, C, 1, wb + ((h0 + k) * hd + d.nope) * C, C, d.v, C, o, d.v, pr.act_bf16);
      }
    }
  });
}

// ---- MoE --------------------------------------------------------------------------------
void moe_gate(Pool& p, const float* x, int64_t T, const Weight& g, const float* bias, const GateCfg& c, float* out) {
  const int64_t E = g.rows, D = g.cols;
  const float* gw = g.dequantized(p.k());  // once, kept with the weight
  const int64_t per = E / c.n_groups;
  p.parallel_for(T, [&](int64_t b, int64_t e_) {
    std::vector<float> sc(static_cast<size_t>(E)), ch(static_cast<size_t>(E)), gs(static_cast<size_t>(c.n_groups));
    std::vector<int> idx(static_cast<size_t>(std::max<int64_t>(E, c.n_groups)));
    for (int64_t t = b; t < e_; t++) {
      const float* r = x + t * D;
      p.k().gemm(r, D, 1, gw, D, E, D, sc.data(), E, false);
      if (c.sigmoid) {
        for (int64_t e = 0; e < E; e++) sc[e] = 1.0f / (1.0f + std::exp(-sc[e]));
      } else {
        float mx = *std::max_element(sc.begin(), sc.end()), s = 0;
        for (auto& v : sc) s += (v = std::exp(v - mx));
        for (auto& v : sc) v /= s;
      }
      for (int64_t e = 0; e < E; e++) ch[e] = bias ? sc[e] + bias[e] : sc[e];
      if (c.n_groups > 1) {
        for (int64_t gi = 0; gi < c.n_groups; gi++) {
          const float* v = ch.data() + gi * per;
          if (bias) {
            float a = -INFINITY, b2 = -INFINITY;
            for (int64_t k = 0; k < per; k++) {
              if (v[k] > a) { b2 = a; a = v[k]; } else if (v[k] > b2) b2 = v[k];
            }
            gs[gi] = per > 1 ? a + b2 : a;
          } else {
            gs[gi] = *std::max_element(v, v + per);
          }
        }
        std::iota(idx.begin(), idx.begin() + c.n_groups, 0);
        std::stable_sort(idx.begin(), idx.begin() + c.n_groups, [&](int a, int b2) { return gs[a] > gs[b2]; });
        std::vector<char> keep(static_cast<size_t>(c.n_groups), 0);
        for (int k = 0; k < c.topk_groups; k++) keep[idx[k]] = 1;
        for (int64_t e = 0; e < E; e++)
          if (!keep[e / per]) ch[e] = -INFINITY;
      }
      std::iota(idx.begin(), idx.begin() + E, 0);
      std::partial_sort(idx.begin(), idx.begin() + c.topk, idx.begin() + E,
                        [&](int a, int b2) { return ch[a] > ch[b2] || (ch[a] == ch[b2] && a < b2); });
      float* o = out + t * 2 * c.topk;
      float s = 0;
      for (int k = 0; k < c.topk; k++) s += sc[idx[k]];
      for (int k = 0; k < c.topk; k++) {
        float w = sc[idx[k]];
        if (c.norm_topk) w /= (s + 1e-20f);
        o[k] = w * c.route_scale;
        o[c.topk + k] = float(idx[k]);
      }
    }
  });
}

void moe_experts(Pool& p, const Precision& pr, const float* x, int64_t T, int64_t D, const std::vector<Expert>& ex,
                 int64_t first, const float* routing, int topk, float* y) {
  const Kern& K = p.k();
  const int64_t n = int64_t(ex.size());
  // tokens routed to each local expert, in token order
  std::vector<std::vector<std::pair<int64_t, int>>> who(static_cast<size_t>(n));
  for (int64_t t = 0; t < T; t++)
    for (int k = 0; k < topk; k++) {
      int64_t e = int64_t(routing[t * 2 * topk + topk + k]) - first;
      if (e >= 0 && e < n) who[e].push_back({t, k});
    }
  // active experts; their tokens' rows are gathered expert after expert (row g of xg, h, o)
  std::vector<int64_t> active, off, hoff;
  int64_t M = 0, HM = 0;
  bool quant = false;
  for (int64_t e = 0; e < n; e++)
    if (!who[e].empty()) {
      active.push_back(e);
      off.push_back(M);
      hoff.push_back(HM);
      M += int64_t(who[e].size());
      HM += int64_t(who[e].size()) * ex[e].w1->rows;
      quant = quant || (pr.act_quant && ex[e].w1->dtype == WDType::F8E4M3);
    }
  const int64_t na = int64_t(active.size());
  if (na == 0) {
    std::fill(y, y + T * D, 0.0f);
    return;
  }
  std::vector<float> xq;
  if (quant) {  // per-token rows, so quantizing x once equals quantizing each expert's copy
    xq.assign(x, x + T * D);
    act_quant_rows(xq.data(), T, D, pr.act_quant);
  }
  std::vector<float> xg(static_cast<size_t>(M * D)), h1(static_cast<size_t>(HM)), h3(static_cast<size_t>(HM)), o(static_cast<size_t>(M * D));
  std::vector<int64_t> slot_row(static_cast<size_t>(T * topk), -1);
  for (int64_t ai = 0; ai < na; ai++) {
    const auto& lst = who[active[ai]];
    const float* src = quant && ex[active[ai]].w1->dtype == WDType::F8E4M3 ? xq.data() : x;
    for (size_t i = 0; i < lst.size(); i++) {
      std::memcpy(xg.data() + (off[ai] + int64_t(i)) * D, src + lst[i].first * D, size_t(D) * 4);
      slot_row[lst[i].first * topk + lst[i].second] = off[ai] + int64_t(i);
    }
  }
  // work items (expert, block of rows), so that every thread is busy even at batch 1
  struct Item {
    int64_t ai, r0, r1;
  };
  auto items = [&](bool down) {
    std::vector<Item> it;
    int64_t rows_all = 0;
    for (int64_t ai = 0; ai < na; ai++) rows_all += down ? D : ex[active[ai]].w1->rows;
    for (int64_t ai = 0; ai < na; ai++) {
      const Weight& w = down ? *ex[active[ai]].w2 : *ex[active[ai]].w1;
      int64_t m = int64_t(who[active[ai]].size());
      int64_t rb = block_rows(p, rows_all, m, w.cols);
      for (int64_t r = 0; r < w.rows; r += rb) it.push_back({ai, r, std::min(w.rows, r + rb)});
    }
    return it;
  };
  // 1. gate and up projections
  std::vector<Item> up = items(false);
  p.parallel_for(int64_t(up.size()), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) {
      const Item& it = up[size_t(i)];
      const Expert& w = ex[active[it.ai]];
      int64_t m = int64_t(who[active[it.ai]].size()), I = w.w1->rows;
      float* sc = scratch(size_t(K.scratch_rows(m, D) * D));
      K.linear(xg.data() + off[it.ai] * D, D, m, w.w1->view(), it.r0, it.r1, h1.data() + hoff[it.ai], I, pr.act_bf16, sc);
      K.linear(xg.data() + off[it.ai] * D, D, m, w.w3->view(), it.r0, it.r1, h3.data() + hoff[it.ai], I, pr.act_bf16, sc);
    }
  });
  // 2. silu(gate) * up, per expert
  p.parallel_for(na, [&](int64_t b, int64_t e) {
    for (int64_t ai = b; ai < e; ai++) {
      const Expert& w = ex[active[ai]];
      int64_t m = int64_t(who[active[ai]].size()), I = w.w1->rows;
      float* g = h1.data() + hoff[ai];
      const float* u = h3.data() + hoff[ai];
      for (int64_t i = 0; i < m * I; i++) {
        float v = g[i] / (1.0f + std::exp(-g[i])) * u[i];
        g[i] = pr.act_bf16 ? round_bf16(v) : v;
      }
      if (pr.act_quant && w.w2->dtype == WDType::F8E4M3) act_quant_rows(g, m, I, pr.act_quant);
    }
  });
  // 3. down projections
  std::vector<Item> down = items(true);
  p.parallel_for(int64_t(down.size()), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) {
      const Item& it = down[size_t(i)];
      const Expert& w = ex[active[it.ai]];
      int64_t m = int64_t(who[active[it.ai]].size()), I = w.w1->rows;
      float* sc = scratch(size_t(K.scratch_rows(m, I) * I));
      K.linear(h1.data() + hoff[it.ai], I, m, w.w2->view(), it.r0, it.r1, o.data() + off[it.ai] * D, D, pr.act_bf16, sc);
    }
  });
  // 4. per token, the experts' outputs summed in slot order (batch invariant)
  for (int64_t t = 0; t < T; t++) {
    float* yr = y + t * D;
    std::fill(yr, yr + D, 0.0f);
    for (int k = 0; k < topk; k++) {
      int64_t g = slot_row[t * topk + k];
      if (g < 0) continue;
      float w = routing[t * 2 * topk + k];
      const float* pr_ = o.data() + g * D;
      for (int64_t i = 0; i < D; i++) yr[i] += w * pr_[i];
    }
    if (pr.act_bf16)
      for (int64_t i = 0; i < D; i++) yr[i] = round_bf16(yr[i]);
  }
}

}  // namespace ds3
