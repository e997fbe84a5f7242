// Object model: errors, configuration, device memory, tensors, streams, executors.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <unordered_set>

#include "common.h"

namespace si {

// ---------------------------------------------------------------- errors
// Messages pile up on the thread (newest first, as CANN documents) until aclGetRecentErrMsg reads and
// clears them; the returned pointer stays valid until the next call on the same thread.
static thread_local std::deque<std::string> tlErr;
static thread_local std::string tlErrOut;

void setErr(const std::string& msg) {
  tlErr.push_front(msg);
  if (tlErr.size() > 8) tlErr.pop_back();
  if (std::getenv("DS3_STANDIN_TRACE")) std::fprintf(stderr, "[ascend stand-in] %s\n", msg.c_str());
}
const char* takeErr() {
  if (tlErr.empty()) return nullptr;
  tlErrOut.clear();
  for (auto& m : tlErr) tlErrOut += (tlErrOut.empty() ? "" : "\n") + m;
  tlErr.clear();
  return tlErrOut.c_str();
}
std::string fmt(const char* f, ...) {
  char buf[2048];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}
// every error returned, by code, and the refused destroys/frees (a double free or a foreign handle on CANN),
// for ds3StandinStats: a caller that ignores a destroy's return code is still caught by a test
std::mutex gFailMu;
std::map<int, uint64_t> gFailCodes;
uint64_t gRefusedDestroys = 0;
int fail(int code, const std::string& msg) {
  setErr(fmt("%s (error %d)", msg.c_str(), code));
  static const char* destroys[] = {"aclDestroy", "aclrtFree", "aclrtDestroyStream", "HcclCommDestroy"};
  std::lock_guard<std::mutex> g(gFailMu);
  gFailCodes[code]++;
  for (const char* d : destroys)
    if (msg.compare(0, std::strlen(d), d) == 0) gRefusedDestroys++;
  return code;
}

size_t dtypeSize(int dt) {
  switch (dt) {
    case DT_FLOAT: case DT_INT32: case DT_UINT32: return 4;
    case DT_FLOAT16: case DT_BF16: case DT_INT16: case DT_UINT16: return 2;
    case DT_INT8: case DT_UINT8: case DT_BOOL: return 1;
    case DT_INT64: case DT_UINT64: case DT_DOUBLE: return 8;
    default: return 0;
  }
}
const char* dtypeName(int dt) {
  switch (dt) {
    case DT_FLOAT: return "FLOAT"; case DT_FLOAT16: return "FLOAT16"; case DT_BF16: return "BF16";
    case DT_INT8: return "INT8"; case DT_INT16: return "INT16"; case DT_INT32: return "INT32"; case DT_INT64: return "INT64";
    case DT_UINT8: return "UINT8"; case DT_UINT16: return "UINT16"; case DT_UINT32: return "UINT32"; case DT_UINT64: return "UINT64";
    case DT_DOUBLE: return "DOUBLE"; case DT_BOOL: return "BOOL";
    default: return "UNKNOWN_DTYPE";
  }
}
const char* kindName(Kind k) {
  switch (k) {
    case K_TENSOR: return "aclTensor"; case K_TLIST: return "aclTensorList"; case K_INTARRAY: return "aclIntArray";
    case K_SCALAR: return "aclScalar"; case K_EXECUTOR: return "aclOpExecutor"; case K_STREAM: return "aclrtStream";
    case K_COMM: return "HcclComm"; case K_BOOLARRAY: return "aclBoolArray"; case K_FLOATARRAY: return "aclFloatArray";
  }
  return "handle";
}

float f16ToF(uint16_t h) {
  uint32_t s = (h >> 15) & 1, e = (h >> 10) & 31, m = h & 1023;
  float v;
  if (e == 0) v = std::ldexp((float)m, -24);
  else if (e == 31) v = m ? NAN : INFINITY;
  else v = std::ldexp((float)(m | 1024), (int)e - 25);
  return s ? -v : v;
}
uint16_t fToF16(float f) {
  uint32_t u; std::memcpy(&u, &f, 4);
  uint32_t s = (u >> 16) & 0x8000u;
  float a = std::fabs(f);
  if (std::isnan(f)) return (uint16_t)(s | 0x7e00);
  if (a >= 65520.f) return (uint16_t)(s | 0x7c00);
  if (a < 6.103515625e-05f) {  // subnormal: units of 2^-24, round half even
    float q = a * 16777216.f;
    float r = std::nearbyint(q);  // default rounding mode is to-nearest-even
    return (uint16_t)(s | (uint32_t)r);
  }
  int e; float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5,1)
  float q = std::nearbyint(m * 2048.f);  // 11 significant bits
  if (q >= 2048.f) { q /= 2; e += 1; }
  uint32_t exp = (uint32_t)(e - 1 + 15);
  if (exp >= 31) return (uint16_t)(s | 0x7c00);
  return (uint16_t)(s | exp << 10 | ((uint32_t)q & 1023));
}
float roundTo(int dtype, float v) {
  if (dtype == DT_BF16) return roundBf16(v);
  if (dtype == DT_FLOAT16) return f16ToF(fToF16(v));
  return v;
}

