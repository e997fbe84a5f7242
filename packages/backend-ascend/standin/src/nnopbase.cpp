// libnnopbase: aclTensor / aclTensorList / aclIntArray / aclScalar, executor flags.
#include "common.h"

using namespace si;

static bool formatOk(int f) { return f == FORMAT_ND || f == 0 /*NCHW*/ || f == 1 /*NHWC*/; }

SI_EXPORT void* aclCreateTensor(const int64_t* viewDims, uint64_t viewDimsNum, int dataType, const int64_t* stride, int64_t offset,
                                int format, const int64_t* storageDims, uint64_t storageDimsNum, void* tensorData) {
  auto bad = [](const std::string& m) -> void* { fail(ACLNN_ERR_PARAM_INVALID, "aclCreateTensor: " + m); return nullptr; };
  if (viewDimsNum > 8) return bad(fmt("%llu view dims (at most 8)", (unsigned long long)viewDimsNum));
  if (viewDimsNum && !viewDims) return bad("viewDims is null");
  if (viewDimsNum && !stride) return bad("stride is null (give one stride per view dim, in elements)");
  if (storageDimsNum > 8) return bad("more than 8 storage dims");
  if (storageDimsNum && !storageDims) return bad("storageDims is null");
  if (!dtypeSize(dataType)) return bad(fmt("dataType %d is not supported by the stand-in", dataType));
  if (!formatOk(format)) return bad(fmt("format %d is not supported by the stand-in (ND, NCHW, NHWC only; no private formats such as FRACTAL_NZ)", format));
  auto t = std::make_shared<TensorDesc>();
  t->dims.assign(viewDims, viewDims + viewDimsNum);
  t->strides.assign(stride, stride + viewDimsNum);
  t->storage.assign(storageDims, storageDims + storageDimsNum);
  t->offset = offset;
  t->dtype = dataType;
  t->format = format;
  t->data = (char*)tensorData;
  for (size_t i = 0; i < t->dims.size(); i++) {
    if (t->dims[i] < 0) return bad(fmt("view dim %zu is %lld", i, (long long)t->dims[i]));
    if (t->strides[i] < 0) return bad(fmt("stride %zu is %lld (negative strides are not supported)", i, (long long)t->strides[i]));
  }
  if (offset < 0) return bad(fmt("offset %lld is negative", (long long)offset));
  int64_t storageElems = 1;
  for (auto d : t->storage) {
    if (d < 0) return bad(fmt("storage dims %s have a negative entry", dimsStr(t->storage).c_str()));
    storageElems *= d;
  }
  int64_t n = t->numel();
  if (n > 0) {
    int64_t reach = offset;
    for (size_t i = 0; i < t->dims.size(); i++) reach += (t->dims[i] - 1) * t->strides[i];
    if (reach >= storageElems)
      return bad(fmt("view %s reaches element %lld but the storage %s holds %lld elements", t->str().c_str(), (long long)reach,
                     dimsStr(t->storage).c_str(), (long long)storageElems));
  }
  t->storageBytes = (size_t)storageElems * dtypeSize(dataType);
  if (!tensorData) {
    if (n > 0 && storageElems > 0) return bad(fmt("tensorData is null for a non-empty tensor %s", t->str().c_str()));
  } else if (t->storageBytes > 0) {
    Alloc a;
    std::string why;
    if (!findDevice(tensorData, t->storageBytes, &a, &why))
      return bad(fmt("storage %s of %s (%zu bytes): %s", dimsStr(t->storage).c_str(), dtypeName(dataType), t->storageBytes, why.c_str()));
    t->allocId = a.id;
  }
  return tensors().add(t);
}

SI_EXPORT int aclDestroyTensor(const void* tensor) {
  if (!tensor) return fail(ACLNN_ERR_PARAM_NULLPTR, "aclDestroyTensor: tensor is null");
  std::string why;
  auto t = tensors().get(tensor, &why);
  if (!t) return fail(ACLNN_ERR_PARAM_INVALID, "aclDestroyTensor: " + why);
  if (t->ownerList)
    return fail(ACLNN_ERR_PARAM_INVALID, fmt("aclDestroyTensor: %p belongs to an aclTensorList; aclDestroyTensorList destroys it (destroying it here too would be a double free)", tensor));
  tensors().take(tensor, nullptr);
  return ACLNN_SUCCESS;
}

