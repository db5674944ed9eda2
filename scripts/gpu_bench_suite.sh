#!/usr/bin/env bash
# Every speed measurement of the speed issue in one command, for a lent GPU machine:
#   bash scripts/gpu_bench_suite.sh OUT_DIR [CIFAR10_TGZ]
# Writes one JSON per run into OUT_DIR (maelab bench --json); prints the tables.
# CIFAR10_TGZ: a tarball of the CIFAR-10 ImageFolder copy (tar czf cifar10.tgz -C ../shared/data cifar10).
set -euo pipefail
out=${1:?usage: gpu_bench_suite.sh OUT_DIR [CIFAR10_TGZ]}
mkdir -p "$out"
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)/src${PYTHONPATH:+:$PYTHONPATH}"
bench() { python -m maelab bench "$@"; }

bench --model mae_vit_base_patch16 --batch-size 256 --json "$out/vitb_b256_eager.json"
bench --model mae_vit_base_patch16 --batch-size 256 --compile --json "$out/vitb_b256_compile.json"
bench --model mae_vit_large_patch16 --batch-size 128 --json "$out/vitl_b128_eager.json"
bench --model mae_vit_large_patch16 --batch-size 128 --compile --json "$out/vitl_b128_compile.json"
for b in 512 1024; do
  bench --model mae_vit_base_patch16 --batch-size $b --compile --no-reference --json "$out/vitb_b${b}_compile.json"
done
for m in mae_vit_tiny_patch4_32 mae_vit_tiny_patch2_32; do
  bench --model $m --batch-size 512 --no-reference --json "$out/${m}_b512_eager.json"
  bench --model $m --batch-size 512 --compile --no-reference --json "$out/${m}_b512_compile.json"
done
if [ -n "${2:-}" ]; then
  data=$(mktemp -d)
  tar xzf "$2" -C "$data"
  bench --model mae_vit_tiny_patch4_32 --batch-size 512 --compile --no-reference \
      --data "$data/cifar10/train" --gpu-resident on --json "$out/cifar10_gpu_resident.json"
  bench --model mae_vit_tiny_patch4_32 --batch-size 512 --compile --no-reference \
      --data "$data/cifar10/train" --gpu-resident off --num-workers 12 --json "$out/cifar10_dataloader.json"
fi
