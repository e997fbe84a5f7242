// libascendcl: aclInit/aclFinalize, devices, memory, streams, recent error message.
#include <atomic>
#include <cstdlib>

#include "common.h"

using namespace si;

namespace si {
extern std::atomic<int> gInit;
extern std::atomic<int> gInitCalls, gFinalizeCalls;
}

SI_EXPORT int aclInit(const char* configPath) {
  (void)configPath;  // a JSON config file path or null; the stand-in reads nothing from it
  gInitCalls++;
  int expected = 0;
  if (!gInit.compare_exchange_strong(expected, 1))
    return fail(ACL_ERROR_REPEAT_INITIALIZE, "aclInit: already initialized in this process (aclInit runs once until aclFinalize)");
  return ACL_SUCCESS;
}

SI_EXPORT int aclFinalize() {
  gFinalizeCalls++;
  int expected = 1;
  if (!gInit.compare_exchange_strong(expected, 0)) return fail(ACL_ERROR_UNINITIALIZE, "aclFinalize: aclInit has not been called");
  return ACL_SUCCESS;
}

SI_EXPORT const char* aclGetRecentErrMsg() { return takeErr(); }

SI_EXPORT int aclrtGetVersion(int32_t* major, int32_t* minor, int32_t* patch) {
  if (!major || !minor || !patch) return fail(ACL_ERROR_INVALID_PARAM, "aclrtGetVersion: null out-pointer");
  *major = 1; *minor = 0; *patch = 0;
  return ACL_SUCCESS;
}

SI_EXPORT int aclrtGetDeviceCount(uint32_t* count) {
  if (!count) return fail(ACL_ERROR_INVALID_PARAM, "aclrtGetDeviceCount: count is null");
  *count = (uint32_t)config().npus;
  return ACL_SUCCESS;
}

// real SoC names have no spaces ("Ascend910B3"); callers may split on them
SI_EXPORT const char* aclrtGetSocName() { return "Ascend910B3-standin"; }

SI_EXPORT int aclrtSetDevice(int32_t deviceId) {
  if (int rc = requireInit("aclrtSetDevice")) return rc;
  if (deviceId < 0 || deviceId >= config().npus)
    return fail(ACL_ERROR_RT_INVALID_DEVICEID, fmt("aclrtSetDevice: device %d does not exist (%d NPU(s); DS3_STANDIN_NPUS)", deviceId, config().npus));
  setCurrentDevice(deviceId);
  return ACL_SUCCESS;
}

SI_EXPORT int aclrtResetDevice(int32_t deviceId) {
  if (int rc = requireInit("aclrtResetDevice")) return rc;
  if (deviceId < 0 || deviceId >= config().npus)
    return fail(ACL_ERROR_RT_INVALID_DEVICEID, fmt("aclrtResetDevice: device %d does not exist", deviceId));
  if (currentDevice() == deviceId) setCurrentDevice(-1);
  return ACL_SUCCESS;
}

SI_EXPORT int aclrtGetDevice(int32_t* deviceId) {
  if (!deviceId) return fail(ACL_ERROR_INVALID_PARAM, "aclrtGetDevice: deviceId is null");
  int dev;
  if (int rc = requireDevice("aclrtGetDevice", &dev)) return rc;
  *deviceId = dev;
  return ACL_SUCCESS;
}

// aclrtMemAttr: ACL_DDR_MEM 0, ACL_HBM_MEM 1, ..._HUGE/_NORMAL/_P2P variants up to 9. All report the device's HBM.
SI_EXPORT int aclrtGetMemInfo(int attr, size_t* freeBytes, size_t* totalBytes) {
  int dev;
  if (int rc = requireDevice("aclrtGetMemInfo", &dev)) return rc;
  if (!freeBytes || !totalBytes) return fail(ACL_ERROR_INVALID_PARAM, "aclrtGetMemInfo: null out-pointer");
  if (attr < 0 || attr > 9) return fail(ACL_ERROR_INVALID_PARAM, fmt("aclrtGetMemInfo: attr %d is not an aclrtMemAttr", attr));
  uint64_t total = config().memPerNpu;
  *totalBytes = (size_t)total;
  *freeBytes = (size_t)(total - devUsed(dev));
  return ACL_SUCCESS;
}

// aclrtMemMallocPolicy: ACL_MEM_MALLOC_HUGE_FIRST 0, HUGE_ONLY 1, NORMAL_ONLY 2, + P2P variants 3..5
SI_EXPORT int aclrtMalloc(void** devPtr, size_t size, int policy) {
  int dev;
  if (int rc = requireDevice("aclrtMalloc", &dev)) return rc;
  if (!devPtr) return fail(ACL_ERROR_INVALID_PARAM, "aclrtMalloc: devPtr is null");
  if (size == 0) return fail(ACL_ERROR_INVALID_PARAM, "aclrtMalloc: size is 0");
  if (policy < 0 || policy > 5) return fail(ACL_ERROR_INVALID_PARAM, fmt("aclrtMalloc: policy %d is not an aclrtMemMallocPolicy", policy));
  return devMalloc(devPtr, size, dev, false);
}

