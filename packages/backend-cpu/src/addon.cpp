// ds3 CPU backend: the op table exposed to JS (node-addon-api). Context-aware: no mutable
// globals, each Context owns its thread pool, so the addon loads in every worker thread.
#include <napi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <mutex>

#include "kernels.h"

using namespace ds3;

namespace {

std::once_flag tables_once;

template <typename T>
Napi::External<std::shared_ptr<T>> wrap(Napi::Env env, std::shared_ptr<T> p) {
  return Napi::External<std::shared_ptr<T>>::New(env, new std::shared_ptr<T>(std::move(p)),
                                                 [](Napi::Env, std::shared_ptr<T>* h) { delete h; });
}
template <typename T>
std::shared_ptr<T>& unwrap(const Napi::Value& v, const char* what) {
  if (!v.IsExternal()) throw Napi::TypeError::New(v.Env(), std::string("expected a ") + what + " handle");
  return *v.As<Napi::External<std::shared_ptr<T>>>().Data();
}

const float* f32(const Napi::Value& v, int64_t need, const char* what) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    throw Napi::TypeError::New(v.Env(), std::string(what) + ": expected a Float32Array");
  auto a = v.As<Napi::Float32Array>();
  if (need >= 0 && int64_t(a.ElementLength()) < need)
    throw Napi::RangeError::New(v.Env(), std::string(what) + ": Float32Array too short (" + std::to_string(a.ElementLength()) +
                                              " < " + std::to_string(need) + ")");
  return a.Data();
}
const int32_t* i32(const Napi::Value& v, int64_t need, const char* what) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_int32_array)
    throw Napi::TypeError::New(v.Env(), std::string(what) + ": expected an Int32Array");
  auto a = v.As<Napi::Int32Array>();
  if (need >= 0 && int64_t(a.ElementLength()) < need)
    throw Napi::RangeError::New(v.Env(), std::string(what) + ": Int32Array too short");
  return a.Data();
}
int64_t num(const Napi::Value& v) { return v.As<Napi::Number>().Int64Value(); }

