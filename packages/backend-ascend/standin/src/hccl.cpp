// libhccl: communicators between ranks that are threads of this process. The root info bytes name a
// group in a process-wide table; collectives are stream tasks that meet at a per-call barrier, where the
// last rank to arrive checks that every rank called the same collective (kind, count, dtype, op) and
// computes the result for all of them.
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <random>

#include "common.h"

using namespace si;

namespace si { extern std::atomic<int> gCommsLive; }

namespace {
constexpr size_t ROOT_INFO_BYTES = 4108;  // HCCL_ROOT_INFO_BYTES
const char MAGIC[16] = "DS3SI-HCCLROOT1";

struct RootBytes {
  char magic[16];
  int64_t pid;
  uint64_t group;
  uint64_t check;
};
uint64_t checksum(const RootBytes& r) { return (r.group * 0x9E3779B97F4A7C15ull) ^ (uint64_t)r.pid ^ 0xD53A11CEull; }

enum Coll { C_ALLREDUCE, C_ALLGATHER, C_BROADCAST, C_REDUCESCATTER, C_BARRIER };
const char* collName(int c) {
  static const char* n[] = {"HcclAllReduce", "HcclAllGather", "HcclBroadcast", "HcclReduceScatter", "HcclBarrier"};
  return n[c];
}
const char* hcclDtName(int d) {
  static const char* n[] = {"INT8", "INT16", "INT32", "FP16", "FP32", "INT64", "UINT64", "UINT8", "UINT16", "UINT32", "FP64", "BFP16"};
  return d >= 0 && d <= 11 ? n[d] : "?";
}
int hcclToAcl(int d) {  // HcclDataType -> aclDataType for element access
  static const int m[] = {DT_INT8, DT_INT16, DT_INT32, DT_FLOAT16, DT_FLOAT, DT_INT64, DT_UINT64, DT_UINT8, DT_UINT16, DT_UINT32, DT_DOUBLE, DT_BF16};
  return d >= 0 && d <= 11 ? m[d] : -1;
}

struct Call {
  int coll, dtype, op, root;
  uint64_t count;
  char *send, *recv;
};
struct Slot {
  std::vector<bool> arrived;
  std::vector<Call> calls;
  int n = 0;
  bool done = false;
  int rc = 0;
  std::string err;
  int left = 0;
};
struct Group {
  uint64_t id;
  uint32_t nRanks;
  std::mutex mu;
  std::condition_variable cv;
  std::vector<int> devices;  // -1: not joined
  uint32_t joined = 0;
  std::map<uint64_t, Slot> slots;
};
std::mutex gGroupsMu;
std::map<uint64_t, std::shared_ptr<Group>> gGroups;
std::atomic<uint64_t> gNextGroup{1};

struct Comm {
  std::shared_ptr<Group> g;
  uint32_t rank;
  int device;
  uint64_t seq = 0;  // collectives enqueued by this rank
};
Registry<Comm>& comms() { static Registry<Comm> r(K_COMM); return r; }

int herr(int code, const std::string& m) { return fail(code, m); }

std::string callStr(const Call& c) {
  if (c.coll == C_BARRIER) return "HcclBarrier";
  return fmt("%s(count %llu, %s%s)", collName(c.coll), (unsigned long long)c.count, hcclDtName(c.dtype),
             c.coll == C_ALLREDUCE || c.coll == C_REDUCESCATTER ? (std::string(", op ") + std::to_string(c.op)).c_str() : "");
}

// runs on the last rank to arrive, with g.mu held
void compute(Group& g, Slot& s) {
  const Call& c0 = s.calls[0];
  for (uint32_t r = 1; r < g.nRanks; r++) {
    const Call& c = s.calls[r];
    if (c.coll != c0.coll || c.count != c0.count || c.dtype != c0.dtype || c.op != c0.op || c.root != c0.root) {
      s.rc = ACL_ERROR_FAILURE;
      s.err = fmt("collective mismatch: rank 0 called %s but rank %u called %s", callStr(c0).c_str(), r, callStr(c).c_str());
      return;
    }
  }
  if (c0.coll == C_BARRIER) return;
  int dt = hcclToAcl(c0.dtype);
  size_t es = dtypeSize(dt);
  uint64_t n = c0.count;
  auto desc = [&](char* p, uint64_t cnt) {
    TensorDesc t;
    t.dims = {(int64_t)cnt};
    t.strides = {1};
    t.storage = {(int64_t)cnt};
    t.dtype = dt;
    t.data = p;
    return t;
  };
  uint32_t R = g.nRanks;
  if (c0.coll == C_ALLGATHER) {
    std::vector<char> all(n * es * R);
    for (uint32_t r = 0; r < R; r++) std::memcpy(all.data() + r * n * es, s.calls[r].send, n * es);
    for (uint32_t r = 0; r < R; r++) std::memcpy(s.calls[r].recv, all.data(), all.size());
    return;
  }
  if (c0.coll == C_BROADCAST) {
    std::vector<char> b(s.calls[c0.root].send, s.calls[c0.root].send + n * es);
    for (uint32_t r = 0; r < R; r++) std::memcpy(s.calls[r].recv, b.data(), b.size());
    return;
  }
  // reductions: in rank order 0..R-1; floats accumulate in fp32 (double for FP64) and are rounded once
  uint64_t total = c0.coll == C_REDUCESCATTER ? n * R : n;
  std::vector<double> acc(total);
  for (uint32_t r = 0; r < R; r++) {
    TensorDesc t = desc(s.calls[r].send, total);
    std::vector<double> v = isFloat(dt) ? readD(t) : std::vector<double>();
    std::vector<int64_t> vi = isFloat(dt) ? std::vector<int64_t>() : readI(t);
    for (uint64_t i = 0; i < total; i++) {
      double x = isFloat(dt) ? v[i] : (double)vi[i];
      if (r == 0) { acc[i] = x; continue; }
      double& a = acc[i];
      switch (c0.op) {
        case 0: a = a + x; break;
        case 1: a = a * x; break;
        case 2: a = a > x ? a : x; break;
        case 3: a = a < x ? a : x; break;
      }
      if (dt != DT_DOUBLE && isFloat(dt)) a = (float)a;
    }
  }
  std::vector<float> f(acc.begin(), acc.end());
  std::vector<int64_t> iv(total);
  for (uint64_t i = 0; i < total; i++) iv[i] = (int64_t)acc[i];
  for (uint32_t r = 0; r < R; r++) {
    uint64_t base = c0.coll == C_REDUCESCATTER ? r * n : 0;
    TensorDesc t = desc(s.calls[r].recv, n);
    if (isFloat(dt)) writeF(t, f.data() + base); else writeI(t, iv.data() + base);
  }
}

int meet(const std::shared_ptr<Comm>& cm, uint64_t seq, Call call, std::string* err) {
  Group& g = *cm->g;
  std::unique_lock<std::mutex> lk(g.mu);
  Slot& s = g.slots[seq];
  if (s.arrived.empty()) { s.arrived.assign(g.nRanks, false); s.calls.resize(g.nRanks); s.left = g.nRanks; }
  s.arrived[cm->rank] = true;
  s.calls[cm->rank] = call;
  s.n++;
  if (s.n == (int)g.nRanks) {
    compute(g, s);
    s.done = true;
    g.cv.notify_all();
  } else {
    auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(config().hcclTimeoutMs);
    if (!g.cv.wait_until(lk, until, [&] { return s.done; })) {
      std::string missing;
      for (uint32_t r = 0; r < g.nRanks; r++) if (!s.arrived[r]) missing += (missing.empty() ? "" : ",") + std::to_string(r);
      *err = fmt("%s on rank %u (collective #%llu): timed out after %d ms waiting for rank(s) %s (DS3_STANDIN_HCCL_TIMEOUT_MS)",
                 collName(call.coll), cm->rank, (unsigned long long)seq + 1, config().hcclTimeoutMs, missing.c_str());
      s.n--;
      s.arrived[cm->rank] = false;
      return ACL_ERROR_FAILURE;
    }
  }
  int rc = s.rc;
  if (rc) *err = fmt("%s on rank %u (collective #%llu): %s", collName(call.coll), cm->rank, (unsigned long long)seq + 1, s.err.c_str());
  if (--s.left == 0) g.slots.erase(seq);
  return rc;
}

std::shared_ptr<Comm> getComm(void* h, const char* fn, int* rc) {
  std::string why;
  auto c = comms().get(h, &why);
  if (!c) *rc = herr(HCCL_E_PARA, fmt("%s: comm: %s", fn, why.c_str()));
  return c;
}

int enqueueColl(const char* fn, void* commH, void* stream, Call call, uint64_t sendBytes, uint64_t recvBytes) {
  int rc = 0;
  auto cm = getComm(commH, fn, &rc);
  if (!cm) return rc;
  if (call.coll != C_BARRIER) {
    if (hcclToAcl(call.dtype) < 0) return herr(HCCL_E_PARA, fmt("%s: dataType %d is not an HcclDataType", fn, call.dtype));
    if ((call.coll == C_ALLREDUCE || call.coll == C_REDUCESCATTER) && (call.op < 0 || call.op > 3))
      return herr(HCCL_E_PARA, fmt("%s: op %d is not an HcclReduceOp", fn, call.op));
    if (!call.send || !call.recv) return herr(HCCL_E_PTR, fmt("%s: %s is null", fn, !call.send ? "sendBuf" : "recvBuf"));
  }
  if (currentDevice() != cm->device)
    return herr(HCCL_E_PARA, fmt("%s: the communicator of rank %u is on device %d but this thread's current device is %d", fn, cm->rank, cm->device, currentDevice()));
  std::vector<MemRef> refs;
  std::string why;
  Alloc a;
  if (call.coll != C_BARRIER) {
    if (!findDevice(call.send, sendBytes, &a, &why)) return herr(HCCL_E_PTR, fmt("%s: sendBuf: %s", fn, why.c_str()));
    refs.push_back(MemRef{a.id, (uintptr_t)call.send, (size_t)sendBytes});
    if (!findDevice(call.recv, recvBytes, &a, &why)) return herr(HCCL_E_PTR, fmt("%s: recvBuf: %s", fn, why.c_str()));
    refs.push_back(MemRef{a.id, (uintptr_t)call.recv, (size_t)recvBytes});
  }
  auto s = getStream(stream, fn, &rc);
  if (!s) return HCCL_E_PARA;
  uint64_t seq = cm->seq++;
  Task t;
  t.what = fn;
  t.mem = refs;
  t.run = [cm, seq, call](std::string* err) { return meet(cm, seq, call, err); };
  enqueue(s, std::move(t));
  return HCCL_SUCCESS;
}
}  // namespace

