// libopapi, part 1: elementwise, matmuls, norms, indexing, reductions.
// Every operator: GetWorkspaceSize validates handles, shapes and dtypes and snapshots the descriptors
// into a single-use executor; the second phase (SI_RUN -> launch) checks the executor and workspace and
// queues the computation on the stream. Compute is float32, results rounded once to the output dtype.
#include "ops_util.h"

using namespace si;

typedef std::shared_ptr<TensorDesc> T_;

// ------------------------------------------------------------------ elementwise binary (broadcasting)
enum BinKind { B_ADD, B_MUL, B_DIV };
static int binary(const char* op, BinKind kind, const void* selfH, const void* otherH, const void* otherScalarH,
                  const void* alphaH, const void* outH, uint64_t* ws, void** ex) {
  OpCtx c(op);
  T_ self = c.tensor(selfH, "self");
  T_ other = otherScalarH ? nullptr : c.tensor(otherH, "other");
  std::shared_ptr<Scalar> os = otherScalarH ? getScalar(c, otherScalarH, "other") : nullptr;
  std::shared_ptr<Scalar> alpha = alphaH ? getScalar(c, alphaH, "alpha") : nullptr;
  T_ out = c.tensor(outH, "out");
  if (!c.ok()) return c.rc;
  NEED_DT(c, self, "self", DT_FLOAT, DT_BF16, DT_FLOAT16);
  if (other) SAME_DT(c, self, "self", other, "other");
  SAME_DT(c, self, "self", out, "out");
  std::vector<int64_t> bd = self->dims;
  if (other) c.check(broadcastDims(self->dims, other->dims, &bd), ACLNN_ERR_PARAM_INVALID,
                     fmt("self %s and other %s do not broadcast", dimsStr(self->dims).c_str(), dimsStr(other->dims).c_str()));
  NEED_DIMS(c, out, "out", bd);
  float a = alpha ? (float)alpha->f : 1.f;
  float sc = os ? (float)os->f : 0.f;
  TensorDesc S = *self, O = *out;
  TensorDesc Ot = other ? *other : TensorDesc();
  bool hasOther = (bool)other;
  return c.finish(0, [=](char*, std::string*) {
    std::vector<float> x = readF(S), y = hasOther ? readF(Ot) : std::vector<float>();
    std::vector<float> r((size_t)O.numel());
    std::vector<std::vector<int64_t>> st{bstrides(S.dims, O.dims), hasOther ? bstrides(Ot.dims, O.dims) : std::vector<int64_t>(O.dims.size(), 0)};
    forEachIndex(O.dims, st, [&](int64_t k, const int64_t* off) {
      float u = x[off[0]], v = hasOther ? y[off[1]] : sc;
      r[k] = kind == B_ADD ? u + a * v : kind == B_MUL ? u * v : u / v;
    });
    writeF(O, r.data());
    return 0;
  }, ws, ex);
}

SI_EXPORT int aclnnAddGetWorkspaceSize(const void* self, const void* other, const void* alpha, void* out, uint64_t* ws, void** ex) {
  if (!alpha) return fail(ACLNN_ERR_PARAM_NULLPTR, "aclnnAddGetWorkspaceSize: alpha is a null aclScalar");
  return binary("aclnnAdd", B_ADD, self, other, nullptr, alpha, out, ws, ex);
}
SI_RUN(aclnnAdd)
SI_EXPORT int aclnnAddsGetWorkspaceSize(const void* self, const void* other, const void* alpha, void* out, uint64_t* ws, void** ex) {
  if (!other || !alpha) return fail(ACLNN_ERR_PARAM_NULLPTR, "aclnnAddsGetWorkspaceSize: other or alpha is a null aclScalar");
  return binary("aclnnAdds", B_ADD, self, nullptr, other, alpha, out, ws, ex);
}
SI_RUN(aclnnAdds)
SI_EXPORT int aclnnMulGetWorkspaceSize(const void* self, const void* other, void* out, uint64_t* ws, void** ex) {
  return binary("aclnnMul", B_MUL, self, other, nullptr, nullptr, out, ws, ex);
}
SI_RUN(aclnnMul)
SI_EXPORT int aclnnMulsGetWorkspaceSize(const void* self, const void* other, void* out, uint64_t* ws, void** ex) {
  if (!other) return fail(ACLNN_ERR_PARAM_NULLPTR, "aclnnMulsGetWorkspaceSize: other is a null aclScalar");
  return binary("aclnnMuls", B_MUL, self, nullptr, other, nullptr, out, ws, ex);
}
SI_RUN(aclnnMuls)
SI_EXPORT int aclnnDivGetWorkspaceSize(const void* self, const void* other, void* out, uint64_t* ws, void** ex) {
  return binary("aclnnDiv", B_DIV, self, other, nullptr, nullptr, out, ws, ex);
}
SI_RUN(aclnnDiv)

