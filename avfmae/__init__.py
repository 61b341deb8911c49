"""AVF-MAE++: audio-visual masked autoencoders for affective video facial analysis.

``build_model(size, task)`` builds the pre-training model, the fine-tuning classifier or the HiCMAE
baseline; configurations live in :mod:`avfmae.config`, mask generators in :mod:`avfmae.masking`,
evaluation metrics in :mod:`avfmae.metrics`.
"""

from .config import CONFIGS, ModelConfig, get_config
from .masking import PretrainMasks, sample_pretrain_masks
from .models import AVFMAEClassifier, AVFMAEPretrain, HiCMAEBaseline, build_model

__all__ = [
    "CONFIGS", "ModelConfig", "get_config", "PretrainMasks", "sample_pretrain_masks",
    "AVFMAEPretrain", "AVFMAEClassifier", "HiCMAEBaseline", "build_model",
]
