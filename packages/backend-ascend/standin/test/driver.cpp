// Test driver for the Ascend stand-in: loads the four libraries from a directory with dlopen/dlsym using
// the backend's own declarations (src/native/cann_api.h, DS3_CANN_FUNCS), exercises misuse paths and
// operators, and prints one JSON object per line: {"case": ..., "rc": ..., "msg": ..., "arrays": {...}}.
// It computes no reference results: standin.test.ts holds the float64 references and the assertions.
#include <dlfcn.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "../../src/native/cann_api.h"

// ---------------------------------------------------------------- loading
struct Api {
#define DS3_MEMBER(LIB, REQ, RET, NAME, PARAMS) ds3_##NAME##_t NAME = nullptr;
  DS3_CANN_FUNCS(DS3_MEMBER)
#undef DS3_MEMBER
};
static Api A;
static const char* (*standinStats)() = nullptr;

static void load(const std::string& dir) {
  std::map<std::string, void*> libs;
  for (const char* l : {"ASCENDCL:libascendcl.so", "NNOPBASE:libnnopbase.so", "OPAPI:libopapi.so", "HCCL:libhccl.so"}) {
    std::string s = l;
    std::string key = s.substr(0, s.find(':')), file = dir + "/" + s.substr(s.find(':') + 1);
    void* h = dlopen(file.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) { std::fprintf(stderr, "dlopen %s: %s\n", file.c_str(), dlerror()); std::exit(2); }
    libs[key] = h;
  }
#define DS3_LOAD(LIB, REQ, RET, NAME, PARAMS)                                                   \
  A.NAME = (ds3_##NAME##_t)dlsym(libs[#LIB], #NAME);                                            \
  if (!A.NAME) { std::fprintf(stderr, "missing %s in lib%s\n", #NAME, #LIB); std::exit(2); }
  DS3_CANN_FUNCS(DS3_LOAD)
#undef DS3_LOAD
  standinStats = (const char* (*)())dlsym(libs["ASCENDCL"], "ds3StandinStats");
}

// ---------------------------------------------------------------- output
static std::string esc(const char* s) {
  std::string o;
  for (; s && *s; s++) {
    if (*s == '"' || *s == '\\') { o += '\\'; o += *s; }
    else if (*s == '\n') o += "\\n";
    else if ((unsigned char)*s < 32) o += ' ';
    else o += *s;
  }
  return o;
}
struct J {
  std::string s;
  bool first = true;
  explicit J(const char* name) { s = std::string("{\"case\":\"") + name + "\""; }
  J& num(const char* k, double v) { char b[64]; std::snprintf(b, 64, ",\"%s\":%.17g", k, v); s += b; return *this; }
  J& str(const char* k, const char* v) { s += std::string(",\"") + k + "\":" + (v ? "\"" + esc(v) + "\"" : "null"); return *this; }
  J& arr(const char* k, const std::vector<int64_t>& dims, const std::vector<double>& v) {
    if (first) { s += ",\"arrays\":{"; first = false; } else s += ",";
    s += std::string("\"") + k + "\":{\"dims\":[";
    for (size_t i = 0; i < dims.size(); i++) s += (i ? "," : "") + std::to_string(dims[i]);
    s += "],\"data\":[";
    char b[40];
    for (size_t i = 0; i < v.size(); i++) { std::snprintf(b, 40, "%s%.17g", i ? "," : "", std::isfinite(v[i]) ? v[i] : 1e308); s += b; }
    s += "]}";
    return *this;
  }
  void end() { if (!first) s += "}"; s += "}"; std::printf("%s\n", s.c_str()); std::fflush(stdout); }
};
static const char* lastMsg() { const char* m = A.aclGetRecentErrMsg(); return m; }
static void report(const char* name, int rc, const char* extra = nullptr) {
  J j(name);
  j.num("rc", rc).str("msg", lastMsg());
  if (extra) j.str("extra", extra);
  j.end();
}

// ---------------------------------------------------------------- data helpers (independent of the stand-in)
static uint64_t rng = 0x9E3779B97F4A7C15ull;
static double rnd() {  // uniform [-1, 1)
  rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
  return (double)(rng >> 11) / (double)(1ull << 52) - 1.0;
}
static uint16_t toBf16(float f) {  // round to nearest even
  uint32_t u; std::memcpy(&u, &f, 4);
  uint32_t lsb = (u >> 16) & 1;
  u += 0x7fff + lsb;
  return (uint16_t)(u >> 16);
}
static float fromBf16(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; std::memcpy(&f, &u, 4); return f; }
static size_t esize(aclDataType d) {
  return d == ACL_FLOAT || d == ACL_INT32 ? 4 : d == ACL_INT64 ? 8 : d == ACL_UINT8 || d == ACL_INT8 || d == ACL_BOOL ? 1 : 2;
}
static std::vector<char> encode(aclDataType d, const std::vector<double>& v) {
  std::vector<char> b(v.size() * esize(d));
  for (size_t i = 0; i < v.size(); i++) {
    if (d == ACL_FLOAT) { float f = (float)v[i]; std::memcpy(&b[i * 4], &f, 4); }
    else if (d == ACL_BF16) { uint16_t h = toBf16((float)v[i]); std::memcpy(&b[i * 2], &h, 2); }
    else if (d == ACL_INT32) { int32_t x = (int32_t)v[i]; std::memcpy(&b[i * 4], &x, 4); }
    else if (d == ACL_INT64) { int64_t x = (int64_t)v[i]; std::memcpy(&b[i * 8], &x, 8); }
  }
  return b;
}
static std::vector<double> decode(aclDataType d, const std::vector<char>& b) {
  std::vector<double> v(b.size() / esize(d));
  for (size_t i = 0; i < v.size(); i++) {
    if (d == ACL_FLOAT) { float f; std::memcpy(&f, &b[i * 4], 4); v[i] = f; }
    else if (d == ACL_BF16) { uint16_t h; std::memcpy(&h, &b[i * 2], 2); v[i] = fromBf16(h); }
    else if (d == ACL_INT32) { int32_t x; std::memcpy(&x, &b[i * 4], 4); v[i] = x; }
    else if (d == ACL_INT64) { int64_t x; std::memcpy(&x, &b[i * 8], 8); v[i] = (double)x; }
  }
  return v;
}
static std::vector<double> quant(aclDataType d, std::vector<double> v) { return decode(d, encode(d, v)); }  // values as stored
static std::vector<double> randv(size_t n, double scale = 1.0) { std::vector<double> v(n); for (auto& x : v) x = rnd() * scale; return v; }
static std::vector<int64_t> cstr(const std::vector<int64_t>& d) {
  std::vector<int64_t> s(d.size(), 1);
  for (size_t i = d.size(); i-- > 1;) s[i - 1] = s[i] * d[i];
  return s;
}

struct Buf { void* p = nullptr; size_t bytes = 0; aclDataType dt = ACL_FLOAT; };
static Buf upload(aclDataType d, const std::vector<double>& v) {
  Buf b;
  b.dt = d;
  b.bytes = std::max<size_t>(v.size() * esize(d), 1);
  if (A.aclrtMalloc(&b.p, b.bytes, ACL_MEM_MALLOC_HUGE_FIRST)) { std::fprintf(stderr, "aclrtMalloc failed: %s\n", lastMsg()); std::exit(3); }
  auto e = encode(d, v);
  if (!e.empty() && A.aclrtMemcpy(b.p, b.bytes, e.data(), e.size(), ACL_MEMCPY_HOST_TO_DEVICE)) { std::fprintf(stderr, "H2D failed: %s\n", lastMsg()); std::exit(3); }
  return b;
}
static std::vector<double> download(const Buf& b, size_t n) {
  std::vector<char> h(n * esize(b.dt));
  if (A.aclrtMemcpy(h.data(), h.size(), b.p, h.size(), ACL_MEMCPY_DEVICE_TO_HOST)) { std::fprintf(stderr, "D2H failed: %s\n", lastMsg()); std::exit(3); }
  return decode(b.dt, h);
}
static aclTensor* view(const Buf& b, std::vector<int64_t> dims, std::vector<int64_t> strides = {}, int64_t offset = 0) {
  if (strides.empty()) strides = cstr(dims);
  int64_t n = (int64_t)(b.bytes / esize(b.dt));
  aclTensor* t = A.aclCreateTensor(dims.data(), dims.size(), b.dt, strides.data(), offset, ACL_FORMAT_ND, &n, 1, b.p);
  if (!t) { std::fprintf(stderr, "aclCreateTensor failed: %s\n", lastMsg()); std::exit(3); }
  return t;
}

static aclrtStream S = nullptr;
// run a two-phase op: phase-1 lambda fills ws/ex, phase-2 function pointer
#define RUN2(NAME, ...)                                                                         \
  [&]() -> int {                                                                                \
    uint64_t ws = 0;                                                                            \
    aclOpExecutor* ex = nullptr;                                                                \
    int rc = A.NAME##GetWorkspaceSize(__VA_ARGS__, &ws, &ex);                                   \
    if (rc) return rc;                                                                          \
    void* w = nullptr;                                                                          \
    if (ws && A.aclrtMalloc(&w, ws, ACL_MEM_MALLOC_HUGE_FIRST)) return -1;                      \
    rc = A.NAME(w, ws, ex, S);                                                                  \
    if (!rc) rc = A.aclrtSynchronizeStream(S);                                                  \
    if (w) A.aclrtFree(w);                                                                      \
    return rc;                                                                                  \
  }()

static aclScalar* fscalar(float v) { return A.aclCreateScalar(&v, ACL_FLOAT); }

// ================================================================ misuse cases
static void misuse() {
  // aclInit twice
  report("init_twice", A.aclInit(nullptr));
  // recent error message cleared after reading; null when nothing failed
  {
    const char* m = A.aclGetRecentErrMsg();
    J("errmsg_cleared").str("msg", m).end();
  }
  report("set_device_out_of_range", A.aclrtSetDevice(99));
  // a fresh thread without aclrtSetDevice
  {
    int rc = 0;
    std::string msg;
    std::thread t([&] { void* p; rc = A.aclrtMalloc(&p, 64, ACL_MEM_MALLOC_HUGE_FIRST); const char* m = A.aclGetRecentErrMsg(); msg = m ? m : ""; });
    t.join();
    J("malloc_without_device").num("rc", rc).str("msg", msg.c_str()).end();
  }
  // memcpy misuse
  Buf a = upload(ACL_FLOAT, randv(16));
  std::vector<float> host(16);
  report("memcpy_count_over_destmax", A.aclrtMemcpy(a.p, 32, host.data(), 64, ACL_MEMCPY_HOST_TO_DEVICE));
  report("memcpy_foreign_dst", A.aclrtMemcpy(host.data(), 64, host.data() + 8, 16, ACL_MEMCPY_HOST_TO_DEVICE));
  report("memcpy_past_end", A.aclrtMemcpy((char*)a.p + 32, 64, host.data(), 64, ACL_MEMCPY_HOST_TO_DEVICE));
  report("memcpy_wrong_kind", A.aclrtMemcpy(host.data(), 64, a.p, 64, ACL_MEMCPY_HOST_TO_DEVICE));
  // freed pointer
  Buf f = upload(ACL_FLOAT, randv(16));
  A.aclrtFree(f.p);
  report("memcpy_freed", A.aclrtMemcpy(f.p, 64, host.data(), 64, ACL_MEMCPY_HOST_TO_DEVICE));
  report("double_free", A.aclrtFree(f.p));
  report("free_interior", A.aclrtFree((char*)a.p + 4));
  {
    int64_t d[1] = {16}, st[1] = {1};
    aclTensor* t = A.aclCreateTensor(d, 1, ACL_FLOAT, st, 0, ACL_FORMAT_ND, d, 1, f.p);
    J("tensor_on_freed").num("null", t == nullptr).str("msg", lastMsg()).end();
  }
  // views outside their storage / storage outside the allocation
  {
    int64_t d[2] = {4, 4}, st[2] = {4, 1}, sd[1] = {16};
    aclTensor* t = A.aclCreateTensor(d, 2, ACL_FLOAT, st, 4, ACL_FORMAT_ND, sd, 1, a.p);
    J("view_outside_storage").num("null", t == nullptr).str("msg", lastMsg()).end();
    int64_t big[1] = {1000}, d1[1] = {1000}, s1[1] = {1};
    t = A.aclCreateTensor(d1, 1, ACL_FLOAT, s1, 0, ACL_FORMAT_ND, big, 1, a.p);
    J("storage_outside_allocation").num("null", t == nullptr).str("msg", lastMsg()).end();
    int64_t neg[2] = {4, -1};
    t = A.aclCreateTensor(d, 2, ACL_FLOAT, neg, 0, ACL_FORMAT_ND, sd, 1, a.p);
    J("negative_stride").num("null", t == nullptr).str("msg", lastMsg()).end();
  }
  // a matmul to misuse
  Buf x = upload(ACL_BF16, randv(4 * 8)), w = upload(ACL_BF16, randv(8 * 6)), o = upload(ACL_BF16, std::vector<double>(4 * 6, 0));
  aclTensor *tx = view(x, {4, 8}), *tw = view(w, {8, 6}), *to = view(o, {4, 6});
  {
    uint64_t ws = 0;
    aclOpExecutor* ex = nullptr;
    int rc = A.aclnnMatmulGetWorkspaceSize(tx, tw, to, 0, &ws, &ex);
    void* wp = nullptr;
    A.aclrtMalloc(&wp, ws, ACL_MEM_MALLOC_HUGE_FIRST);
    J("matmul_workspace_size").num("rc", rc).num("ws", (double)ws).end();
    report("workspace_too_small", A.aclnnMatmul(wp, ws - 1, ex, S));
    report("workspace_null", A.aclnnMatmul(nullptr, ws, ex, S));
    report("executor_wrong_op", A.aclnnRmsNorm(wp, ws, ex, S));
    int ok = A.aclnnMatmul(wp, ws, ex, S);
    int sync = A.aclrtSynchronizeStream(S);
    J("executor_first_run").num("rc", ok).num("sync", sync).end();
    report("executor_twice", A.aclnnMatmul(wp, ws, ex, S));
    // the same matmul again with a workspace freed before the stream ran
    A.aclnnMatmulGetWorkspaceSize(tx, tw, to, 0, &ws, &ex);
    A.aclnnMatmul(wp, ws, ex, S);
    A.aclrtFree(wp);
    report("workspace_freed_while_queued", A.aclrtSynchronizeStream(S));
    // a synchronous copy of memory a queued task writes
    A.aclrtMalloc(&wp, ws, ACL_MEM_MALLOC_HUGE_FIRST);
    A.aclnnMatmulGetWorkspaceSize(tx, tw, to, 0, &ws, &ex);
    A.aclnnMatmul(wp, ws, ex, S);
    std::vector<uint16_t> hb(24);
    report("memcpy_races_queued_task", A.aclrtMemcpy(hb.data(), 48, o.p, 48, ACL_MEMCPY_DEVICE_TO_HOST));
    J("sync_after_race").num("rc", A.aclrtSynchronizeStream(S)).end();
    A.aclrtFree(wp);
  }
  // shape and dtype mismatches
  {
    uint64_t ws;
    aclOpExecutor* ex;
    aclTensor* tw2 = view(w, {6, 8});
    report("matmul_inner_mismatch", A.aclnnMatmulGetWorkspaceSize(tx, tw2, to, 0, &ws, &ex));
    Buf ff = upload(ACL_FLOAT, randv(4 * 8));
    aclTensor* tf = view(ff, {4, 8});
    aclScalar* one = fscalar(1.f);
    Buf ob = upload(ACL_BF16, std::vector<double>(32, 0));
    aclTensor* tob = view(ob, {4, 8});
    report("add_dtype_mismatch", A.aclnnAddGetWorkspaceSize(tx, tf, one, tob, &ws, &ex));
    report("null_required_tensor", A.aclnnAddGetWorkspaceSize(tx, nullptr, one, tob, &ws, &ex));
    Buf o2 = upload(ACL_BF16, std::vector<double>(30, 0));
    aclTensor* to2 = view(o2, {5, 6});
    report("matmul_out_shape", A.aclnnMatmulGetWorkspaceSize(tx, tw, to2, 0, &ws, &ex));
    // destroyed tensor
    aclTensor* td = view(ff, {4, 8});
    A.aclDestroyTensor(td);
    report("destroyed_tensor_used", A.aclnnAddGetWorkspaceSize(tx, td, one, tob, &ws, &ex));
    report("destroy_tensor_twice", A.aclDestroyTensor(td));
    // tensor list: destroying the list destroys its tensors (aclDestroyTensorList's documented constraint)
    aclTensor* l1 = view(ff, {4, 8});
    const aclTensor* items[1] = {l1};
    aclTensorList* tl = A.aclCreateTensorList(items, 1);
    report("destroy_listed_tensor_first", A.aclDestroyTensor(l1));
    int r1 = A.aclDestroyTensorList(tl);
    J("destroy_list").num("rc", r1).end();
    report("destroy_tensor_after_list", A.aclDestroyTensor(l1));
  }
  // run-time index checks surface at synchronize
  {
    Buf wt = upload(ACL_BF16, randv(10 * 4)), ix = upload(ACL_INT64, {1, 12, 3}), eo = upload(ACL_BF16, std::vector<double>(12, 0));
    report("embedding_index_out_of_range", RUN2(aclnnEmbedding, view(wt, {10, 4}), view(ix, {3}), view(eo, {3, 4})));
  }
  // MoeInitRoutingV2's count output is INT32 by the operator's definition
  {
    Buf xx = upload(ACL_BF16, randv(4 * 8)), ei = upload(ACL_INT32, {0, 1, 1, 2, 0, 2, 1, 0}), ex = upload(ACL_BF16, std::vector<double>(64, 0));
    Buf ri = upload(ACL_INT32, std::vector<double>(8, 0)), c64 = upload(ACL_INT64, std::vector<double>(3, 0));
    uint64_t ws;
    aclOpExecutor* e;
    report("init_routing_int64_counts", A.aclnnMoeInitRoutingV2GetWorkspaceSize(view(xx, {4, 8}), view(ei, {4, 2}), 8, 0, 3, 0, 1, false, view(ex, {8, 8}),
                                                                                view(ri, {8}), view(c64, {3}), nullptr, &ws, &e));
  }
  // GroupedMatmul group list that is not a cumsum
  {
    Buf xx = upload(ACL_BF16, randv(6 * 4)), ww = upload(ACL_BF16, randv(2 * 4 * 3)), gl = upload(ACL_INT64, {4, 2}), oo = upload(ACL_BF16, std::vector<double>(18, 0));
    const aclTensor* xl[1] = {view(xx, {6, 4})};
    const aclTensor* wl[1] = {view(ww, {2, 4, 3})};
    aclTensor* ol[1] = {view(oo, {6, 3})};
    aclTensorList *X = A.aclCreateTensorList(xl, 1), *W = A.aclCreateTensorList(wl, 1), *O = A.aclCreateTensorList((const aclTensor* const*)ol, 1);
    report("gmm_group_list_not_cumsum", RUN2(aclnnGroupedMatmulV4, X, W, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, view(gl, {2}), nullptr, nullptr,
                                             nullptr, 3, 0, 0, 0, O, nullptr, nullptr));
  }
  // stream destroyed with queued work
  {
    aclrtStream s2;
    A.aclrtCreateStream(&s2);
    A.aclrtMemset(o.p, 48, 0, 48);
    uint64_t ws;
    aclOpExecutor* ex;
    void* wp;
    A.aclnnMatmulGetWorkspaceSize(tx, tw, to, 0, &ws, &ex);
    A.aclrtMalloc(&wp, ws, ACL_MEM_MALLOC_HUGE_FIRST);
    A.aclnnMatmul(wp, ws, ex, s2);
    report("destroy_stream_with_queued_tasks", A.aclrtDestroyStream(s2));
    A.aclrtFree(wp);
  }
}

// ================================================================ HCCL (ranks are threads)
static void hccl() {
  HcclRootInfo root;
  int rc = A.HcclGetRootInfo(&root);
  J("hccl_root_info").num("rc", rc).end();
  // two ranks on devices 0 and 1: all-reduce (FP32 and BF16) and all-gather
  std::vector<std::vector<double>> sendF(2), sendB(2), gotF(2), gotB(2), gotG(2);
  std::vector<int> rcs(2, -1);
  std::vector<std::string> msgs(2);
  for (int r = 0; r < 2; r++) { sendF[r] = randv(10); sendB[r] = quant(ACL_BF16, randv(10)); }
  auto rank = [&](int r) {
    A.aclrtSetDevice(r);
    aclrtStream s;
    A.aclrtCreateStream(&s);
    HcclComm comm;
    int e = A.HcclCommInitRootInfo(2, &root, r, &comm);
    if (e) { rcs[r] = e; const char* m = A.aclGetRecentErrMsg(); msgs[r] = m ? m : ""; return; }
    Buf sf = upload(ACL_FLOAT, sendF[r]), rf = upload(ACL_FLOAT, std::vector<double>(10, 0));
    Buf sb = upload(ACL_BF16, sendB[r]), rb = upload(ACL_BF16, std::vector<double>(10, 0));
    Buf rg = upload(ACL_FLOAT, std::vector<double>(20, 0));
    e = A.HcclAllReduce(sf.p, rf.p, 10, HCCL_DATA_TYPE_FP32, HCCL_REDUCE_SUM, comm, s);
    if (!e) e = A.HcclAllReduce(sb.p, rb.p, 10, HCCL_DATA_TYPE_BFP16, HCCL_REDUCE_SUM, comm, s);
    if (!e) e = A.HcclAllGather(sf.p, rg.p, 10, HCCL_DATA_TYPE_FP32, comm, s);
    if (!e) e = A.aclrtSynchronizeStream(s);
    rcs[r] = e;
    if (!e) { gotF[r] = download(rf, 10); gotB[r] = download(rb, 10); gotG[r] = download(rg, 20); }
    A.HcclCommDestroy(comm);
    A.aclrtDestroyStream(s);
  };
  std::thread t0(rank, 0), t1(rank, 1);
  t0.join();
  t1.join();
  J("hccl_collectives").num("rc0", rcs[0]).num("rc1", rcs[1]).arr("sendF0", {10}, sendF[0]).arr("sendF1", {10}, sendF[1])
      .arr("sendB0", {10}, sendB[0]).arr("sendB1", {10}, sendB[1]).arr("sumF0", {10}, gotF[0]).arr("sumF1", {10}, gotF[1])
      .arr("sumB0", {10}, gotB[0]).arr("gather0", {20}, gotG[0]).arr("gather1", {20}, gotG[1]).end();

  // wrong root info
  {
    HcclRootInfo bad;
    std::memset(&bad, 7, sizeof bad);
    HcclComm c;
    report("hccl_wrong_root_info", A.HcclCommInitRootInfo(2, &bad, 0, &c));
  }
  // ranks 0 and 1 (rank 1 50 ms later) join one communicator on devices dev[r], each saying world size n[r]:
  // each one's return code and error message
  auto joinPair = [&](const char* name, const int dev[2], const uint32_t n[2]) {
    HcclRootInfo ri;
    A.HcclGetRootInfo(&ri);
    std::vector<int> r2(2);
    std::vector<std::string> m2(2);
    auto join = [&](int r) {
      A.aclrtSetDevice(dev[r]);
      HcclComm c;
      r2[r] = A.HcclCommInitRootInfo(n[r], &ri, r, &c);
      const char* m = A.aclGetRecentErrMsg();
      m2[r] = m ? m : "";
    };
    std::thread a(join, 0);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    std::thread b(join, 1);
    a.join();
    b.join();
    J(name).num("rc0", r2[0]).str("msg0", m2[0].c_str()).num("rc1", r2[1]).str("msg1", m2[1].c_str()).end();
  };
  {
    const int dev[2] = {0, 1};
    const uint32_t n[2] = {2, 3};
    joinPair("hccl_world_mismatch", dev, n);  // world size mismatch: rank 0 says 2, rank 1 says 3
  }
  {
    const int dev[2] = {0, 0};
    const uint32_t n[2] = {2, 2};
    joinPair("hccl_same_device", dev, n);  // two ranks on one device
  }
  // collective mismatch: rank 0 all-reduces 8 elements, rank 1 all-reduces 4
  {
    HcclRootInfo ri;
    A.HcclGetRootInfo(&ri);
    std::vector<int> r2(2);
    std::vector<std::string> m2(2);
    auto go = [&](int r) {
      A.aclrtSetDevice(r);
      aclrtStream s;
      A.aclrtCreateStream(&s);
      HcclComm c;
      A.HcclCommInitRootInfo(2, &ri, r, &c);
      Buf b = upload(ACL_FLOAT, randv(8));
      int e = A.HcclAllReduce(b.p, b.p, r == 0 ? 8 : 4, HCCL_DATA_TYPE_FP32, HCCL_REDUCE_SUM, c, s);
      if (!e) e = A.aclrtSynchronizeStream(s);
      r2[r] = e;
      const char* m = A.aclGetRecentErrMsg();
      m2[r] = m ? m : "";
      A.HcclCommDestroy(c);
      A.aclrtDestroyStream(s);
    };
    std::thread a(go, 0), b(go, 1);
    a.join();
    b.join();
    J("hccl_collective_mismatch").num("rc0", r2[0]).str("msg0", m2[0].c_str()).num("rc1", r2[1]).str("msg1", m2[1].c_str()).end();
  }
  // a rank that never joins the collective: the other times out (DS3_STANDIN_HCCL_TIMEOUT_MS)
  {
    HcclRootInfo ri;
    A.HcclGetRootInfo(&ri);
    int r0 = 0;
    std::string m0;
    auto go = [&](int r) {
      A.aclrtSetDevice(r);
      aclrtStream s;
      A.aclrtCreateStream(&s);
      HcclComm c;
      A.HcclCommInitRootInfo(2, &ri, r, &c);
      if (r == 0) {
        Buf b = upload(ACL_FLOAT, randv(8));
        A.HcclAllReduce(b.p, b.p, 8, HCCL_DATA_TYPE_FP32, HCCL_REDUCE_SUM, c, s);
        r0 = A.aclrtSynchronizeStream(s);
        const char* m = A.aclGetRecentErrMsg();
        m0 = m ? m : "";
      }
      A.aclrtDestroyStream(s);
    };
    std::thread a(go, 0), b(go, 1);
    a.join();
    b.join();
    J("hccl_collective_timeout").num("rc", r0).str("msg", m0.c_str()).end();
  }
  J("hccl_error_string").str("msg", A.HcclGetErrorString((HcclResult)1)).end();
}

// ================================================================ operators vs float64 (reference in the test)
static void ops() {
  // matmul (a): [T, K] x transposed weight view [K, N] (strides (1, K)), BF16
  {
    int64_t T = 5, K = 48, N = 24;
    auto a = quant(ACL_BF16, randv(T * K)), w = quant(ACL_BF16, randv(N * K));  // weight row-major [N, K]
    Buf ba = upload(ACL_BF16, a), bw = upload(ACL_BF16, w), bo = upload(ACL_BF16, std::vector<double>(T * N, 0));
    int rc = RUN2(aclnnMatmul, view(ba, {T, K}), view(bw, {K, N}, {1, K}), view(bo, {T, N}), 0);
    J("op_matmul_bf16_wt").num("rc", rc).arr("a", {T, K}, a).arr("w_nk", {N, K}, w).arr("out", {T, N}, download(bo, T * N)).end();
  }
  // matmul (b): [H, M, K] x [K, N] broadcast, FLOAT, KEEP_DTYPE; self is a head-major view of token-major data
  {
    int64_t H = 3, M = 4, K = 8, N = 5;
    auto a = quant(ACL_FLOAT, randv(M * H * K)), w = quant(ACL_FLOAT, randv(K * N));  // a stored [M, H, K]
    Buf ba = upload(ACL_FLOAT, a), bw = upload(ACL_FLOAT, w), bo = upload(ACL_FLOAT, std::vector<double>(H * M * N, 0));
    int rc = RUN2(aclnnMatmul, view(ba, {H, M, K}, {K, H * K, 1}), view(bw, {K, N}), view(bo, {H, M, N}), 0);
    J("op_matmul_f32_bcast").num("rc", rc).arr("a_mhk", {M, H, K}, a).arr("w", {K, N}, w).arr("out", {H, M, N}, download(bo, H * M * N)).end();
  }
  // batch matmul with strided views on both sides, BF16
  {
    int64_t B = 2, M = 3, K = 16, N = 4;
    auto a = quant(ACL_BF16, randv(M * B * K)), w = quant(ACL_BF16, randv(B * N * K));  // a [M, B, K]; w [B, N, K]
    Buf ba = upload(ACL_BF16, a), bw = upload(ACL_BF16, w), bo = upload(ACL_BF16, std::vector<double>(B * M * N, 0));
    int rc = RUN2(aclnnBatchMatMul, view(ba, {B, M, K}, {K, B * K, 1}), view(bw, {B, K, N}, {N * K, 1, K}), view(bo, {B, M, N}), 0);
    J("op_bmm_bf16_strided").num("rc", rc).arr("a_mbk", {M, B, K}, a).arr("w_bnk", {B, N, K}, w).arr("out", {B, M, N}, download(bo, B * M * N)).end();
  }
  // rms norm on a strided view (rows 40 apart, 32 used), BF16 + f32 rstd
  {
    int64_t T = 4, D = 32, ld = 40;
    auto x = quant(ACL_BF16, randv(T * ld, 3.0)), g = quant(ACL_BF16, randv(D));
    Buf bx = upload(ACL_BF16, x), bg = upload(ACL_BF16, g), by = upload(ACL_BF16, std::vector<double>(T * D, 0)), br = upload(ACL_FLOAT, std::vector<double>(T, 0));
    int rc = RUN2(aclnnRmsNorm, view(bx, {T, D}, {ld, 1}, 4), view(bg, {D}), 1e-6, view(by, {T, D}), view(br, {T, 1}));
    J("op_rmsnorm_bf16_strided").num("rc", rc).num("ld", (double)ld).num("offset", 4).num("eps", 1e-6).arr("x", {T, ld}, x).arr("g", {D}, g)
        .arr("y", {T, D}, download(by, T * D)).arr("rstd", {T, 1}, download(br, T)).end();
  }
  // MLA decode through FusedInferAttentionScoreV3: paged latent cache, D 512 + rope 64, BF16
  {
    int64_t B = 3, H = 2, D = 512, Dr = 64, bs = 4, nb = 8, maxB = 2;
    std::vector<double> lens = {3, 7, 1}, table = {5, 1, 2, 7, 0, 3};  // [B, maxB]
    auto q = quant(ACL_BF16, randv(B * H * D)), qr = quant(ACL_BF16, randv(B * H * Dr));
    auto kc = quant(ACL_BF16, randv(nb * bs * D)), kr = quant(ACL_BF16, randv(nb * bs * Dr));
    Buf bq = upload(ACL_BF16, q), bqr = upload(ACL_BF16, qr), bk = upload(ACL_BF16, kc), bkr = upload(ACL_BF16, kr), bt = upload(ACL_INT32, table);
    Buf bo = upload(ACL_BF16, std::vector<double>(B * H * D, 0));
    const aclTensor* kl[1] = {view(bk, {nb, bs, D})};
    const aclTensor* vl[1] = {view(bk, {nb, bs, D})};
    aclTensorList *K = A.aclCreateTensorList(kl, 1), *V = A.aclCreateTensorList(vl, 1);
    int64_t lv[3] = {3, 7, 1};
    aclIntArray* kvl = A.aclCreateIntArray(lv, 3);
    double scale = 0.0417;
    char layout[] = "BSND";
    int rc = RUN2(aclnnFusedInferAttentionScoreV3, view(bq, {B, 1, H, D}), K, V, nullptr, nullptr, nullptr, kvl, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                  nullptr, view(bt, {B, maxB}), nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, view(bqr, {B, 1, H, Dr}),
                  view(bkr, {nb, bs, Dr}), nullptr, H, scale, 2147483647, 2147483647, layout, 1, 0, 0, bs, 0, false, 0, 0, view(bo, {B, 1, H, D}), nullptr);
    J("op_fia_mla_decode").num("rc", rc).num("scale", scale).num("bs", (double)bs).arr("lens", {B}, lens).arr("table", {B, maxB}, table)
        .arr("q", {B, H, D}, q).arr("qr", {B, H, Dr}, qr).arr("kc", {nb, bs, D}, kc).arr("kr", {nb, bs, Dr}, kr).arr("out", {B, H, D}, download(bo, B * H * D)).end();
    // misuse: a sparse mode the stand-in does not implement, and a length past the block table
    uint64_t ws;
    aclOpExecutor* ex;
    int64_t lbad[3] = {3, 9, 1};
    aclIntArray* kvbad = A.aclCreateIntArray(lbad, 3);
    report("fia_len_past_block_table",
           A.aclnnFusedInferAttentionScoreV3GetWorkspaceSize(view(bq, {B, 1, H, D}), K, V, nullptr, nullptr, nullptr, kvbad, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                                             nullptr, view(bt, {B, maxB}), nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                                             view(bqr, {B, 1, H, Dr}), view(bkr, {nb, bs, Dr}), nullptr, H, scale, 2147483647, 2147483647, layout, 1, 0, 0,
                                                             bs, 0, false, 0, 0, view(bo, {B, 1, H, D}), nullptr, &ws, &ex));
    report("fia_sparse_mode_unsupported",
           A.aclnnFusedInferAttentionScoreV3GetWorkspaceSize(view(bq, {B, 1, H, D}), K, V, nullptr, nullptr, nullptr, kvl, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                                             nullptr, view(bt, {B, maxB}), nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                                             view(bqr, {B, 1, H, Dr}), view(bkr, {nb, bs, Dr}), nullptr, H, scale, 2147483647, 0, layout, 1, 4, 0,
                                                             bs, 0, false, 0, 0, view(bo, {B, 1, H, D}), nullptr, &ws, &ex));
  }
  // FIA causal prefill, BSND without paging: sparseMode 3 (rightDownCausal) and 2 (leftUpCausal) with the 2048x2048 mask
  {
    int64_t B = 2, S_ = 3, N = 2, Nkv = 1, Skv = 5, D = 16;
    auto q = quant(ACL_BF16, randv(B * S_ * N * D)), k = quant(ACL_BF16, randv(B * Skv * Nkv * D)), v = quant(ACL_BF16, randv(B * Skv * Nkv * D));
    Buf bq = upload(ACL_BF16, q), bk = upload(ACL_BF16, k), bv = upload(ACL_BF16, v);
    std::vector<uint8_t> causal(2048 * 2048), inverted(2048 * 2048);
    for (int64_t i = 0; i < 2048; i++)
      for (int64_t j = 0; j < 2048; j++) { causal[i * 2048 + j] = j > i; inverted[i * 2048 + j] = j <= i; }
    Buf mk, bad;
    mk.dt = bad.dt = ACL_UINT8;
    mk.bytes = bad.bytes = causal.size();
    A.aclrtMalloc(&mk.p, mk.bytes, ACL_MEM_MALLOC_HUGE_FIRST);
    A.aclrtMalloc(&bad.p, bad.bytes, ACL_MEM_MALLOC_HUGE_FIRST);
    A.aclrtMemcpy(mk.p, mk.bytes, causal.data(), causal.size(), ACL_MEMCPY_HOST_TO_DEVICE);
    A.aclrtMemcpy(bad.p, bad.bytes, inverted.data(), inverted.size(), ACL_MEMCPY_HOST_TO_DEVICE);
    int64_t lv[2] = {5, 4};
    char layout[] = "BSND";
    auto fia = [&](int64_t mode, const Buf* maskBuf, Buf& out) {
      const aclTensor* kl[1] = {view(bk, {B, Skv, Nkv, D})};
      const aclTensor* vl[1] = {view(bv, {B, Skv, Nkv, D})};
      aclTensorList *K = A.aclCreateTensorList(kl, 1), *V = A.aclCreateTensorList(vl, 1);
      aclTensor* m = maskBuf ? view(*maskBuf, {2048, 2048}) : nullptr;
      return RUN2(aclnnFusedInferAttentionScoreV3, view(bq, {B, S_, N, D}), K, V, nullptr, m, nullptr, A.aclCreateIntArray(lv, 2), nullptr, nullptr, nullptr, nullptr, nullptr,
                  nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, N, 0.3, 2147483647, 0,
                  layout, Nkv, mode, 0, 0, 0, false, 0, 0, view(out, {B, S_, N, D}), nullptr);
    };
    Buf o3 = upload(ACL_BF16, std::vector<double>(B * S_ * N * D, 0)), o2 = upload(ACL_BF16, std::vector<double>(B * S_ * N * D, 0));
    int rc3 = fia(3, &mk, o3), rc2 = fia(2, &mk, o2);
    J("op_fia_causal").num("rc3", rc3).num("rc2", rc2).num("scale", 0.3).arr("lens", {B}, {5, 4}).arr("q", {B, S_, N, D}, q).arr("k", {B, Skv, Nkv, D}, k)
        .arr("v", {B, Skv, Nkv, D}, v).arr("out3", {B, S_, N, D}, download(o3, B * S_ * N * D)).arr("out2", {B, S_, N, D}, download(o2, B * S_ * N * D)).end();
    report("fia_mask_inverted", fia(3, &bad, o3));
    report("fia_mask_missing", fia(3, nullptr, o3));
  }
  // FIA, BNSD without paging, GQA (4 heads over 2 KV heads), prefill shape S 2, BF16
  {
    int64_t B = 2, N = 4, Nkv = 2, S_ = 2, Skv = 5, D = 16;
    auto q = quant(ACL_BF16, randv(B * N * S_ * D)), k = quant(ACL_BF16, randv(B * Nkv * Skv * D)), v = quant(ACL_BF16, randv(B * Nkv * Skv * D));
    Buf bq = upload(ACL_BF16, q), bk = upload(ACL_BF16, k), bv = upload(ACL_BF16, v), bo = upload(ACL_BF16, std::vector<double>(B * N * S_ * D, 0));
    const aclTensor* kl[1] = {view(bk, {B, Nkv, Skv, D})};
    const aclTensor* vl[1] = {view(bv, {B, Nkv, Skv, D})};
    aclTensorList *K = A.aclCreateTensorList(kl, 1), *V = A.aclCreateTensorList(vl, 1);
    int64_t lv[2] = {5, 3};
    aclIntArray* kvl = A.aclCreateIntArray(lv, 2);
    char layout[] = "BNSD";
    int rc = RUN2(aclnnFusedInferAttentionScoreV3, view(bq, {B, N, S_, D}), K, V, nullptr, nullptr, nullptr, kvl, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                  nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, N, 0.25, 2147483647,
                  2147483647, layout, Nkv, 0, 0, 0, 0, false, 0, 0, view(bo, {B, N, S_, D}), nullptr);
    J("op_fia_bnsd_gqa").num("rc", rc).num("scale", 0.25).arr("lens", {B}, {5, 3}).arr("q", {B, N, S_, D}, q).arr("k", {B, Nkv, Skv, D}, k).arr("v", {B, Nkv, Skv, D}, v)
        .arr("out", {B, N, S_, D}, download(bo, B * N * S_ * D)).end();
  }
  // MoeGatingTopK: DeepSeek-V3's shape (256 experts, 8 groups, top-4 groups, top-8), FLOAT
  {
    int64_t T = 3, E = 256, k = 8;
    auto x = randv(T * E, 4.0), b = randv(E, 0.5);
    Buf bx = upload(ACL_FLOAT, x), bb = upload(ACL_FLOAT, b), by = upload(ACL_FLOAT, std::vector<double>(T * k, 0)), bi = upload(ACL_INT32, std::vector<double>(T * k, 0));
    Buf bo = upload(ACL_FLOAT, std::vector<double>(T * E, 0));
    int rc = RUN2(aclnnMoeGatingTopK, view(bx, {T, E}), view(bb, {E}), k, 4, 8, 1, 0, 1, true, 2.5, 1e-20, view(by, {T, k}), view(bi, {T, k}), view(bo, {T, E}));
    J("op_gating_topk").num("rc", rc).num("k", (double)k).num("kGroup", 4).num("groups", 8).num("rsf", 2.5).arr("x", {T, E}, x).arr("bias", {E}, b)
        .arr("y", {T, k}, download(by, T * k)).arr("idx", {T, k}, download(bi, T * k)).arr("norm", {T, E}, download(bo, T * E)).end();
    uint64_t ws;
    aclOpExecutor* ex;
    report("gating_renorm_unsupported", A.aclnnMoeGatingTopKGetWorkspaceSize(view(bx, {T, E}), view(bb, {E}), k, 4, 8, 1, 1, 1, false, 2.5, 1e-20, view(by, {T, k}), view(bi, {T, k}),
                                                                             view(bo, {T, E}), &ws, &ex));
  }
  // MoeInitRoutingV2 (dropless, cumsum) -> GroupedMatmulV4 (cumsum group list, transposed weight view) -> MoeFinalizeRoutingV2 (row order)
  {
    int64_t T = 6, k = 3, E = 4, D = 8, N = 5;  // expert ids in [0, E]; E is the "not on this rank" sentinel
    std::vector<double> ei(T * k);
    for (auto& v : ei) v = (double)(int)((rnd() + 1) * 2.5);  // 0..4
    auto x = quant(ACL_BF16, randv(T * D));
    Buf bx = upload(ACL_BF16, x), be = upload(ACL_INT32, ei), bex = upload(ACL_BF16, std::vector<double>(T * k * D, 0)), bri = upload(ACL_INT32, std::vector<double>(T * k, 0));
    Buf bc = upload(ACL_INT32, std::vector<double>(E + 1, 0));
    int rc = RUN2(aclnnMoeInitRoutingV2, view(bx, {T, D}), view(be, {T, k}), T * k, 0, E + 1, 0, 1, false, view(bex, {T * k, D}), view(bri, {T * k}), view(bc, {E + 1}), nullptr);
    auto exx = download(bex, T * k * D), ri = download(bri, T * k), cum = download(bc, E + 1);
    Buf bc2 = upload(ACL_INT32, std::vector<double>(E + 1, 0)), bex2 = upload(ACL_BF16, std::vector<double>(T * k * D, 0)), bri2 = upload(ACL_INT32, std::vector<double>(T * k, 0));
    int rc2 = RUN2(aclnnMoeInitRoutingV2, view(bx, {T, D}), view(be, {T, k}), 0, 0, E + 1, 0, 2, false, view(bex2, {T * k, D}), view(bri2, {T * k}), view(bc2, {E + 1}), nullptr);
    J("op_init_routing_counts").num("rc", rc2).arr("counts", {E + 1}, download(bc2, E + 1)).arr("rowIdx", {T * k}, download(bri2, T * k)).end();
    J("op_init_routing").num("rc", rc).num("k", (double)k).arr("x", {T, D}, x).arr("expertIdx", {T, k}, ei).arr("expandedX", {T * k, D}, exx).arr("rowIdx", {T * k}, ri)
        .arr("cumsum", {E + 1}, cum).end();
    // grouped matmul over the first E groups; weight stored [E, N, D] viewed as [E, D, N]
    auto w = quant(ACL_BF16, randv(E * N * D));
    std::vector<double> cum64(cum.begin(), cum.begin() + E);
    Buf bw = upload(ACL_BF16, w), bg = upload(ACL_INT64, cum64), bgo = upload(ACL_BF16, std::vector<double>(T * k * N, 7.0));  // 7 marks untouched rows
    const aclTensor* xl[1] = {view(bex, {T * k, D})};
    const aclTensor* wl[1] = {view(bw, {E, D, N}, {N * D, 1, D})};
    aclTensor* ol[1] = {view(bgo, {T * k, N})};
    aclTensorList *X = A.aclCreateTensorList(xl, 1), *W = A.aclCreateTensorList(wl, 1), *O = A.aclCreateTensorList((const aclTensor* const*)ol, 1);
    rc = RUN2(aclnnGroupedMatmulV4, X, W, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, view(bg, {E}), nullptr, nullptr, nullptr, 3, 0, 0, 0, O, nullptr, nullptr);
    auto gout = download(bgo, T * k * N);
    J("op_grouped_matmul").num("rc", rc).arr("x", {T * k, D}, exx).arr("w_end", {E, N, D}, w).arr("groupList", {E}, cum64).arr("out", {T * k, N}, gout).end();
    // the same with counts (groupListType 1)
    std::vector<double> counts(E);
    for (int64_t i = 0; i < E; i++) counts[i] = cum64[i] - (i ? cum64[i - 1] : 0);
    Buf bg2 = upload(ACL_INT64, counts), bgo2 = upload(ACL_BF16, std::vector<double>(T * k * N, 7.0));
    aclTensor* ol2[1] = {view(bgo2, {T * k, N})};
    const aclTensor* xl2[1] = {view(bex, {T * k, D})};
    const aclTensor* wl2[1] = {view(bw, {E, D, N}, {N * D, 1, D})};
    aclTensorList *X2 = A.aclCreateTensorList(xl2, 1), *W2 = A.aclCreateTensorList(wl2, 1), *O2 = A.aclCreateTensorList((const aclTensor* const*)ol2, 1);
    rc = RUN2(aclnnGroupedMatmulV4, X2, W2, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, view(bg2, {E}), nullptr, nullptr, nullptr, 3, 0, 1, 0, O2, nullptr, nullptr);
    J("op_grouped_matmul_counts").num("rc", rc).arr("out", {T * k, N}, download(bgo2, T * k * N)).end();
    // finalize: out[t] = sum_j scales[t][j] * y[rowIdx[t*k + j]] (dropPadMode 2, row order), and dropPadMode 0 + x1 + bias for the column order
    auto sc = quant(ACL_BF16, randv(T * k));
    Buf bs = upload(ACL_BF16, sc), bfo = upload(ACL_BF16, std::vector<double>(T * N, 0));
    std::vector<double> eiClamped = ei;
    for (auto& v : eiClamped) v = std::min<double>(v, E - 1);
    Buf be2 = upload(ACL_INT32, eiClamped);
    rc = RUN2(aclnnMoeFinalizeRoutingV2, view(bgo, {T * k, N}), view(bri, {T * k}), nullptr, nullptr, nullptr, view(bs, {T, k}), view(be2, {T, k}), 2, view(bfo, {T, N}));
    J("op_finalize_row").num("rc", rc).arr("y", {T * k, N}, gout).arr("rowIdx", {T * k}, ri).arr("scales", {T, k}, sc).arr("out", {T, N}, download(bfo, T * N)).end();
    auto x1 = quant(ACL_BF16, randv(T * N)), bias = quant(ACL_BF16, randv(E * N));
    std::vector<double> colIdx(T * k);  // a column-order permutation
    for (int64_t i = 0; i < T * k; i++) colIdx[i] = (double)((i * 7 + 3) % (T * k));
    Buf b1 = upload(ACL_BF16, x1), bb = upload(ACL_BF16, bias), bci = upload(ACL_INT32, colIdx), bfo2 = upload(ACL_BF16, std::vector<double>(T * N, 0));
    rc = RUN2(aclnnMoeFinalizeRoutingV2, view(bgo, {T * k, N}), view(bci, {T * k}), view(b1, {T, N}), nullptr, view(bb, {E, N}), view(bs, {T, k}), view(be2, {T, k}), 0,
              view(bfo2, {T, N}));
    J("op_finalize_col").num("rc", rc).arr("y", {T * k, N}, gout).arr("rowIdx", {T * k}, colIdx).arr("scales", {T, k}, sc).arr("x1", {T, N}, x1).arr("bias", {E, N}, bias)
        .arr("expertIdx", {T, k}, eiClamped).arr("out", {T, N}, download(bfo2, T * N)).end();
  }
  // smaller operators
  {
    // add with broadcast [3,1] onto [3,4] and alpha -1, BF16
    auto a = quant(ACL_BF16, randv(12)), b = quant(ACL_BF16, randv(3));
    Buf ba = upload(ACL_BF16, a), bb = upload(ACL_BF16, b), bo = upload(ACL_BF16, std::vector<double>(12, 0));
    aclScalar* al = fscalar(-1.f);
    int rc = RUN2(aclnnAdd, view(ba, {3, 4}), view(bb, {3, 1}), al, view(bo, {3, 4}));
    J("op_add_bcast").num("rc", rc).arr("a", {3, 4}, a).arr("b", {3, 1}, b).arr("out", {3, 4}, download(bo, 12)).end();
    // BF16 rounding of writes: cast f32 -> bf16 of values on and next to rounding ties
    std::vector<double> ties = {1.0 + 1.0 / 256, 1.0 + 3.0 / 256, 1.0 + 1.0 / 256 + 1e-6, -(1.0 + 1.0 / 256), 3.1415926, 65504.5, 1e-30};
    Buf bt = upload(ACL_FLOAT, ties), bc = upload(ACL_BF16, std::vector<double>(ties.size(), 0));
    rc = RUN2(aclnnCast, view(bt, {(int64_t)ties.size()}), ACL_BF16, view(bc, {(int64_t)ties.size()}));
    std::vector<double> tiesF = quant(ACL_FLOAT, ties);
    J("op_cast_bf16").num("rc", rc).arr("in", {(int64_t)ties.size()}, tiesF).arr("out", {(int64_t)ties.size()}, download(bc, ties.size())).end();
    // softmax along the last dim with -inf entries, [2, 5] FLOAT
    std::vector<double> sm = {0.5, -INFINITY, 2.0, 1.0, -1.0, 3.0, 3.0, -INFINITY, -INFINITY, 0.0};
    Buf bsm = upload(ACL_FLOAT, sm), bso = upload(ACL_FLOAT, std::vector<double>(10, 0));
    rc = RUN2(aclnnSoftmax, view(bsm, {2, 5}), -1, view(bso, {2, 5}));
    J("op_softmax").num("rc", rc).arr("out", {2, 5}, download(bso, 10)).end();
    // topk with ties (lower index first), [2, 6] -> k 3, FLOAT
    std::vector<double> tk = {1, 5, 5, 2, 5, 0, -1, -2, -1, -3, 0, 0};
    Buf btk = upload(ACL_FLOAT, tk), btv = upload(ACL_FLOAT, std::vector<double>(6, 0)), bti = upload(ACL_INT64, std::vector<double>(6, 0));
    rc = RUN2(aclnnTopk, view(btk, {2, 6}), 3, -1, true, true, view(btv, {2, 3}), view(bti, {2, 3}));
    J("op_topk_ties").num("rc", rc).arr("values", {2, 3}, download(btv, 6)).arr("indices", {2, 3}, download(bti, 6)).end();
    // index copy into a strided view (every other row of an [8, 3] buffer), then index select back
    Buf plane = upload(ACL_BF16, std::vector<double>(8 * 3, 0)), src = upload(ACL_BF16, {1, 2, 3, 4, 5, 6}), idx = upload(ACL_INT64, {3, 0});
    rc = RUN2(aclnnInplaceIndexCopy, view(plane, {4, 3}, {6, 1}), 0, view(idx, {2}), view(src, {2, 3}));
    J("op_index_copy_strided").num("rc", rc).arr("plane", {8, 3}, download(plane, 24)).end();
    Buf dup = upload(ACL_INT64, {1, 1});
    report("index_copy_duplicate_index", RUN2(aclnnInplaceIndexCopy, view(plane, {4, 3}, {6, 1}), 0, view(dup, {2}), view(src, {2, 3})));
    // cat of two column blocks, one strided
    Buf c1 = upload(ACL_FLOAT, {1, 2, 3, 4, 5, 6}), c2 = upload(ACL_FLOAT, {7, 8, 9, 10, 11, 12}), co = upload(ACL_FLOAT, std::vector<double>(10, 0));
    const aclTensor* cl[2] = {view(c1, {2, 3}), view(c2, {2, 2}, {3, 1}, 1)};
    aclTensorList* L = A.aclCreateTensorList(cl, 2);
    rc = RUN2(aclnnCat, L, 1, view(co, {2, 5}));
    J("op_cat").num("rc", rc).arr("out", {2, 5}, download(co, 10)).end();
    // reduce sum [2, 3, 2] over the last dim
    std::vector<double> rs = randv(12);
    Buf br = upload(ACL_FLOAT, rs), bro = upload(ACL_FLOAT, std::vector<double>(6, 0));
    int64_t dl[1] = {-1};
    rc = RUN2(aclnnReduceSum, view(br, {2, 3, 2}), A.aclCreateIntArray(dl, 1), false, ACL_FLOAT, view(bro, {2, 3}));
    J("op_reduce_sum").num("rc", rc).arr("in", {2, 3, 2}, quant(ACL_FLOAT, rs)).arr("out", {2, 3}, download(bro, 6)).end();
    // gather + scatter along dim 1
    Buf gs = upload(ACL_FLOAT, {10, 11, 12, 13, 20, 21, 22, 23}), gi = upload(ACL_INT64, {3, 0, 1, 1}), go = upload(ACL_FLOAT, std::vector<double>(4, 0));
    rc = RUN2(aclnnGather, view(gs, {2, 4}), 1, view(gi, {2, 2}), view(go, {2, 2}));
    J("op_gather").num("rc", rc).arr("out", {2, 2}, download(go, 4)).end();
    Buf zs = upload(ACL_FLOAT, std::vector<double>(8, 0)), si = upload(ACL_INT64, {2, 0, 3, 1}), ss = upload(ACL_FLOAT, {1, 1, 1, 1}), so = upload(ACL_FLOAT, std::vector<double>(8, 0));
    rc = RUN2(aclnnScatter, view(zs, {2, 4}), 1, view(si, {2, 2}), view(ss, {2, 2}), 0, view(so, {2, 4}));
    J("op_scatter").num("rc", rc).arr("out", {2, 4}, download(so, 8)).end();
    // embedding with INT64 ids
    auto wt = quant(ACL_BF16, randv(6 * 4));
    Buf bw = upload(ACL_BF16, wt), bid = upload(ACL_INT64, {5, 0, 2}), beo = upload(ACL_BF16, std::vector<double>(12, 0));
    rc = RUN2(aclnnEmbedding, view(bw, {6, 4}), view(bid, {3}), view(beo, {3, 4}));
    J("op_embedding").num("rc", rc).arr("w", {6, 4}, wt).arr("out", {3, 4}, download(beo, 12)).end();
  }
}

int main(int argc, char** argv) {
  if (argc < 2) { std::fprintf(stderr, "usage: driver <lib dir> [misuse|hccl|ops|all]\n"); return 2; }
  load(argv[1]);
  std::string what = argc > 2 ? argv[2] : "all";
  if (int rc = A.aclInit(nullptr)) { std::fprintf(stderr, "aclInit: %d\n", rc); return 3; }
  uint32_t n = 0;
  A.aclrtGetDeviceCount(&n);
  A.aclrtSetDevice(0);
  A.aclrtCreateStream(&S);
  size_t fr = 0, tot = 0;
  A.aclrtGetMemInfo(ACL_HBM_MEM, &fr, &tot);
  void* mb = nullptr;
  A.aclrtMalloc(&mb, 1 << 20, ACL_MEM_MALLOC_HUGE_FIRST);
  size_t fr2 = 0, tot2 = 0;
  A.aclrtGetMemInfo(ACL_HBM_MEM, &fr2, &tot2);
  A.aclrtFree(mb);
  J("device").num("count", n).str("soc", A.aclrtGetSocName()).num("free", (double)fr).num("total", (double)tot).num("freeAfterMiB", (double)fr2).end();
  if (what == "all" || what == "misuse") misuse();
  if (what == "all" || what == "ops") ops();
  if (what == "all" || what == "hccl") hccl();
  if (standinStats) J("stats").str("json", standinStats()).end();
  return 0;
}
