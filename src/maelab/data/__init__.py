"""Datasets and per-sample transforms.

``build_dataset(cfg.data, img_size=..., in_chans=..., train=..., transform=...)`` gives a
dataset of ``(float tensor [C, H, W], int label)`` items (label -1: unlabeled) from the
built-in synthetic shapes, CIFAR-10/100, STL-10, or an image folder; ``dataset_info``
says how many classes it has and whether it is labeled. Pre-training's data path (the set,
its sampler and a batch loader on the device) comes from
:func:`maelab.data.pipeline.build_training_data`.
"""

from maelab.data.build import build_dataset, dataset_info
from maelab.data.folders import IMG_EXTENSIONS, ImageFolderDataset
from maelab.data.images import load_image
from maelab.data.synthetic import SyntheticShapes
from maelab.data.transforms import default_stats, eval_transform, pretrain_transform

__all__ = [
    "IMG_EXTENSIONS",
    "ImageFolderDataset",
    "SyntheticShapes",
    "build_dataset",
    "dataset_info",
    "default_stats",
    "eval_transform",
    "load_image",
    "pretrain_transform",
]