SI_EXPORT void* aclCreateTensorList(const void* const* value, uint64_t size) {
  if (size && !value) { fail(ACLNN_ERR_PARAM_NULLPTR, "aclCreateTensorList: value is null"); return nullptr; }
  auto l = std::make_shared<TensorList>();
  std::vector<std::shared_ptr<TensorDesc>> items;
  for (uint64_t i = 0; i < size; i++) {
    std::string why;
    auto t = tensors().get(value[i], &why);
    if (!t) { fail(ACLNN_ERR_PARAM_INVALID, fmt("aclCreateTensorList: item %llu: %s", (unsigned long long)i, why.c_str())); return nullptr; }
    if (t->ownerList) { fail(ACLNN_ERR_PARAM_INVALID, fmt("aclCreateTensorList: item %llu already belongs to another aclTensorList", (unsigned long long)i)); return nullptr; }
    uint64_t id = 0;
    splitHandle(value[i], K_TENSOR, &id);
    l->ids.push_back(id);
    items.push_back(t);
  }
  void* h = tensorLists().add(l);
  uint64_t lid = 0;
  splitHandle(h, K_TLIST, &lid);
  for (auto& t : items) t->ownerList = lid;
  l->items = items;
  return h;
}

SI_EXPORT int aclDestroyTensorList(const void* list) {
  if (!list) return fail(ACLNN_ERR_PARAM_NULLPTR, "aclDestroyTensorList: list is null");
  std::string why;
  auto l = tensorLists().take(list, &why);
  if (!l) return fail(ACLNN_ERR_PARAM_INVALID, "aclDestroyTensorList: " + why);
  for (auto id : l->ids) tensors().take(makeHandle(K_TENSOR, id), nullptr);  // the list owns its tensors
  return ACLNN_SUCCESS;
}

SI_EXPORT void* aclCreateIntArray(const int64_t* value, uint64_t size) {
  if (size && !value) { fail(ACLNN_ERR_PARAM_NULLPTR, "aclCreateIntArray: value is null"); return nullptr; }
  auto a = std::make_shared<IntArray>();
  a->v.assign(value, value + size);
  return intArrays().add(a);
}
SI_EXPORT int aclDestroyIntArray(const void* a) {
  if (!a) return fail(ACLNN_ERR_PARAM_NULLPTR, "aclDestroyIntArray: array is null");
  std::string why;
  if (!intArrays().take(a, &why)) return fail(ACLNN_ERR_PARAM_INVALID, "aclDestroyIntArray: " + why);
  return ACLNN_SUCCESS;
}
SI_EXPORT void* aclCreateBoolArray(const bool* value, uint64_t size) {
  if (size && !value) { fail(ACLNN_ERR_PARAM_NULLPTR, "aclCreateBoolArray: value is null"); return nullptr; }
  auto a = std::make_shared<BoolArray>();
  a->v.assign(value, value + size);
  return boolArrays().add(a);
}
SI_EXPORT int aclDestroyBoolArray(const void* a) {
  std::string why;
  if (!a || !boolArrays().take(a, &why)) return fail(ACLNN_ERR_PARAM_INVALID, "aclDestroyBoolArray: " + (a ? why : std::string("null")));
  return ACLNN_SUCCESS;
}
SI_EXPORT void* aclCreateFloatArray(const float* value, uint64_t size) {
  if (size && !value) { fail(ACLNN_ERR_PARAM_NULLPTR, "aclCreateFloatArray: value is null"); return nullptr; }
  auto a = std::make_shared<FloatArray>();
  a->v.assign(value, value + size);
  return floatArrays().add(a);
}
SI_EXPORT int aclDestroyFloatArray(const void* a) {
  std::string why;
  if (!a || !floatArrays().take(a, &why)) return fail(ACLNN_ERR_PARAM_INVALID, "aclDestroyFloatArray: " + (a ? why : std::string("null")));
  return ACLNN_SUCCESS;
}

