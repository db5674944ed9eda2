"""Evaluation of a pre-trained encoder: fine-tuning, linear probing / partial fine-tuning, kNN.

Each protocol is its own module on one shared frozen-feature builder (:mod:`.features`):

- :func:`finetune` (:mod:`.finetune`): timm ViT classifier, paper recipe;
- :func:`linprobe` (:mod:`.linprobe`): BN + linear head on frozen features (cached when
  nothing upstream changes), or the last ``train_blocks`` blocks tuned too;
- :func:`run_knn`, :func:`knn_monitor` (:mod:`.knn`): weighted kNN on frozen features;
- :func:`embed` (:mod:`.embed`): the frozen features of every image of a folder, written to a file.

Configs are in :mod:`.config`; :func:`maelab.eval.cli.add_eval_commands` adds the commands.
"""

from maelab.eval.classifier import (
    build_classifier,
    layer_decay_param_groups,
    set_trainable_blocks,
)
from maelab.eval.config import EmbedConfig, FinetuneConfig, KnnConfig, LinprobeConfig
from maelab.eval.embed import embed
from maelab.eval.features import extract_features, pool_tokens
from maelab.eval.finetune import finetune
from maelab.eval.knn import knn_accuracy, knn_monitor, knn_predict, run_knn
from maelab.eval.linprobe import LinearProbe, linprobe
from maelab.eval.metrics import evaluate_classifier

__all__ = [
    "EmbedConfig",
    "FinetuneConfig",
    "KnnConfig",
    "LinearProbe",
    "LinprobeConfig",
    "build_classifier",
    "embed",
    "evaluate_classifier",
    "extract_features",
    "finetune",
    "knn_accuracy",
    "knn_monitor",
    "knn_predict",
    "layer_decay_param_groups",
    "linprobe",
    "pool_tokens",
    "run_knn",
    "set_trainable_blocks",
]
