"""AVF-MAE++ models: pre-training, fine-tuning, and the HiCMAE baseline; ``build_model``.

Pre-training reads as the paper's pipeline (Fig. 2a):

    mask -> encode (LGI-Former per modality) -> fuse (IAV-CL on visible tokens)
         -> assemble + decode (dual masking) -> loss (eq. 1)

Fine-tuning: both encoders on all tokens; region tokens of every layer feed IAV-CL (eq. 8 ff.);
pooled fused features -> LayerNorm -> linear head (cross-entropy or MSE). ``video_only`` drops the
audio branch (micro-expression datasets have no audio): layer-weighted region tokens of the video
encoder, mean over regions, LayerNorm, head.

All three models share the training helpers of :class:`TrainingMixin`: ``no_weight_decay()``,
``layer_id(name)``, ``param_groups(weight_decay, layer_decay)`` and
``set_activation_checkpointing(enabled, fn=None)``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import ModelConfig, get_config
from .decoder import Decoder
from .embed import patchify_audio, patchify_video
from .hicmae import HiCMAEFusion, ViTEncoder
from .iavcl import IAVCL, merge_split_gates
from .layers import LayerNorm, LearnedTokens
from .lgi_former import EncoderOutput, LGIEncoder
from .losses import hcmcl_loss, reconstruction_loss
from .masking import PretrainMasks, complement, contains, sample_pretrain_masks

ENCODER_PREFIXES = ("video_encoder.", "audio_encoder.")
CLASSIFIER_PREFIXES = ("video_layer_weights.", "audio_layer_weights.", "fc_norm.")  # PSI carries them over
_LAYER = re.compile(r"^(?:video|audio)_encoder\.layers\.(\d+)\.")
# cross-modal fusion layers that take part in layer-wise lr decay (IAV-CL's DiER units, HiCMAE's blocks)
_FUSION_LAYER = re.compile(r"^fusion\.(?:units|video_blocks|audio_blocks)\.(\d+)\.")


# --- shared helpers ---------------------------------------------------------------------------------


def _full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's logical shape, also under ZeRO-3 (whose partitioned parameters hold an empty [0])."""
    return getattr(p, "ds_shape", p.shape)


class TrainingMixin:
    """Optimizer and memory helpers shared by every model (timm / BEiT conventions)."""

    cfg: ModelConfig

    def no_weight_decay(self) -> set[str]:
        """Names of parameters trained without weight decay: biases, norm weights, every other 1-D
        parameter (mask tokens, layer weights) and the region tokens."""
        return {name for name, p in self.named_parameters()  # type: ignore[attr-defined]
                if len(_full_shape(p)) <= 1 or name.endswith("region_tokens.weight")}

    @property
    def num_fusion_layers(self) -> int:
        """Fusion layers in the layer-decay chain: the model's fusion depth, 0 without a fusion module."""
        return self.cfg.fusion_depth if isinstance(getattr(self, "fusion", None), nn.Module) else 0

    @property
    def num_layer_ids(self) -> int:
        """Layer ids run from 0 (embeddings) to depth + fusion layers + 1 (everything else)."""
        return self.cfg.depth + self.num_fusion_layers + 2

    def layer_id(self, name: str) -> int:
        """Layer-wise lr decay id of a parameter, as the reference assigns them (AVF-MAE
        ``optim_factory.get_num_layer_for_avit`` with ``get_num_layers() = depth + fusion_depth``):
        0 for the encoders' embeddings; i + 1 for encoder layer i (both modalities share ids);
        depth + j + 1 for fusion layer j (DiER unit j, or HiCMAE's fusion block j); the top id for the
        rest (region tokens, encoder norms, ER layer, HAFE, layer weights, fc_norm, head), whose lr is
        not decayed."""
        match = _LAYER.match(name)
        if match:
            return int(match.group(1)) + 1
        match = _FUSION_LAYER.match(name)
        if match and self.num_fusion_layers:
            return self.cfg.depth + int(match.group(1)) + 1
        if name.startswith(ENCODER_PREFIXES) and ".embed." in name:
            return 0
        return self.num_layer_ids - 1

    def param_groups(self, weight_decay: float, layer_decay: float = 1.0) -> list[dict[str, Any]]:
        """Optimizer parameter groups: ``{"params", "weight_decay", "lr_scale", "name"}``.

        Parameters in ``no_weight_decay()`` get weight decay 0; ``lr_scale`` is
        ``layer_decay ** (num_layer_ids - 1 - layer_id)`` (1.0 everywhere when layer_decay is 1). The
        training loop multiplies its learning rate by ``lr_scale`` per group.
        """
        if not 0 < layer_decay <= 1:
            raise ValueError(f"layer_decay must lie in (0, 1], got {layer_decay}")
        skip = self.no_weight_decay()
        top = self.num_layer_ids - 1
        groups: dict[str, dict[str, Any]] = {}
        for name, p in self.named_parameters():  # type: ignore[attr-defined]
            if not p.requires_grad:
                continue
            decay = 0.0 if name in skip else weight_decay
            lid = self.layer_id(name) if layer_decay < 1 else top
            key = f"layer{lid}_{'no_decay' if decay == 0 else 'decay'}"
            group = groups.setdefault(key, {"params": [], "weight_decay": decay,
                                            "lr_scale": layer_decay ** (top - lid), "name": key})
            group["params"].append(p)
        return list(groups.values())

    def set_activation_checkpointing(self, enabled: bool = True, fn: Callable[..., Any] | None = None) -> None:
        """Checkpoint every encoder layer and decoder block (reentrant mode; ``fn`` may be
        ``deepspeed.checkpointing.checkpoint``)."""
        for module in self.modules():  # type: ignore[attr-defined]
            if hasattr(module, "checkpoint_activations"):
                module.checkpoint_activations = enabled
                module.checkpoint_fn = fn


