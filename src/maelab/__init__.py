"""maelab: Masked Autoencoder (MAE) pre-training of Vision Transformers.

The model (see :func:`create_model` for a runnable example)::

    model = maelab.create_model("mae_vit_base_patch16", norm_pix_loss=True)
    out = model(imgs)                       # MAEOutput(loss, pred, mask)
    feats = model.forward_features(imgs)    # [B, 1 + L, D]

The commands as functions: every ``maelab <command>`` is a config dataclass plus one call, and
:func:`maelab.config.build_config` builds a config as the command line does (a YAML recipe and/or
dotted overrides). Pre-train a laptop-sized MAE on the built-in synthetic images, then evaluate it:

>>> import tempfile
>>> from maelab import PretrainConfig, build_config, pretrain
>>> from maelab.eval import FinetuneConfig, KnnConfig, LinprobeConfig, finetune, linprobe, run_knn
>>> tmp = tempfile.mkdtemp()
>>> data = {"name": "synthetic", "num_samples": 64, "num_classes": 4, "num_workers": 0}
>>> cfg = build_config(PretrainConfig, overrides={"model": "mae_vit_pico_patch4_32", "data": data,
...                                              "epochs": 1, "batch_size": 16, "output": f"{tmp}/run"})
>>> run = pretrain(cfg, progress=False)          # the run directory of `maelab pretrain`
>>> run.epoch, run.step, (run.output / "checkpoints" / "last.pt").exists()
(1, 4, True)
>>> knn = run_knn(build_config(KnnConfig, overrides={"checkpoint": str(run.output), "data": data, "k": 5,
...                                                  "output": f"{tmp}/knn"}), progress=False)
>>> sorted(knn.metrics)                          # also written to {tmp}/knn/eval.json
['k', 'temperature', 'top1']
>>> probe = linprobe(build_config(LinprobeConfig, overrides={"checkpoint": str(run.output), "data": data,
...                  "epochs": 1, "batch_size": 16, "output": f"{tmp}/probe"}), progress=False)
>>> 0 <= probe.metrics["top1"] <= 100
True
>>> tuned = finetune(build_config(FinetuneConfig, overrides={"checkpoint": str(run.output), "data": data,
...                  "epochs": 1, "batch_size": 16, "output": f"{tmp}/finetune"}), progress=False)
epoch 1: loss ..., val top-1 ...
>>> tuned.epoch, (tuned.output / "eval.json").exists()
(1, True)

:func:`maelab.eval.embed` writes the features of a folder of images (its docstring has an example).
"""

from typing import Any

from maelab.config import DataConfig, ModelConfig, PretrainConfig, build_config
from maelab.errors import CheckpointError, ConfigError, DataError, MaelabError
from maelab.models.mae import MAEOutput, MaskedAutoencoder
from maelab.models.masking import Masking, masking_from_noise, random_masking
from maelab.models.registry import create_model, get_config, list_models
from maelab.models.weights import export_encoder, load_exported_encoder, load_official_checkpoint

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataConfig",
    "DataError",
    "MAEOutput",
    "MaelabError",
    "Masking",
    "MaskedAutoencoder",
    "ModelConfig",
    "PretrainConfig",
    "build_config",
    "create_model",
    "export_encoder",
    "get_config",
    "list_models",
    "load_exported_encoder",
    "load_official_checkpoint",
    "masking_from_noise",
    "pretrain",
    "random_masking",
]


def __getattr__(name: str) -> Any:
    """``maelab.pretrain`` on first use: the training engine (data loaders, torchvision) is not imported with
    the model API."""
    if name == "pretrain":
        from maelab.engine.pretrain import pretrain

        return pretrain
    raise AttributeError(f"module 'maelab' has no attribute {name!r}")
