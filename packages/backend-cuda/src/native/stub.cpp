// The ds3 GPU addon built where CMake found no GPU toolchain: @ds3/backend-cuda without nvcc, and
// @ds3/backend-rocm (which compiles this file with DS3_STUB_ROCM=1) without HIP. The package still
// installs and loads, and reports why it cannot run.
#include <napi.h>

#ifdef DS3_STUB_ROCM
#if __has_include("ds3_stub_reason.h")
#include "ds3_stub_reason.h"  // written by backend-rocm's CMakeLists.txt
#endif
#ifndef DS3_STUB_WHY
#define DS3_STUB_WHY "no HIP toolchain"
#endif
#define DS3_STUB_MODULE ds3_rocm
#define DS3_STUB_REASON \
  "ROCm not available: @ds3/backend-rocm was built without HIP (" DS3_STUB_WHY "); rebuild it where a HIP toolchain is installed"
#else
#define DS3_STUB_MODULE ds3_cuda
#define DS3_STUB_REASON \
  "CUDA not available: @ds3/backend-cuda was built without CUDA (CMake found no nvcc); rebuild it on a machine with the CUDA toolkit"
#endif

namespace {
const char* kReason = DS3_STUB_REASON;

Napi::Value Probe(const Napi::CallbackInfo& info) {
  auto r = Napi::Object::New(info.Env());
  r.Set("ok", false);
  r.Set("reason", kReason);
  return r;
}
Napi::Value Ctor(const Napi::CallbackInfo& info) {
  Napi::Error::New(info.Env(), kReason).ThrowAsJavaScriptException();
  return info.Env().Undefined();
}
Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("probe", Napi::Function::New(env, Probe));
  exports.Set("Context", Napi::Function::New(env, Ctor));
  exports.Set("built", Napi::String::New(env, "stub"));
#ifdef DS3_STUB_ROCM
  exports.Set("nccl", Napi::Number::New(env, 0));
#endif
  return exports;
}
}  // namespace

NODE_API_MODULE(DS3_STUB_MODULE, Init)