// ---------------------------------------------------------------- config / init
static Config loadConfig() {
  Config c;
  const char* np = std::getenv("DS3_STANDIN_NPUS");
  if (!np) np = std::getenv("DS3_STANDIN_DEVICES");
  if (np) { int n = std::atoi(np); if (n >= 0 && n <= 64) c.npus = n; }
  if (const char* s = std::getenv("DS3_STANDIN_NPU_MEM_MB")) { long long n = std::atoll(s); if (n > 0) c.memPerNpu = (uint64_t)n << 20; }
  if (const char* s = std::getenv("DS3_STANDIN_STREAM")) c.eager = std::strcmp(s, "eager") == 0;
  if (const char* s = std::getenv("DS3_STANDIN_HCCL_TIMEOUT_MS")) { int n = std::atoi(s); if (n > 0) c.hcclTimeoutMs = n; }
  return c;
}
const Config& config() { static Config c = loadConfig(); return c; }

std::atomic<int> gInit{0};
std::atomic<int> gInitCalls{0}, gFinalizeCalls{0};
bool initialized() { return gInit.load() > 0; }
int requireInit(const char* fn) {
  if (!initialized()) return fail(ACL_ERROR_UNINITIALIZE, fmt("%s: aclInit has not been called (or aclFinalize already ran)", fn));
  return 0;
}
static thread_local int tlDevice = -1;
int currentDevice() { return tlDevice; }
void setCurrentDevice(int d) { tlDevice = d; }
int requireDevice(const char* fn, int* dev) {
  if (int rc = requireInit(fn)) return rc;
  if (tlDevice < 0) return fail(ACL_ERROR_RT_CONTEXT_NULL, fmt("%s: this thread has no current device (call aclrtSetDevice first)", fn));
  *dev = tlDevice;
  return 0;
}

// ---------------------------------------------------------------- memory
static std::mutex gMemMu;
static std::map<uintptr_t, Alloc> gLive;
static std::unordered_set<uint64_t> gLiveIds;
static std::deque<Alloc> gFreed;  // recent frees, for messages
static uint64_t gNextAlloc = 1;
static std::vector<uint64_t> gUsed(65, 0);
static std::atomic<uint64_t> gTotalAllocs{0};

