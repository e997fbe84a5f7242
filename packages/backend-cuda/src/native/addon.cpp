// ds3 CUDA backend: the op table exposed to JS (node-addon-api). Context-aware (no mutable globals):
// each Context owns a device, a stream, its weights, caches and a per-step arena of device memory
// (reset by beginStep, so no op calls cudaMalloc in steady state). Ops are asynchronous on the stream;
// only download/readCache/argmax wait. Tensors cross the boundary as device addresses (JS numbers).
#include <napi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "ops.h"  // vendor.h first: the CUDA runtime names (mapped to HIP in the ROCm build)

#ifdef DS3_HAVE_NCCL
#if defined(DS3_HIP)
#include <rccl/rccl.h>  // RCCL: the NCCL API under the same names
#else
#include <nccl.h>
#endif
#endif

#include "graphs.h"

using namespace ds3cu;

namespace {

void ck(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(DS3_GPU_NAME " error in ") + what + ": " + cudaGetErrorString(e));
}
#define CK(x) ck((x), #x)

int64_t num(const Napi::Value& v) { return v.As<Napi::Number>().Int64Value(); }
double dbl(const Napi::Value& v) { return v.As<Napi::Number>().DoubleValue(); }
template <typename T>
T* ptr(const Napi::Value& v) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(v.As<Napi::Number>().Int64Value()));
}
Napi::Value addr(Napi::Env env, const void* p) { return Napi::Number::New(env, double(reinterpret_cast<uintptr_t>(p))); }
// op arguments as recorded (doubles: every device address fits in 53 bits)
inline int64_t I(double v) { return int64_t(v); }
template <typename T>
T* P(double v) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(int64_t(v)));
}
inline uint64_t U(const void* p) { return uint64_t(reinterpret_cast<uintptr_t>(p)); }

/** the ops that run on the stream between synchronization points (recorded, captured, replayed) */
enum OpId : int {
  OP_UPLOAD = 1,
  OP_EMBED,
  OP_RMSNORM,
  OP_LINEAR,
  OP_ADD,
  OP_SILUMUL,
  OP_CONCAT,
  OP_SLICE,
  OP_ROWS,
  OP_ROPE,
  OP_MLA,
  OP_MOEGATE,
  OP_MOEEXPERTS,
  OP_ARGMAX,
  OP_SAMPLE,
  OP_ALLREDUCE,
  OP_ALLGATHER,
};

#if defined(DS3_HIP)
[[maybe_unused]] const char* kNoNccl =
    "RCCL not available: @ds3/backend-rocm was built without RCCL (CMake found no rccl.h / librccl); collectives go through the host";
#else
[[maybe_unused]] const char* kNoNccl =
    "NCCL not available: @ds3/backend-cuda was built without NCCL (CMake found no nccl.h / libnccl); collectives go through the host";
#endif

int esize(int dt) { return dt == W_F8 ? 1 : dt == W_F32 ? 4 : 2; }
int dtype_of(const std::string& s) {
  if (s == "f8_e4m3") return W_F8;
  if (s == "bf16") return W_BF16;
  if (s == "f16") return W_F16;
  if (s == "f32") return W_F32;
  throw std::runtime_error("unknown weight dtype " + s);
}
const char* dtype_name(int d) { return d == W_F8 ? "f8" : d == W_BF16 ? "bf16" : d == W_F16 ? "f16" : "f32"; }

struct DevWeight {
  WDesc h{};           // host copy of the descriptor
  WDesc* d = nullptr;  // descriptor on the device
  int dtype = 0;
  int64_t rows = 0, cols = 0;
  size_t bytes = 0;
};
struct ExpSet {
  WDesc* d = nullptr;  // [n * 3]: w1, w2, w3 per expert
  int n = 0, dtype = 0;
  int64_t inter = 0, dim = 0;
};
struct DevCache {
  void* data = nullptr;
  int64_t layers = 0, blocks = 0, bs = 0, width = 0;
  bool bf16 = false;
  int64_t slots() const { return blocks * bs; }
};

/** bump allocator over chunks of device memory, reset at each step */
class Arena {
 public:
  void* alloc(size_t bytes) {
    bytes = (std::max<size_t>(bytes, 1) + 255) & ~size_t(255);
    while (cur_ < chunks_.size()) {
      auto& c = chunks_[cur_];
      if (off_ + bytes <= c.size) {
        void* p = static_cast<char*>(c.p) + off_;
        off_ += bytes;
        used_ += bytes;
        return p;
      }
      cur_++;
      off_ = 0;
    }
    size_t sz = std::max<size_t>(bytes, size_t(256) << 20);
    void* p = nullptr;
    cudaError_t e = cudaMalloc(&p, sz);
    if (e != cudaSuccess) {
      cudaGetLastError();
      throw std::runtime_error("out of device memory for this step's temporaries (" + std::to_string(sz >> 20) +
                               " MiB more; " + std::to_string(total_ >> 20) + " MiB held): " + cudaGetErrorString(e));
    }
    chunks_.push_back({p, sz});
    total_ += sz;
    cur_ = chunks_.size() - 1;
    off_ = bytes;
    used_ += bytes;
    return p;
  }
  void reset() {
    cur_ = 0;
    off_ = 0;
    peak_ = std::max(peak_, used_);
    used_ = 0;
  }
  void release() {
    for (auto& c : chunks_) cudaFree(c.p);
    chunks_.clear();
    cur_ = off_ = 0;
    total_ = 0;
  }
  size_t total() const { return total_; }
  size_t peak() const { return std::max(peak_, used_); }
  ds3g::ArenaState state() const { return {cur_, off_, used_}; }
  void setState(const ds3g::ArenaState& s) {
    cur_ = s.cur;
    off_ = s.off;
    used_ = s.used;
    peak_ = std::max(peak_, used_);
  }

 private:
  struct Chunk {
    void* p;
    size_t size;
  };
  std::vector<Chunk> chunks_;
  size_t cur_ = 0, off_ = 0, total_ = 0, used_ = 0, peak_ = 0;
};

thread_local int tl_device = -1;