// ------------------------------------------------------------------ unary
enum UnKind { U_SILU, U_SIGMOID };
static int unary(const char* op, UnKind kind, const void* selfH, const void* outH, uint64_t* ws, void** ex) {
  OpCtx c(op);
  T_ self = c.tensor(selfH, "self"), out = c.tensor(outH, "out");
  if (!c.ok()) return c.rc;
  NEED_DT(c, self, "self", DT_FLOAT, DT_BF16, DT_FLOAT16);
  SAME_DT(c, self, "self", out, "out");
  NEED_DIMS(c, out, "out", self->dims);
  TensorDesc S = *self, O = *out;
  return c.finish(0, [=](char*, std::string*) {
    std::vector<float> x = readF(S);
    for (auto& v : x) v = kind == U_SILU ? v / (1.f + std::exp(-v)) : 1.f / (1.f + std::exp(-v));
    writeF(O, x.data());
    return 0;
  }, ws, ex);
}
SI_EXPORT int aclnnSiluGetWorkspaceSize(const void* self, void* out, uint64_t* ws, void** ex) { return unary("aclnnSilu", U_SILU, self, out, ws, ex); }
SI_RUN(aclnnSilu)
SI_EXPORT int aclnnSigmoidGetWorkspaceSize(const void* self, void* out, uint64_t* ws, void** ex) { return unary("aclnnSigmoid", U_SIGMOID, self, out, ws, ex); }
SI_RUN(aclnnSigmoid)

// ------------------------------------------------------------------ softmax
SI_EXPORT int aclnnSoftmaxGetWorkspaceSize(const void* selfH, int64_t dim, void* outH, uint64_t* ws, void** ex) {
  OpCtx c("aclnnSoftmax");
  T_ self = c.tensor(selfH, "self"), out = c.tensor(outH, "out");
  if (!c.ok()) return c.rc;
  NEED_DT(c, self, "self", DT_FLOAT, DT_BF16, DT_FLOAT16);
  SAME_DT(c, self, "self", out, "out");
  NEED_DIMS(c, out, "out", self->dims);
  int64_t d = normDim(dim, self->rank());
  c.check(d >= 0 && d < (int64_t)self->rank(), ACLNN_ERR_PARAM_INVALID, fmt("dim %lld out of range for %s", (long long)dim, dimsStr(self->dims).c_str()));
  if (!c.ok()) return c.rc;
  // move dim last: a permuted view, read contiguous rows
  TensorDesc S = swapped(*self, (size_t)d, self->rank() - 1), O = swapped(*out, (size_t)d, out->rank() - 1);
  return c.finish(0, [=](char*, std::string*) {
    std::vector<float> x = readF(S);
    int64_t n = S.dims.back(), rows = n ? (int64_t)x.size() / n : 0;
    for (int64_t r = 0; r < rows; r++) {
      float* p = x.data() + r * n;
      float m = -INFINITY;
      for (int64_t i = 0; i < n; i++) m = std::max(m, p[i]);
      float s = 0;
      for (int64_t i = 0; i < n; i++) { p[i] = std::exp(p[i] - m); s += p[i]; }
      for (int64_t i = 0; i < n; i++) p[i] /= s;
    }
    writeF(O, x.data());
    return 0;
  }, ws, ex);
}
SI_RUN(aclnnSoftmax)