def _check_input(name: str, t: object, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape) + 1 or tuple(t.shape[1:]) != shape:
        raise ValueError(f"{name} must have shape [B, {', '.join(map(str, shape))}], got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    return t


def _check_audio(audio: object, cfg: ModelConfig, batch: int) -> torch.Tensor:
    """audio [B, 1, T_a, F] as configured, with the video's batch size."""
    _check_input("audio", audio, (1, cfg.audio_frames, cfg.audio_bins))
    if audio.shape[0] != batch:
        raise ValueError(f"video and audio must share the batch size, got {batch} and {audio.shape[0]}")
    return audio


def _check_masks(masks: object, batch: int) -> PretrainMasks:
    if not isinstance(masks, PretrainMasks):
        raise TypeError(f"masks must be a PretrainMasks (see avfmae.masking), got {type(masks).__name__}")
    for f in dataclasses.fields(masks):
        t = getattr(masks, f.name)
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != batch or t.dtype != torch.int64:
            raise ValueError(f"masks.{f.name} must be an int64 tensor [B={batch}, M], got "
                             f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
    return masks


def build_fusion(cfg: ModelConfig) -> nn.Module:
    """The cross-modal fusion module ``cfg.fusion`` names: IAV-CL (and Table 5's variants without DiER
    units or without HAFE) or HiCMAE's fusion encoder; stochastic depth at ``cfg.drop_path``."""
    args = (cfg.embed_dim, cfg.num_heads, cfg.fusion_depth, cfg.mlp_ratio, cfg.qkv_bias, cfg.norm_eps)
    if cfg.fusion == "hicmae":
        return HiCMAEFusion(*args, drop_path=cfg.drop_path)
    return IAVCL(*args, drop_path=cfg.drop_path, dier=cfg.fusion != "iavcl_no_dier",
                 hafe=cfg.fusion != "iavcl_no_hafe")


class _PretrainBase(TrainingMixin, nn.Module):
    """Shared pre-training pipeline; subclasses choose encoders, fusion and masks."""

    cfg: ModelConfig

    def _build_decoders(self, cfg: ModelConfig) -> None:
        def decoder(num_tokens: int, out_dim: int) -> Decoder:
            return Decoder(cfg.embed_dim, cfg.decoder_dim, cfg.decoder_heads, cfg.decoder_depth, num_tokens,
                           out_dim, cfg.mlp_ratio, cfg.qkv_bias, cfg.norm_eps, cfg.checkpoint_activations)

        self.video_decoder = decoder(cfg.num_video_tokens, cfg.video_patch_dim)
        self.audio_decoder = decoder(cfg.num_audio_tokens, cfg.audio_patch_dim)

    def check_inputs(self, video: torch.Tensor, audio: torch.Tensor) -> None:
        """Raise ValueError/TypeError unless video is [B, 3, T, H, W] and audio [B, 1, T_a, F] as configured."""
        c = self.cfg
        _check_input("video", video, (3, c.num_frames, c.image_size, c.image_size))
        _check_audio(audio, c, video.shape[0])

    def sample_masks(self, batch: int, device: torch.device | str,
                     generator: torch.Generator | None = None) -> PretrainMasks:
        """Fresh encoder/decoder masks for a batch (global RNG when no generator is given)."""
        return sample_pretrain_masks(self.cfg, batch, generator, device)

    def encode(self, video: torch.Tensor, audio: torch.Tensor,
               masks: PretrainMasks) -> tuple[EncoderOutput, EncoderOutput]:
        layers = self.cfg.hcmcl_layers
        return (self.video_encoder(video, masks.video_visible, hidden_layers=layers),
                self.audio_encoder(audio, masks.audio_visible, hidden_layers=layers))

    def fuse(self, v: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-modal fusion of the visible tokens [B, Mv, C], [B, Ma, C] (region-major).

        IAV-CL's F_av^0 is cat(per-region mean of the visible video tokens, the same for audio):
        [B, K, 2C], K rows as in fine-tuning (eq. 8). The reference code uses one row, the global
        means; K rows keep the ER layer's BatchNorm defined at micro-batch 1 and give it the same
        statistics layout as in fine-tuning.
        """
        if isinstance(self.fusion, IAVCL):
            K_v, K_a = self.cfg.num_video_regions, self.cfg.num_audio_regions  # equal: ModelConfig's rule
            f_av = torch.cat([rearrange(v, "b (k z) c -> b k z c", k=K_v).mean(dim=2),
                              rearrange(a, "b (k z) c -> b k z c", k=K_a).mean(dim=2)], dim=-1)  # [B, K, 2C]
            return self.fusion(v, a, f_av)
        return self.fusion(v, a)

    def decoder_targets(self, masks: PretrainMasks) -> PretrainMasks:
        return masks

    def loss(self, video: torch.Tensor, audio: torch.Tensor, masks: PretrainMasks, pred_v: torch.Tensor,
             pred_a: torch.Tensor, v: EncoderOutput, a: EncoderOutput) -> dict[str, torch.Tensor]:
        """Eq. 1: MSE_v + MSE_a + lambda * HCMCL, each term returned too (fp32 scalars)."""
        c = self.cfg
        valid_v = ~contains(masks.video_visible, masks.video_decode, c.num_video_tokens)
        valid_a = ~contains(masks.audio_visible, masks.audio_decode, c.num_audio_tokens)
        loss_v = reconstruction_loss(pred_v, patchify_video(video, c.tubelet, c.patch_size), masks.video_decode,
                                     valid_v, norm_groups=3,
                                     frame_diff_tubelet=c.tubelet if c.frame_diff_target else None)
        loss_a = reconstruction_loss(pred_a, patchify_audio(audio, c.audio_patch), masks.audio_decode, valid_a)
        loss_c = hcmcl_loss(v.hidden, a.hidden, c.temperature)
        return {"loss": loss_v + loss_a + c.hcmcl_weight * loss_c, "loss_video": loss_v,
                "loss_audio": loss_a, "loss_hcmcl": loss_c}

    def forward(self, video: torch.Tensor, audio: torch.Tensor, masks: PretrainMasks | None = None,
                return_predictions: bool = False) -> dict[str, Any]:
        """One pre-training step's forward pass.

        Args:
            video: [B, 3, T, H, W] normalised frames; audio: [B, 1, T_a, F] normalised fbank.
            masks: index tensors from :func:`avfmae.masking.sample_pretrain_masks` (drawn here with
                the global RNG when None).
            return_predictions: also return ``pred_video`` [B, Dv, 3*t*p*p], ``pred_audio``
                [B, Da, p*p] (normalised-patch space) and ``masks`` (whose ``*_decode`` rows say which
                patch each prediction reconstructs) — see :func:`avfmae.embed.fill_predictions`.

        Returns:
            dict with ``loss`` (the total, eq. 1), ``loss_video``, ``loss_audio``, ``loss_hcmcl``.
        """
        self.check_inputs(video, audio)
        B = video.shape[0]
        masks = self.sample_masks(B, video.device) if masks is None else _check_masks(masks, B)
        masks = self.decoder_targets(masks)
        v, a = self.encode(video, audio, masks)                               # [B, M, C] each
        fused_v, fused_a = self.fuse(v.tokens, a.tokens)
        pred_v = self.video_decoder(fused_v, v.order, masks.video_decode, v.hidden)   # [B, Dv, P_v]
        pred_a = self.audio_decoder(fused_a, a.order, masks.audio_decode, a.hidden)   # [B, Da, P_a]
        out: dict[str, Any] = self.loss(video, audio, masks, pred_v, pred_a, v, a)
        if return_predictions:
            out.update(pred_video=pred_v, pred_audio=pred_a, masks=masks)
        return out


# --- models -----------------------------------------------------------------------------------------


class AVFMAEPretrain(_PretrainBase):
    """AVF-MAE++ pre-training model: region-aware encoder masks + dual masking, LGI-Former encoders,
    IAV-CL fusion on the visible tokens (``cfg.fusion="hicmae"``: HiCMAE's fusion, Table 4's
    ablation model), hierarchical decoders predicting only decoder-visible tokens."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.video_encoder = LGIEncoder(cfg, "video")
        self.audio_encoder = LGIEncoder(cfg, "audio")
        self.fusion = build_fusion(cfg)
        self._build_decoders(cfg)


class HiCMAEBaseline(_PretrainBase):
    """HiCMAE pre-training model on the same code path: vanilla ViT encoders, encoder-only masking
    (the decoder gets a mask token at *every* encoder-masked position, N tokens in all), HiCMAE's
    fusion encoder, the same hierarchical decoders and losses.

    Masks: the encoder uses ``masks.*_visible`` (the same region-aware generators as AVF-MAE++, so
    the two models see identical token counts — 80 video / 24 audio at the defaults; HiCMAE's own
    audio ratio of 0.8 would keep 25.6); ``masks.*_decode`` is replaced by the complement of the
    visible set.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.video_encoder = ViTEncoder(cfg, "video")
        self.audio_encoder = ViTEncoder(cfg, "audio")
        self.fusion = build_fusion(dataclasses.replace(cfg, fusion="hicmae"))  # whatever cfg.fusion says
        self._build_decoders(cfg)

    def decoder_targets(self, masks: PretrainMasks) -> PretrainMasks:
        return dataclasses.replace(
            masks, video_decode=complement(masks.video_visible, self.cfg.num_video_tokens),
            audio_decode=complement(masks.audio_visible, self.cfg.num_audio_tokens))


class AVFMAEClassifier(TrainingMixin, nn.Module):
    """AVF-MAE++ fine-tuning model (classification or regression).

    Region tokens of every encoder layer, normalised by the encoder's final LayerNorm, form
    F_m [B, K, L, C]. F_av^0 = cat(sum_l a^v_l F_v^l, sum_l a^a_l F_a^l) with softmax layer
    weights (eq. 8; video first), F_m^1 = mean over layers (DESIGN), then IAV-CL, mean over the K
    regions, concat, LayerNorm(2C), linear head.
    """

    def __init__(self, cfg: ModelConfig, num_outputs: int, regression: bool = False,
                 video_only: bool = False, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not isinstance(num_outputs, int) or num_outputs < 1:
            raise ValueError(f"num_outputs must be a positive integer, got {num_outputs!r}")
        self.cfg = cfg
        self.num_outputs = num_outputs
        self.regression = regression
        self.video_only = video_only
        self.label_smoothing = label_smoothing
        C = cfg.embed_dim
        # F_av^0 (eq. 8, the layer-weighted sums) feeds IAV-CL's ER/HAFE; Table 5's variants without HAFE
        # (and HiCMAE's fusion) never read it, so they have no layer weights
        self.reads_layer_weights = video_only or cfg.fusion in ("iavcl", "iavcl_no_dier")
        self.video_encoder = LGIEncoder(cfg, "video")
        if self.reads_layer_weights:
            self.video_layer_weights = LearnedTokens(cfg.depth, fill=1.0 / cfg.depth)
        if not video_only:
            self.audio_encoder = LGIEncoder(cfg, "audio")
            if self.reads_layer_weights:
                self.audio_layer_weights = LearnedTokens(cfg.depth, fill=1.0 / cfg.depth)
            self.fusion = build_fusion(cfg)
        features = C if video_only else 2 * C
        self.fc_norm = LayerNorm(features, cfg.norm_eps)
        self.head = _Head(features, num_outputs)

    def forward(self, video: torch.Tensor, audio: torch.Tensor | None = None) -> torch.Tensor:
        """video [B, 3, T, H, W] (and audio [B, 1, T_a, F] unless video-only) -> [B, num_outputs]."""
        c = self.cfg
        _check_input("video", video, (3, c.num_frames, c.image_size, c.image_size))
        if self.video_only and audio is not None:
            raise ValueError("this classifier is video-only; pass audio=None")
        if not self.video_only:
            if audio is None:
                raise ValueError("audio is required by the audio-visual classifier (build it with "
                                 "video_only=True for video-only datasets)")
            _check_audio(audio, c, video.shape[0])
        f_v = self.video_encoder(video, return_regions=True).regions                  # [B, K, L, C]
        if self.video_only:
            w_v = torch.softmax(self.video_layer_weights(), dim=0).to(f_v.dtype)
            feature = torch.einsum("bklc,l->bkc", f_v, w_v).mean(dim=1)                # [B, C]
            return self.head(self.fc_norm(feature))
        f_a = self.audio_encoder(audio, return_regions=True).regions                  # [B, K, L, C]
        if not self.reads_layer_weights:  # Table 5 rows without HAFE: no F_av
            args = () if isinstance(self.fusion, HiCMAEFusion) else (None,)
            f4_v, f4_a = self.fusion(f_v.mean(dim=2), f_a.mean(dim=2), *args)         # [B, K, C] each
        else:
            w_v = torch.softmax(self.video_layer_weights(), dim=0).to(f_v.dtype)
            w_a = torch.softmax(self.audio_layer_weights(), dim=0).to(f_a.dtype)
            f_av = torch.cat([torch.einsum("bklc,l->bkc", f_v, w_v),
                              torch.einsum("bklc,l->bkc", f_a, w_a)], dim=-1)         # [B, K, 2C] eq. 8
            f4_v, f4_a = self.fusion(f_v.mean(dim=2), f_a.mean(dim=2), f_av)         # [B, K, C] each
        feature = torch.cat([f4_v.mean(dim=1), f4_a.mean(dim=1)], dim=-1)            # [B, 2C]
        return self.head(self.fc_norm(feature))

    def compute_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against class indices [B] (with the model's label smoothing) or soft targets
        [B, classes] used as given, or, for regression, MSE against float targets [B, num_outputs].

        Soft targets (mixup/CutMix, ``avfmae.mixup``) already carry their label smoothing, so smoothing
        them again here would apply it twice."""
        if self.regression:
            return F.mse_loss(output.float(), target.float().reshape(output.shape))
        if target.is_floating_point():
            if target.shape != output.shape:
                raise ValueError(f"target: soft targets need the logits' shape {tuple(output.shape)}, "
                                 f"got {tuple(target.shape)}")
            return F.cross_entropy(output.float(), target.float())
        return F.cross_entropy(output.float(), target, label_smoothing=self.label_smoothing)

    def load_pretrained_encoders(self, state_dict: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Load a pre-training checkpoint, or a classifier's (PSI: post-pre-training -> fine-tuning).

        Accepts a plain state dict or one wrapped as ``{"model": ...}`` / ``{"module": ...}``, with
        or without a ``module.`` prefix. Encoder and fusion weights (``video_encoder.``,
        ``audio_encoder.``, ``fusion.``) must fit; a classifier's layer weights and ``fc_norm`` are
        loaded too when their shapes fit (the reference's fine-tuning loads everything but a head of a
        different shape; we never load the head, whose classes differ between PSI stages). Decoders of
        a pre-training source are ignored.

        Returns:
            (missing, unexpected): this model's parameters/buffers that were not loaded (head, and
            from a pre-training source the layer weights and fc_norm), and source keys under the
            encoder/fusion prefixes this model lacks.
        Raises:
            ValueError on a shape mismatch of an encoder or fusion weight, naming the key.
        """
        selected = pretrained_encoder_state(state_dict)
        own = self.state_dict()
        unexpected = sorted(k for k in selected if k not in own)
        loadable = {k: v for k, v in selected.items() if k in own}
        for k, v in loadable.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"shape mismatch for {k}: checkpoint {tuple(v.shape)}, model "
                                 f"{tuple(own[k].shape)} (different model size or geometry?)")
        # a classifier's own trained parts (not the head); skipped when the shapes differ (video-only)
        source = unwrapped_state(state_dict)
        loadable.update({k: v for k, v in source.items() if k.startswith(CLASSIFIER_PREFIXES) and k in own
                         and tuple(v.shape) == tuple(own[k].shape)})
        self.load_state_dict(loadable, strict=False)
        return sorted(k for k in own if k not in loadable), unexpected


def unwrapped_state(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's state dict unwrapped from ``{"model"|"module"|"state_dict": ...}``, ``module.`` dropped,
    DiER gates written as two Linears (older checkpoints) merged into today's ``gates``."""
    for wrapper in ("model", "module", "state_dict"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
            state_dict = state_dict[wrapper]
    return merge_split_gates({str(k).removeprefix("module."): v for k, v in state_dict.items()})


def pretrained_encoder_state(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The encoder and fusion entries of a checkpoint (what :meth:`AVFMAEClassifier.load_pretrained_encoders`
    requires to fit), unwrapped as :func:`unwrapped_state`."""
    return {k: v for k, v in unwrapped_state(state_dict).items() if k.startswith(ENCODER_PREFIXES + ("fusion.",))}


class _Head(nn.Linear):
    """Classifier/regressor head: truncated-normal weights (std 0.02), zero bias."""

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=0.02, a=-0.02, b=0.02)
        nn.init.zeros_(self.bias)


# --- factory ----------------------------------------------------------------------------------------

TASKS = ("pretrain", "finetune", "hicmae_pretrain")


def build_model(size: str, task: str = "pretrain", num_outputs: int | None = None, regression: bool = False,
                video_only: bool = False, label_smoothing: float = 0.0, **overrides: Any) -> nn.Module:
    """Build an AVF-MAE++ model (or the HiCMAE baseline) of a named size.

    Args:
        size: "tiny", "base", "large" or "huge".
        task: "pretrain" (:class:`AVFMAEPretrain`), "finetune" (:class:`AVFMAEClassifier`) or
            "hicmae_pretrain" (:class:`HiCMAEBaseline`).
        num_outputs: classes (or regression targets); required for "finetune".
        regression: fine-tune with MSE instead of cross-entropy.
        video_only: fine-tune on video alone (micro-expression datasets).
        label_smoothing: cross-entropy label smoothing of the classifier.
        **overrides: :class:`ModelConfig` fields to replace (e.g. ``image_size=64``,
            ``checkpoint_activations=True``). Fine-tuning defaults to ``drop_path=0.1``.

    Raises:
        ValueError: unknown size, task or config field, or an inconsistent configuration.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if task == "finetune":
        cfg = get_config(size, **{"drop_path": 0.1, **overrides})
        if num_outputs is None:
            raise ValueError("num_outputs is required for task='finetune'")
        return AVFMAEClassifier(cfg, num_outputs, regression, video_only, label_smoothing)
    if num_outputs is not None or regression or video_only:
        raise ValueError(f"num_outputs/regression/video_only apply to task='finetune' only, not {task!r}")
    cfg = get_config(size, **overrides)
    return AVFMAEPretrain(cfg) if task == "pretrain" else HiCMAEBaseline(cfg)
