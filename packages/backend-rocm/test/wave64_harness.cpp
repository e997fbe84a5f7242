// Host harness of the wave-64 test: the kernels of @ds3/backend-cuda/src/native (the same sources the CUDA and
// HIP builds compile), run by simt_emu.h at DS3_EMU_WARP lanes, against float64 references written here.
//   wave64_harness sample <in> <out>   device sampling of the rows in <in> (checked in JS against @ds3/core's Sampler)
//   wave64_harness checks              reductions / lane arithmetic of the other kernels; one JSON line per check
// Input of `sample`: int32 T, int32 N, float32 logits[T*N], float64 params[T*4] (temperature, top_k, top_p, min_p),
// float64 u[T]. Output: int32 ids[T], float32 logprobs[T].
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "ops.h"

using namespace ds3cu;

namespace {

// ---- independent references -------------------------------------------------------------------------------
/** e4m3fn (OCP) byte -> value, from the definition (bias 7, subnormals 2^-6 * m/8, 0x7f/0xff NaN) */
double ref_fp8(uint8_t b) {
  const int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
  if (e == 15 && m == 7) return NAN;
  const double v = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
  return s ? -v : v;
}
/** nearest e4m3fn byte by search over every finite code (ties: even mantissa), saturating at +-448 */
uint8_t ref_fp8_encode(double x) {
  if (std::isnan(x)) return 0x7f;
  int best = 0;
  double bd = INFINITY;
  for (int b = 0; b < 256; b++) {
    const double v = ref_fp8(uint8_t(b));
    if (std::isnan(v) || (v == 0 && (b & 0x80))) continue;
    const double d = std::fabs(v - x);
    if (d < bd || (d == bd && (b & 1) == 0 && (best & 1) == 1)) bd = d, best = b;
  }
  return uint8_t(best);
}
double ref_bf16(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
uint16_t bf16_of(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

struct Out {
  std::string name;
  double err, tol;
  std::string detail;
};
std::vector<Out> outs;
void report(const std::string& name, double err, double tol, const std::string& detail = "") {
  outs.push_back({name, err, tol, detail});
  printf("{\"check\":\"%s\",\"warp\":%d,\"err\":%.3e,\"tol\":%.1e,\"ok\":%s%s%s%s}\n", name.c_str(), WARP, err, tol,
         err <= tol ? "true" : "false", detail.empty() ? "" : ",\"detail\":\"", detail.c_str(), detail.empty() ? "" : "\"");
  fflush(stdout);
}
double relerr(const std::vector<float>& y, const std::vector<double>& r) {
  double num = 0, den = 0, mx = 0;
  for (size_t i = 0; i < y.size(); i++) {
    num += (y[i] - r[i]) * (y[i] - r[i]);
    den += r[i] * r[i];
    if (!std::isfinite(y[i])) mx = INFINITY;
  }
  return std::max(mx, std::sqrt(num / std::max(den, 1e-300)));
}

std::mt19937_64 rng(12345);
float unif(float a, float b) { return std::uniform_real_distribution<float>(a, b)(rng); }

// ---- rmsNorm: block_sum over blockDim / WARP warps ----------------------------------------------------------
void check_rmsnorm() {
  for (int D : {1000, 3000}) {
    const int T = 3;
    std::vector<float> x(size_t(T) * D), y(size_t(T) * D);
    std::vector<uint16_t> w(D);
    for (auto& v : x) v = unif(-2, 2);
    for (auto& v : w) v = bf16_of(unif(0.5f, 1.5f));
    WDesc wd{w.data(), nullptr, 1, D, 0, 0, W_BF16, 0};
    launch_rms_norm(nullptr, x.data(), T, D, &wd, W_BF16, 1e-6f, y.data(), 0);
    std::vector<double> r(y.size());
    for (int t = 0; t < T; t++) {
      double ss = 0;
      for (int d = 0; d < D; d++) ss += double(x[t * D + d]) * x[t * D + d];
      const double inv = 1 / std::sqrt(ss / D + 1e-6);
      for (int d = 0; d < D; d++) r[t * D + d] = ref_bf16(w[d]) * x[t * D + d] * inv;
    }
    report("rmsNorm D=" + std::to_string(D), relerr(y, r), 2e-6);
  }
}

// ---- argmax: two stages, warp argmax with ties to the lowest index ------------------------------------------
void check_argmax() {
  const int T = 3, N = 5000, chunks = 5;
  std::vector<float> x(size_t(T) * N);
  for (auto& v : x) v = float(int(unif(0, 40)));  // many ties
  x[1 * N + 4321] = 100;
  x[1 * N + 77] = 100;  // tie: 77 wins
  for (int i = 0; i < N; i++) x[2 * N + i] = -INFINITY;
  x[2 * N + N - 1] = -5;
  std::vector<float> pv(T * chunks);
  std::vector<int> pi(T * chunks), out(T);
  launch_argmax(nullptr, x.data(), T, N, chunks, pv.data(), pi.data(), out.data());
  int bad = 0;
  std::string d;
  for (int t = 0; t < T; t++) {
    int b = 0;
    for (int i = 1; i < N; i++)
      if (x[t * N + i] > x[t * N + b]) b = i;
    if (out[t] != b) bad++, d += "row " + std::to_string(t) + ": " + std::to_string(out[t]) + " != " + std::to_string(b) + "; ";
  }
  report("argmax", bad, 0, d);
}

// ---- MoE routing: block reductions (softmax), block argmax, group scores -------------------------------------
void ref_route(const float* lg, int E, const float* bias, int topk, int ng, int tg, int sigmoid, int norm, float scale, std::vector<int>& ids,
               std::vector<double>& wts) {
  std::vector<double> sc(E), ch(E);
  if (sigmoid) {
    for (int e = 0; e < E; e++) sc[e] = 1 / (1 + std::exp(-double(lg[e])));
  } else {
    double mx = -INFINITY, s = 0;
    for (int e = 0; e < E; e++) mx = std::max(mx, double(lg[e]));
    for (int e = 0; e < E; e++) s += std::exp(lg[e] - mx);
    for (int e = 0; e < E; e++) sc[e] = std::exp(lg[e] - mx) / s;
  }
  for (int e = 0; e < E; e++) ch[e] = sc[e] + (bias ? bias[e] : 0);
  if (ng > 1) {
    const int per = E / ng;
    std::vector<double> gs(ng);
    for (int g = 0; g < ng; g++) {
      std::vector<double> v(ch.begin() + g * per, ch.begin() + (g + 1) * per);
      std::sort(v.rbegin(), v.rend());
      gs[g] = bias ? (per > 1 ? v[0] + v[1] : v[0]) : v[0];
    }
    std::vector<int> keep(ng, 0);
    for (int k = 0; k < tg; k++) {
      int bi = -1;
      for (int g = 0; g < ng; g++)
        if (!keep[g] && (bi < 0 || gs[g] > gs[bi])) bi = g;
      keep[bi] = 1;
    }
    for (int e = 0; e < E; e++)
      if (!keep[e / per]) ch[e] = -INFINITY;
  }
  ids.clear();
  std::vector<int> taken(E, 0);
  for (int k = 0; k < topk; k++) {
    int bi = -1;
    for (int e = 0; e < E; e++)
      if (!taken[e] && (bi < 0 || ch[e] > ch[bi])) bi = e;
    taken[bi] = 1;
    ids.push_back(bi);
  }
  double s = 0;
  for (int i : ids) s += sc[i];
  wts.clear();
  for (int i : ids) wts.push_back((norm ? sc[i] / (s + 1e-20) : sc[i]) * scale);
}
void check_route() {
  struct C {
    int E, topk, ng, tg, sigmoid, norm;
    bool bias;
  };
  for (const C& c : {C{64, 6, 8, 3, 1, 1, true}, C{256, 8, 8, 4, 1, 1, true}, C{72, 4, 1, 1, 0, 0, false}, C{40, 3, 4, 2, 0, 1, false}}) {
    const int T = 4;
    std::vector<float> lg(size_t(T) * c.E), bias(c.E), out(size_t(T) * 2 * c.topk);
    for (auto& v : lg) v = unif(-3, 3);
    for (auto& v : bias) v = unif(-0.2f, 0.2f);
    launch_moe_route(nullptr, lg.data(), T, c.E, c.bias ? bias.data() : nullptr, c.topk, c.ng, c.tg, c.sigmoid, c.norm, 2.5f, out.data());
    int badIds = 0;
    double werr = 0;
    for (int t = 0; t < T; t++) {
      std::vector<int> ids;
      std::vector<double> w;
      ref_route(lg.data() + t * c.E, c.E, c.bias ? bias.data() : nullptr, c.topk, c.ng, c.tg, c.sigmoid, c.norm, 2.5f, ids, w);
      for (int k = 0; k < c.topk; k++) {
        if (int(out[t * 2 * c.topk + c.topk + k]) != ids[k]) badIds++;
        werr = std::max(werr, std::fabs(out[t * 2 * c.topk + k] - w[k]) / std::max(1e-30, std::fabs(w[k])));
      }
    }
    const std::string n = "moeRoute E=" + std::to_string(c.E) + (c.sigmoid ? " sigmoid" : " softmax") + " groups=" + std::to_string(c.ng);
    report(n + " ids", badIds, 0);
    report(n + " weights", werr, 2e-6);
  }
}

// ---- MoE plan: warp scan over the experts, WARP at a time ------------------------------------------------------
void check_plan() {
  const int T = 37, topk = 4, first = 10, nLocal = 150, bm = 16;
  std::vector<float> routing(size_t(T) * 2 * topk);
  for (int t = 0; t < T; t++) {
    std::set<int> used;
    for (int k = 0; k < topk; k++) {
      int e;
      do e = int(unif(0, 170)); while (used.count(e));
      used.insert(e);
      routing[t * 2 * topk + k] = 0.25f;
      routing[t * 2 * topk + topk + k] = float(e);
    }
  }
  const int maxTiles = nLocal + T * topk / bm + 1;
  std::vector<int> counters(4), slotExpert(nLocal), slotOff(nLocal), slotCnt(nLocal), tileSlot(maxTiles), tileM(maxTiles), pairTok(T * topk),
      pairOf(T * topk);
  MoePlan p{counters.data(), slotExpert.data(), slotOff.data(), slotCnt.data(), tileSlot.data(), tileM.data(), pairTok.data(), pairOf.data()};
  launch_moe_plan(nullptr, routing.data(), T, topk, first, nLocal, bm, p);
  // reference
  std::vector<std::vector<int>> tok(nLocal);
  for (int t = 0; t < T; t++)
    for (int k = 0; k < topk; k++) {
      const int e = int(routing[t * 2 * topk + topk + k]) - first;
      if (e >= 0 && e < nLocal) tok[e].push_back(t);
    }
  int bad = 0, na = 0, nt = 0, off = 0;
  std::string d;
  for (int e = 0; e < nLocal; e++) {
    if (tok[e].empty()) continue;
    const int c = int(tok[e].size());
    if (slotExpert[na] != e || slotOff[na] != off || slotCnt[na] != c) bad++, d += "slot " + std::to_string(na) + "; ";
    std::vector<int> got(pairTok.begin() + off, pairTok.begin() + off + c);
    std::sort(got.begin(), got.end());
    if (got != tok[e]) bad++, d += "tokens of expert " + std::to_string(e) + "; ";
    for (int m = 0; m < (c + bm - 1) / bm; m++, nt++)
      if (tileSlot[nt] != na || tileM[nt] != m) bad++;
    off += c;
    na++;
  }
  if (counters[0] != na || counters[1] != nt || counters[2] != off) bad++, d += "counters; ";
  for (int t = 0; t < T; t++)
    for (int k = 0; k < topk; k++) {
      const int e = int(routing[t * 2 * topk + topk + k]) - first, pr = pairOf[t * topk + k];
      if (e < 0 || e >= nLocal) {
        if (pr != -1) bad++;
      } else if (pr < 0 || pairTok[pr] != t || pr < slotOff[0]) {
        bad++;
      }
    }
  report("moePlan", bad, 0, d);
}

// ---- act quant: one warp per 128 channels (amax over the warp) -------------------------------------------------
void check_act_prep() {
  const int rows = 3, K = 400;  // 4 blocks, the last one partial
  std::vector<float> x(size_t(rows) * K), q(size_t(rows) * K);
  for (auto& v : x) v = unif(-3, 3) * (unif(0, 1) < 0.05f ? 50.f : 1.f);
  const int ksb = (K + 127) / 128;
  std::vector<uint8_t> b(size_t(rows) * K);
  std::vector<float> sc(size_t(rows) * ksb);
  launch_act_prep(nullptr, PREP_QDQ, x.data(), K, nullptr, 0, nullptr, nullptr, rows, K, q.data(), nullptr, 0);
  launch_act_prep(nullptr, PREP_FP8, x.data(), K, nullptr, 0, nullptr, nullptr, rows, K, b.data(), sc.data(), 0);
  int badB = 0, badS = 0;
  std::vector<double> r(q.size());
  for (int t = 0; t < rows; t++)
    for (int kb = 0; kb < ksb; kb++) {
      float amax = 0;
      for (int k = kb * 128; k < std::min(K, kb * 128 + 128); k++) amax = std::max(amax, std::fabs(x[t * K + k]));
      const float s = std::max(amax, 1e-4f) / 448.0f;
      if (sc[t * ksb + kb] != s) badS++;
      for (int k = kb * 128; k < std::min(K, kb * 128 + 128); k++) {
        const uint8_t e = ref_fp8_encode(double(x[t * K + k] / s));
        if (b[t * K + k] != e) badB++;
        r[t * K + k] = float(float(ref_fp8(e)) * s);
      }
    }
  double mx = 0;
  for (size_t i = 0; i < q.size(); i++) mx = std::max(mx, std::fabs(q[i] - r[i]));
  report("actQuant qdq (max |diff|)", mx, 0);
  {  // fp8-fnuz: s = amax / 240, nearest e4m3fnuz (the e4m3 grid halved, max 240; ties to the even code; no -0)
    std::vector<float> xf = x;
    const float ties[] = {240.f, 232.f, 0.00048828125f, 1.0625f, 1.1875f, -0.f, -232.f, 100.f};  // row 0, block 0: s = 1
    for (int i = 0; i < 8; i++) xf[i] = ties[i];
    for (int i = 8; i < 128; i++) xf[i] = unif(-200, 200);
    std::vector<float> qf(xf.size());
    launch_act_prep(nullptr, PREP_QDQ_FNUZ, xf.data(), K, nullptr, 0, nullptr, nullptr, rows, K, qf.data(), nullptr, 0);
    auto fnuz = [](double y) {  // search over the 127 non-negative finite codes
      double best = 0, bd = INFINITY;
      int bc = 0;
      for (int c = 0; c < 128; c++) {
        const int e = c >> 3, m = c & 7;
        const double v = e == 0 ? std::ldexp(m / 8.0, -7) : std::ldexp(1 + m / 8.0, e - 8);
        const double d = std::fabs(v - std::fabs(y));
        if (d < bd || (d == bd && (c & 1) == 0)) bd = d, best = v, bc = c;
      }
      (void)bc;
      return y < 0 && best != 0 ? -best : best;
    };
    double mf = 0;
    for (int t = 0; t < rows; t++)
      for (int kb = 0; kb < ksb; kb++) {
        float amax = 0;
        for (int k = kb * 128; k < std::min(K, kb * 128 + 128); k++) amax = std::max(amax, std::fabs(xf[t * K + k]));
        const float s = std::max(amax, 1e-4f) / 240.0f;
        for (int k = kb * 128; k < std::min(K, kb * 128 + 128); k++) {
          const float r = float(float(fnuz(double(xf[t * K + k] / s))) * s);
          mf = std::max(mf, double(std::fabs(qf[t * K + k] - r)) + (std::signbit(qf[t * K + k]) != std::signbit(r) ? 1.0 : 0.0));
        }
      }
    const bool tiesOk = qf[0] == 240.f && qf[1] == 224.f && qf[2] == 0.f && !std::signbit(qf[2]) && qf[3] == 1.f && qf[4] == 1.25f &&
                        qf[5] == 0.f && !std::signbit(qf[5]) && qf[6] == -224.f && qf[7] == 96.f;
    report("actQuant fp8-fnuz qdq (max |diff|)", mf, 0);
    // the same as e4m3fnuz bytes + scales (the MFMA GEMM's input): decoded, they are the QDQ values; no 0x80 (NaN)
    std::vector<uint8_t> bz(xf.size());
    std::vector<float> sz(size_t(rows) * ksb);
    launch_act_prep(nullptr, PREP_FP8_FNUZ, xf.data(), K, nullptr, 0, nullptr, nullptr, rows, K, bz.data(), sz.data(), 0);
    int badz = 0;
    for (int t = 0; t < rows; t++)
      for (int k = 0; k < K; k++) {
        const uint8_t b = bz[t * K + k];
        const int e = (b >> 3) & 15, m = b & 7;
        const double v = (b == 0x80) ? NAN : (b & 0x80 ? -1 : 1) * (e == 0 ? std::ldexp(m / 8.0, -7) : std::ldexp(1 + m / 8.0, e - 8));
        if (!(float(float(v) * sz[t * ksb + k / 128]) == qf[t * K + k])) badz++;
      }
    report("actQuant fp8-fnuz bytes (decoded = qdq, no 0x80)", badz, 0);
    report("actQuant fp8-fnuz ties (232->224, 2^-11->0, 1.0625->1, 1.1875->1.25, -0->+0, 100->96)", tiesOk ? 0 : 1, 0);
  }
  report("actQuant fp8 bytes", badB, 0);
  report("actQuant scales", badS, 0);
}

// ---- GEMV: lanes stream 16-element chunks, WARP * 16 per warp step, warp sums; split-K over warps ------------
void check_gemv(bool fnuz) {
  // fnuz: the weights go through launch_fp8_to_fnuz (as the addon does on gfx94x) and are decoded as e4m3fnuz;
  // the reference still reads the original OCP bytes and scales
  ds3emu::fnuz_weights = fnuz;
  for (int wt : fnuz ? std::vector<int>{W_F8} : std::vector<int>{W_F8, W_BF16}) {
    for (int K : {1040, 4096 + 48}) {
      const int N = 37;
      std::vector<uint8_t> w8(size_t(N) * K);
      std::vector<uint16_t> w16(size_t(N) * K);
      const int sr = (N + 127) / 128, scn = (K + 127) / 128;
      std::vector<float> scale(size_t(sr) * scn);
      for (auto& s : scale) s = unif(0.001f, 0.01f);
      for (auto& v : w8) {
        do v = uint8_t(rng() & 0xff); while ((v & 0x7f) == 0x7f);
      }
      for (size_t i = 0; i < w8.size(); i += 97) w8[i] = 0x80;  // OCP -0: NaN in fnuz, converted to +0
      for (auto& v : w16) v = bf16_of(unif(-1, 1));
      std::vector<uint8_t> dev8 = w8;
      std::vector<float> devScale = scale;
      if (fnuz) launch_fp8_to_fnuz(nullptr, dev8.data(), int64_t(dev8.size()), devScale.data(), int64_t(devScale.size()));
      WDesc wd{wt == W_F8 ? (void*)dev8.data() : (void*)w16.data(), wt == W_F8 ? devScale.data() : nullptr, N, K, scn, 0, wt, 0};
      WDesc tab[3] = {wd, wd, wd};  // the fused gate/up pair reads the same matrix twice
      auto wref = [&](int n, int k) { return wt == W_F8 ? ref_fp8(w8[size_t(n) * K + k]) * scale[(n >> 7) * scn + (k >> 7)] : ref_bf16(w16[size_t(n) * K + k]); };
      for (int M : {1, 3, 8}) {
        for (int dual = 0; dual < 2; dual++) {
          std::vector<float> x(size_t(M) * K), y(size_t(M) * N);
          for (auto& v : x) v = unif(-1, 1);
          GemmArgs a;
          a.x = x.data();
          a.ldx = K;
          a.wtab = tab;
          a.wstride = 3;
          a.woff = 0;
          a.woff2 = 2;
          a.y = y.data();
          a.ldy = N;
          a.M = M;
          a.N = N;
          a.K = K;
          launch_gemv(nullptr, a, wt, dual, 1, 1, M <= 1 ? 1 : M <= 4 ? 4 : 8);
          std::vector<double> r(y.size());
          for (int m = 0; m < M; m++)
            for (int n = 0; n < N; n++) {
              double s = 0;
              for (int k = 0; k < K; k++) s += double(x[m * K + k]) * wref(n, k);
              if (dual) {
                const double g = s;  // w2 == w: silu(g) * g
                r[m * N + n] = g / (1 + std::exp(-g)) * g;
              } else {
                r[m * N + n] = s;
              }
            }
          report(std::string("gemv ") + (wt == W_F8 ? (fnuz ? "f8 (fnuz, gfx942)" : "f8") : "bf16") + " K=" + std::to_string(K) + " M=" + std::to_string(M) + (dual ? " fused gate/up" : ""),
                 relerr(y, r), 1e-5);
        }
      }
      if (wt == W_F8) {  // the f32 copy of a slice that starts inside a scale block (launch_dequant_f32)
        std::vector<float> f(size_t(N) * K);
        launch_dequant_f32(nullptr, dev8.data(), devScale.data(), N, K, scn, 0, 0, f.data());
        std::vector<double> r(f.size());
        for (int n = 0; n < N; n++)
          for (int k = 0; k < K; k++) r[size_t(n) * K + k] = float(wref(n, k));  // one fp32 rounding of an exact product
        report(std::string("dequant f8") + (fnuz ? " (fnuz, gfx942)" : "") + " K=" + std::to_string(K), relerr(f, r), 0);
      }
    }
  }
  ds3emu::fnuz_weights = false;
}

// ---- MFMA GEMM (AMD's tensor-core path, DS3_ROCM_MFMA=1): fragments, per-128 promotion, split-K, groups ---------
#if DS3_EMU_WARP == 64  // (the MFMA kernel exists in the HIP lane world only)
void check_mfma() {
  const int M = 70, N = 130, K = 384, ksb = K / 128;
  const int sr = (N + 127) / 128;
  std::vector<uint8_t> w8(size_t(N) * K), a8(size_t(M) * K);
  std::vector<uint16_t> w16(size_t(N) * K), a16(size_t(M) * K);
  std::vector<float> wsc(size_t(sr) * ksb), asc(size_t(M) * ksb);
  auto fp8r = [&] {
    uint8_t v;
    do v = uint8_t(rng() & 0xff); while ((v & 0x7f) == 0x7f || v == 0x80);
    return v;
  };
  for (auto& v : w8) v = fp8r();
  for (auto& v : a8) v = fp8r();
  for (auto& v : w16) v = bf16_of(unif(-1, 1));
  for (auto& v : a16) v = bf16_of(unif(-1, 1));
  for (auto& v : wsc) v = unif(0.001f, 0.01f);
  for (auto& v : asc) v = unif(0.01f, 0.1f);
  struct V {
    const char* name;
    int af;  // 0 bf16, 1 fp8, 2 fp8 fnuz (weights fnuz too)
    bool wbf16;
  };
  for (const V& v : {V{"bf16 x bf16", 0, true}, V{"bf16 x fp8", 0, false}, V{"fp8 x fp8", 1, false}, V{"fp8 x fp8 (fnuz, gfx942)", 2, false}}) {
    const bool fz = v.af == 2;
    ds3emu::fnuz_weights = fz;
    std::vector<uint8_t> dw = w8, da = a8;
    std::vector<float> dws = wsc;
    if (fz) {
      launch_fp8_to_fnuz(nullptr, dw.data(), int64_t(dw.size()), dws.data(), int64_t(dws.size()));
      for (auto& b : da) b = b == 0x80 ? 0 : b;  // activations as fnuz bytes: value halved -> scales doubled below
    }
    std::vector<float> das = asc;
    if (fz)
      for (auto& x : das) x *= 2;
    WDesc wd{v.wbf16 ? (void*)w16.data() : (void*)dw.data(), v.wbf16 ? nullptr : dws.data(), N, K, ksb, 0, v.wbf16 ? W_BF16 : W_F8, 0};
    auto wref = [&](int n, int k) { return v.wbf16 ? ref_bf16(w16[size_t(n) * K + k]) : ref_fp8(w8[size_t(n) * K + k]) * wsc[(n >> 7) * ksb + k / 128]; };
    auto aref = [&](int m, int k) { return v.af == 0 ? ref_bf16(a16[size_t(m) * K + k]) : ref_fp8(a8[size_t(m) * K + k]) * asc[m * ksb + k / 128]; };
    for (int grouped = 0; grouped < 2; grouped++)
      for (int splits : {1, 2}) {
        if (grouped && splits > 1) continue;  // split-K is dense only
        std::vector<float> y(size_t(M) * N, NAN), ws(size_t(splits) * M * N);
        GemmArgs a;
        a.a = v.af ? (const void*)da.data() : (const void*)a16.data();
        a.as = v.af ? das.data() : nullptr;
        a.ksb = ksb;
        a.wtab = &wd;
        a.y = y.data();
        a.ldy = N;
        a.M = M;
        a.N = N;
        a.K = K;
        a.splits = splits;
        a.ws = ws.data();
        // grouped: two "experts" (the same weight) over rows [0, 20) and [20, 70): tiles (0,0), (1,0)
        std::vector<int> gi = {2, 2, 0, 1, 0, 0, 0, 0, 0, 20, 20, 50};  // nActive, nTiles, tileSlot[2], tileM[2], slotExpert[2], slotOff[2], slotCnt[2]
        if (grouped) a.g = Grouping{&gi[0], &gi[1], &gi[2], &gi[4], &gi[6], &gi[8], &gi[10], nullptr};
        launch_tc(nullptr, a, v.af != 0, v.wbf16, grouped ? 2 : (M + 63) / 64, fz);
        std::vector<double> r(y.size());
        for (int m = 0; m < M; m++)
          for (int n = 0; n < N; n++) {
            double acc = 0;
            for (int k = 0; k < K; k++) acc += aref(m, k) * wref(n, k);
            r[size_t(m) * N + n] = acc;
          }
        report(std::string("mfma gemm ") + v.name + (grouped ? " grouped" : "") + (splits > 1 ? " split-K 2" : ""), relerr(y, r), 1e-5);
      }
  }
  ds3emu::fnuz_weights = false;
}
#endif

// ---- MLA attention (SIMT): lanes = (head slot, position), segment max/sum over AJ lanes, online softmax ----------
void check_mla() {
  const int C = 512, R = 64, Wd = C + R, H = 8, nope = 128, QW = nope + R, T = 3, bs = 16, maxBlocks = 4;
  const int hg = [&] {
    int g = 1;
    for (int d = std::min(H, mla_attn_max_heads(C, R)); d >= 1; d--)
      if (H % d == 0) return d;
    return g;
  }();
  const int pos[T] = {0, 20, 41};  // context lengths 1, 21, 42: partial tiles at 16 and 32 positions
  const int seq[T] = {0, 1, 0};
  std::vector<int> bt = {3, 1, 0, 2, 5, 4, 6, 7};  // [2 seqs][maxBlocks]
  const int slots = 8 * bs;
  for (int bf16 = 0; bf16 < 2; bf16++) {
    std::vector<float> cache32(size_t(slots) * Wd);
    std::vector<uint16_t> cache16(size_t(slots) * Wd);
    for (size_t i = 0; i < cache32.size(); i++) {
      cache32[i] = unif(-1, 1);
      cache16[i] = bf16_of(cache32[i]);
    }
    std::vector<float> qa(size_t(T) * H * C), q(size_t(T) * H * QW);
    for (auto& v : qa) v = unif(-0.3f, 0.3f);
    for (auto& v : q) v = unif(-0.3f, 0.3f);
    auto kv = [&](int s, int j, int k) -> double {
      const int64_t slot = int64_t(bt[s * maxBlocks + j / bs]) * bs + j % bs;
      return bf16 ? ref_bf16(cache16[slot * Wd + k]) : cache32[slot * Wd + k];
    };
    const float scale = 0.07f;
    std::vector<double> r(size_t(T) * H * C);
    for (int t = 0; t < T; t++)
      for (int h = 0; h < H; h++) {
        const int P = pos[t] + 1;
        std::vector<double> sc(P);
        double mx = -INFINITY;
        for (int j = 0; j < P; j++) {
          double s = 0;
          for (int k = 0; k < C; k++) s += double(qa[(t * H + h) * C + k]) * kv(seq[t], j, k);
          for (int k = 0; k < R; k++) s += double(q[t * H * QW + h * QW + nope + k]) * kv(seq[t], j, C + k);
          sc[j] = s * scale;
          mx = std::max(mx, sc[j]);
        }
        double l = 0;
        for (int j = 0; j < P; j++) l += std::exp(sc[j] - mx);
        for (int c = 0; c < C; c++) {
          double o = 0;
          for (int j = 0; j < P; j++) o += std::exp(sc[j] - mx) * kv(seq[t], j, c);
          r[(t * H + h) * C + c] = o / l;
        }
      }
    for (int nsplit : {1, 2}) {
      std::vector<float> out(size_t(T) * H * C), po(size_t(T) * H * nsplit * C), pml(size_t(T) * H * nsplit * 2);
      AttnArgs a{};
      a.qa = qa.data();
      a.q = q.data();
      a.QW = QW;
      a.nope = nope;
      a.cache = bf16 ? (const void*)cache16.data() : (const void*)cache32.data();
      a.cbf16 = bf16;
      a.layerOff = 0;
      a.C = C;
      a.R = R;
      a.m = CacheMeta{pos, seq, bt.data(), maxBlocks, bs};
      a.T = T;
      a.H = H;
      a.hg = hg;
      a.scale = scale;
      a.nsplit = nsplit;
      a.splitLen = nsplit == 1 ? 64 : 32;
      a.out = out.data();
      a.part_o = po.data();
      a.part_ml = pml.data();
      launch_mla_attn(nullptr, a);
      report("mla attention " + std::string(bf16 ? "bf16" : "f32") + " cache, heads/block " + std::to_string(hg) + ", splits " + std::to_string(nsplit),
             relerr(out, r), 2e-6);
    }
  }
}

int run_sample(const char* in, const char* out) {
  FILE* f = fopen(in, "rb");
  if (!f) return perror(in), 2;
  int32_t TN[2];
  if (fread(TN, 4, 2, f) != 2) return 2;
  const int T = TN[0], N = TN[1];
  std::vector<float> x(size_t(T) * N);
  std::vector<double> params(size_t(T) * 4), u(T);
  if (fread(x.data(), 4, x.size(), f) != x.size() || fread(params.data(), 8, params.size(), f) != params.size() ||
      fread(u.data(), 8, u.size(), f) != u.size())
    return fprintf(stderr, "short input\n"), 2;
  fclose(f);
  std::vector<double> scratch(size_t(T) * N + (size_t(T) * N * 2 + 7) / 8);
  std::vector<int> ids(T);
  std::vector<float> lp(T);
  launch_sample(nullptr, x.data(), T, N, params.data(), u.data(), scratch.data(), ids.data(), lp.data());
  FILE* o = fopen(out, "wb");
  fwrite(ids.data(), 4, T, o);
  fwrite(lp.data(), 4, T, o);
  fclose(o);
  fprintf(stderr, "sample: %d rows of %d at WARP %d, %lld fiber switches\n", T, N, WARP, ds3emu::emu().switches);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc == 4 && std::string(argv[1]) == "sample") return run_sample(argv[2], argv[3]);
    if (argc >= 2 && std::string(argv[1]) == "checks") {
      const std::string only = argc >= 3 ? argv[2] : "";
      const std::map<std::string, std::function<void()>> all = {{"rmsnorm", check_rmsnorm}, {"argmax", check_argmax}, {"route", check_route},
                                                                  {"plan", check_plan},       {"act", check_act_prep},   {"gemv", [] { check_gemv(false); }},
                                                                  {"gemv-fnuz", [] { check_gemv(true); }},
#if DS3_EMU_WARP == 64  // (the MFMA kernel exists in the HIP lane world only)
                                                                  {"mfma", check_mfma},
#endif
                                                                  {"mla", check_mla}};
      if (!only.empty() && !all.count(only)) return fprintf(stderr, "no check %s\n", only.c_str()), 2;
      for (auto& [k, fn] : all)
        if (only.empty() || only == k) fn();
      int bad = 0;
      for (auto& o : outs) bad += !(o.err <= o.tol);
      return bad ? 1 : 0;
    }
  } catch (const std::exception& e) {
    printf("{\"check\":\"emulator\",\"warp\":%d,\"err\":1,\"tol\":0,\"ok\":false,\"detail\":\"%s\"}\n", WARP, e.what());
    return 3;
  }
  fprintf(stderr, "usage: wave64_harness sample <in> <out> | checks [name]\n");
  return 2;
}