class Context : public Napi::ObjectWrap<Context> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "Context",
                       {
                           InstanceMethod("weight", &Context::Weight_),
                           InstanceMethod("expertSet", &Context::ExpertSet),
                           InstanceMethod("cache", &Context::Cache_),
                           InstanceMethod("readCache", &Context::ReadCache),
                           InstanceMethod("embed", &Context::Embed),
                           InstanceMethod("rmsNorm", &Context::RmsNorm),
                           InstanceMethod("linear", &Context::Linear),
                           InstanceMethod("add", &Context::Add),
                           InstanceMethod("siluMul", &Context::SiluMul),
                           InstanceMethod("rope", &Context::Rope),
                           InstanceMethod("mla", &Context::Mla),
                           InstanceMethod("moeGate", &Context::MoeGate),
                           InstanceMethod("moeExperts", &Context::MoeExperts),
                           InstanceMethod("threads", &Context::Threads),
                           InstanceMethod("isa", &Context::Isa),
                           InstanceMethod("dispose", &Context::Dispose),
                       });
  }

  // new Context({threads, actBf16, actQuant})
  Context(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Context>(info) {
    std::call_once(tables_once, init_tables);
    auto o = info[0].As<Napi::Object>();
    int threads = o.Get("threads").As<Napi::Number>().Int32Value();
    if (threads < 1) threads = 1;
    pr_.act_bf16 = o.Get("actBf16").ToBoolean();
    pr_.act_quant = o.Get("actQuant").As<Napi::Number>().Int32Value();
    std::string isa = o.Has("isa") && o.Get("isa").IsString() ? o.Get("isa").As<Napi::String>().Utf8Value() : "";
    const Kern* k = find_kern(isa.c_str());
    if (!k)
      throw Napi::Error::New(info.Env(), "CPU kernels \"" + isa + "\" are not available on this machine (available: " + available_isas() + ")");
    pool_ = std::make_unique<Pool>(threads, k);
    isa_ = k->isa;
  }

 private:
  Pool& pool(Napi::Env env) {
    if (!pool_) throw Napi::Error::New(env, "backend context was disposed");
    return *pool_;
  }

  Napi::Value Threads(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), pool_ ? pool_->size() : 0); }
  Napi::Value Isa(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), isa_); }
  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    pool_.reset();
    return info.Env().Undefined();
  }

  // weight(dtype, rows, cols, data: Uint8Array, scale?: Float32Array, srows, scols, orow, ocol)
  Napi::Value Weight_(const Napi::CallbackInfo& info) {
    auto env = info.Env();
    std::string dt = info[0].As<Napi::String>();
    auto w = std::make_shared<Weight>();
    w->dtype = dt == "f8_e4m3" ? WDType::F8E4M3 : dt == "bf16" ? WDType::BF16 : dt == "f16" ? WDType::F16 : WDType::F32;
    if (dt != "f8_e4m3" && dt != "bf16" && dt != "f16" && dt != "f32") throw Napi::TypeError::New(env, "unknown weight dtype " + dt);
    w->rows = num(info[1]);
    w->cols = num(info[2]);
    auto d = info[3].As<Napi::Uint8Array>();
    if (int64_t(d.ByteLength()) != w->rows * w->cols * w->esize())
      throw Napi::RangeError::New(env, "weight data has " + std::to_string(d.ByteLength()) + " bytes, shape needs " +
                                           std::to_string(w->rows * w->cols * w->esize()));
    w->data.assign(d.Data(), d.Data() + d.ByteLength());
    if (w->dtype == WDType::F8E4M3) {
      w->srows = num(info[5]);
      w->scols = num(info[6]);
      w->orow = num(info[7]);
      w->ocol = num(info[8]);
      const float* s = f32(info[4], w->srows * w->scols, "weight scale");
      if ((w->rows - 1 + w->orow) / 128 >= w->srows || (w->cols - 1 + w->ocol) / 128 >= w->scols)
        throw Napi::RangeError::New(env, "weight scale does not cover the weight's 128x128 blocks");
      w->scale.assign(s, s + w->srows * w->scols);
      if (pr_.act_quant == 3) {
        // fp8-fnuz: the weight as the ROCm kernels hold it on gfx942 (fnuz bytes, doubled scales S).
        // These kernels read a code with the e4m3fn bias (7); a fnuz code is worth exactly half of
        // that reading, so fnuz(b) * S == fn_reading(b) * (S / 2), exactly: the kernel scale is S / 2.
        int64_t nan = fp8_fn_to_fnuz(w->data.data(), int64_t(w->data.size()), w->scale.data(), int64_t(w->scale.size()));
        if (nan)
          throw Napi::RangeError::New(env, "FP8 weight has " + std::to_string(nan) +
                                               " NaN codes (0x7f/0xff), which e4m3fnuz cannot represent (fp8-fnuz)");
        for (float& v : w->scale) v *= 0.5f;
      }
      for (float v : w->scale) w->scale_ok = w->scale_ok && std::isfinite(v * 1.329227995784916e36f);  // v * 2^120
    }
    return wrap(env, w);
  }

  Napi::Value ExpertSet(const Napi::CallbackInfo& info) {
    auto arr = info[0].As<Napi::Array>();
    struct Set {
      std::vector<std::shared_ptr<Weight>> keep;
      std::vector<Expert> ex;
    };
    auto s = std::make_shared<Set>();
    for (uint32_t i = 0; i < arr.Length(); i++) {
      auto tr = arr.Get(i).As<Napi::Array>();
      auto w1 = unwrap<Weight>(tr.Get(0u), "weight"), w2 = unwrap<Weight>(tr.Get(1u), "weight"), w3 = unwrap<Weight>(tr.Get(2u), "weight");
      s->keep.insert(s->keep.end(), {w1, w2, w3});
      s->ex.push_back({w1.get(), w2.get(), w3.get()});
    }
    auto ex = std::shared_ptr<std::vector<Expert>>(s, &s->ex);
    return wrap(info.Env(), ex);
  }

  // cache(layers, numBlocks, blockSize, width, bf16)
  Napi::Value Cache_(const Napi::CallbackInfo& info) {
    auto c = std::make_shared<Cache>();
    c->layers = num(info[0]);
    c->num_blocks = num(info[1]);
    c->block_size = num(info[2]);
    c->width = num(info[3]);
    c->bf16 = info[4].ToBoolean();
    size_t n = size_t(c->layers * c->num_blocks * c->block_size * c->width);
    try {
      if (c->bf16) c->b16.assign(n, 0);
      else c->f32.assign(n, 0.0f);
    } catch (const std::bad_alloc&) {
      throw Napi::RangeError::New(info.Env(), "cannot allocate the latent cache (" + std::to_string(n) + " values)");
    }
    return wrap(info.Env(), c);
  }

  Napi::Value ReadCache(const Napi::CallbackInfo& info) {
    auto& c = unwrap<Cache>(info[0], "cache");
    int64_t layer = num(info[1]), slot = num(info[2]), count = num(info[3]);
    if (layer < 0 || layer >= c->layers || slot < 0 || slot + count > c->slots())
      throw Napi::RangeError::New(info.Env(), "readCache out of range");
    auto out = Napi::Float32Array::New(info.Env(), size_t(count * c->width));
    for (int64_t i = 0; i < count; i++) c->read(layer, slot + i, out.Data() + i * c->width, c->width);
    return out;
  }

  Napi::Float32Array out(Napi::Env env, int64_t n) { return Napi::Float32Array::New(env, size_t(n)); }
  void round_out(float* y, int64_t n) {
    if (pr_.act_bf16)
      for (int64_t i = 0; i < n; i++) y[i] = round_bf16(y[i]);
  }

  // embed(table, ids, vocabStart)
  Napi::Value Embed(const Napi::CallbackInfo& info) {
    auto& w = unwrap<Weight>(info[0], "weight");
    auto ids = info[1].As<Napi::Int32Array>();
    int64_t T = int64_t(ids.ElementLength());
    auto y = out(info.Env(), T * w->cols);
    embed(pool(info.Env()), *w, ids.Data(), T, num(info[2]), y.Data());
    round_out(y.Data(), T * w->cols);
    return y;
  }
  // rmsNorm(x, T, D, w, eps)
  Napi::Value RmsNorm(const Napi::CallbackInfo& info) {
    int64_t T = num(info[1]), D = num(info[2]);
    auto& w = unwrap<Weight>(info[3], "weight");
    if (w->rows * w->cols != D) throw Napi::RangeError::New(info.Env(), "rmsNorm: weight size != row width");
    auto y = out(info.Env(), T * D);
    rms_norm(pool(info.Env()), f32(info[0], T * D, "rmsNorm x"), T, D, *w, info[4].As<Napi::Number>().FloatValue(), y.Data());
    round_out(y.Data(), T * D);
    return y;
  }
  // linear(x, T, w)
  Napi::Value Linear(const Napi::CallbackInfo& info) {
    int64_t T = num(info[1]);
    auto& w = unwrap<Weight>(info[2], "weight");
    auto y = out(info.Env(), T * w->rows);
    linear(pool(info.Env()), pr_, f32(info[0], T * w->cols, "linear x"), T, *w, y.Data());
    return y;
  }
  Napi::Value Add(const Napi::CallbackInfo& info) {
    auto a = info[0].As<Napi::Float32Array>();
    int64_t n = int64_t(a.ElementLength());
    const float* b = f32(info[1], n, "add b");
    auto y = out(info.Env(), n);
    for (int64_t i = 0; i < n; i++) y.Data()[i] = a.Data()[i] + b[i];
    round_out(y.Data(), n);
    return y;
  }
  Napi::Value SiluMul(const Napi::CallbackInfo& info) {
    auto a = info[0].As<Napi::Float32Array>();
    int64_t n = int64_t(a.ElementLength());
    const float* b = f32(info[1], n, "siluMul up");
    auto y = out(info.Env(), n);
    for (int64_t i = 0; i < n; i++) {
      float g = a.Data()[i];
      y.Data()[i] = g / (1.0f + std::exp(-g)) * b[i];
    }
    round_out(y.Data(), n);
    return y;
  }
  // rope(x, T, heads, headDim, off, rdim, positions, invFreq, attnFactor) -> new array
  Napi::Value Rope(const Napi::CallbackInfo& info) {
    int64_t T = num(info[1]), H = num(info[2]), hd = num(info[3]), off = num(info[4]), rd = num(info[5]);
    const float* x = f32(info[0], T * H * hd, "rope x");
    auto y = out(info.Env(), T * H * hd);
    std::memcpy(y.Data(), x, size_t(T * H * hd) * 4);
    rope(pool(info.Env()), y.Data(), T, H, hd, off, rd, i32(info[6], T, "rope positions"), f32(info[7], rd / 2, "rope invFreq"),
         info[8].As<Napi::Number>().FloatValue());
    round_out(y.Data(), T * H * hd);
    return y;
  }
  // mla(q, kv, pe, T, wkvB, cache, layer, positions, seqIdx, blockTables, maxBlocks, heads, nope, rope, v, kvLora, scale)
  Napi::Value Mla(const Napi::CallbackInfo& info) {
    auto env = info.Env();
    int64_t T = num(info[3]);
    auto& wb = unwrap<Weight>(info[4], "weight");
    auto& c = unwrap<Cache>(info[5], "cache");
    int64_t layer = num(info[6]);
    MlaDims d{num(info[11]), num(info[12]), num(info[13]), num(info[14]), num(info[15]), info[16].As<Napi::Number>().FloatValue()};
    if (layer < 0 || layer >= c->layers) throw Napi::RangeError::New(env, "mla: layer outside the cache");
    if (c->width != d.kv_lora + d.rope) throw Napi::RangeError::New(env, "mla: cache width != kv_lora_rank + qk_rope_head_dim");
    if (wb->rows != d.heads * (d.nope + d.v) || wb->cols != d.kv_lora) throw Napi::RangeError::New(env, "mla: wkv_b shape mismatch");
    AttnMeta m{i32(info[7], T, "positions"), i32(info[8], T, "seqIdx"), info[9].As<Napi::Int32Array>().Data(), num(info[10])};
    auto bt = info[9].As<Napi::Int32Array>();
    // validate the block tables before any write
    for (int64_t t = 0; t < T; t++) {
      int64_t s = m.seq_idx[t], p = m.positions[t];
      if (p < 0 || p / c->block_size >= m.max_blocks || (s + 1) * m.max_blocks > int64_t(bt.ElementLength()))
        throw Napi::RangeError::New(env, "mla: token position outside its block table");
      for (int64_t j = 0; j <= p / c->block_size; j++) {
        int64_t b = m.block_tables[s * m.max_blocks + j];
        if (b < 0 || b >= c->num_blocks) throw Napi::RangeError::New(env, "mla: block table names a block outside the cache");
      }
    }
    auto y = out(env, T * d.heads * d.v);
    mla(pool(env), pr_, f32(info[0], T * d.heads * (d.nope + d.rope), "mla q"), f32(info[1], T * d.kv_lora, "mla kv"),
        f32(info[2], T * d.rope, "mla pe"), T, *wb, *c, layer, m, d, y.Data());
    return y;
  }
  // moeGate(x, T, gate, bias|null, topk, nGroups, topkGroups, sigmoid, normTopk, routeScale)
  Napi::Value MoeGate(const Napi::CallbackInfo& info) {
    int64_t T = num(info[1]);
    auto& g = unwrap<Weight>(info[2], "weight");
    const float* bias = info[3].IsNull() || info[3].IsUndefined() ? nullptr : f32(info[3], g->rows, "gate bias");
    GateCfg c{int(num(info[4])), int(num(info[5])), int(num(info[6])), info[7].ToBoolean(), info[8].ToBoolean(),
              info[9].As<Napi::Number>().FloatValue()};
    auto y = out(info.Env(), T * 2 * c.topk);
    moe_gate(pool(info.Env()), f32(info[0], T * g->cols, "gate x"), T, *g, bias, c, y.Data());
    return y;
  }
  // moeExperts(x, T, D, set, first, routing, topk)
  Napi::Value MoeExperts(const Napi::CallbackInfo& info) {
    int64_t T = num(info[1]), D = num(info[2]);
    auto& set = unwrap<std::vector<Expert>>(info[3], "expert set");
    int topk = int(num(info[6]));
    auto y = out(info.Env(), T * D);
    moe_experts(pool(info.Env()), pr_, f32(info[0], T * D, "experts x"), T, D, *set, num(info[4]),
                f32(info[5], T * 2 * topk, "routing"), topk, y.Data());
    return y;
  }

  std::unique_ptr<Pool> pool_;
  Precision pr_;
  std::string isa_;
};

