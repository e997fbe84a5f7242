// libopapi, part 2: the MoE operators and FusedInferAttentionScoreV3.
// Build with -DDS3_STANDIN_TOO_OLD to leave out aclnnMoeFinalizeRoutingV2 (the "CANN too old" library).
#include <numeric>

#include "ops_util.h"

using namespace si;

typedef std::shared_ptr<TensorDesc> T_;

// ------------------------------------------------------------------ aclnnMoeInitRoutingV2
// Documented: sortedExpertIdx, sortedRowIdx = keyValueSort(flatten(expertIdx)) (stable: ties keep the flat
// index order); expandedRowIdxOut[sortedRowIdx[i]] = i; expandedXOut[i] = x[sortedRowIdx[i] / k];
// expertTokensCountOrCumsumOut = cumsum (flag 1) or count (flag 2) of the histogram. Dropless only.
SI_EXPORT int aclnnMoeInitRoutingV2GetWorkspaceSize(const void* xH, const void* eH, int64_t activeNum, int64_t expertCapacity, int64_t expertNum,
                                                    int64_t dropPadMode, int64_t countFlag, bool beforeCapacityFlag, const void* exH,
                                                    const void* rowH, const void* cntH, const void* bcH, uint64_t* ws, void** ex) {
  OpCtx c("aclnnMoeInitRoutingV2");
  T_ x = c.tensor(xH, "x"), e = c.tensor(eH, "expertIdx"), exo = c.tensor(exH, "expandedXOut"), row = c.tensor(rowH, "expandedRowIdxOut");
  T_ cnt = c.tensor(cntH, "expertTokensCountOrCumsumOut", true), bc = c.tensor(bcH, "expertTokensBeforeCapacityOut", true);
  if (!c.ok()) return c.rc;
  NEED_DT(c, x, "x", DT_FLOAT, DT_BF16, DT_FLOAT16);
  NEED_DT(c, e, "expertIdx", DT_INT32);
  SAME_DT(c, x, "x", exo, "expandedXOut");
  NEED_DT(c, row, "expandedRowIdxOut", DT_INT32);
  NEED_RANK(c, x, "x", 2);
  NEED_RANK(c, e, "expertIdx", 2);
  if (!c.ok()) return c.rc;
  int64_t T = x->dims[0], D = x->dims[1], K = e->dims[1];
  c.check(e->dims[0] == T, ACLNN_ERR_INNER_TILING_ERROR, fmt("x %s and expertIdx %s differ in rows", dimsStr(x->dims).c_str(), dimsStr(e->dims).c_str()));
  c.check(activeNum >= 0 && expertCapacity >= 0 && expertNum >= 0, ACLNN_ERR_INNER_TILING_ERROR, "activeNum, expertCapacity and expertNum must be >= 0");
  c.check(dropPadMode == 0 || dropPadMode == 1, ACLNN_ERR_INNER_TILING_ERROR, fmt("dropPadMode %lld is not 0 or 1", (long long)dropPadMode));
  c.check(dropPadMode == 0, ACLNN_ERR_PARAM_INVALID, "dropPadMode 1 (drop/pad) is not implemented by the stand-in");
  c.check(activeNum == 0 || activeNum >= T * K, ACLNN_ERR_PARAM_INVALID,
          fmt("activeNum %lld is below numRows*k = %lld: the stand-in implements the dropless case only (activeNum 0 or >= numRows*k); "
              "the documentation leaves expandedRowIdxOut of the dropped rows unstated", (long long)activeNum, (long long)(T * K)));
  c.check(countFlag >= 0 && countFlag <= 2, ACLNN_ERR_INNER_TILING_ERROR, fmt("expertTokensCountOrCumsumFlag %lld is not 0, 1 or 2", (long long)countFlag));
  c.check(!beforeCapacityFlag, ACLNN_ERR_PARAM_INVALID, "expertTokensBeforeCapacityFlag is only for dropPadMode 1");
  if (countFlag > 0) {
    c.check(expertNum > 0, ACLNN_ERR_INNER_TILING_ERROR, "expertNum must be > 0 when expertTokensCountOrCumsumOut is produced");
    c.check((bool)cnt, ACLNN_ERR_PARAM_NULLPTR, "expertTokensCountOrCumsumOut is null but expertTokensCountOrCumsumFlag asks for it");
    if (c.ok()) {
      c.check(cnt->dtype == DT_INT32, ACLNN_ERR_PARAM_INVALID,
              fmt("expertTokensCountOrCumsumOut has dtype %s; the operator defines it as INT32 only (MoeInitRoutingV2 op definition); "
                  "cast it to INT64 for aclnnGroupedMatmulV4's groupList", dtypeName(cnt->dtype)));
      NEED_DIMS(c, cnt, "expertTokensCountOrCumsumOut", std::vector<int64_t>{expertNum});
    }
  }
  NEED_DIMS(c, exo, "expandedXOut", (std::vector<int64_t>{T * K, D}));
  NEED_DIMS(c, row, "expandedRowIdxOut", std::vector<int64_t>{T * K});
  if (!c.ok()) return c.rc;
  TensorDesc X = *x, E = *e, XO = *exo, R = *row;
  bool hasCnt = countFlag > 0;
  TensorDesc C = hasCnt ? *cnt : TensorDesc();
  return c.finish((uint64_t)(T * K) * 16 + (uint64_t)expertNum * 8 + 16384, [=](char*, std::string* err) {
    std::vector<int64_t> ei = readI(E);
    int64_t n = T * K;
    for (int64_t i = 0; i < n; i++)
      if (ei[i] < 0 || (hasCnt && ei[i] >= expertNum)) {
        *err = fmt("aclnnMoeInitRoutingV2: expertIdx[%lld][%lld] = %lld is outside [0, %lld)", (long long)(i / K), (long long)(i % K), (long long)ei[i],
                   (long long)(hasCnt ? expertNum : INT64_MAX));
        return ACL_ERROR_RT_AICORE_EXCEPTION;
      }
    std::vector<int64_t> order((size_t)n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ei[a] < ei[b]; });
    std::vector<float> xv = readF(X), xo((size_t)(n * D));
    std::vector<int64_t> ri((size_t)n);
    for (int64_t i = 0; i < n; i++) {
      ri[order[i]] = i;
      std::memcpy(&xo[i * D], &xv[(order[i] / K) * D], D * 4);
    }
    writeF(XO, xo.data());
    writeI(R, ri.data());
    if (hasCnt) {
      std::vector<int64_t> h((size_t)expertNum, 0);
      for (auto v : ei) h[v]++;
      if (countFlag == 1) for (int64_t i = 1; i < expertNum; i++) h[i] += h[i - 1];
      writeI(C, h.data());
    }
    return 0;
  }, ws, ex);
}
SI_RUN(aclnnMoeInitRoutingV2)

