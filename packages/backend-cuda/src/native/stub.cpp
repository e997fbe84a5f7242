// ds3 CUDA backend, built where CMake found no CUDA compiler: the package still installs and loads,
// and reports why it cannot run.
#include <napi.h>

namespace {
const char* kReason = "CUDA not available: @ds3/backend-cuda was built without CUDA (CMake found no nvcc); rebuild it on a machine with the CUDA toolkit";

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
  return exports;
}
}  // namespace

NODE_API_MODULE(ds3_cuda, Init)
