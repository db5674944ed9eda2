#!/usr/bin/env bash
# Does the opt-in fp8 path learn what the exact path learns? Two pre-training runs on the CIFAR-10 copy
# that differ only in fp8=off / fp8=tensorwise (same seed, data order, masks, compile), with an online
# kNN check, then `maelab compare` (table + loss/kNN figure). One 10-minute device call on an H100:
#   bash scripts/fp8_evidence.sh OUT_DIR CIFAR10_TGZ [EPOCHS]
# The model has ViT-B/16's widths (768 encoder, 512x8 decoder: the Linear sizes fp8 is meant for) at
# 32 px with 4 px patches, so a run takes minutes. SMOKE=1: CPU, pico model, synthetic data, to check
# the script itself (torchao emulates fp8 on CPU, slowly).
set -euo pipefail
out=${1:?usage: fp8_evidence.sh OUT_DIR CIFAR10_TGZ [EPOCHS]}
tgz=${2:-}
epochs=${3:-15}
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"

if [ "${SMOKE:-0}" = 1 ]; then
  common=(--device cpu --model mae_vit_pico_patch4_32 --data synthetic --epochs 1 --batch-size 8
          data.num_samples=16 data.num_workers=0 knn_every=1 knn_max_train=16 knn_k=3
          model_args.embed_dim=64 model_args.depth=2 model_args.num_heads=2
          model_args.decoder_embed_dim=32 model_args.decoder_depth=1 model_args.decoder_num_heads=2)
else
  [ -n "$tgz" ] || { echo "usage: fp8_evidence.sh OUT_DIR CIFAR10_TGZ [EPOCHS]" >&2; exit 2; }
  data=$(mktemp -d)
  tar xzf "$tgz" -C "$data"
  common=(--model mae_vit_base_patch16 --data "$data/cifar10/train" --epochs "$epochs" --batch-size 256
          model_args.img_size=32 model_args.patch_size=4 model_args.norm_pix_loss=true
          warmup_epochs=2 knn_every=5 "knn_data=$data/cifar10/test" --compile log_every=20)
fi

for fp8 in off tensorwise; do
  python -m maelab pretrain "${common[@]}" fp8=$fp8 --output "$out/fp8_$fp8" --no-progress
done
python -m maelab compare "$out/fp8_off" "$out/fp8_tensorwise" --labels exact,fp8-tensorwise \
  --output "$out/fp8_vs_exact.png" --json "$out/fp8_vs_exact.json"
