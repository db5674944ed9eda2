"""kNN top-1 of a randomly initialised mae_vit_pico_patch4_32 encoder on the CIFAR-10 copy,
with exactly the monitoring setup of the pre-training run (10k evenly spaced train images, k=20, T=0.07)."""
import torch
from torch.utils.data import Subset
from maelab import create_model
from maelab.config import DataConfig
from maelab.data import build_dataset, default_stats, eval_transform
from maelab.eval.knn import knn_monitor
torch.manual_seed(0)
model = create_model("mae_vit_pico_patch4_32")
mean, std = default_stats(3)
tf = eval_transform(32, mean, std, 0.875)
kw = dict(img_size=32, in_chans=3, transform=tf, seed=0)
train = build_dataset(DataConfig(name="../shared/data/cifar10/train"), train=True, **kw)
val = build_dataset(DataConfig(name="../shared/data/cifar10/test"), train=False, **kw)
train = Subset(train, [int(i * len(train) / 10000) for i in range(10000)])
print("random-init kNN top-1:", knn_monitor(model, train, val, "cpu", k=20, T=0.07, batch_size=256, num_workers=2))
