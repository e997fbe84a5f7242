// A small SIMT emulator: runs the CUDA/HIP kernel sources of @ds3/backend-cuda on the host (g++), at a warp
// width of DS3_EMU_WARP lanes (64: AMD's wavefront, with the HIP lane intrinsics; 32: NVIDIA's warp, with the CUDA
// ones), so that the lane logic written for wave64 runs somewhere without an AMD GPU.
//
// Model: the blocks of a launch run one after another; the threads of a block are fibers (ucontext stacks,
// switched with _setjmp/_longjmp) on ONE OS thread, scheduled round-robin and switched only at __syncthreads and
// at lane operations (shuffle, ballot, match, reduce). A lane operation is a barrier of the warp: every lane that
// has not exited must reach it; each lane then reads the values the lanes published (double-buffered by the
// parity of the operation). __syncthreads waits for every thread of the block. A lane op that not every live lane
// of the warp reaches, a __syncthreads that a lane of the warp misses, or a lane op in a warp with exited lanes is
// reported as an error (deadlock / divergence), as is a block size that is not a whole number of warps.
// Shared memory: `__shared__` is `static` (one instance, blocks run in turn); dynamic shared memory (the test's
// build rewrites `extern __shared__ T name[]` into ds3emu::dyn_smem()) is filled with 0xff bytes before every block.
// Atomics are plain read-modify-writes (fibers never switch inside them).
// What this does NOT model: concurrent execution (data races, the memory model, __threadfence), real scheduling
// orders, timing, register/LDS capacity, and anything of the mma/MFMA kernels (not compiled here).
#pragma once
#include <setjmp.h>
#include <stdint.h>
#include <string.h>
#include <ucontext.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#ifndef DS3_EMU_WARP
#error "DS3_EMU_WARP (32 or 64) must be defined"
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

// ---- host types the sources use -----------------------------------------------------------------------
typedef void* cudaStream_t;
typedef int cudaError_t;
constexpr int cudaSuccess = 0;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline int cudaGetDevice(int* d) {
  *d = 0;
  return 0;
}
template <class F>
inline int cudaFuncSetAttribute(F, cudaFuncAttribute, int) {
  return 0;
}
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint2 {
  unsigned x, y;
};
struct uint4 {
  unsigned x, y, z, w;
};
struct float2 {
  float x, y;
};
struct float4 {
  float x, y, z, w;
};
inline float2 make_float2(float a, float b) { return float2{a, b}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }

inline float __uint_as_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
inline float __int_as_float(int u) { return __uint_as_float(uint32_t(u)); }
inline int __float_as_int(float f) { return int(__float_as_uint(f)); }
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
inline void sincos(double x, double* s, double* c) {
  *s = std::sin(x);
  *c = std::cos(x);
}

