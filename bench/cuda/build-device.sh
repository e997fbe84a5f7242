#!/usr/bin/env bash
# Builds the NCCL variant of the addon ON THE GPU MACHINE (CMake, nvcc and g++ there; no Node packages):
# node-addon-api headers come from .device/include/napi and Node-API headers from .device/include/node
# (prepare both here: bash ../shared/tools/device-carry.sh && bash bench/cuda/build-device.sh --prepare).
# NCCL is searched for in $NCCL_HOME, /usr, and the nvidia-nccl wheel of the machine's Python.
#   bash bench/cuda/build-device.sh [--prepare] [build-dir]     -> prints the path of the .node
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [ "${1:-}" = "--prepare" ]; then  # here: copy napi.h & co next to the Node-API headers
  inc=$(cd "$root/packages/backend-cuda" && node -p "require('node-addon-api').include_dir")
  mkdir -p "$root/.device/include/napi"
  cp "$root/packages/backend-cuda/$inc"/napi*.h "$root/.device/include/napi/" 2>/dev/null || cp "$inc"/napi*.h "$root/.device/include/napi/"
  ls "$root/.device/include/napi"
  exit 0
fi
out=${1:-/tmp/ds3-nccl-build}
if [ -z "${NCCL_HOME:-}" ]; then
  if [ -f /usr/include/nccl.h ]; then
    NCCL_HOME=/usr
  else
    NCCL_HOME=$(python3 - <<'EOF' 2>/dev/null
import importlib.util, os
try:
    import nvidia.nccl as m
    print(list(m.__path__)[0])
except Exception:
    pass
EOF
)
  fi
  if [ -z "$NCCL_HOME" ]; then
    h=$(find / -name nccl.h -path '*include*' -not -path '/proc/*' 2>/dev/null | head -1)
    [ -n "$h" ] && NCCL_HOME=$(dirname "$(dirname "$h")")
  fi
fi
export NCCL_HOME
echo "NCCL_HOME=$NCCL_HOME ($(ls "$NCCL_HOME"/lib*/libnccl* 2>/dev/null | head -3 | tr '\n' ' '))" >&2
export DS3_NAPI_INCLUDE="$root/.device/include/napi" DS3_NODE_API_INCLUDE="$root/.device/include/node"
gen=$(command -v ninja >/dev/null && echo "-G Ninja" || echo "")
cmake -S "$root/packages/backend-cuda" -B "$out" $gen -DCMAKE_BUILD_TYPE=Release -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$out/Release" >"$out.configure.log" 2>&1 \
  || { cat "$out.configure.log" >&2; exit 1; }
grep "ds3:" "$out.configure.log" >&2
cmake --build "$out" -j "$(nproc)" >"$out.build.log" 2>&1 || { tail -40 "$out.build.log" >&2; exit 1; }
node=$(find "$out" -name ds3_cuda.node | head -1)
[ -n "$node" ] || { echo "no ds3_cuda.node in $out" >&2; exit 1; }
echo "$node"
