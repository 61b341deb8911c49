"""HiCMAE's own pre-training data loader (github.com/sunlicai/HiCMAE) as a peer of the data benchmark.

Nothing of HiCMAE is vendored: ``--hicmae-path`` / ``$HICMAE_PATH`` names a checkout, and this module
builds its pre-training dataset the way ``run_mae_pretraining_av.py`` does — ``datasets_av.
build_pretraining_dataset(args)``, i.e. ``kinetics_av.VideoMAE`` with decord (one decoder thread per
clip), a PIL ``GroupMultiScaleCrop`` to 160, ImageNet normalisation and the tube mask; audio read with
``torchaudio.load`` over the clip's span and turned into a 128-bin Kaldi fbank of 256 frames
(``torchaudio.compliance.kaldi``), plus its random audio mask — in a torch ``DataLoader`` (shuffled,
last batch dropped). The arguments are those of ``scripts/voxceleb2/audio_visual/hicmae_pretrain_base/
pretrain_base.sh`` at our geometry (16 frames, stride 4, 160 px, 256 x 128 fbank, masking ratios
0.9 / 0.8, ``--roll_mag_aug True``: a random roll and gain of the waveform).

HiCMAE reads a "setting" file of ``<video>.mp4 <label>`` lines and finds each clip's audio by
replacing ``.mp4`` with ``.wav``; :func:`write_setting` writes one for a manifest, with symbolic links
named that way (FFmpeg, inside decord, recognises the container from its content, so a WebM named
``.mp4`` still decodes as VP9).

What HiCMAE's code needs: decord, torchaudio (which reads audio through torchcodec from 2.9 on),
torchvision, opencv and Pillow — the ``hicmae`` extra. Its ``kinetics_av`` imports
``numpy.lib.function_base`` (numpy < 2) for a name it never uses; under numpy 2 :func:`load_dataset_module`
registers an empty stand-in for that module before importing. With a CPU build of torch, torchvision and
torchaudio must be CPU builds too (PyPI's wheels link CUDA libraries; PyTorch's CPU wheel index has them).

Differences in the work, none in HiCMAE's favour: it also draws the two masks per clip (cheap numpy),
and it crops multi-scale (VideoMAE's) rather than a random-resized crop + flip; it decodes only the
audio samples of the clip's span, which is about the length of the fbank window either way.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch

from benchmarks.hicmae_peer import PeerUnavailable
from dali_pipelines.manifest import Manifest
from dali_pipelines.spec import HICMAE_FBANK_MEAN, HICMAE_FBANK_STD, ClipSpec

MODULE = "datasets_av"
# HiCMAE's pre-training settings (its pretrain_base.sh and run_mae_pretraining_av.py)
VIDEO_MASK_RATIO = 0.9
AUDIO_MASK_RATIO = 0.8
PATCH = 16


def load_dataset_module(root: Path) -> types.ModuleType:
    """Import HiCMAE's ``datasets_av`` from the checkout at ``root``."""
    loaded = sys.modules.get(MODULE)
    if loaded is not None and Path(loaded.__file__ or "").resolve().parent != root:
        raise ValueError(f"a different {MODULE} is already imported from {loaded.__file__}")
    try:
        importlib.import_module("numpy.lib.function_base")
    except ImportError:  # numpy >= 2; kinetics_av imports `disp` from it and never calls it
        stand_in = types.ModuleType("numpy.lib.function_base")
        stand_in.disp = print
        sys.modules["numpy.lib.function_base"] = stand_in
    sys.path.insert(0, str(root))  # HiCMAE's files import each other as top-level modules
    try:
        return importlib.import_module(MODULE)
    except (ImportError, OSError, RuntimeError) as err:
        raise PeerUnavailable(f"cannot import {MODULE} from {root}: {type(err).__name__}: {err} (HiCMAE's data "
                              "code needs decord, torchaudio, torchvision, opencv: pip install .[hicmae])") from err
    finally:
        sys.path.remove(str(root))


def write_setting(manifest: Manifest, out_dir: Path) -> Path:
    """HiCMAE's setting file for ``manifest``: ``clip_NNNNN.mp4 <label>`` lines, links to each clip's video
    and its audio (``clip_NNNNN.wav``) in ``out_dir``. Unlabelled or regression rows get label 0 (the
    pre-training dataset reads but never uses it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for row, (clip, label) in enumerate(zip(manifest.clips, manifest.labels(), strict=True)):
        video, audio = out_dir / f"clip_{row:05d}.mp4", out_dir / f"clip_{row:05d}.wav"
        for link, target in ((video, clip.video), (audio, clip.audio)):
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(Path(target).resolve())
        value = int(label) if np.ndim(label) == 0 and int(label) >= 0 else 0
        lines.append(f"{video} {value}\n")
    setting = out_dir / "pretrain_setting.txt"  # no 'voxceleb2' in the name: that switches on a fixed crop
    setting.write_text("".join(lines))
    return setting


def pretraining_args(setting: Path, spec: ClipSpec) -> types.SimpleNamespace:
    """The ``args`` HiCMAE's ``build_pretraining_dataset`` reads, at ``spec``'s geometry."""
    return types.SimpleNamespace(
        data_path=str(setting), input_size=spec.image_size, num_frames=spec.num_frames,
        sampling_rate=spec.frame_stride, num_samples=1, no_augmentation=False,
        mask_type="tube", mask_ratio=VIDEO_MASK_RATIO,
        window_size=(spec.num_frames // 2, spec.image_size // PATCH, spec.image_size // PATCH),
        mask_type_audio="random", mask_ratio_audio=AUDIO_MASK_RATIO,
        window_size_audio=(spec.audio_frames // PATCH, spec.audio_bins // PATCH),
        audio_conf={"num_mel_bins": spec.audio_bins, "target_length": spec.audio_frames, "freqm": 0, "timem": 0,
                    "mean": HICMAE_FBANK_MEAN, "std": HICMAE_FBANK_STD, "noise": False, "mode": "train"},
        roll_mag_aug=True, audio_sample_rate=spec.sample_rate,  # pretrain_base.sh: --roll_mag_aug True
    )


def build_hicmae_loader(root: Path, manifest: Manifest, work_dir: Path, batch_size: int, num_workers: int,
                        spec: ClipSpec | None = None, seed: int = 0) -> torch.utils.data.DataLoader:
    """HiCMAE's pre-training dataset over ``manifest`` in a DataLoader as its script builds it, except
    ``persistent_workers`` (so a short benchmark epoch does not time worker start-up) and pinned memory
    only with CUDA. Yields HiCMAE's ``(video [B, 3, T, S, S], video mask, audio [B, 1, 256, 128], audio
    mask)``."""
    datasets_av = load_dataset_module(root)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # it prints its whole transform
        dataset = datasets_av.build_pretraining_dataset(pretraining_args(write_setting(manifest, work_dir),
                                                                         spec or ClipSpec()))
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, sampler=torch.utils.data.RandomSampler(dataset, generator=generator), batch_size=batch_size,
        num_workers=num_workers, pin_memory=torch.cuda.is_available(), drop_last=True,
        persistent_workers=num_workers > 0,
        # forked workers inherit HiCMAE's modules; spawned ones would re-import them without its path
        multiprocessing_context="fork" if num_workers > 0 else None)