namespace ds3emu {

constexpr int W = DS3_EMU_WARP;
/** FP8 weights decoded as e4m3fnuz (what the gfx942 code object does after the load-time conversion) */
inline bool fnuz_weights = false;
enum State { RUN = 0, AT_BLOCK = 1, AT_WARP = 2, DONE = 3 };

struct Fiber {
  ucontext_t uc;
  jmp_buf jb;
  std::unique_ptr<char[]> stack;  // not zero-filled: untouched pages cost nothing
  dim3 tid;
  int lin = 0;
  int state = RUN;
  bool started = false;
  unsigned ops = 0;  // lane operations so far (parity selects the buffer)
};

struct Wave {
  uint64_t slot[2][W];
};

struct Emu {
  std::vector<Fiber> fibers;
  std::vector<Wave> waves;
  jmp_buf sched;
  ucontext_t schedUc;
  Fiber* cur = nullptr;
  dim3 blockIdx, blockDim, gridDim;
  std::vector<uint64_t> dyn;  // 8-byte aligned (16 via the allocator in practice)
  void (*entry)(void*) = nullptr;
  void* entryArg = nullptr;
  std::string error;
  long long switches = 0;
};
inline Emu& emu() {
  static Emu e;
  return e;
}

inline void* dyn_smem() { return emu().dyn.data(); }

[[noreturn]] inline void fail(const std::string& m) {
  Emu& e = emu();
  if (e.error.empty()) e.error = m;
  throw std::runtime_error(m);
}

inline void yield(int state) {
  Emu& e = emu();
  Fiber* f = e.cur;
  f->state = state;
  e.switches++;
  if (!_setjmp(f->jb)) _longjmp(e.sched, 1);
}

inline void trampoline() {
  Emu& e = emu();
  try {
    e.entry(e.entryArg);
  } catch (const std::exception& ex) {
    if (e.error.empty()) e.error = ex.what();
  }
  e.cur->state = DONE;
  _longjmp(e.sched, 1);
}

/** runs one block: fibers 0..n-1, round-robin, releasing warp and block barriers */
inline void run_block(int n) {
  Emu& e = emu();
  const size_t STACK = 128 * 1024;
  if (e.fibers.size() < size_t(n)) e.fibers.resize(n);
  const int nw = n / W;
  if (e.waves.size() < size_t(nw)) e.waves.resize(nw);
  for (int i = 0; i < n; i++) {
    Fiber& f = e.fibers[i];
    if (!f.stack) f.stack.reset(new char[STACK]);
    f.lin = i;
    f.tid = dim3(i % e.blockDim.x, (i / e.blockDim.x) % e.blockDim.y, i / (e.blockDim.x * e.blockDim.y));
    f.state = RUN;
    f.started = false;
    f.ops = 0;
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = f.stack.get();
    f.uc.uc_stack.ss_size = STACK;
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, trampoline, 0);
  }
  for (;;) {
    bool ran = false;
    for (int i = 0; i < n; i++) {
      Fiber& f = e.fibers[i];
      if (f.state != RUN) continue;
      ran = true;
      e.cur = &f;
      if (!_setjmp(e.sched)) {
        if (!f.started) {
          f.started = true;
          swapcontext(&e.schedUc, &f.uc);
        } else {
          _longjmp(f.jb, 1);
        }
      }
      e.cur = nullptr;
      if (!e.error.empty()) throw std::runtime_error(e.error);
    }
    if (ran) continue;
    // nobody runnable: release a barrier or finish
    bool any = false, released = false;
    for (int w = 0; w < nw; w++) {
      int live = 0, atWarp = 0, atBlock = 0, done = 0;
      for (int l = 0; l < W; l++) {
        const int s = e.fibers[w * W + l].state;
        if (s == DONE) done++;
        else live++;
        if (s == AT_WARP) atWarp++;
        if (s == AT_BLOCK) atBlock++;
      }
      if (live) any = true;
      if (atWarp) {
        if (atWarp != live)
          fail("lane operation not reached by every live lane of warp " + std::to_string(w) + " (" + std::to_string(atWarp) + " of " +
               std::to_string(live) + "; " + std::to_string(atBlock) + " at __syncthreads)");
        if (done) fail("lane operation in warp " + std::to_string(w) + " after " + std::to_string(done) + " of its lanes exited");
        for (int l = 0; l < W; l++) e.fibers[w * W + l].state = RUN;
        released = true;
      }
    }
    if (released) continue;
    if (!any) return;
    // everyone live is at the block barrier
    for (int i = 0; i < n; i++)
      if (e.fibers[i].state == AT_BLOCK) e.fibers[i].state = RUN;
  }
}