// ------------------------------------------------------------------ matmul
// cubeMathType: 0 KEEP_DTYPE, 1 ALLOW_FP32_DOWN_PRECISION (fp32 as HF32 on A2), 2 USE_FP16, 3 USE_HF32
static float hf32(float v) {  // 10 explicit mantissa bits, fp32 exponent, round to nearest even
  uint32_t u; std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) return v;
  u += 0xfffu + ((u >> 13) & 1u);
  u &= ~0x1fffu;
  float f; std::memcpy(&f, &u, 4); return f;
}
// out[b] = A[b] (M x K) * B[b] (K x N) for every broadcast batch b
static int matmulCommon(const char* op, const void* selfH, const void* mat2H, const void* outH, int8_t cube, bool bmm, uint64_t* ws, void** ex) {
  OpCtx c(op);
  T_ a = c.tensor(selfH, "self"), b = c.tensor(mat2H, "mat2"), out = c.tensor(outH, "out");
  if (!c.ok()) return c.rc;
  NEED_DT(c, a, "self", DT_FLOAT, DT_BF16, DT_FLOAT16);
  SAME_DT(c, a, "self", b, "mat2");
  SAME_DT(c, a, "self", out, "out");
  c.check(cube >= 0 && cube <= 3, ACLNN_ERR_PARAM_INVALID, fmt("cubeMathType %d is not 0..3", (int)cube));
  if (bmm) {
    NEED_RANK(c, a, "self", 3);
    NEED_RANK(c, b, "mat2", 3);
  } else {
    c.check(a->rank() >= 2 && b->rank() >= 2, ACLNN_ERR_PARAM_INVALID,
            fmt("self %s and mat2 %s: the stand-in implements matmul of tensors with at least 2 dims (1-D operands are not supported)",
                dimsStr(a->dims).c_str(), dimsStr(b->dims).c_str()));
  }
  if (!c.ok()) return c.rc;
  int64_t M = a->dims[a->rank() - 2], K = a->dims.back(), K2 = b->dims[b->rank() - 2], N = b->dims.back();
  c.check(K == K2, ACLNN_ERR_PARAM_INVALID, fmt("inner dims differ: self %s, mat2 %s", dimsStr(a->dims).c_str(), dimsStr(b->dims).c_str()));
  std::vector<int64_t> ba(a->dims.begin(), a->dims.end() - 2), bb(b->dims.begin(), b->dims.end() - 2), bo;
  if (bmm) c.check(ba == bb, ACLNN_ERR_PARAM_INVALID, fmt("batch dims differ: self %s, mat2 %s", dimsStr(a->dims).c_str(), dimsStr(b->dims).c_str()));
  c.check(broadcastDims(ba, bb, &bo), ACLNN_ERR_PARAM_INVALID, fmt("batch dims of self %s and mat2 %s do not broadcast", dimsStr(a->dims).c_str(), dimsStr(b->dims).c_str()));
  std::vector<int64_t> od = bo;
  od.push_back(M);
  od.push_back(N);
  NEED_DIMS(c, out, "out", od);
  if (!c.ok()) return c.rc;
  TensorDesc A = *a, Bt = swapped(*b, b->rank() - 2, b->rank() - 1), O = *out;  // Bt: [..., N, K]
  int dt = a->dtype;
  uint64_t wsBytes = (uint64_t)out->numel() * 4 + 16384;  // fp32 accumulators + tiling scratch
  return c.finish(wsBytes, [=](char*, std::string*) {
    std::vector<float> x = readF(A), y = readF(Bt);
    if (dt == DT_FLOAT && cube != 0)
      for (auto* v : {&x, &y}) for (auto& e : *v) e = cube == 2 ? f16ToF(fToF16(e)) : hf32(e);
    std::vector<int64_t> baS = bstrides(std::vector<int64_t>(A.dims.begin(), A.dims.end() - 2), bo);
    std::vector<int64_t> bbS = bstrides(std::vector<int64_t>(Bt.dims.begin(), Bt.dims.end() - 2), bo);
    std::vector<float> r((size_t)O.numel());
    forEachIndex(bo, {baS, bbS}, [&](int64_t bi, const int64_t* off) {
      const float* pa = x.data() + off[0] * M * K;
      const float* pb = y.data() + off[1] * N * K;
      float* pr = r.data() + bi * M * N;
      for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
          float s = 0;  // fp32 accumulation in k order, as the cube unit's L0C
          const float* ra = pa + m * K;
          const float* rb = pb + n * K;
          for (int64_t k = 0; k < K; k++) s += ra[k] * rb[k];
          pr[m * N + n] = s;
        }
    });
    writeF(O, r.data());
    return 0;
  }, ws, ex);
}
SI_EXPORT int aclnnMatmulGetWorkspaceSize(const void* self, const void* mat2, void* out, int8_t cube, uint64_t* ws, void** ex) {
  return matmulCommon("aclnnMatmul", self, mat2, out, cube, false, ws, ex);
}
SI_RUN(aclnnMatmul)
SI_EXPORT int aclnnBatchMatMulGetWorkspaceSize(const void* self, const void* mat2, void* out, int8_t cube, uint64_t* ws, void** ex) {
  return matmulCommon("aclnnBatchMatMul", self, mat2, out, cube, true, ws, ex);
}
SI_RUN(aclnnBatchMatMul)

// ------------------------------------------------------------------ rms norm
SI_EXPORT int aclnnRmsNormGetWorkspaceSize(const void* xH, const void* gammaH, double eps, const void* yH, const void* rstdH, uint64_t* ws, void** ex) {
  OpCtx c("aclnnRmsNorm");
  T_ x = c.tensor(xH, "x"), g = c.tensor(gammaH, "gamma"), y = c.tensor(yH, "yOut"), rs = c.tensor(rstdH, "rstdOut");
  if (!c.ok()) return c.rc;
  NEED_DT(c, x, "x", DT_FLOAT, DT_BF16, DT_FLOAT16);
  SAME_DT(c, x, "x", g, "gamma");
  SAME_DT(c, x, "x", y, "yOut");
  NEED_DT(c, rs, "rstdOut", DT_FLOAT);
  NEED_DIMS(c, y, "yOut", x->dims);
  c.check(g->rank() >= 1 && g->rank() <= x->rank() && std::equal(g->dims.begin(), g->dims.end(), x->dims.end() - g->rank()),
          ACLNN_ERR_PARAM_INVALID, fmt("gamma %s must equal the last dims of x %s", dimsStr(g->dims).c_str(), dimsStr(x->dims).c_str()));
  if (!c.ok()) return c.rc;
  std::vector<int64_t> rd = x->dims;
  for (size_t i = x->rank() - g->rank(); i < rd.size(); i++) rd[i] = 1;
  NEED_DIMS(c, rs, "rstdOut", rd);
  if (!c.ok()) return c.rc;
  TensorDesc X = *x, G = *g, Y = *y, R = *rs;
  int64_t D = g->numel(), rows = D ? x->numel() / D : 0;
  return c.finish((uint64_t)rows * 4 + 1024, [=](char*, std::string*) {
    std::vector<float> xv = readF(X), gv = readF(G), yv(xv.size()), rv((size_t)rows);
    for (int64_t r = 0; r < rows; r++) {
      const float* p = xv.data() + r * D;
      float ss = 0;
      for (int64_t i = 0; i < D; i++) ss += p[i] * p[i];
      float rstd = 1.f / std::sqrt(ss / (float)D + (float)eps);
      rv[r] = rstd;
      for (int64_t i = 0; i < D; i++) yv[r * D + i] = p[i] * rstd * gv[i];
    }
    writeF(Y, yv.data());
    writeF(R, rv.data());
    return 0;
  }, ws, ex);
}
SI_RUN(aclnnRmsNorm)

