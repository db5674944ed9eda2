"""kNN and linear-probe baseline of a randomly initialized pico encoder, with the sweep's CPU-scale settings."""
import subprocess, sys, torch
from maelab.config import to_dict
from maelab.models.registry import create_model

torch.manual_seed(0)
model = create_model("mae_vit_pico_patch4_32")
path = "runs/sweep_methods_cpu/random_init.pt"
torch.save({"model": model.state_dict(), "model_config": to_dict(model.cfg), "step": 0}, path)
common = ["--data", "../shared/data/cifar10", "--no-progress", "data.max_samples=10000", "data.num_workers=2"]
subprocess.run(["maelab", "knn", "--checkpoint", path, "--config", "recipes/knn_cifar10_vit_tiny.yaml",
                "--output", "runs/sweep_methods_cpu/random_init/knn", "batch_size=256", *common], check=True)
subprocess.run(["maelab", "linprobe", "--checkpoint", path, "--config", "recipes/linprobe_cifar10_vit_tiny.yaml",
                "--output", "runs/sweep_methods_cpu/random_init/linprobe", "epochs=20", "warmup_epochs=2",
                "batch_size=256", *common], check=True)