struct Cfg {
  dim3 grid, block;
  size_t smem;
  Cfg(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(s) {}
};

template <class... P, class... A>
void launch(const Cfg& c, void (*k)(P...), A... args) {
  Emu& e = emu();
  const int n = int(c.block.x * c.block.y * c.block.z);
  if (n <= 0 || n > 1024) fail("bad block size " + std::to_string(n));
  if (n % W) fail("block of " + std::to_string(n) + " threads is not a whole number of " + std::to_string(W) + "-lane warps");
  if (c.smem > 64 * 1024 && W == 64) fail("dynamic shared memory of " + std::to_string(c.smem) + " bytes exceeds the 64 KB LDS of AMD CDNA");
  struct Call {
    void (*k)(P...);
    std::tuple<A...> a;
  } call{k, std::tuple<A...>(args...)};
  e.entry = [](void* p) {
    Call* cl = static_cast<Call*>(p);
    std::apply([&](auto&... xs) { cl->k(xs...); }, cl->a);
  };
  e.entryArg = &call;
  e.gridDim = c.grid;
  e.blockDim = c.block;
  for (unsigned z = 0; z < c.grid.z; z++)
    for (unsigned y = 0; y < c.grid.y; y++)
      for (unsigned x = 0; x < c.grid.x; x++) {
        e.blockIdx = dim3(x, y, z);
        e.dyn.assign((c.smem + 7) / 8 + 2, ~0ull);
        run_block(n);
      }
}

inline int lane() { return emu().cur->lin % W; }
/** publish v, wait for the warp, return the published values of all lanes */
template <class T>
inline const T* exchange(T v) {
  static_assert(sizeof(T) <= 8, "lane values up to 8 bytes");
  Emu& e = emu();
  Fiber* f = e.cur;
  Wave& wv = e.waves[f->lin / W];
  const unsigned par = f->ops++ & 1;
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  wv.slot[par][f->lin % W] = bits;
  yield(AT_WARP);
  static thread_local T out[W];
  // (a fiber reads its copy before it can reach the next op; `out` is per call site use, copied by callers)
  for (int l = 0; l < W; l++) memcpy(&out[l], &wv.slot[par][l], sizeof(T));
  return out;
}
template <class T>
inline T shfl_from(T v, int src) {
  const T* a = exchange(v);
  return a[src];
}

}  // namespace ds3emu

inline void __syncthreads() { ds3emu::yield(ds3emu::AT_BLOCK); }

#define threadIdx (ds3emu::emu().cur->tid)
#define blockIdx (ds3emu::emu().blockIdx)
#define blockDim (ds3emu::emu().blockDim)
#define gridDim (ds3emu::emu().gridDim)

// ---- lane intrinsics: HIP forms (64-bit masks) and CUDA forms (32-bit masks, _sync) ------------------------
template <class T>
inline T __shfl_xor(T v, int o) {
  return ds3emu::shfl_from(v, (ds3emu::lane() ^ o) % ds3emu::W);
}
template <class T>
inline T __shfl_up(T v, int o) {
  const int l = ds3emu::lane();
  const T* a = ds3emu::exchange(v);
  return l >= o ? a[l - o] : v;
}
template <class T>
inline T __shfl(T v, int src) {
  return ds3emu::shfl_from(v, ((src % ds3emu::W) + ds3emu::W) % ds3emu::W);
}
inline unsigned long long __ballot(int p) {
  const int* a = ds3emu::exchange(int(p != 0));
  unsigned long long m = 0;
  for (int l = 0; l < ds3emu::W; l++)
    if (a[l]) m |= 1ull << l;
  return m;
}
inline int __ffsll(unsigned long long m) { return m ? __builtin_ctzll(m) + 1 : 0; }
inline int __clzll(long long m) { return m ? __builtin_clzll((unsigned long long)m) : 64; }
inline int __popcll(unsigned long long m) { return __builtin_popcountll(m); }

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int o) {
  return __shfl_xor(v, o);
}
template <class T>
inline T __shfl_up_sync(unsigned, T v, int o) {
  return __shfl_up(v, o);
}
template <class T>
inline T __shfl_sync(unsigned, T v, int src) {
  return __shfl(v, src);
}
inline unsigned __ballot_sync(unsigned, int p) { return unsigned(__ballot(p)); }
inline unsigned __match_any_sync(unsigned, unsigned key) {
  const unsigned* a = ds3emu::exchange(key);
  unsigned m = 0;
  for (int l = 0; l < ds3emu::W; l++)
    if (a[l] == key) m |= 1u << l;
  return m;
}
inline unsigned __reduce_add_sync(unsigned mask, unsigned v) {
  const unsigned* a = ds3emu::exchange(v);
  unsigned s = 0;
  for (int l = 0; l < ds3emu::W; l++)
    if (mask >> l & 1u) s += a[l];
  return s;
}
inline int __ffs(unsigned m) { return m ? __builtin_ctz(m) + 1 : 0; }
inline int __clz(unsigned m) { return m ? __builtin_clz(m) : 32; }
inline int __popc(unsigned m) { return __builtin_popcount(m); }

