#!/usr/bin/env bash
# The GPU machine has torch, timm, transformers and torchvision but no internet: download the wheels it
# needs besides (pytest + hypothesis for `pytest -m gpu`, torchao for fp8) for the Python versions it may run,
# then carry the folder and install from it there:
#   bash scripts/device_wheels.sh .whl                       # here (.whl/ is git-ignored)
#   pip install -q --no-index --find-links .whl pytest hypothesis torchao   # on the device
set -euo pipefail
dst=${1:-.whl}
mkdir -p "$dst"
for py in 3.10 3.11 3.12 3.13; do
  pip download -q -d "$dst" --only-binary=:all: --python-version "$py" pytest hypothesis torchao exceptiongroup tomli \
    2>&1 | grep -v "^WARNING" || true
done
ls "$dst"