static const Alloc* lookupLocked(uintptr_t p) {
  auto it = gLive.upper_bound(p);
  if (it == gLive.begin()) return nullptr;
  --it;
  if (p >= it->second.base && p < it->second.base + it->second.size) return &it->second;
  return nullptr;
}
bool findDevice(const void* p, size_t bytes, Alloc* out, std::string* why) {
  uintptr_t a = (uintptr_t)p;
  std::lock_guard<std::mutex> g(gMemMu);
  const Alloc* al = lookupLocked(a);
  if (!al || al->host) {
    if (why) {
      std::string w = fmt("%p is not device memory from aclrtMalloc", p);
      for (auto it = gFreed.rbegin(); it != gFreed.rend(); ++it)
        if (a >= it->base && a < it->base + it->size && !it->host) {
          w = fmt("%p is in device allocation #%llu (%zu bytes) that aclrtFree already released", p, (unsigned long long)it->id, it->size);
          break;
        }
      if (al && al->host) w = fmt("%p is host memory from aclrtMallocHost, not device memory", p);
      *why = w;
    }
    return false;
  }
  if (bytes > al->size - (a - al->base)) {
    if (why) *why = fmt("%zu bytes at %p run past the end of device allocation #%llu (%zu bytes at %p, %zu left)", bytes, p,
                        (unsigned long long)al->id, al->size, (void*)al->base, al->size - (size_t)(a - al->base));
    return false;
  }
  if (out) *out = *al;
  return true;
}
bool isDevicePtr(const void* p) {
  std::lock_guard<std::mutex> g(gMemMu);
  const Alloc* al = lookupLocked((uintptr_t)p);
  return al && !al->host;
}
bool isHostAllocPtr(const void* p) {
  std::lock_guard<std::mutex> g(gMemMu);
  const Alloc* al = lookupLocked((uintptr_t)p);
  return al && al->host;
}
bool allocLive(uint64_t id) {
  std::lock_guard<std::mutex> g(gMemMu);
  return gLiveIds.count(id) > 0;
}
int devMalloc(void** p, size_t size, int device, bool host) {
  size_t rounded = (size + 511) / 512 * 512;
  if (!host) {
    std::lock_guard<std::mutex> g(gMemMu);
    if (gUsed[device] + rounded > config().memPerNpu)
      return fail(ACL_ERROR_RT_MEMORY_ALLOCATION,
                  fmt("aclrtMalloc: out of device memory on device %d: %zu bytes asked, %llu of %llu in use", device, size,
                      (unsigned long long)gUsed[device], (unsigned long long)config().memPerNpu));
  }
  void* m = std::aligned_alloc(512, rounded);
  if (!m) return fail(host ? ACL_ERROR_BAD_ALLOC : ACL_ERROR_RT_MEMORY_ALLOCATION, fmt("allocation of %zu bytes failed on the host", size));
  std::lock_guard<std::mutex> g(gMemMu);
  Alloc a{gNextAlloc++, (uintptr_t)m, size, device, host};  // bounds are the size asked for, not the rounded block
  gLive[a.base] = a;
  gLiveIds.insert(a.id);
  if (!host) gUsed[device] += rounded;
  gTotalAllocs++;
  *p = m;
  return 0;
}
int devFree(void* p, bool host, const char* fn) {
  if (!p) return fail(ACL_ERROR_INVALID_PARAM, fmt("%s: devPtr is null", fn));
  Alloc a;
  {
    std::lock_guard<std::mutex> g(gMemMu);
    auto it = gLive.find((uintptr_t)p);
    if (it == gLive.end() || it->second.host != host) {
      std::string w = fmt("%s: %p was not returned by %s", fn, p, host ? "aclrtMallocHost" : "aclrtMalloc");
      for (auto f = gFreed.rbegin(); f != gFreed.rend(); ++f)
        if (f->base == (uintptr_t)p) { w = fmt("%s: %p was already freed (double free of allocation #%llu)", fn, p, (unsigned long long)f->id); break; }
      if (it == gLive.end()) {
        const Alloc* in = lookupLocked((uintptr_t)p);
        if (in) w = fmt("%s: %p points inside allocation #%llu (base %p), not at its start", fn, p, (unsigned long long)in->id, (void*)in->base);
      }
      return fail(ACL_ERROR_INVALID_PARAM, w);
    }
    a = it->second;
    gLive.erase(it);
    gLiveIds.erase(a.id);
    if (!host) gUsed[a.device] -= (a.size + 511) / 512 * 512;
    gFreed.push_back(a);
    if (gFreed.size() > 65536) gFreed.pop_front();
  }
  std::memset(p, 0xEE, a.size);  // poison: queued tasks check liveness first, so nothing reads this
  std::free(p);
  return 0;
}
uint64_t devUsed(int device) { std::lock_guard<std::mutex> g(gMemMu); return gUsed[device]; }

