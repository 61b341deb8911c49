"""The data benchmark's peer plumbing: HiCMAE's setting file and dataset arguments, its loader built from a
checkout (a stand-in checkout here; the real one with $HICMAE_PATH), and the CPU-time reading of a
DataLoader's workers."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.hicmae_data import build_hicmae_loader, load_dataset_module, pretraining_args, write_setting
from benchmarks.hicmae_peer import resolve_checkout
from benchmarks.test_bench_data import cpu_seconds
from dali_pipelines import ClipSpec, read_manifest
from dali_pipelines.synthetic import generate_dataset

# A stand-in for HiCMAE's datasets_av: reads the setting file and finds the audio as kinetics_av.VideoMAE does
# (line.split(' '): path, int(label); audio = path with .mp4 replaced by .wav), and imports numpy.lib.function_base
# as kinetics_av does.
FAKE_DATASETS_AV = '''
import numpy as np
import torch
from numpy.lib.function_base import disp  # noqa: F401  (kinetics_av's numpy < 2 import)


class Clips(torch.utils.data.Dataset):
    def __init__(self, args):
        self.args = args
        self.clips = [(line.split(" ")[0], int(line.split(" ")[1])) for line in open(args.data_path)]

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i):
        video, label = self.clips[i]
        audio = video.replace(".mp4", ".wav")
        return torch.tensor([len(open(video, "rb").read()), len(open(audio, "rb").read()), label])


def build_pretraining_dataset(args):
    print("Data Aug = something long")
    return Clips(args)
'''


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return read_manifest(generate_dataset(tmp_path_factory.mktemp("peers"), clips=4, classes=4, num_frames=8, size=32))


def test_setting_file_names_each_clip_the_way_hicmae_finds_video_and_audio(manifest, tmp_path: Path) -> None:
    setting = write_setting(manifest, tmp_path / "hicmae")
    lines = setting.read_text().splitlines()
    assert len(lines) == len(manifest) and "voxceleb2" not in setting.name.lower()  # that name changes its crop
    for line, clip, label in zip(lines, manifest.clips, manifest.labels(), strict=True):
        video, value = line.split(" ")
        assert video.endswith(".mp4") and int(value) == label
        assert Path(video).read_bytes() == clip.video.read_bytes()  # a WebM behind an .mp4 name
        assert Path(video.replace(".mp4", ".wav")).read_bytes() == clip.audio.read_bytes()
    assert write_setting(manifest, tmp_path / "hicmae").read_text() == setting.read_text()  # rerun replaces links


def test_dataset_arguments_are_our_geometry_in_hicmaes_terms(tmp_path: Path) -> None:
    args = pretraining_args(tmp_path / "s.txt", ClipSpec())
    assert (args.input_size, args.num_frames, args.sampling_rate, args.num_samples) == (160, 16, 4, 1)
    assert args.window_size == (8, 10, 10) and args.window_size_audio == (16, 8)  # tubelet 2, 16 px patches
    assert args.audio_conf["target_length"] == 256 and args.audio_conf["num_mel_bins"] == 128
    assert (args.mask_ratio, args.mask_ratio_audio, args.roll_mag_aug) == (0.9, 0.8, True)  # its pretrain_base.sh


def test_loader_built_from_a_checkout_reads_every_clip(manifest, tmp_path: Path, capsys) -> None:
    root = tmp_path / "checkout"
    root.mkdir()
    (root / "datasets_av.py").write_text(FAKE_DATASETS_AV)
    sys.modules.pop("datasets_av", None)
    try:
        loader = build_hicmae_loader(root, manifest, tmp_path / "work", batch_size=2, num_workers=0)
        rows = torch.cat(list(loader))
    finally:
        sys.modules.pop("datasets_av", None)
    assert str(root) not in sys.path and "Data Aug" not in capsys.readouterr().out
    sizes = {(clip.video.stat().st_size, clip.audio.stat().st_size, label)
             for clip, label in zip(manifest.clips, manifest.labels(), strict=True)}
    assert len(rows) == 4 and {tuple(r.tolist()) for r in rows} == sizes  # shuffled, all there, paired


def test_a_different_datasets_av_already_imported_is_an_error(tmp_path: Path, monkeypatch) -> None:
    other = type(sys)("datasets_av")
    other.__file__ = str(tmp_path / "elsewhere" / "datasets_av.py")
    monkeypatch.setitem(sys.modules, "datasets_av", other)
    with pytest.raises(ValueError, match="a different datasets_av is already imported"):
        load_dataset_module(tmp_path)


@pytest.mark.skipif(not os.environ.get("HICMAE_PATH"), reason="needs a HiCMAE checkout in $HICMAE_PATH")
def test_hicmaes_own_loader_yields_its_pretraining_batch(manifest, tmp_path: Path) -> None:
    root = resolve_checkout(os.environ["HICMAE_PATH"])
    video, video_mask, audio, audio_mask = next(iter(build_hicmae_loader(root, manifest, tmp_path, 2, 0)))
    assert video.shape == (2, 3, 16, 160, 160) and audio.shape == (2, 1, 256, 128)
    assert video_mask.shape == (2, 8 * 10 * 10) and audio_mask.shape == (2, 16 * 8)


def test_cpu_seconds_count_the_dataloader_workers() -> None:
    class Spin(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            end = time.process_time() + 0.3  # CPU time spent in the worker process, not here
            while time.process_time() < end:
                pass
            return np.zeros(1)

    loader = torch.utils.data.DataLoader(Spin(), batch_size=1, num_workers=1, persistent_workers=True)
    list(loader)  # start the worker
    before, mine = cpu_seconds(loader), time.process_time()
    list(loader)
    spent = cpu_seconds(loader) - before
    assert spent - (time.process_time() - mine) >= 0.5  # the worker's 2 x 0.3 s, less scheduling slack