SI_EXPORT int aclrtFree(void* devPtr) {
  if (int rc = requireInit("aclrtFree")) return rc;
  return devFree(devPtr, false, "aclrtFree");
}

SI_EXPORT int aclrtMallocHost(void** hostPtr, size_t size) {
  int dev;
  if (int rc = requireDevice("aclrtMallocHost", &dev)) return rc;
  if (!hostPtr) return fail(ACL_ERROR_INVALID_PARAM, "aclrtMallocHost: hostPtr is null");
  if (size == 0) return fail(ACL_ERROR_INVALID_PARAM, "aclrtMallocHost: size is 0");
  return devMalloc(hostPtr, size, dev, true);
}

SI_EXPORT int aclrtFreeHost(void* hostPtr) {
  if (int rc = requireInit("aclrtFreeHost")) return rc;
  return devFree(hostPtr, true, "aclrtFreeHost");
}

// aclrtMemcpyKind: HOST_TO_HOST 0, HOST_TO_DEVICE 1, DEVICE_TO_HOST 2, DEVICE_TO_DEVICE 3, DEFAULT 4
static const char* kindStr(int k) {
  static const char* n[] = {"ACL_MEMCPY_HOST_TO_HOST", "ACL_MEMCPY_HOST_TO_DEVICE", "ACL_MEMCPY_DEVICE_TO_HOST",
                            "ACL_MEMCPY_DEVICE_TO_DEVICE", "ACL_MEMCPY_DEFAULT"};
  return k >= 0 && k <= 4 ? n[k] : "?";
}
static int checkCopy(const char* fn, void* dst, size_t destMax, const void* src, size_t count, int kind, std::vector<MemRef>* refs) {
  if (!dst || !src) return fail(ACL_ERROR_INVALID_PARAM, fmt("%s: %s is null", fn, !dst ? "dst" : "src"));
  if (kind < 0 || kind > 4) return fail(ACL_ERROR_INVALID_PARAM, fmt("%s: kind %d is not an aclrtMemcpyKind", fn, kind));
  if (count > destMax) return fail(ACL_ERROR_INVALID_PARAM, fmt("%s: count %zu exceeds destMax %zu", fn, count, destMax));
  bool dDev = isDevicePtr(dst), sDev = isDevicePtr(src);
  if (kind == 4) kind = (sDev ? 2 : 0) | (dDev ? 1 : 0);  // DEFAULT: decided by where the pointers are
  bool wantD = kind == 1 || kind == 3, wantS = kind == 2 || kind == 3;
  std::string why;
  Alloc a;
  if (wantD) {
    if (!findDevice(dst, count, &a, &why)) return fail(ACL_ERROR_INVALID_PARAM, fmt("%s (%s): dst: %s", fn, kindStr(kind), why.c_str()));
    if (a.device != currentDevice()) return fail(ACL_ERROR_INVALID_PARAM, fmt("%s: dst is on device %d, current device is %d", fn, a.device, currentDevice()));
    if (refs) refs->push_back(MemRef{a.id, (uintptr_t)dst, count});
  } else if (dDev) {
    return fail(ACL_ERROR_INVALID_PARAM, fmt("%s (%s): dst %p is device memory", fn, kindStr(kind), dst));
  }
  if (wantS) {
    if (!findDevice(src, count, &a, &why)) return fail(ACL_ERROR_INVALID_PARAM, fmt("%s (%s): src: %s", fn, kindStr(kind), why.c_str()));
    if (a.device != currentDevice()) return fail(ACL_ERROR_INVALID_PARAM, fmt("%s: src is on device %d, current device is %d", fn, a.device, currentDevice()));
    if (refs) refs->push_back(MemRef{a.id, (uintptr_t)src, count});
  } else if (sDev) {
    return fail(ACL_ERROR_INVALID_PARAM, fmt("%s (%s): src %p is device memory", fn, kindStr(kind), src));
  }
  return 0;
}

SI_EXPORT int aclrtMemcpy(void* dst, size_t destMax, const void* src, size_t count, int kind) {
  int dev;
  if (int rc = requireDevice("aclrtMemcpy", &dev)) return rc;
  std::vector<MemRef> refs;
  if (int rc = checkCopy("aclrtMemcpy", dst, destMax, src, count, kind, &refs)) return rc;
  if (!config().eager)
    for (auto& r : refs) {
      std::string who;
      if (pendingUse(r.base, r.bytes, &who))
        return fail(ACL_ERROR_FAILURE, fmt("aclrtMemcpy: %zu bytes at %p are used by %s; synchronize that stream before a synchronous copy "
                                           "(on an NPU this copy would race with the queued task)", r.bytes, (void*)r.base, who.c_str()));
    }
  if (count) std::memmove(dst, src, count);
  return ACL_SUCCESS;
}