// ------------------------------------------------------------------ embedding / index select / index copy
static bool checkIndexRange(const std::vector<int64_t>& idx, int64_t n, const char* op, const char* what, std::string* err) {
  for (size_t i = 0; i < idx.size(); i++)
    if (idx[i] < 0 || idx[i] >= n) { *err = fmt("%s: %s[%zu] = %lld is outside [0, %lld)", op, what, i, (long long)idx[i], (long long)n); return false; }
  return true;
}

SI_EXPORT int aclnnEmbeddingGetWorkspaceSize(const void* wH, const void* iH, const void* oH, uint64_t* ws, void** ex) {
  OpCtx c("aclnnEmbedding");
  T_ w = c.tensor(wH, "weight"), ix = c.tensor(iH, "indices"), o = c.tensor(oH, "out");
  if (!c.ok()) return c.rc;
  NEED_DT(c, w, "weight", DT_FLOAT, DT_BF16, DT_FLOAT16);
  NEED_DT(c, ix, "indices", DT_INT32, DT_INT64);
  SAME_DT(c, w, "weight", o, "out");
  NEED_RANK(c, w, "weight", 2);
  if (!c.ok()) return c.rc;
  std::vector<int64_t> od = ix->dims;
  od.push_back(w->dims[1]);
  NEED_DIMS(c, o, "out", od);
  if (!c.ok()) return c.rc;
  TensorDesc W = *w, I = *ix, O = *o;
  return c.finish(0, [=](char*, std::string* err) {
    std::vector<int64_t> idx = readI(I);
    int64_t V = W.dims[0], D = W.dims[1];
    if (!checkIndexRange(idx, V, "aclnnEmbedding", "indices", err)) return ACL_ERROR_RT_AICORE_EXCEPTION;
    std::vector<float> wv = readF(W), r((size_t)O.numel());
    for (size_t t = 0; t < idx.size(); t++) std::memcpy(&r[t * D], &wv[idx[t] * D], D * 4);
    writeF(O, r.data());
    return 0;
  }, ws, ex);
}
SI_RUN(aclnnEmbedding)

// a view of t with dim d moved to the front (for index ops along any dim)
static TensorDesc dimFront(const TensorDesc& t, int64_t d) {
  TensorDesc v = t;
  for (int64_t i = d; i > 0; i--) { std::swap(v.dims[i], v.dims[i - 1]); std::swap(v.strides[i], v.strides[i - 1]); }
  return v;
}

SI_EXPORT int aclnnIndexSelectGetWorkspaceSize(const void* sH, int64_t dim, const void* iH, void* oH, uint64_t* ws, void** ex) {
  OpCtx c("aclnnIndexSelect");
  T_ s = c.tensor(sH, "self"), ix = c.tensor(iH, "index"), o = c.tensor(oH, "out");
  if (!c.ok()) return c.rc;
  NEED_DT(c, s, "self", DT_FLOAT, DT_BF16, DT_FLOAT16, DT_INT32, DT_INT64);
  NEED_DT(c, ix, "index", DT_INT32, DT_INT64);
  SAME_DT(c, s, "self", o, "out");
  c.check(ix->rank() <= 1, ACLNN_ERR_PARAM_INVALID, fmt("index has shape %s; expected 1 dim", dimsStr(ix->dims).c_str()));
  int64_t d = normDim(dim, s->rank());
  c.check(d >= 0 && d < (int64_t)s->rank(), ACLNN_ERR_PARAM_INVALID, fmt("dim %lld out of range for %s", (long long)dim, dimsStr(s->dims).c_str()));
  if (!c.ok()) return c.rc;
  std::vector<int64_t> od = s->dims;
  od[d] = ix->numel();
  NEED_DIMS(c, o, "out", od);
  if (!c.ok()) return c.rc;
  TensorDesc S = dimFront(*s, d), I = *ix, O = dimFront(*o, d);
  return c.finish(0, [=](char*, std::string* err) {
    std::vector<int64_t> idx = readI(I);
    if (!checkIndexRange(idx, S.dims[0], "aclnnIndexSelect", "index", err)) return ACL_ERROR_RT_AICORE_EXCEPTION;
    std::vector<double> sv = readD(S), r((size_t)O.numel());
    int64_t inner = S.dims[0] ? S.numel() / S.dims[0] : 0;
    for (size_t i = 0; i < idx.size(); i++) std::copy(&sv[idx[i] * inner], &sv[idx[i] * inner] + inner, &r[i * inner]);
    std::vector<float> f(r.begin(), r.end());
    if (isFloat(O.dtype)) writeF(O, f.data());
    else { std::vector<int64_t> iv(r.begin(), r.end()); writeI(O, iv.data()); }
    return 0;
  }, ws, ex);
}
SI_RUN(aclnnIndexSelect)

