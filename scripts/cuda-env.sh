#!/usr/bin/env bash
# Installs (once) the pinned CUDA 13.0 compiler from PyPI into a cached venv and exports the
# variables that candle's and our build.rs need. Source it: `source scripts/cuda-env.sh`.
# It leaves the caller's shell options alone and returns non-zero on failure.
#
# Every package is pinned: 13.0 PTX (ISA 9.0) is what the 580-series driver and the 13.0 ptxas
# accept; letting nvidia-nvvm float gives PTX 9.5, which both reject.
_cuda_env() {
  local venv="${CUDA_VENV:-$HOME/.cache/candle-detloss/cuda13-venv}"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" || return 1
  fi
  local site
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || return 1
  local cu13="$site/nvidia/cu13"
  if [ ! -x "$cu13/bin/nvcc" ]; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
      nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 || return 1
  fi
  if [ ! -x "$cu13/bin/nvcc" ]; then
    echo "cuda-env: nvcc not found under $cu13" >&2
    return 1
  fi
  export PATH="$cu13/bin:$PATH"
  export CUDA_ROOT="$cu13" CUDA_PATH="$cu13" CUDA_HOME="$cu13"
  export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
  export LD_LIBRARY_PATH="$cu13/lib:$cu13/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}
_cuda_env
