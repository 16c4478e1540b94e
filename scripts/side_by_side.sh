#!/usr/bin/env bash
# The crate against PyTorch on this machine, in one command: scripts/bench_torch.py (PyTorch and
# torchvision on bench_table's cases, glibc's default and tuned allocator, each in a child
# process), then `bench_table --torch`, which times the crate under both allocator settings and
# prints the side-by-side table with the ratios. Not in CI (needs torch).
#
#   scripts/side_by_side.sh [--quick] [--only TEXT]
#
# PYTHON (default python3) must import torch and torchvision (`pip install torch torchvision`).
# The torch rows are kept in target/bench_torch.json.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
torch_args=()
table_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) torch_args+=(--anchors 20000); table_args+=(--quick) ;;
    --only) torch_args+=(--only "$2"); table_args+=(--only "$2"); shift ;;
    *) echo "usage: scripts/side_by_side.sh [--quick] [--only TEXT]" >&2; exit 2 ;;
  esac
  shift
done
"$py" -c "import torch, torchvision" || {
  echo "side_by_side: $py cannot import torch and torchvision (set PYTHON)" >&2
  exit 1
}
mkdir -p target
"$py" scripts/bench_torch.py target/bench_torch.json ${torch_args[@]+"${torch_args[@]}"}
cargo run --release --example bench_table -- --torch target/bench_torch.json \
  ${table_args[@]+"${table_args[@]}"}