SI_EXPORT int HcclGetRootInfo(void* rootInfo) {
  if (!rootInfo) return herr(HCCL_E_PTR, "HcclGetRootInfo: rootInfo is null");
  if (int rc = requireInit("HcclGetRootInfo")) return HCCL_E_PARA + 0 * rc;
  RootBytes r{};
  std::memcpy(r.magic, MAGIC, 16);
  r.pid = (int64_t)getpid();
  std::random_device rd;
  r.group = ((((uint64_t)rd() << 32) ^ rd()) & 0xffffffff00000000ull) | gNextGroup++;
  r.check = checksum(r);
  std::memset(rootInfo, 0, ROOT_INFO_BYTES);
  std::memcpy(rootInfo, &r, sizeof r);
  auto g = std::make_shared<Group>();
  g->id = r.group;
  g->nRanks = 0;
  std::lock_guard<std::mutex> lk(gGroupsMu);
  gGroups[r.group] = g;
  return HCCL_SUCCESS;
}

SI_EXPORT int HcclCommInitRootInfo(uint32_t nRanks, const void* rootInfo, uint32_t rank, void** comm) {
  if (!rootInfo || !comm) return herr(HCCL_E_PTR, "HcclCommInitRootInfo: rootInfo or comm is null");
  int dev;
  if (requireDevice("HcclCommInitRootInfo", &dev)) return HCCL_E_PARA;
  if (nRanks == 0) return herr(HCCL_E_PARA, "HcclCommInitRootInfo: nRanks is 0");
  if (rank >= nRanks) return herr(HCCL_E_PARA, fmt("HcclCommInitRootInfo: rank %u is not below nRanks %u", rank, nRanks));
  RootBytes r;
  std::memcpy(&r, rootInfo, sizeof r);
  if (std::memcmp(r.magic, MAGIC, 16) != 0 || r.check != checksum(r))
    return herr(HCCL_E_PARA, "HcclCommInitRootInfo: rootInfo was not produced by HcclGetRootInfo (bytes damaged or from something else)");
  if (r.pid != (int64_t)getpid())
    return herr(HCCL_E_PARA, fmt("HcclCommInitRootInfo: rootInfo comes from process %lld; the stand-in connects threads of one process (%lld) only",
                                 (long long)r.pid, (long long)getpid()));
  std::shared_ptr<Group> g;
  {
    std::lock_guard<std::mutex> lk(gGroupsMu);
    auto it = gGroups.find(r.group);
    if (it == gGroups.end()) return herr(HCCL_E_PARA, "HcclCommInitRootInfo: rootInfo names a group that no longer exists (all its communicators were destroyed)");
    g = it->second;
  }
  std::unique_lock<std::mutex> lk(g->mu);
  if (g->nRanks == 0) { g->nRanks = nRanks; g->devices.assign(nRanks, -1); }
  if (g->nRanks != nRanks)
    return herr(HCCL_E_PARA, fmt("HcclCommInitRootInfo: world size mismatch: rank %u says nRanks %u but the group was joined with nRanks %u", rank, nRanks, g->nRanks));
  if (g->devices[rank] >= 0) return herr(HCCL_E_PARA, fmt("HcclCommInitRootInfo: rank %u already joined this group", rank));
  for (uint32_t q = 0; q < nRanks; q++)
    if (g->devices[q] == dev)
      return herr(HCCL_E_PARA, fmt("HcclCommInitRootInfo: rank %u and rank %u are both on device %d (HCCL needs one device per rank)", rank, q, dev));
  g->devices[rank] = dev;
  g->joined++;
  g->cv.notify_all();
  auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(config().hcclTimeoutMs);
  if (!g->cv.wait_until(lk, until, [&] { return g->joined >= g->nRanks; })) {
    g->devices[rank] = -1;
    g->joined--;
    return herr(HCCL_E_TIMEOUT, fmt("HcclCommInitRootInfo: rank %u waited %d ms but only %u of %u ranks joined (DS3_STANDIN_HCCL_TIMEOUT_MS)", rank,
                                    config().hcclTimeoutMs, g->joined, g->nRanks));
  }
  auto c = std::make_shared<Comm>();
  c->g = g;
  c->rank = rank;
  c->device = dev;
  *comm = comms().add(c);
  gCommsLive++;
  return HCCL_SUCCESS;
}

