"""HiCMAE's own pre-training model (github.com/sunlicai/HiCMAE) as a timing peer.

Nothing of HiCMAE is vendored: ``--hicmae-path`` / ``$HICMAE_PATH`` names a checkout, and this module
imports ``modeling_pretrain_av.PretrainAudioVisionTransformer`` from it, builds it at one of our
configurations (the keyword arguments its ``pretrain_hicmae_dim512_patch16_160_a256`` factory and
``scripts/.../pretrain_base.sh`` use at base) and wraps one training step the way HiCMAE's
``engine_for_pretraining_av.train_one_epoch`` does: per-patch normalised targets of the masked patches
(built without grad inside the step), MSE on video and on audio, plus the HCMCL cross-entropy of every
intermediate layer pair weighted by ``cfg.hcmcl_weight``.

HiCMAE's code imports timm (it pins 0.4.12; later releases keep ``timm.models.layers`` and
``timm.models.registry`` as aliases) and einops. Deliberate differences, none of which changes the
amount of work: bf16 autocast like every other case (HiCMAE trains with fp16 autocast and a
GradScaler); the targets use our channel-major patch layout, without HiCMAE's ImageNet
un-normalisation.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from mae_kernels import indices_to_mask
from mae_kernels.masked_mse_loss import normalise_patches
from torch import nn

from avfmae.config import ModelConfig
from avfmae.embed import patchify_audio, patchify_video
from avfmae.masking import PretrainMasks

MODULE = "modeling_pretrain_av"
CLASS = "PretrainAudioVisionTransformer"
HICMAE_FRAMES = 16  # HiCMAE's pre-training encoder builds its video patch embedding for 16 frames


class PeerUnavailable(RuntimeError):
    """The checkout exists but cannot be imported here (usually: timm is not installed)."""


def resolve_checkout(path: str | os.PathLike | None) -> Path | None:
    """The HiCMAE checkout at ``path`` (None/empty: no peer). Raises ValueError when it is not one."""
    if path is None or str(path).strip() == "":
        return None
    root = Path(path).expanduser()
    if not (root / f"{MODULE}.py").is_file():
        raise ValueError(f"--hicmae-path / $HICMAE_PATH: {str(root)!r} is not a HiCMAE checkout "
                         f"(no {MODULE}.py there); clone https://github.com/sunlicai/HiCMAE")
    return root.resolve()


def load_model_class(root: Path) -> type[nn.Module]:
    """Import HiCMAE's pre-training model class from the checkout at ``root``."""
    loaded = sys.modules.get(MODULE)
    if loaded is not None and Path(loaded.__file__ or "").resolve().parent != root:
        raise ValueError(f"a different {MODULE} is already imported from {loaded.__file__}")
    # HiCMAE's files import each other as top-level modules; the path is only needed while importing
    sys.path.insert(0, str(root))
    try:
        module = importlib.import_module(MODULE)
    except ImportError as err:
        raise PeerUnavailable(f"cannot import {MODULE} from {root}: {err} (HiCMAE's code needs timm and "
                              f"einops: pip install timm)") from err
    finally:
        sys.path.remove(str(root))
    return getattr(module, CLASS)


def model_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """HiCMAE constructor arguments for our configuration (same widths, depths, heads and geometry)."""
    if cfg.num_frames != HICMAE_FRAMES:
        raise ValueError(f"cfg.num_frames must be {HICMAE_FRAMES} for HiCMAE's own model, got {cfg.num_frames}")
    audio = {"encoder_embed_dim_audio": cfg.embed_dim, "encoder_depth_audio": cfg.depth,
             "encoder_num_heads_audio": cfg.num_heads, "decoder_num_classes_audio": cfg.audio_patch_dim,
             "decoder_embed_dim_audio": cfg.decoder_dim, "decoder_depth_audio": cfg.decoder_depth,
             "decoder_num_heads_audio": cfg.decoder_heads, "img_size_audio": (cfg.audio_frames, cfg.audio_bins),
             "patch_size_audio": cfg.audio_patch}
    return {"img_size": cfg.image_size, "patch_size": cfg.patch_size, "tubelet_size": cfg.tubelet,
            "encoder_embed_dim": cfg.embed_dim, "encoder_depth": cfg.depth, "encoder_num_heads": cfg.num_heads,
            "decoder_num_classes": cfg.video_patch_dim, "decoder_embed_dim": cfg.decoder_dim,
            "decoder_depth": cfg.decoder_depth, "decoder_num_heads": cfg.decoder_heads,
            "mlp_ratio": cfg.mlp_ratio, "qkv_bias": cfg.qkv_bias,
            "norm_layer": partial(nn.LayerNorm, eps=cfg.norm_eps), "init_values": 0.0,
            "encoder_fusion_depth": cfg.fusion_depth, "encoder_fusion_num_heads": cfg.num_heads,
            "inter_contrastive_temperature": cfg.temperature,
            "return_intermediate_features": tuple(cfg.hcmcl_layers), **audio}


def build_model(root: Path, cfg: ModelConfig) -> nn.Module:
    """HiCMAE's pre-training model from the checkout at ``root``, sized like ``cfg``."""
    return load_model_class(root)(**model_kwargs(cfg))


def masked_positions(visible: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """bool [B, N], True where a token is masked (HiCMAE's ``bool_masked_pos``) for visible [B, M]."""
    return ~indices_to_mask(visible, num_tokens)


def make_loss_fn(model: nn.Module, cfg: ModelConfig, video: torch.Tensor, audio: torch.Tensor,
                 masks: PretrainMasks) -> Callable[[], torch.Tensor]:
    """A closure computing one step's training loss with HiCMAE's model, as its engine does."""
    B = video.shape[0]
    mask_v = masked_positions(masks.video_visible, cfg.num_video_tokens)
    mask_a = masked_positions(masks.audio_visible, cfg.num_audio_tokens)
    labels = torch.arange(B, device=video.device)

    def loss_fn() -> torch.Tensor:
        with torch.no_grad():  # HiCMAE builds its targets inside every step
            target_v = normalise_patches(patchify_video(video, cfg.tubelet, cfg.patch_size), 3)[mask_v]
            target_a = normalise_patches(patchify_audio(audio, cfg.audio_patch))[mask_a]
        pred_v, pred_a, logits_v, logits_a = model(video, mask_v, audio, mask_a)
        loss = (F.mse_loss(pred_v.float().flatten(0, 1), target_v)
                + F.mse_loss(pred_a.float().flatten(0, 1), target_a))
        hcmcl = sum(0.5 * (F.cross_entropy(lv.float(), labels) + F.cross_entropy(la.float(), labels))
                    for lv, la in zip(logits_v, logits_a))
        return loss + cfg.hcmcl_weight * hcmcl

    return loss_fn