// ---- AMD matrix core: v_mfma_f32_32x32x8bf16_1k (one block), in the layout the kernel assumes ----------------------
// lane l supplies A[i = l % 32][k = 4 (l / 32) + 0..3] and B[k = 4 (l / 32) + 0..3][j = l % 32] (bf16 bits);
// D[i][j] += sum_k A[i][k] B[k][j] lands in register 4 (i / 8) + i % 4 of lane j + 32 ((i / 4) % 2).
// This is the documented layout as understood by the kernel's author: it checks the kernel against that
// understanding, not the hardware.
template <class V4, class V16>
inline V16 __builtin_amdgcn_mfma_f32_32x32x8bf16_1k(V4 a, V4 b, V16 c, int, int, int) {
  static_assert(sizeof(V4) == 8 && sizeof(V16) == 64, "bf16x4 / floatx16");
  uint64_t ab, bb;
  memcpy(&ab, &a, 8);
  memcpy(&bb, &b, 8);
  uint64_t A[64], B[64];
  memcpy(A, ds3emu::exchange(ab), sizeof A);
  memcpy(B, ds3emu::exchange(bb), sizeof B);
  const int l = ds3emu::lane();
  auto el = [](uint64_t v, int e) {
    const uint32_t u = uint32_t((v >> (16 * e)) & 0xffff) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
  };
  const int j = l % 32;
  for (int r = 0; r < 16; r++) {
    const int i = 8 * (r / 4) + 4 * (l / 32) + r % 4;
    float acc = c[r];
    for (int k = 0; k < 8; k++) acc += el(A[i + 32 * (k / 4)], k % 4) * el(B[j + 32 * (k / 4)], k % 4);
    c[r] = acc;
  }
  return c;
}

// v_mfma_f32_32x32x16_fp8_fp8 as on gfx942 (both operands e4m3fnuz): lane l supplies A[i = l % 32][k = 8 (l / 32) + 0..7]
// and B[k = 8 (l / 32) + 0..7][j = l % 32] as bytes; D as above.
template <class V16>
inline V16 __builtin_amdgcn_mfma_f32_32x32x16_fp8_fp8(long a, long b, V16 c, int, int, int) {
  uint64_t A[64], B[64];
  memcpy(A, ds3emu::exchange((uint64_t)a), sizeof A);
  memcpy(B, ds3emu::exchange((uint64_t)b), sizeof B);
  auto fnuz = [](uint64_t v, int e) {
    const int x = int((v >> (8 * e)) & 0xff);
    if (x == 0x80) return float(NAN);
    const int ex = (x >> 3) & 15, m = x & 7;
    const float f = ex == 0 ? std::ldexp(float(m) / 8, -7) : std::ldexp(1 + float(m) / 8, ex - 8);
    return (x & 0x80) ? -f : f;
  };
  const int l = ds3emu::lane(), j = l % 32;
  for (int r = 0; r < 16; r++) {
    const int i = 8 * (r / 4) + 4 * (l / 32) + r % 4;
    float acc = c[r];
    for (int k = 0; k < 16; k++) acc += fnuz(A[i + 32 * (k / 8)], k % 8) * fnuz(B[j + 32 * (k / 8)], k % 8);
    c[r] = acc;
  }
  return c;
}

// ---- atomics (no fiber switch inside: atomic by construction) ---------------------------------------------
template <class T, class U>
inline T atomicAdd(T* p, U v) {
  const T o = *p;
  *p = T(o + T(v));
  return o;
}
template <class T, class U>
inline T atomicMax(T* p, U v) {
  const T o = *p;
  if (T(v) > o) *p = T(v);
  return o;
}
template <class T, class U>
inline T atomicOr(T* p, U v) {
  const T o = *p;
  *p = T(o | T(v));
  return o;
}
