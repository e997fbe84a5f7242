// cann_api.h — the subset of Huawei CANN's C interface that @ds3/backend-ascend calls, written from
// Huawei's public API documentation (hiascend.com "CANN Community Edition" API reference: AscendCL
// runtime, aclnn operator API "aolapi", HCCL) and cross-checked against the public header text of
// CANN 8.1.RC1 (acl/acl_base.h, acl/acl_rt.h, aclnn/acl_meta.h, aclnnop/aclnn_*.h, hccl/hccl.h,
// hccl/hccl_types.h). No CANN header is needed to build the backend: it loads every function below
// by name with dlsym at run time (DS3_CANN_FUNCS). A test stand-in (../../standin) implements every
// function of this list on the CPU.
//
// Two uses:
//  1. Normal build (no CANN): this file declares the types and enum values itself.
//  2. Check build (CMake, only when CANN's real headers are found): define DS3_CANN_REAL_HEADERS and
//     include the real acl/acl.h, aclnnop/*.h, hccl/hccl.h first; this file then declares only the
//     ds3_<name>_t pointer types and the enum table, and cann_check.cpp static_asserts that each
//     matches the real declaration (is_same of decltype(&::name)) and each enum value.
//
// Doc source per declaration: [rt] AscendCL runtime API (acl_rt.h / acl.h), [meta] aclnn common API
// (acl_meta.h), [op:<page>] the aclnn operator page aclnn<Name>, [hccl] HCCL API (hccl.h).
// "// UNSURE:" marks a declaration or a semantic detail not confirmed from two sources; the package
// README lists them.
#pragma once
#include <cstddef>
#include <cstdint>

// ---- enum values (name, value): checked against the real headers when they are present -------------
#define DS3_CANN_ENUMS(X)                 \
  /* aclDataType [rt: acl_base.h] */      \
  X(ACL_FLOAT, 0)                         \
  X(ACL_FLOAT16, 1)                       \
  X(ACL_INT8, 2)                          \
  X(ACL_INT32, 3)                         \
  X(ACL_UINT8, 4)                         \
  X(ACL_INT64, 9)                         \
  X(ACL_DOUBLE, 11)                       \
  X(ACL_BOOL, 12)                         \
  X(ACL_BF16, 27)                         \
  /* aclFormat [rt: acl_base.h] */        \
  X(ACL_FORMAT_ND, 2)                     \
  /* aclrtMemcpyKind [rt: acl_rt.h] */    \
  X(ACL_MEMCPY_HOST_TO_HOST, 0)           \
  X(ACL_MEMCPY_HOST_TO_DEVICE, 1)         \
  X(ACL_MEMCPY_DEVICE_TO_HOST, 2)         \
  X(ACL_MEMCPY_DEVICE_TO_DEVICE, 3)       \
  /* aclrtMemMallocPolicy [rt] */         \
  X(ACL_MEM_MALLOC_HUGE_FIRST, 0)         \
  /* aclrtMemAttr [rt] */                 \
  X(ACL_HBM_MEM, 1)                       \
  /* HcclDataType / HcclReduceOp / HcclResult [hccl: hccl_types.h] */ \
  X(HCCL_DATA_TYPE_FP32, 4)               \
  X(HCCL_DATA_TYPE_BFP16, 11)             \
  X(HCCL_REDUCE_SUM, 0)                   \
  X(HCCL_SUCCESS, 0)