// ------------------------------------------------------------------ aclnnGroupedMatmulV4
// Implemented: one x [M, K], one weight [G, K, N] (any strides), groupType 0 (split M), groupList INT64
// cumsum (groupListType 0) or counts (1), splitItem 2/3 (one output [M, N]), no bias/quant/activation.
// Rows of out at and past the last group end are not written.
SI_EXPORT int aclnnGroupedMatmulV4GetWorkspaceSize(const void* xL, const void* wL, const void* biasL, const void* scaleL, const void* offsetL,
                                                   const void* aqsL, const void* aqoL, const void* ptsL, const void* glH, const void* actInL,
                                                   const void* actQsL, const void* actQoL, int64_t splitItem, int64_t groupType, int64_t groupListType,
                                                   int64_t actType, void* outL, void* actFeatL, void* dynQsL, uint64_t* ws, void** ex) {
  OpCtx c("aclnnGroupedMatmulV4");
  auto xs = c.list(xL, "x");
  auto wsT = c.list(wL, "weight");
  T_ gl = c.tensor(glH, "groupListOptional", true);
  auto outs = c.list(outL, "out");
  if (!c.ok()) return c.rc;
  const void* unsupported[] = {biasL, scaleL, offsetL, aqsL, aqoL, ptsL, actInL, actQsL, actQoL, actFeatL, dynQsL};
  const char* names[] = {"biasOptional", "scaleOptional", "offsetOptional", "antiquantScaleOptional", "antiquantOffsetOptional", "perTokenScaleOptional",
                         "activationInputOptional", "activationQuantScaleOptional", "activationQuantOffsetOptional", "activationFeatureOutOptional",
                         "dynQuantScaleOutOptional"};
  for (int i = 0; i < 11; i++)
    c.check(!unsupported[i], ACLNN_ERR_PARAM_INVALID, fmt("%s is not null: the stand-in implements GroupedMatmulV4 without bias, quantization or activation", names[i]));
  c.check(groupType == 0, ACLNN_ERR_PARAM_INVALID, fmt("groupType %lld: the stand-in implements groupType 0 (groups split the M axis of one x) only", (long long)groupType));
  c.check(splitItem == 2 || splitItem == 3, ACLNN_ERR_PARAM_INVALID, fmt("splitItem %lld: the stand-in implements 2/3 (one output tensor) only", (long long)splitItem));
  c.check(groupListType == 0 || groupListType == 1, ACLNN_ERR_PARAM_INVALID, fmt("groupListType %lld is not 0 (cumsum) or 1 (counts)", (long long)groupListType));
  c.check(actType == 0, ACLNN_ERR_PARAM_INVALID, fmt("actType %lld: the stand-in implements actType 0 (no activation) only", (long long)actType));
  c.check(xs.size() == 1 && wsT.size() == 1 && outs.size() == 1, ACLNN_ERR_PARAM_INVALID,
          fmt("x, weight and out hold %zu, %zu and %zu tensors; with groupType 0 and splitItem 2/3 each holds one", xs.size(), wsT.size(), outs.size()));
  c.check((bool)gl, ACLNN_ERR_PARAM_NULLPTR, "groupListOptional is null but groupType 0 needs it");
  if (!c.ok()) return c.rc;
  T_ x = xs[0], w = wsT[0], o = outs[0];
  NEED_DT(c, x, "x[0]", DT_FLOAT, DT_BF16, DT_FLOAT16);
  SAME_DT(c, x, "x[0]", w, "weight[0]");
  SAME_DT(c, x, "x[0]", o, "out[0]");
  NEED_DT(c, gl, "groupListOptional", DT_INT64);
  NEED_RANK(c, x, "x[0]", 2);
  NEED_RANK(c, w, "weight[0]", 3);
  NEED_RANK(c, gl, "groupListOptional", 1);
  if (!c.ok()) return c.rc;
  int64_t M = x->dims[0], K = x->dims[1], G = w->dims[0], N = w->dims[2];
  c.check(w->dims[1] == K, ACLNN_ERR_PARAM_INVALID, fmt("weight[0] %s does not have K = %lld rows per group (x %s)", dimsStr(w->dims).c_str(), (long long)K, dimsStr(x->dims).c_str()));
  c.check(gl->dims[0] == G, ACLNN_ERR_PARAM_INVALID, fmt("groupListOptional has %lld entries but weight[0] has %lld groups", (long long)gl->dims[0], (long long)G));
  NEED_DIMS(c, o, "out[0]", (std::vector<int64_t>{M, N}));
  if (!c.ok()) return c.rc;
  TensorDesc X = *x, Wt = swapped(*w, 1, 2), GL = *gl, O = *o;  // Wt: [G, N, K]
  return c.finish((uint64_t)(M * N) * 4 + 16384, [=](char*, std::string* err) {
    std::vector<int64_t> g = readI(GL);
    std::vector<int64_t> start((size_t)G), end((size_t)G);
    int64_t at = 0;
    for (int64_t i = 0; i < G; i++) {
      int64_t e2 = groupListType == 0 ? g[i] : at + g[i];
      if ((groupListType == 1 && g[i] < 0) || e2 < at || e2 > M) {
        *err = fmt("aclnnGroupedMatmulV4: groupList %s entry %lld = %lld: %s", groupListType == 0 ? "(cumsum)" : "(counts)", (long long)i, (long long)g[i],
                   groupListType == 0 ? "a cumsum must be non-decreasing and at most M" : "counts must be >= 0 and sum to at most M");
        return ACL_ERROR_RT_AICORE_EXCEPTION;
      }
      start[i] = at;
      end[i] = e2;
      at = e2;
    }
    std::vector<float> xv = readF(X);
    std::vector<float> wrow((size_t)(N * K));
    for (int64_t gi = 0; gi < G; gi++) {
      if (end[gi] == start[gi]) continue;
      TensorDesc Wg = Wt;  // [N, K] of group gi
      Wg.dims.erase(Wg.dims.begin());
      Wg.strides.erase(Wg.strides.begin());
      Wg.offset = Wt.offset + gi * Wt.strides[0];
      std::vector<float> wv = readF(Wg);
      int64_t rows = end[gi] - start[gi];
      std::vector<float> r((size_t)(rows * N));
      for (int64_t m = 0; m < rows; m++)
        for (int64_t n = 0; n < N; n++) {
          float s = 0;
          const float* a = &xv[(start[gi] + m) * K];
          const float* b = &wv[n * K];
          for (int64_t k = 0; k < K; k++) s += a[k] * b[k];
          r[m * N + n] = s;
        }
      TensorDesc Og = O;  // rows [start, end) of out
      Og.dims[0] = rows;
      Og.offset = O.offset + start[gi] * O.strides[0];
      writeF(Og, r.data());
    }
    return 0;
  }, ws, ex);
}
SI_RUN(aclnnGroupedMatmulV4)

