// Helpers shared by the operator files (libopapi).
#pragma once
#include <algorithm>
#include <cmath>
#include <initializer_list>

#include "common.h"

namespace si {

#define SI_RUN(NAME) \
  SI_EXPORT int NAME(void* workspace, uint64_t workspaceSize, void* executor, void* stream) { return launch(#NAME, workspace, workspaceSize, executor, stream); }

inline bool dtIn(int dt, std::initializer_list<int> l) { for (int d : l) if (d == dt) return true; return false; }
inline std::string dtNames(std::initializer_list<int> l) {
  std::string s;
  for (int d : l) s += (s.empty() ? "" : ", ") + std::string(dtypeName(d));
  return s;
}
#define NEED_DT(ctx, t, arg, ...) (ctx).check(dtIn((t)->dtype, {__VA_ARGS__}), ACLNN_ERR_PARAM_INVALID, \
    fmt("%s has dtype %s; supported: %s", arg, dtypeName((t)->dtype), dtNames({__VA_ARGS__}).c_str()))
#define SAME_DT(ctx, a, an, b, bn) (ctx).check((a)->dtype == (b)->dtype, ACLNN_ERR_PARAM_INVALID, \
    fmt("dtype mismatch: %s is %s but %s is %s (the stand-in does not promote dtypes)", an, dtypeName((a)->dtype), bn, dtypeName((b)->dtype)))
#define NEED_DIMS(ctx, t, arg, want) (ctx).check((t)->dims == (want), ACLNN_ERR_PARAM_INVALID, \
    fmt("%s has shape %s; expected %s", arg, dimsStr((t)->dims).c_str(), dimsStr(want).c_str()))
#define NEED_RANK(ctx, t, arg, r) (ctx).check((int64_t)(t)->dims.size() == (r), ACLNN_ERR_PARAM_INVALID, \
    fmt("%s has shape %s; expected %d dims", arg, dimsStr((t)->dims).c_str(), (int)(r)))

inline const int FLOATS[] = {DT_FLOAT, DT_BF16, DT_FLOAT16};

inline std::shared_ptr<Scalar> getScalar(OpCtx& c, const void* h, const char* arg) {
  if (c.rc) return nullptr;
  if (!h) { c.rc = fail(ACLNN_ERR_PARAM_NULLPTR, fmt("%sGetWorkspaceSize: %s is a null aclScalar", c.op, arg)); return nullptr; }
  std::string why;
  auto s = scalars().get(h, &why);
  if (!s) c.rc = fail(ACLNN_ERR_PARAM_INVALID, fmt("%sGetWorkspaceSize: %s: %s", c.op, arg, why.c_str()));
  return s;
}

inline std::vector<int64_t> contigStrides(const std::vector<int64_t>& d) {
  std::vector<int64_t> s(d.size(), 1);
  for (size_t i = d.size(); i-- > 1;) s[i - 1] = s[i] * d[i];
  return s;
}
// numpy broadcast of a and b; false when incompatible
inline bool broadcastDims(const std::vector<int64_t>& a, const std::vector<int64_t>& b, std::vector<int64_t>* out) {
  size_t r = std::max(a.size(), b.size());
  out->assign(r, 1);
  for (size_t i = 0; i < r; i++) {
    int64_t da = i < r - a.size() ? 1 : a[i - (r - a.size())];
    int64_t db = i < r - b.size() ? 1 : b[i - (r - b.size())];
    if (da != db && da != 1 && db != 1) return false;
    (*out)[i] = da == 1 ? db : da;
  }
  return true;
}
// strides (in a contiguous copy of an input of dims `in`) aligned to the broadcast output dims; 0 where broadcast
inline std::vector<int64_t> bstrides(const std::vector<int64_t>& in, const std::vector<int64_t>& out) {
  std::vector<int64_t> cs = contigStrides(in), s(out.size(), 0);
  size_t off = out.size() - in.size();
  for (size_t i = 0; i < in.size(); i++) s[off + i] = in[i] == 1 ? 0 : cs[i];
  return s;
}
template <class F>
inline void forEachIndex(const std::vector<int64_t>& dims, const std::vector<std::vector<int64_t>>& strides, F f) {
  int64_t n = 1;
  for (auto d : dims) n *= d;
  size_t r = dims.size(), m = strides.size();
  std::vector<int64_t> idx(r, 0), off(m, 0);
  for (int64_t k = 0; k < n; k++) {
    f(k, off.data());
    for (size_t d = r; d-- > 0;) {
      if (++idx[d] < dims[d]) { for (size_t j = 0; j < m; j++) off[j] += strides[j][d]; break; }
      for (size_t j = 0; j < m; j++) off[j] -= strides[j][d] * (dims[d] - 1);
      idx[d] = 0;
    }
  }
}
// A view of t with two dims swapped (no data moved)
inline TensorDesc swapped(const TensorDesc& t, size_t a, size_t b) {
  TensorDesc v = t;
  std::swap(v.dims[a], v.dims[b]);
  std::swap(v.strides[a], v.strides[b]);
  return v;
}
inline int64_t normDim(int64_t d, size_t rank) { return d < 0 ? d + (int64_t)rank : d; }

}  // namespace si
