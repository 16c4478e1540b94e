#!/usr/bin/env bash
# Installs (once) the pinned CUDA 13.0 compiler from PyPI into a cached venv and exports the
# variables that candle's and our build.rs need. Source it: `source scripts/cuda-env.sh`.
#
# Every package is pinned: 13.0 PTX (ISA 9.0) is what the 580-series driver and the 13.0 ptxas
# accept; letting nvidia-nvvm float gives PTX 9.5, which both reject.
set -euo pipefail
CUDA_VENV="${CUDA_VENV:-$HOME/.cache/candle-detloss/cuda13-venv}"
if [ ! -x "$CUDA_VENV/bin/python" ]; then
  python3 -m venv "$CUDA_VENV"
fi
CU13="$("$CUDA_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13"
if [ ! -x "$CU13/bin/nvcc" ]; then
  "$CUDA_VENV/bin/pip" install --quiet --disable-pip-version-check \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
fi
[ -x "$CU13/bin/nvcc" ] || { echo "cuda-env: nvcc not found under $CU13" >&2; exit 1; }
# nvcc looks for cicc/libdevice under ../nvvm relative to its bin.
export PATH="$CU13/bin:$PATH"
export CUDA_ROOT="$CU13" CUDA_PATH="$CU13" CUDA_HOME="$CU13"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export LD_LIBRARY_PATH="$CU13/lib:$CU13/lib64:${LD_LIBRARY_PATH:-}"
set +euo pipefail