// error codes the backend names (static const int in acl_base.h; aclnn codes from the "aclnn返回码" page)
#define DS3_ACL_SUCCESS 0
#define DS3_ACL_ERROR_REPEAT_INITIALIZE 100002  // aclInit called twice in one process [rt]
#define DS3_ACLNN_ERR_PARAM_NULLPTR 161001      // [op: aclnn return codes]
#define DS3_ACLNN_ERR_PARAM_INVALID 161002      // [op: aclnn return codes]
// HcclRootInfo is char internal[HCCL_ROOT_INFO_BYTES] [hccl_types.h]
#define DS3_HCCL_ROOT_INFO_BYTES 4108
// aclnnMatmul / aclnnBatchMatMul cubeMathType [op: aclnnMatmul]: 0 KEEP_DTYPE, 1 ALLOW_FP32_DOWN_PRECISION, 2 USE_FP16, 3 USE_HF32
#define DS3_CUBE_KEEP_DTYPE 0

#ifndef DS3_CANN_REAL_HEADERS
extern "C" {
typedef int aclError;            // [rt: acl_base.h]
typedef int32_t aclnnStatus;     // [meta]
typedef void* aclrtStream;       // [rt]
typedef void* aclrtContext;      // [rt]
typedef struct aclOpExecutor aclOpExecutor;  // [meta] opaque
typedef struct aclTensor aclTensor;          // [meta] opaque
typedef struct aclScalar aclScalar;          // [meta] opaque
typedef struct aclIntArray aclIntArray;      // [meta] opaque
typedef struct aclTensorList aclTensorList;  // [meta] opaque
typedef enum {
  ACL_DT_UNDEFINED = -1, ACL_FLOAT = 0, ACL_FLOAT16 = 1, ACL_INT8 = 2, ACL_INT32 = 3, ACL_UINT8 = 4,
  ACL_INT16 = 6, ACL_UINT16 = 7, ACL_UINT32 = 8, ACL_INT64 = 9, ACL_UINT64 = 10, ACL_DOUBLE = 11,
  ACL_BOOL = 12, ACL_STRING = 13, ACL_COMPLEX64 = 16, ACL_COMPLEX128 = 17, ACL_BF16 = 27,
} aclDataType;                                                   // [rt: acl_base.h]
typedef enum { ACL_FORMAT_UNDEFINED = -1, ACL_FORMAT_NCHW = 0, ACL_FORMAT_NHWC = 1, ACL_FORMAT_ND = 2 } aclFormat;  // [rt]
typedef enum aclrtMemcpyKind {
  ACL_MEMCPY_HOST_TO_HOST, ACL_MEMCPY_HOST_TO_DEVICE, ACL_MEMCPY_DEVICE_TO_HOST, ACL_MEMCPY_DEVICE_TO_DEVICE,
} aclrtMemcpyKind;                                               // [rt: acl_rt.h]
typedef enum aclrtMemMallocPolicy { ACL_MEM_MALLOC_HUGE_FIRST, ACL_MEM_MALLOC_HUGE_ONLY, ACL_MEM_MALLOC_NORMAL_ONLY } aclrtMemMallocPolicy;  // [rt]
typedef enum aclrtMemAttr { ACL_DDR_MEM, ACL_HBM_MEM } aclrtMemAttr;  // [rt]
typedef enum { HCCL_SUCCESS = 0, HCCL_E_PARA = 1 } HcclResult;          // [hccl: hccl_types.h] (more codes exist; any non-zero is an error)
typedef enum { HCCL_DATA_TYPE_FP32 = 4, HCCL_DATA_TYPE_BFP16 = 11 } HcclDataType;  // [hccl]
typedef enum { HCCL_REDUCE_SUM = 0 } HcclReduceOp;                      // [hccl]
typedef void* HcclComm;                                                 // [hccl]
typedef struct HcclRootInfoDef { char internal[DS3_HCCL_ROOT_INFO_BYTES]; } HcclRootInfo;  // [hccl]
}
#endif