// ---------------------------------------------------------------- registries
Registry<TensorDesc>& tensors() { static Registry<TensorDesc> r(K_TENSOR); return r; }
Registry<TensorList>& tensorLists() { static Registry<TensorList> r(K_TLIST); return r; }
Registry<IntArray>& intArrays() { static Registry<IntArray> r(K_INTARRAY); return r; }
Registry<BoolArray>& boolArrays() { static Registry<BoolArray> r(K_BOOLARRAY); return r; }
Registry<FloatArray>& floatArrays() { static Registry<FloatArray> r(K_FLOATARRAY); return r; }
Registry<Scalar>& scalars() { static Registry<Scalar> r(K_SCALAR); return r; }
Registry<Stream>& streams() { static Registry<Stream> r(K_STREAM); return r; }
Registry<Executor>& executors() { static Registry<Executor> r(K_EXECUTOR); return r; }

// ---------------------------------------------------------------- tensor access
std::string dimsStr(const std::vector<int64_t>& d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); i++) s += (i ? "," : "") + std::to_string(d[i]);
  return s + "]";
}
bool sameDims(const TensorDesc& a, const std::vector<int64_t>& d) { return a.dims == d; }
bool TensorDesc::contiguous() const {
  int64_t s = 1;
  for (size_t i = dims.size(); i-- > 0;) {
    if (dims[i] != 1 && strides[i] != s) return false;
    s *= dims[i];
  }
  return true;
}
std::string TensorDesc::str() const {
  return fmt("%s%s strides %s offset %lld", dtypeName(dtype), dimsStr(dims).c_str(), dimsStr(strides).c_str(), (long long)offset);
}

