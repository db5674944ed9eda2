"""maelab: Masked Autoencoder (MAE) pre-training of Vision Transformers.

Public API::

    model = maelab.create_model("mae_vit_base_patch16", norm_pix_loss=True)
    out = model(imgs)                       # MAEOutput(loss, pred, mask)
    feats = model.forward_features(imgs)    # [B, 1 + L, D]
"""

from maelab.config import DataConfig, ModelConfig, PretrainConfig
from maelab.errors import CheckpointError, ConfigError, DataError, MaelabError
from maelab.models.mae import MAEOutput, MaskedAutoencoder
from maelab.models.masking import Masking, masking_from_noise, random_masking
from maelab.models.registry import create_model, get_config, list_models
from maelab.models.weights import export_encoder, load_exported_encoder, load_official_checkpoint

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "DataConfig", "DataError", "MAEOutput", "MaelabError", "Masking",
    "MaskedAutoencoder", "ModelConfig", "PretrainConfig", "create_model", "export_encoder", "get_config",
    "list_models", "load_exported_encoder", "load_official_checkpoint", "masking_from_noise", "random_masking",
]
