#!/usr/bin/env bash
# The speed issue's measurements, in parts that each fit one 10-minute device call:
#   bash scripts/gpu_bench_suite.sh PART OUT_DIR [CIFAR10_TGZ]
# PART: tests | vitb | vitb-sweep | vitl | tiny | fp8 | data | all
#   tests       the CUDA-only tests (python -m pytest -m gpu): run these first, they have never run
#   vitb        ViT-B/16 b256: default path, every exact-path ablation, HF reference
#   vitb-sweep  ViT-B/16 at b128..1024: default path and HF reference (best batch per impl)
#   vitl        ViT-L/16 b128: default, eager, CUDA graphs, HF reference; then b64..256 sweep
#   tiny        ViT-Tiny patch 4 and patch 2 at 32 px: default vs eager vs CUDA graphs, b256..1024
#   fp8         ViT-B/16 b256 (opt-in reduced precision): fp8 tensorwise / rowwise / + CUDA graphs
#   data        loader-only and end-to-end img/s: the CIFAR-10 copy (GPU-resident and DataLoader) and a
#               224 px JPEG folder made by upscaling it (DataLoader with CPU decode vs GPU decode)
# Writes one JSON per run into OUT_DIR (maelab bench --json) and prints the tables.
# CIFAR10_TGZ (data part): tar czf .carry/cifar10.tgz -C ../shared/data cifar10
# SMOKE=1 runs every part on the CPU with tiny settings, to check this script without a GPU.
set -euo pipefail
part=${1:?usage: gpu_bench_suite.sh PART OUT_DIR [CIFAR10_TGZ]}
out=${2:?usage: gpu_bench_suite.sh PART OUT_DIR [CIFAR10_TGZ]}
tgz=${3:-}
mkdir -p "$out"
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"

if [ "${SMOKE:-0}" = 1 ]; then
  tiny="depth=2 decoder_depth=1 embed_dim=64 num_heads=2 decoder_embed_dim=32 decoder_num_heads=2"
  bench() { python -m maelab bench --device cpu --steps 2 --warmup 1 "$@" $tiny; }
  B=mae_vit_pico_patch4_32; L=mae_vit_pico_patch4_32; T4=mae_vit_pico_patch4_32; T2=mae_vit_pico_patch4_32
  b256=8; sweep_b=8,16; sweep_l=8; sweep_t=8,16; per_class=20; d224=64
else
  bench() { python -m maelab bench "$@"; }
  B=mae_vit_base_patch16; L=mae_vit_large_patch16; T4=mae_vit_tiny_patch4_32; T2=mae_vit_tiny_patch2_32
  b256=256; sweep_b=128,256,512,1024; sweep_l=64,128,256; sweep_t=256,512,1024; per_class=500; d224=224
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true

run_part() {
  case "$1" in
  tests)
    (cd "$root" && python -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.txt") ;;
  vitb)
    bench --model $B --batch-size $b256 \
      --variants eager,eager-foreach-adamw,eager-host-sync,compile,compile-cudagraphs \
      --json "$out/vitb_b256_ablations.json" ;;
  vitb-sweep)
    bench --model $B --batch-sizes $sweep_b --json "$out/vitb_sweep.json" ;;
  vitl)
    bench --model $L --batch-size $((b256 / 2)) --variants eager,compile-cudagraphs --json "$out/vitl_b128.json"
    bench --model $L --batch-sizes $sweep_l --json "$out/vitl_sweep.json" ;;
  tiny)
    for m in $T4 $T2; do
      bench --model $m --batch-sizes $sweep_t --no-reference --variants eager,compile-cudagraphs \
        --json "$out/${m}_sweep.json"
    done ;;
  fp8)
    bench --model $B --batch-size $b256 --variants fp8,fp8-rowwise,fp8-cudagraphs --json "$out/vitb_b256_fp8.json" ;;
  data)
    [ -n "$tgz" ] || { echo "the data part needs CIFAR10_TGZ" >&2; exit 2; }
    data=$(mktemp -d)
    tar xzf "$tgz" -C "$data"
    workers=$(( $(nproc) > 16 ? 16 : $(nproc) ))
    bench --model $T4 --batch-size $b256 --no-reference --data "$data/cifar10/train" --gpu-resident auto \
      --json "$out/data_cifar10_gpu_resident.json"
    bench --model $T4 --batch-size $b256 --no-reference --data "$data/cifar10/train" --gpu-resident off \
      --num-workers "$workers" --json "$out/data_cifar10_dataloader.json"
    python "$root/scripts/make_upscaled_jpeg_folder.py" "$data/cifar10/train" "$data/cifar10_224" \
      --size "$d224" --limit "$per_class"
    for decode in cpu gpu; do
      bench --model $B --batch-size $b256 --no-reference --data "$data/cifar10_224" --decode $decode \
        --num-workers "$workers" --json "$out/data_jpeg224_${decode}_decode.json" \
        $( [ "${SMOKE:-0}" = 1 ] && echo "img_size=$d224 patch_size=16" )
    done ;;
  *) echo "unknown part $1: tests, vitb, vitb-sweep, vitl, tiny, fp8, data or all" >&2; exit 2 ;;
  esac
}

if [ "$part" = all ]; then
  for p in tests vitb vitb-sweep vitl tiny fp8 data; do run_part $p; done
else
  run_part "$part"
fi