template <class F>
static void forEachOffset(const TensorDesc& t, F f) {
  int64_t n = t.numel();
  if (n == 0) return;
  size_t r = t.dims.size();
  std::vector<int64_t> idx(r, 0);
  int64_t off = t.offset;
  for (int64_t k = 0; k < n; k++) {
    f(k, off);
    for (size_t d = r; d-- > 0;) {
      if (++idx[d] < t.dims[d]) { off += t.strides[d]; break; }
      off -= t.strides[d] * (t.dims[d] - 1);
      idx[d] = 0;
    }
  }
}
static inline double loadD(const TensorDesc& t, int64_t off) {
  const char* p = t.data + off * (int64_t)dtypeSize(t.dtype);
  switch (t.dtype) {
    case DT_FLOAT: { float v; std::memcpy(&v, p, 4); return v; }
    case DT_BF16: { uint16_t v; std::memcpy(&v, p, 2); return bf16ToF(v); }
    case DT_FLOAT16: { uint16_t v; std::memcpy(&v, p, 2); return f16ToF(v); }
    case DT_DOUBLE: { double v; std::memcpy(&v, p, 8); return v; }
    case DT_INT8: return (double)*(const int8_t*)p;
    case DT_UINT8: return (double)*(const uint8_t*)p;
    case DT_BOOL: return *(const uint8_t*)p ? 1.0 : 0.0;
    case DT_INT16: { int16_t v; std::memcpy(&v, p, 2); return v; }
    case DT_UINT16: { uint16_t v; std::memcpy(&v, p, 2); return v; }
    case DT_INT32: { int32_t v; std::memcpy(&v, p, 4); return v; }
    case DT_UINT32: { uint32_t v; std::memcpy(&v, p, 4); return v; }
    case DT_INT64: { int64_t v; std::memcpy(&v, p, 8); return (double)v; }
    case DT_UINT64: { uint64_t v; std::memcpy(&v, p, 8); return (double)v; }
  }
  return 0;
}
static inline int64_t loadI(const TensorDesc& t, int64_t off) {
  const char* p = t.data + off * (int64_t)dtypeSize(t.dtype);
  switch (t.dtype) {
    case DT_INT32: { int32_t v; std::memcpy(&v, p, 4); return v; }
    case DT_INT64: { int64_t v; std::memcpy(&v, p, 8); return v; }
    case DT_UINT32: { uint32_t v; std::memcpy(&v, p, 4); return v; }
    case DT_UINT64: { uint64_t v; std::memcpy(&v, p, 8); return (int64_t)v; }
    case DT_INT16: { int16_t v; std::memcpy(&v, p, 2); return v; }
    case DT_UINT16: { uint16_t v; std::memcpy(&v, p, 2); return v; }
    case DT_INT8: return *(const int8_t*)p;
    case DT_UINT8: return *(const uint8_t*)p;
    case DT_BOOL: return *(const uint8_t*)p ? 1 : 0;
    default: return (int64_t)loadD(t, off);
  }
}
static inline void storeD(const TensorDesc& t, int64_t off, double v) {
  char* p = t.data + off * (int64_t)dtypeSize(t.dtype);
  switch (t.dtype) {
    case DT_FLOAT: { float f = (float)v; std::memcpy(p, &f, 4); return; }
    case DT_BF16: { uint16_t h = fToBf16((float)v); std::memcpy(p, &h, 2); return; }
    case DT_FLOAT16: { uint16_t h = fToF16((float)v); std::memcpy(p, &h, 2); return; }
    case DT_DOUBLE: std::memcpy(p, &v, 8); return;
    case DT_BOOL: *(uint8_t*)p = v != 0; return;
    default: break;
  }
  int64_t i = (int64_t)v;
  switch (t.dtype) {
    case DT_INT8: *(int8_t*)p = (int8_t)i; return;
    case DT_UINT8: *(uint8_t*)p = (uint8_t)i; return;
    case DT_INT16: { int16_t x = (int16_t)i; std::memcpy(p, &x, 2); return; }
    case DT_UINT16: { uint16_t x = (uint16_t)i; std::memcpy(p, &x, 2); return; }
    case DT_INT32: { int32_t x = (int32_t)i; std::memcpy(p, &x, 4); return; }
    case DT_UINT32: { uint32_t x = (uint32_t)i; std::memcpy(p, &x, 4); return; }
    case DT_INT64: std::memcpy(p, &i, 8); return;
    case DT_UINT64: { uint64_t x = (uint64_t)i; std::memcpy(p, &x, 8); return; }
  }
}
static inline void storeI(const TensorDesc& t, int64_t off, int64_t i) {
  if (isFloat(t.dtype)) { storeD(t, off, (double)i); return; }
  char* p = t.data + off * (int64_t)dtypeSize(t.dtype);
  switch (t.dtype) {
    case DT_INT32: { int32_t x = (int32_t)i; std::memcpy(p, &x, 4); return; }
    case DT_INT64: std::memcpy(p, &i, 8); return;
    default: storeD(t, off, (double)i);
  }
}
std::vector<float> readF(const TensorDesc& t) {
  std::vector<float> v((size_t)t.numel());
  if (t.dtype == DT_FLOAT && t.contiguous()) { std::memcpy(v.data(), t.data + t.offset * 4, v.size() * 4); return v; }
  forEachOffset(t, [&](int64_t k, int64_t off) { v[k] = (float)loadD(t, off); });
  return v;
}
std::vector<double> readD(const TensorDesc& t) {
  std::vector<double> v((size_t)t.numel());
  forEachOffset(t, [&](int64_t k, int64_t off) { v[k] = loadD(t, off); });
  return v;
}
std::vector<int64_t> readI(const TensorDesc& t) {
  std::vector<int64_t> v((size_t)t.numel());
  forEachOffset(t, [&](int64_t k, int64_t off) { v[k] = loadI(t, off); });
  return v;
}
void readRow(const TensorDesc& t, int64_t off, int64_t stride, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i++) out[i] = (float)loadD(t, off + i * stride);
}
void writeF(const TensorDesc& t, const float* v) {
  if (t.dtype == DT_FLOAT && t.contiguous()) { std::memcpy(t.data + t.offset * 4, v, (size_t)t.numel() * 4); return; }
  forEachOffset(t, [&](int64_t k, int64_t off) { storeD(t, off, v[k]); });
}
void writeI(const TensorDesc& t, const int64_t* v) {
  forEachOffset(t, [&](int64_t k, int64_t off) { storeI(t, off, v[k]); });
}

// ---------------------------------------------------------------- streams
static thread_local std::map<int, void*> tlDefaultStream;
static std::mutex gExecMu;  // per-stream execution is serialized through Stream::mu swap + this map
static std::map<Stream*, std::unique_ptr<std::mutex>> gStreamExec;
static std::atomic<uint64_t> gTasksRun{0};

static std::mutex& execMutex(Stream* s) {
  std::lock_guard<std::mutex> g(gExecMu);
  auto& m = gStreamExec[s];
  if (!m) m.reset(new std::mutex);
  return *m;
}