SI_EXPORT int HcclCommDestroy(void* comm) {
  std::string why;
  auto c = comms().take(comm, &why);
  if (!c) return herr(HCCL_E_PARA, "HcclCommDestroy: " + why);
  gCommsLive--;
  std::lock_guard<std::mutex> lk(c->g->mu);
  if (--c->g->joined == 0) {
    std::lock_guard<std::mutex> gl(gGroupsMu);
    gGroups.erase(c->g->id);
  }
  return HCCL_SUCCESS;
}

SI_EXPORT int HcclGetRankSize(void* comm, uint32_t* rankSize) {
  int rc = 0;
  auto c = getComm(comm, "HcclGetRankSize", &rc);
  if (!c) return rc;
  if (!rankSize) return herr(HCCL_E_PTR, "HcclGetRankSize: rankSize is null");
  *rankSize = c->g->nRanks;
  return HCCL_SUCCESS;
}

SI_EXPORT int HcclGetRankId(void* comm, uint32_t* rank) {
  int rc = 0;
  auto c = getComm(comm, "HcclGetRankId", &rc);
  if (!c) return rc;
  if (!rank) return herr(HCCL_E_PTR, "HcclGetRankId: rank is null");
  *rank = c->rank;
  return HCCL_SUCCESS;
}

SI_EXPORT int HcclAllReduce(void* sendBuf, void* recvBuf, uint64_t count, int dataType, int op, void* comm, void* stream) {
  size_t es = dtypeSize(hcclToAcl(dataType));
  return enqueueColl("HcclAllReduce", comm, stream, Call{C_ALLREDUCE, dataType, op, 0, count, (char*)sendBuf, (char*)recvBuf}, count * es, count * es);
}