class Context : public Napi::ObjectWrap<Context> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "Context",
                       {
                           InstanceMethod("weight", &Context::Weight_),
                           InstanceMethod("expertSet", &Context::ExpertSet_),
                           InstanceMethod("cache", &Context::Cache_),
                           InstanceMethod("readCache", &Context::ReadCache),
                           InstanceMethod("fillCacheRandom", &Context::FillCacheRandom),
                           InstanceMethod("upload", &Context::Upload),
                           InstanceMethod("uploadI32", &Context::UploadI32),
                           InstanceMethod("persist", &Context::Persist),
                           InstanceMethod("download", &Context::Download),
                           InstanceMethod("beginStep", &Context::BeginStep),
                           InstanceMethod("sync", &Context::Sync),
                           InstanceMethod("embed", &Context::Embed),
                           InstanceMethod("rmsNorm", &Context::RmsNorm),
                           InstanceMethod("linear", &Context::Linear),
                           InstanceMethod("add", &Context::Add),
                           InstanceMethod("siluMul", &Context::SiluMul),
                           InstanceMethod("concat", &Context::Concat),
                           InstanceMethod("slice", &Context::Slice),
                           InstanceMethod("rows", &Context::Rows),
                           InstanceMethod("rope", &Context::Rope),
                           InstanceMethod("mla", &Context::Mla),
                           InstanceMethod("moeGate", &Context::MoeGate),
                           InstanceMethod("moeExperts", &Context::MoeExperts),
                           InstanceMethod("argmax", &Context::Argmax),
                           InstanceMethod("sample", &Context::Sample),
                           InstanceMethod("setGraphs", &Context::SetGraphs),
                           InstanceMethod("graphStats", &Context::GraphStats_),
                           InstanceMethod("tune", &Context::Tune),
                           InstanceMethod("ncclUniqueId", &Context::NcclUniqueId),
                           InstanceMethod("ncclInit", &Context::NcclInit),
                           InstanceMethod("allReduce", &Context::AllReduce),
                           InstanceMethod("allGather", &Context::AllGather),
                           InstanceMethod("profile", &Context::Profile),
                           InstanceMethod("profileReport", &Context::ProfileReport),
                           InstanceMethod("memInfo", &Context::MemInfo),
                           InstanceMethod("dispose", &Context::Dispose),
                       });
  }

  // new Context({device, actBf16, actQuant, graphs})
  Context(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Context>(info) {
    auto o = info[0].As<Napi::Object>();
    dev_ = o.Get("device").As<Napi::Number>().Int32Value();
    actBf16_ = o.Get("actBf16").ToBoolean() ? 1 : 0;
    actQuant_ = o.Get("actQuant").As<Napi::Number>().Int32Value();
    graphsWanted_ = o.Has("graphs") && o.Get("graphs").ToBoolean();
#if defined(DS3_HIP)
    if (actQuant_ < 0 || actQuant_ > 3) throw std::runtime_error("actQuant must be 0..3 (none, fp8, fp8-ue8m0, fp8-fnuz)");
#else
    if (actQuant_ == 3) throw std::runtime_error("actQuant fp8-fnuz is AMD's FP8 format; the CUDA build computes OCP e4m3fn (fp8, fp8-ue8m0)");
#endif
    int n = 0;
    CK(cudaGetDeviceCount(&n));
    if (dev_ < 0 || dev_ >= n)
      throw std::runtime_error(std::string(DS3_GPU_NAME " device ") + std::to_string(dev_) + " does not exist (" + std::to_string(n) + " found)");
    CK(cudaSetDevice(dev_));
    tl_device = dev_;
    CK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    cudaDeviceProp p{};
    CK(cudaGetDeviceProperties(&p, dev_));
    sms_ = p.multiProcessorCount;
    set_sm_count(sms_);
#if defined(DS3_HIP)
    // no mma.sync kernels on AMD: "compute capability" 0 makes every choice below take the GEMV/SIMT kernels.
    // FP8 weights are stored as e4m3fnuz on gfx94x (MI300: its hardware format; the gfx94x code object decodes it)
    cc_ = 0;
    fnuz_ = std::string(p.gcnArchName).rfind("gfx94", 0) == 0;
    // the MFMA GEMM (linear.cu) has never run on hardware: only on request
    const char* mf = getenv("DS3_ROCM_MFMA");
    tcGemm_ = mf && std::string(mf) == "1";
#else
    cc_ = p.major * 10 + p.minor;
    tcGemm_ = cc_ >= 80;
#endif
    stageCap_ = size_t(16) << 20;
    CK(cudaHostAlloc(&stage_, stageCap_, cudaHostAllocDefault));
    alive_ = true;
    graphs_.enabled = graphsWanted_;
  }
  ~Context() override { release(); }

  // ---- the recorder's host interface (graphs.h) ------------------------------------------------------
  uint64_t exec(const ds3g::OpKey& k, const void* data, int64_t* stageAt) {
    const double* a = k.a;
    switch (k.op) {
      case OP_UPLOAD: {
        void* d = arena_.alloc(k.bytes);
        const int64_t st = h2d(d, data, k.bytes);
        if (stageAt) *stageAt = st;
        return U(d);
      }
      case OP_EMBED: return opEmbed(a);
      case OP_RMSNORM: return opRmsNorm(a);
      case OP_LINEAR: return opLinear(a);
      case OP_ADD: return opAdd(a);
      case OP_SILUMUL: return opSiluMul(a);
      case OP_CONCAT: return opConcat(a);
      case OP_SLICE: return opSlice(a);
      case OP_ROWS: return opRows(a);
      case OP_ROPE: return opRope(a);
      case OP_MLA: return opMla(a);
      case OP_MOEGATE: return opMoeGate(a);
      case OP_MOEEXPERTS: return opMoeExperts(a);
      case OP_ARGMAX: return opArgmax(a);
      case OP_SAMPLE: return opSample(a);
      case OP_ALLREDUCE: return opAllReduce(a);
      case OP_ALLGATHER: return opAllGather(a);
      default: throw std::runtime_error("unknown op " + std::to_string(k.op));
    }
  }
  ds3g::ArenaState arena() const { return arena_.state(); }
  void setArena(const ds3g::ArenaState& s) { arena_.setState(s); }
  size_t stageOff() const { return stageOff_; }
  void setStageOff(size_t s) { stageOff_ = s; }
  void stage(int64_t off, const void* data, size_t bytes) { std::memcpy(static_cast<char*>(stage_) + off, data, bytes); }
  bool beginCapture() {
    if (cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    capturing_ = true;
    return true;
  }
  void* endCapture() {
    capturing_ = false;
    cudaGraph_t g = nullptr;
    if (cudaStreamEndCapture(stream_, &g) != cudaSuccess || !g) {
      cudaGetLastError();
      return nullptr;
    }
    cudaGraphExec_t ex = nullptr;
    const cudaError_t e = cudaGraphInstantiate(&ex, g, 0);
    cudaGraphDestroy(g);
    if (e != cudaSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    return ex;
  }
  void launch(void* ex) { CK(cudaGraphLaunch(static_cast<cudaGraphExec_t>(ex), stream_)); }
  void destroy(void* ex) { cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(ex)); }

 private:
  /** a synchronization point or a call that is not an op: the recorder's segment ends here */
  void barrier() { graphs_.flush(); }
  /** an op from JS: numeric arguments (booleans as 0/1) through the recorder */
  Napi::Value Op(const Napi::CallbackInfo& info, int op, int n, int bucketArg = -1) {
    use();
    ds3g::OpKey k;
    k.op = op;
    k.n = n;
    for (int i = 0; i < n; i++) {
      const Napi::Value v = info[i];
      k.a[i] = v.IsBoolean() ? (v.As<Napi::Boolean>().Value() ? 1.0 : 0.0) : v.As<Napi::Number>().DoubleValue();
    }
    // the attention's split plan depends on the context length: round it up to a multiple of 128 so
    // that decode steps share a graph for 128 positions (the kernels read each token's own length)
    if (bucketArg >= 0) k.a[bucketArg] = double(((int64_t(k.a[bucketArg]) + 1 + 127) / 128) * 128 - 1);
    return Napi::Number::New(info.Env(), double(graphs_.op(k, nullptr)));
  }
  // ---- plumbing ---------------------------------------------------------------------------------
  void use() {
    if (!alive_) throw std::runtime_error("CUDA backend context was disposed");
    if (tl_device != dev_) {
      CK(cudaSetDevice(dev_));
      tl_device = dev_;
    }
  }
  void launched(const char* what) {
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA launch failed in ") + what + ": " + cudaGetErrorString(e));
  }
  template <typename T = float>
  T* tmp(size_t n) {
    return static_cast<T*>(arena_.alloc(n * sizeof(T)));
  }
  void release() {
    if (!alive_) return;
    cudaSetDevice(dev_);
    tl_device = dev_;
    try {
      graphs_.flush();
    } catch (...) {
    }
    alive_ = false;
    graphs_.clear();
    cudaStreamSynchronize(stream_);
#ifdef DS3_HAVE_NCCL
    if (comm_) ncclCommDestroy(comm_);
    comm_ = nullptr;
#endif
    for (void* p : owned_) cudaFree(p);
    owned_.clear();
    arena_.release();
    for (auto& e : evPool_) cudaEventDestroy(e);
    evPool_.clear();
    if (stage_) cudaFreeHost(stage_);
    if (down_) cudaFreeHost(down_);
    stage_ = down_ = nullptr;
    cudaStreamDestroy(stream_);
  }
  void* devAlloc(size_t bytes, const std::string& what) {
    void* p = nullptr;
    cudaError_t e = cudaMalloc(&p, std::max<size_t>(bytes, 16));
    if (e != cudaSuccess) {
      cudaGetLastError();
      size_t fr = 0, tot = 0;
      cudaMemGetInfo(&fr, &tot);
      throw std::runtime_error("cannot allocate " + std::to_string(bytes >> 20) + " MiB on the GPU for " + what + " (" +
                               std::to_string(fr >> 20) + " of " + std::to_string(tot >> 20) + " MiB free): " + cudaGetErrorString(e));
    }
    owned_.push_back(p);
    return p;
  }
  WDesc* descAlloc(const WDesc* h, int n) {
    WDesc* d = static_cast<WDesc*>(devAlloc(sizeof(WDesc) * n, "weight descriptors"));
    CK(cudaMemcpy(d, h, sizeof(WDesc) * n, cudaMemcpyHostToDevice));
    return d;
  }
  /** copy host bytes to the device through pinned staging (asynchronous on the stream); returns the
   *  staging offset used, or -1 for a direct copy (too large for staging). While capturing, a copy that
   *  would have to wait for the stream throws NeedsSync (the recorder then runs the segment eagerly). */
  int64_t h2d(void* dst, const void* src, size_t bytes) {
    if (bytes == 0) return -1;
    if (bytes > stageCap_) {
      if (capturing_) throw ds3g::NeedsSync{};
      CK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
      CK(cudaStreamSynchronize(stream_));
      return -1;
    }
    if (stageOff_ + bytes > stageCap_) {  // staging full: wait for the copies in flight
      if (capturing_) throw ds3g::NeedsSync{};
      CK(cudaStreamSynchronize(stream_));
      stageOff_ = 0;
    }
    const int64_t off = int64_t(stageOff_);
    char* s = static_cast<char*>(stage_) + stageOff_;
    std::memcpy(s, src, bytes);
    stageOff_ = (stageOff_ + bytes + 255) & ~size_t(255);
    CK(cudaMemcpyAsync(dst, s, bytes, cudaMemcpyHostToDevice, stream_));
    return off;
  }
  DevWeight& Wi(double v) {
    const int64_t i = I(v);
    if (i < 0 || i >= int64_t(weights_.size())) throw std::runtime_error("unknown weight handle");
    return weights_[size_t(i)];
  }
  DevCache& Ci(double v) {
    const int64_t i = I(v);
    if (i < 0 || i >= int64_t(caches_.size())) throw std::runtime_error("unknown cache handle");
    return caches_[size_t(i)];
  }
  DevWeight& W(const Napi::Value& v) { return Wi(double(num(v))); }
  DevCache& Cc(const Napi::Value& v) { return Ci(double(num(v))); }

  // ---- profiling: CUDA events around each op --------------------------------------------------------
  struct Rec {
    std::string name;
    cudaEvent_t a, b;
  };
  cudaEvent_t ev() {
    if (evNext_ < evPool_.size()) return evPool_[evNext_++];
    cudaEvent_t e;
    CK(cudaEventCreate(&e));
    evPool_.push_back(e);
    evNext_++;
    return e;
  }
  struct Prof {
    Context* c;
    std::string name;
    cudaEvent_t a{};
    bool nested = false;
    Prof(Context* c_, const char* n, const std::string& extra = "") : c(c_) {
      if (!c->prof_) return;
      name = std::string(n) + extra;
      nested = n[0] == '.';
      if (!nested) c->path_.clear();
      a = c->ev();
      cudaEventRecord(a, c->stream_);
    }
    ~Prof() {
      if (!c->prof_ || !c->alive_) return;
      cudaEvent_t b = c->ev();
      cudaEventRecord(b, c->stream_);
      c->recs_.push_back({nested ? name : name + c->path_, a, b});
    }
  };
  static std::string shape(int64_t a, int64_t b) { return "[" + std::to_string(a) + "x" + std::to_string(b) + "]"; }

  // ---- the linear family -------------------------------------------------------------------------
  int mcFor(int M) { return M <= 1 ? 1 : M <= 4 ? 4 : 8; }
  // actQuant: 0 none, 1 fp8, 2 fp8-ue8m0, 3 fp8-fnuz (AMD's format: the ROCm build only)
  int prepQ() const { return actQuant_ == 2 ? PREP_QDQ_UE8M0 : actQuant_ == 3 ? PREP_QDQ_FNUZ : PREP_QDQ; }
  int prepF8() const { return actQuant_ == 2 ? PREP_FP8_UE8M0 : actQuant_ == 3 ? PREP_FP8_FNUZ : PREP_FP8; }

  /** too few output tiles to fill the GPU: split K (partials summed in order by a second kernel) */
  void splitK(GemmArgs& a, int mtiles) {
    const int tiles = mtiles * ((a.N + TC_BN - 1) / TC_BN);
    const int nkb = (a.K + TC_BK - 1) / TC_BK;
    int s = 1;
    if (tiles < sms_) s = std::min(std::max(1, nkb / 2), (2 * sms_ + tiles - 1) / tiles);
    if (s > 1) {
      const int kper = (nkb + s - 1) / s;
      s = (nkb + kper - 1) / kper;  // no empty splits
    }
    a.splits = s;
    if (s > 1) a.ws = tmp(size_t(s) * a.M * a.N);
  }

  /** y[M, N] (row stride ldy) = x[M, K] (row stride ldx) @ W^T, choosing the kernel */
  void linearImpl(const float* x, int64_t ldx, int M, const DevWeight& w, float* y, int64_t ldy, int round, bool quant) {
    const int N = int(w.rows), K = int(w.cols);
    if (M <= 0) return;
    const bool q = quant && actQuant_ && w.dtype == W_F8;
    GemmArgs a;
    a.wtab = w.d;
    a.N = N;
    a.K = K;
    a.M = M;
    a.y = y;
    a.ldy = ldy;
    a.round = round;
    a.x = x;
    a.ldx = ldx;
    const int ksb = (K + 127) / 128;
    const int mtiles = (M + TC_BM - 1) / TC_BM;
    // GEMV for few rows; with tensor cores allowed (fast modes) past 2 rows the mma kernel streams
    // the weights as fast and does the arithmetic for free
    const bool tcAllowed = K % 16 == 0 && tcGemm_ && ((q && w.dtype == W_F8) || (actBf16_ && (w.dtype == W_F8 || w.dtype == W_BF16)));
    if (M <= (tcAllowed ? 2 : 8) && K % 16 == 0 && ldx % 4 == 0) {
      if (q) {
        float* t = tmp(size_t(M) * K);
        launch_act_prep(stream_, prepQ(), x, ldx, nullptr, 0, nullptr, nullptr, M, K, t, nullptr, 0);
        a.x = t;
        a.ldx = K;
      }
      launch_gemv(stream_, a, w.dtype, false, 1, 1, mcFor(M));
      if (prof_) path_ = std::string(" gemv ") + dtype_name(w.dtype) + (q ? " q" : "");
      launched("linear (gemv)");
      return;
    }
    if (K % 16 == 0 && tcGemm_ && (w.dtype == W_F8 || w.dtype == W_BF16)) {
      if (q) {
        uint8_t* aq = tmp<uint8_t>(size_t(M) * K);
        float* as = tmp(size_t(M) * ksb);
        launch_act_prep(stream_, prepF8(), x, ldx, nullptr, 0, nullptr, nullptr, M, K, aq, as, 0);
        a.a = aq;
        a.as = as;
        a.ksb = ksb;
        splitK(a, mtiles);
        launch_tc(stream_, a, true, false, mtiles, actQuant_ == 3);
        if (prof_) path_ = " tc fp8xfp8";
        launched("linear (tensor cores, fp8)");
        return;
      }
      if (actBf16_) {
        uint16_t* ab = tmp<uint16_t>(size_t(M) * K);
        launch_act_prep(stream_, PREP_BF16, x, ldx, nullptr, 0, nullptr, nullptr, M, K, ab, nullptr, 0);
        a.a = ab;
        splitK(a, mtiles);
        launch_tc(stream_, a, false, w.dtype == W_BF16, mtiles);
        if (prof_) path_ = std::string(" tc bf16x") + dtype_name(w.dtype);
        launched("linear (tensor cores, bf16)");
        return;
      }
    }
    if (q) {
      float* t = tmp(size_t(M) * K);
      launch_act_prep(stream_, prepQ(), x, ldx, nullptr, 0, nullptr, nullptr, M, K, t, nullptr, 0);
      a.x = t;
      a.ldx = K;
    }
    launch_simt(stream_, a, w.dtype, (M + SIMT_BM - 1) / SIMT_BM, 1);
    if (prof_) path_ = std::string(" simt ") + dtype_name(w.dtype) + (q ? " q" : "");
    launched("linear (simt)");
  }

  // ---- memory ---------------------------------------------------------------------------------------
  // weight(dtype, rows, cols, data|null, scale|null, sr, sc, o0, o1, seed, amp)
  Napi::Value Weight_(const Napi::CallbackInfo& info) {
    use();
    barrier();
    auto env = info.Env();
    DevWeight w;
    w.dtype = dtype_of(info[0].As<Napi::String>());
    w.rows = num(info[1]);
    w.cols = num(info[2]);
    const size_t bytes = size_t(w.rows * w.cols) * esize(w.dtype);
    const bool hasData = info[3].IsTypedArray() && info[3].As<Napi::Uint8Array>().ByteLength() > 0;
    int64_t sr = 0, sc = 0, o0 = 0, o1 = 0;
    void* data = devAlloc(bytes, "a weight");
    float* scale = nullptr;
    if (hasData) {
      auto d = info[3].As<Napi::Uint8Array>();
      if (d.ByteLength() != bytes)
        throw std::runtime_error("weight data has " + std::to_string(d.ByteLength()) + " bytes, its shape needs " + std::to_string(bytes));
      CK(cudaMemcpy(data, d.Data(), bytes, cudaMemcpyHostToDevice));
      if (w.dtype == W_F8) {
        sr = num(info[5]);
        sc = num(info[6]);
        o0 = num(info[7]);
        o1 = num(info[8]);
        if (!info[4].IsTypedArray()) throw std::runtime_error("FP8 weight without block scales");
        auto s = info[4].As<Napi::Float32Array>();
        if (int64_t(s.ElementLength()) < sr * sc) throw std::runtime_error("weight scale array shorter than its shape");
        if ((w.rows - 1 + o0) / 128 >= sr || (w.cols - 1 + o1) / 128 >= sc)
          throw std::runtime_error("weight scale does not cover the weight's 128x128 blocks");
        scale = static_cast<float*>(devAlloc(size_t(sr * sc) * 4, "weight scales"));
        CK(cudaMemcpy(scale, s.Data(), size_t(sr * sc) * 4, cudaMemcpyHostToDevice));
      }
    } else {
      // synthetic weights generated on the device: uniform in [-amp, amp) (FP8: e4m3 over its range
      // with a block scale of amp / 448); amp < 0: all ones
      const uint64_t seed = uint64_t(dbl(info[9]));
      const float amp = float(dbl(info[10]));
      if (amp < 0) {
        if (w.dtype != W_F32) throw std::runtime_error("constant synthetic weights must be f32");
        launch_fill_const(stream_, static_cast<float*>(data), w.rows * w.cols, 1.0f);
      } else {
        launch_fill_random(stream_, data, w.dtype, w.rows * w.cols, seed, amp);
        if (w.dtype == W_F8) {
          sr = (w.rows + 127) / 128;
          sc = (w.cols + 127) / 128;
          scale = static_cast<float*>(devAlloc(size_t(sr * sc) * 4, "weight scales"));
          launch_fill_const(stream_, scale, sr * sc, amp / 448.0f);
        }
      }
      launched("synthetic weight");
      CK(cudaStreamSynchronize(stream_));
    }
    if (w.dtype == W_F8 && fnuz_) {
      // gfx94x: OCP e4m3fn -> e4m3fnuz in place (0x80 -> 0, other bytes unchanged, block scales doubled)
      launch_fp8_to_fnuz(stream_, static_cast<uint8_t*>(data), w.rows * w.cols, scale, sr * sc);
      launched("fp8 -> fnuz");
      CK(cudaStreamSynchronize(stream_));
    }
    if (w.dtype == W_F8 && o1 != 0) {
      // a slice that starts inside a scale block column: keep it dequantized (exact) in f32
      float* f = static_cast<float*>(devAlloc(size_t(w.rows * w.cols) * 4, "a dequantized weight"));
      launch_dequant_f32(stream_, static_cast<uint8_t*>(data), scale, w.rows, w.cols, int(sc), int(o0), int(o1), f);
      launched("dequantize");
      CK(cudaStreamSynchronize(stream_));
      data = f;
      scale = nullptr;
      w.dtype = W_F32;
      o0 = o1 = 0;
    }
    w.h.data = data;
    w.h.scale = scale;
    w.h.rows = w.rows;
    w.h.cols = w.cols;
    w.h.sc = int(sc);
    w.h.o0 = int(o0);
    w.h.dtype = w.dtype;
    w.bytes = size_t(w.rows * w.cols) * esize(w.dtype) + size_t(sr * sc) * 4;
    w.d = descAlloc(&w.h, 1);
    weights_.push_back(w);
    auto r = Napi::Object::New(env);
    r.Set("id", Napi::Number::New(env, double(weights_.size() - 1)));
    r.Set("dtype", Napi::String::New(env, w.dtype == W_F8 ? "f8_e4m3" : w.dtype == W_BF16 ? "bf16" : w.dtype == W_F16 ? "f16" : "f32"));
    r.Set("bytes", Napi::Number::New(env, double(w.bytes)));
    return r;
  }

  // expertSet(Int32Array [w1, w2, w3] * n)
  Napi::Value ExpertSet_(const Napi::CallbackInfo& info) {
    use();
    barrier();
    auto ids = info[0].As<Napi::Int32Array>();
    const size_t n = ids.ElementLength() / 3;
    if (n == 0) throw std::runtime_error("expertSet: no experts");
    std::vector<WDesc> h(n * 3);
    ExpSet s;
    s.n = int(n);
    for (size_t i = 0; i < n * 3; i++) {
      const int64_t id = ids[i];
      if (id < 0 || id >= int64_t(weights_.size())) throw std::runtime_error("expertSet: unknown weight handle");
      const DevWeight& w = weights_[size_t(id)];
      h[i] = w.h;
      if (i == 0) {
        s.dtype = w.dtype;
        s.inter = w.rows;
        s.dim = w.cols;
      }
      if (w.dtype != s.dtype) throw std::runtime_error("expertSet: experts must share one dtype");
      const int k = int(i % 3);
      const bool ok = k == 1 ? (w.rows == s.dim && w.cols == s.inter) : (w.rows == s.inter && w.cols == s.dim);
      if (!ok) throw std::runtime_error("expertSet: expert weight shapes disagree");
    }
    s.d = descAlloc(h.data(), int(n * 3));
    sets_.push_back(s);
    return Napi::Number::New(info.Env(), double(sets_.size() - 1));
  }

  // cache(layers, blocks, bs, width, bf16)
  Napi::Value Cache_(const Napi::CallbackInfo& info) {
    use();
    barrier();
    DevCache c;
    c.layers = num(info[0]);
    c.blocks = num(info[1]);
    c.bs = num(info[2]);
    c.width = num(info[3]);
    c.bf16 = info[4].ToBoolean();
    const size_t bytes = size_t(c.layers * c.blocks * c.bs * c.width) * (c.bf16 ? 2 : 4);
    c.data = devAlloc(bytes, "the latent cache");
    CK(cudaMemsetAsync(c.data, 0, bytes, stream_));
    caches_.push_back(c);
    return Napi::Number::New(info.Env(), double(caches_.size() - 1));
  }

  // readCache(cache, layer, slot, count) -> Float32Array
  Napi::Value ReadCache(const Napi::CallbackInfo& info) {
    use();
    barrier();
    DevCache& c = Cc(info[0]);
    const int64_t layer = num(info[1]), slot = num(info[2]), count = num(info[3]);
    if (layer < 0 || layer >= c.layers || slot < 0 || count < 0 || slot + count > c.slots())
      throw Napi::RangeError::New(info.Env(), "readCache out of range");
    const size_t n = size_t(count * c.width);
    auto out = Napi::Float32Array::New(info.Env(), n);
    const size_t off = size_t((layer * c.slots() + slot) * c.width);
    if (c.bf16) {
      std::vector<uint16_t> b(n);
      CK(cudaMemcpyAsync(b.data(), static_cast<uint16_t*>(c.data) + off, n * 2, cudaMemcpyDeviceToHost, stream_));
      CK(cudaStreamSynchronize(stream_));
      for (size_t i = 0; i < n; i++) {
        uint32_t u = uint32_t(b[i]) << 16;
        std::memcpy(out.Data() + i, &u, 4);
      }
    } else {
      CK(cudaMemcpyAsync(out.Data(), static_cast<float*>(c.data) + off, n * 4, cudaMemcpyDeviceToHost, stream_));
      CK(cudaStreamSynchronize(stream_));
    }
    return out;
  }

  Napi::Value FillCacheRandom(const Napi::CallbackInfo& info) {
    use();
    barrier();
    DevCache& c = Cc(info[0]);
    launch_fill_cache_random(stream_, c.data, c.bf16, c.layers * c.slots() * c.width, uint64_t(dbl(info[1])));
    launched("fillCacheRandom");
    return info.Env().Undefined();
  }

  // upload(typed array) -> device address (this step's arena); uploadI32 is the same op
  Napi::Value Upload(const Napi::CallbackInfo& info) {
    use();
    if (!info[0].IsTypedArray()) throw std::runtime_error("upload: expected a typed array");
    napi_typedarray_type type;
    size_t length = 0, off = 0;
    void* src = nullptr;
    napi_value ab;
    if (napi_get_typedarray_info(info.Env(), info[0], &type, &length, &src, &ab, &off) != napi_ok)
      throw std::runtime_error("upload: cannot read the typed array");
    const size_t bytes = info[0].As<Napi::TypedArray>().ByteLength();  // src already points at the view
    if (bytes > 0xffffffffu) throw std::runtime_error("upload: more than 4 GiB at once");
    ds3g::OpKey k;
    k.op = OP_UPLOAD;
    k.n = 1;
    k.a[0] = double(bytes);
    k.bytes = uint32_t(bytes);
    return Napi::Number::New(info.Env(), double(graphs_.op(k, src)));
  }
  Napi::Value UploadI32(const Napi::CallbackInfo& info) { return Upload(info); }
  // persist(Float32Array) -> device address that lives as long as the context (biases, rope frequencies)
  Napi::Value Persist(const Napi::CallbackInfo& info) {
    use();
    barrier();
    auto a = info[0].As<Napi::Float32Array>();
    void* d = devAlloc(a.ElementLength() * 4, "a constant");
    CK(cudaMemcpy(d, a.Data(), a.ElementLength() * 4, cudaMemcpyHostToDevice));
    return addr(info.Env(), d);
  }
  // download(ptr, n) -> Float32Array (waits for the stream)
  Napi::Value Download(const Napi::CallbackInfo& info) {
    use();
    barrier();
    const float* p = ptr<float>(info[0]);
    const size_t n = size_t(num(info[1]));
    auto out = Napi::Float32Array::New(info.Env(), n);
    if (n == 0) return out;
    const size_t bytes = n * 4;
    if (bytes > downCap_) {
      if (down_) cudaFreeHost(down_);
      down_ = nullptr;
      downCap_ = std::max(bytes, size_t(4) << 20);
      CK(cudaHostAlloc(&down_, downCap_, cudaHostAllocDefault));
    }
    CK(cudaMemcpyAsync(down_, p, bytes, cudaMemcpyDeviceToHost, stream_));
    CK(cudaStreamSynchronize(stream_));
    std::memcpy(out.Data(), down_, bytes);
    return out;
  }
  Napi::Value BeginStep(const Napi::CallbackInfo& info) {
    use();
    barrier();
    CK(cudaStreamSynchronize(stream_));
    arena_.reset();
    stageOff_ = 0;
    return info.Env().Undefined();
  }
  Napi::Value Sync(const Napi::CallbackInfo& info) {
    use();
    barrier();
    CK(cudaStreamSynchronize(stream_));
    return info.Env().Undefined();
  }

  // ---- ops: N-API entry points (argument lists as in native.ts) ------------------------------------
  Napi::Value Embed(const Napi::CallbackInfo& info) { return Op(info, OP_EMBED, 4); }
  Napi::Value RmsNorm(const Napi::CallbackInfo& info) { return Op(info, OP_RMSNORM, 5); }
  Napi::Value Linear(const Napi::CallbackInfo& info) { return Op(info, OP_LINEAR, 4); }
  Napi::Value Add(const Napi::CallbackInfo& info) { return Op(info, OP_ADD, 3); }
  Napi::Value SiluMul(const Napi::CallbackInfo& info) { return Op(info, OP_SILUMUL, 3); }
  Napi::Value Concat(const Napi::CallbackInfo& info) { return Op(info, OP_CONCAT, 5); }
  Napi::Value Slice(const Napi::CallbackInfo& info) { return Op(info, OP_SLICE, 5); }
  Napi::Value Rows(const Napi::CallbackInfo& info) { return Op(info, OP_ROWS, 4); }
  Napi::Value Rope(const Napi::CallbackInfo& info) { return Op(info, OP_ROPE, 9); }
  Napi::Value Mla(const Napi::CallbackInfo& info) { return Op(info, OP_MLA, 18, 11); }
  Napi::Value MoeGate(const Napi::CallbackInfo& info) { return Op(info, OP_MOEGATE, 10); }
  Napi::Value MoeExperts(const Napi::CallbackInfo& info) { return Op(info, OP_MOEEXPERTS, 7); }

  // ---- ops ----------------------------------------------------------------------------------------
  // embed(w, ids, T, vocabStart)
  uint64_t opEmbed(const double* a) {
    DevWeight& w = Wi(a[0]);
    const int T = int(I(a[2]));
    Prof pf(this, "embed");
    float* y = tmp(size_t(T) * w.cols);
    launch_embed(stream_, w.d, w.dtype, w.rows, int(w.cols), P<int>(a[1]), T, I(a[3]), y, actBf16_);
    launched("embed");
    return U(y);
  }
  // rmsNorm(x, T, D, w, eps)
  uint64_t opRmsNorm(const double* a) {
    const int T = int(I(a[1])), D = int(I(a[2]));
    DevWeight& w = Wi(a[3]);
    if (w.rows * w.cols != D) throw std::runtime_error("rmsNorm: weight size " + std::to_string(w.rows * w.cols) + " != row width " + std::to_string(D));
    Prof pf(this, "rmsNorm", shape(T, D));
    float* y = tmp(size_t(T) * D);
    launch_rms_norm(stream_, P<float>(a[0]), T, D, w.d, w.dtype, float(a[4]), y, actBf16_);
    launched("rmsNorm");
    return U(y);
  }
  // linear(x, T, K, w)
  uint64_t opLinear(const double* a) {
    const int T = int(I(a[1])), K = int(I(a[2]));
    DevWeight& w = Wi(a[3]);
    if (K != w.cols) throw std::runtime_error("linear: input width " + std::to_string(K) + " != weight in-features " + std::to_string(w.cols));
    Prof pf(this, "linear", shape(w.rows, w.cols) + " T=" + std::to_string(T));
    float* y = tmp(size_t(T) * w.rows);
    linearImpl(P<float>(a[0]), K, T, w, y, w.rows, actBf16_, true);
    return U(y);
  }
  uint64_t opAdd(const double* a) {
    const int64_t n = I(a[2]);
    Prof pf(this, "add");
    float* y = tmp(size_t(n));
    launch_add(stream_, P<float>(a[0]), P<float>(a[1]), n, y, actBf16_);
    launched("add");
    return U(y);
  }
  uint64_t opSiluMul(const double* a) {
    const int64_t n = I(a[2]);
    Prof pf(this, "siluMul");
    float* y = tmp(size_t(n));
    launch_silu_mul(stream_, P<float>(a[0]), P<float>(a[1]), n, y, actBf16_);
    launched("siluMul");
    return U(y);
  }
  // concat(a, b, T, ca, cb)
  uint64_t opConcat(const double* a) {
    const int T = int(I(a[2])), ca = int(I(a[3])), cb = int(I(a[4]));
    Prof pf(this, "concat");
    float* y = tmp(size_t(T) * (ca + cb));
    launch_concat(stream_, P<float>(a[0]), P<float>(a[1]), T, ca, cb, y);
    launched("concat");
    return U(y);
  }
  // slice(x, T, C, c0, c1)
  uint64_t opSlice(const double* a) {
    const int T = int(I(a[1])), C = int(I(a[2])), c0 = int(I(a[3])), c1 = int(I(a[4]));
    Prof pf(this, "slice");
    float* y = tmp(size_t(T) * std::max(0, c1 - c0));
    launch_slice(stream_, P<float>(a[0]), T, C, c0, c1, y);
    launched("slice");
    return U(y);
  }
  // rows(x, C, rowsPtr, n)
  uint64_t opRows(const double* a) {
    const int C = int(I(a[1])), n = int(I(a[3]));
    Prof pf(this, "rows");
    float* y = tmp(size_t(n) * C);
    launch_rows(stream_, P<float>(a[0]), C, P<int>(a[2]), n, y);
    launched("rows");
    return U(y);
  }
  // rope(x, T, H, hd, off, rd, pos, inv, attn)
  uint64_t opRope(const double* a) {
    const int T = int(I(a[1])), H = int(I(a[2])), hd = int(I(a[3])), off = int(I(a[4])), rd = int(I(a[5]));
    Prof pf(this, "rope");
    float* y = tmp(size_t(T) * H * hd);
    launch_rope(stream_, P<float>(a[0]), T, H, hd, off, rd, P<int>(a[6]), P<float>(a[7]), float(a[8]), y, actBf16_);
    launched("rope");
    return U(y);
  }

  // mla(q, kv, pe, T, w, cache, layer, pos, seq, bt, maxBlocks, maxPos, heads, nope, rope, v, kvLora, scale)
  uint64_t opMla(const double* A) {
    const float* q = P<float>(A[0]);
    const float* kv = P<float>(A[1]);
    const float* pe = P<float>(A[2]);
    const int T = int(I(A[3]));
    DevWeight& w = Wi(A[4]);
    DevCache& c = Ci(A[5]);
    const int64_t layer = I(A[6]);
    CacheMeta m{P<int>(A[7]), P<int>(A[8]), P<int>(A[9]), int(I(A[10])), int(c.bs)};
    const int maxPos = int(I(A[11]));
    const int H = int(I(A[12])), nope = int(I(A[13])), R = int(I(A[14])), V = int(I(A[15])), C = int(I(A[16]));
    const float scale = float(A[17]);
    const int Wd = C + R, HD = nope + V, QW = nope + R;
    if (layer < 0 || layer >= c.layers) throw std::runtime_error("mla: layer outside the cache");
    if (c.width != Wd) throw std::runtime_error("mla: cache width != kv_lora_rank + qk_rope_head_dim");
    if (w.rows != int64_t(H) * HD || w.cols != C) throw std::runtime_error("mla: wkv_b shape mismatch");
    if (C > 512 || Wd % 4 != 0 || nope > 1024) throw std::runtime_error("mla: kernels need kv_lora_rank <= 512 and a latent+rope width divisible by 4");
    Prof pf(this, "mla", " T=" + std::to_string(T));
    const int64_t layerOff = layer * c.slots() * c.width;
    float* qa = tmp(size_t(T) * H * C);
    {
      Prof sub(this, ".mla.absorb");
      launch_cache_write(stream_, kv, pe, T, C, R, c.data, c.bf16, layerOff, m);
      launched("mla cache write");
      launch_mla_absorb(stream_, q, T, H, QW, nope, w.d, w.dtype, HD, C, qa);
      launched("mla absorb");
    }
    int hg = 1;
    for (int d = std::min(H, mla_attn_max_heads(C, R)); d >= 1; d--)
      if (H % d == 0) {
        hg = d;
        break;
      }
    AttnArgs a{};
    a.qa = qa;
    a.q = q;
    a.QW = QW;
    a.nope = nope;
    a.cache = c.data;
    a.cbf16 = c.bf16;
    a.layerOff = layerOff;
    a.C = C;
    a.R = R;
    a.m = m;
    a.T = T;
    a.H = H;
    a.hg = hg;
    a.scale = scale;
    const int ctx = maxPos + 1;
    const int base = T * (H / hg);
    int nsplit = 1;
    if (base < 2 * sms_) nsplit = std::max(1, std::min((ctx + 31) / 32, (2 * sms_ + base - 1) / base));
    const bool tc = cc_ >= 80 && mla_attn_tc_ok(C, R, hg, c.bf16 ? 1 : 0);
    const int tile = tc ? 64 : 32;
    if (tc && nsplit > 1) nsplit = std::max(1, std::min((ctx + 63) / 64, nsplit));
    int splitLen = ((ctx + nsplit - 1) / nsplit + tile - 1) / tile * tile;
    nsplit = (ctx + splitLen - 1) / splitLen;
    a.nsplit = nsplit;
    a.splitLen = splitLen;
    float* olat = tmp(size_t(T) * H * C);
    a.out = olat;
    if (nsplit > 1) {
      a.part_o = tmp(size_t(T) * H * nsplit * C);
      a.part_ml = tmp(size_t(T) * H * nsplit * 2);
    }
    {
      Prof sub(this, tc ? ".mla.attn-tc" : ".mla.attn-simt");
      if (tc) launch_mla_attn_tc(stream_, a);
      else launch_mla_attn(stream_, a);
      launched("mla attention");
    }
    // value projection per head: out[t, h, :] = o_lat[t, h, :] @ wkv_b[h*HD + nope : h*HD + nope + V, :]^T
    float* out = tmp(size_t(T) * H * V);
    GemmArgs g;
    g.wtab = w.d;
    g.x = olat;
    g.ldx = int64_t(H) * C;
    g.xz = C;
    g.wrow0 = nope;
    g.wzrows = HD;
    g.y = out;
    g.ldy = int64_t(H) * V;
    g.yz = V;
    g.M = T;
    g.N = V;
    g.K = C;
    g.round = actBf16_;
    Prof sub(this, ".mla.vproj");
    if (T <= 8 && C % 16 == 0) launch_gemv(stream_, g, w.dtype, false, 1, H, mcFor(T));
    else launch_simt(stream_, g, w.dtype, (T + SIMT_BM - 1) / SIMT_BM, H);
    launched("mla value projection");
    return U(out);
  }

  // moeGate(x, T, w, bias|0, topk, ng, tg, sigmoid, norm, scale)
  uint64_t opMoeGate(const double* a) {
    const float* x = P<float>(a[0]);
    const int T = int(I(a[1]));
    DevWeight& w = Wi(a[2]);
    const float* bias = P<float>(a[3]);
    const int topk = int(I(a[4])), ng = int(I(a[5])), tg = int(I(a[6]));
    const int E = int(w.rows);
    if (E > 1024 || ng > 64 || topk > 64 || E % ng != 0) throw std::runtime_error("moeGate: needs <= 1024 experts, <= 64 groups dividing them, top-k <= 64");
    Prof pf(this, "moeGate", " T=" + std::to_string(T));
    float* logits = tmp(size_t(T) * E);
    linearImpl(x, w.cols, T, w, logits, E, 0, false);
    float* out = tmp(size_t(T) * 2 * topk);
    launch_moe_route(stream_, logits, T, E, bias, topk, ng, tg, (a[7] != 0) ? 1 : 0, (a[8] != 0) ? 1 : 0,
                     float(a[9]), out);
    launched("moeGate routing");
    return U(out);
  }

  // moeExperts(x, T, D, set, first, routing, topk)
  uint64_t opMoeExperts(const double* A) {
    const float* x = P<float>(A[0]);
    const int T = int(I(A[1])), D = int(I(A[2]));
    const int64_t sid = I(A[3]);
    if (sid < 0 || sid >= int64_t(sets_.size())) throw std::runtime_error("unknown expert set handle");
    ExpSet& S = sets_[size_t(sid)];
    const int first = int(I(A[4]));
    const float* routing = P<float>(A[5]);
    const int topk = int(I(A[6]));
    if (D != S.dim) throw std::runtime_error("moeExperts: input width != expert in-features");
    Prof pf(this, "moeExperts", " T=" + std::to_string(T));
    const int I = int(S.inter), nLocal = S.n, P = T * topk;
    float* out = tmp(size_t(T) * D);
    if (T == 0) return U(out);
    const int maxTiles = (P + TC_BM - 1) / TC_BM + std::min(nLocal, P);
    MoePlan pl;
    pl.counters = tmp<int>(4);
    pl.slotExpert = tmp<int>(nLocal);
    pl.slotOff = tmp<int>(nLocal);
    pl.slotCnt = tmp<int>(nLocal);
    pl.tileSlot = tmp<int>(maxTiles);
    pl.tileM = tmp<int>(maxTiles);
    pl.pairTok = tmp<int>(P);
    pl.pairOf = tmp<int>(P);
    {
      Prof sub(this, ".moe.plan");
      launch_moe_plan(stream_, routing, T, topk, first, nLocal, TC_BM, pl);
      launched("moe plan");
    }
    Grouping g{pl.counters, pl.counters + 1, pl.tileSlot, pl.tileM, pl.slotExpert, pl.slotOff, pl.slotCnt, pl.pairTok};
    const int* nPairs = pl.counters + 2;
    const bool q = actQuant_ && S.dtype == W_F8;
    const int maxSlots = std::min(nLocal, P);
    float* Y = tmp(size_t(P) * D);
    GemmArgs a;
    a.wtab = S.d;
    a.wstride = 3;
    a.round = actBf16_;
    const bool aligned = D % 16 == 0 && I % 16 == 0;
    const bool tcOk = aligned && tcGemm_ && (S.dtype == W_F8 || S.dtype == W_BF16) && (q || actBf16_);
    if (aligned && (T <= 8 || (T <= 64 && !tcOk))) {
      const float* xs = x;
      if (q) {
        float* t = tmp(size_t(T) * D);
        launch_act_prep(stream_, prepQ(), x, D, nullptr, 0, nullptr, nullptr, T, D, t, nullptr, 0);
        xs = t;
      }
      float* Hb = tmp(size_t(P) * I);
      a.x = xs;
      a.ldx = D;
      a.woff = 0;
      a.woff2 = 2;
      a.N = I;
      a.K = D;
      a.y = Hb;
      a.ldy = I;
      a.g = g;
      {
        Prof sub(this, ".moe.gate-up");
        launch_gemv(stream_, a, S.dtype, true, maxSlots, 1, T == 1 ? 1 : T <= 8 ? 2 : 8);
      }
      launched("moe gate/up (gemv)");
      if (q) launch_act_prep(stream_, prepQ(), Hb, I, nullptr, 0, nullptr, nPairs, P, I, Hb, nullptr, 0);
      GemmArgs b = a;
      b.x = Hb;
      b.ldx = I;
      b.woff = 1;
      b.N = D;
      b.K = I;
      b.y = Y;
      b.ldy = D;
      b.g.rowIdx = nullptr;
      {
        Prof sub(this, ".moe.down");
        launch_gemv(stream_, b, S.dtype, false, maxSlots, 1, T == 1 ? 1 : T <= 8 ? 4 : 8);
      }
      launched("moe down (gemv)");
      if (prof_) path_ = std::string(" gemv ") + dtype_name(S.dtype) + (q ? " q" : "");
    } else if (tcOk) {
      const int ksbD = (D + 127) / 128, ksbI = (I + 127) / 128;
      void* A1;
      float* A1s = nullptr;
      if (q) {
        A1 = tmp<uint8_t>(size_t(P) * D);
        A1s = tmp(size_t(P) * ksbD);
        launch_act_prep(stream_, prepF8(), x, D, nullptr, 0, pl.pairTok, nPairs, P, D, A1, A1s, 0);
      } else {
        A1 = tmp<uint16_t>(size_t(P) * D);
        launch_act_prep(stream_, PREP_BF16, x, D, nullptr, 0, pl.pairTok, nPairs, P, D, A1, nullptr, 0);
      }
      float* G = tmp(size_t(P) * I);
      float* U = tmp(size_t(P) * I);
      a.a = A1;
      a.as = A1s;
      a.ksb = ksbD;
      a.N = I;
      a.K = D;
      a.ldy = I;
      a.g = g;
      a.g.rowIdx = nullptr;
      a.woff = 0;
      a.y = G;
      Prof sub1(this, ".moe.gate-up");
      launch_tc(stream_, a, q, S.dtype == W_BF16, maxTiles, q && actQuant_ == 3);
      a.woff = 2;
      a.y = U;
      launch_tc(stream_, a, q, S.dtype == W_BF16, maxTiles, q && actQuant_ == 3);
      launched("moe gate/up (tensor cores)");
      void* A2;
      float* A2s = nullptr;
      if (q) {
        A2 = tmp<uint8_t>(size_t(P) * I);
        A2s = tmp(size_t(P) * ksbI);
        launch_act_prep(stream_, prepF8(), G, I, U, 1, nullptr, nPairs, P, I, A2, A2s, actBf16_);
      } else {
        A2 = tmp<uint16_t>(size_t(P) * I);
        launch_act_prep(stream_, PREP_BF16, G, I, U, 1, nullptr, nPairs, P, I, A2, nullptr, actBf16_);
      }
      GemmArgs b = a;
      b.a = A2;
      b.as = A2s;
      b.ksb = ksbI;
      b.woff = 1;
      b.N = D;
      b.K = I;
      b.y = Y;
      b.ldy = D;
      Prof sub2(this, ".moe.down+prep");
      launch_tc(stream_, b, q, S.dtype == W_BF16, maxTiles, q && actQuant_ == 3);
      launched("moe down (tensor cores)");
      if (prof_) path_ = std::string(" tc ") + (q ? "fp8xfp8" : "bf16");
    } else {
      const float* xs = x;
      if (q) {
        float* t = tmp(size_t(T) * D);
        launch_act_prep(stream_, prepQ(), x, D, nullptr, 0, nullptr, nullptr, T, D, t, nullptr, 0);
        xs = t;
      }
      float* G = tmp(size_t(P) * I);
      float* U = tmp(size_t(P) * I);
      a.x = xs;
      a.ldx = D;
      a.N = I;
      a.K = D;
      a.ldy = I;
      a.g = g;
      a.woff = 0;
      a.y = G;
      launch_simt(stream_, a, S.dtype, maxTiles, 1);
      a.woff = 2;
      a.y = U;
      launch_simt(stream_, a, S.dtype, maxTiles, 1);
      launched("moe gate/up (simt)");
      float* Hb = tmp(size_t(P) * I);
      launch_act_prep(stream_, q ? prepQ() : int(PREP_COPY), G, I, U, 1, nullptr, nPairs, P, I, Hb, nullptr, actBf16_);
      GemmArgs b = a;
      b.x = Hb;
      b.ldx = I;
      b.g.rowIdx = nullptr;
      b.woff = 1;
      b.N = D;
      b.K = I;
      b.y = Y;
      b.ldy = D;
      launch_simt(stream_, b, S.dtype, maxTiles, 1);
      launched("moe down (simt)");
      if (prof_) path_ = std::string(" simt ") + dtype_name(S.dtype);
    }
    launch_moe_combine(stream_, Y, pl.pairOf, routing, T, topk, D, out, actBf16_);
    launched("moe combine");
    return U(out);
  }

  // argmax(x, T, N) -> Int32Array (waits): the kernels are an op (recorded with the step), the read a barrier
  uint64_t opArgmax(const double* a) {
    const int T = int(I(a[1])), N = int(I(a[2]));
    Prof pf(this, "argmax");
    int* d = tmp<int>(std::max(T, 1));
    const int chunks = std::max(1, std::min(64, (N + 4095) / 4096));
    float* pv = tmp(size_t(T) * chunks);
    int* pi = tmp<int>(size_t(T) * chunks);
    launch_argmax(stream_, P<float>(a[0]), T, N, chunks, pv, pi, d);
    launched("argmax");
    return U(d);
  }
  Napi::Value Argmax(const Napi::CallbackInfo& info) {
    const int T = int(num(info[1]));
    const uint64_t d = uint64_t(Op(info, OP_ARGMAX, 3).As<Napi::Number>().Int64Value());
    barrier();
    auto out = Napi::Int32Array::New(info.Env(), size_t(T));
    readBack(out.Data(), reinterpret_cast<const void*>(uintptr_t(d)), size_t(T) * 4);
    return out;
  }
  /** device -> host through the pinned buffer, waiting for the stream */
  void readBack(void* dst, const void* src, size_t bytes) {
    if (bytes == 0) return;
    if (bytes > downCap_) {
      if (down_) cudaFreeHost(down_);
      down_ = nullptr;
      downCap_ = std::max(bytes, size_t(4) << 20);
      CK(cudaHostAlloc(&down_, downCap_, cudaHostAllocDefault));
    }
    CK(cudaMemcpyAsync(down_, src, bytes, cudaMemcpyDeviceToHost, stream_));
    CK(cudaStreamSynchronize(stream_));
    std::memcpy(dst, down_, bytes);
  }

  // sample(x, T, N, params, u) -> {ids: Int32Array, logprobs: Float32Array} (waits); params: device
  // float64 [T, 4] (temperature, top_k, top_p, min_p), u: device float64 [T] uniform draws
  uint64_t opSample(const double* a) {
    const int T = int(I(a[1])), N = int(I(a[2]));
    Prof pf(this, "sample");
    // float64 weights [T, N] then uint16 buckets [T, N]
    const size_t tn = size_t(std::max(T, 1)) * N;
    double* scratch = tmp<double>(tn + (tn + 3) / 4);
    int* out = tmp<int>(size_t(std::max(T, 1)) * 2);
    launch_sample(stream_, P<float>(a[0]), T, N, P<double>(a[3]), P<double>(a[4]), scratch, out, reinterpret_cast<float*>(out + T));
    launched("sample");
    return U(out);
  }
  Napi::Value Sample(const Napi::CallbackInfo& info) {
    const int T = int(num(info[1]));
    const uint64_t d = uint64_t(Op(info, OP_SAMPLE, 5).As<Napi::Number>().Int64Value());
    barrier();
    std::vector<int32_t> h(size_t(T) * 2);
    readBack(h.data(), reinterpret_cast<const void*>(uintptr_t(d)), size_t(T) * 8);
    auto env = info.Env();
    auto ids = Napi::Int32Array::New(env, size_t(T));
    auto lp = Napi::Float32Array::New(env, size_t(T));
    if (T > 0) {
      std::memcpy(ids.Data(), h.data(), size_t(T) * 4);
      std::memcpy(lp.Data(), h.data() + T, size_t(T) * 4);
    }
    auto o = Napi::Object::New(env);
    o.Set("ids", ids);
    o.Set("logprobs", lp);
    return o;
  }

  // ---- CUDA graphs and tuning ----------------------------------------------------------------------
  Napi::Value SetGraphs(const Napi::CallbackInfo& info) {
    use();
    barrier();
    graphsWanted_ = info[0].ToBoolean();
    if (info.Length() > 1 && info[1].IsObject()) {
      auto o = info[1].As<Napi::Object>();
      if (o.Has("earlyLaunch")) graphs_.earlyLaunch = o.Get("earlyLaunch").ToBoolean();
      if (o.Has("minOps")) graphs_.minOps = size_t(o.Get("minOps").As<Napi::Number>().Int64Value());
    }
    graphs_.enabled = graphsWanted_ && !prof_;
    if (!graphsWanted_) graphs_.clear();
    return info.Env().Undefined();
  }
  Napi::Value GraphStats_(const Napi::CallbackInfo& info) {
    auto env = info.Env();
    auto o = Napi::Object::New(env);
    const auto& st = graphs_.stats;
    o.Set("enabled", graphs_.enabled);
    o.Set("graphs", double(graphs_.entries()));
    o.Set("eagerSegments", double(st.eagerSegments));
    o.Set("captures", double(st.captures));
    o.Set("replays", double(st.replays));
    o.Set("fallbacks", double(st.fallbacks));
    o.Set("captureFailures", double(st.captureFailures));
    o.Set("earlyLaunches", double(st.earlyLaunches));
    o.Set("evictions", double(st.evictions));
    return o;
  }
  // tune({gemvKs, gemvDualU}) -> the current settings (launch heuristics; recorded graphs are dropped)
  Napi::Value Tune(const Napi::CallbackInfo& info) {
    use();
    barrier();
    if (info.Length() > 0 && info[0].IsObject()) {
      auto o = info[0].As<Napi::Object>();
      GemvTuning t = gemv_tuning();
      if (o.Has("gemvKs")) t.ksLongK = o.Get("gemvKs").As<Napi::Number>().Int32Value();
      if (o.Has("gemvDualU")) t.dualU = o.Get("gemvDualU").As<Napi::Number>().Int32Value();
      set_gemv_tuning(t);
      graphs_.clear();
    }
    const GemvTuning t = gemv_tuning();
    auto r = Napi::Object::New(info.Env());
    r.Set("gemvKs", t.ksLongK);
    r.Set("gemvDualU", t.dualU);
    return r;
  }

  // ---- collectives through NCCL (tensor / expert parallel across GPUs) --------------------------------
  // ncclUniqueId() -> Uint8Array(128) (rank 0 makes it, the host collective hands it to the others)
  Napi::Value NcclUniqueId(const Napi::CallbackInfo& info) {
    use();
#ifdef DS3_HAVE_NCCL
    ncclUniqueId id;
    ncclCheck(ncclGetUniqueId(&id), "ncclGetUniqueId");
    auto out = Napi::Uint8Array::New(info.Env(), sizeof(id.internal));
    std::memcpy(out.Data(), id.internal, sizeof(id.internal));
    return out;
#else
    throw std::runtime_error(kNoNccl);
#endif
  }
  // ncclInit(id, rank, worldSize): joins the communicator (blocks until every rank has joined)
  Napi::Value NcclInit(const Napi::CallbackInfo& info) {
    use();
    barrier();
#ifdef DS3_HAVE_NCCL
    auto idb = info[0].As<Napi::Uint8Array>();
    ncclUniqueId id;
    if (idb.ByteLength() != sizeof(id.internal)) throw std::runtime_error("ncclInit: the unique id must have 128 bytes");
    std::memcpy(id.internal, idb.Data(), sizeof(id.internal));
    const int rank = info[1].As<Napi::Number>().Int32Value(), ws = info[2].As<Napi::Number>().Int32Value();
    if (comm_) ncclCommDestroy(comm_);
    comm_ = nullptr;
    ncclCheck(ncclCommInitRank(&comm_, ws, id, rank), "ncclCommInitRank");
    commSize_ = ws;
    int v = 0;
    ncclGetVersion(&v);
    auto o = Napi::Object::New(info.Env());
    o.Set("version", v);
    o.Set("rank", rank);
    o.Set("worldSize", ws);
    return o;
#else
    throw std::runtime_error(kNoNccl);
#endif
  }
  // allReduce(x, n) -> sum over ranks (new buffer); allGather(x, rows, cols) -> [rows, ws * cols]
  Napi::Value AllReduce(const Napi::CallbackInfo& info) { return Op(info, OP_ALLREDUCE, 2); }
  Napi::Value AllGather(const Napi::CallbackInfo& info) { return Op(info, OP_ALLGATHER, 3); }
  uint64_t opAllReduce(const double* a) {
#ifdef DS3_HAVE_NCCL
    if (!comm_) throw std::runtime_error("allReduce: ncclInit() first");
    const int64_t n = I(a[1]);
    Prof pf(this, "allReduce");
    float* y = tmp(size_t(std::max<int64_t>(n, 1)));
    ncclCheck(ncclAllReduce(P<float>(a[0]), y, size_t(n), ncclFloat32, ncclSum, comm_, stream_), "ncclAllReduce");
    return U(y);
#else
    throw std::runtime_error(kNoNccl);
#endif
  }
  uint64_t opAllGather(const double* a) {
#ifdef DS3_HAVE_NCCL
    if (!comm_) throw std::runtime_error("allGather: ncclInit() first");
    const int rows = int(I(a[1])), cols = int(I(a[2]));
    Prof pf(this, "allGather");
    float* g = tmp(size_t(commSize_) * rows * cols + 1);
    float* y = tmp(size_t(commSize_) * rows * cols + 1);
    ncclCheck(ncclAllGather(P<float>(a[0]), g, size_t(rows) * cols, ncclFloat32, comm_, stream_), "ncclAllGather");
    launch_gather_cols(stream_, g, commSize_, rows, cols, y);  // [ws, rows, cols] -> [rows, ws * cols]
    launched("allGather transpose");
    return U(y);
#else
    throw std::runtime_error(kNoNccl);
#endif
  }
#ifdef DS3_HAVE_NCCL
  static void ncclCheck(ncclResult_t r, const char* what) {
    if (r != ncclSuccess) throw std::runtime_error(std::string("NCCL error in ") + what + ": " + ncclGetErrorString(r));
  }
  ncclComm_t comm_ = nullptr;
#endif
  int commSize_ = 1;

  Napi::Value Profile(const Napi::CallbackInfo& info) {
    use();
    barrier();
    CK(cudaStreamSynchronize(stream_));
    prof_ = info[0].ToBoolean();
    graphs_.enabled = graphsWanted_ && !prof_;
    recs_.clear();
    evNext_ = 0;
    return info.Env().Undefined();
  }
  // profileReport() -> [{name, ms, count}] summed per op name, in first-seen order
  Napi::Value ProfileReport(const Napi::CallbackInfo& info) {
    use();
    barrier();
    CK(cudaStreamSynchronize(stream_));
    std::vector<std::string> order;
    std::map<std::string, std::pair<double, int>> agg;
    for (auto& r : recs_) {
      float ms = 0;
      CK(cudaEventElapsedTime(&ms, r.a, r.b));
      if (!agg.count(r.name)) order.push_back(r.name);
      auto& e = agg[r.name];
      e.first += ms;
      e.second++;
    }
    auto env = info.Env();
    auto arr = Napi::Array::New(env, order.size());
    for (size_t i = 0; i < order.size(); i++) {
      auto o = Napi::Object::New(env);
      o.Set("name", order[i]);
      o.Set("ms", agg[order[i]].first);
      o.Set("count", agg[order[i]].second);
      arr.Set(uint32_t(i), o);
    }
    recs_.clear();
    evNext_ = 0;
    return arr;
  }
  Napi::Value MemInfo(const Napi::CallbackInfo& info) {
    use();
    barrier();
    size_t fr = 0, tot = 0;
    CK(cudaMemGetInfo(&fr, &tot));
    auto o = Napi::Object::New(info.Env());
    o.Set("free", double(fr));
    o.Set("total", double(tot));
    o.Set("arena", double(arena_.total()));
    o.Set("arenaPeak", double(arena_.peak()));
    return o;
  }
  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    if (alive_) use();
    release();
    return info.Env().Undefined();
  }

  int dev_ = 0, sms_ = 1, cc_ = 0;
  bool fnuz_ = false;  // FP8 weights held as e4m3fnuz (gfx94x)
  bool tcGemm_ = false;  // the matrix-core GEMM (CUDA: mma.sync from sm_80; AMD: MFMA with DS3_ROCM_MFMA=1)
  int actBf16_ = 0, actQuant_ = 0;
  bool alive_ = false;
  cudaStream_t stream_ = nullptr;
  Arena arena_;
  void* stage_ = nullptr;
  size_t stageCap_ = 0, stageOff_ = 0;
  void* down_ = nullptr;
  size_t downCap_ = 0;
  std::vector<void*> owned_;
  std::vector<DevWeight> weights_;
  std::vector<ExpSet> sets_;
  std::vector<DevCache> caches_;
  bool prof_ = false;
  bool graphsWanted_ = false;
  bool capturing_ = false;
  std::string path_;
  std::vector<Rec> recs_;
  std::vector<cudaEvent_t> evPool_;
  size_t evNext_ = 0;
  friend class ds3g::StepGraphs<Context>;
  ds3g::StepGraphs<Context> graphs_{*this};  // last: destroyed first (release() already emptied it)
};