// ---- functions ---------------------------------------------------------------------------------------
// X(LIB, REQUIRED, RET, NAME, PARAMS)
//   LIB: ASCENDCL (libascendcl.so), NNOPBASE (libnnopbase.so), OPAPI (libopapi.so), HCCL (libhccl.so)
//   REQUIRED: 1 = the backend is "not available" without it ("CANN too old: NAME missing");
//             0 = optional: a fallback is used when it is missing (named in the comment)
// Every aclnn operator is two-phase [meta: "两段式接口"]: aclnnXxxGetWorkspaceSize(args..., uint64_t*
// workspaceSize, aclOpExecutor** executor) builds a single-use executor, then aclnnXxx(workspace,
// workspaceSize, executor, stream) runs it on the stream; the executor is freed by that second call.
#define DS3_ACLNN_RUN_PARAMS (void* workspace, uint64_t workspaceSize, aclOpExecutor* executor, aclrtStream stream)

#define DS3_CANN_FUNCS_CORE(X)                                                                                \
  /* ---- AscendCL runtime [rt] ---- */                                                                       \
  X(ASCENDCL, 1, aclError, aclInit, (const char* configPath))                                                 \
  X(ASCENDCL, 1, aclError, aclFinalize, ())                                                                   \
  X(ASCENDCL, 1, const char*, aclGetRecentErrMsg, ())                                                         \
  X(ASCENDCL, 1, aclError, aclrtGetDeviceCount, (uint32_t* count))                                            \
  X(ASCENDCL, 1, aclError, aclrtSetDevice, (int32_t deviceId))                                                \
  X(ASCENDCL, 1, aclError, aclrtResetDevice, (int32_t deviceId))                                              \
  X(ASCENDCL, 1, aclError, aclrtCreateStream, (aclrtStream* stream))                                          \
  X(ASCENDCL, 1, aclError, aclrtDestroyStream, (aclrtStream stream))                                          \
  X(ASCENDCL, 1, aclError, aclrtSynchronizeStream, (aclrtStream stream))                                      \
  X(ASCENDCL, 1, aclError, aclrtMalloc, (void** devPtr, size_t size, aclrtMemMallocPolicy policy))            \
  X(ASCENDCL, 1, aclError, aclrtFree, (void* devPtr))                                                         \
  X(ASCENDCL, 1, aclError, aclrtMemcpy, (void* dst, size_t destMax, const void* src, size_t count, aclrtMemcpyKind kind)) \
  X(ASCENDCL, 1, aclError, aclrtMemset, (void* devPtr, size_t maxCount, int32_t value, size_t count))         \
  X(ASCENDCL, 1, aclError, aclrtGetMemInfo, (aclrtMemAttr attr, size_t * free, size_t * total))               \
  X(ASCENDCL, 1, const char*, aclrtGetSocName, ())                                                            \
  /* ---- aclnn common objects [meta: acl_meta.h] ---- */                                                     \
  X(NNOPBASE, 1, aclTensor*, aclCreateTensor,                                                                 \
    (const int64_t* viewDims, uint64_t viewDimsNum, aclDataType dataType, const int64_t* stride, int64_t offset, \
     aclFormat format, const int64_t* storageDims, uint64_t storageDimsNum, void* tensorData))                \
  X(NNOPBASE, 1, aclnnStatus, aclDestroyTensor, (const aclTensor* tensor))                                    \
  X(NNOPBASE, 1, aclScalar*, aclCreateScalar, (void* value, aclDataType dataType))                            \
  X(NNOPBASE, 1, aclnnStatus, aclDestroyScalar, (const aclScalar* scalar))                                    \
  X(NNOPBASE, 1, aclIntArray*, aclCreateIntArray, (const int64_t* value, uint64_t size))                      \
  X(NNOPBASE, 1, aclnnStatus, aclDestroyIntArray, (const aclIntArray* array))                                 \
  X(NNOPBASE, 1, aclTensorList*, aclCreateTensorList, (const aclTensor* const* value, uint64_t size))         \
  X(NNOPBASE, 1, aclnnStatus, aclDestroyTensorList, (const aclTensorList* array))                             \
  /* ---- aclnn operators [op:<name>] (libopapi.so) ---- */                                                   \
  /* [op: aclnnEmbedding] weight [V, D], indices int32/int64 any shape, out [..., D] */                       \
  X(OPAPI, 1, aclnnStatus, aclnnEmbeddingGetWorkspaceSize,                                                    \
    (const aclTensor* weight, const aclTensor* indices, const aclTensor* out, uint64_t* workspaceSize, aclOpExecutor** executor)) \
  X(OPAPI, 1, aclnnStatus, aclnnEmbedding, DS3_ACLNN_RUN_PARAMS)                                              \
  /* [op: aclnnRmsNorm] y = x * rsqrt(mean(x^2, last dims of gamma's rank) + eps) * gamma; rstdOut float32 */ \
  X(OPAPI, 1, aclnnStatus, aclnnRmsNormGetWorkspaceSize,                                                      \
    (const aclTensor* x, const aclTensor* gamma, double epsilon, const aclTensor* yOut, const aclTensor* rstdOut, \
     uint64_t* workspaceSize, aclOpExecutor** executor))                                                      \
  X(OPAPI, 1, aclnnStatus, aclnnRmsNorm, DS3_ACLNN_RUN_PARAMS)                                                \
  /* [op: aclnnMatmul] torch.matmul semantics (broadcasting batch dims), cubeMathType */                      \
  X(OPAPI, 1, aclnnStatus, aclnnMatmulGetWorkspaceSize,                                                       \
    (const aclTensor* self, const aclTensor* mat2, aclTensor* out, int8_t cubeMathType, uint64_t* workspaceSize, aclOpExecutor** executor)) \
  X(OPAPI, 1, aclnnStatus, aclnnMatmul, DS3_ACLNN_RUN_PARAMS)                                                 \
  /* [op: aclnnBatchMatMul] self [B, M, K] x mat2 [B, K, N] -> out [B, M, N] */                               \
  X(OPAPI, 1, aclnnStatus, aclnnBatchMatMulGetWorkspaceSize,                                                  \
    (const aclTensor* self, const aclTensor* mat2, aclTensor* out, int8_t cubeMathType, uint64_t* workspaceSize, aclOpExecutor** executor)) \
  X(OPAPI, 1, aclnnStatus, aclnnBatchMatMul, DS3_ACLNN_RUN_PARAMS)                                            \
  /* [op: aclnnAdd] out = self + alpha * other (broadcasting) */                                              \
  X(OPAPI, 1, aclnnStatus, aclnnAddGetWorkspaceSize,                                                          \
    (const aclTensor* self, const aclTensor* other, const aclScalar* alpha, aclTensor* out, uint64_t* workspaceSize, aclOpExecutor** executor)) \
  X(OPAPI, 1, aclnnStatus, aclnnAdd, DS3_ACLNN_RUN_PARAMS)                                                    \
  /* [op: aclnnAdds] out = self + alpha * other (scalar) */                                                   \
  X(OPAPI, 1, aclnnStatus, aclnnAddsGetWorkspaceSize,                                                         \
    (const aclTensor* self, const aclScalar* other, const aclScalar* alpha, aclTensor* out, uint64_t* workspaceSize, aclOpExecutor** executor)) \
  X(OPAPI, 1, aclnnStatus, aclnnAdds, DS3_ACLNN_RUN_PARAMS)                                                   \
  /* [op: aclnnMul] out = self * other (broadcasting) */                                                      \
  X(OPAPI, 1, aclnnStatus, aclnnMulGetWorkspaceSize,                                                          \
    (const aclTensor* self, const aclTensor* other, aclTensor* out, uint64_t* workspaceSize, aclOpExecutor** executor)) \
  X(OPAPI, 1, aclnnStatus, aclnnMul, DS3_ACLNN_RUN_PARAMS)                                                    \
  /* [op: aclnnMuls] out = self * other (scalar) */                                                           \
  X(OPAPI, 1, aclnnStatus, aclnnMulsGetWorkspaceSize,                                                         \
    (const aclTensor* self, const aclScalar* other, aclTensor* out, uint64_t* workspaceSize, aclOpExecutor** executor)) \
  X(OPAPI, 1, aclnnStatus, aclnnMuls, DS3_ACLNN_RUN_PARAMS)                                                   \
  /* [op: aclnnDiv] out = self / other (broadcasting) */                                                      \
  X(OPAPI, 1, aclnnStatus, aclnnDivGetWorkspaceSize,                                                          \
    (const aclTensor* self, const aclTensor* other, aclTensor* out, uint64_t* workspaceSize, aclOpExecutor** executor)) \
  X(OPAPI, 1, aclnnStatus, aclnnDiv, DS3_ACLNN_RUN_PARAMS)                                                    \
  /* [op: aclnnSilu] out = self * sigmoid(self) */                                                            \
  X(OPAPI, 1, aclnnStatus, aclnnSiluGetWorkspaceSize,                                                         \
    (const aclTensor* self, aclTensor* out, uint64_t* workspaceSize, aclOpExecutor** executor))               \
  X(OPAPI, 1, aclnnStatus, aclnnSilu, DS3_ACLNN_RUN_PARAMS)                                                   \
  /* [op: aclnnSigmoid] */                                                                                    \
  X(OPAPI, 1, aclnnStatus, aclnnSigmoidGetWorkspaceSize,                                                      \
    (const aclTensor* self, aclTensor* out, uint64_t* workspaceSize, aclOpExecutor** executor))               \
  X(OPAPI, 1, aclnnStatus, aclnnSigmoid, DS3_ACLNN_RUN_PARAMS)                                                \
  /* [op: aclnnSoftmax] softmax along dim (negative dims count from the end) */                               \
  X(OPAPI, 1, aclnnStatus, aclnnSoftmaxGetWorkspaceSize,                                                      \
    (const aclTensor* self, int64_t dim, aclTensor* out, uint64_t* workspaceSize, aclOpExecutor** executor))  \
  X(OPAPI, 1, aclnnStatus, aclnnSoftmax, DS3_ACLNN_RUN_PARAMS)                                                \
  /* [op: aclnnCat] concatenate the list along dim */                                                         \
  X(OPAPI, 1, aclnnStatus, aclnnCatGetWorkspaceSize,                                                          \
    (const aclTensorList* tensors, int64_t dim, aclTensor* out, uint64_t* workspaceSize, aclOpExecutor** executor)) \
  X(OPAPI, 1, aclnnStatus, aclnnCat, DS3_ACLNN_RUN_PARAMS)                                                    \
  /* [op: aclnnInplaceCopy] selfRef[...] = src[...] (same shape; any strides; dtype converted) */             \
  X(OPAPI, 1, aclnnStatus, aclnnInplaceCopyGetWorkspaceSize,                                                  \
    (aclTensor* selfRef, const aclTensor* src, uint64_t* workspaceSize, aclOpExecutor** executor))            \
  X(OPAPI, 1, aclnnStatus, aclnnInplaceCopy, DS3_ACLNN_RUN_PARAMS)                                            \
  /* [op: aclnnCast] out = self converted to dtype */                                                         \
  X(OPAPI, 1, aclnnStatus, aclnnCastGetWorkspaceSize,                                                         \
    (const aclTensor* self, const aclDataType dtype, aclTensor* out, uint64_t* workspaceSize, aclOpExecutor** executor)) \
  X(OPAPI, 1, aclnnStatus, aclnnCast, DS3_ACLNN_RUN_PARAMS)                                                   \
  /* [op: aclnnIndexSelect] out = self.index_select(dim, index); index int32/int64 1-D */                     \
  X(OPAPI, 1, aclnnStatus, aclnnIndexSelectGetWorkspaceSize,                                                  \
    (const aclTensor* self, int64_t dim, const aclTensor* index, aclTensor* out, uint64_t* workspaceSize, aclOpExecutor** executor)) \
  X(OPAPI, 1, aclnnStatus, aclnnIndexSelect, DS3_ACLNN_RUN_PARAMS)                                            \
  /* [op: aclnnIndexCopy] selfRef.index_copy_(dim, index, source); index int32/int64 1-D */                   \
  X(OPAPI, 1, aclnnStatus, aclnnInplaceIndexCopyGetWorkspaceSize,                                             \
    (aclTensor* selfRef, int64_t dim, const aclTensor* index, const aclTensor* source, uint64_t* workspaceSize, aclOpExecutor** executor)) \
  X(OPAPI, 1, aclnnStatus, aclnnInplaceIndexCopy, DS3_ACLNN_RUN_PARAMS)                                       \
  /* [op: aclnnTopk] largest/sorted; indicesOut int64 */                                                      \
  X(OPAPI, 1, aclnnStatus, aclnnTopkGetWorkspaceSize,                                                         \
    (const aclTensor* self, int64_t k, int64_t dim, bool largest, bool sorted, aclTensor* valuesOut, aclTensor* indicesOut, \
     uint64_t* workspaceSize, aclOpExecutor** executor))                                                      \
  X(OPAPI, 1, aclnnStatus, aclnnTopk, DS3_ACLNN_RUN_PARAMS)                                                   \
  /* [op: aclnnReduceSum] sum over dims, keepDims, accumulate/output dtype */                                 \
  X(OPAPI, 1, aclnnStatus, aclnnReduceSumGetWorkspaceSize,                                                    \
    (const aclTensor* self, const aclIntArray* dims, bool keepDims, aclDataType dtype, aclTensor* out, uint64_t* workspaceSize, aclOpExecutor** executor)) \
  X(OPAPI, 1, aclnnStatus, aclnnReduceSum, DS3_ACLNN_RUN_PARAMS)                                              \
  /* [op: aclnnGather] out[i][j] = self[i][index[i][j]] for dim 1 (torch.gather) */                           \
  X(OPAPI, 1, aclnnStatus, aclnnGatherGetWorkspaceSize,                                                       \
    (const aclTensor* self, const int64_t dim, const aclTensor* index, aclTensor* out, uint64_t* workspaceSize, aclOpExecutor** executor)) \
  X(OPAPI, 1, aclnnStatus, aclnnGather, DS3_ACLNN_RUN_PARAMS)                                                 \
  /* [op: aclnnScatter] out = self; out[i][index[i][j]] = src[i][j] for dim 1 (reduce 0 = replace) */         \
  X(OPAPI, 1, aclnnStatus, aclnnScatterGetWorkspaceSize,                                                      \
    (const aclTensor* self, int64_t dim, const aclTensor* index, const aclTensor* src, int64_t reduce, aclTensor* out, \
     uint64_t* workspaceSize, aclOpExecutor** executor))                                                      \
  X(OPAPI, 1, aclnnStatus, aclnnScatter, DS3_ACLNN_RUN_PARAMS)                                                \
  /* [op: aclnnZero] selfRef[...] = 0 */                                                                      \
  X(OPAPI, 1, aclnnStatus, aclnnInplaceZeroGetWorkspaceSize, (aclTensor* selfRef, uint64_t* workspaceSize, aclOpExecutor** executor)) \
  X(OPAPI, 1, aclnnStatus, aclnnInplaceZero, DS3_ACLNN_RUN_PARAMS)                                            \
  /* [op: aclnnMoeInitRoutingV2] dropless (dropPadMode 0); UNSURE: activeNum semantics in dropless mode */    \
  X(OPAPI, 1, aclnnStatus, aclnnMoeInitRoutingV2GetWorkspaceSize,                                             \
    (const aclTensor* x, const aclTensor* expertIdx, int64_t activeNumOptional, int64_t expertCapacityOptional,  \
     int64_t expertNumOptional, int64_t dropPadModeOptional, int64_t expertTokensCountOrCumsumFlagOptional,      \
     bool expertTokensBeforeCapacityFlagOptional, const aclTensor* expandedXOut, const aclTensor* expandedRowIdxOut, \
     const aclTensor* expertTokensCountOrCumsumOutOptional, const aclTensor* expertTokensBeforeCapacityOutOptional, \
     uint64_t* workspaceSize, aclOpExecutor** executor))                                                      \
  X(OPAPI, 1, aclnnStatus, aclnnMoeInitRoutingV2, DS3_ACLNN_RUN_PARAMS)                                       \
  /* [op: aclnnGroupedMatmulV4] UNSURE: a transposed (strided) weight view [E, K, N] accepted as is */        \
  X(OPAPI, 1, aclnnStatus, aclnnGroupedMatmulV4GetWorkspaceSize,                                              \
    (const aclTensorList* x, const aclTensorList* weight, const aclTensorList* biasOptional, const aclTensorList* scaleOptional, \
     const aclTensorList* offsetOptional, const aclTensorList* antiquantScaleOptional, const aclTensorList* antiquantOffsetOptional, \
     const aclTensorList* perTokenScaleOptional, const aclTensor* groupListOptional, const aclTensorList* activationInputOptional, \
     const aclTensorList* activationQuantScaleOptional, const aclTensorList* activationQuantOffsetOptional, int64_t splitItem, \
     int64_t groupType, int64_t groupListType, int64_t actType, aclTensorList* out, aclTensorList* activationFeatureOutOptional, \
     aclTensorList* dynQuantScaleOutOptional, uint64_t* workspaceSize, aclOpExecutor** executor))            \
  X(OPAPI, 1, aclnnStatus, aclnnGroupedMatmulV4, DS3_ACLNN_RUN_PARAMS)                                        \
  /* [op: aclnnMoeFinalizeRoutingV2] UNSURE: dropPadMode 2 reads expandedRowIdx row-major (t*K + k), 0 column-major */        \
  X(OPAPI, 1, aclnnStatus, aclnnMoeFinalizeRoutingV2GetWorkspaceSize,                                         \
    (const aclTensor* expandedX, const aclTensor* expandedRowIdx, const aclTensor* x1Optional, const aclTensor* x2Optional, \
     const aclTensor* biasOptional, const aclTensor* scalesOptional, const aclTensor* expertIdxOptional, int64_t dropPadMode, \
     const aclTensor* out, uint64_t* workspaceSize, aclOpExecutor** executor))                                \
  X(OPAPI, 1, aclnnStatus, aclnnMoeFinalizeRoutingV2, DS3_ACLNN_RUN_PARAMS)                                   \
  /* ---- HCCL [hccl] (optional: missing -> collectives through the host Collective) ---- */                 \
  X(HCCL, 0, HcclResult, HcclGetRootInfo, (HcclRootInfo * rootInfo))                                          \
  X(HCCL, 0, HcclResult, HcclCommInitRootInfo, (uint32_t nRanks, const HcclRootInfo* rootInfo, uint32_t rank, HcclComm* comm)) \
  X(HCCL, 0, HcclResult, HcclAllReduce,                                                                       \
    (void* sendBuf, void* recvBuf, uint64_t count, HcclDataType dataType, HcclReduceOp op, HcclComm comm, aclrtStream stream)) \
  X(HCCL, 0, HcclResult, HcclAllGather,                                                                       \
    (void* sendBuf, void* recvBuf, uint64_t sendCount, HcclDataType dataType, HcclComm comm, aclrtStream stream)) \
  X(HCCL, 0, HcclResult, HcclCommDestroy, (HcclComm comm))                                                    \
  X(HCCL, 0, const char*, HcclGetErrorString, (HcclResult code))

