"""dali_pipelines: NVIDIA DALI audio-visual data loading for AVF-MAE++.

``build_loader(manifest, batch_size, train, options, **fields)`` (:class:`LoaderOptions`, e.g.
``device="gpu"|"cpu"``) yields ``{"video": [B, 3, 16, 160, 160], "audio": [B, 1, 256, 128], "label",
"index"}`` (the shapes of :class:`ClipSpec`, which owns the input geometry, see ``dali_pipelines.spec``)
from a CSV manifest (``video,audio,label``), with exact audio/video/label pairing, per-epoch shuffling,
sharding by rank and DeepSpeed-friendly last-batch handling. Also here: the manifest reader, a Kaldi-exact
fbank reference, a PyAV baseline loader (``dali_pipelines.baseline``), synthetic data (``python -m
dali_pipelines.synthetic``) and a transcoder to CPU-decodable VP9 (``python -m dali_pipelines.transcode``).
"""

import importlib
from typing import TYPE_CHECKING

# Every name is imported on first use from the module that owns it, so importing one light module (the
# sample spec, which avfmae.config takes its geometry from; the manifest tools, the transcoder and the
# synthetic data, python -m dali_pipelines.transcode / .synthetic) needs neither DALI nor PyAV/soundfile.
_OWNERS = {
    ".spec": ("AUDIO_MEAN", "AUDIO_STD", "HICMAE_FBANK_MEAN", "HICMAE_FBANK_STD", "IMAGENET_MEAN", "IMAGENET_STD",
              "MODEL_GEOMETRY", "ClipSpec", "EvalView", "LoaderOptions"),
    ".fbank": ("kaldi_fbank", "kaldi_mel_banks", "kaldi_window"),
    ".manifest": ("Clip", "Manifest", "ManifestError", "read_manifest", "write_manifest"),
    ".source": ("CPU_VIDEO_CODECS", "GPU_VIDEO_CODECS", "PAD_INDEX", "UnsupportedCodecError", "VideoInfo",
                "probe_video", "sample_frame_indices"),
    ".pipeline": ("AVLoader", "build_loader", "build_pipeline", "default_policy", "denormalize_video",
                  "normalize_fbank"),
    "nvidia.dali.plugin.base_iterator": ("LastBatchPolicy",),
}
_LAZY = {name: module for module, names in _OWNERS.items() for name in names}

if TYPE_CHECKING:
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy

    from .fbank import kaldi_fbank, kaldi_mel_banks, kaldi_window
    from .manifest import Clip, Manifest, ManifestError, read_manifest, write_manifest
    from .pipeline import AVLoader, build_loader, build_pipeline, default_policy, denormalize_video, normalize_fbank
    from .source import (
        CPU_VIDEO_CODECS,
        GPU_VIDEO_CODECS,
        PAD_INDEX,
        UnsupportedCodecError,
        VideoInfo,
        probe_video,
        sample_frame_indices,
    )
    from .spec import (
        AUDIO_MEAN,
        AUDIO_STD,
        HICMAE_FBANK_MEAN,
        HICMAE_FBANK_STD,
        IMAGENET_MEAN,
        IMAGENET_STD,
        MODEL_GEOMETRY,
        ClipSpec,
        EvalView,
        LoaderOptions,
    )


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = _LAZY[name]
    value = getattr(importlib.import_module(module, __name__ if module.startswith(".") else None), name)
    globals()[name] = value  # import once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "build_loader", "build_pipeline", "LoaderOptions", "AVLoader", "ClipSpec", "LastBatchPolicy", "default_policy",
    "read_manifest", "write_manifest", "Manifest", "Clip", "ManifestError",
    "AUDIO_MEAN", "AUDIO_STD", "HICMAE_FBANK_MEAN", "HICMAE_FBANK_STD", "IMAGENET_MEAN", "IMAGENET_STD",
    "denormalize_video", "normalize_fbank", "kaldi_fbank", "kaldi_mel_banks", "kaldi_window",
    "UnsupportedCodecError", "VideoInfo", "probe_video", "sample_frame_indices", "PAD_INDEX",
    "CPU_VIDEO_CODECS", "GPU_VIDEO_CODECS", "EvalView", "MODEL_GEOMETRY",
]