// readBandwidth(mib, threads, reps) -> bytes/s: a streaming sum over a buffer far larger than the
// last-level cache, split over `threads` threads (the memory roofline of a weight-streaming step).
Napi::Value ReadBandwidth(const Napi::CallbackInfo& info) {
  int64_t mib = num(info[0]);
  int threads = int(num(info[1])), reps = int(num(info[2]));
  if (mib < 1 || threads < 1 || reps < 1) throw Napi::RangeError::New(info.Env(), "readBandwidth: mib, threads and reps must be >= 1");
  std::vector<uint64_t> buf(size_t(mib) << 17);
  Pool pool(threads);
  pool.parallel_for(int64_t(buf.size()), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) buf[size_t(i)] = uint64_t(i) * 0x9e3779b97f4a7c15ull;
  }, int64_t(buf.size()) / threads);
  double best = 0;
  volatile uint64_t sink = 0;
  for (int r = 0; r < reps; r++) {
    std::vector<uint64_t> part(size_t(threads), 0);
    auto t0 = std::chrono::steady_clock::now();
    int64_t per = (int64_t(buf.size()) + threads - 1) / threads;
    pool.parallel_for(threads, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; k++) {
        const uint64_t* p = buf.data() + k * per;
        int64_t n = std::min<int64_t>(per, int64_t(buf.size()) - k * per);
        uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
        for (int64_t i = 0; i + 8 <= n; i += 8) {
          a0 += p[i]; a1 += p[i + 1]; a2 += p[i + 2]; a3 += p[i + 3];
          a4 += p[i + 4]; a5 += p[i + 5]; a6 += p[i + 6]; a7 += p[i + 7];
        }
        part[size_t(k)] = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
      }
    });
    double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    for (auto v : part) sink = sink + v;
    best = std::max(best, double(buf.size() * 8) / sec);
  }
  return Napi::Number::New(info.Env(), best);
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("Context", Context::Define(env));
  exports.Set("readBandwidth", Napi::Function::New(env, ReadBandwidth));
  exports.Set("isas", Napi::String::New(env, available_isas()));
  exports.Set("hardwareThreads", Napi::Number::New(env, std::thread::hardware_concurrency()));
  return exports;
}

}  // namespace

NODE_API_MODULE(ds3_cpu, Init)