std::shared_ptr<Stream> getStream(void* h, const char* fn, int* rc) {
  int dev;
  if ((*rc = requireDevice(fn, &dev))) return nullptr;
  if (!h) {
    auto it = tlDefaultStream.find(dev);
    if (it == tlDefaultStream.end()) {
      auto s = std::make_shared<Stream>();
      s->device = dev;
      it = tlDefaultStream.emplace(dev, streams().add(s)).first;
    }
    h = it->second;
  }
  std::string why;
  auto s = streams().get(h, &why);
  if (!s) { *rc = fail(ACL_ERROR_RT_INVALID_HANDLE, fmt("%s: stream: %s", fn, why.c_str())); return nullptr; }
  if (s->device != dev) {
    *rc = fail(ACL_ERROR_RT_INVALID_HANDLE, fmt("%s: stream %p belongs to device %d but this thread's current device is %d", fn, h, s->device, dev));
    return nullptr;
  }
  return s;
}

static int runTask(Task& t, std::string* err) {
  for (auto& m : t.mem)
    if (m.allocId && !allocLive(m.allocId)) {
      *err = fmt("%s: device memory at %p (allocation #%llu) was freed while the task was still queued on its stream "
                 "(aclrtFree before aclrtSynchronizeStream)", t.what.c_str(), (void*)m.base, (unsigned long long)m.allocId);
      return ACL_ERROR_RT_AICORE_EXCEPTION;
    }
  int rc = t.run(err);
  gTasksRun++;
  if (rc && err->empty()) *err = fmt("%s failed", t.what.c_str());
  return rc;
}

int enqueue(const std::shared_ptr<Stream>& s, Task t) {
  if (config().eager) {
    std::lock_guard<std::mutex> ex(execMutex(s.get()));
    std::string err;
    int rc = runTask(t, &err);
    if (rc) { std::lock_guard<std::mutex> g(s->mu); if (!s->sticky) { s->sticky = rc; s->stickyMsg = err; } }
    return 0;
  }
  std::lock_guard<std::mutex> g(s->mu);
  s->q.push_back(std::move(t));
  return 0;
}

int syncStream(const std::shared_ptr<Stream>& s, const char* fn) {
  std::lock_guard<std::mutex> ex(execMutex(s.get()));
  std::vector<Task> q;
  {
    std::lock_guard<std::mutex> g(s->mu);
    q.swap(s->q);
  }
  for (size_t i = 0; i < q.size(); i++) {
    std::string err;
    int rc = runTask(q[i], &err);
    if (rc) {
      std::lock_guard<std::mutex> g(s->mu);
      if (!s->sticky) { s->sticky = rc; s->stickyMsg = err + fmt(" [%zu later task(s) on the stream dropped]", q.size() - i - 1); }
      break;
    }
    std::lock_guard<std::mutex> g(s->mu);
    s->ran++;
  }
  std::lock_guard<std::mutex> g(s->mu);
  if (s->sticky) {
    int rc = s->sticky;
    std::string msg = s->stickyMsg;
    s->sticky = 0;
    s->stickyMsg.clear();
    return fail(rc, fmt("%s: a task on the stream failed: %s", fn, msg.c_str()));
  }
  return 0;
}

bool pendingUse(uintptr_t base, size_t bytes, std::string* who) {
  auto& reg = streams();
  std::vector<std::shared_ptr<Stream>> all;
  {
    std::lock_guard<std::mutex> g(reg.mu);
    for (auto& kv : reg.live) all.push_back(kv.second);
  }
  for (auto& s : all) {
    std::lock_guard<std::mutex> g(s->mu);
    for (auto& t : s->q)
      for (auto& m : t.mem)
        if (m.base < base + bytes && base < m.base + m.bytes) {
          if (who) *who = fmt("%s (queued on a stream of device %d, %zu task(s) not yet synchronized)", t.what.c_str(), s->device, s->q.size());
          return true;
        }
  }
  return false;
}

