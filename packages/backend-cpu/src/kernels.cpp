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

// ---- pool ---------------------------------------------------------------------------
Pool::Pool(int n) {
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
void Pool::loop(int) {
  uint64_t seen = 0;
  for (;;) {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return stop_ || gen_ != seen; });
    if (stop_) return;
    seen = gen_;
    for (;;) {
      if (next_ >= n_) break;
      int64_t b = next_;
      next_ = std::min(n_, next_ + chunk_);
      int64_t e = next_;
      l.unlock();
      (*job_)(b, e);
      l.lock();
    }
    if (--pending_ == 0) done_cv_.notify_all();
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
  pending_ = int(workers_.size());
  gen_++;
  cv_.notify_all();
  for (;;) {
    if (next_ >= n_) break;
    int64_t b = next_;
    next_ = std::min(n_, next_ + chunk_);
    int64_t e = next_;
    l.unlock();
    fn(b, e);
    l.lock();
  }
  done_cv_.wait(l, [&] { return pending_ == 0; });
  job_ = nullptr;
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

static inline float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; k++) acc[k] += a[i + k] * b[i + k];
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

void act_quant_rows(float* x, int64_t T, int64_t K, int mode) {
  for (int64_t t = 0; t < T; t++) {
    float* r = x + t * K;
    for (int64_t b = 0; b < K; b += 128) {
      int64_t e = std::min(K, b + 128);
      float amax = 1e-4f;
      for (int64_t i = b; i < e; i++) amax = std::max(amax, std::fabs(r[i]));
      float s = amax / 448.0f;
      if (mode == 2) s = std::exp2(std::ceil(std::log2(s)));
      for (int64_t i = b; i < e; i++) r[i] = round_fp8e4m3(r[i] / s) * s;
    }
  }
}

static void linear_rows(const float* x, int64_t T, const Weight& w, float* y, int64_t n0, int64_t n1, float* buf, bool bf16) {
  const int64_t K = w.cols, N = w.rows;
  for (int64_t n = n0; n < n1; n++) {
    w.row(n, buf);
    for (int64_t t = 0; t < T; t++) {
      float v = dot(x + t * K, buf, K);
      y[t * N + n] = bf16 ? round_bf16(v) : v;
    }
  }
}

void linear(Pool& p, const Precision& pr, const float* x, int64_t T, const Weight& w, float* y) {
  std::vector<float> xq;
  if (pr.act_quant && w.dtype == WDType::F8E4M3) {
    xq.assign(x, x + T * w.cols);
    act_quant_rows(xq.data(), T, w.cols, pr.act_quant);
    x = xq.data();
  }
  p.parallel_for(
      w.rows,
      [&](int64_t b, int64_t e) {
        std::vector<float> buf(static_cast<size_t>(w.cols));
        linear_rows(x, T, w, y, b, e, buf.data(), pr.act_bf16);
      },
      std::max<int64_t>(1, 4096 / std::max<int64_t>(1, w.cols * T / 64 + 1)));
}

void rms_norm(Pool& p, const float* x, int64_t T, int64_t D, const Weight& w, float eps, float* y) {
  std::vector<float> g(static_cast<size_t>(w.cols));
  w.row(0, g.data());
  p.parallel_for(T, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; t++) {
      const float* r = x + t * D;
      float ss = dot(r, r, D);
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
  // 2. wkv_b rows for this rank's heads, dequantized once per call
  const int64_t hd = d.nope + d.v;
  std::vector<float> wb(static_cast<size_t>(wkv_b.rows * C));
  p.parallel_for(wkv_b.rows, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; r++) wkv_b.row(r, wb.data() + r * C);
  });
  const int64_t qw = d.nope + d.rope;
  // 3. attention per (token, block of heads): each cache row is read once per block of heads
  const int64_t HB = 8, nhb = (d.heads + HB - 1) / HB;
  p.parallel_for(T * nhb, [&](int64_t b, int64_t e) {
    std::vector<float> qa(static_cast<size_t>(HB * C)), olat(static_cast<size_t>(HB * C)), tmp(static_cast<size_t>(W)), sc;
    std::vector<float> mx(static_cast<size_t>(HB)), sum(static_cast<size_t>(HB));
    for (int64_t tb = b; tb < e; tb++) {
      int64_t t = tb / nhb, h0 = (tb % nhb) * HB, nh = std::min(HB, d.heads - h0);
      int64_t s = m.seq_idx[t], P = m.positions[t];
      for (int64_t k = 0; k < nh; k++) {
        const float* qn = q + t * d.heads * qw + (h0 + k) * qw;
        float* qk = qa.data() + k * C;
        std::fill(qk, qk + C, 0.0f);
        for (int64_t i = 0; i < d.nope; i++) {
          const float* wr = wb.data() + ((h0 + k) * hd + i) * C;
          float a = qn[i];
          for (int64_t c = 0; c < C; c++) qk[c] += a * wr[c];
        }
        mx[k] = -std::numeric_limits<float>::infinity();
        sum[k] = 0;
      }
      sc.resize(static_cast<size_t>(nh * (P + 1)));
      for (int64_t j = 0; j <= P; j++) {
        const float* row = cache.row(layer, slot_of(s, j), tmp.data());
        for (int64_t k = 0; k < nh; k++) {
          const float* qp = q + t * d.heads * qw + (h0 + k) * qw + d.nope;
          float v = (dot(qa.data() + k * C, row, C) + dot(qp, row + C, R)) * d.scale;
          sc[k * (P + 1) + j] = v;
          mx[k] = std::max(mx[k], v);
        }
      }
      for (int64_t k = 0; k < nh; k++)
        for (int64_t j = 0; j <= P; j++) {
          float& v = sc[k * (P + 1) + j];
          v = std::exp(v - mx[k]);
          sum[k] += v;
        }
      std::fill(olat.begin(), olat.begin() + nh * C, 0.0f);
      for (int64_t j = 0; j <= P; j++) {
        const float* row = cache.row(layer, slot_of(s, j), tmp.data());
        for (int64_t k = 0; k < nh; k++) {
          float w = sc[k * (P + 1) + j] / sum[k];
          float* ol = olat.data() + k * C;
          for (int64_t c = 0; c < C; c++) ol[c] += w * row[c];
        }
      }
      for (int64_t k = 0; k < nh; k++) {
        float* o = out + t * d.heads * d.v + (h0 + k) * d.v;
        for (int64_t i = 0; i < d.v; i++) {
          float v = dot(olat.data() + k * C, wb.data() + ((h0 + k) * hd + d.nope + i) * C, C);
          o[i] = pr.act_bf16 ? round_bf16(v) : v;
        }
      }
    }
  });
}

