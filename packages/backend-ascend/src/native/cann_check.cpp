// Compiled only when CANN's real headers are found at build time (CMakeLists.txt): every declaration of
// cann_api.h must have exactly the type of the real one, and every enum value must match.
#include <type_traits>

#include "acl/acl.h"
#include "aclnnop/aclnn_add.h"
#include "aclnnop/aclnn_batch_matmul.h"
#include "aclnnop/aclnn_cast.h"
#include "aclnnop/aclnn_cat.h"
#include "aclnnop/aclnn_copy.h"
#include "aclnnop/aclnn_div.h"
#include "aclnnop/aclnn_embedding.h"
#include "aclnnop/aclnn_gather.h"
#include "aclnnop/aclnn_grouped_matmul_v4.h"
#include "aclnnop/aclnn_index_copy.h"
#include "aclnnop/aclnn_index_select.h"
#include "aclnnop/aclnn_matmul.h"
#include "aclnnop/aclnn_moe_finalize_routing_v2.h"
#include "aclnnop/aclnn_moe_init_routing_v2.h"
#include "aclnnop/aclnn_mul.h"
#include "aclnnop/aclnn_reduce_sum.h"
#include "aclnnop/aclnn_rms_norm.h"
#include "aclnnop/aclnn_scatter.h"
#include "aclnnop/aclnn_sigmoid.h"
#include "aclnnop/aclnn_silu.h"
#include "aclnnop/aclnn_softmax.h"
#include "aclnnop/aclnn_topk.h"
#include "aclnnop/aclnn_zero.h"
#include "hccl/hccl.h"
#include "hccl/hccl_types.h"
#if __has_include("aclnnop/aclnn_moe_gating_top_k.h")
#include "aclnnop/aclnn_moe_gating_top_k.h"
#define DS3_CHECK_GATING 1
#endif
#if __has_include("aclnnop/aclnn_fused_infer_attention_score_v3.h")
#include "aclnnop/aclnn_fused_infer_attention_score_v3.h"
#define DS3_CHECK_FIA 1
#endif

#define DS3_CANN_REAL_HEADERS 1
#include "cann_api.h"

#define DS3_CHECK_FN(LIB, REQ, RET, NAME, PARAMS) \
  static_assert(std::is_same_v<decltype(&::NAME), ds3_##NAME##_t>, "cann_api.h: " #NAME " differs from CANN's declaration");
DS3_CANN_FUNCS_CORE(DS3_CHECK_FN)
#ifdef DS3_CHECK_GATING
DS3_CANN_FUNCS_GATING(DS3_CHECK_FN)
#endif
#ifdef DS3_CHECK_FIA
DS3_CANN_FUNCS_FIA(DS3_CHECK_FN)
#endif

#define DS3_CHECK_ENUM(NAME, VALUE) static_assert(static_cast<long long>(NAME) == VALUE, "cann_api.h: " #NAME " != " #VALUE);
DS3_CANN_ENUMS(DS3_CHECK_ENUM)
static_assert(ACL_SUCCESS == DS3_ACL_SUCCESS, "ACL_SUCCESS");
static_assert(ACL_ERROR_REPEAT_INITIALIZE == DS3_ACL_ERROR_REPEAT_INITIALIZE, "ACL_ERROR_REPEAT_INITIALIZE");
static_assert(HCCL_ROOT_INFO_BYTES == DS3_HCCL_ROOT_INFO_BYTES, "HCCL_ROOT_INFO_BYTES");
static_assert(sizeof(HcclRootInfo) == DS3_HCCL_ROOT_INFO_BYTES, "sizeof(HcclRootInfo)");

int ds3_cann_check_passed() { return 1; }