// ---------------------------------------------------------------- operators: shared two-phase plumbing
std::shared_ptr<TensorDesc> OpCtx::tensor(const void* h, const char* arg, bool optional) {
  if (rc) return nullptr;
  if (!h) {
    if (!optional) rc = fail(ACLNN_ERR_PARAM_NULLPTR, fmt("%sGetWorkspaceSize: %s is a null aclTensor", op, arg));
    return nullptr;
  }
  std::string why;
  auto t = tensors().get(h, &why);
  if (!t) { rc = fail(ACLNN_ERR_PARAM_INVALID, fmt("%sGetWorkspaceSize: %s: %s", op, arg, why.c_str())); return nullptr; }
  Alloc a;
  if (t->data && !findDevice(t->data, t->storageBytes, &a, &why)) {
    rc = fail(ACLNN_ERR_PARAM_INVALID, fmt("%sGetWorkspaceSize: %s: its storage is no longer valid: %s", op, arg, why.c_str()));
    return nullptr;
  }
  if (t->data && a.device != currentDevice()) {
    rc = fail(ACLNN_ERR_PARAM_INVALID, fmt("%sGetWorkspaceSize: %s lives on device %d but this thread's current device is %d", op, arg, a.device, currentDevice()));
    return nullptr;
  }
  if (t->data) mem.push_back(t->ref());
  return t;
}
std::vector<std::shared_ptr<TensorDesc>> OpCtx::list(const void* h, const char* arg, bool optional) {
  std::vector<std::shared_ptr<TensorDesc>> out;
  if (rc) return out;
  if (!h) {
    if (!optional) rc = fail(ACLNN_ERR_PARAM_NULLPTR, fmt("%sGetWorkspaceSize: %s is a null aclTensorList", op, arg));
    return out;
  }
  std::string why;
  auto l = tensorLists().get(h, &why);
  if (!l) { rc = fail(ACLNN_ERR_PARAM_INVALID, fmt("%sGetWorkspaceSize: %s: %s", op, arg, why.c_str())); return out; }
  for (size_t i = 0; i < l->ids.size(); i++) {
    auto t = tensor(makeHandle(K_TENSOR, l->ids[i]), fmt("%s[%zu]", arg, i).c_str());
    if (!t) return {};
    out.push_back(t);
  }
  return out;
}
std::vector<int64_t> OpCtx::ints(const void* h, const char* arg, bool optional, bool* present) {
  if (present) *present = false;
  if (rc) return {};
  if (!h) {
    if (!optional) rc = fail(ACLNN_ERR_PARAM_NULLPTR, fmt("%sGetWorkspaceSize: %s is a null aclIntArray", op, arg));
    return {};
  }
  std::string why;
  auto a = intArrays().get(h, &why);
  if (!a) { rc = fail(ACLNN_ERR_PARAM_INVALID, fmt("%sGetWorkspaceSize: %s: %s", op, arg, why.c_str())); return {}; }
  if (present) *present = true;
  return a->v;
}
bool OpCtx::check(bool cond, int code, const std::string& msg) {
  if (rc) return false;
  if (!cond) rc = fail(code, fmt("%sGetWorkspaceSize: %s", op, msg.c_str()));
  return cond;
}
int OpCtx::finish(uint64_t workspace, std::function<int(char*, std::string*)> run, uint64_t* wsOut, void** exOut) {
  if (rc) return rc;
  if (!wsOut || !exOut) return rc = fail(ACLNN_ERR_PARAM_NULLPTR, fmt("%sGetWorkspaceSize: workspaceSize or executor out-pointer is null", op));
  auto e = std::make_shared<Executor>();
  e->op = op;
  e->workspace = workspace;
  e->mem = mem;
  e->run = std::move(run);
  e->device = currentDevice();
  *wsOut = workspace;
  *exOut = executors().add(e);
  return 0;
}