// ---- MoE --------------------------------------------------------------------------------
void moe_gate(Pool& p, const float* x, int64_t T, const Weight& g, const float* bias, const GateCfg& c, float* out) {
  const int64_t E = g.rows, D = g.cols;
  std::vector<float> gw(static_cast<size_t>(E * D));
  for (int64_t e = 0; e < E; e++) g.row(e, gw.data() + e * D);
  const int64_t per = E / c.n_groups;
  p.parallel_for(T, [&](int64_t b, int64_t e_) {
    std::vector<float> sc(static_cast<size_t>(E)), ch(static_cast<size_t>(E)), gs(static_cast<size_t>(c.n_groups));
    std::vector<int> idx(static_cast<size_t>(std::max<int64_t>(E, c.n_groups)));
    for (int64_t t = b; t < e_; t++) {
      const float* r = x + t * D;
      for (int64_t e = 0; e < E; e++) sc[e] = dot(r, gw.data() + e * D, D);
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
  const int64_t n = int64_t(ex.size());
  // tokens routed to each local expert, in token order
  std::vector<std::vector<std::pair<int64_t, int>>> who(static_cast<size_t>(n));
  for (int64_t t = 0; t < T; t++)
    for (int k = 0; k < topk; k++) {
      int64_t e = int64_t(routing[t * 2 * topk + topk + k]) - first;
      if (e >= 0 && e < n) who[e].push_back({t, k});
    }
  // per (token, slot) expert outputs, summed afterwards in slot order (batch invariant)
  std::vector<float> part(static_cast<size_t>(T * topk * D), 0.0f);
  std::vector<char> used(static_cast<size_t>(T * topk), 0);
  std::vector<int64_t> active;
  for (int64_t e = 0; e < n; e++)
    if (!who[e].empty()) active.push_back(e);
  p.parallel_for(int64_t(active.size()), [&](int64_t b, int64_t e_) {
    Precision pr1 = pr;
    for (int64_t ai = b; ai < e_; ai++) {
      int64_t e = active[ai];
      const auto& lst = who[e];
      const Expert& w = ex[e];
      int64_t m = int64_t(lst.size()), I = w.w1->rows;
      std::vector<float> xg(static_cast<size_t>(m * D)), h1(static_cast<size_t>(m * I)), h3(static_cast<size_t>(m * I)), o(static_cast<size_t>(m * D)), buf(static_cast<size_t>(std::max(D, I)));
      for (int64_t i = 0; i < m; i++) std::memcpy(xg.data() + i * D, x + lst[i].first * D, size_t(D) * 4);
      if (pr.act_quant && w.w1->dtype == WDType::F8E4M3) act_quant_rows(xg.data(), m, D, pr.act_quant);
      linear_rows(xg.data(), m, *w.w1, h1.data(), 0, I, buf.data(), pr1.act_bf16);
      linear_rows(xg.data(), m, *w.w3, h3.data(), 0, I, buf.data(), pr1.act_bf16);
      for (int64_t i = 0; i < m * I; i++) {
        float g = h1[i];
        float v = g / (1.0f + std::exp(-g)) * h3[i];
        h1[i] = pr.act_bf16 ? round_bf16(v) : v;
      }
      if (pr.act_quant && w.w2->dtype == WDType::F8E4M3) act_quant_rows(h1.data(), m, I, pr.act_quant);
      linear_rows(h1.data(), m, *w.w2, o.data(), 0, D, buf.data(), pr1.act_bf16);
      for (int64_t i = 0; i < m; i++) {
        int64_t t = lst[i].first;
        int k = lst[i].second;
        std::memcpy(part.data() + (t * topk + k) * D, o.data() + i * D, size_t(D) * 4);
        used[t * topk + k] = 1;
      }
    }
  });
  for (int64_t t = 0; t < T; t++) {
    float* yr = y + t * D;
    std::fill(yr, yr + D, 0.0f);
    for (int k = 0; k < topk; k++) {
      if (!used[t * topk + k]) continue;
      float w = routing[t * 2 * topk + k];
      const float* pr_ = part.data() + (t * topk + k) * D;
      for (int64_t i = 0; i < D; i++) yr[i] += w * pr_[i];
    }
    if (pr.act_bf16)
      for (int64_t i = 0; i < D; i++) yr[i] = round_bf16(yr[i]);
  }
}

}  // namespace ds3
