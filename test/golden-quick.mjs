import { Checkpoint, parseConfig, Transformer } from "@ds3/core";
import { cpu } from "@ds3/backend-cpu";
import { readFileSync } from "node:fs";
const dir = process.argv[2] ?? "test/fixtures/tiny-v3";
const cfg = parseConfig(JSON.parse(readFileSync(dir + "/config.json", "utf8")));
const g = JSON.parse(readFileSync(dir + "/golden.json", "utf8"));
const gf = new Float32Array(readFileSync(dir + "/golden.f32").buffer.slice(0));
const ctx = cpu.create({});
let t0 = Date.now();
const m = new Transformer(ctx, Checkpoint.open(dir), cfg);
console.log("load ms", Date.now() - t0);
m.allocCache(64, 64);
for (const p of g.prompts) {
  const L = p.ids.length;
  const ids = Int32Array.from(p.ids);
  const positions = Int32Array.from({ length: L }, (_, i) => i);
  const maxBlocks = 16;
  const bt = Int32Array.from({ length: maxBlocks }, (_, i) => i);
  const meta = { positions, seqIdx: new Int32Array(L), blockTables: bt, maxBlocks };
  t0 = Date.now();
  const r = m.forward(ids, meta, positions);
  let maxd = 0;
  for (let i = 0; i < L * 1024; i++) maxd = Math.max(maxd, Math.abs(r.logits[i] - gf[p.logits_offset / 4 + i]));
  let mtpd = -1;
  if (p.mtp_logits_offset !== undefined && L > 1) {
    const n = L - 1;
    const meta2 = { positions: positions.subarray(0, n), seqIdx: new Int32Array(n), blockTables: bt, maxBlocks };
    const hid = ctx.rows(r.hidden, Int32Array.from({ length: n }, (_, i) => i));
    const mr = m.forwardMtp(hid, ids.subarray(1), meta2, Int32Array.from({ length: n }, (_, i) => i));
    mtpd = 0;
    for (let i = 0; i < n * 1024; i++) mtpd = Math.max(mtpd, Math.abs(mr.logits[i] - gf[p.mtp_logits_offset / 4 + i]));
  }
  console.log("L", L, "max |dlogit|", maxd.toExponential(3), "mtp", mtpd.toExponential(3), "ms", Date.now() - t0);
}