// The two optional operators, each in a list of its own: cann_check.cpp checks each only when the real
// header that declares it exists (aclnn_moe_gating_top_k.h is not in CANN 8.1.RC1).
#define DS3_CANN_FUNCS_GATING(X) \
  /* [op: aclnnMoeGatingTopK] optional (CANN 8.2+; not in 8.1.RC1): fallback = the composition */           \
  X(OPAPI, 0, aclnnStatus, aclnnMoeGatingTopKGetWorkspaceSize,                                                \
    (const aclTensor* x, const aclTensor* biasOptional, int64_t k, int64_t kGroup, int64_t groupCount, int64_t groupSelectMode, \
     int64_t renorm, int64_t normType, bool outFlag, double routedScalingFactor, double eps, const aclTensor* yOut, \
     const aclTensor* expertIdxOut, const aclTensor* outOut, uint64_t* workspaceSize, aclOpExecutor** executor)) \
  X(OPAPI, 0, aclnnStatus, aclnnMoeGatingTopK, DS3_ACLNN_RUN_PARAMS)

#define DS3_CANN_FUNCS_FIA(X) \
  /* [op: aclnnFusedInferAttentionScoreV3] optional: fallback = the composition of matmuls and softmax */    \
  X(OPAPI, 0, aclnnStatus, aclnnFusedInferAttentionScoreV3GetWorkspaceSize,                                   \
    (const aclTensor* query, const aclTensorList* key, const aclTensorList* value, const aclTensor* pseShiftOptional, \
     const aclTensor* attenMaskOptional, const aclIntArray* actualSeqLengthsOptional, const aclIntArray* actualSeqLengthsKvOptional, \
     const aclTensor* deqScale1Optional, const aclTensor* quantScale1Optional, const aclTensor* deqScale2Optional, \
     const aclTensor* quantScale2Optional, const aclTensor* quantOffset2Optional, const aclTensor* antiquantScaleOptional, \
     const aclTensor* antiquantOffsetOptional, const aclTensor* blockTableOptional, const aclTensor* queryPaddingSizeOptional, \
     const aclTensor* kvPaddingSizeOptional, const aclTensor* keyAntiquantScaleOptional, const aclTensor* keyAntiquantOffsetOptional, \
     const aclTensor* valueAntiquantScaleOptional, const aclTensor* valueAntiquantOffsetOptional, const aclTensor* keySharedPrefixOptional, \
     const aclTensor* valueSharedPrefixOptional, const aclIntArray* actualSharedPrefixLenOptional, const aclTensor* queryRopeOptional, \
     const aclTensor* keyRopeOptional, const aclTensor* keyRopeAntiquantScaleOptional, int64_t numHeads, double scaleValue, \
     int64_t preTokens, int64_t nextTokens, char* inputLayout, int64_t numKeyValueHeads, int64_t sparseMode, int64_t innerPrecise, \
     int64_t blockSize, int64_t antiquantMode, bool softmaxLseFlag, int64_t keyAntiquantMode, int64_t valueAntiquantMode, \
     const aclTensor* attentionOut, const aclTensor* softmaxLse, uint64_t* workspaceSize, aclOpExecutor** executor)) \
  X(OPAPI, 0, aclnnStatus, aclnnFusedInferAttentionScoreV3, DS3_ACLNN_RUN_PARAMS)

#define DS3_CANN_FUNCS(X) DS3_CANN_FUNCS_CORE(X) DS3_CANN_FUNCS_GATING(X) DS3_CANN_FUNCS_FIA(X)

// ds3_<name>_t: the function-pointer type of each declaration
#define DS3_CANN_TYPEDEF(LIB, REQ, RET, NAME, PARAMS) typedef RET(*ds3_##NAME##_t) PARAMS;
DS3_CANN_FUNCS(DS3_CANN_TYPEDEF)
#undef DS3_CANN_TYPEDEF