SI_EXPORT int aclnnInplaceIndexCopyGetWorkspaceSize(void* sH, int64_t dim, const void* iH, const void* srcH, uint64_t* ws, void** ex) {
  OpCtx c("aclnnInplaceIndexCopy");
  T_ s = c.tensor(sH, "selfRef"), ix = c.tensor(iH, "index"), src = c.tensor(srcH, "source");
  if (!c.ok()) return c.rc;
  NEED_DT(c, s, "selfRef", DT_FLOAT, DT_BF16, DT_FLOAT16, DT_INT32, DT_INT64);
  NEED_DT(c, ix, "index", DT_INT32, DT_INT64);
  SAME_DT(c, s, "selfRef", src, "source");
  c.check(ix->rank() <= 1, ACLNN_ERR_PARAM_INVALID, fmt("index has shape %s; expected 1 dim", dimsStr(ix->dims).c_str()));
  int64_t d = normDim(dim, s->rank());
  c.check(d >= 0 && d < (int64_t)s->rank(), ACLNN_ERR_PARAM_INVALID, fmt("dim %lld out of range for %s", (long long)dim, dimsStr(s->dims).c_str()));
  if (!c.ok()) return c.rc;
  std::vector<int64_t> sd = s->dims;
  sd[d] = ix->numel();
  NEED_DIMS(c, src, "source", sd);
  if (!c.ok()) return c.rc;
  TensorDesc S = dimFront(*s, d), I = *ix, Src = dimFront(*src, d);
  return c.finish(0, [=](char*, std::string* err) {
    std::vector<int64_t> idx = readI(I);
    if (!checkIndexRange(idx, S.dims[0], "aclnnInplaceIndexCopy", "index", err)) return ACL_ERROR_RT_AICORE_EXCEPTION;
    std::vector<int64_t> sorted = idx;
    std::sort(sorted.begin(), sorted.end());
    for (size_t i = 1; i < sorted.size(); i++)
      if (sorted[i] == sorted[i - 1]) {
        *err = fmt("aclnnInplaceIndexCopy: index holds %lld twice; on an NPU which source row wins is undefined", (long long)sorted[i]);
        return ACL_ERROR_RT_AICORE_EXCEPTION;
      }
    // write each selected row of the view through its strides
    int64_t inner = S.dims[0] ? S.numel() / S.dims[0] : 0;
    std::vector<double> sv = readD(Src);
    TensorDesc row = S;
    row.dims.erase(row.dims.begin());
    row.strides.erase(row.strides.begin());
    for (size_t i = 0; i < idx.size(); i++) {
      TensorDesc r = row;
      r.offset = S.offset + idx[i] * S.strides[0];
      if (isFloat(r.dtype)) { std::vector<float> f(&sv[i * inner], &sv[i * inner] + inner); writeF(r, f.data()); }
      else { std::vector<int64_t> v(&sv[i * inner], &sv[i * inner] + inner); writeI(r, v.data()); }
    }
    return 0;
  }, ws, ex);
}
SI_RUN(aclnnInplaceIndexCopy)

// ------------------------------------------------------------------ copy / cast / zero / cat
static void convertCopy(const TensorDesc& S, const TensorDesc& O) {
  if (isFloat(O.dtype)) {
    if (isFloat(S.dtype)) { std::vector<float> v = readF(S); writeF(O, v.data()); }
    else { std::vector<int64_t> v = readI(S); std::vector<float> f(v.begin(), v.end()); writeF(O, f.data()); }
  } else {
    if (isFloat(S.dtype)) { std::vector<double> v = readD(S); std::vector<int64_t> i(v.size()); for (size_t k = 0; k < v.size(); k++) i[k] = (int64_t)std::trunc(v[k]); writeI(O, i.data()); }
    else { std::vector<int64_t> v = readI(S); writeI(O, v.data()); }
  }
}

SI_EXPORT int aclnnInplaceCopyGetWorkspaceSize(void* sH, const void* srcH, uint64_t* ws, void** ex) {
  OpCtx c("aclnnInplaceCopy");
  T_ s = c.tensor(sH, "selfRef"), src = c.tensor(srcH, "src");
  if (!c.ok()) return c.rc;
  NEED_DT(c, s, "selfRef", DT_FLOAT, DT_BF16, DT_FLOAT16, DT_INT32, DT_INT64);
  NEED_DT(c, src, "src", DT_FLOAT, DT_BF16, DT_FLOAT16, DT_INT32, DT_INT64);
  c.check(s->dims == src->dims, ACLNN_ERR_PARAM_INVALID,
          fmt("selfRef %s and src %s differ (the stand-in copies equal shapes only; it does not broadcast src)", dimsStr(s->dims).c_str(), dimsStr(src->dims).c_str()));
  if (!c.ok()) return c.rc;
  TensorDesc S = *src, O = *s;
  return c.finish(0, [=](char*, std::string*) { convertCopy(S, O); return 0; }, ws, ex);
}
SI_RUN(aclnnInplaceCopy)

