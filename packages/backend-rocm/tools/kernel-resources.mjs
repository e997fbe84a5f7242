#!/usr/bin/env node
// Per-kernel resource use of the HIP objects, read from the AMDGPU code-object metadata of every target
// (registers, scratch = private segment incl. spills, static LDS), printed as a table into the build log.
// A kernel whose scratch or spill counts exceed the committed baseline (kernel-resources.json) is printed as
// a WARNING line (cmake-js shows it in the build output); --update rewrites the baseline.
// Run by CMakeLists.txt after the addon is linked:
//   node tools/kernel-resources.mjs --bundler B --objcopy O --readelf R --baseline F [--out F2] [--update] objs...
import { execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, dirname, join } from "node:path";

const args = process.argv.slice(2);
const opt = {};
const objs = [];
for (let i = 0; i < args.length; i++) {
  const a = args[i];
  if (a === "--update") opt.update = true;
  else if (a.startsWith("--")) opt[a.slice(2)] = args[++i];
  else objs.push(a);
}
const run = (cmd, argv) => execFileSync(cmd, argv, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });

/** kernels of one code object: [{name, vgpr, agpr, sgpr, scratch, lds, vspill, sspill}] */
export function parseNotes(text) {
  const out = [];
  let k = null;
  for (const line of text.split("\n")) {
    let m = /^ {2}- \.([a-z_]+):\s*(.*)$/.exec(line);
    if (m) {
      k = {};
      out.push(k);
    } else m = /^ {4}\.([a-z_]+):\s*(.*)$/.exec(line);
    if (!m || !k) continue;
    k[m[1]] = m[2].trim();
  }
  return out
    .filter((k) => k.name)
    .map((k) => ({
      name: k.name,
      vgpr: +k.vgpr_count || 0,
      agpr: +k.agpr_count || 0,
      sgpr: +k.sgpr_count || 0,
      scratch: +k.private_segment_fixed_size || 0,
      lds: +k.group_segment_fixed_size || 0,
      vspill: +k.vgpr_spill_count || 0,
      sspill: +k.sgpr_spill_count || 0,
    }));
}

function demangler() {
  const dirs = [opt.bundler, opt.readelf].filter(Boolean).map(dirname);
  const ver = /-(\d+)$/.exec(opt.readelf ?? "")?.[1];
  for (const d of dirs)
    for (const n of ["llvm-cxxfilt", ver && `llvm-cxxfilt-${ver}`].filter(Boolean)) {
      const p = join(d, n);
      if (existsSync(p)) return p;
    }
  return null;
}
function shortNames(names) {
  const filt = demangler();
  let dem = names;
  if (filt) {
    try {
      dem = execFileSync(filt, [], { input: names.join("\n"), encoding: "utf8" }).trim().split("\n");
    } catch {
      dem = names;
    }
  }
  return dem.map((d) => {
    let s = d.replace(/^void /, "").replace(/ds3cu::/g, "").replace(/\(anonymous namespace\)::/g, "");
    const p = s.indexOf("(");
    if (p > 0) s = s.slice(0, p);
    return s.replace(/\s+/g, "");
  });
}

const res = {}; // arch -> kernel -> resources
const tmp = mkdtempSync(join(tmpdir(), "ds3-kres-"));
try {
  for (const o of objs) {
    const fb = join(tmp, basename(o) + ".fatbin");
    run(opt.objcopy, ["--dump-section", `.hip_fatbin=${fb}`, o, join(tmp, "discard.o")]);
    const targets = run(opt.bundler, ["--list", "--type=o", `--input=${fb}`])
      .split("\n")
      .map((s) => s.trim())
      .filter((s) => s.startsWith("hip"));
    for (const t of targets) {
      const arch = t.split("--").pop();
      const co = join(tmp, `${basename(o)}.${arch}.co`);
      run(opt.bundler, ["--unbundle", "--type=o", `--input=${fb}`, `--targets=${t}`, `--output=${co}`]);
      const ks = parseNotes(run(opt.readelf, ["--notes", co]));
      const names = shortNames(ks.map((k) => k.name));
      res[arch] ??= {};
      ks.forEach((k, i) => {
        const { name, ...r } = k;
        res[arch][`${basename(o, ".o")}: ${names[i]}`] = r;
      });
    }
  }
} finally {
  rmSync(tmp, { recursive: true, force: true });
}

const base = existsSync(opt.baseline) ? JSON.parse(readFileSync(opt.baseline, "utf8")) : {};
const warnings = [];
const pad = (s, n) => String(s).padEnd(n);
const lpad = (s, n) => String(s).padStart(n);
for (const arch of Object.keys(res).sort()) {
  const ks = res[arch];
  const names = Object.keys(ks).sort();
  const w = Math.min(90, Math.max(...names.map((n) => n.length)));
  console.log(`\nds3 kernel resources, ${arch} (${names.length} kernels; scratch = private segment bytes per lane incl. spills; LDS = static bytes per block, dynamic LDS comes on top)`);
  console.log(`${pad("kernel", w)} ${lpad("VGPR", 5)} ${lpad("AGPR", 5)} ${lpad("SGPR", 5)} ${lpad("scratch", 8)} ${lpad("LDS", 7)} ${lpad("spill v/s", 10)}`);
  for (const n of names) {
    const r = ks[n];
    console.log(`${pad(n.length > w ? n.slice(0, w - 1) + "~" : n, w)} ${lpad(r.vgpr, 5)} ${lpad(r.agpr, 5)} ${lpad(r.sgpr, 5)} ${lpad(r.scratch, 8)} ${lpad(r.lds, 7)} ${lpad(`${r.vspill}/${r.sspill}`, 10)}`);
    const b = base[arch]?.[n];
    if (!b) {
      if (Object.keys(base).length) console.log(`  (no baseline for ${arch} ${n})`);
      continue;
    }
    if (r.scratch > b.scratch || r.vspill > b.vspill || r.sspill > b.sspill)
      warnings.push(
        `${arch} ${n}: scratch ${r.scratch} B/lane, spills ${r.vspill} VGPR / ${r.sspill} SGPR (baseline ${b.scratch} B, ${b.vspill} / ${b.sspill})`,
      );
  }
}
/** one kernel per line, sorted: a baseline that diffs well */
const dump = (r) =>
  "{\n" +
  Object.keys(r)
    .sort()
    .map((a) => `  ${JSON.stringify(a)}: {\n` + Object.keys(r[a]).sort().map((k) => `    ${JSON.stringify(k)}: ${JSON.stringify(r[a][k])}`).join(",\n") + "\n  }")
    .join(",\n") +
  "\n}\n";
if (opt.out) writeFileSync(opt.out, dump(res));
if (opt.update) {
  writeFileSync(opt.baseline, dump(res));
  console.log(`\nds3: baseline written to ${opt.baseline}`);
}
for (const w of warnings) console.log(`WARNING: ds3 kernel spills more than its baseline: ${w}`);
if (!warnings.length) console.log(`\nds3: no kernel spills more than kernel-resources.json`);