static std::atomic<uint64_t> gLaunched{0};
int launch(const char* op, void* workspace, uint64_t workspaceSize, void* executor, void* stream) {
  if (!executor) return fail(ACLNN_ERR_PARAM_NULLPTR, fmt("%s: executor is null", op));
  std::string why;
  auto e = executors().get(executor, &why);
  if (!e) {
    uint64_t id;
    if (splitHandle(executor, K_EXECUTOR, &id))
      why = fmt("aclOpExecutor %p was already executed or destroyed (an executor runs once unless aclSetAclOpExecutorRepeatable made it repeatable)", executor);
    return fail(ACLNN_ERR_PARAM_INVALID, fmt("%s: %s", op, why.c_str()));
  }
  if (e->op != op)
    return fail(ACLNN_ERR_PARAM_INVALID, fmt("%s: executor %p was made by %sGetWorkspaceSize, not %sGetWorkspaceSize", op, executor, e->op.c_str(), op));
  int rc;
  auto s = getStream(stream, op, &rc);
  if (!s) return rc;
  if (s->device != e->device)
    return fail(ACLNN_ERR_PARAM_INVALID, fmt("%s: executor was made on device %d, stream is on device %d", op, e->device, s->device));
  MemRef wsRef{0, 0, 0};
  if (e->workspace > 0) {
    if (workspaceSize < e->workspace)
      return fail(ACLNN_ERR_PARAM_INVALID, fmt("%s: workspaceSize %llu is smaller than the %llu bytes %sGetWorkspaceSize asked for", op,
                                               (unsigned long long)workspaceSize, (unsigned long long)e->workspace, op));
    if (!workspace) return fail(ACLNN_ERR_PARAM_NULLPTR, fmt("%s: workspace is null but %llu bytes are needed", op, (unsigned long long)e->workspace));
    Alloc a;
    if (!findDevice(workspace, e->workspace, &a, &why)) return fail(ACLNN_ERR_PARAM_INVALID, fmt("%s: workspace: %s", op, why.c_str()));
    if (a.device != s->device) return fail(ACLNN_ERR_PARAM_INVALID, fmt("%s: workspace is on device %d, stream on device %d", op, a.device, s->device));
    wsRef = MemRef{a.id, (uintptr_t)workspace, (size_t)e->workspace};
  } else if (workspaceSize > 0 && workspace && !isDevicePtr(workspace)) {
    return fail(ACLNN_ERR_PARAM_INVALID, fmt("%s: workspace: %p is not device memory", op, workspace));
  }
  if (!e->repeatable) executors().take(executor, nullptr);
  Task t;
  t.what = op;
  t.mem = e->mem;
  if (wsRef.allocId) t.mem.push_back(wsRef);
  uint64_t need = e->workspace;
  t.run = [e, workspace, need](std::string* err) {
    char* ws = (char*)workspace;
    if (need) std::memset(ws, 0xA5, need);  // scratch starts as garbage on an NPU too
    int rc = e->run(ws, err);
    if (need) std::memset(ws, 0x5A, need);  // and is not a place to keep results
    return rc;
  };
  gLaunched++;
  return enqueue(s, std::move(t));
}

std::atomic<int> gCommsLive{0};  // maintained by libhccl
std::string statsJson() {
  std::string codes;
  uint64_t refused;
  {
    std::lock_guard<std::mutex> f(gFailMu);
    refused = gRefusedDestroys;
    for (auto& kv : gFailCodes) codes += fmt("%s\"%d\":%llu", codes.empty() ? "" : ",", kv.first, (unsigned long long)kv.second);
  }
  std::lock_guard<std::mutex> g(gMemMu);
  uint64_t bytes = 0; size_t dev = 0, host = 0;
  for (auto& kv : gLive) { if (kv.second.host) host++; else { dev++; bytes += kv.second.size; } }
  return fmt("{\"initCalls\":%d,\"finalizeCalls\":%d,\"initialized\":%s,\"deviceAllocs\":%zu,\"deviceBytes\":%llu,\"hostAllocs\":%zu,"
             "\"tensors\":%zu,\"tensorLists\":%zu,\"intArrays\":%zu,\"scalars\":%zu,\"executorsPending\":%zu,\"streams\":%zu,"
             "\"launched\":%llu,\"tasksRun\":%llu,\"comms\":%d,\"eager\":%s,\"refusedDestroys\":%llu,\"errors\":{%s}}",
             gInitCalls.load(), gFinalizeCalls.load(), initialized() ? "true" : "false", dev, (unsigned long long)bytes, host,
             tensors().count(), tensorLists().count(), intArrays().count(), scalars().count(), executors().count(), streams().count(),
             (unsigned long long)gLaunched.load(), (unsigned long long)gTasksRun.load(), gCommsLive.load(),
             config().eager ? "true" : "false", (unsigned long long)refused, codes.c_str());
}

}  // namespace si