SI_EXPORT int aclnnCastGetWorkspaceSize(const void* sH, int dtype, void* oH, uint64_t* ws, void** ex) {
  OpCtx c("aclnnCast");
  T_ s = c.tensor(sH, "self"), o = c.tensor(oH, "out");
  if (!c.ok()) return c.rc;
  NEED_DT(c, s, "self", DT_FLOAT, DT_BF16, DT_FLOAT16, DT_INT32, DT_INT64);
  c.check(o->dtype == dtype, ACLNN_ERR_PARAM_INVALID, fmt("dtype argument is %s but out is %s", dtypeName(dtype), dtypeName(o->dtype)));
  NEED_DT(c, o, "out", DT_FLOAT, DT_BF16, DT_FLOAT16, DT_INT32, DT_INT64);
  NEED_DIMS(c, o, "out", s->dims);
  if (!c.ok()) return c.rc;
  TensorDesc S = *s, O = *o;
  return c.finish(0, [=](char*, std::string*) { convertCopy(S, O); return 0; }, ws, ex);
}
SI_RUN(aclnnCast)

SI_EXPORT int aclnnInplaceZeroGetWorkspaceSize(void* sH, uint64_t* ws, void** ex) {
  OpCtx c("aclnnInplaceZero");
  T_ s = c.tensor(sH, "selfRef");
  if (!c.ok()) return c.rc;
  NEED_DT(c, s, "selfRef", DT_FLOAT, DT_BF16, DT_FLOAT16, DT_INT32, DT_INT64);
  if (!c.ok()) return c.rc;
  TensorDesc S = *s;
  return c.finish(0, [=](char*, std::string*) {
    std::vector<int64_t> z((size_t)S.numel(), 0);
    writeI(S, z.data());
    return 0;
  }, ws, ex);
}
SI_RUN(aclnnInplaceZero)

SI_EXPORT int aclnnCatGetWorkspaceSize(const void* listH, int64_t dim, void* oH, uint64_t* ws, void** ex) {
  OpCtx c("aclnnCat");
  auto items = c.list(listH, "tensors");
  T_ o = c.tensor(oH, "out");
  if (!c.ok()) return c.rc;
  c.check(!items.empty(), ACLNN_ERR_PARAM_INVALID, "tensors is an empty list");
  if (!c.ok()) return c.rc;
  int64_t d = normDim(dim, items[0]->rank());
  c.check(d >= 0 && d < (int64_t)items[0]->rank(), ACLNN_ERR_PARAM_INVALID, fmt("dim %lld out of range", (long long)dim));
  if (!c.ok()) return c.rc;
  std::vector<int64_t> od = items[0]->dims;
  od[d] = 0;
  for (size_t i = 0; i < items.size(); i++) {
    auto& t = items[i];
    SAME_DT(c, items[0], "tensors[0]", t, fmt("tensors[%zu]", i).c_str());
    bool same = t->rank() == od.size();
    for (size_t k = 0; same && k < od.size(); k++) if ((int64_t)k != d && t->dims[k] != items[0]->dims[k]) same = false;
    c.check(same, ACLNN_ERR_PARAM_INVALID, fmt("tensors[%zu] %s does not match tensors[0] %s outside dim %lld", i, dimsStr(t->dims).c_str(),
                                               dimsStr(items[0]->dims).c_str(), (long long)d));
    if (same) od[d] += t->dims[d];
  }
  SAME_DT(c, items[0], "tensors[0]", o, "out");
  NEED_DIMS(c, o, "out", od);
  if (!c.ok()) return c.rc;
  std::vector<TensorDesc> parts;
  for (auto& t : items) parts.push_back(*t);
  TensorDesc O = *o;
  return c.finish(0, [=](char*, std::string*) {
    int64_t at = 0;
    for (auto& p : parts) {
      TensorDesc dst = O;  // the slice of out along d
      dst.dims[d] = p.dims[d];
      dst.offset = O.offset + at * O.strides[d];
      convertCopy(p, dst);
      at += p.dims[d];
    }
    return 0;
  }, ws, ex);
}
SI_RUN(aclnnCat)

