"""The conventional loader the DALI pipeline is measured against: PyAV + torch in DataLoader workers.

It does the same work per clip as :mod:`dali_pipelines.pipeline` — read the files, draw the same
frames, crop window, flip and audio position (:func:`sample_clip`, seeded per ``(seed, epoch, row)``
as in the DALI source), decode with PyAV, crop + resize + flip or resize + centre crop, ImageNet
normalisation; decode the audio, resample to 16 kHz mono, Kaldi fbank
(:func:`kaldi_fbank`, standing in for ``torchaudio.compliance.kaldi.fbank``), crop/pad, normalise —
and yields the same dict. It also serves as a readable reference of what the DALI graph computes.
The one deliberate difference in decoding: PyAV's ``rgb24`` conversion (swscale) upsamples chroma
more coarsely than DALI, which costs a few dB of PSNR on sharp colour edges.

``decoder="torchcodec"`` swaps the decoders for torchcodec's (:mod:`dali_pipelines.decoders`: frames
by index from one ``VideoDecoder``, whose frame count and size replace the PyAV probe; audio resampled
by its ``AudioDecoder``) and keeps every transform: the torchcodec peer of the data benchmark.
"""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .decoders import torchcodec_audio, torchcodec_frames, torchcodec_missing, torchcodec_video
from .fbank import kaldi_fbank
from .manifest import Manifest, read_manifest
from .source import ClipAugmentation, clip_rng, epoch_order, probe_video, sample_clip
from .spec import ClipSpec

DECODERS = ("pyav", "torchcodec")


def decode_frames(data: bytes, indices: np.ndarray) -> np.ndarray:
    """Decode the frames at ``indices`` (any order, repeats allowed): uint8 [len(indices), H, W, 3]."""
    wanted = set(indices.tolist())
    last = max(wanted)
    frames: dict[int, np.ndarray] = {}
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                frames[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
    return np.stack([frames[i] for i in indices.tolist()])


def decode_audio(data: bytes, sample_rate: int) -> torch.Tensor:
    """Mono float32 waveform at ``sample_rate``: soundfile for wav/flac/ogg, PyAV resampling when needed."""
    wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    wave = wave.mean(axis=1)
    if rate != sample_rate:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        frame = av.AudioFrame.from_ndarray(wave[None, :], format="flt", layout="mono")
        frame.sample_rate = rate
        chunks = [f.to_ndarray()[0] for f in (*resampler.resample(frame), *resampler.resample(None))]
        wave = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return torch.from_numpy(np.ascontiguousarray(wave))


def video_tensor(frames: np.ndarray, spec: ClipSpec, aug: ClipAugmentation) -> torch.Tensor:
    """uint8 [T, H, W, 3] → normalised float32 [3, T, S, S]: ``aug``'s crop window resized + flip, or
    (``aug.crop`` None) resize + centre crop."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # [T, 3, H, W]
    size = spec.image_size
    if aug.crop is not None:
        top, left, h, w = aug.crop
        x = F.interpolate(x[:, :, top:top + h, left:left + w], size=(size, size), mode="bilinear",
                          antialias=True, align_corners=False)
        if aug.flip:
            x = x.flip(-1)
    else:
        scale = size / min(x.shape[2], x.shape[3])
        out = (max(size, round(x.shape[2] * scale)), max(size, round(x.shape[3] * scale)))
        x = F.interpolate(x, size=out, mode="bilinear", antialias=True, align_corners=False)
        top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
        x = x[:, :, top:top + size, left:left + size]
    mean = torch.tensor(spec.video_mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.video_std).view(1, 3, 1, 1) * 255
    return ((x - mean) / std).permute(1, 0, 2, 3).contiguous()


def audio_tensor(wave: torch.Tensor, spec: ClipSpec, position: float) -> torch.Tensor:
    """Waveform → HiCMAE's normalised fbank [1, audio_frames, audio_bins], the window starting at
    ``position`` in [0, 1) (a fraction of the room + 1 starts that fit; 0.5 centres it)."""
    fbank = kaldi_fbank(wave - wave.mean(), spec.sample_rate, spec.audio_bins)
    room = max(fbank.shape[0] - spec.audio_frames, 0)
    start = min(int(np.floor(np.float32(position) * np.float32(room + 1))), room)  # float32, as the DALI graph
    fbank = fbank[start:start + spec.audio_frames]
    fbank = F.pad(fbank, (0, 0, 0, spec.audio_frames - fbank.shape[0]))
    return ((fbank - spec.audio_mean) / spec.audio_std)[None]


class PyAVClipDataset(Dataset):
    """Map-style dataset over a manifest with the DALI loader's outputs.

    Items are ``(row, epoch)`` pairs (a plain ``row`` means epoch 0): with the seed they pick the
    training augmentation, the same as the DALI loader's, and the epoch travels with the item so
    persistent workers see it. ``decoder``: "pyav" or "torchcodec" (see the module docstring).
    """

    def __init__(self, manifest: Manifest | str | Path, train: bool, spec: ClipSpec | None = None,
                 seed: int = 0, decoder: str = "pyav") -> None:
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        if decoder == "torchcodec" and (why := torchcodec_missing()):
            raise ValueError(f"decoder='torchcodec': {why}")  # here, not in a DataLoader worker
        self.decoder = decoder
        self.manifest = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
        self.train = train
        self.spec = spec or ClipSpec()
        self.seed = seed
        self.labels = self.manifest.labels()

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        row, epoch = item if isinstance(item, tuple) else (item, 0)
        clip = self.manifest.clips[row]
        video_bytes, audio_bytes = clip.video.read_bytes(), clip.audio.read_bytes()
        rng = clip_rng(self.seed, epoch, row) if self.train else None
        if self.decoder == "torchcodec":
            decoder, info = torchcodec_video(video_bytes, clip.video)
            aug = sample_clip(info, self.spec, rng)
            frames = torchcodec_frames(decoder, aug.frames)
            wave = torchcodec_audio(audio_bytes, self.spec.sample_rate)
        else:
            aug = sample_clip(probe_video(video_bytes, clip.video), self.spec, rng)
            frames = decode_frames(video_bytes, aug.frames)
            wave = decode_audio(audio_bytes, self.spec.sample_rate)
        return {
            "video": video_tensor(frames, self.spec, aug),
            "audio": audio_tensor(wave, self.spec, aug.audio_position),
            "label": torch.as_tensor(self.labels[row]),
            "index": torch.tensor(row, dtype=torch.int64),
        }


class EpochOrder(torch.utils.data.Sampler):
    """The DALI loader's epoch order (same seed, same permutations); each pass is the next epoch."""

    def __init__(self, num_clips: int, seed: int, shuffle: bool) -> None:
        self.num_clips, self.seed, self.shuffle = num_clips, seed, shuffle
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_clips

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        order = epoch_order(self.num_clips, epoch, self.seed, self.shuffle).tolist()
        return iter([(row, epoch) for row in order])


def build_baseline_loader(
    manifest: Manifest | str | Path, batch_size: int, train: bool, num_workers: int = 2,
    seed: int = 0, spec: ClipSpec | None = None, decoder: str = "pyav",
) -> DataLoader:
    """A torch DataLoader over :class:`PyAVClipDataset`: ``num_workers`` persistent worker processes,
    the DALI loader's epoch order, incomplete last batch dropped in training."""
    dataset = PyAVClipDataset(manifest, train, spec, seed, decoder)
    return DataLoader(dataset, batch_size=batch_size, sampler=EpochOrder(len(dataset), seed, train),
                      num_workers=num_workers, drop_last=train, persistent_workers=num_workers > 0)
