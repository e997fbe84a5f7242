#!/usr/bin/env bash
# Prepares HERE (a machine with Node, pnpm's node_modules, nvcc, g++; no GPU needed), in one command,
# everything the GPU check needs on the GPU machine (no Node, no pnpm, no registry there), in .device/:
#   node.xz, setup.sh, include/node     Node itself and the Node-API headers (as ../shared/tools/device-carry.sh)
#   include/napi                        node-addon-api headers (build-device.sh builds the NCCL variant there)
#   gpu.tar.xz                          packages/backend-cuda/build/gpu/ (bundles ds3.js, cuda.js, cpu.js,
#                                       rank-worker.js; node_modules/piscina; ds3_cuda.node built for sm_90a,
#                                       stripped) and packages/backend-cuda/build/build/Release/ds3_cpu.node
#                                       (the CPU reference, libstdc++ static)
# then checks that what travels (working tree + .device) is under the 64 MiB limit, and runs the check
# here, where every step must report "CUDA not available: ...".
#
#   bash bench/cuda/prepare-device.sh [--no-local-check]
# and on the GPU machine (carry .device):
#   bash bench/cuda/run-device.sh all          # results under $OUT: gpu-check.json, gpu-check.log, ds3-4L-<gpu>.json
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
pkg=$root/packages/backend-cuda
d=$root/.device
mkdir -p "$d/include"
t0=$(date +%s)
say() { echo "prepare-device: $* ($(( $(date +%s) - t0 )) s)"; }

# 1. Node and its Node-API headers
if [ ! -f "$d/node.xz" ]; then
  say "compressing $(command -v node) ($(node -v))"
  xz -T2 -6 -c "$(command -v node)" > "$d/node.xz.tmp" && mv "$d/node.xz.tmp" "$d/node.xz"
fi
mkdir -p "$d/include/node"
for h in node_api.h node_api_types.h js_native_api.h js_native_api_types.h node_version.h; do
  src=/usr/include/node/$h
  [ -f "$src" ] || src=$(cd "$pkg" && node -p "require('path').join(require('node-api-headers').include_dir, '$h')")
  cp "$src" "$d/include/node/"
done
cat > "$d/setup.sh" <<'EOS'
# source this on a GPU machine
_d=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if ! command -v node >/dev/null 2>&1; then
  xz -dc "$_d/node.xz" > /usr/local/bin/node && chmod +x /usr/local/bin/node
fi
export DS3_NODE_API_INCLUDE="$_d/include/node"
node -v
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
EOS
bash bench/cuda/build-device.sh --prepare >/dev/null
say "node.xz $(du -h "$d/node.xz" | cut -f1), headers in .device/include"

# 2. the CUDA addon for Hopper only (sm_90a: H100, H200), stripped
say "building ds3_cuda.node for sm_90a (cmake-js, incremental)"
(cd "$pkg" && DS3_CUDA_GENCODE="-gencode=arch=compute_90a,code=sm_90a" npx cmake-js compile --release --out build/device >/tmp/ds3-prepare-cuda.log 2>&1) \
  || { tail -30 /tmp/ds3-prepare-cuda.log; exit 1; }
# a machine without nvcc builds the stub: nothing to send to a GPU then
if grep -q "built without CUDA" "$pkg/build/device/Release/ds3_cuda.node"; then
  echo "prepare-device: build/device/Release/ds3_cuda.node is the stub (no nvcc found by CMake): need nvcc here" >&2
  exit 1
fi

