#!/usr/bin/env bash
# The GPU machine has torch, timm, transformers and torchvision but no internet. Download what else
# maelab's GPU tests and benchmarks need there, for the machine's Python version(s), into DST:
#   pytest + hypothesis (pytest -m gpu), torchao (fp8), matplotlib and its small deps (run figures).
#   bash scripts/device_wheels.sh .whl 3.12          # here; .whl/ is git-ignored (default: 3.10 .. 3.13)
#   pip install -q --no-index --find-links .whl pytest hypothesis torchao matplotlib   # on the device
# Ask the device first (one short call): python -V; python -c "import pytest, hypothesis, matplotlib"
set -euo pipefail
dst=${1:-.whl}
shift || true
versions=("${@:-3.10 3.11 3.12 3.13}")
mkdir -p "$dst"
for py in ${versions[@]}; do
  opts=(-q -d "$dst" --only-binary=:all: --python-version "$py")
  pip download "${opts[@]}" pytest hypothesis exceptiongroup tomli 2>&1 | grep -v "^WARNING" || true
  # numpy and pillow come with torch / torchvision on the device: no deps for these
  pip download "${opts[@]}" --no-deps torchao matplotlib contourpy cycler fonttools kiwisolver pyparsing \
    python-dateutil six 2>&1 | grep -v "^WARNING" || true
done
du -sh "$dst"
