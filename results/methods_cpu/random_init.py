"""kNN and linear-probe baselines of randomly initialized pico encoders (the ViT, and the Swin with averaged
tokens), with the sweep's CPU-scale settings. Run from the repository root after the sweep:
    python results/methods_cpu/random_init.py runs/sweep_methods_cpu_v2
"""

import subprocess
import sys
from pathlib import Path

import torch

from maelab.config import to_dict
from maelab.methods import get_method, method_model_config, method_options

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/sweep_methods_cpu")
common = ["--data", "../shared/data/cifar10", "--no-progress", "data.max_samples=10000", "data.num_workers=2"]
for name, method, model, pool in (
    ("random_init", "mae", "mae_vit_pico_patch4_32", "cls"),
    ("random_init_swin", "simmim", "swin_pico_patch2_window4_32", "avg"),
):
    torch.manual_seed(0)
    m = get_method(method)
    net = m.build(method_model_config(m, model), method_options(m, {}))
    path = out / f"{name}.pt"
    state = {"model": net.state_dict(), "model_config": to_dict(net.cfg), "method": method, "step": 0}
    torch.save(state, path)
    run = ["--checkpoint", str(path), "--pool", pool, *common]
    subprocess.run(["maelab", "knn", "--config", "recipes/knn_cifar10_vit_tiny.yaml",
                    "--output", str(out / name / "knn"), "batch_size=256", *run], check=True)
    subprocess.run(["maelab", "linprobe", "--config", "recipes/linprobe_cifar10_vit_tiny.yaml",
                    "--output", str(out / name / "linprobe"), "epochs=20", "warmup_epochs=2", "batch_size=256", *run],
                   check=True)