// ------------------------------------------------------------------ topk / reduce sum / gather / scatter
SI_EXPORT int aclnnTopkGetWorkspaceSize(const void* sH, int64_t k, int64_t dim, bool largest, bool sorted, void* vH, void* iH, uint64_t* ws, void** ex) {
  OpCtx c("aclnnTopk");
  T_ s = c.tensor(sH, "self"), v = c.tensor(vH, "valuesOut"), ix = c.tensor(iH, "indicesOut");
  if (!c.ok()) return c.rc;
  NEED_DT(c, s, "self", DT_FLOAT, DT_BF16, DT_FLOAT16);
  SAME_DT(c, s, "self", v, "valuesOut");
  NEED_DT(c, ix, "indicesOut", DT_INT64);
  int64_t d = normDim(dim, s->rank());
  c.check(d >= 0 && d < (int64_t)s->rank(), ACLNN_ERR_PARAM_INVALID, fmt("dim %lld out of range for %s", (long long)dim, dimsStr(s->dims).c_str()));
  if (!c.ok()) return c.rc;
  c.check(k >= 0 && k <= s->dims[d], ACLNN_ERR_PARAM_INVALID, fmt("k %lld is not in [0, %lld]", (long long)k, (long long)s->dims[d]));
  std::vector<int64_t> od = s->dims;
  od[d] = k;
  NEED_DIMS(c, v, "valuesOut", od);
  NEED_DIMS(c, ix, "indicesOut", od);
  if (!c.ok()) return c.rc;
  size_t last = s->rank() - 1;
  TensorDesc S = swapped(*s, d, last), V = swapped(*v, d, last), I = swapped(*ix, d, last);
  (void)sorted;  // unsorted output order is unspecified; the stand-in always returns sorted order
  return c.finish((uint64_t)s->numel() * 8 + 1024, [=](char*, std::string*) {
    std::vector<float> x = readF(S);
    int64_t n = S.dims.back(), rows = n ? (int64_t)x.size() / n : 0;
    std::vector<float> vo((size_t)(rows * k));
    std::vector<int64_t> io((size_t)(rows * k));
    std::vector<int64_t> ord((size_t)n);
    for (int64_t r = 0; r < rows; r++) {
      const float* p = x.data() + r * n;
      for (int64_t i = 0; i < n; i++) ord[i] = i;
      std::stable_sort(ord.begin(), ord.end(), [&](int64_t a, int64_t b) { return largest ? p[a] > p[b] : p[a] < p[b]; });
      for (int64_t j = 0; j < k; j++) { vo[r * k + j] = p[ord[j]]; io[r * k + j] = ord[j]; }
    }
    writeF(V, vo.data());
    writeI(I, io.data());
    return 0;
  }, ws, ex);
}
SI_RUN(aclnnTopk)

SI_EXPORT int aclnnReduceSumGetWorkspaceSize(const void* sH, const void* dimsH, bool keepDims, int dtype, void* oH, uint64_t* ws, void** ex) {
  OpCtx c("aclnnReduceSum");
  T_ s = c.tensor(sH, "self");
  bool has;
  std::vector<int64_t> dims = c.ints(dimsH, "dim", false, &has);
  T_ o = c.tensor(oH, "out");
  if (!c.ok()) return c.rc;
  NEED_DT(c, s, "self", DT_FLOAT, DT_BF16, DT_FLOAT16);
  c.check(o->dtype == dtype, ACLNN_ERR_PARAM_INVALID, fmt("dtype argument is %s but out is %s", dtypeName(dtype), dtypeName(o->dtype)));
  NEED_DT(c, o, "out", DT_FLOAT, DT_BF16, DT_FLOAT16);
  c.check(!dims.empty(), ACLNN_ERR_PARAM_INVALID, "dim is empty (the stand-in needs the dims to reduce named)");
  if (!c.ok()) return c.rc;
  std::vector<bool> red(s->rank(), false);
  for (auto d0 : dims) {
    int64_t d = normDim(d0, s->rank());
    if (!c.check(d >= 0 && d < (int64_t)s->rank() && !red[d], ACLNN_ERR_PARAM_INVALID, fmt("dim %lld out of range or repeated", (long long)d0))) return c.rc;
    red[d] = true;
  }
  std::vector<int64_t> od, kd;
  for (size_t i = 0; i < s->rank(); i++) {
    kd.push_back(red[i] ? 1 : s->dims[i]);
    if (!red[i] || keepDims) od.push_back(red[i] ? 1 : s->dims[i]);
  }
  NEED_DIMS(c, o, "out", od);
  if (!c.ok()) return c.rc;
  TensorDesc S = *s, O = *o;
  return c.finish(0, [=](char*, std::string*) {
    std::vector<float> x = readF(S), r((size_t)O.numel(), 0.f);
    forEachIndex(S.dims, {bstrides(kd, S.dims)}, [&](int64_t k, const int64_t* off) { r[off[0]] += x[k]; });
    writeF(O, r.data());
    return 0;
  }, ws, ex);
}
SI_RUN(aclnnReduceSum)

