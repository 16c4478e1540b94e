#!/usr/bin/env bash
# Installs (once) pinned pycocotools into a cached venv and exports COCO_PYTHON, its python.
# Source it: `source scripts/coco-env.sh`. It leaves the caller's shell options alone and
# returns non-zero on failure. The pins are the versions tests/fixtures/coco_eval.json was
# generated with.
_coco_env() {
  local venv="${COCO_VENV:-$HOME/.cache/candle-detloss/coco-venv}"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" || return 1
  fi
  if ! "$venv/bin/python" -c 'import pycocotools, numpy' 2>/dev/null; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
      pycocotools==2.0.11 numpy==2.4.6 || return 1
  fi
  "$venv/bin/python" -c 'import pycocotools' || return 1
  export COCO_PYTHON="$venv/bin/python"
}
_coco_env
