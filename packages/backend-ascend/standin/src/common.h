// ds3 Ascend stand-in: the object model shared by the four libraries.
//
// A CPU implementation of the subset of CANN's C interface (ACL runtime, aclnn operators, HCCL) that
// @ds3/backend-ascend calls, built ONLY for tests. "Device" memory is host memory handed out by
// aclrtMalloc and tracked; handles (tensors, executors, streams, communicators) are opaque ids that are
// never reused, so a destroyed or foreign handle is an error code with a message, never a crash.
#pragma once

#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#define SI_EXPORT extern "C" __attribute__((visibility("default")))

namespace si {

// ---- status codes (values from CANN's acl_base.h, acl_rt.h, aclnn/acl_meta.h, hccl_types.h) ----
constexpr int ACL_SUCCESS = 0;
constexpr int ACL_ERROR_INVALID_PARAM = 100000;
constexpr int ACL_ERROR_UNINITIALIZE = 100001;
constexpr int ACL_ERROR_REPEAT_INITIALIZE = 100002;
constexpr int ACL_ERROR_BAD_ALLOC = 200000;
constexpr int ACL_ERROR_INVALID_DEVICE = 200002;
constexpr int ACL_ERROR_FAILURE = 500001;
constexpr int ACL_ERROR_RT_PARAM_INVALID = 107000;
constexpr int ACL_ERROR_RT_INVALID_DEVICEID = 107001;
constexpr int ACL_ERROR_RT_CONTEXT_NULL = 107002;
constexpr int ACL_ERROR_RT_INVALID_HANDLE = 107017;
constexpr int ACL_ERROR_RT_MEMORY_ALLOCATION = 207001;
constexpr int ACL_ERROR_RT_AICORE_EXCEPTION = 507015;

constexpr int ACLNN_SUCCESS = 0;
constexpr int ACLNN_ERR_PARAM_NULLPTR = 161001;
constexpr int ACLNN_ERR_PARAM_INVALID = 161002;
constexpr int ACLNN_ERR_RUNTIME_ERROR = 361001;
constexpr int ACLNN_ERR_INNER_TILING_ERROR = 561002;

constexpr int HCCL_SUCCESS = 0;
constexpr int HCCL_E_PARA = 1;
constexpr int HCCL_E_PTR = 2;
constexpr int HCCL_E_MEMORY = 3;
constexpr int HCCL_E_INTERNAL = 4;
constexpr int HCCL_E_NOT_SUPPORT = 5;
constexpr int HCCL_E_TIMEOUT = 9;

// ---- aclDataType ----
enum : int {
  DT_FLOAT = 0, DT_FLOAT16 = 1, DT_INT8 = 2, DT_INT32 = 3, DT_UINT8 = 4, DT_INT16 = 6, DT_UINT16 = 7,
  DT_UINT32 = 8, DT_INT64 = 9, DT_UINT64 = 10, DT_DOUBLE = 11, DT_BOOL = 12, DT_BF16 = 27,
};
constexpr int FORMAT_ND = 2;
size_t dtypeSize(int dt);  // 0: not supported by the stand-in
const char* dtypeName(int dt);
inline bool isFloat(int dt) { return dt == DT_FLOAT || dt == DT_FLOAT16 || dt == DT_BF16 || dt == DT_DOUBLE; }
inline bool isInt(int dt) {
  return dt == DT_INT8 || dt == DT_INT32 || dt == DT_UINT8 || dt == DT_INT16 || dt == DT_UINT16 ||
         dt == DT_UINT32 || dt == DT_INT64 || dt == DT_UINT64 || dt == DT_BOOL;
}

// bf16 / fp16 conversions (round to nearest even on writes, as the NPU's vector unit does)
inline float bf16ToF(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline uint16_t fToBf16(float f) {
  uint32_t u; std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x7fffffu)) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
inline float roundBf16(float f) { return bf16ToF(fToBf16(f)); }
float f16ToF(uint16_t h);
uint16_t fToF16(float f);

// ---- per-thread recent error (aclGetRecentErrMsg) ----
void setErr(const std::string& msg);
std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
// returns code after recording "<where>: <msg>"
int fail(int code, const std::string& msg);

// ---- process state ----
struct Config {
  int npus = 2;                // DS3_STANDIN_NPUS (or DS3_STANDIN_DEVICES), 0..64
  uint64_t memPerNpu = 64ull << 30;
  bool eager = false;          // DS3_STANDIN_STREAM=eager runs tasks at launch; default queues until sync
  int hcclTimeoutMs = 30000;   // DS3_STANDIN_HCCL_TIMEOUT_MS
};
const Config& config();
bool initialized();
int requireInit(const char* fn);           // ACL_ERROR_UNINITIALIZE unless aclInit ran
int requireDevice(const char* fn, int* dev);  // current device of this thread (aclrtSetDevice)
int currentDevice();                         // -1 when none
void setCurrentDevice(int d);

// ---- device memory ----
struct Alloc { uint64_t id; uintptr_t base; size_t size; int device; bool host; };
struct MemRef { uint64_t allocId; uintptr_t base; size_t bytes; };  // what a queued task touches
// Resolves [p, p+bytes) to a live device allocation; fills why on failure (freed, foreign, overrun).
bool findDevice(const void* p, size_t bytes, Alloc* out, std::string* why);
bool isDevicePtr(const void* p);  // inside any live device allocation
bool isHostAllocPtr(const void* p);  // inside a live aclrtMallocHost block
const char* takeErr();  // aclGetRecentErrMsg: the last message of this thread, then cleared
bool allocLive(uint64_t id);
int devMalloc(void** p, size_t size, int device, bool host);
int devFree(void* p, bool host, const char* fn);
uint64_t devUsed(int device);

// ---- handles: opaque ids, tagged per kind, never reused ----
enum Kind : uint64_t { K_TENSOR = 1, K_TLIST, K_INTARRAY, K_SCALAR, K_EXECUTOR, K_STREAM, K_COMM, K_BOOLARRAY, K_FLOATARRAY };
inline void* makeHandle(Kind k, uint64_t id) { return (void*)(uintptr_t)((0x5e00ull + k) << 36 | id << 4); }
inline bool splitHandle(const void* h, Kind k, uint64_t* id) {
  uintptr_t v = (uintptr_t)h;
  if ((v >> 36) != 0x5e00ull + k || (v & 15)) return false;
  *id = (v >> 4) & ((1ull << 32) - 1);
  return true;
}
const char* kindName(Kind k);

template <class T>
struct Registry {
  std::mutex mu;
  std::unordered_map<uint64_t, std::shared_ptr<T>> live;
  uint64_t next = 1;
  Kind kind;
  explicit Registry(Kind k) : kind(k) {}
  void* add(std::shared_ptr<T> v) {
    std::lock_guard<std::mutex> g(mu);
    uint64_t id = next++;
    live[id] = std::move(v);
    return makeHandle(kind, id);
  }
  // why: "destroyed" (an id handed out earlier), "not a <kind>" (anything else)
  std::shared_ptr<T> get(const void* h, std::string* why) {
    uint64_t id = 0;
    if (!splitHandle(h, kind, &id)) { if (why) *why = fmt("%p is not an %s handle", h, kindName(kind)); return nullptr; }
    std::lock_guard<std::mutex> g(mu);
    auto it = live.find(id);
    if (it == live.end()) {
      if (why) *why = id < next ? fmt("%s %p was already destroyed", kindName(kind), h) : fmt("%p is not a live %s", h, kindName(kind));
      return nullptr;
    }
    return it->second;
  }
  std::shared_ptr<T> take(const void* h, std::string* why) {
    auto v = get(h, why);
    if (v) { uint64_t id = 0; splitHandle(h, kind, &id); std::lock_guard<std::mutex> g(mu); live.erase(id); }
    return v;
  }
  size_t count() { std::lock_guard<std::mutex> g(mu); return live.size(); }
};

// ---- tensors ----
struct TensorDesc {
  std::vector<int64_t> dims, strides, storage;
  int64_t offset = 0;
  int dtype = DT_FLOAT;
  int format = FORMAT_ND;
  char* data = nullptr;  // storage start
  uint64_t allocId = 0;
  size_t storageBytes = 0;
  uint64_t ownerList = 0;  // an aclTensorList that destroys this tensor with itself
  int64_t numel() const { int64_t n = 1; for (auto d : dims) n *= d; return n; }
  size_t rank() const { return dims.size(); }
  bool contiguous() const;
  std::string str() const;  // "BF16[4,8] strides [8,1] offset 0"
  MemRef ref() const { return MemRef{allocId, (uintptr_t)data, storageBytes}; }
};
struct TensorList { std::vector<uint64_t> ids; std::vector<std::shared_ptr<TensorDesc>> items; };
struct IntArray { std::vector<int64_t> v; };
struct BoolArray { std::vector<bool> v; };
struct FloatArray { std::vector<float> v; };
struct Scalar { int dtype; double f; int64_t i; };
Registry<TensorDesc>& tensors();
Registry<TensorList>& tensorLists();
Registry<IntArray>& intArrays();
Registry<BoolArray>& boolArrays();
Registry<FloatArray>& floatArrays();
Registry<Scalar>& scalars();

// Element access through a view: read all elements (row-major over the view dims) into floats / ints,
// write back with the destination dtype's rounding.
std::vector<float> readF(const TensorDesc& t);
std::vector<double> readD(const TensorDesc& t);
std::vector<int64_t> readI(const TensorDesc& t);
void writeF(const TensorDesc& t, const float* v);
// n elements starting at element offset `off` (from t.data), `stride` elements apart
void readRow(const TensorDesc& t, int64_t off, int64_t stride, int64_t n, float* out);
void writeI(const TensorDesc& t, const int64_t* v);
float roundTo(int dtype, float v);  // value as stored in dtype (bf16/fp16 rounding)

// ---- streams and executors ----
struct Task {
  std::string what;                 // "aclnnMatmul", "aclrtMemcpyAsync", "HcclAllReduce", ...
  std::vector<MemRef> mem;          // checked live just before running
  std::function<int(std::string* err)> run;
};
struct Stream {
  std::mutex mu;
  int device = 0;
  std::vector<Task> q;
  int sticky = 0;
  std::string stickyMsg;
  uint64_t ran = 0;
};
Registry<Stream>& streams();
// Resolves a stream handle (nullptr: this thread's default stream on its current device)
std::shared_ptr<Stream> getStream(void* h, const char* fn, int* rc);
int enqueue(const std::shared_ptr<Stream>& s, Task t);  // eager mode runs it now
int syncStream(const std::shared_ptr<Stream>& s, const char* fn);
// aclrtMemcpy (synchronous) refuses memory that unsynchronized queued tasks use
bool pendingUse(uintptr_t base, size_t bytes, std::string* who);

struct Executor {
  std::string op;
  uint64_t workspace = 0;
  std::vector<MemRef> mem;
  std::function<int(char* ws, std::string* err)> run;
  bool repeatable = false;
  int device = -1;
};
Registry<Executor>& executors();

// Shared two-phase helpers for operator implementations.
// In GetWorkspaceSize: resolve a required/optional tensor handle (copies the descriptor).
struct OpCtx {
  const char* op;
  int rc = 0;
  std::vector<MemRef> mem;
  explicit OpCtx(const char* name) : op(name) {}
  // returns nullptr and sets rc (+ message) when the handle is bad; optional tensors may be nullptr
  std::shared_ptr<TensorDesc> tensor(const void* h, const char* arg, bool optional = false);
  std::vector<std::shared_ptr<TensorDesc>> list(const void* h, const char* arg, bool optional = false);
  std::vector<int64_t> ints(const void* h, const char* arg, bool optional, bool* present);
  bool check(bool cond, int code, const std::string& msg);  // records the first failure
  bool ok() const { return rc == 0; }
  int finish(uint64_t workspace, std::function<int(char* ws, std::string* err)> run, uint64_t* wsOut, void** exOut);
};
// Second phase: validates executor (single use), op name, workspace, then queues on the stream.
int launch(const char* op, void* workspace, uint64_t workspaceSize, void* executor, void* stream);

// helpers for shape checks
std::string dimsStr(const std::vector<int64_t>& d);
bool sameDims(const TensorDesc& a, const std::vector<int64_t>& d);

// stats for tests (ds3StandinStats)
std::string statsJson();

}  // namespace si