SI_EXPORT int aclnnGatherGetWorkspaceSize(const void* sH, const int64_t dim, const void* iH, void* oH, uint64_t* ws, void** ex) {
  OpCtx c("aclnnGather");
  T_ s = c.tensor(sH, "self"), ix = c.tensor(iH, "index"), o = c.tensor(oH, "out");
  if (!c.ok()) return c.rc;
  NEED_DT(c, s, "self", DT_FLOAT, DT_BF16, DT_FLOAT16, DT_INT32, DT_INT64);
  NEED_DT(c, ix, "index", DT_INT32, DT_INT64);
  SAME_DT(c, s, "self", o, "out");
  NEED_DIMS(c, o, "out", ix->dims);
  int64_t d = normDim(dim, s->rank());
  c.check(d >= 0 && d < (int64_t)s->rank(), ACLNN_ERR_PARAM_INVALID, fmt("dim %lld out of range for %s", (long long)dim, dimsStr(s->dims).c_str()));
  c.check(ix->rank() == s->rank(), ACLNN_ERR_PARAM_INVALID, fmt("index %s and self %s differ in rank", dimsStr(ix->dims).c_str(), dimsStr(s->dims).c_str()));
  if (!c.ok()) return c.rc;
  for (size_t i = 0; i < s->rank(); i++)
    c.check((int64_t)i == d || ix->dims[i] <= s->dims[i], ACLNN_ERR_PARAM_INVALID,
            fmt("index %s is larger than self %s in dim %zu", dimsStr(ix->dims).c_str(), dimsStr(s->dims).c_str(), i));
  if (!c.ok()) return c.rc;
  TensorDesc S = *s, I = *ix, O = *o;
  return c.finish(0, [=](char*, std::string* err) {
    std::vector<int64_t> idx = readI(I);
    std::vector<double> sv = readD(S), r(idx.size());
    std::vector<int64_t> ss = contigStrides(S.dims);
    std::vector<int64_t> sub = ss;  // S strides restricted to index's extent, with dim d contributing through the index value
    sub[d] = 0;
    bool bad = false;
    forEachIndex(I.dims, {sub}, [&](int64_t k, const int64_t* off) {
      int64_t v = idx[k];
      if (v < 0 || v >= S.dims[d]) { if (!bad) *err = fmt("aclnnGather: index value %lld is outside [0, %lld)", (long long)v, (long long)S.dims[d]); bad = true; return; }
      r[k] = sv[off[0] + v * ss[d]];
    });
    if (bad) return ACL_ERROR_RT_AICORE_EXCEPTION;
    if (isFloat(O.dtype)) { std::vector<float> f(r.begin(), r.end()); writeF(O, f.data()); }
    else { std::vector<int64_t> iv(r.begin(), r.end()); writeI(O, iv.data()); }
    return 0;
  }, ws, ex);
}
SI_RUN(aclnnGather)

SI_EXPORT int aclnnScatterGetWorkspaceSize(const void* sH, int64_t dim, const void* iH, const void* srcH, int64_t reduce, void* oH, uint64_t* ws, void** ex) {
  OpCtx c("aclnnScatter");
  T_ s = c.tensor(sH, "self"), ix = c.tensor(iH, "index"), src = c.tensor(srcH, "src"), o = c.tensor(oH, "out");
  if (!c.ok()) return c.rc;
  NEED_DT(c, s, "self", DT_FLOAT, DT_BF16, DT_FLOAT16, DT_INT32, DT_INT64);
  NEED_DT(c, ix, "index", DT_INT32, DT_INT64);
  SAME_DT(c, s, "self", src, "src");
  SAME_DT(c, s, "self", o, "out");
  NEED_DIMS(c, o, "out", s->dims);
  c.check(reduce >= 0 && reduce <= 2, ACLNN_ERR_PARAM_INVALID, fmt("reduce %lld is not 0 (replace), 1 (add) or 2 (multiply)", (long long)reduce));
  int64_t d = normDim(dim, s->rank());
  c.check(d >= 0 && d < (int64_t)s->rank(), ACLNN_ERR_PARAM_INVALID, fmt("dim %lld out of range", (long long)dim));
  c.check(ix->rank() == s->rank() && src->rank() == s->rank(), ACLNN_ERR_PARAM_INVALID, "self, index and src must have the same rank");
  if (!c.ok()) return c.rc;
  for (size_t i = 0; i < s->rank(); i++)
    c.check(ix->dims[i] <= src->dims[i] && ((int64_t)i == d || ix->dims[i] <= s->dims[i]), ACLNN_ERR_PARAM_INVALID,
            fmt("index %s must fit in src %s and (outside dim %lld) in self %s", dimsStr(ix->dims).c_str(), dimsStr(src->dims).c_str(), (long long)d, dimsStr(s->dims).c_str()));
  if (!c.ok()) return c.rc;
  TensorDesc S = *s, I = *ix, Src = *src, O = *o;
  return c.finish(0, [=](char*, std::string* err) {
    std::vector<int64_t> idx = readI(I);
    std::vector<double> r = readD(S), sv = readD(Src);
    std::vector<int64_t> ss = contigStrides(S.dims), srs = contigStrides(Src.dims), sub = ss;
    sub[d] = 0;
    std::vector<bool> hit((size_t)S.numel(), false);
    bool bad = false;
    forEachIndex(I.dims, {sub, srs}, [&](int64_t k, const int64_t* off) {
      int64_t v = idx[k];
      if (bad) return;
      if (v < 0 || v >= S.dims[d]) { *err = fmt("aclnnScatter: index value %lld is outside [0, %lld)", (long long)v, (long long)S.dims[d]); bad = true; return; }
      int64_t at = off[0] + v * ss[d];
      if (reduce == 0 && hit[at]) { *err = fmt("aclnnScatter: two index entries write the same element (value %lld); with reduce 0 the NPU result is undefined", (long long)v); bad = true; return; }
      hit[at] = true;
      r[at] = reduce == 0 ? sv[off[1]] : reduce == 1 ? r[at] + sv[off[1]] : r[at] * sv[off[1]];
    });
    if (bad) return ACL_ERROR_RT_AICORE_EXCEPTION;
    if (isFloat(O.dtype)) { std::vector<float> f(r.begin(), r.end()); writeF(O, f.data()); }
    else { std::vector<int64_t> iv(r.begin(), r.end()); writeI(O, iv.data()); }
    return 0;
  }, ws, ex);
}
SI_RUN(aclnnScatter)
