// The CANN stand-in's own tests: standin/test/driver.cpp loads the four libraries with dlopen/dlsym
// through the backend's cann_api.h (as the backend does), runs each misuse path and each operator, and
// prints what came back. The references here are float64 (plus, where the stand-in's arithmetic is
// specified exactly - fp32 accumulation in k order, one bf16 round-to-nearest-even on write - an exact
// emulation of it with Math.fround), written independently of the stand-in's C++.
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import { existsSync, readFileSync, statSync, readdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { beforeAll, describe, expect, it } from "vitest";

const here = dirname(fileURLToPath(import.meta.url));
const build = join(here, "build");
const driver = join(build, "driver");

type Arr = { dims: number[]; data: number[] };
type Row = { case: string; rc?: number; msg?: string | null; arrays?: Record<string, Arr>; [k: string]: unknown };
const rows = new Map<string, Row>();
const get = (name: string): Row => {
  const r = rows.get(name);
  if (!r) throw new Error(`driver printed no case ${name}`);
  return r;
};
const arr = (r: Row, k: string): number[] => {
  const a = r.arrays?.[k];
  if (!a) throw new Error(`case ${r.case} has no array ${k}`);
  return a.data;
};

// ---- independent numerics
const f32 = Math.fround;
const bf16 = (x: number): number => {
  // round a float32 value to bfloat16, nearest even
  const b = new DataView(new ArrayBuffer(4));
  b.setFloat32(0, x);
  const u = b.getUint32(0);
  if ((u & 0x7f800000) === 0x7f800000) return x;
  const lsb = (u >>> 16) & 1;
  const r = (u + 0x7fff + lsb) >>> 16;
  b.setUint32(0, (r << 16) >>> 0);
  return b.getFloat32(0);
};
const sigmoid = (x: number) => 1 / (1 + Math.exp(-x));

function newer(out: string, dirs: string[]): boolean {
  if (!existsSync(out)) return false;
  const t = statSync(out).mtimeMs;
  for (const d of dirs) for (const f of readdirSync(d)) if (statSync(join(d, f)).mtimeMs > t) return false;
  return true;
}

const run = promisify(execFile);

beforeAll(async () => {
  // asynchronous, so the worker keeps answering vitest while g++ runs
  await run("bash", [join(here, "build.sh")], { maxBuffer: 1 << 24 });
  if (!newer(driver, [join(here, "test"), join(here, "..", "src", "native")]))
    await run("g++", ["-std=c++17", "-O1", "-ffp-contract=off", "-o", driver, join(here, "test", "driver.cpp"), "-ldl", "-pthread"], { maxBuffer: 1 << 24 });
  const { stdout: out } = await run(driver, [build, "all"], {
    env: { ...process.env, DS3_STANDIN_HCCL_TIMEOUT_MS: "800", DS3_STANDIN_NPUS: "2", DS3_STANDIN_STREAM: "queue" },
    encoding: "utf8",
    timeout: 120_000,
    maxBuffer: 1 << 26,
  });
  for (const line of out.trim().split("\n")) {
    const r = JSON.parse(line) as Row;
    rows.set(r.case, r);
  }
}, 300_000);

describe("libraries", () => {
  // the functions of cann_api.h by library, and what each built library exports
  const header = readFileSync(join(here, "..", "src", "native", "cann_api.h"), "utf8");
  const want = new Map<string, string[]>();
  for (const m of header.matchAll(/X\((ASCENDCL|NNOPBASE|OPAPI|HCCL),\s*[01],\s*[^,]+,\s*(\w+),/g))
    want.set(m[1]!, [...(want.get(m[1]!) ?? []), m[2]!]);
  const exported = async (file: string) =>
    new Set((await run("nm", ["-D", "--defined-only", file])).stdout.split("\n").filter((l) => / T /.test(l)).map((l) => l.split(" ").pop()!));

  it("each library exports its group of cann_api.h and no other group's functions", async () => {
    expect([...want.keys()].sort()).toEqual(["ASCENDCL", "HCCL", "NNOPBASE", "OPAPI"]);
    for (const [lib, names] of want) {
      const syms = await exported(join(build, `lib${lib.toLowerCase()}.so`));
      for (const n of names) expect(syms.has(n), `${n} in lib${lib.toLowerCase()}.so`).toBe(true);
      for (const [other, otherNames] of want) if (other !== lib) for (const n of otherNames) expect(syms.has(n), `${n} not in lib${lib.toLowerCase()}.so`).toBe(false);
    }
  });
  it("too-old/ is the same but for a libopapi.so without aclnnMoeFinalizeRoutingV2", async () => {
    const syms = await exported(join(build, "too-old", "libopapi.so"));
    expect(syms.has("aclnnMoeFinalizeRoutingV2")).toBe(false);
    expect(syms.has("aclnnMoeFinalizeRoutingV2GetWorkspaceSize")).toBe(false);
    for (const n of want.get("OPAPI")!) if (!n.startsWith("aclnnMoeFinalizeRoutingV2")) expect(syms.has(n), n).toBe(true);
    const r = await run(driver, [join(build, "too-old"), "misuse"]).then(() => ({ code: 0, stderr: "" }), (e: { code: number; stderr: string }) => e);
    expect(r.code).toBe(2);  // the driver's dlopen/dlsym of every function: the four libraries load, the operator is missing
    expect(r.stderr).toMatch(/missing aclnnMoeFinalizeRoutingV2GetWorkspaceSize in libOPAPI/);
  });
});

describe("runtime", () => {
  it("reports the stand-in devices", () => {
    const d = get("device");
    expect(d.count).toBe(2);
    expect(d.soc).toBe("Ascend910B3-standin");
    expect(d.total as number).toBeGreaterThan(0);
    expect(d.free as number).toBeLessThanOrEqual(d.total as number);
    expect((d.free as number) - (d.freeAfterMiB as number)).toBe(1 << 20);  // aclrtMalloc of 1 MiB shows in aclrtGetMemInfo
  });

  const cases: [string, number, RegExp][] = [
    ["init_twice", 100002, /already initialized/],
    ["set_device_out_of_range", 107001, /device 99 does not exist/],
    ["malloc_without_device", 107002, /no current device/],
    ["memcpy_count_over_destmax", 100000, /count 64 exceeds destMax 32/],
    ["memcpy_foreign_dst", 100000, /dst: .* is not device memory from aclrtMalloc/],
    ["memcpy_past_end", 100000, /run past the end of device allocation/],
    ["memcpy_wrong_kind", 100000, /HOST_TO_DEVICE\): dst: .* is not device memory/],
    ["memcpy_freed", 100000, /that aclrtFree already released/],
    ["double_free", 100000, /already freed \(double free/],
    ["free_interior", 100000, /points inside allocation .* not at its start/],
    ["workspace_freed_while_queued", 507015, /aclnnMatmul: device memory .* was freed while the task was still queued/],
    ["memcpy_races_queued_task", 500001, /used by aclnnMatmul .*synchronize that stream/],
    ["destroy_stream_with_queued_tasks", 107000, /1 task\(s\) were still queued/],
  ];
  for (const [name, code, re] of cases)
    it(`${name} -> ${code}`, () => {
      const r = get(name);
      expect(r.rc).toBe(code);
      expect(r.msg).toMatch(re);
    });

  it("aclGetRecentErrMsg reads and clears (null when nothing failed since)", () => {
    expect(get("errmsg_cleared").msg).toBeNull();
  });
  it("a stream that reported a failure works again after it", () => {
    expect(get("sync_after_race").rc).toBe(0);
  });
});

describe("tensors and executors", () => {
  const nullCases: [string, RegExp][] = [
    ["tensor_on_freed", /aclCreateTensor: storage \[16\] of FLOAT .* aclrtFree already released/],
    ["view_outside_storage", /view FLOAT\[4,4\] strides \[4,1\] offset 4 reaches element 19 but the storage \[16\] holds 16/],
    ["storage_outside_allocation", /4000 bytes .* run past the end of device allocation/],
    ["negative_stride", /negative strides are not supported/],
  ];
  for (const [name, re] of nullCases)
    it(`${name}: aclCreateTensor returns null`, () => {
      const r = get(name);
      expect(r.null).toBe(1);
      expect(r.msg).toMatch(re);
    });

  it("matmul asks for a deterministic non-zero workspace", () => {
    const r = get("matmul_workspace_size");
    expect(r.rc).toBe(0);
    expect(r.ws).toBe(4 * 4 * 6 + 16384);
  });
  const cases: [string, number, RegExp][] = [
    ["workspace_too_small", 161002, /workspaceSize 16479 is smaller than the 16480 bytes aclnnMatmulGetWorkspaceSize asked for/],
    ["workspace_null", 161001, /workspace is null but 16480 bytes are needed/],
    ["executor_wrong_op", 161002, /was made by aclnnMatmulGetWorkspaceSize, not aclnnRmsNormGetWorkspaceSize/],
    ["executor_twice", 161002, /already executed or destroyed/],
    ["matmul_inner_mismatch", 161002, /inner dims differ: self \[4,8\], mat2 \[6,8\]/],
    ["add_dtype_mismatch", 161002, /dtype mismatch: self is BF16 but other is FLOAT/],
    ["null_required_tensor", 161001, /other is a null aclTensor/],
    ["matmul_out_shape", 161002, /out has shape \[5,6\]; expected \[4,6\]/],
    ["destroyed_tensor_used", 161002, /other: aclTensor .* was already destroyed/],
    ["destroy_tensor_twice", 161002, /was already destroyed/],
    ["destroy_listed_tensor_first", 161002, /belongs to an aclTensorList; aclDestroyTensorList destroys it/],
    ["destroy_tensor_after_list", 161002, /was already destroyed/],
    ["embedding_index_out_of_range", 507015, /aclnnEmbedding: indices\[1\] = 12 is outside \[0, 10\)/],
    ["init_routing_int64_counts", 161002, /expertTokensCountOrCumsumOut has dtype INT64; the operator defines it as INT32 only/],
    ["gmm_group_list_not_cumsum", 507015, /groupList \(cumsum\) entry 1 = 2/],
    ["index_copy_duplicate_index", 507015, /index holds 1 twice/],
    ["fia_len_past_block_table", 161002, /actualSeqLengthsKv\[1\] = 9 is not in \[1, 8\]/],
    ["fia_sparse_mode_unsupported", 161002, /sparseMode 4: the stand-in implements 0 \(no mask\), 2 \(leftUpCausal\) and 3 \(rightDownCausal\)/],
    ["fia_mask_missing", 161001, /sparseMode 3 needs attenMaskOptional: the compressed 2048x2048 causal mask/],
    ["fia_mask_inverted", 507015, /attenMask\[0\]\[0\] = 1; sparseMode 3 needs the compressed causal mask/],
    ["gating_renorm_unsupported", 161002, /renorm 1: only 0/],
  ];
  for (const [name, code, re] of cases)
    it(`${name} -> ${code}`, () => {
      const r = get(name);
      expect(r.rc).toBe(code);
      expect(r.msg).toMatch(re);
    });
  it("the first run of an executor succeeds", () => {
    expect(get("executor_first_run")).toMatchObject({ rc: 0, sync: 0 });
    expect(get("destroy_list").rc).toBe(0);
  });
  it("leaves no executor pending", () => {
    const s = JSON.parse(get("stats").json as string);
    expect(s.executorsPending).toBe(0);
    expect(s.initCalls).toBe(2);
  });
});

// ---- operators vs float64
// |got - ref| <= bf16 half-ulp of ref + fp32 accumulation slack
const bfTol = (ref: number, mag: number, terms: number) => Math.abs(ref) * 2 ** -8 + terms * 2 ** -23 * mag + 1e-30;

function matmulCheck(name: string, a: number[], w: (m: number, k: number, n: number) => number, B: number, M: number, K: number, N: number,
                     aAt: (b: number, m: number, k: number) => number, dtBf16: boolean) {
  const r = get(name);
  expect(r.rc).toBe(0);
  const out = arr(r, "out");
  let maxErr = 0;
  for (let b = 0; b < B; b++)
    for (let m = 0; m < M; m++)
      for (let n = 0; n < N; n++) {
        let ref = 0, mag = 0, acc = 0;
        for (let k = 0; k < K; k++) {
          const p = aAt(b, m, k) * w(b, k, n);
          ref += p;
          mag += Math.abs(p);
          acc = f32(acc + f32(aAt(b, m, k) * w(b, k, n)));
        }
        const got = out[(b * M + m) * N + n]!;
        const exact = dtBf16 ? bf16(acc) : acc;
        expect(got).toBe(exact);  // fp32 accumulation in k order, rounded once
        expect(Math.abs(got - ref)).toBeLessThanOrEqual(dtBf16 ? bfTol(ref, mag, K) : K * 2 ** -23 * mag + 1e-30);
        maxErr = Math.max(maxErr, Math.abs(got - ref));
      }
  return maxErr;
}

describe("operators vs float64", () => {
  it("aclnnMatmul [T,K] x transposed weight view, BF16", () => {
    const r = get("op_matmul_bf16_wt");
    const a = arr(r, "a"), w = arr(r, "w_nk");
    matmulCheck("op_matmul_bf16_wt", a, (_b, k, n) => w[n * 48 + k]!, 1, 5, 48, 24, (_b, m, k) => a[m * 48 + k]!, true);
  });
  it("aclnnMatmul [H,M,K] head-major view x [K,N] (broadcast), FLOAT", () => {
    const r = get("op_matmul_f32_bcast");
    const a = arr(r, "a_mhk"), w = arr(r, "w");
    matmulCheck("op_matmul_f32_bcast", a, (_b, k, n) => w[k * 5 + n]!, 3, 4, 8, 5, (h, m, k) => a[(m * 3 + h) * 8 + k]!, false);
  });
  it("aclnnBatchMatMul with strided views on both sides, BF16", () => {
    const r = get("op_bmm_bf16_strided");
    const a = arr(r, "a_mbk"), w = arr(r, "w_bnk");
    matmulCheck("op_bmm_bf16_strided", a, (b, k, n) => w[(b * 4 + n) * 16 + k]!, 2, 3, 16, 4, (b, m, k) => a[(m * 2 + b) * 16 + k]!, true);
  });

  it("aclnnRmsNorm on a strided view, BF16 with FLOAT rstd", () => {
    const r = get("op_rmsnorm_bf16_strided");
    expect(r.rc).toBe(0);
    const x = arr(r, "x"), g = arr(r, "g"), y = arr(r, "y"), rstd = arr(r, "rstd");
    const ld = r.ld as number, off = r.offset as number, eps = r.eps as number, D = 32;
    for (let t = 0; t < 4; t++) {
      let ss = 0;
      for (let i = 0; i < D; i++) ss += x[off + t * ld + i]! ** 2;
      const rs = 1 / Math.sqrt(ss / D + eps);
      expect(Math.abs(rstd[t]! - rs)).toBeLessThanOrEqual(rs * 1e-6);
      for (let i = 0; i < D; i++) {
        const ref = x[off + t * ld + i]! * rs * g[i]!;
        expect(Math.abs(y[t * D + i]! - ref)).toBeLessThanOrEqual(bfTol(ref, Math.abs(ref), 40));
      }
    }
  });

  // softmax(scale * (q.k + qr.kr)) V over the sequence's cache rows
  function attention(q: (d: number) => number, keys: ((d: number) => number)[], D: number, rope: [(d: number) => number, ((d: number) => number)[], number] | null,
                     scale: number, vals: ((d: number) => number)[]) {
    const s = keys.map((kf, j) => {
      let dot = 0;
      for (let d = 0; d < D; d++) dot += q(d) * kf(d);
      if (rope) for (let d = 0; d < rope[2]; d++) dot += rope[0](d) * rope[1][j]!(d);
      return scale * dot;
    });
    const m = Math.max(...s);
    const p = s.map((v) => Math.exp(v - m));
    const sum = p.reduce((a, b) => a + b, 0);
    const out = new Array<number>(D).fill(0), mag = new Array<number>(D).fill(0);
    p.forEach((pj, j) => { for (let d = 0; d < D; d++) { out[d] += (pj / sum) * vals[j]!(d); mag[d] += (pj / sum) * Math.abs(vals[j]!(d)); } });
    return { out, mag };
  }

  it("aclnnFusedInferAttentionScoreV3: MLA decode over a paged latent cache (512 + 64, BF16)", () => {
    const r = get("op_fia_mla_decode");
    expect(r.rc).toBe(0);
    const B = 3, H = 2, D = 512, Dr = 64, bs = r.bs as number, maxB = 2;
    const lens = arr(r, "lens"), table = arr(r, "table"), q = arr(r, "q"), qr = arr(r, "qr"), kc = arr(r, "kc"), kr = arr(r, "kr"), out = arr(r, "out");
    let worst = 0;
    for (let b = 0; b < B; b++)
      for (let h = 0; h < H; h++) {
        const rowOf = (j: number) => table[b * maxB + Math.floor(j / bs)]! * bs + (j % bs);
        const keys = Array.from({ length: lens[b]! }, (_, j) => (d: number) => kc[rowOf(j) * D + d]!);
        const ropes = Array.from({ length: lens[b]! }, (_, j) => (d: number) => kr[rowOf(j) * Dr + d]!);
        const { out: ref, mag } = attention((d) => q[(b * H + h) * D + d]!, keys, D, [(d) => qr[(b * H + h) * Dr + d]!, ropes, Dr], r.scale as number, keys);
        for (let d = 0; d < D; d++) {
          const err = Math.abs(out[(b * H + h) * D + d]! - ref[d]!);
          // bf16 output rounding + p rounded to bf16 before the p.V product
          expect(err).toBeLessThanOrEqual(2 ** -8 * Math.abs(ref[d]!) + 2 ** -8 * mag[d]! + 1e-6);
          worst = Math.max(worst, err);
        }
      }
    expect(worst).toBeGreaterThan(0);  // the output really is bf16, not a copy of the reference
  });

  it("aclnnFusedInferAttentionScoreV3: causal prefill, sparseMode 3 (right-down) and 2 (left-up) with the 2048x2048 mask", () => {
    const r = get("op_fia_causal");
    expect(r.rc3).toBe(0);
    expect(r.rc2).toBe(0);
    const B = 2, S = 3, N = 2, Skv = 5, D = 16;
    const lens = arr(r, "lens"), q = arr(r, "q"), k = arr(r, "k"), v = arr(r, "v");
    for (const [mode, out] of [[3, arr(r, "out3")], [2, arr(r, "out2")]] as const)
      for (let b = 0; b < B; b++)
        for (let s = 0; s < S; s++)
          for (let n = 0; n < N; n++) {
            const vis = mode === 3 ? s + 1 + lens[b]! - S : Math.min(lens[b]!, s + 1);
            const at = (t: number[], j: number) => (d: number) => t[(b * Skv + j) * D + d]!;
            const keys = Array.from({ length: vis }, (_, j) => at(k, j)), vals = Array.from({ length: vis }, (_, j) => at(v, j));
            const { out: ref, mag } = attention((d) => q[((b * S + s) * N + n) * D + d]!, keys, D, null, r.scale as number, vals);
            for (let d = 0; d < D; d++)
              expect(Math.abs(out[((b * S + s) * N + n) * D + d]! - ref[d]!)).toBeLessThanOrEqual(2 ** -8 * Math.abs(ref[d]!) + 2 ** -8 * mag[d]! + 1e-6);
          }
    expect(arr(r, "out3")).not.toEqual(arr(r, "out2"));  // the two alignments differ when len > S
  });

  it("aclnnFusedInferAttentionScoreV3: BNSD, GQA 4 heads over 2, 2 query rows, per-batch KV lengths", () => {
    const r = get("op_fia_bnsd_gqa");
    expect(r.rc).toBe(0);
    const B = 2, N = 4, Nkv = 2, S = 2, Skv = 5, D = 16;
    const lens = arr(r, "lens"), q = arr(r, "q"), k = arr(r, "k"), v = arr(r, "v"), out = arr(r, "out");
    for (let b = 0; b < B; b++)
      for (let n = 0; n < N; n++)
        for (let s = 0; s < S; s++) {
          const h = Math.floor(n / (N / Nkv));
          const at = (t: number[], j: number) => (d: number) => t[((b * Nkv + h) * Skv + j) * D + d]!;
          const keys = Array.from({ length: lens[b]! }, (_, j) => at(k, j)), vals = Array.from({ length: lens[b]! }, (_, j) => at(v, j));
          const { out: ref, mag } = attention((d) => q[((b * N + n) * S + s) * D + d]!, keys, D, null, r.scale as number, vals);
          for (let d = 0; d < D; d++)
            expect(Math.abs(out[((b * N + n) * S + s) * D + d]! - ref[d]!)).toBeLessThanOrEqual(2 ** -8 * Math.abs(ref[d]!) + 2 ** -8 * mag[d]! + 1e-6);
        }
  });

  it("aclnnMoeGatingTopK: 256 experts, 8 groups, top-4 groups by top-2 sums, top-8, unbiased weights", () => {
    const r = get("op_gating_topk");
    expect(r.rc).toBe(0);
    const T = 3, E = 256, k = 8, G = 8, per = E / G;
    const x = arr(r, "x"), bias = arr(r, "bias"), y = arr(r, "y"), idx = arr(r, "idx"), norm = arr(r, "norm");
    for (let t = 0; t < T; t++) {
      const s = Array.from({ length: E }, (_, e) => sigmoid(x[t * E + e]!));
      const c = s.map((v, e) => v + bias[e]!);
      const gscore = Array.from({ length: G }, (_, g) => {
        const v = c.slice(g * per, (g + 1) * per).sort((a, b) => b - a);
        return v[0]! + v[1]!;
      });
      const groups = gscore.map((v, g) => [v, g] as const).sort((a, b) => b[0] - a[0] || a[1] - b[1]).slice(0, 4).map((p) => p[1]);
      const cand = c.map((v, e) => [v, e] as const).filter(([, e]) => groups.includes(Math.floor(e / per)));
      const top = cand.sort((a, b) => b[0] - a[0] || a[1] - b[1]).slice(0, k).map((p) => p[1]);
      const sum = top.reduce((a, e) => a + s[e]!, 0);
      for (let j = 0; j < k; j++) {
        expect(idx[t * k + j]).toBe(top[j]);
        const ref = (s[top[j]!]! / (sum + 1e-20)) * (r.rsf as number);
        expect(Math.abs(y[t * k + j]! - ref)).toBeLessThanOrEqual(ref * 1e-5);
      }
      for (let e = 0; e < E; e++) expect(Math.abs(norm[t * E + e]! - s[e]!)).toBeLessThanOrEqual(1e-6);
    }
  });

  it("aclnnMoeInitRoutingV2: stable sort by expert, expandedRowIdx is the inverse permutation, INT32 cumsum", () => {
    const r = get("op_init_routing");
    expect(r.rc).toBe(0);
    const k = r.k as number, x = arr(r, "x"), ei = arr(r, "expertIdx"), ex = arr(r, "expandedX"), ri = arr(r, "rowIdx"), cum = arr(r, "cumsum");
    const D = 8, n = ei.length;
    const sorted = Array.from({ length: n }, (_, i) => i).sort((a, b) => ei[a]! - ei[b]! || a - b);
    for (let i = 0; i < n; i++) {
      expect(ri[sorted[i]!]).toBe(i);
      for (let d = 0; d < D; d++) expect(ex[i * D + d]).toBe(x[Math.floor(sorted[i]! / k) * D + d]);
    }
    let acc = 0;
    for (let e = 0; e < cum.length; e++) {
      acc += ei.filter((v) => v === e).length;
      expect(cum[e]).toBe(acc);
    }
  });

  it("aclnnMoeInitRoutingV2 with expertTokensCountOrCumsumFlag 2 gives per-expert counts (activeNum 0 = dropless)", () => {
    const c = get("op_init_routing_counts"), r = get("op_init_routing");
    expect(c.rc).toBe(0);
    const ei = arr(r, "expertIdx"), counts = arr(c, "counts");
    for (let e = 0; e < counts.length; e++) expect(counts[e]).toBe(ei.filter((v) => v === e).length);
    expect(arr(c, "rowIdx")).toEqual(arr(r, "rowIdx"));
  });

  it("aclnnGroupedMatmulV4: rows split by the cumsum group list, transposed weight view, rows past the last group untouched", () => {
    const r = get("op_grouped_matmul");
    expect(r.rc).toBe(0);
    const x = arr(r, "x"), w = arr(r, "w_end"), gl = arr(r, "groupList"), out = arr(r, "out");
    const M = 18, K = 8, N = 5;
    let start = 0;
    for (let g = 0; g < gl.length; g++) {
      for (let m = start; m < gl[g]!; m++)
        for (let n = 0; n < N; n++) {
          let ref = 0, acc = 0, mag = 0;
          for (let kk = 0; kk < K; kk++) {
            ref += x[m * K + kk]! * w[(g * N + n) * K + kk]!;
            mag += Math.abs(x[m * K + kk]! * w[(g * N + n) * K + kk]!);
            acc = f32(acc + f32(x[m * K + kk]! * w[(g * N + n) * K + kk]!));
          }
          expect(out[m * N + n]).toBe(bf16(acc));
          expect(Math.abs(out[m * N + n]! - ref)).toBeLessThanOrEqual(bfTol(ref, mag, K));
        }
      start = gl[g]!;
    }
    expect(start).toBeLessThan(M);  // the sentinel expert's rows exist ...
    for (let m = start; m < M; m++) for (let n = 0; n < N; n++) expect(out[m * N + n]).toBe(7);  // ... and were not written
    expect(arr(get("op_grouped_matmul_counts"), "out")).toEqual(out);  // groupListType 1 (counts) gives the same
  });

  it("aclnnMoeFinalizeRoutingV2: dropPadMode 2 reads expandedRowIdx in row order (t*K + k)", () => {
    const r = get("op_finalize_row");
    expect(r.rc).toBe(0);
    const y = arr(r, "y"), ri = arr(r, "rowIdx"), sc = arr(r, "scales"), out = arr(r, "out");
    const T = 6, K = 3, N = 5;
    for (let t = 0; t < T; t++)
      for (let n = 0; n < N; n++) {
        let ref = 0, mag = 0;
        for (let j = 0; j < K; j++) { ref += sc[t * K + j]! * y[ri[t * K + j]! * N + n]!; mag += Math.abs(sc[t * K + j]! * y[ri[t * K + j]! * N + n]!); }
        expect(Math.abs(out[t * N + n]! - ref)).toBeLessThanOrEqual(bfTol(ref, mag, 2 * K));
      }
  });

  it("aclnnMoeFinalizeRoutingV2: dropPadMode 0 reads it in column order (t + k*NUM_ROWS), with x1 and bias", () => {
    const r = get("op_finalize_col");
    expect(r.rc).toBe(0);
    const y = arr(r, "y"), ri = arr(r, "rowIdx"), sc = arr(r, "scales"), x1 = arr(r, "x1"), bias = arr(r, "bias"), ei = arr(r, "expertIdx"), out = arr(r, "out");
    const T = 6, K = 3, N = 5;
    for (let t = 0; t < T; t++)
      for (let n = 0; n < N; n++) {
        let ref = x1[t * N + n]!, mag = Math.abs(ref);
        for (let j = 0; j < K; j++) {
          const term = sc[t * K + j]! * (y[ri[t + j * T]! * N + n]! + bias[ei[t * K + j]! * N + n]!);
          ref += term;
          mag += Math.abs(term);
        }
        expect(Math.abs(out[t * N + n]! - ref)).toBeLessThanOrEqual(bfTol(ref, mag, 3 * K));
      }
  });

  it("aclnnAdd broadcasts [3,1] with alpha -1 and rounds once to BF16", () => {
    const r = get("op_add_bcast");
    const a = arr(r, "a"), b = arr(r, "b"), out = arr(r, "out");
    for (let i = 0; i < 12; i++) expect(out[i]).toBe(bf16(f32(a[i]! + f32(-1 * b[Math.floor(i / 4)]!))));
  });
  it("aclnnCast FLOAT -> BF16 rounds to nearest even", () => {
    const r = get("op_cast_bf16");
    const inp = arr(r, "in"), out = arr(r, "out");
    expect(out.slice(0, 6)).toEqual([1, 1.015625, 1.0078125, -1, 3.140625, 65536]);
    for (let i = 0; i < inp.length; i++) expect(out[i]).toBe(bf16(inp[i]!));
  });
  it("aclnnSoftmax with -inf entries", () => {
    const out = arr(get("op_softmax"), "out");
    const rowsIn = [[0.5, -Infinity, 2, 1, -1], [3, 3, -Infinity, -Infinity, 0]];
    rowsIn.forEach((row, i) => {
      const m = Math.max(...row), e = row.map((v) => Math.exp(v - m)), s = e.reduce((a, b) => a + b, 0);
      e.forEach((v, j) => expect(Math.abs(out[i * 5 + j]! - v / s)).toBeLessThanOrEqual(1e-6));
    });
  });
  it("aclnnTopk: descending, ties to the lower index, INT64 indices", () => {
    const r = get("op_topk_ties");
    expect(arr(r, "values")).toEqual([5, 5, 5, 0, 0, -1]);
    expect(arr(r, "indices")).toEqual([1, 2, 4, 4, 5, 0]);
  });
  it("aclnnInplaceIndexCopy writes through a strided view", () => {
    const plane = arr(get("op_index_copy_strided"), "plane");
    const want = new Array(24).fill(0);
    [4, 5, 6].forEach((v, i) => (want[0 * 3 + i] = v));  // view row 0 = plane row 0
    [1, 2, 3].forEach((v, i) => (want[6 * 3 + i] = v));  // view row 3 = plane row 6
    expect(plane).toEqual(want);
  });
  it("aclnnCat of a contiguous and a strided block", () => {
    expect(arr(get("op_cat"), "out")).toEqual([1, 2, 3, 8, 9, 4, 5, 6, 11, 12]);
  });
  it("aclnnReduceSum over the last dim", () => {
    const r = get("op_reduce_sum");
    const inp = arr(r, "in"), out = arr(r, "out");
    for (let i = 0; i < 6; i++) expect(out[i]).toBe(f32(inp[2 * i]! + inp[2 * i + 1]!));
  });
  it("aclnnGather / aclnnScatter along dim 1, aclnnEmbedding with INT64 ids", () => {
    expect(arr(get("op_gather"), "out")).toEqual([13, 10, 21, 21]);
    expect(arr(get("op_scatter"), "out")).toEqual([1, 0, 1, 0, 0, 1, 0, 1]);
    const e = get("op_embedding"), w = arr(e, "w");
    expect(arr(e, "out")).toEqual([...w.slice(20, 24), ...w.slice(0, 4), ...w.slice(8, 12)]);
  });
});

describe("stream modes", () => {
  it("DS3_STANDIN_STREAM=eager (run at launch) gives the same operator results and collectives as queueing", async () => {
    const once = async (mode: string) => {
      const { stdout } = await run(driver, [build, "ops"], { env: { ...process.env, DS3_STANDIN_STREAM: mode, DS3_STANDIN_NPUS: "2" }, encoding: "utf8", maxBuffer: 1 << 26 });
      return stdout.trim().split("\n").map((l) => JSON.parse(l) as Row).filter((r) => r.case.startsWith("op_"));
    };
    const [q, e] = await Promise.all([once("queue"), once("eager")]);
    expect(q.length).toBeGreaterThan(15);
    expect(e).toEqual(q);
  });
});

describe("HCCL between threads of one process", () => {
  it("all-reduce (FP32, BFP16) and all-gather between ranks on devices 0 and 1", () => {
    const r = get("hccl_collectives");
    expect(r.rc0).toBe(0);
    expect(r.rc1).toBe(0);
    const s0 = arr(r, "sendF0").map(f32), s1 = arr(r, "sendF1").map(f32), b0 = arr(r, "sendB0"), b1 = arr(r, "sendB1");
    expect(arr(r, "sumF0")).toEqual(s0.map((v, i) => f32(v + s1[i]!)));
    expect(arr(r, "sumF1")).toEqual(arr(r, "sumF0"));
    expect(arr(r, "sumB0")).toEqual(b0.map((v, i) => bf16(f32(v + b1[i]!))));
    expect(arr(r, "gather0")).toEqual([...s0, ...s1]);
    expect(arr(r, "gather1")).toEqual([...s0, ...s1]);
  });
  it("refuses root info bytes it did not make", () => {
    const r = get("hccl_wrong_root_info");
    expect(r.rc).toBe(1);
    expect(r.msg).toMatch(/not produced by HcclGetRootInfo/);
  });
  it("refuses a world-size mismatch (the waiting rank times out)", () => {
    const r = get("hccl_world_mismatch");
    expect(r.rc1).toBe(1);
    expect(r.msg1).toMatch(/world size mismatch: rank 1 says nRanks 3 but the group was joined with nRanks 2/);
    expect(r.rc0).toBe(9);
    expect(r.msg0).toMatch(/only 1 of 2 ranks joined|only 0 of 2 ranks joined/);
  });
  it("refuses two ranks on one device", () => {
    const r = get("hccl_same_device");
    expect(r.rc1).toBe(1);
    expect(r.msg1).toMatch(/both on device 0/);
  });
  it("a collective called differently on two ranks fails on both at synchronize", () => {
    const r = get("hccl_collective_mismatch");
    for (const k of ["0", "1"]) {
      expect(r[`rc${k}`]).toBe(500001);
      expect(r[`msg${k}`]).toMatch(/collective mismatch: rank 0 called HcclAllReduce\(count 8, FP32, op 0\) but rank 1 called HcclAllReduce\(count 4/);
    }
  });
  it("a rank that never arrives makes the others time out instead of hanging", () => {
    const r = get("hccl_collective_timeout");
    expect(r.rc).toBe(500001);
    expect(r.msg).toMatch(/timed out after 800 ms waiting for rank\(s\) 1/);
  });
  it("HcclGetErrorString names the code", () => {
    expect(get("hccl_error_string").msg).toMatch(/HCCL_E_PARA/);
  });
});
