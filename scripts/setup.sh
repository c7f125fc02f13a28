#!/usr/bin/env bash
# Creates .venv (if needed) and installs fedrec with its dependencies.
# torch is installed first, on its own, so that `pip install -e .` (which accepts any
# torch>=2.1) never swaps it for a multi-GB CUDA build. Without an NVIDIA GPU:
#  - FEDREC_TORCH_INDEX (e.g. PyTorch's CPU wheel index) is used when set;
#  - otherwise the default index, which on machines that keep a CPU wheel on disk (pip's
#    find-links / local index) resolves to it.
# FEDREC_TORCH_SPEC picks the version (default torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
$VPY -m pip install -q --upgrade pip >/dev/null
if ! $VPY -c "import torch" 2>/dev/null; then
  spec=${FEDREC_TORCH_SPEC:-torch==2.13.0}
  if command -v nvidia-smi >/dev/null 2>&1; then
    $VPY -m pip install -q "$spec"
  else
    if [ -n "${FEDREC_TORCH_INDEX:-}" ]; then
      $VPY -m pip install -q --index-url "$FEDREC_TORCH_INDEX" "$spec"
    else
      $VPY -m pip install -q "$spec"
    fi
    $VPY -c "import torch; assert not torch.version.cuda, 'CUDA torch on a CPU machine: set FEDREC_TORCH_INDEX'" \
      || echo "warning: a CUDA build of torch was installed on a machine without a GPU" >&2
  fi
fi
$VPY -m pip install -q -e ".[test,plot]"
echo "fedrec environment ready: $(pwd)/.venv" >&2