# 3. the bundles (sources of @ds3/core, the CPU and CUDA backends) and piscina beside them
say "bundling (tsup.gpu.config.ts)"
(cd "$pkg" && npx tsup --config tsup.gpu.config.ts >/tmp/ds3-prepare-tsup.log 2>&1) || { cat /tmp/ds3-prepare-tsup.log; exit 1; }
pis=$(readlink -f "$root/packages/core/node_modules/piscina")
[ -f "$pis/package.json" ] || { echo "prepare-device: piscina not found under packages/core/node_modules (pnpm install)" >&2; exit 1; }
mkdir -p "$pkg/build/gpu/node_modules/piscina"
cp "$pis/package.json" "$pis/LICENSE" "$pkg/build/gpu/node_modules/piscina/"
(cd "$pis" && find dist -type f \( -name '*.js' -o -name '*.mjs' -o -name '*.cjs' \) | while read -r f; do mkdir -p "$pkg/build/gpu/node_modules/piscina/$(dirname "$f")"; cp "$f" "$pkg/build/gpu/node_modules/piscina/$f"; done)
cp "$pkg/build/device/Release/ds3_cuda.node" "$pkg/build/gpu/ds3_cuda.node"
strip --strip-unneeded "$pkg/build/gpu/ds3_cuda.node"

# 4. the CPU reference addon beside the bundle (the CPU backend looks in ../build/Release), libstdc++ static
say "compiling ds3_cpu.node (static libstdc++)"
cpu=$root/packages/backend-cpu
napi=$(cd "$pkg" && node -p "require('node-addon-api').include_dir" | tr -d '"')
obj=/tmp/ds3-prepare-cpu
mkdir -p "$obj" "$pkg/build/build/Release"
flags="-std=c++17 -O3 -fno-math-errno -ffp-contract=off -fPIC -DNAPI_VERSION=8 -DNODE_ADDON_API_DISABLE_DEPRECATED -DNAPI_CPP_EXCEPTIONS -I$pkg/$napi -I$d/include/node"
pids=()
for f in addon kernels simd_generic; do g++ $flags -c "$cpu/src/$f.cpp" -o "$obj/$f.o" & pids+=($!); done
g++ $flags -mavx2 -mfma -c "$cpu/src/simd_avx2.cpp" -o "$obj/simd_avx2.o" & pids+=($!)
g++ $flags -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -Wno-uninitialized -Wno-maybe-uninitialized -c "$cpu/src/simd_avx512.cpp" -o "$obj/simd_avx512.o" & pids+=($!)
for p in "${pids[@]}"; do wait "$p"; done
g++ -shared -o "$pkg/build/build/Release/ds3_cpu.node" "$obj"/*.o -static-libstdc++ -static-libgcc -pthread
strip --strip-unneeded "$pkg/build/build/Release/ds3_cpu.node"

# 5. one archive
tar -C "$root" -cf - packages/backend-cuda/build/gpu packages/backend-cuda/build/build/Release/ds3_cpu.node | xz -T2 -6 > "$d/gpu.tar.xz"
say "gpu.tar.xz $(du -h "$d/gpu.tar.xz" | cut -f1)"

# 6. what travels: tracked + untracked-not-ignored files + .device, against the 64 MiB limit
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
dev=$(du -sb "$d" | cut -f1)
total=$((tree + dev))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "prepare-device: travels: working tree $(mib "$tree") + .device $(mib "$dev") = $(mib "$total") (limit 64 MiB)"
[ "$total" -lt $((64 * 1048576)) ] || { echo "prepare-device: over the 64 MiB limit" >&2; exit 1; }

# 7. the check here: every step must say why it cannot run (no GPU), and the bundles must load
if [ "${1:-}" != "--no-local-check" ]; then
  say "local run of bench/cuda/device-check.mjs (no GPU here: every step should be 'not available')"
  set +e
  DS3_CUDA_ADDON=$pkg/build/gpu/ds3_cuda.node node bench/cuda/device-check.mjs --out /tmp/ds3-prepare-out --budget 120 >/tmp/ds3-prepare-check.log 2>&1
  rc=$?
  set -e
  grep "^=== device-check" /tmp/ds3-prepare-check.log || tail -20 /tmp/ds3-prepare-check.log
  node -e 'const s=require("/tmp/ds3-prepare-out/gpu-check.json"); for (const x of s.steps) console.log(`  ${x.name}: ${x.status}${x.reason ? " - " + x.reason : ""}`)'
  [ "$rc" = 3 ] || [ "$rc" = 0 ] || { echo "prepare-device: the local run exited $rc (see /tmp/ds3-prepare-check.log)" >&2; exit 1; }
fi
say "done. On the GPU machine (carry .device): bash bench/cuda/run-device.sh all"