// ------------------------------------------------------------------ aclnnMoeFinalizeRoutingV2
// out(i,j) = x1(i,j) + x2(i,j) + sum_k scales(i,k) * (expandedX(expandedRowIdx(pos(i,k)), j) + bias(expertIdx(i,k), j))
// dropPadMode 0: pos = i + k*NUM_ROWS (column order, as aclnnMoeInitRouting V1 writes it)
// dropPadMode 2: pos = i*K + k        (row order, as aclnnMoeInitRoutingV2 writes it)
// dropPadMode 1 and 3 (drop/pad) are not implemented.
#ifndef DS3_STANDIN_TOO_OLD
SI_EXPORT int aclnnMoeFinalizeRoutingV2GetWorkspaceSize(const void* exH, const void* rowH, const void* x1H, const void* x2H, const void* biasH,
                                                        const void* scH, const void* eiH, int64_t dropPadMode, const void* oH, uint64_t* ws, void** ex) {
  OpCtx c("aclnnMoeFinalizeRoutingV2");
  T_ exX = c.tensor(exH, "expandedX"), row = c.tensor(rowH, "expandedRowIdx"), x1 = c.tensor(x1H, "x1Optional", true), x2 = c.tensor(x2H, "x2Optional", true);
  T_ bias = c.tensor(biasH, "biasOptional", true), sc = c.tensor(scH, "scalesOptional", true), ei = c.tensor(eiH, "expertIdxOptional", true);
  T_ o = c.tensor(oH, "out");
  if (!c.ok()) return c.rc;
  NEED_DT(c, exX, "expandedX", DT_FLOAT, DT_BF16, DT_FLOAT16);
  SAME_DT(c, exX, "expandedX", o, "out");
  NEED_DT(c, row, "expandedRowIdx", DT_INT32);
  c.check(dropPadMode >= 0 && dropPadMode <= 3, ACLNN_ERR_PARAM_INVALID, fmt("dropPadMode %lld is not in [0, 3]", (long long)dropPadMode));
  c.check(dropPadMode == 0 || dropPadMode == 2, ACLNN_ERR_PARAM_INVALID, fmt("dropPadMode %lld (drop/pad) is not implemented by the stand-in", (long long)dropPadMode));
  NEED_RANK(c, exX, "expandedX", 2);
  NEED_RANK(c, o, "out", 2);
  c.check(!x2 || x1, ACLNN_ERR_PARAM_INVALID, "x2Optional is given without x1Optional");
  c.check(!bias || ei, ACLNN_ERR_PARAM_INVALID, "biasOptional needs expertIdxOptional");
  if (!c.ok()) return c.rc;
  int64_t R = o->dims[0], H = o->dims[1];
  int64_t K = sc ? (sc->rank() == 2 ? sc->dims[1] : -1) : 1;
  c.check(K > 0, ACLNN_ERR_PARAM_INVALID, "scalesOptional must be [NUM_ROWS, K]");
  if (!c.ok()) return c.rc;
  NEED_DIMS(c, exX, "expandedX", (std::vector<int64_t>{R * K, H}));
  NEED_DIMS(c, row, "expandedRowIdx", std::vector<int64_t>{R * K});
  if (sc) {
    NEED_DIMS(c, sc, "scalesOptional", (std::vector<int64_t>{R, K}));
    c.check(sc->dtype == exX->dtype || (exX->dtype == DT_BF16 && sc->dtype == DT_FLOAT), ACLNN_ERR_PARAM_INVALID,
            fmt("scalesOptional is %s but expandedX is %s (allowed: the same, or FLOAT with BF16)", dtypeName(sc->dtype), dtypeName(exX->dtype)));
  }
  for (auto& p : {std::make_pair(x1, "x1Optional"), std::make_pair(x2, "x2Optional")})
    if (p.first) { NEED_DIMS(c, p.first, p.second, o->dims); SAME_DT(c, p.first, p.second, o, "out"); }
  if (ei) { NEED_DT(c, ei, "expertIdxOptional", DT_INT32); NEED_DIMS(c, ei, "expertIdxOptional", (std::vector<int64_t>{R, K})); }
  if (bias) { NEED_RANK(c, bias, "biasOptional", 2); SAME_DT(c, bias, "biasOptional", o, "out"); if (c.ok()) c.check(bias->dims[1] == H, ACLNN_ERR_PARAM_INVALID, "biasOptional must be [E, H]"); }
  if (!c.ok()) return c.rc;
  TensorDesc EX = *exX, RI = *row, O = *o;
  bool h1 = (bool)x1, h2 = (bool)x2, hb = (bool)bias, hs = (bool)sc, he = (bool)ei;
  TensorDesc X1 = h1 ? *x1 : TensorDesc(), X2 = h2 ? *x2 : TensorDesc(), B = hb ? *bias : TensorDesc(), S = hs ? *sc : TensorDesc(), EI = he ? *ei : TensorDesc();
  return c.finish((uint64_t)(R * H) * 4 + 16384, [=](char*, std::string* err) {
    std::vector<int64_t> ri = readI(RI), eiv = he ? readI(EI) : std::vector<int64_t>();
    std::vector<float> xv = readF(EX), sv = hs ? readF(S) : std::vector<float>((size_t)R, 1.f);
    std::vector<float> a1 = h1 ? readF(X1) : std::vector<float>(), a2 = h2 ? readF(X2) : std::vector<float>(), bv = hb ? readF(B) : std::vector<float>();
    int64_t E = hb ? B.dims[0] : 0;
    std::vector<float> r((size_t)(R * H), 0.f);
    for (int64_t i = 0; i < R; i++) {
      float* pr = &r[i * H];
      if (h1) for (int64_t j = 0; j < H; j++) pr[j] = a1[i * H + j];
      if (h2) for (int64_t j = 0; j < H; j++) pr[j] += a2[i * H + j];
      for (int64_t k = 0; k < K; k++) {
        int64_t pos = dropPadMode == 0 ? i + k * R : i * K + k;
        int64_t src = ri[pos];
        if (src < 0 || src >= R * K) {
          *err = fmt("aclnnMoeFinalizeRoutingV2: expandedRowIdx[%lld] = %lld is outside [0, %lld)", (long long)pos, (long long)src, (long long)(R * K));
          return ACL_ERROR_RT_AICORE_EXCEPTION;
        }
        int64_t eid = he ? eiv[i * K + k] : 0;
        if (hb && (eid < 0 || eid >= E)) {
          *err = fmt("aclnnMoeFinalizeRoutingV2: expertIdx[%lld][%lld] = %lld is outside [0, %lld)", (long long)i, (long long)k, (long long)eid, (long long)E);
          return ACL_ERROR_RT_AICORE_EXCEPTION;
        }
        float s = sv[i * K + k];
        for (int64_t j = 0; j < H; j++) pr[j] += s * (xv[src * H + j] + (hb ? bv[eid * H + j] : 0.f));
      }
    }
    writeF(O, r.data());
    return 0;
  }, ws, ex);
}
SI_RUN(aclnnMoeFinalizeRoutingV2)
#endif

