// @ds3/backend-ascend native addon: the op set of the backend contract on CANN's aclnn operators and
// HCCL, with CANN loaded at run time (dlopen + dlsym of every function in cann_api.h). Built with the
// ordinary C++ toolchain; no CANN header or library is needed to build it.
//
// Tensors are 2-D views {base pointer, storage elements, offset, rows, cols, row stride, dtype} on
// device buffers: slices are views (an offset and a stride), never copies. Every op is the two-phase
// aclnn call (GetWorkspaceSize, then run on the context's stream), with the workspace from a
// per-context grow-only buffer, and outputs from a per-step arena released at beginStep().
#include <dlfcn.h>
#include <napi.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "cann_api.h"

namespace {

// ---- the loaded library ----------------------------------------------------------------------------
struct Api {
#define DS3_FIELD(LIB, REQ, RET, NAME, PARAMS) ds3_##NAME##_t NAME = nullptr;
  DS3_CANN_FUNCS(DS3_FIELD)
#undef DS3_FIELD
  bool hccl = false;    // every HCCL function present
  bool gating = false;  // aclnnMoeGatingTopK present
  bool fia = false;     // aclnnFusedInferAttentionScoreV3 present
};

struct Probe {
  bool done = false, ok = false;
  std::string reason, libDir, version, versionText, tried;
  std::vector<std::string> devices;
  std::vector<double> memTotal, memFree;
  std::vector<std::string> names;
};

Api g_api;
Probe g_probe;
const char* (*g_standinStats)() = nullptr;
std::mutex g_mu;

std::string aclMsg() {
  const char* m = g_api.aclGetRecentErrMsg ? g_api.aclGetRecentErrMsg() : nullptr;
  return m && *m ? std::string(m) : std::string("(no message)");
}

bool fileExists(const std::string& p) {
  std::ifstream f(p);
  return f.good();
}

// The toolkit's version, as its installer records it (key=value lines): `<arch>-linux/ascend_toolkit_install.info`
// ("version=8.1.RC1"; lib64 is `latest/lib64` -> `<version>/<arch>-linux/lib64`, so the file sits in lib64's real
// parent and in `latest/<arch>-linux/`), else the components' `version.info` ("Version=..."). Empty when none is
// there; `where` says where it looked.
std::string parentOf(const std::string& d) {
  std::string s = d;
  while (s.size() > 1 && s.back() == '/') s.pop_back();
  auto k = s.rfind('/');
  return k == std::string::npos ? std::string(".") : k == 0 ? std::string("/") : s.substr(0, k);
}
std::string readVersion(const std::string& libDir, std::string* where) {
  std::vector<std::string> parents{parentOf(libDir)};
  if (char* rp = realpath(libDir.c_str(), nullptr)) {
    std::string r = parentOf(rp);
    free(rp);
    if (r != parents[0]) parents.push_back(r);
  }
#if defined(__aarch64__)
  const char* arch = "aarch64-linux";
#else
  const char* arch = "x86_64-linux";
#endif
  for (auto& p : parents) {
    const std::string files[] = {p + "/ascend_toolkit_install.info", p + "/" + arch + "/ascend_toolkit_install.info",
                                 p + "/version.info", p + "/runtime/version.info", p + "/compiler/version.info"};
    for (auto& f : files) {
      std::ifstream in(f);
      std::string line;
      while (in && std::getline(in, line)) {
        if (!line.empty() && line.back() == '\r') line.pop_back();
        auto eq = line.find('=');
        if (eq == std::string::npos) continue;
        std::string k = line.substr(0, eq);
        for (auto& ch : k) ch = char(std::tolower(ch));
        std::string v = line.substr(eq + 1);
        if (k == "version" && !v.empty()) return v;
      }
    }
  }
  *where = parents[0];
  for (size_t i = 1; i < parents.size(); i++) *where += " or " + parents[i];
  return "";
}

void doProbe() {
  Probe& P = g_probe;
  P.done = true;
  std::vector<std::string> dirs;
  if (const char* o = getenv("DS3_ASCEND_LIB_DIR"); o && *o) {
    dirs.push_back(o);
  } else {
    if (const char* t = getenv("ASCEND_TOOLKIT_HOME"); t && *t) dirs.push_back(std::string(t) + "/lib64");
    if (const char* t = getenv("ASCEND_HOME_PATH"); t && *t) dirs.push_back(std::string(t) + "/lib64");
    dirs.push_back("/usr/local/Ascend/ascend-toolkit/latest/lib64");
  }
  std::string dir;
  for (auto& d : dirs) {
    if (fileExists(d + "/libascendcl.so") && fileExists(d + "/libopapi.so") && fileExists(d + "/libnnopbase.so")) {
      dir = d;
      break;
    }
    P.tried += (P.tried.empty() ? "" : ", ") + d;
  }
  if (dir.empty()) {
    P.reason = "no CANN: libascendcl.so, libnnopbase.so and libopapi.so not found in " + P.tried +
               " (set ASCEND_TOOLKIT_HOME, e.g. source /usr/local/Ascend/ascend-toolkit/set_env.sh, or DS3_ASCEND_LIB_DIR)";
    return;
  }
  P.libDir = dir;
  void* libs[4] = {nullptr, nullptr, nullptr, nullptr};
  const char* files[4] = {"libascendcl.so", "libnnopbase.so", "libopapi.so", "libhccl.so"};
  for (int i = 0; i < 4; i++) {
    std::string path = dir + "/" + files[i];
    if (i == 3 && !fileExists(path)) break;  // HCCL is optional
    libs[i] = dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL);
    if (!libs[i] && i < 3) {
      const char* e = dlerror();
      P.reason = "no CANN: dlopen " + path + " failed: " + (e ? e : "?");
      return;
    }
  }
  std::vector<std::string> missing;
  bool hcclOk = libs[3] != nullptr, gatingOk = true, fiaOk = true;
  auto lib = [&](const char* tag) -> void* {
    std::string t = tag;
    return t == "ASCENDCL" ? libs[0] : t == "NNOPBASE" ? libs[1] : t == "OPAPI" ? libs[2] : libs[3];
  };
#define DS3_LOAD(LIB, REQ, RET, NAME, PARAMS)                                           \
  {                                                                                      \
    void* h = lib(#LIB);                                                                 \
    g_api.NAME = h ? reinterpret_cast<ds3_##NAME##_t>(dlsym(h, #NAME)) : nullptr;         \
    if (!g_api.NAME) {                                                                   \
      if (REQ) missing.push_back(std::string(#NAME) + " (" + files[std::string(#LIB) == "ASCENDCL" ? 0 : std::string(#LIB) == "NNOPBASE" ? 1 : 2] + ")"); \
      else if (std::string(#LIB) == "HCCL") hcclOk = false;                              \
      else if (std::strstr(#NAME, "MoeGatingTopK")) gatingOk = false;                    \
      else fiaOk = false;                                                                \
    }                                                                                    \
  }
  DS3_CANN_FUNCS(DS3_LOAD)
#undef DS3_LOAD
  // tests only: the CPU stand-in of CANN (standin/) exports its live-object counters; real CANN does not
  g_standinStats = reinterpret_cast<const char* (*)()>(dlsym(libs[0], "ds3StandinStats"));
  g_api.hccl = hcclOk;
  g_api.gating = gatingOk;
  g_api.fia = fiaOk;
  std::string where;
  P.version = readVersion(dir, &where);
  P.versionText = P.version.empty() ? "CANN version unknown (no ascend_toolkit_install.info or version.info at " + where + ")" : "CANN " + P.version;
  if (!missing.empty()) {
    std::string m;
    for (size_t i = 0; i < missing.size() && i < 8; i++) m += (m.empty() ? "" : ", ") + missing[i];
    if (missing.size() > 8) m += " and " + std::to_string(missing.size() - 8) + " more";
    P.reason = "CANN too old: " + m + " missing (CANN at " + dir + (P.version.empty() ? "" : ", version " + P.version) + ")";
    return;
  }
  aclError e = g_api.aclInit(nullptr);
  if (e != DS3_ACL_SUCCESS && e != DS3_ACL_ERROR_REPEAT_INITIALIZE) {
    P.reason = "aclInit failed: ACL error " + std::to_string(e) + ": " + aclMsg() + " (CANN at " + dir + ")";
    return;
  }
  uint32_t n = 0;
  e = g_api.aclrtGetDeviceCount(&n);
  if (e != DS3_ACL_SUCCESS) {
    P.reason = "no NPU: aclrtGetDeviceCount failed: ACL error " + std::to_string(e) + ": " + aclMsg();
    return;
  }
  if (n == 0) {
    P.reason = "no NPU: aclrtGetDeviceCount = 0 (" + P.versionText + ", libraries at " + dir + ")";
    return;
  }
  const char* soc = g_api.aclrtGetSocName();
  std::string name = soc && *soc ? soc : "Ascend NPU";
  for (uint32_t i = 0; i < n; i++) {
    size_t fr = 0, tot = 0;
    if (g_api.aclrtSetDevice(int32_t(i)) == DS3_ACL_SUCCESS) {
      g_api.aclrtGetMemInfo(ACL_HBM_MEM, &fr, &tot);
      g_api.aclrtResetDevice(int32_t(i));
    }
    char buf[1024];
    snprintf(buf, sizeof buf, "npu:%u %s (%.1f GiB, %s)", i, name.c_str(), double(tot) / (1 << 30), P.versionText.c_str());
    P.devices.push_back(buf);
    P.names.push_back(name);
    P.memTotal.push_back(double(tot));
    P.memFree.push_back(double(fr));
  }
  P.ok = true;
}

const Probe& probe() {
  std::lock_guard<std::mutex> l(g_mu);
  if (!g_probe.done) doProbe();
  return g_probe;
}

// ---- errors ------------------------------------------------------------------------------------------
[[noreturn]] void fail(const std::string& what, int code) {
  throw std::runtime_error(what + " failed: error " + std::to_string(code) + ": " + aclMsg());
}
void chk(aclError e, const char* what) {
  if (e != DS3_ACL_SUCCESS) fail(what, e);
}

// ---- bf16 on the host -------------------------------------------------------------------------------
inline uint16_t toBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffff) > 0x7f800000) return uint16_t((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fff + ((u >> 16) & 1);
  return uint16_t(u >> 16);
}
inline float fromBf16(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
float fp8e4m3(uint8_t v) {
  int s = v >> 7, e = (v >> 3) & 15, m = v & 7;
  float r;
  if (e == 0) r = std::ldexp(float(m) / 8.0f, -6);
  else if (e == 15 && m == 7) r = NAN;
  else r = std::ldexp(1.0f + float(m) / 8.0f, e - 7);
  return s ? -r : r;
}

size_t dtSize(int dt) { return dt == ACL_BF16 ? 2 : dt == ACL_INT64 || dt == ACL_DOUBLE ? 8 : 4; }

// ---- a view ------------------------------------------------------------------------------------------
struct TV {
  void* base = nullptr;
  int64_t storage = 0;  // elements from base
  int64_t off = 0;
  std::vector<int64_t> dims, strides;
  aclDataType dt = ACL_FLOAT;
  int64_t numel() const {
    int64_t n = 1;
    for (auto d : dims) n *= d;
    return n;
  }
  bool contiguous() const {
    int64_t s = 1;
    for (int i = int(dims.size()) - 1; i >= 0; i--) {
      if (dims[i] != 1 && strides[i] != s) return false;
      s *= dims[i];
    }
    return true;
  }
  TV view(std::vector<int64_t> d, std::vector<int64_t> s, int64_t extraOff = 0) const {
    TV v = *this;
    v.dims = std::move(d);
    v.strides = std::move(s);
    v.off = off + extraOff;
    return v;
  }
  TV reshape(std::vector<int64_t> d) const {  // contiguous only
    std::vector<int64_t> s(d.size());
    int64_t st = 1;
    for (int i = int(d.size()) - 1; i >= 0; i--) {
      s[i] = st;
      st *= d[i];
    }
    return view(std::move(d), std::move(s));
  }
};

// descriptors made for one operator call, destroyed after its second phase
struct Descs {
  std::vector<const aclTensor*> t;
  std::vector<const aclScalar*> s;
  std::vector<const aclIntArray*> a;
  std::vector<const aclTensorList*> l;
  std::vector<const aclTensor*> listed;  // tensors an aclTensorList owns: aclDestroyTensorList destroys them
  ~Descs() {
    // the documented ownership: "the aclTensor in the aclTensorList does not need to be destroyed again"
    // (destroying a listed tensor too would be a double free on CANN)
    for (auto x : l) g_api.aclDestroyTensorList(x);
    for (auto x : t)
      if (std::find(listed.begin(), listed.end(), x) == listed.end()) g_api.aclDestroyTensor(x);
    for (auto x : s) g_api.aclDestroyScalar(x);
    for (auto x : a) g_api.aclDestroyIntArray(x);
  }
  aclTensor* operator()(const TV& v) {
    int64_t st = v.storage;
    aclTensor* x = g_api.aclCreateTensor(v.dims.data(), v.dims.size(), v.dt, v.strides.data(), v.off, ACL_FORMAT_ND, &st, 1, v.base);
    if (!x) throw std::runtime_error("aclCreateTensor failed: " + aclMsg());
    t.push_back(x);
    return x;
  }
  aclScalar* f(float v) {
    aclScalar* x = g_api.aclCreateScalar(&v, ACL_FLOAT);
    if (!x) throw std::runtime_error("aclCreateScalar failed: " + aclMsg());
    s.push_back(x);
    return x;
  }
  aclIntArray* ints(const std::vector<int64_t>& v) {
    aclIntArray* x = g_api.aclCreateIntArray(v.data(), v.size());
    if (!x) throw std::runtime_error("aclCreateIntArray failed: " + aclMsg());
    a.push_back(x);
    return x;
  }
  aclTensorList* list(std::vector<const aclTensor*> v) {
    aclTensorList* x = g_api.aclCreateTensorList(v.data(), v.size());
    if (!x) throw std::runtime_error("aclCreateTensorList failed: " + aclMsg());
    l.push_back(x);
    listed.insert(listed.end(), v.begin(), v.end());
    return x;
  }
};

// ---- the context -------------------------------------------------------------------------------------
class Ctx : public Napi::ObjectWrap<Ctx> {
 public:
  static Napi::Function Init(Napi::Env env);
  explicit Ctx(const Napi::CallbackInfo& info);
  ~Ctx() { release(); }

 private:
  int device_ = 0;
  aclDataType act_ = ACL_FLOAT;
  aclrtStream stream_ = nullptr;
  bool live_ = false;
  void* ws_ = nullptr;
  uint64_t wsCap_ = 0;
  struct Chunk {
    void* p;
    size_t cap, used;
  };
  std::vector<Chunk> arena_;
  size_t arenaPeak_ = 0;
  std::vector<void*> persistent_;
  HcclComm comm_ = nullptr;
  int world_ = 1;
  uint64_t wsGrows_ = 0;

  void release() {
    if (!live_) return;
    live_ = false;
    g_api.aclrtSetDevice(device_);
    if (stream_) g_api.aclrtSynchronizeStream(stream_);
    if (comm_) g_api.HcclCommDestroy(comm_);
    for (auto& c : arena_) g_api.aclrtFree(c.p);
    for (auto p : persistent_) g_api.aclrtFree(p);
    if (ws_) g_api.aclrtFree(ws_);
    if (stream_) g_api.aclrtDestroyStream(stream_);
    arena_.clear();
    persistent_.clear();
  }
  void need() {
    if (!live_) throw std::runtime_error("ascend context used after dispose()");
  }

  // memory
  void* devAlloc(size_t bytes) {
    void* p = nullptr;
    aclError e = g_api.aclrtMalloc(&p, std::max<size_t>(bytes, 64), ACL_MEM_MALLOC_HUGE_FIRST);
    if (e != DS3_ACL_SUCCESS || !p) fail("aclrtMalloc(" + std::to_string(bytes) + " bytes)", e);
    return p;
  }
  void* arenaAlloc(size_t bytes) {
    bytes = (bytes + 511) & ~size_t(511);
    for (auto& c : arena_)
      if (c.cap - c.used >= bytes) {
        void* p = static_cast<char*>(c.p) + c.used;
        c.used += bytes;
        return p;
      }
    size_t cap = std::max<size_t>(bytes, size_t(64) << 20);
    arena_.push_back({devAlloc(cap), cap, bytes});
    return arena_.back().p;
  }
  TV fresh(std::vector<int64_t> dims, aclDataType dt) {
    TV v;
    v.dims = dims;
    v.dt = dt;
    v = v.reshape(dims);
    v.storage = std::max<int64_t>(1, v.numel());
    v.base = arenaAlloc(size_t(v.storage) * dtSize(dt));
    return v;
  }
  TV persistentTV(std::vector<int64_t> dims, aclDataType dt) {
    TV v;
    v.dt = dt;
    v = v.reshape(dims);
    v.storage = std::max<int64_t>(1, v.numel());
    v.base = devAlloc(size_t(v.storage) * dtSize(dt));
    persistent_.push_back(v.base);
    return v;
  }
  // Host -> device uploads are the synchronous aclrtMemcpy into memory no queued task uses: a fresh arena
  // block (the arena is reset only at beginStep(), after a stream synchronize) or a new persistent buffer.
  // A synchronous copy does not wait for the stream on CANN, so every synchronous copy of memory a queued task
  // may use (downloads, the expert restacking, frees, workspace growth) synchronizes the stream first.
  // aclrtMemcpyAsync is not used for uploads: it reads the host buffer when the task runs (the std::vector
  // here is gone by then) and wants page-locked host memory (aclrtMallocHost) to be truly asynchronous.
  void h2d(void* dst, const void* src, size_t bytes) {
    if (bytes) chk(g_api.aclrtMemcpy(dst, bytes, src, bytes, ACL_MEMCPY_HOST_TO_DEVICE), "aclrtMemcpy H2D");
  }
  void sync() { chk(g_api.aclrtSynchronizeStream(stream_), "aclrtSynchronizeStream"); }
  void* workspace(uint64_t bytes) {
    if (bytes == 0) return nullptr;
    if (bytes > wsCap_) {  // grow-only; the stream is drained before the old buffer goes
      sync();
      if (ws_) g_api.aclrtFree(ws_);
      ws_ = devAlloc(bytes);
      wsCap_ = bytes;
      wsGrows_++;
    }
    return ws_;
  }
  // one two-phase operator call: `prep` makes the executor, then it runs on the stream
  template <class Prep, class Run>
  void op(const char* name, Prep prep, Run run) {
    uint64_t ws = 0;
    aclOpExecutor* ex = nullptr;
    aclnnStatus s = prep(&ws, &ex);
    if (s != 0) fail(std::string(name) + "GetWorkspaceSize", s);
    void* w = workspace(ws);
    s = run(w, ws, ex, stream_);
    if (s != 0) fail(name, s);
  }
#define OP(NAME, ...)                                                                                  \
  op(#NAME, [&](uint64_t* ws, aclOpExecutor** ex) { return g_api.NAME##GetWorkspaceSize(__VA_ARGS__, ws, ex); }, \
     [&](void* w, uint64_t n, aclOpExecutor* e, aclrtStream st) { return g_api.NAME(w, n, e, st); })

  // upload helpers
  TV uploadF(const float* x, std::vector<int64_t> dims, aclDataType dt, bool persist = false) {
    TV v = persist ? persistentTV(dims, dt) : fresh(dims, dt);
    size_t n = size_t(v.numel());
    if (dt == ACL_BF16) {
      std::vector<uint16_t> h(n);
      for (size_t i = 0; i < n; i++) h[i] = toBf16(x[i]);
      h2d(v.base, h.data(), n * 2);
    } else {
      h2d(v.base, x, n * 4);
    }
    return v;
  }
  TV uploadI64(const std::vector<int64_t>& x, std::vector<int64_t> dims) {
    TV v = fresh(dims, ACL_INT64);
    h2d(v.base, x.data(), x.size() * 8);
    return v;
  }
  TV uploadI32(const std::vector<int32_t>& x, std::vector<int64_t> dims) {
    TV v = fresh(dims, ACL_INT32);
    h2d(v.base, x.data(), x.size() * 4);
    return v;
  }
  std::vector<float> downloadF(const TV& in) {
    TV v = in;
    if (!v.contiguous() || v.dt != ACL_FLOAT) v = copy(in, ACL_FLOAT);
    sync();
    size_t n = size_t(v.numel());
    std::vector<float> out(n);
    if (n) chk(g_api.aclrtMemcpy(out.data(), n * 4, static_cast<float*>(v.base) + v.off, n * 4, ACL_MEMCPY_DEVICE_TO_HOST), "aclrtMemcpy D2H");
    return out;
  }

  // ---- building blocks on aclnn --------------------------------------------------------------------
  TV copy(const TV& src, aclDataType dt) {  // a contiguous copy (and dtype conversion)
    TV out = fresh(src.dims, dt);
    Descs d;
    auto o = d(out);
    auto s = d(src);
    OP(aclnnInplaceCopy, o, s);
    return out;
  }
  void copyInto(const TV& dst, const TV& src) {
    Descs d;
    auto o = d(dst);
    auto s = d(src);
    OP(aclnnInplaceCopy, o, s);
  }
  TV cast(const TV& x, aclDataType dt) {
    if (x.dt == dt) return x;
    TV out = fresh(x.dims, dt);
    Descs d;
    auto a = d(x);
    auto o = d(out);
    OP(aclnnCast, a, dt, o);
    return out;
  }
  TV matmul(const TV& a, const TV& b, std::vector<int64_t> outDims, aclDataType dt) {
    TV out = fresh(outDims, dt);
    Descs d;
    auto x = d(a);
    auto y = d(b);
    auto o = d(out);
    OP(aclnnMatmul, x, y, o, int8_t(DS3_CUBE_KEEP_DTYPE));
    return out;
  }
  TV bmm(const TV& a, const TV& b, aclDataType dt) {
    TV out = fresh({a.dims[0], a.dims[1], b.dims[2]}, dt);
    Descs d;
    auto x = d(a);
    auto y = d(b);
    auto o = d(out);
    OP(aclnnBatchMatMul, x, y, o, int8_t(DS3_CUBE_KEEP_DTYPE));
    return out;
  }
  TV add(const TV& a, const TV& b, float alpha, std::vector<int64_t> outDims) {
    TV out = fresh(outDims, a.dt);
    Descs d;
    auto x = d(a);
    auto y = d(b);
    auto al = d.f(alpha);
    auto o = d(out);
    OP(aclnnAdd, x, y, al, o);
    return out;
  }
  TV adds(const TV& a, float v) {
    TV out = fresh(a.dims, a.dt);
    Descs d;
    auto x = d(a);
    auto s = d.f(v);
    auto al = d.f(1.0f);
    auto o = d(out);
    OP(aclnnAdds, x, s, al, o);
    return out;
  }
  TV mul(const TV& a, const TV& b, std::vector<int64_t> outDims) {
    TV out = fresh(outDims, a.dt);
    Descs d;
    auto x = d(a);
    auto y = d(b);
    auto o = d(out);
    OP(aclnnMul, x, y, o);
    return out;
  }
  TV muls(const TV& a, float v) {
    TV out = fresh(a.dims, a.dt);
    Descs d;
    auto x = d(a);
    auto s = d.f(v);
    auto o = d(out);
    OP(aclnnMuls, x, s, o);
    return out;
  }
  TV silu(const TV& a) {  // in the activation dtype
    TV out = fresh(a.dims, act_);
    Descs d;
    auto x = d(a);
    auto o = d(out);
    OP(aclnnSilu, x, o);
    return out;
  }
  TV cat(const TV& a, const TV& b, aclDataType dt) {  // [T, A] ++ [T, B] -> [T, A + B]
    TV out = fresh({a.dims[0], a.dims[1] + b.dims[1]}, dt);
    Descs d;
    auto x = d(a);
    auto y = d(b);
    auto l = d.list({x, y});
    auto o = d(out);
    OP(aclnnCat, l, int64_t(1), o);
    return out;
  }
  TV softmax(const TV& a) {
    TV out = fresh(a.dims, a.dt);
    Descs d;
    auto x = d(a);
    auto o = d(out);
    OP(aclnnSoftmax, x, int64_t(-1), o);
    return out;
  }
  TV indexSelect(const TV& a, const TV& idx) {
    std::vector<int64_t> dims = a.dims;
    dims[0] = idx.dims[0];
    TV out = fresh(dims, a.dt);
    Descs d;
    auto x = d(a);
    auto i = d(idx);
    auto o = d(out);
    OP(aclnnIndexSelect, x, int64_t(0), i, o);
    return out;
  }
  void indexCopy(const TV& dst, const TV& idx, const TV& src) {
    Descs d;
    auto x = d(dst);
    auto i = d(idx);
    auto s = d(src);
    OP(aclnnInplaceIndexCopy, x, int64_t(0), i, s);
  }
  void zero(const TV& x) {
    Descs d;
    auto t = d(x);
    OP(aclnnInplaceZero, t);
  }
  void topk(const TV& x, int64_t k, TV& values, TV& indices) {
    std::vector<int64_t> dims = x.dims;
    dims.back() = k;
    values = fresh(dims, x.dt);
    indices = fresh(dims, ACL_INT64);
    Descs d;
    auto a = d(x);
    auto v = d(values);
    auto i = d(indices);
    OP(aclnnTopk, a, k, int64_t(-1), true, true, v, i);
  }
  TV reduceSumLast(const TV& x, bool keep) {
    std::vector<int64_t> dims = x.dims;
    if (keep) dims.back() = 1;
    else dims.pop_back();
    TV out = fresh(dims, ACL_FLOAT);
    Descs d;
    auto a = d(x);
    auto dd = d.ints({-1});
    auto o = d(out);
    OP(aclnnReduceSum, a, dd, keep, ACL_FLOAT, o);
    return out;
  }

  // ---- N-API surface --------------------------------------------------------------------------------
  static TV tvOf(const Napi::Value& v) {
    Napi::Object o = v.As<Napi::Object>();
    TV t;
    t.base = reinterpret_cast<void*>(static_cast<uintptr_t>(o.Get("p").As<Napi::Number>().Int64Value()));
    t.storage = o.Get("n").As<Napi::Number>().Int64Value();
    t.off = o.Get("o").As<Napi::Number>().Int64Value();
    int64_t r = o.Get("r").As<Napi::Number>().Int64Value(), c = o.Get("c").As<Napi::Number>().Int64Value(),
            s = o.Get("s").As<Napi::Number>().Int64Value();
    t.dt = aclDataType(o.Get("dt").As<Napi::Number>().Int32Value());
    t.dims = {r, c};
    t.strides = {s, 1};
    return t;
  }
  static Napi::Object jsOf(Napi::Env env, const TV& t) {  // a 2-D contiguous (or row-strided) view
    Napi::Object o = Napi::Object::New(env);
    int64_t r = t.dims.size() == 1 ? 1 : t.numel() / t.dims.back();
    int64_t c = t.dims.back();
    o.Set("p", Napi::Number::New(env, double(reinterpret_cast<uintptr_t>(t.base))));
    o.Set("n", Napi::Number::New(env, double(t.storage)));
    o.Set("o", Napi::Number::New(env, double(t.off)));
    o.Set("r", Napi::Number::New(env, double(r)));
    o.Set("c", Napi::Number::New(env, double(c)));
    o.Set("s", Napi::Number::New(env, double(t.dims.size() == 1 ? c : t.strides[t.dims.size() - 2])));
    o.Set("dt", Napi::Number::New(env, int(t.dt)));
    return o;
  }
  static std::vector<int32_t> i32s(const Napi::Value& v) {
    auto a = v.As<Napi::Int32Array>();
    return std::vector<int32_t>(a.Data(), a.Data() + a.ElementLength());
  }
  static std::vector<float> f32s(const Napi::Value& v) {
    auto a = v.As<Napi::Float32Array>();
    return std::vector<float>(a.Data(), a.Data() + a.ElementLength());
  }
  void bind() { chk(g_api.aclrtSetDevice(device_), "aclrtSetDevice"); }

  Napi::Value Weight(const Napi::CallbackInfo& info);
  Napi::Value ExpertSet(const Napi::CallbackInfo& info);
  Napi::Value Upload(const Napi::CallbackInfo& info);
  Napi::Value Download(const Napi::CallbackInfo& info);
  Napi::Value Cache(const Napi::CallbackInfo& info);
  Napi::Value ReadCache(const Napi::CallbackInfo& info);
  Napi::Value BeginStep(const Napi::CallbackInfo& info);
  Napi::Value Embed(const Napi::CallbackInfo& info);
  Napi::Value RmsNorm(const Napi::CallbackInfo& info);
  Napi::Value Linear(const Napi::CallbackInfo& info);
  Napi::Value Add(const Napi::CallbackInfo& info);
  Napi::Value SiluMul(const Napi::CallbackInfo& info);
  Napi::Value Concat(const Napi::CallbackInfo& info);
  Napi::Value Rows(const Napi::CallbackInfo& info);
  Napi::Value Rope(const Napi::CallbackInfo& info);
  Napi::Value Mla(const Napi::CallbackInfo& info);
  Napi::Value MoeGate(const Napi::CallbackInfo& info);
  Napi::Value MoeExperts(const Napi::CallbackInfo& info);
  Napi::Value HcclRootInfoBytes(const Napi::CallbackInfo& info);
  Napi::Value HcclInit(const Napi::CallbackInfo& info);
  Napi::Value AllReduce(const Napi::CallbackInfo& info);
  Napi::Value AllGather(const Napi::CallbackInfo& info);
  Napi::Value Stats(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    release();
    return info.Env().Undefined();
  }

  // caches: one persistent buffer per cache; its layout is fixed at the first mla call (kvLora known)
  struct CacheBuf {
    TV buf;  // [layers * slots * width]
    int64_t layers, slots, width, kvLora = -1;
  };
  std::vector<CacheBuf> caches_;
  // expert sets: stacked weights
  struct Experts {
    TV w1, w2, w3;  // [E, I, D], [E, D, I], [E, I, D]
    int64_t E, I, D;
  };
  std::vector<Experts> experts_;
  // the two planes of a cache layer: latent [slots, L] and rope [slots, R], each contiguous
  void planes(CacheBuf& c, int64_t layer, TV& lat, TV& rope) {
    int64_t L = c.kvLora, R = c.width - L, per = c.slots * c.width;
    lat = c.buf.view({c.slots, L}, {L, 1}, layer * per);
    rope = c.buf.view({c.slots, R}, {R, 1}, layer * per + c.slots * L);
  }
};

Ctx::Ctx(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Ctx>(info) {
  const Probe& P = probe();
  if (!P.ok) throw Napi::Error::New(info.Env(), "Ascend not available: " + P.reason);
  Napi::Object o = info[0].As<Napi::Object>();
  device_ = o.Get("device").As<Napi::Number>().Int32Value();
  act_ = o.Get("bf16").As<Napi::Boolean>().Value() ? ACL_BF16 : ACL_FLOAT;
  if (device_ < 0 || size_t(device_) >= P.devices.size())
    throw Napi::RangeError::New(info.Env(), "ascend: device " + std::to_string(device_) + " outside the " + std::to_string(P.devices.size()) + " NPUs");
  try {
    bind();
    chk(g_api.aclrtCreateStream(&stream_), "aclrtCreateStream");
    live_ = true;
  } catch (const std::exception& e) {
    throw Napi::Error::New(info.Env(), e.what());
  }
}

#define GUARD_BEGIN \
  try {             \
    need();         \
    bind();
#define GUARD_END                                                 \
  }                                                               \
  catch (const std::exception& e) {                               \
    throw Napi::Error::New(info.Env(), std::string("ascend: ") + e.what()); \
  }

// weight(dtype, rows, cols, data, scale?, sr, sc, or, oc): stored in the activation dtype (BF16 on the NPU;
// FP32 in exact mode), FP8 dequantized with its 128x128 block scales on the host
Napi::Value Ctx::Weight(const Napi::CallbackInfo& info) {
  GUARD_BEGIN
  std::string dt = info[0].As<Napi::String>();
  int64_t R = info[1].As<Napi::Number>().Int64Value(), C = info[2].As<Napi::Number>().Int64Value();
  auto data = info[3].As<Napi::Uint8Array>();
  std::vector<float> f(size_t(R * C));
  const uint8_t* p = data.Data();
  if (dt == "f8_e4m3") {
    auto sc = info[4].As<Napi::Float32Array>();
    int64_t sr = info[5].As<Napi::Number>().Int64Value(), scn = info[6].As<Napi::Number>().Int64Value();
    int64_t orr = info[7].As<Napi::Number>().Int64Value(), oc = info[8].As<Napi::Number>().Int64Value();
    if (int64_t(data.ByteLength()) < R * C) throw std::runtime_error("FP8 weight: too few bytes");
    for (int64_t r = 0; r < R; r++)
      for (int64_t c = 0; c < C; c++) {
        int64_t br = (r + orr) / 128, bc = (c + oc) / 128;
        if (br >= sr || bc >= scn) throw std::runtime_error("FP8 weight: scale grid too small");
        f[size_t(r * C + c)] = fp8e4m3(p[r * C + c]) * sc.Data()[br * scn + bc];
      }
  } else if (dt == "bf16" || dt == "f16" || dt == "f32") {
    size_t es = dt == "f32" ? 4 : 2;
    if (data.ByteLength() < size_t(R * C) * es) throw std::runtime_error(dt + " weight: too few bytes");
    for (int64_t i = 0; i < R * C; i++) {
      if (dt == "f32") std::memcpy(&f[size_t(i)], p + i * 4, 4);
      else {
        uint16_t h;
        std::memcpy(&h, p + i * 2, 2);
        if (dt == "bf16") f[size_t(i)] = fromBf16(h);
        else {  // f16
          int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
          float v = e == 0 ? std::ldexp(float(m), -24) : e == 31 ? (m ? NAN : INFINITY) : std::ldexp(float(m | 1024), e - 25);
          f[size_t(i)] = s ? -v : v;
        }
      }
    }
  } else {
    throw std::runtime_error("weight dtype " + dt + " not supported");
  }
  TV w = uploadF(f.data(), {R, C}, act_, true);
  return jsOf(info.Env(), w);
  GUARD_END
}

// expertSet([[w1, w2, w3], ...]): the experts stacked into [E, I, D] / [E, D, I] / [E, I, D] buffers that
// aclnnGroupedMatmulV4 reads through transposed views; the single weights are freed
Napi::Value Ctx::ExpertSet(const Napi::CallbackInfo& info) {
  GUARD_BEGIN
  auto list = info[0].As<Napi::Array>();
  uint32_t E = list.Length();
  if (E == 0) throw std::runtime_error("expertSet: no experts");
  TV a0 = tvOf(list.Get(0u).As<Napi::Array>().Get(0u));
  int64_t I = a0.dims[0], D = a0.dims[1];
  Experts ex{persistentTV({E, I, D}, act_), persistentTV({E, D, I}, act_), persistentTV({E, I, D}, act_), E, I, D};
  size_t es = dtSize(act_), n = size_t(I * D) * es;
  sync();  // the single weights may have been read by queued operators: the D2D copies below are synchronous
  for (uint32_t e = 0; e < E; e++) {
    auto tr = list.Get(e).As<Napi::Array>();
    TV w[3] = {tvOf(tr.Get(0u)), tvOf(tr.Get(1u)), tvOf(tr.Get(2u))};
    if (w[0].dims != std::vector<int64_t>{I, D} || w[2].dims != std::vector<int64_t>{I, D} || w[1].dims != std::vector<int64_t>{D, I})
      throw std::runtime_error("expertSet: expert " + std::to_string(e) + " has other shapes than expert 0");
    TV* dst[3] = {&ex.w1, &ex.w2, &ex.w3};
    for (int k = 0; k < 3; k++) {
      chk(g_api.aclrtMemcpy(static_cast<char*>(dst[k]->base) + e * n, n, static_cast<char*>(w[k].base) + w[k].off * es, n,
                            ACL_MEMCPY_DEVICE_TO_DEVICE),
          "aclrtMemcpy D2D");
      auto it = std::find(persistent_.begin(), persistent_.end(), w[k].base);
      if (it != persistent_.end()) {
        g_api.aclrtFree(*it);
        persistent_.erase(it);
      }
    }
  }
  experts_.push_back(ex);
  return Napi::Number::New(info.Env(), double(experts_.size() - 1));
  GUARD_END
}

// upload(Float32Array, rows, cols, kind): kind 0 = activation dtype, 1 = f32, 2 = persistent activation dtype
Napi::Value Ctx::Upload(const Napi::CallbackInfo& info) {
  GUARD_BEGIN
  auto a = info[0].As<Napi::Float32Array>();
  int64_t r = info[1].As<Napi::Number>().Int64Value(), c = info[2].As<Napi::Number>().Int64Value();
  int kind = info[3].As<Napi::Number>().Int32Value();
  return jsOf(info.Env(), uploadF(a.Data(), {r, c}, kind == 1 ? ACL_FLOAT : act_, kind == 2));
  GUARD_END
}

Napi::Value Ctx::Download(const Napi::CallbackInfo& info) {
  GUARD_BEGIN
  auto v = downloadF(tvOf(info[0]));
  auto out = Napi::Float32Array::New(info.Env(), v.size());
  std::memcpy(out.Data(), v.data(), v.size() * 4);
  return out;
  GUARD_END
}

Napi::Value Ctx::Cache(const Napi::CallbackInfo& info) {
  GUARD_BEGIN
  int64_t layers = info[0].As<Napi::Number>().Int64Value(), blocks = info[1].As<Napi::Number>().Int64Value(),
          bs = info[2].As<Napi::Number>().Int64Value(), width = info[3].As<Napi::Number>().Int64Value();
  bool bf16 = info[4].As<Napi::Boolean>().Value();
  CacheBuf c;
  c.layers = layers;
  c.slots = blocks * bs;
  c.width = width;
  c.buf = persistentTV({layers * c.slots * width}, bf16 ? ACL_BF16 : ACL_FLOAT);
  zero(c.buf);
  caches_.push_back(c);
  return Napi::Number::New(info.Env(), double(caches_.size() - 1));
  GUARD_END
}

// readCache(id, layer, slot, count) -> [count, width] f32 (latent then rope per row)
Napi::Value Ctx::ReadCache(const Napi::CallbackInfo& info) {
  GUARD_BEGIN
  CacheBuf& c = caches_.at(size_t(info[0].As<Napi::Number>().Int64Value()));
  int64_t layer = info[1].As<Napi::Number>().Int64Value(), slot = info[2].As<Napi::Number>().Int64Value(),
          n = info[3].As<Napi::Number>().Int64Value();
  if (layer < 0 || layer >= c.layers || slot < 0 || n < 0 || slot + n > c.slots) throw std::runtime_error("readCache: outside the cache");
  auto out = Napi::Float32Array::New(info.Env(), size_t(n * c.width));
  if (c.kvLora < 0) {  // nothing written yet
    std::fill(out.Data(), out.Data() + n * c.width, 0.0f);
    return out;
  }
  TV lat, rope;
  planes(c, layer, lat, rope);
  int64_t L = c.kvLora, R = c.width - L;
  auto a = downloadF(lat.view({n, L}, {L, 1}, slot * L));
  auto b = downloadF(rope.view({n, R}, {R, 1}, slot * R));
  for (int64_t i = 0; i < n; i++) {
    std::memcpy(out.Data() + i * c.width, a.data() + i * L, size_t(L) * 4);
    std::memcpy(out.Data() + i * c.width + L, b.data() + i * R, size_t(R) * 4);
  }
  return out;
  GUARD_END
}

Napi::Value Ctx::BeginStep(const Napi::CallbackInfo& info) {
  GUARD_BEGIN
  sync();
  size_t used = 0;
  for (auto& c : arena_) {
    used += c.used;
    c.used = 0;
  }
  arenaPeak_ = std::max(arenaPeak_, used);
  return info.Env().Undefined();
  GUARD_END
}

// embed(table, ids Int32Array, vocabStart): rows outside this rank's slice of the vocabulary are zero
// (aclnnEmbedding of the clamped local ids, then aclnnInplaceIndexCopy of zero rows at the outside ids)
Napi::Value Ctx::Embed(const Napi::CallbackInfo& info) {
  GUARD_BEGIN
  TV w = tvOf(info[0]);
  auto ids = i32s(info[1]);
  int64_t vs = info[2].As<Napi::Number>().Int64Value(), V = w.dims[0], D = w.dims[1], T = int64_t(ids.size());
  std::vector<int64_t> local(ids.size());
  std::vector<float> mask(ids.size());
  bool all = true;
  for (size_t i = 0; i < ids.size(); i++) {
    int64_t r = int64_t(ids[i]) - vs;
    bool in = r >= 0 && r < V;
    local[i] = in ? r : 0;
    mask[i] = in ? 1.0f : 0.0f;
    all = all && in;
  }
  TV idx = uploadI64(local, {T});
  TV out = fresh({T, D}, act_);
  {
    Descs d;
    auto a = d(w);
    auto i = d(idx);
    auto o = d(out);
    OP(aclnnEmbedding, a, i, o);
  }
  if (!all) {  // rows of ids outside the slice: exact zeros written over them (not a 0/1 mask: 0 * NaN and -0)
    std::vector<int64_t> bad;
    for (int64_t i = 0; i < T; i++)
      if (mask[size_t(i)] == 0.0f) bad.push_back(i);
    TV z = fresh({int64_t(bad.size()), D}, act_);
    zero(z);
    indexCopy(out, uploadI64(bad, {int64_t(bad.size())}), z);
  }
  return jsOf(info.Env(), out);
  GUARD_END
}

Napi::Value Ctx::RmsNorm(const Napi::CallbackInfo& info) {
  GUARD_BEGIN
  TV x = tvOf(info[0]), w = tvOf(info[1]);
  double eps = info[2].As<Napi::Number>().DoubleValue();
  int64_t T = x.dims[0], D = x.dims[1];
  if (w.numel() != D) throw std::runtime_error("rmsNorm: weight has " + std::to_string(w.numel()) + " values for width " + std::to_string(D));
  TV g = w.view({D}, {1});
  TV y = fresh({T, D}, act_), rstd = fresh({T, 1}, ACL_FLOAT);
  Descs d;
  auto a = d(x);
  auto b = d(g);
  auto o = d(y);
  auto r = d(rstd);
  OP(aclnnRmsNorm, a, b, eps, o, r);
  return jsOf(info.Env(), y);
  GUARD_END
}

// linear(x [T, K], w [N, K]) = x w^T: aclnnMatmul with the weight as a transposed view [K, N] (strides 1, K)
Napi::Value Ctx::Linear(const Napi::CallbackInfo& info) {
  GUARD_BEGIN
  TV x = tvOf(info[0]), w = tvOf(info[1]);
  int64_t N = w.dims[0], K = w.dims[1];
  TV wt = w.view({K, N}, {1, w.strides[0]});
  return jsOf(info.Env(), matmul(x, wt, {x.dims[0], N}, act_));
  GUARD_END
}

Napi::Value Ctx::Add(const Napi::CallbackInfo& info) {
  GUARD_BEGIN
  TV a = tvOf(info[0]), b = tvOf(info[1]);
  return jsOf(info.Env(), add(a, b, 1.0f, a.dims));
  GUARD_END
}

Napi::Value Ctx::SiluMul(const Napi::CallbackInfo& info) {
  GUARD_BEGIN
  TV g = tvOf(info[0]), u = tvOf(info[1]);
  return jsOf(info.Env(), mul(silu(g), u, g.dims));
  GUARD_END
}

Napi::Value Ctx::Concat(const Napi::CallbackInfo& info) {
  GUARD_BEGIN
  TV a = tvOf(info[0]), b = tvOf(info[1]);
  return jsOf(info.Env(), cat(a, b, act_));
  GUARD_END
}

Napi::Value Ctx::Rows(const Napi::CallbackInfo& info) {
  GUARD_BEGIN
  TV x = tvOf(info[0]);
  auto r = i32s(info[1]);
  std::vector<int64_t> idx(r.begin(), r.end());
  return jsOf(info.Env(), indexSelect(x, uploadI64(idx, {int64_t(idx.size())})));
  GUARD_END
}

// rope(x, heads, headDim, off, rd, positions, invFreq, attnFactor): interleaved pairs (x[2i], x[2i+1]) of
// the span [off, off + rd) of every head, composed of elementwise aclnn operators over stride-2 views,
// with cos/sin (times attnFactor) built on the host per token
Napi::Value Ctx::Rope(const Napi::CallbackInfo& info) {
  GUARD_BEGIN
  TV x = tvOf(info[0]);
  int64_t H = info[1].As<Napi::Number>().Int64Value(), hd = info[2].As<Napi::Number>().Int64Value(),
          off = info[3].As<Napi::Number>().Int64Value(), rd = info[4].As<Napi::Number>().Int64Value();
  auto pos = i32s(info[5]);
  auto inv = f32s(info[6]);
  float f = float(info[7].As<Napi::Number>().DoubleValue());
  int64_t T = x.dims[0], h = rd / 2;
  std::vector<float> cs(size_t(T * h)), sn(size_t(T * h));
  for (int64_t t = 0; t < T; t++)
    for (int64_t i = 0; i < h; i++) {
      double a = double(pos[size_t(t)]) * double(inv[size_t(i)]);
      cs[size_t(t * h + i)] = float(std::cos(a)) * f;
      sn[size_t(t * h + i)] = float(std::sin(a)) * f;
    }
  TV c = uploadF(cs.data(), {T, 1, h}, act_), s = uploadF(sn.data(), {T, 1, h}, act_);
  TV y = copy(x, act_);  // [T, H*hd] contiguous
  int64_t rs = x.strides[0];
  TV xe = x.view({T, H, h}, {rs, hd, 2}, off), xo = x.view({T, H, h}, {rs, hd, 2}, off + 1);
  std::vector<int64_t> dims{T, H, h};
  TV e = add(mul(xe, c, dims), mul(xo, s, dims), -1.0f, dims);
  TV o = add(mul(xe, s, dims), mul(xo, c, dims), 1.0f, dims);
  copyInto(y.view({T, H, h}, {H * hd, hd, 2}, off), e);
  copyInto(y.view({T, H, h}, {H * hd, hd, 2}, off + 1), o);
  return jsOf(info.Env(), y);
  GUARD_END
}

// mla(q, kv, pe, wkvB, cache, layer, positions, seqIdx, blockTables, maxBlocks, heads, nope, rope, v, kvLora, scale)
Napi::Value Ctx::Mla(const Napi::CallbackInfo& info) {
  GUARD_BEGIN
  TV q = tvOf(info[0]), kv = tvOf(info[1]), pe = tvOf(info[2]), wb = tvOf(info[3]);
  CacheBuf& cb = caches_.at(size_t(info[4].As<Napi::Number>().Int64Value()));
  int64_t layer = info[5].As<Napi::Number>().Int64Value();
  auto pos = i32s(info[6]), seq = i32s(info[7]), bt = i32s(info[8]);
  int64_t MB = info[9].As<Napi::Number>().Int64Value(), H = info[10].As<Napi::Number>().Int64Value(),
          n = info[11].As<Napi::Number>().Int64Value(), r = info[12].As<Napi::Number>().Int64Value(),
          v = info[13].As<Napi::Number>().Int64Value(), L = info[14].As<Napi::Number>().Int64Value(),
          bs = info[16].As<Napi::Number>().Int64Value();
  float scale = float(info[15].As<Napi::Number>().DoubleValue());
  int64_t T = q.dims[0], qs = q.strides[0];
  if (L + r != cb.width) throw std::runtime_error("mla: kvLora + rope != the cache width");
  if (cb.kvLora < 0) cb.kvLora = L;
  TV lat, rope;
  planes(cb, layer, lat, rope);
  // 1. this step's latents into the cache: aclnnInplaceIndexCopy of the rows at their slots
  std::vector<int64_t> slots(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; t++) slots[size_t(t)] = int64_t(bt[size_t(seq[size_t(t)] * MB + pos[size_t(t)] / bs)]) * bs + pos[size_t(t)] % bs;
  TV sl = uploadI64(slots, {T});
  indexCopy(lat, sl, cast(kv, lat.dt));
  indexCopy(rope, sl, cast(pe, rope.dt));
  TV out = fresh({T, H * v}, act_);
  // wkv_b [H*(n+v), L]: K part of head h = rows h*(n+v) .. +n, V part = rows h*(n+v)+n .. +v
  int64_t hs = (n + v) * L;
  bool fiaShape = g_api.fia && act_ == ACL_BF16 && lat.dt == ACL_BF16 && L == 512 && r == 64 && getenv("DS3_ASCEND_NO_FIA") == nullptr;
  if (fiaShape) {
    // 2a. aclnnFusedInferAttentionScoreV3 in its MLA form: every token a batch row of query length 1 over
    // its own sequence's paged cache (positions 0..pos), latent as key and value, rope parts separate
    TV qlat = bmm(q.view({H, T, n}, {n + r, qs, 1}), wb.view({H, n, L}, {hs, L, 1}), act_);  // [H, T, L]
    TV query = copy(qlat.view({T, 1, H, L}, {L, T * H * L, T * L, 1}), act_);                // BSND [T, 1, H, L]
    TV qrope = copy(q.view({T, 1, H, r}, {qs, qs, n + r, 1}, n), act_);                       // [T, 1, H, r]
    int64_t NB = cb.slots / bs;
    TV key = lat.view({NB, bs, L}, {bs * L, L, 1}), keyRope = rope.view({NB, bs, r}, {bs * r, r, 1});
    std::vector<int32_t> table(static_cast<size_t>(T * MB));
    std::vector<int64_t> lens(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; t++) {
      for (int64_t j = 0; j < MB; j++) table[size_t(t * MB + j)] = bt[size_t(seq[size_t(t)] * MB + j)];
      lens[size_t(t)] = pos[size_t(t)] + 1;
    }
    TV btv = uploadI32(table, {T, MB});
    TV att = fresh({T, 1, H, L}, act_);
    {
      Descs d;
      auto qa = d(query);
      auto ka = d(key);
      auto va = d(key);
      auto kl = d.list({ka});
      auto vl = d.list({va});
      auto la = d.ints(lens);
      auto ba = d(btv);
      auto qr = d(qrope);
      auto kr = d(keyRope);
      auto o = d(att);
      char layout[] = "BSND";
      OP(aclnnFusedInferAttentionScoreV3, qa, kl, vl, nullptr, nullptr, nullptr, la, nullptr, nullptr, nullptr, nullptr, nullptr,
         nullptr, nullptr, ba, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, qr, kr, nullptr, H,
         double(scale), int64_t(2147483647), int64_t(2147483647), layout, int64_t(1), int64_t(0), int64_t(0), bs, int64_t(0), false,
         int64_t(0), int64_t(0), o, nullptr);
    }
    // 3a. the V part of wkv_b: [H, T, L] x [H, L, v] -> [H, T, v], written into out [T, H*v]
    TV ov = bmm(att.view({H, T, L}, {L, H * L, 1}), wb.view({H, L, v}, {hs, 1, L}, n * L), act_);
    copyInto(out.view({H, T, v}, {v, H * v, 1}), ov);
    return jsOf(info.Env(), out);
  }
  // 2b. composition (any shape, FP32 math): per sequence of the step, gather its cache rows with
  // aclnnIndexSelect, scores = q_lat·c + q_pe·k_pe, causal mask, softmax, weighted sum, V part of wkv_b
  TV q32 = cast(q, ACL_FLOAT), wb32 = cast(wb, ACL_FLOAT);
  int64_t q32s = q32.strides[0];
  TV qlat = bmm(q32.view({H, T, n}, {n + r, q32s, 1}), wb32.view({H, n, L}, {hs, L, 1}), ACL_FLOAT);  // [H, T, L]
  TV qpe = q32.view({H, T, r}, {n + r, q32s, 1}, n);
  std::vector<int32_t> order;
  for (int64_t t = 0; t < T; t++)
    if (std::find(order.begin(), order.end(), seq[size_t(t)]) == order.end()) order.push_back(seq[size_t(t)]);
  for (int32_t s : order) {
    std::vector<int64_t> toks, ctx;
    int64_t maxp = 0;
    for (int64_t t = 0; t < T; t++)
      if (seq[size_t(t)] == s) {
        toks.push_back(t);
        maxp = std::max<int64_t>(maxp, pos[size_t(t)]);
      }
    int64_t Ts = int64_t(toks.size()), Ls = maxp + 1;
    for (int64_t j = 0; j < Ls; j++) ctx.push_back(int64_t(bt[size_t(s * MB + j / bs)]) * bs + j % bs);
    TV ci = uploadI64(ctx, {Ls}), ti = uploadI64(toks, {Ts});
    TV cl = cast(indexSelect(lat, ci), ACL_FLOAT), cr = cast(indexSelect(rope, ci), ACL_FLOAT);  // [Ls, L], [Ls, r]
    // this sequence's query rows: index_select along the token dim of [T, H, *] views, then head-major views
    TV ql = indexSelect(qlat.view({T, H, L}, {L, T * L, 1}), ti);   // [Ts, H, L]
    TV qp = indexSelect(qpe.view({T, H, r}, {q32s, n + r, 1}, 0), ti);  // [Ts, H, r]
    TV sc = matmul(ql.view({H, Ts, L}, {L, H * L, 1}), cl.view({L, Ls}, {1, L}), {H, Ts, Ls}, ACL_FLOAT);
    TV sp = matmul(qp.view({H, Ts, r}, {r, H * r, 1}), cr.view({r, Ls}, {1, r}), {H, Ts, Ls}, ACL_FLOAT);
    std::vector<float> mask(size_t(Ts * Ls));
    for (int64_t i = 0; i < Ts; i++)
      for (int64_t j = 0; j < Ls; j++) mask[size_t(i * Ls + j)] = j <= pos[size_t(toks[size_t(i)])] ? 0.0f : -INFINITY;
    TV m = uploadF(mask.data(), {Ts, Ls}, ACL_FLOAT);
    TV p = softmax(add(muls(add(sc, sp, 1.0f, {H, Ts, Ls}), scale), m, 1.0f, {H, Ts, Ls}));
    TV ol = matmul(p, cl, {H, Ts, L}, ACL_FLOAT);                                           // [H, Ts, L]
    TV ov = bmm(ol, wb32.view({H, L, v}, {hs, 1, L}, n * L), ACL_FLOAT);                    // [H, Ts, v]
    TV tok = fresh({Ts, H * v}, act_);
    copyInto(tok.view({H, Ts, v}, {v, H * v, 1}), ov);
    indexCopy(out, ti, tok);
  }
  return jsOf(info.Env(), out);
  GUARD_END
}

// moeGate(x, gate, bias|null, topk, nGroups, topkGroups, sigmoid, norm, scale) -> [T, 2*topk] f32
Napi::Value Ctx::MoeGate(const Napi::CallbackInfo& info) {
  GUARD_BEGIN
  TV x = tvOf(info[0]), g = tvOf(info[1]);
  bool hasBias = info[2].IsTypedArray();
  std::vector<float> bias = hasBias ? f32s(info[2]) : std::vector<float>();
  int64_t k = info[3].As<Napi::Number>().Int64Value(), G = info[4].As<Napi::Number>().Int64Value(),
          tg = info[5].As<Napi::Number>().Int64Value();
  bool sig = info[6].As<Napi::Boolean>().Value(), norm = info[7].As<Napi::Boolean>().Value();
  float rs = float(info[8].As<Napi::Number>().DoubleValue());
  int64_t T = x.dims[0], E = g.dims[0], D = g.dims[1], per = E / G;
  TV x32 = cast(x, ACL_FLOAT), g32 = cast(g, ACL_FLOAT);
  TV logits = matmul(x32, g32.view({D, E}, {1, g32.strides[0]}), {T, E}, ACL_FLOAT);
  TV b = hasBias ? uploadF(bias.data(), {E}, ACL_FLOAT) : TV();
  TV w, idx;  // [T, k] f32 weights, [T, k] ids (any int type)
  bool gating = g_api.gating && sig && norm && hasBias && E == 256 && G == 8 && getenv("DS3_ASCEND_NO_GATING_TOPK") == nullptr;
  if (gating) {
    // aclnnMoeGatingTopK: DeepSeek-V3's own shape (256 experts, 8 groups), sigmoid, top-2-sum group score
    w = fresh({T, k}, ACL_FLOAT);
    idx = fresh({T, k}, ACL_INT32);
    TV normOut = fresh({T, E}, ACL_FLOAT);
    Descs d;
    auto a = d(logits);
    auto bb = d(b);
    auto y = d(w);
    auto i = d(idx);
    auto no = d(normOut);
    OP(aclnnMoeGatingTopK, a, bb, k, tg, G, int64_t(1), int64_t(0), int64_t(1), false, double(rs), 1e-20, y, i, no);
  } else {
    // composition: scores, biased choice, group scores (top-2 sum with a bias, max without), keep the
    // topkGroups best groups, top-k of the choice, weights = scores at those experts (renormalised)
    TV s = fresh({T, E}, ACL_FLOAT);
    {
      Descs d;
      auto a = d(logits);
      auto o = d(s);
      if (sig) OP(aclnnSigmoid, a, o);
      else OP(aclnnSoftmax, a, int64_t(-1), o);
    }
    TV c = hasBias ? add(s, b, 1.0f, {T, E}) : s;
    if (G > 1) {
      TV gv, gi, top, topi;
      topk(c.view({T, G, per}, {E, per, 1}), hasBias && per > 1 ? 2 : 1, gv, gi);  // [T, G, 1|2]
      TV gs = reduceSumLast(gv, false);                                           // [T, G]
      topk(gs, tg, top, topi);                                                    // [T, tg]
      TV zeros = fresh({T, G}, ACL_FLOAT);
      zero(zeros);
      std::vector<float> ones(size_t(T * tg), 1.0f);
      TV on = uploadF(ones.data(), {T, tg}, ACL_FLOAT);
      TV mask = fresh({T, G}, ACL_FLOAT);
      {
        Descs d;
        auto a = d(zeros);
        auto i = d(topi);
        auto sr = d(on);
        auto o = d(mask);
        OP(aclnnScatter, a, int64_t(1), i, sr, int64_t(0), o);
      }
      // kept groups + 0, dropped groups -1e30
      TV pen = muls(adds(mask, -1.0f), 1e30f);
      c = add(c.view({T, G, per}, {E, per, 1}), pen.view({T, G, 1}, {G, 1, 1}), 1.0f, {T, G, per}).reshape({T, E});
    }
    TV cv;
    topk(c, k, cv, idx);  // [T, k] i64
    w = fresh({T, k}, ACL_FLOAT);
    {
      Descs d;
      auto a = d(s);
      auto i = d(idx);
      auto o = d(w);
      OP(aclnnGather, a, int64_t(1), i, o);
    }
    if (norm) {
      TV sum = adds(reduceSumLast(w, true), 1e-20f);  // [T, 1]
      TV q = fresh({T, k}, ACL_FLOAT);
      Descs d;
      auto a = d(w);
      auto bb = d(sum);
      auto o = d(q);
      OP(aclnnDiv, a, bb, o);
      w = q;
    }
    if (rs != 1.0f) w = muls(w, rs);
  }
  return jsOf(info.Env(), cat(w, cast(idx, ACL_FLOAT), ACL_FLOAT));  // [T, 2k]: weights, then ids
  GUARD_END
}

// moeExperts(x, set, first, routing, topk): aclnnMoeInitRoutingV2 -> aclnnGroupedMatmulV4 (w1, w3) ->
// SiLU·mul -> aclnnGroupedMatmulV4 (w2) -> aclnnMoeFinalizeRoutingV2. Experts of other ranks go to a
// sentinel group past this rank's experts with weight 0 (their rows are never multiplied).
Napi::Value Ctx::MoeExperts(const Napi::CallbackInfo& info) {
  GUARD_BEGIN
  TV x = tvOf(info[0]);
  Experts& ex = experts_.at(size_t(info[1].As<Napi::Number>().Int64Value()));
  int64_t first = info[2].As<Napi::Number>().Int64Value();
  TV routing = tvOf(info[3]);
  int64_t k = info[4].As<Napi::Number>().Int64Value(), T = x.dims[0], D = x.dims[1], E = ex.E, I = ex.I, M = T * k;
  if (D != ex.D) throw std::runtime_error("moeExperts: input width != the experts' width");
  // tiny per-step metadata: the routing [T, 2k] to the host, local ids and weights back
  auto rt = downloadF(routing);
  std::vector<int32_t> ids(static_cast<size_t>(M));
  std::vector<float> sc(static_cast<size_t>(M));
  for (int64_t t = 0; t < T; t++)
    for (int64_t j = 0; j < k; j++) {
      int64_t e = int64_t(rt[size_t(t * 2 * k + k + j)]) - first;
      bool in = e >= 0 && e < E;
      ids[size_t(t * k + j)] = in ? int32_t(e) : int32_t(E);
      sc[size_t(t * k + j)] = in ? rt[size_t(t * 2 * k + j)] : 0.0f;
    }
  TV idv = uploadI32(ids, {T, k}), scv = uploadF(sc.data(), {T, k}, act_);
  TV xs = fresh({M, D}, act_), rowIdx = fresh({M}, ACL_INT32), cum = fresh({E + 1}, ACL_INT32);
  {
    Descs d;
    auto a = d(x);
    auto i = d(idv);
    auto o = d(xs);
    auto ri = d(rowIdx);
    auto c = d(cum);
    OP(aclnnMoeInitRoutingV2, a, i, M, int64_t(0), E + 1, int64_t(0), int64_t(1), false, o, ri, c, nullptr);
  }
  // the counts come as INT32 (the operator definition); aclnnGroupedMatmulV4 takes an INT64 groupList
  TV groups = cast(cum.view({E}, {1}), ACL_INT64);
  auto gmm = [&](const TV& in, const TV& w, int64_t N) {
    TV out = fresh({M, N}, act_);
    zero(out);  // rows of the sentinel group are left as they are
    Descs d;
    auto a = d(in);
    auto b = d(w);
    auto xl = d.list({a});
    auto wl = d.list({b});
    auto gl = d(groups);
    auto o = d(out);
    auto ol = d.list({o});
    OP(aclnnGroupedMatmulV4, xl, wl, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, gl, nullptr, nullptr, nullptr, int64_t(3),
       int64_t(0), int64_t(0), int64_t(0), ol, nullptr, nullptr);
    return out;
  };
  TV h1 = gmm(xs, ex.w1.view({E, D, I}, {I * D, 1, D}), I);
  TV h3 = gmm(xs, ex.w3.view({E, D, I}, {I * D, 1, D}), I);
  TV h = mul(silu(h1), h3, {M, I});
  TV h2 = gmm(h, ex.w2.view({E, I, D}, {D * I, 1, I}), D);
  TV out = fresh({T, D}, act_);
  {
    Descs d;
    auto a = d(h2);
    auto ri = d(rowIdx);
    auto s2 = d(scv);
    auto i = d(idv);
    auto o = d(out);
    OP(aclnnMoeFinalizeRoutingV2, a, ri, nullptr, nullptr, nullptr, s2, i, int64_t(2), o);  // dropPadMode 2: row order t*k + j, as InitRoutingV2 writes it
  }
  return jsOf(info.Env(), out);
  GUARD_END
}

// ---- HCCL ------------------------------------------------------------------------------------------
Napi::Value Ctx::HcclRootInfoBytes(const Napi::CallbackInfo& info) {
  GUARD_BEGIN
  if (!g_api.hccl) throw std::runtime_error("HCCL not available");
  HcclRootInfo ri;
  HcclResult r = g_api.HcclGetRootInfo(&ri);
  if (r != HCCL_SUCCESS) throw std::runtime_error(std::string("HcclGetRootInfo failed: ") + g_api.HcclGetErrorString(r));
  auto out = Napi::Uint8Array::New(info.Env(), DS3_HCCL_ROOT_INFO_BYTES);
  std::memcpy(out.Data(), &ri, DS3_HCCL_ROOT_INFO_BYTES);
  return out;
  GUARD_END
}
Napi::Value Ctx::HcclInit(const Napi::CallbackInfo& info) {
  GUARD_BEGIN
  auto b = info[0].As<Napi::Uint8Array>();
  uint32_t rank = info[1].As<Napi::Number>().Uint32Value(), n = info[2].As<Napi::Number>().Uint32Value();
  if (b.ByteLength() != DS3_HCCL_ROOT_INFO_BYTES) throw std::runtime_error("HCCL root info of " + std::to_string(b.ByteLength()) + " bytes");
  HcclRootInfo ri;
  std::memcpy(&ri, b.Data(), DS3_HCCL_ROOT_INFO_BYTES);
  HcclResult r = g_api.HcclCommInitRootInfo(n, &ri, rank, &comm_);
  if (r != HCCL_SUCCESS) throw std::runtime_error(std::string("HcclCommInitRootInfo failed: ") + g_api.HcclGetErrorString(r));
  world_ = int(n);
  return info.Env().Undefined();
  GUARD_END
}
Napi::Value Ctx::AllReduce(const Napi::CallbackInfo& info) {
  GUARD_BEGIN
  TV x = tvOf(info[0]);
  TV c = x.contiguous() ? x : copy(x, x.dt);
  TV out = fresh(c.dims, c.dt);
  size_t es = dtSize(c.dt);
  HcclResult r = g_api.HcclAllReduce(static_cast<char*>(c.base) + c.off * es, out.base, uint64_t(c.numel()),
                                     c.dt == ACL_BF16 ? HCCL_DATA_TYPE_BFP16 : HCCL_DATA_TYPE_FP32, HCCL_REDUCE_SUM, comm_, stream_);
  if (r != HCCL_SUCCESS) throw std::runtime_error(std::string("HcclAllReduce failed: ") + g_api.HcclGetErrorString(r));
  return jsOf(info.Env(), out);
  GUARD_END
}
// allGather: HcclAllGather gives [ws, rows, cols]; an aclnnInplaceCopy through strided views makes [rows, ws*cols]
Napi::Value Ctx::AllGather(const Napi::CallbackInfo& info) {
  GUARD_BEGIN
  TV x = tvOf(info[0]);
  TV c = x.contiguous() ? x : copy(x, x.dt);
  int64_t R = c.dims[0], C = c.dims[1], W = world_;
  TV g = fresh({W, R, C}, c.dt);
  size_t es = dtSize(c.dt);
  HcclResult r = g_api.HcclAllGather(static_cast<char*>(c.base) + c.off * es, g.base, uint64_t(c.numel()),
                                     c.dt == ACL_BF16 ? HCCL_DATA_TYPE_BFP16 : HCCL_DATA_TYPE_FP32, comm_, stream_);
  if (r != HCCL_SUCCESS) throw std::runtime_error(std::string("HcclAllGather failed: ") + g_api.HcclGetErrorString(r));
  TV out = fresh({R, W * C}, c.dt);
  copyInto(out.view({R, W, C}, {W * C, C, 1}), g.view({R, W, C}, {C, R * C, 1}));
  return jsOf(info.Env(), out);
  GUARD_END
}
Napi::Value Ctx::Stats(const Napi::CallbackInfo& info) {
  Napi::Object o = Napi::Object::New(info.Env());
  size_t used = 0, cap = 0;
  for (auto& c : arena_) {
    used += c.used;
    cap += c.cap;
  }
  o.Set("workspaceBytes", Napi::Number::New(info.Env(), double(wsCap_)));
  o.Set("workspaceGrows", Napi::Number::New(info.Env(), double(wsGrows_)));
  o.Set("arenaBytes", Napi::Number::New(info.Env(), double(cap)));
  o.Set("arenaPeak", Napi::Number::New(info.Env(), double(std::max(arenaPeak_, used))));
  o.Set("hccl", Napi::Boolean::New(info.Env(), comm_ != nullptr));
  o.Set("fia", Napi::Boolean::New(info.Env(), g_api.fia));
  o.Set("gatingTopK", Napi::Boolean::New(info.Env(), g_api.gating));
  return o;
}

Napi::Function Ctx::Init(Napi::Env env) {
  return DefineClass(env, "Context",
                     {InstanceMethod("weight", &Ctx::Weight), InstanceMethod("expertSet", &Ctx::ExpertSet),
                      InstanceMethod("upload", &Ctx::Upload), InstanceMethod("download", &Ctx::Download),
                      InstanceMethod("cache", &Ctx::Cache), InstanceMethod("readCache", &Ctx::ReadCache),
                      InstanceMethod("beginStep", &Ctx::BeginStep), InstanceMethod("embed", &Ctx::Embed),
                      InstanceMethod("rmsNorm", &Ctx::RmsNorm), InstanceMethod("linear", &Ctx::Linear),
                      InstanceMethod("add", &Ctx::Add), InstanceMethod("siluMul", &Ctx::SiluMul),
                      InstanceMethod("concat", &Ctx::Concat), InstanceMethod("rows", &Ctx::Rows),
                      InstanceMethod("rope", &Ctx::Rope), InstanceMethod("mla", &Ctx::Mla),
                      InstanceMethod("moeGate", &Ctx::MoeGate), InstanceMethod("moeExperts", &Ctx::MoeExperts),
                      InstanceMethod("hcclRootInfo", &Ctx::HcclRootInfoBytes), InstanceMethod("hcclInit", &Ctx::HcclInit),
                      InstanceMethod("allReduce", &Ctx::AllReduce), InstanceMethod("allGather", &Ctx::AllGather),
                      InstanceMethod("stats", &Ctx::Stats), InstanceMethod("dispose", &Ctx::Dispose)});
}

Napi::Value ProbeJs(const Napi::CallbackInfo& info) {
  const Probe& P = probe();
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("ok", Napi::Boolean::New(env, P.ok));
  o.Set("reason", Napi::String::New(env, P.reason));
  o.Set("libDir", Napi::String::New(env, P.libDir));
  o.Set("version", Napi::String::New(env, P.version));
  o.Set("versionText", Napi::String::New(env, P.versionText));
  o.Set("hccl", Napi::Boolean::New(env, g_api.hccl));
  Napi::Array d = Napi::Array::New(env, P.devices.size());
  for (size_t i = 0; i < P.devices.size(); i++) {
    Napi::Object x = Napi::Object::New(env);
    x.Set("label", P.devices[i]);
    x.Set("name", P.names[i]);
    x.Set("memoryTotal", P.memTotal[i]);
    x.Set("memoryFree", P.memFree[i]);
    d.Set(uint32_t(i), x);
  }
  o.Set("devices", d);
  return o;
}

Napi::Value StandinStatsJs(const Napi::CallbackInfo& info) {
  probe();
  const char* s = g_standinStats ? g_standinStats() : nullptr;
  return s ? Napi::String::New(info.Env(), s) : info.Env().Null();
}

}  // namespace

Napi::Object InitAll(Napi::Env env, Napi::Object exports) {
  exports.Set("Context", Ctx::Init(env));
  exports.Set("probe", Napi::Function::New(env, ProbeJs));
  exports.Set("standinStats", Napi::Function::New(env, StandinStatsJs));
  return exports;
}
NODE_API_MODULE(ds3_ascend, InitAll)