SI_EXPORT int HcclAllGather(void* sendBuf, void* recvBuf, uint64_t sendCount, int dataType, void* comm, void* stream) {
  int rc = 0;
  auto c = getComm(comm, "HcclAllGather", &rc);
  if (!c) return rc;
  size_t es = dtypeSize(hcclToAcl(dataType));
  return enqueueColl("HcclAllGather", comm, stream, Call{C_ALLGATHER, dataType, 0, 0, sendCount, (char*)sendBuf, (char*)recvBuf},
                     sendCount * es, sendCount * es * c->g->nRanks);
}

SI_EXPORT int HcclReduceScatter(void* sendBuf, void* recvBuf, uint64_t recvCount, int dataType, int op, void* comm, void* stream) {
  int rc = 0;
  auto c = getComm(comm, "HcclReduceScatter", &rc);
  if (!c) return rc;
  size_t es = dtypeSize(hcclToAcl(dataType));
  return enqueueColl("HcclReduceScatter", comm, stream, Call{C_REDUCESCATTER, dataType, op, 0, recvCount, (char*)sendBuf, (char*)recvBuf},
                     recvCount * es * c->g->nRanks, recvCount * es);
}

SI_EXPORT int HcclBroadcast(void* buf, uint64_t count, int dataType, uint32_t root, void* comm, void* stream) {
  int rc = 0;
  auto c = getComm(comm, "HcclBroadcast", &rc);
  if (!c) return rc;
  if (root >= c->g->nRanks) return herr(HCCL_E_PARA, fmt("HcclBroadcast: root %u is not below the world size %u", root, c->g->nRanks));
  size_t es = dtypeSize(hcclToAcl(dataType));
  return enqueueColl("HcclBroadcast", comm, stream, Call{C_BROADCAST, dataType, 0, (int)root, count, (char*)buf, (char*)buf}, count * es, count * es);
}

SI_EXPORT int HcclBarrier(void* comm, void* stream) {
  return enqueueColl("HcclBarrier", comm, stream, Call{C_BARRIER, 0, 0, 0, 0, nullptr, nullptr}, 0, 0);
}

SI_EXPORT const char* HcclGetErrorString(int code) {
  switch (code) {
    case 0: return "HCCL_SUCCESS"; case 1: return "HCCL_E_PARA: parameter error"; case 2: return "HCCL_E_PTR: empty pointer";
    case 3: return "HCCL_E_MEMORY: memory error"; case 4: return "HCCL_E_INTERNAL: internal error"; case 5: return "HCCL_E_NOT_SUPPORT: not supported";
    case 6: return "HCCL_E_NOT_FOUND: not found"; case 7: return "HCCL_E_UNAVAIL: resource unavailable"; case 8: return "HCCL_E_SYSCALL: system call error";
    case 9: return "HCCL_E_TIMEOUT: timeout"; default: return "HCCL error";
  }
}