// ------------------------------------------------------------------ aclnnMoeGatingTopK
// s = sigmoid(x) (normType 1) or softmax(x) (normType 0); c = s + bias; groups of E/groupCount experts scored
// by max(c) (groupSelectMode 0) or the sum of the top 2 of c (1); the kGroup best groups kept; top-k of c in
// them (descending, ties to the lower index); yOut = s[idx] / (sum s[idx] + eps) * routedScalingFactor (the
// unbiased scores, as the kernel computes y from its sigmoid buffer); outOut = s when outFlag.
SI_EXPORT int aclnnMoeGatingTopKGetWorkspaceSize(const void* xH, const void* bH, int64_t k, int64_t kGroup, int64_t groupCount, int64_t groupSelectMode,
                                                 int64_t renorm, int64_t normType, bool outFlag, double rsf, double eps, const void* yH,
                                                 const void* iH, const void* oH, uint64_t* ws, void** ex) {
  OpCtx c("aclnnMoeGatingTopK");
  T_ x = c.tensor(xH, "x"), b = c.tensor(bH, "biasOptional", true), y = c.tensor(yH, "yOut"), ix = c.tensor(iH, "expertIdxOut");
  T_ o = c.tensor(oH, "outOut", true);
  if (!c.ok()) return c.rc;
  NEED_DT(c, x, "x", DT_FLOAT, DT_BF16, DT_FLOAT16);
  SAME_DT(c, x, "x", y, "yOut");
  NEED_DT(c, ix, "expertIdxOut", DT_INT32);
  NEED_RANK(c, x, "x", 2);
  if (!c.ok()) return c.rc;
  int64_t T = x->dims[0], E = x->dims[1];
  if (b) { SAME_DT(c, x, "x", b, "biasOptional"); NEED_DIMS(c, b, "biasOptional", std::vector<int64_t>{E}); }
  c.check(E <= 2048, ACLNN_ERR_INNER_TILING_ERROR, fmt("x has %lld experts; at most 2048", (long long)E));
  c.check(groupCount > 0 && E % groupCount == 0, ACLNN_ERR_INNER_TILING_ERROR, fmt("groupCount %lld must be > 0 and divide the %lld experts", (long long)groupCount, (long long)E));
  if (!c.ok()) return c.rc;
  int64_t per = E / groupCount;
  c.check(per > 2, ACLNN_ERR_INNER_TILING_ERROR, fmt("each group holds %lld experts; more than 2 are required", (long long)per));
  c.check((per + 31) / 32 * 32 * groupCount <= 2048, ACLNN_ERR_INNER_TILING_ERROR, "groups aligned to 32 experts exceed 2048");
  c.check(kGroup >= 1 && kGroup <= groupCount, ACLNN_ERR_INNER_TILING_ERROR, fmt("kGroup %lld is not in [1, groupCount %lld]", (long long)kGroup, (long long)groupCount));
  c.check(k >= 1 && k <= per * kGroup, ACLNN_ERR_INNER_TILING_ERROR, fmt("k %lld is not in [1, E/groupCount*kGroup = %lld]", (long long)k, (long long)(per * kGroup)));
  c.check(groupSelectMode == 0 || groupSelectMode == 1, ACLNN_ERR_PARAM_INVALID, fmt("groupSelectMode %lld is not 0 (max) or 1 (top-2 sum)", (long long)groupSelectMode));
  c.check(renorm == 0, ACLNN_ERR_PARAM_INVALID, fmt("renorm %lld: only 0 (norm, then top-k) is supported", (long long)renorm));
  c.check(normType == 0 || normType == 1, ACLNN_ERR_PARAM_INVALID, fmt("normType %lld is not 0 (softmax) or 1 (sigmoid)", (long long)normType));
  NEED_DIMS(c, y, "yOut", (std::vector<int64_t>{T, k}));
  NEED_DIMS(c, ix, "expertIdxOut", (std::vector<int64_t>{T, k}));
  if (outFlag) {
    c.check((bool)o, ACLNN_ERR_PARAM_NULLPTR, "outOut is null but outFlag is true");
    if (c.ok()) { NEED_DT(c, o, "outOut", DT_FLOAT); NEED_DIMS(c, o, "outOut", x->dims); }
  }
  if (!c.ok()) return c.rc;
  TensorDesc X = *x, Y = *y, I = *ix;
  bool hb = (bool)b, ho = outFlag && o;
  TensorDesc B = hb ? *b : TensorDesc(), O = ho ? *o : TensorDesc();
  return c.finish((uint64_t)(T * E) * 8 + 16384, [=](char*, std::string*) {
    std::vector<float> xv = readF(X), bv = hb ? readF(B) : std::vector<float>((size_t)E, 0.f);
    std::vector<float> yo((size_t)(T * k)), so((size_t)(T * E));
    std::vector<int64_t> io((size_t)(T * k));
    std::vector<float> s((size_t)E), cv((size_t)E), gs((size_t)groupCount);
    std::vector<int64_t> ord((size_t)E), gord((size_t)groupCount);
    for (int64_t t = 0; t < T; t++) {
      const float* p = &xv[t * E];
      if (normType == 1) for (int64_t e = 0; e < E; e++) s[e] = 1.f / (1.f + std::exp(-p[e]));
      else {
        float m = -INFINITY, sum = 0;
        for (int64_t e = 0; e < E; e++) m = std::max(m, p[e]);
        for (int64_t e = 0; e < E; e++) { s[e] = std::exp(p[e] - m); sum += s[e]; }
        for (int64_t e = 0; e < E; e++) s[e] /= sum;
      }
      for (int64_t e = 0; e < E; e++) cv[e] = s[e] + bv[e];
      for (int64_t g = 0; g < groupCount; g++) {
        float m1 = -INFINITY, m2 = -INFINITY;
        for (int64_t e = g * per; e < (g + 1) * per; e++) {
          if (cv[e] > m1) { m2 = m1; m1 = cv[e]; } else if (cv[e] > m2) m2 = cv[e];
        }
        gs[g] = groupSelectMode == 0 ? m1 : m1 + m2;
      }
      std::iota(gord.begin(), gord.end(), 0);
      std::stable_sort(gord.begin(), gord.end(), [&](int64_t a, int64_t b2) { return gs[a] > gs[b2]; });
      std::vector<bool> keep((size_t)groupCount, false);
      for (int64_t g = 0; g < kGroup; g++) keep[gord[g]] = true;
      ord.clear();
      for (int64_t e = 0; e < E; e++) if (keep[e / per]) ord.push_back(e);
      std::stable_sort(ord.begin(), ord.end(), [&](int64_t a, int64_t b2) { return cv[a] > cv[b2]; });
      float sum = 0;
      for (int64_t j = 0; j < k; j++) sum += s[ord[j]];
      for (int64_t j = 0; j < k; j++) {
        io[t * k + j] = ord[j];
        yo[t * k + j] = (float)(s[ord[j]] / (sum + eps) * rsf);
      }
      std::memcpy(&so[t * E], s.data(), E * 4);
    }
    writeF(Y, yo.data());
    writeI(I, io.data());
    if (ho) writeF(O, so.data());
    return 0;
  }, ws, ex);
}
SI_RUN(aclnnMoeGatingTopK)

