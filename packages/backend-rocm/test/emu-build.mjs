// Builds the wave-64 test harness: the kernel sources of @ds3/backend-cuda/src/native, as they are, compiled by
// g++ for the host SIMT emulator (simt_emu.h) at a warp width of 32 or 64. Two textual rewrites only, for what C++
// cannot parse or express: `k<<<grid, block, smem, stream>>>(args)` -> ds3emu::launch(Cfg(...), k, args) and
// `extern __shared__ T name[];` -> a pointer to the emulator's dynamic shared memory. Nothing else is changed.
//   node test/emu-build.mjs 64      (prints the path of the executable)
import { execFileSync, spawn } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const pkg = resolve(here, "..");
export const nativeDir = resolve(pkg, "../backend-cuda/src/native");
const SOURCES = ["sample.cu", "elementwise.cu", "moe.cu", "linear.cu", "mla.cu"];

export function rewrite(src) {
  return src
    .replace(/([A-Za-z_][A-Za-z0-9_]*(?:<[^<>;]*>)?)<<<(.*?)>>>\(/g, "ds3emu::launch(ds3emu::Cfg($2), $1, ")
    .replace(/extern __shared__ (?:__align__\(\d+\) )?([A-Za-z_][A-Za-z0-9_]*) ([A-Za-z_][A-Za-z0-9_]*)\[\];/g,
      "$1* $2 = reinterpret_cast<$1*>(ds3emu::dyn_smem());");
}

/** compiles (when a source is newer than the binary) and returns the harness path for the given width */
export async function buildHarness(warp, { extraFlags = [], tag = "" } = {}) {
  const out = join(pkg, "build", `emu${warp}${tag}`);
  mkdirSync(join(out, "src"), { recursive: true });
  const exe = join(out, "wave64_harness");
  const deps = [
    ...SOURCES.map((s) => join(nativeDir, s)),
    ...["common.cuh", "vendor.cuh", "vendor.h", "ops.h"].map((h) => join(nativeDir, h)),
    join(here, "simt_emu.h"),
    join(here, "wave64_harness.cpp"),
    fileURLToPath(import.meta.url),
  ];
  const newest = Math.max(...deps.map((d) => statSync(d).mtimeMs));
  if (existsSync(exe) && statSync(exe).mtimeMs > newest && !extraFlags.length) return exe;
  const flags = ["-std=c++17", "-O2", "-w", "-DDS3_SIMT_EMU", `-DDS3_EMU_WARP=${warp}`, "-DDS3_SAMPLE_THREADS=256", `-I${here}`, `-I${nativeDir}`, ...extraFlags];
  const objs = [];
  for (const s of SOURCES) {
    const cpp = join(out, "src", s.replace(/\.cu$/, ".cpp"));
    writeFileSync(cpp, `#line 1 "${join(nativeDir, s)}"\n` + rewrite(readFileSync(join(nativeDir, s), "utf8")));
    const o = cpp.replace(/\.cpp$/, ".o");
    objs.push(o);
  }
  // compile the kernel files two at a time (the CI machine has 2 cores)
  const jobs = SOURCES.map((s, i) => [...flags, "-c", join(out, "src", s.replace(/\.cu$/, ".cpp")), "-o", objs[i]]);
  jobs.push([...flags, "-c", join(here, "wave64_harness.cpp"), "-o", join(out, "harness.o")]);
  const fails = [];
  const next = async () => {
    for (let j = jobs.shift(); j; j = jobs.shift()) {
      const r = await new Promise((res) => {
        const c = spawn("g++", j, { stdio: ["ignore", "inherit", "pipe"] });
        let err = "";
        c.stderr.on("data", (d) => (err += d));
        c.on("close", (code) => res({ code, err }));
      });
      if (r.code !== 0) fails.push(`g++ ${j.join(" ")}\n${r.err}`);
    }
  };
  await Promise.all([next(), next()]);
  if (fails.length) throw new Error(`emulator build failed:\n${fails.join("\n")}`);
  execFileSync("g++", [...objs, join(out, "harness.o"), "-o", exe], { stdio: "inherit" });
  return exe;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  console.log(await buildHarness(Number(process.argv[2] ?? 64)));
}
