// ds3 ROCm backend, built where CMake found no usable HIP toolchain: the package still installs and loads,
// and reports why it cannot run (the same surface as @ds3/backend-cuda's stub).
#include <napi.h>

#if __has_include("ds3_stub_reason.h")
#include "ds3_stub_reason.h"  // written by CMakeLists.txt
#endif
#ifndef DS3_STUB_WHY
#define DS3_STUB_WHY "no HIP toolchain"
#endif

namespace {
const char* kReason = "ROCm not available: @ds3/backend-rocm was built without HIP (" DS3_STUB_WHY
                      "); rebuild it where a HIP toolchain is installed";

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
  exports.Set("nccl", Napi::Number::New(env, 0));
  return exports;
}
}  // namespace

NODE_API_MODULE(ds3_rocm, Init)