// probe() -> {ok, devices} | {ok: false, reason}
#if defined(DS3_HIP)
/** the gfx targets this addon has code objects for (DS3_HIP_ARCHS from CMake) */
bool hip_arch_built(const std::string& arch) {
  const std::string built = DS3_HIP_ARCHS;  // e.g. "gfx90a;gfx942"
  const std::string base = arch.substr(0, arch.find(':'));
  size_t i = 0;
  while (i <= built.size()) {
    const size_t j = std::min(built.find(';', i), built.size());
    if (built.compare(i, j - i, base) == 0) return true;
    i = j + 1;
  }
  return false;
}
Napi::Value Probe(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  auto r = Napi::Object::New(env);
  int n = 0;
  hipError_t e = hipGetDeviceCount(&n);
  if (e != hipSuccess || n == 0) {
    hipGetLastError();
    r.Set("ok", false);
    // (the TS layer adds why, where the machine can tell: /dev/kfd, permissions, visibility variables)
    r.Set("reason", std::string("ROCm not available: ") + (e != hipSuccess ? hipGetErrorString(e) : "no ROCm devices found"));
    return r;
  }
  auto devs = Napi::Array::New(env);
  auto archs = Napi::Array::New(env);
  uint32_t k = 0;
  std::string skipped;
  for (int i = 0; i < n; i++) {
    hipDeviceProp_t p{};
    if (hipGetDeviceProperties(&p, i) != hipSuccess) continue;
    const std::string arch = p.gcnArchName;
    const std::string base = arch.substr(0, arch.find(':'));
    const char* fp8 = base.rfind("gfx94", 0) == 0 ? "fp8 e4m3fnuz" : base == "gfx950" ? "fp8 e4m3fn" : "no fp8";
    char buf[512];
    snprintf(buf, sizeof buf, "rocm:%d %s (%s, %.1f GiB, %d CUs, wave%d, %s)", i, p.name, arch.c_str(),
             double(p.totalGlobalMem) / (1024.0 * 1024 * 1024), p.multiProcessorCount, p.warpSize, fp8);
    if (!hip_arch_built(arch) || p.warpSize != WARP) {
      skipped += std::string(skipped.empty() ? "" : "; ") + buf + " has no code object in this build (built for " DS3_HIP_ARCHS ")";
      continue;
    }
    archs.Set(k, base);
    devs.Set(k++, std::string(buf));
  }
  if (k == 0) {
    r.Set("ok", false);
    r.Set("reason", "ROCm not available: no supported GPU (" + skipped + ")");
    return r;
  }
  int drv = 0, rt = 0;
  hipDriverGetVersion(&drv);
  hipRuntimeGetVersion(&rt);
  r.Set("ok", true);
  r.Set("devices", devs);
  r.Set("archs", archs);
  r.Set("driver", drv);
  r.Set("runtime", rt);
  return r;
}
#else
Napi::Value Probe(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  auto r = Napi::Object::New(env);
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    cudaGetLastError();
    r.Set("ok", false);
    r.Set("reason", std::string("CUDA not available: ") + (e != cudaSuccess ? cudaGetErrorString(e) : "no CUDA devices found"));
    return r;
  }
  auto devs = Napi::Array::New(env);
  uint32_t k = 0;
  std::string skipped;
  for (int i = 0; i < n; i++) {
    cudaDeviceProp p{};
    if (cudaGetDeviceProperties(&p, i) != cudaSuccess) continue;
    char buf[512];
    snprintf(buf, sizeof buf, "cuda:%d %s (compute capability %d.%d, %.1f GiB, %d SMs)", i, p.name, p.major, p.minor,
             double(p.totalGlobalMem) / (1024.0 * 1024 * 1024), p.multiProcessorCount);
    if (p.major < 8) {
      skipped += std::string(skipped.empty() ? "" : "; ") + buf + " is below compute capability 8.0";
      continue;
    }
    devs.Set(k++, std::string(buf));
  }
  if (k == 0) {
    r.Set("ok", false);
    r.Set("reason", "CUDA not available: no supported GPU (" + skipped + ")");
    return r;
  }
  int drv = 0, rt = 0;
  cudaDriverGetVersion(&drv);
  cudaRuntimeGetVersion(&rt);
  r.Set("ok", true);
  r.Set("devices", devs);
  r.Set("driver", drv);
  r.Set("runtime", rt);
  return r;
}

#endif

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("Context", Context::Define(env));
  exports.Set("probe", Napi::Function::New(env, Probe));
#if defined(DS3_HIP)
  exports.Set("built", Napi::String::New(env, "rocm"));
#else
  exports.Set("built", Napi::String::New(env, "cuda"));
#endif
#ifdef DS3_HAVE_NCCL
  {
    int v = 0;
    ncclGetVersion(&v);
    exports.Set("nccl", Napi::Number::New(env, v));
  }
#else
  exports.Set("nccl", Napi::Number::New(env, 0));
#endif
  return exports;
}

}  // namespace

#if defined(DS3_HIP)
NODE_API_MODULE(ds3_rocm, Init)
#else
NODE_API_MODULE(ds3_cuda, Init)
#endif