SI_EXPORT int aclrtMemcpyAsync(void* dst, size_t destMax, const void* src, size_t count, int kind, void* stream) {
  int rc;
  auto s = getStream(stream, "aclrtMemcpyAsync", &rc);
  if (!s) return rc;
  std::vector<MemRef> refs;
  if ((rc = checkCopy("aclrtMemcpyAsync", dst, destMax, src, count, kind, &refs))) return rc;
  Task t;
  t.what = "aclrtMemcpyAsync";
  t.mem = refs;
  t.run = [dst, src, count](std::string*) { if (count) std::memmove(dst, src, count); return 0; };  // host side read when the task runs
  return enqueue(s, std::move(t));
}

static int checkSet(const char* fn, void* p, size_t maxCount, size_t count, std::vector<MemRef>* refs) {
  if (!p) return fail(ACL_ERROR_INVALID_PARAM, fmt("%s: devPtr is null", fn));
  if (count > maxCount) return fail(ACL_ERROR_INVALID_PARAM, fmt("%s: count %zu exceeds maxCount %zu", fn, count, maxCount));
  std::string why;
  Alloc a;
  if (!findDevice(p, count, &a, &why)) return fail(ACL_ERROR_INVALID_PARAM, fmt("%s: %s", fn, why.c_str()));
  refs->push_back(MemRef{a.id, (uintptr_t)p, count});
  return 0;
}

SI_EXPORT int aclrtMemset(void* devPtr, size_t maxCount, int32_t value, size_t count) {
  int dev;
  if (int rc = requireDevice("aclrtMemset", &dev)) return rc;
  std::vector<MemRef> refs;
  if (int rc = checkSet("aclrtMemset", devPtr, maxCount, count, &refs)) return rc;
  std::string who;
  if (!config().eager && pendingUse((uintptr_t)devPtr, count, &who))
    return fail(ACL_ERROR_FAILURE, fmt("aclrtMemset: memory at %p is used by %s; synchronize first", devPtr, who.c_str()));
  std::memset(devPtr, value & 0xff, count);
  return ACL_SUCCESS;
}

SI_EXPORT int aclrtMemsetAsync(void* devPtr, size_t maxCount, int32_t value, size_t count, void* stream) {
  int rc;
  auto s = getStream(stream, "aclrtMemsetAsync", &rc);
  if (!s) return rc;
  std::vector<MemRef> refs;
  if ((rc = checkSet("aclrtMemsetAsync", devPtr, maxCount, count, &refs))) return rc;
  Task t;
  t.what = "aclrtMemsetAsync";
  t.mem = refs;
  t.run = [devPtr, value, count](std::string*) { std::memset(devPtr, value & 0xff, count); return 0; };
  return enqueue(s, std::move(t));
}

SI_EXPORT int aclrtCreateStream(void** stream) {
  int dev;
  if (int rc = requireDevice("aclrtCreateStream", &dev)) return rc;
  if (!stream) return fail(ACL_ERROR_INVALID_PARAM, "aclrtCreateStream: stream is null");
  auto s = std::make_shared<Stream>();
  s->device = dev;
  *stream = streams().add(s);
  return ACL_SUCCESS;
}

SI_EXPORT int aclrtDestroyStream(void* stream) {
  if (int rc = requireInit("aclrtDestroyStream")) return rc;
  if (!stream) return fail(ACL_ERROR_INVALID_PARAM, "aclrtDestroyStream: stream is null");
  std::string why;
  auto s = streams().get(stream, &why);
  if (!s) return fail(ACL_ERROR_RT_INVALID_HANDLE, fmt("aclrtDestroyStream: %s", why.c_str()));
  size_t pending;
  { std::lock_guard<std::mutex> g(s->mu); pending = s->q.size(); }
  streams().take(stream, nullptr);
  if (pending)
    return fail(ACL_ERROR_RT_PARAM_INVALID, fmt("aclrtDestroyStream: %zu task(s) were still queued (call aclrtSynchronizeStream before destroying); they were dropped", pending));
  return ACL_SUCCESS;
}

SI_EXPORT int aclrtSynchronizeStream(void* stream) {
  int rc;
  auto s = getStream(stream, "aclrtSynchronizeStream", &rc);
  if (!s) return rc;
  return syncStream(s, "aclrtSynchronizeStream");
}

SI_EXPORT int aclrtSynchronizeStreamWithTimeout(void* stream, int32_t timeout) {
  (void)timeout;
  return aclrtSynchronizeStream(stream);
}

SI_EXPORT int aclrtSynchronizeDevice() {
  int dev;
  if (int rc = requireDevice("aclrtSynchronizeDevice", &dev)) return rc;
  std::vector<std::shared_ptr<Stream>> mine;
  {
    auto& reg = streams();
    std::lock_guard<std::mutex> g(reg.mu);
    for (auto& kv : reg.live) if (kv.second->device == dev) mine.push_back(kv.second);
  }
  int first = 0;
  for (auto& s : mine) {
    int rc = syncStream(s, "aclrtSynchronizeDevice");
    if (rc && !first) first = rc;
  }
  return first;
}

// Not part of CANN: counters for tests (live allocations, tensors, pending executors, ...), as JSON.
SI_EXPORT const char* ds3StandinStats() {
  static thread_local std::string s;
  s = statsJson();
  return s.c_str();
}
