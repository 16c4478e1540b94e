#!/usr/bin/env bash
# Runs on the GPU machine, inside the bundle made by scripts/gpu-build.sh: every CUDA test
# (CUDA result vs CPU result), then the benchmark table (fused vs composed candle ops vs a
# device-to-device copy), plus PyTorch's own losses when PyTorch is installed.
#
#   bash gpu-run.sh [RESULTS_DIR]        (default: ./results)
#
# Exit status: 0 only if a GPU was found and every CUDA test passed.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/results}"
mkdir -p "$out"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu-run: no NVIDIA GPU found on this machine (nvidia-smi fails); nothing was tested" >&2
  exit 2
fi
gpu="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -n 1)"
echo "gpu-run: $gpu"

# The driver's libcuda and the CUDA 13 runtime libraries (cuBLAS, cuBLASLt, cuRAND, NVRTC), from
# the system or from PyTorch's bundled nvidia/*/lib folders.
libdirs=""
for py in python3 python; do
  command -v "$py" >/dev/null 2>&1 || continue
  d="$("$py" - <<'PY' 2>/dev/null
import glob, os, site, sys
roots = set(site.getsitepackages() + [site.getusersitepackages()])
dirs = []
for r in roots:
    for pat in ("nvidia/*/lib", "nvidia/cu13/lib", "nvidia/cu13/lib64", "torch/lib"):
        dirs += glob.glob(os.path.join(r, pat))
print(":".join(sorted(set(dirs))))
PY
)"
  [ -n "$d" ] && libdirs="$d" && break
done
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && libdirs="$libdirs:$d"
done
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# Unpack the binaries.
mkdir -p "$out/bin"
for f in "$here"/bin/*; do
  case "$f" in
    *.xz) xz -dc "$f" > "$out/bin/$(basename "$f" .xz)" ;;
    *) cp "$f" "$out/bin/" ;;
  esac
done
chmod +x "$out"/bin/*

missing="$(ldd "$out"/bin/* 2>/dev/null | grep 'not found' | sort -u)"
if [ -n "$missing" ]; then
  echo "gpu-run: libraries not found (set LD_LIBRARY_PATH):" >&2
  echo "$missing" >&2
  exit 3
fi

pass=0
fail=0
: > "$out/tests.txt"
for t in "$out"/bin/*_cuda; do
  [ -e "$t" ] || continue
  name="$(basename "$t")"
  log="$out/$name.log"
  if "$t" --test-threads=1 > "$log" 2>&1 && ! grep -q '^SKIP' "$log"; then
    echo "PASS $name" | tee -a "$out/tests.txt"
    pass=$((pass + 1))
  else
    # A SKIP on a machine with a GPU means the device could not be opened: a failure here.
    echo "FAIL $name (see $log)" | tee -a "$out/tests.txt"
    tail -n 30 "$log"
    fail=$((fail + 1))
  fi
done
echo "gpu-run: $pass passed, $fail failed"

if [ -x "$out/bin/bench_table" ]; then
  echo
  "$out/bin/bench_table" --device cuda --json "$out/bench.json" | tee "$out/bench.md"
fi
if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
  echo
  python3 "$here/gpu_torch_bench.py" "$out/torch.json" | tee "$out/torch.md"
else
  echo "gpu-run: PyTorch with CUDA not available; no PyTorch column"
fi
echo "gpu-run: results in $out ($gpu)"
[ "$fail" -eq 0 ] && [ "$pass" -gt 0 ]