// aclCreateScalar(void* value, aclDataType dataType): the value is read (copied) now.
SI_EXPORT void* aclCreateScalar(void* value, int dataType) {
  if (!value) { fail(ACLNN_ERR_PARAM_NULLPTR, "aclCreateScalar: value is null"); return nullptr; }
  auto s = std::make_shared<Scalar>();
  s->dtype = dataType;
  switch (dataType) {
    case DT_FLOAT: s->f = *(float*)value; break;
    case DT_DOUBLE: s->f = *(double*)value; break;
    case DT_BF16: s->f = bf16ToF(*(uint16_t*)value); break;
    case DT_FLOAT16: s->f = f16ToF(*(uint16_t*)value); break;
    case DT_INT32: s->f = (double)(s->i = *(int32_t*)value); break;
    case DT_INT64: s->f = (double)(s->i = *(int64_t*)value); break;
    case DT_INT8: s->f = (double)(s->i = *(int8_t*)value); break;
    case DT_UINT8: case DT_BOOL: s->f = (double)(s->i = *(uint8_t*)value); break;
    default: fail(ACLNN_ERR_PARAM_INVALID, fmt("aclCreateScalar: dataType %d is not supported by the stand-in", dataType)); return nullptr;
  }
  if (!isInt(dataType)) s->i = (int64_t)s->f;
  return scalars().add(s);
}
SI_EXPORT int aclDestroyScalar(const void* s) {
  if (!s) return fail(ACLNN_ERR_PARAM_NULLPTR, "aclDestroyScalar: scalar is null");
  std::string why;
  if (!scalars().take(s, &why)) return fail(ACLNN_ERR_PARAM_INVALID, "aclDestroyScalar: " + why);
  return ACLNN_SUCCESS;
}

// Views of a tensor's metadata (aclGetViewShape & co. allocate with new[]; the caller delete[]s).
SI_EXPORT int aclGetViewShape(const void* tensor, int64_t** viewDims, uint64_t* viewDimsNum) {
  std::string why;
  auto t = tensors().get(tensor, &why);
  if (!t) return fail(ACLNN_ERR_PARAM_INVALID, "aclGetViewShape: " + why);
  if (!viewDims || !viewDimsNum) return fail(ACLNN_ERR_PARAM_NULLPTR, "aclGetViewShape: null out-pointer");
  *viewDimsNum = t->dims.size();
  *viewDims = new int64_t[t->dims.size() + 1];
  std::copy(t->dims.begin(), t->dims.end(), *viewDims);
  return ACLNN_SUCCESS;
}
SI_EXPORT int aclGetDataType(const void* tensor, int* dataType) {
  std::string why;
  auto t = tensors().get(tensor, &why);
  if (!t) return fail(ACLNN_ERR_PARAM_INVALID, "aclGetDataType: " + why);
  if (!dataType) return fail(ACLNN_ERR_PARAM_NULLPTR, "aclGetDataType: dataType is null");
  *dataType = t->dtype;
  return ACLNN_SUCCESS;
}

// aclSetAclOpExecutorRepeatable: the executor may then be launched many times until aclDestroyAclOpExecutor.
SI_EXPORT int aclSetAclOpExecutorRepeatable(void* executor) {
  std::string why;
  auto e = executors().get(executor, &why);
  if (!e) return fail(ACLNN_ERR_PARAM_INVALID, "aclSetAclOpExecutorRepeatable: " + why);
  e->repeatable = true;
  return ACLNN_SUCCESS;
}
SI_EXPORT int aclDestroyAclOpExecutor(void* executor) {
  std::string why;
  auto e = executors().get(executor, &why);
  if (!e) return fail(ACLNN_ERR_PARAM_INVALID, "aclDestroyAclOpExecutor: " + why);
  if (!e->repeatable)
    return fail(ACLNN_ERR_PARAM_INVALID, "aclDestroyAclOpExecutor: the executor is not repeatable (a single-use executor is released by its launch)");
  executors().take(executor, nullptr);
  return ACLNN_SUCCESS;
}

SI_EXPORT int aclnnInit(const char* configPath) { (void)configPath; return ACLNN_SUCCESS; }
SI_EXPORT int aclnnFinalize() { return ACLNN_SUCCESS; }
