// ds3 CPU backend: kernels for the DeepSeek-V3 op set (fp32 compute, FP8/BF16 weights as stored).
#pragma once
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "simd.h"

namespace ds3 {

enum class WDType { F8E4M3, BF16, F16, F32 };

// ---- number formats -----------------------------------------------------------------
float fp8e4m3_to_f32(uint8_t v);
extern float FP8_LUT[256];
void init_tables();
inline float bf16_to_f32(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffff) > 0x7f800000) return uint16_t((u >> 16) | 0x40);  // NaN
  u += 0x7fff + ((u >> 16) & 1);
  return uint16_t(u >> 16);
}
inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }
float f16_to_f32(uint16_t h);
/** round to the nearest e4m3fn value (saturating at +-448), returned as float */
float round_fp8e4m3(float x);
/** round to the nearest e4m3fnuz value (bias 8, no inf, no -0; saturating at +-240), returned as float */
float round_fp8e4m3fnuz(float x);
/**
 * An OCP e4m3fn weight as AMD MI300 (gfx942) holds it in e4m3fnuz: byte 0x80 (fn -0, fnuz NaN) becomes
 * 0x00, every other byte is unchanged, block scales double (a fnuz code is worth half its fn reading).
 * In place; returns the count of fn NaN codes (0x7f, 0xff), which fnuz cannot represent (the caller refuses).
 */
int64_t fp8_fn_to_fnuz(uint8_t* data, int64_t n, float* scale, int64_t ns);

// ---- thread pool --------------------------------------------------------------------
class Pool {
 public:
  /** n threads (the caller's included), running the kernels `k` (simd.h) */
  explicit Pool(int n, const Kern* k = nullptr);
  /** this context's kernel table (one ISA for the context's lifetime: results never depend on a switch) */
  const Kern& k() const { return *kern_; }
  ~Pool();
  int size() const { return int(workers_.size()) + 1; }
  /** run fn(begin, end) over [0, n) split in contiguous chunks, on all threads; blocks */
  void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn, int64_t min_chunk = 1);

 private:
  void loop(int id);
  const Kern* kern_;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  int64_t n_ = 0, chunk_ = 0;
  int64_t next_ = 0;
  int pending_ = 0;
  uint64_t gen_ = 0;
  bool stop_ = false;
};

// ---- weights ------------------------------------------------------------------------
struct Weight {
  WDType dtype;
  int64_t rows, cols;
  std::vector<uint8_t> data;
  std::vector<float> scale;  // FP8: [srows, scols]
  int64_t srows = 0, scols = 0, orow = 0, ocol = 0;
  /** dequantize row r, columns [0, cols), into out */
  void row(int64_t r, float* out) const;
  /** element size in bytes */
  int esize() const { return dtype == WDType::F8E4M3 ? 1 : dtype == WDType::F32 ? 4 : 2; }
  /** the plain view the SIMD kernels read */
  WView view() const { return {int(dtype), rows, cols, data.data(), scale.data(), scols, orow, ocol, scale_ok}; }
  bool scale_ok = true;  // FP8: every block scale < 2^8 (set at load)
  /**
   * All rows as fp32 (rows x cols), made once on first use and kept with the weight: for the
   * weights every step reads whole and reuses (MLA's wkv_b, the router's gate). Thread-safe.
   */
  const float* dequantized(const Kern& k) const;

 private:
  mutable std::once_flag dq_once_;
  mutable std::vector<float> dq_;
};

struct Precision {
  bool act_bf16 = false;
  int act_quant = 0;  // 0 none, 1 fp8, 2 fp8 ue8m0, 3 fp8 e4m3fnuz (max 240)
};

// ---- ops ----------------------------------------------------------------------------
void linear(Pool& p, const Precision& pr, const float* x, int64_t T, const Weight& w, float* y);
void rms_norm(Pool& p, const float* x, int64_t T, int64_t D, const Weight& w, float eps, float* y);
void embed(Pool& p, const Weight& table, const int32_t* ids, int64_t T, int64_t vocab_start, float* y);
void rope(Pool& p, float* x, int64_t T, int64_t heads, int64_t head_dim, int64_t off, int64_t rdim, const int32_t* pos,
          const float* inv_freq, float attn_factor);
void act_quant_rows(float* x, int64_t T, int64_t K, int mode);

struct Cache {
  int64_t layers, num_blocks, block_size, width;
  bool bf16;
  std::vector<float> f32;
  std::vector<uint16_t> b16;
  int64_t slots() const { return num_blocks * block_size; }
  void write(int64_t layer, int64_t slot, const float* v, int64_t n);
  void read(int64_t layer, int64_t slot, float* v, int64_t n) const;
  /** one slot's values: a pointer into the cache (fp32) or converted into tmp (bf16, width floats) */
  const float* row(int64_t layer, int64_t slot, float* tmp) const;
};

struct AttnMeta {
  const int32_t* positions;
  const int32_t* seq_idx;
  const int32_t* block_tables;
  int64_t max_blocks;
};

struct MlaDims {
  int64_t heads, nope, rope, v, kv_lora;
  float scale;
};

void mla(Pool& p, const Precision& pr, const float* q, const float* kv, const float* pe, int64_t T, const Weight& wkv_b,
         Cache& cache, int64_t layer, const AttnMeta& m, const MlaDims& d, float* out);

struct GateCfg {
  int topk, n_groups, topk_groups;
  bool sigmoid, norm_topk;
  float route_scale;
};
void moe_gate(Pool& p, const float* x, int64_t T, const Weight& g, const float* bias, const GateCfg& c, float* out);

struct Expert {
  const Weight *w1, *w2, *w3;
};
void moe_experts(Pool& p, const Precision& pr, const float* x, int64_t T, int64_t D, const std::vector<Expert>& ex,
                 int64_t first, const float* routing, int topk, float* y);

}  // namespace ds3
