// ds3 GPU backends: the one place where CUDA, HIP (ROCm) and the host SIMT emulator differ on the host side.
// The kernel sources and the Node-API glue are written against the CUDA runtime names; this header maps them:
//  - CUDA (nvcc, @ds3/backend-cuda): the CUDA headers, nothing renamed, WARP = 32;
//  - HIP (clang/hipcc for AMD, @ds3/backend-rocm): every cuda* name used here -> hip*, WARP = 64 (wave64:
//    gfx90a / gfx942 / gfx950; wave32 RDNA parts are not targets);
//  - DS3_SIMT_EMU (g++ on the host, packages/backend-rocm/test): the emulator's own header, WARP from the build.
// Device-side names (shuffles, ballots, number formats) are in vendor.cuh.
#pragma once

#if defined(DS3_SIMT_EMU)
#include "simt_emu.h"
#define DS3_GPU_NAME "emulator"
#elif defined(__HIP_PLATFORM_AMD__) || defined(__HIP__)
#define DS3_HIP 1
#define DS3_GPU_NAME "ROCm"
#include <hip/hip_runtime_api.h>
#define cudaStream_t hipStream_t
#define cudaEvent_t hipEvent_t
#define cudaError_t hipError_t
#define cudaSuccess hipSuccess
#define cudaGraph_t hipGraph_t
#define cudaGraphExec_t hipGraphExec_t
#define cudaDeviceProp hipDeviceProp_t
#define cudaGetErrorString hipGetErrorString
#define cudaGetLastError hipGetLastError
#define cudaGetDevice hipGetDevice
#define cudaSetDevice hipSetDevice
#define cudaGetDeviceCount hipGetDeviceCount
#define cudaGetDeviceProperties hipGetDeviceProperties
#define cudaDriverGetVersion hipDriverGetVersion
#define cudaRuntimeGetVersion hipRuntimeGetVersion
#define cudaMalloc hipMalloc
#define cudaFree hipFree
#define cudaHostAlloc hipHostMalloc
#define cudaHostAllocDefault hipHostMallocDefault
#define cudaFreeHost hipHostFree
#define cudaMemcpy hipMemcpy
#define cudaMemcpyAsync hipMemcpyAsync
#define cudaMemsetAsync hipMemsetAsync
#define cudaMemcpyHostToDevice hipMemcpyHostToDevice
#define cudaMemcpyDeviceToHost hipMemcpyDeviceToHost
#define cudaMemGetInfo hipMemGetInfo
#define cudaStreamCreateWithFlags hipStreamCreateWithFlags
#define cudaStreamNonBlocking hipStreamNonBlocking
#define cudaStreamDestroy hipStreamDestroy
#define cudaStreamSynchronize hipStreamSynchronize
#define cudaStreamBeginCapture hipStreamBeginCapture
#define cudaStreamEndCapture hipStreamEndCapture
#define cudaStreamCaptureModeRelaxed hipStreamCaptureModeRelaxed
// CUDA 12's three-argument form; HIP 5.x takes (exec, graph, errorNode, log, logSize)
#define cudaGraphInstantiate(ex, g, flags) hipGraphInstantiate((ex), (g), nullptr, nullptr, 0)
#define cudaGraphLaunch hipGraphLaunch
#define cudaGraphDestroy hipGraphDestroy
#define cudaGraphExecDestroy hipGraphExecDestroy
#define cudaEventCreate hipEventCreate
#define cudaEventDestroy hipEventDestroy
#define cudaEventRecord hipEventRecord
#define cudaEventElapsedTime hipEventElapsedTime
#define cudaFuncSetAttribute(f, attr, v) hipFuncSetAttribute(reinterpret_cast<const void*>(f), attr, v)
#define cudaFuncAttributeMaxDynamicSharedMemorySize hipFuncAttributeMaxDynamicSharedMemorySize
#else
#include <cuda_runtime_api.h>
#define DS3_GPU_NAME "CUDA"
#endif

namespace ds3cu {
#if defined(DS3_SIMT_EMU)
constexpr int WARP = DS3_EMU_WARP;
#elif defined(DS3_HIP)
constexpr int WARP = 64;  // wavefront of gfx90a / gfx942 / gfx950
#else
constexpr int WARP = 32;
#endif
constexpr int WARP_LOG2 = WARP == 64 ? 6 : 5;
static_assert(1 << WARP_LOG2 == WARP, "WARP is 32 or 64");
/** shared memory (LDS) one block may use: Hopper 227 KB, AMD CDNA 64 KB per workgroup (MI200/MI300); the
 *  emulator at width 64 takes AMD's limit so that it runs AMD's tilings */
#if defined(DS3_SIMT_EMU)
constexpr unsigned kMaxSmemBytes = DS3_EMU_WARP == 64 ? 64u * 1024 : 227u * 1024;
#elif defined(DS3_HIP)
constexpr unsigned kMaxSmemBytes = 64u * 1024;
#else
constexpr unsigned kMaxSmemBytes = 227u * 1024;
#endif
/** the mma.sync kernels (tensor-core GEMM and attention) exist only in the CUDA build; elsewhere the SIMT
 *  kernels run (the addon never chooses them: its "compute capability" is 0 there) */
#if !defined(DS3_HIP) && !defined(DS3_SIMT_EMU)
#define DS3_HAVE_MMA 1
#endif
}  // namespace ds3cu