// ------------------------------------------------------------------ aclnnFusedInferAttentionScoreV3
// Implemented: inputLayout "BSND" / "BNSD" / "BSH"; query [B, S, N, D] (BSND); key = value = list of one
// tensor: paged ([numBlocks, blockSize, N_kv*D] with blockTable [B, maxBlocks] INT32 and blockSize) or not
// ([B, S_kv, N_kv, D] in the query's layout); optional queryRope/keyRope (MLA: D 512, rope 64, N_kv 1,
// paged); actualSeqLengthsKv (B lengths); numKeyValueHeads 0 = N. Masks: sparseMode 0 without attenMask (no
// mask: every query row sees its sequence's first len keys; preTokens/nextTokens ignored, as documented);
// sparseMode 2 (leftUpCausal: row s sees keys j <= s) and 3 (rightDownCausal: j <= s + len - S) with the
// documented compressed 2048x2048 mask (1 = masked above the diagonal), whose contents are checked.
// p = softmax(scaleValue * (q.k + qr.kr)) in fp32; for BF16/FP16 p is rounded to the query dtype before the
// p.V product (the cube unit takes 16-bit operands), the sum of p stays fp32; out rounded once.
SI_EXPORT int aclnnFusedInferAttentionScoreV3GetWorkspaceSize(
    const void* qH, const void* kL, const void* vL, const void* pseH, const void* maskH, const void* aslH, const void* aslKvH, const void* dq1,
    const void* qs1, const void* dq2, const void* qs2, const void* qo2, const void* aqs, const void* aqo, const void* btH, const void* qpad,
    const void* kvpad, const void* kaqs, const void* kaqo, const void* vaqs, const void* vaqo, const void* ksp, const void* vsp, const void* asplH,
    const void* qrH, const void* krH, const void* kraqs, int64_t numHeads, double scaleValue, int64_t preTokens, int64_t nextTokens, char* inputLayout,
    int64_t numKvHeads, int64_t sparseMode, int64_t innerPrecise, int64_t blockSize, int64_t antiquantMode, bool softmaxLseFlag, int64_t keyAntiquantMode,
    int64_t valueAntiquantMode, const void* outH, const void* lseH, uint64_t* ws, void** ex) {
  OpCtx c("aclnnFusedInferAttentionScoreV3");
  T_ q = c.tensor(qH, "query");
  auto keys = c.list(kL, "key"), vals = c.list(vL, "value");
  T_ bt = c.tensor(btH, "blockTableOptional", true), qr = c.tensor(qrH, "queryRopeOptional", true), kr = c.tensor(krH, "keyRopeOptional", true);
  T_ out = c.tensor(outH, "attentionOut"), lse = c.tensor(lseH, "softmaxLse", true);
  bool hasKvLen = false, hasQLen = false;
  std::vector<int64_t> kvLen = c.ints(aslKvH, "actualSeqLengthsKvOptional", true, &hasKvLen);
  c.ints(aslH, "actualSeqLengthsOptional", true, &hasQLen);
  if (!c.ok()) return c.rc;
  const void* none[] = {pseH, nullptr, dq1, qs1, dq2, qs2, qo2, aqs, aqo, qpad, kvpad, kaqs, kaqo, vaqs, vaqo, ksp, vsp, asplH, kraqs};
  const char* noneN[] = {"pseShiftOptional", "attenMaskOptional", "deqScale1Optional", "quantScale1Optional", "deqScale2Optional", "quantScale2Optional",
                         "quantOffset2Optional", "antiquantScaleOptional", "antiquantOffsetOptional", "queryPaddingSizeOptional", "kvPaddingSizeOptional",
                         "keyAntiquantScaleOptional", "keyAntiquantOffsetOptional", "valueAntiquantScaleOptional", "valueAntiquantOffsetOptional",
                         "keySharedPrefixOptional", "valueSharedPrefixOptional", "actualSharedPrefixLenOptional", "keyRopeAntiquantScaleOptional"};
  for (int i = 0; i < 19; i++)
    c.check(!none[i], ACLNN_ERR_PARAM_INVALID, fmt("%s is not null: the stand-in implements FIA without masks, pse, quantization, padding or shared prefixes", noneN[i]));
  c.check(!hasQLen, ACLNN_ERR_PARAM_INVALID, "actualSeqLengthsOptional (query lengths) is not implemented by the stand-in");
  T_ mask = c.tensor(maskH, "attenMaskOptional", true);
  if (!c.ok()) return c.rc;
  c.check(sparseMode == 0 || sparseMode == 2 || sparseMode == 3, ACLNN_ERR_PARAM_INVALID,
          fmt("sparseMode %lld: the stand-in implements 0 (no mask), 2 (leftUpCausal) and 3 (rightDownCausal)", (long long)sparseMode));
  c.check(sparseMode != 0 || !mask, ACLNN_ERR_PARAM_INVALID, "attenMaskOptional with sparseMode 0 (a full or band mask) is not implemented by the stand-in");
  if (sparseMode == 2 || sparseMode == 3) {
    c.check((bool)mask, ACLNN_ERR_PARAM_NULLPTR, fmt("sparseMode %lld needs attenMaskOptional: the compressed 2048x2048 causal mask", (long long)sparseMode));
    if (c.ok()) {
      NEED_DT(c, mask, "attenMaskOptional", DT_BOOL, DT_INT8, DT_UINT8);
      NEED_DIMS(c, mask, "attenMaskOptional", (std::vector<int64_t>{2048, 2048}));
      c.check(mask->contiguous(), ACLNN_ERR_PARAM_INVALID, "attenMaskOptional must be contiguous");
    }
  }
  c.check(antiquantMode == 0 && keyAntiquantMode == 0 && valueAntiquantMode == 0, ACLNN_ERR_PARAM_INVALID, "antiquant modes must be 0 (no quantized KV in the stand-in)");
  c.check(innerPrecise >= 0 && innerPrecise <= 3, ACLNN_ERR_PARAM_INVALID, fmt("innerPrecise %lld is not in [0, 3]", (long long)innerPrecise));
  c.check(keys.size() == 1 && vals.size() == 1, ACLNN_ERR_PARAM_INVALID, fmt("key and value hold %zu and %zu tensors; the stand-in takes one each", keys.size(), vals.size()));
  c.check(inputLayout != nullptr, ACLNN_ERR_PARAM_NULLPTR, "inputLayout is null");
  if (!c.ok()) return c.rc;
  std::string layout = inputLayout;
  c.check(layout == "BSND" || layout == "BNSD" || layout == "BSH", ACLNN_ERR_PARAM_INVALID,
          fmt("inputLayout \"%s\": the stand-in implements BSND, BNSD and BSH", inputLayout));
  T_ k = keys[0], v = vals[0];
  NEED_DT(c, q, "query", DT_BF16, DT_FLOAT16);
  SAME_DT(c, q, "query", k, "key[0]");
  SAME_DT(c, q, "query", v, "value[0]");
  SAME_DT(c, q, "query", out, "attentionOut");
  c.check(numHeads > 0, ACLNN_ERR_PARAM_INVALID, "numHeads must be > 0");
  c.check((bool)qr == (bool)kr, ACLNN_ERR_PARAM_INVALID, "queryRopeOptional and keyRopeOptional come together");
  if (!c.ok()) return c.rc;
  // query as [B, S, N, D] through strides
  TensorDesc Q = *q;
  if (layout == "BSH") {
    NEED_RANK(c, q, "query", 3);
    if (!c.ok()) return c.rc;
    c.check(q->dims[2] % numHeads == 0, ACLNN_ERR_PARAM_INVALID, "H is not a multiple of numHeads");
    if (!c.ok()) return c.rc;
    int64_t D = q->dims[2] / numHeads;
    Q.dims = {q->dims[0], q->dims[1], numHeads, D};
    Q.strides = {q->strides[0], q->strides[1], q->strides[2] * D, q->strides[2]};
  } else {
    NEED_RANK(c, q, "query", 4);
    if (!c.ok()) return c.rc;
    if (layout == "BNSD") Q = swapped(*q, 1, 2);
  }
  int64_t B = Q.dims[0], S = Q.dims[1], N = Q.dims[2], D = Q.dims[3];
  int64_t Nkv = numKvHeads == 0 ? N : numKvHeads;
  c.check(N == numHeads, ACLNN_ERR_PARAM_INVALID, fmt("query has %lld heads but numHeads is %lld", (long long)N, (long long)numHeads));
  c.check(Nkv > 0 && N % Nkv == 0, ACLNN_ERR_PARAM_INVALID, fmt("numKeyValueHeads %lld does not divide numHeads %lld", (long long)Nkv, (long long)N));
  bool paged = (bool)bt;
  int64_t Dr = 0;
  if (qr) {
    c.check(D == 512 && Nkv == 1 && paged, ACLNN_ERR_PARAM_INVALID,
            fmt("queryRope (MLA) needs D 512, numKeyValueHeads 1 and a blockTable; got D %lld, numKeyValueHeads %lld, blockTable %s", (long long)D, (long long)Nkv, paged ? "given" : "null"));
    SAME_DT(c, q, "query", qr, "queryRopeOptional");
    SAME_DT(c, q, "query", kr, "keyRopeOptional");
  }
  if (!c.ok()) return c.rc;
  // key/value rows: K(b, j, h) at element offset koff(b, j, h); paged: [numBlocks, blockSize, Nkv*D]
  int64_t numBlocks = 0, maxBlocks = 0, Skv = 0;
  if (paged) {
    NEED_DT(c, bt, "blockTableOptional", DT_INT32);
    NEED_RANK(c, bt, "blockTableOptional", 2);
    NEED_RANK(c, k, "key[0]", 3);
    if (!c.ok()) return c.rc;
    numBlocks = k->dims[0];
    maxBlocks = bt->dims[1];
    c.check(bt->dims[0] == B, ACLNN_ERR_PARAM_INVALID, fmt("blockTable has %lld rows for batch %lld", (long long)bt->dims[0], (long long)B));
    c.check(blockSize > 0 && k->dims[1] == blockSize, ACLNN_ERR_PARAM_INVALID,
            fmt("blockSize %lld does not match key[0] %s (expected [numBlocks, blockSize, numKeyValueHeads*D])", (long long)blockSize, dimsStr(k->dims).c_str()));
    NEED_DIMS(c, k, "key[0]", (std::vector<int64_t>{numBlocks, blockSize, Nkv * D}));
    NEED_DIMS(c, v, "value[0]", (std::vector<int64_t>{numBlocks, blockSize, Nkv * D}));
    c.check(hasKvLen, ACLNN_ERR_PARAM_INVALID, "actualSeqLengthsKvOptional is required with a blockTable");
    if (qr && c.ok()) {
      Dr = qr->dims.back();
      c.check(Dr == 64, ACLNN_ERR_PARAM_INVALID, fmt("queryRope last dim is %lld; MLA needs 64", (long long)Dr));
      std::vector<int64_t> qrd = q->dims;
      qrd.back() = Dr;
      NEED_DIMS(c, qr, "queryRopeOptional", qrd);
      NEED_DIMS(c, kr, "keyRopeOptional", (std::vector<int64_t>{numBlocks, blockSize, Dr}));
    }
    Skv = maxBlocks * blockSize;
  } else {
    c.check(blockSize == 0 || blockSize > 0, ACLNN_ERR_PARAM_INVALID, "blockSize < 0");
    std::vector<int64_t> kd = layout == "BNSD" ? std::vector<int64_t>{B, Nkv, -1, D} : std::vector<int64_t>{B, -1, Nkv, D};
    NEED_RANK(c, k, "key[0]", layout == "BSH" ? 3 : 4);
    if (!c.ok()) return c.rc;
    Skv = k->dims[1 + (layout == "BNSD")];
    if (layout == "BSH") kd = {B, Skv, Nkv * D};
    else kd[1 + (layout == "BNSD")] = Skv;
    NEED_DIMS(c, k, "key[0]", kd);
    NEED_DIMS(c, v, "value[0]", kd);
  }
  if (!c.ok()) return c.rc;
  if (hasKvLen) {
    c.check((int64_t)kvLen.size() == B, ACLNN_ERR_PARAM_INVALID, fmt("actualSeqLengthsKv has %zu entries for batch %lld", kvLen.size(), (long long)B));
    for (size_t i = 0; c.ok() && i < kvLen.size(); i++)
      c.check(kvLen[i] >= 1 && kvLen[i] <= Skv, ACLNN_ERR_PARAM_INVALID,
              fmt("actualSeqLengthsKv[%zu] = %lld is not in [1, %lld]%s", i, (long long)kvLen[i], (long long)Skv, paged ? " (maxBlocks * blockSize)" : ""));
  }
  NEED_DIMS(c, out, "attentionOut", q->dims);
  if (softmaxLseFlag) {
    c.check((bool)lse, ACLNN_ERR_PARAM_NULLPTR, "softmaxLse is null but softmaxLseFlag is true");
    if (c.ok()) { NEED_DT(c, lse, "softmaxLse", DT_FLOAT); NEED_DIMS(c, lse, "softmaxLse", (std::vector<int64_t>{B, N, S, 1})); }
  }
  if (!c.ok()) return c.rc;
  TensorDesc O = *out;
  if (layout == "BSH") { O.dims = Q.dims; O.strides = {out->strides[0], out->strides[1], out->strides[2] * D, out->strides[2]}; }
  else if (layout == "BNSD") O = swapped(*out, 1, 2);
  TensorDesc K_ = *k, V_ = *v, BT = paged ? *bt : TensorDesc(), QR = qr ? *qr : TensorDesc(), KR = kr ? *kr : TensorDesc();
  if (qr && layout == "BNSD") QR = swapped(*qr, 1, 2);
  if (qr && layout == "BSH") { QR.dims = {B, S, N, Dr}; QR.strides = {qr->strides[0], qr->strides[1], qr->strides[2] * Dr, qr->strides[2]}; }
  TensorDesc L = softmaxLseFlag ? *lse : TensorDesc();
  bool hasMask = (bool)mask;
  TensorDesc MK = hasMask ? *mask : TensorDesc();
  bool hasRope = (bool)qr, lseOut = softmaxLseFlag;
  std::string lay = layout;
  std::vector<int64_t> lens = hasKvLen ? kvLen : std::vector<int64_t>((size_t)B, Skv);
  if (sparseMode == 3)
    for (int64_t b = 0; b < B; b++)
      if (!c.check(lens[b] >= S, ACLNN_ERR_PARAM_INVALID,
                   fmt("sparseMode 3 with %lld query rows over %lld keys (batch %lld): rows that see no key are not implemented by the stand-in", (long long)S, (long long)lens[b], (long long)b)))
        return c.rc;
  int dt = q->dtype;
  uint64_t wsBytes = (uint64_t)(B * N * S) * (uint64_t)Skv * 4 + 65536;  // fp32 scores
  return c.finish(wsBytes, [=](char*, std::string* err) {
    if (hasMask) {  // the compressed causal mask: 1 strictly above the diagonal, 0 on and below it
      const uint8_t* m = (const uint8_t*)MK.data + MK.offset;
      for (int64_t i = 0; i < 2048; i++)
        for (int64_t j = 0; j < 2048; j++)
          if ((m[i * 2048 + j] != 0) != (j > i)) {
            *err = fmt("aclnnFusedInferAttentionScoreV3: attenMask[%lld][%lld] = %d; sparseMode %lld needs the compressed causal mask (1 above the diagonal, 0 on and below it)",
                       (long long)i, (long long)j, (int)m[i * 2048 + j], (long long)sparseMode);
            return ACL_ERROR_RT_AICORE_EXCEPTION;
          }
    }
    std::vector<int64_t> table = paged ? readI(BT) : std::vector<int64_t>();
    std::vector<float> qv = readF(Q), qrv = hasRope ? readF(QR) : std::vector<float>();
    std::vector<float> res((size_t)(B * S * N * D)), lsev((size_t)(B * N * S));
    int64_t grp = N / Nkv;
    std::vector<float> krow((size_t)D), vrow((size_t)D), rrow((size_t)std::max<int64_t>(Dr, 1)), sc, acc((size_t)D);
    // element offset of key row (b, j, kv head h) in K_/V_ (same shapes); rope row in KR
    auto kvOff = [&](const TensorDesc& T, int64_t b, int64_t j, int64_t h, int64_t dim, int64_t* off) -> bool {
      if (paged) {
        int64_t blk = table[b * maxBlocks + j / blockSize];
        if (blk < 0 || blk >= numBlocks) {
          *err = fmt("aclnnFusedInferAttentionScoreV3: blockTable[%lld][%lld] = %lld is outside [0, %lld)", (long long)b, (long long)(j / blockSize), (long long)blk, (long long)numBlocks);
          return false;
        }
        *off = T.offset + blk * T.strides[0] + (j % blockSize) * T.strides[1] + h * dim * T.strides[2];
      } else if (lay == "BNSD") {
        *off = T.offset + b * T.strides[0] + h * T.strides[1] + j * T.strides[2];
      } else if (lay == "BSH") {
        *off = T.offset + b * T.strides[0] + j * T.strides[1] + h * dim * T.strides[2];
      } else {
        *off = T.offset + b * T.strides[0] + j * T.strides[1] + h * T.strides[2];
      }
      return true;
    };
    int64_t lastStride = K_.strides.back(), vStride = V_.strides.back();
    for (int64_t b = 0; b < B; b++) {
      int64_t len = lens[b];
      sc.assign((size_t)len, 0.f);
      for (int64_t s = 0; s < S; s++)
        for (int64_t n = 0; n < N; n++) {
          int64_t h = n / grp;
          const float* qp = &qv[((b * S + s) * N + n) * D];
          const float* qrp = hasRope ? &qrv[((b * S + s) * N + n) * Dr] : nullptr;
          int64_t vis = sparseMode == 2 ? std::min(len, s + 1) : sparseMode == 3 ? s + 1 + (len - S) : len;  // keys this row sees
          float m = -INFINITY;
          for (int64_t j = 0; j < vis; j++) {
            int64_t off;
            if (!kvOff(K_, b, j, h, D, &off)) return ACL_ERROR_RT_AICORE_EXCEPTION;
            readRow(K_, off, lastStride, D, krow.data());
            float dot = 0;
            for (int64_t d = 0; d < D; d++) dot += qp[d] * krow[d];
            if (hasRope) {
              int64_t ro;
              if (!kvOff(KR, b, j, 0, Dr, &ro)) return ACL_ERROR_RT_AICORE_EXCEPTION;
              readRow(KR, ro, KR.strides.back(), Dr, rrow.data());
              for (int64_t d = 0; d < Dr; d++) dot += qrp[d] * rrow[d];
            }
            sc[j] = dot * (float)scaleValue;
            m = std::max(m, sc[j]);
          }
          float sum = 0;
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int64_t j = 0; j < vis; j++) {
            float p = std::exp(sc[j] - m);
            sum += p;
            float pr = roundTo(dt, p);
            int64_t off;
            if (!kvOff(V_, b, j, h, D, &off)) return ACL_ERROR_RT_AICORE_EXCEPTION;
            readRow(V_, off, vStride, D, vrow.data());
            for (int64_t d = 0; d < D; d++) acc[d] += pr * vrow[d];
          }
          float* op = &res[((b * S + s) * N + n) * D];
          for (int64_t d = 0; d < D; d++) op[d] = acc[d] / sum;
          lsev[(b * N + n) * S + s] = m + std::log(sum);
        }
    }
    writeF(O, res.data());
    if (lseOut) writeF(L, lsev.data());
    return 0;
  }, ws, ex);
}
SI_RUN(aclnnFusedInferAttentionScoreV3)
