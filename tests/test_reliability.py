"""Work is never lost and garbage is never trained on silently (issue 13), checked without DeepSpeed:
checkpoint completeness and resume choice, pruning, the output_dir lock, config and manifest validation.
The launcher cases (end to end) are in tests/test_reliability_launcher.py."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from avfmae.trainer import TrainState
from avfmae.training import CheckpointManager, OutputLock, RunError, atomic_write_text
from tests.helpers.train_configs import write_config

ROOT = Path(__file__).resolve().parents[1]


class ShardedEngine:
    """Writes a tag like DeepSpeed's ZeRO-3 save on ``world`` ranks: a model-state and an optimizer shard
    per rank (the barrier of the real save is implicit: all shards are written before the call returns)."""

    def __init__(self, world: int = 2):
        self.world = world

    def save_checkpoint(self, directory, tag, client_state, save_latest):
        assert save_latest is False  # the manager owns `latest`
        path = Path(directory) / tag
        path.mkdir()
        for rank in range(self.world):
            (path / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").write_text(json.dumps(client_state))
            (path / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"x" * (100 + rank))


def saved_run(directory: Path, steps, keep: int = 10, world: int = 2) -> CheckpointManager:
    manager, engine = CheckpointManager(directory, keep=keep), ShardedEngine(world)
    for step in steps:
        manager.save(engine, step, {"step": step}, is_rank0=True, barrier=lambda: None, world=world)
    return manager


def contents(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# --- checkpoints you can trust ------------------------------------------------------------------------


def test_a_finished_save_is_complete_and_latest_names_it(tmp_path):
    manager = saved_run(tmp_path, [2, 4])
    assert manager.tags() == ["step_00000004", "step_00000002"]
    assert manager.problem("step_00000004", world=2) is None
    assert manager.latest_tag() == "step_00000004"
    record = json.loads((tmp_path / "step_00000004" / "complete.json").read_text())
    assert record["world_size"] == 2 and record["step"] == 4
    assert "zero_pp_rank_1_mp_rank_00_model_states.pt" in record["files"]


def test_latest_naming_a_missing_checkpoint_does_not_hide_a_newer_complete_one(tmp_path):
    manager = saved_run(tmp_path, [2, 4])
    atomic_write_text(tmp_path / "latest", "step_00000006")  # the pointer names a tag that is gone
    assert manager.latest_tag() is None
    tag, skipped = manager.choose([{t: manager.problem(t, 2) for t in manager.tags()}])
    assert tag == "step_00000004" and skipped == {}


@pytest.mark.parametrize("garbage", [b"\xff\xfe\x00binary\x80", b"", b"../../etc/passwd", b"step_4"])
def test_latest_with_garbage_is_ignored(tmp_path, garbage):
    manager = saved_run(tmp_path, [2])
    (tmp_path / "latest").write_bytes(garbage)
    assert manager.latest_tag() is None
    assert manager.choose([{t: manager.problem(t) for t in manager.tags()}])[0] == "step_00000002"


def test_a_checkpoint_missing_one_ranks_shard_is_skipped_with_the_reason(tmp_path):
    manager = saved_run(tmp_path, [2, 4])
    (tmp_path / "step_00000004" / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    problem = manager.problem("step_00000004", 2)
    assert problem == "file zero_pp_rank_1_mp_rank_00_model_states.pt is missing (listed by complete.json)"
    tag, skipped = manager.choose([{t: manager.problem(t, 2) for t in manager.tags()}])
    assert tag == "step_00000002" and skipped == {"step_00000004": problem}
    assert manager.latest_tag() is None  # `latest` still names step 4, which is no longer complete


@pytest.mark.parametrize("damage, reason", [
    (lambda d: (d / "complete.json").unlink(), "no completion marker"),
    (lambda d: (d / "complete.json").write_bytes(b"\x00\x01garbage"), "unreadable completion marker"),
    (lambda d: (d / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 7),
     "has 7 bytes, complete.json recorded 100"),
])
def test_truncated_or_unmarked_checkpoints_are_not_complete(tmp_path, damage, reason):
    manager = saved_run(tmp_path, [3])
    damage(tmp_path / "step_00000003")
    assert reason in manager.problem("step_00000003")
    tag, skipped = manager.choose([{t: manager.problem(t) for t in manager.tags()}])
    assert tag is None and reason in skipped["step_00000003"]


def test_a_partitioned_checkpoint_needs_the_same_number_of_ranks(tmp_path):
    manager = saved_run(tmp_path, [5], world=2)
    assert "saved by 2 ranks" in manager.problem("step_00000005", world=4)
    assert manager.problem("step_00000005", world=2) is None


def test_complete_means_complete_on_every_rank(tmp_path):
    manager = saved_run(tmp_path, [2, 4])
    rank0 = {t: manager.problem(t, 2) for t in manager.tags()}
    rank1 = {"step_00000002": None}  # another node's file system does not show step 4
    tag, skipped = manager.choose([rank0, rank1])
    assert tag == "step_00000002" and skipped == {"step_00000004": "rank 1: not found"}


def test_the_marker_is_refused_when_a_ranks_shard_never_arrived(tmp_path):
    class LostShard(ShardedEngine):
        def save_checkpoint(self, directory, tag, client_state, save_latest):
            super().save_checkpoint(directory, tag, client_state, save_latest)
            for p in (Path(directory) / tag).glob("*rank_1_*"):
                p.unlink()

    manager = saved_run(tmp_path, [2])
    with pytest.raises(RunError, match=r"no ZeRO shard of rank\(s\) \[1\]"):
        manager.save(LostShard(), 4, {}, is_rank0=True, barrier=lambda: None, world=2)
    assert manager.latest_tag() == "step_00000002" and manager.problem("step_00000004") is not None


def test_unusable_newer_checkpoints_are_set_aside_never_deleted(tmp_path):
    manager = saved_run(tmp_path, [2, 4])
    (tmp_path / "step_00000004" / "zero_pp_rank_0_mp_rank_00_model_states.pt").unlink()
    before = contents(tmp_path / "step_00000004")
    moved = manager.set_aside("step_00000004")
    assert contents(moved) == before and moved.parent == tmp_path
    assert manager.tags() == ["step_00000002"]  # a resumed run saving step 4 again cannot touch it
    saved_run(tmp_path, [4, 6, 8], keep=1)  # the resumed run goes on, pruning as it goes
    assert contents(moved) == before


def test_pruning_keeps_the_newest_complete_checkpoints_and_never_newer_ones(tmp_path):
    manager = saved_run(tmp_path, [1, 2, 3], keep=2)
    assert manager.tags() == ["step_00000003", "step_00000002"]
    (tmp_path / "step_00000009").mkdir()  # newer than anything saved next, incomplete
    (tmp_path / "step_00000009" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_text("partial")
    manager.save(ShardedEngine(), 5, {}, is_rank0=True, barrier=lambda: None, world=2)
    assert manager.tags() == ["step_00000009", "step_00000005", "step_00000003"]
    # when the complete ones to keep are damaged, nothing older is removed
    (tmp_path / "step_00000005" / "complete.json").unlink()
    manager.save(ShardedEngine(), 6, {}, is_rank0=True, barrier=lambda: None, world=2)
    assert manager.tags() == ["step_00000009", "step_00000006", "step_00000005", "step_00000003"]


def record_durability(monkeypatch) -> list[tuple[str, str]]:
    """(event, resolved path) of every fsync, os.replace and rmtree, in order (the real calls still run)."""
    import shutil

    events, fsync, replace, rmtree = [], os.fsync, os.replace, shutil.rmtree

    def recording_fsync(fd):
        events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        fsync(fd)

    def recording_replace(src, dst, *args, **kwargs):
        events.append(("replace", os.path.realpath(dst)))
        replace(src, dst, *args, **kwargs)

    def recording_rmtree(path, *args, **kwargs):
        events.append(("rmtree", os.path.realpath(path)))
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    monkeypatch.setattr(shutil, "rmtree", recording_rmtree)
    return events


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fsync'ed descriptors through /proc")
def test_the_new_checkpoint_is_durable_before_any_older_one_is_pruned(tmp_path, monkeypatch):
    """DeepSpeed's torch.save does not fsync: each rank flushes the tag's files and directories before
    the barrier that precedes the marker, so a power loss after the pruning still finds the new tag."""
    manager = saved_run(tmp_path, [2], keep=1)
    events = record_durability(monkeypatch)
    manager.save(ShardedEngine(), 4, {"step": 4}, is_rank0=True,
                 barrier=lambda: events.append(("barrier", "")), world=2)
    new, old = (tmp_path / "step_00000004").resolve(), (tmp_path / "step_00000002").resolve()
    assert manager.tags() == ["step_00000004"] and events.count(("rmtree", str(old))) == 1
    synced = [path for event, path in events[: events.index(("barrier", ""))] if event == "fsync"]
    shards = {str(p) for p in new.iterdir() if p.name != "complete.json"}
    assert len(shards) == 4 and shards <= set(synced)  # every rank's model and optimizer shard
    assert str(new) in synced and str(tmp_path.resolve()) in synced  # the tag's entries, its own entry
    pruned = events.index(("rmtree", str(old)))
    for name in (new / "complete.json", tmp_path.resolve() / "latest"):  # fsync'ed, renamed, then the pruning
        assert events.index(("replace", str(name))) < pruned


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fsync'ed descriptors through /proc")
def test_exported_weights_are_flushed_before_they_replace_the_old_file(tmp_path, monkeypatch):
    """best_fp32.pt / model_fp32.pt: written to a temporary file, fsync'ed, renamed, directory fsync'ed
    (a rename without the fsync can leave an empty file after a crash); the weights round-trip."""
    from types import SimpleNamespace

    import torch

    from avfmae.trainer import Trainer

    trainer = Trainer.__new__(Trainer)  # export only: rank 0, ZeRO stage 0 (weights from the module)
    trainer.rank, trainer.ds_config = 0, {}
    module = torch.nn.Linear(3, 2)
    trainer.engine = SimpleNamespace(module=module)
    path = tmp_path / "best_fp32.pt"
    path.write_bytes(b"the previous best")
    events = record_durability(monkeypatch)
    trainer.export("step_00000004", path)
    saved = torch.load(path, weights_only=True)
    assert saved.keys() == module.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in module.state_dict().items())
    replaced = events.index(("replace", str(path.resolve())))
    temporary = [p for e, p in events[:replaced] if e == "fsync"]
    assert len(temporary) == 1 and Path(temporary[0]).parent == tmp_path.resolve()
    assert Path(temporary[0]).name.startswith(".best_fp32.pt.tmp") and not Path(temporary[0]).exists()
    assert ("fsync", str(tmp_path.resolve())) in events[replaced:]


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    from avfmae.checkpoints import atomic_write

    path = tmp_path / "model_fp32.pt"
    path.write_bytes(b"old weights")

    def failing(fh):
        fh.write(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, failing)
    assert path.read_bytes() == b"old weights" and [p.name for p in tmp_path.iterdir()] == ["model_fp32.pt"]


# --- one writer per output_dir ----------------------------------------------------------------------


HOLD = textwrap.dedent("""
    import sys, time
    from avfmae.training import OutputLock
    lock = OutputLock(sys.argv[1]); lock.acquire(); print("held", flush=True); time.sleep(60)
""")


def test_a_second_run_fails_fast_naming_the_directory_and_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunError) as err:
            OutputLock(tmp_path).acquire()
        message = str(err.value)
        assert f"output_dir {tmp_path} is in use by another run" in message
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message
    finally:
        holder.kill()
        holder.wait()
    lock = OutputLock(tmp_path)  # the kernel dropped the dead holder's lock: no stale lock to clean up
    lock.acquire()
    assert json.loads((tmp_path / "train.lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_a_recorded_holder_that_is_gone_is_called_stale(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    record = {"host": socket.gethostname(), "pid": int(dead.stdout), "started": "then", "command": "train.py"}
    (tmp_path / "train.lock").write_text(json.dumps(record))
    assert "stale lock" in OutputLock(tmp_path).holder()
    (tmp_path / "train.lock").write_bytes(b"\x00garbage")
    assert "holder unknown" in OutputLock(tmp_path).holder()


# --- manifests: the real problem, and labels against the config's task -------------------------------


def manifest(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "m.csv"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def test_a_utf8_bom_is_dropped(tmp_path):
    from dali_pipelines import read_manifest

    m = read_manifest(manifest(tmp_path, b"\xef\xbb\xbfvideo,audio,label\na.webm,a.wav,1\n"), check_files=False)
    assert m.task == "classification" and m.clips[0].video.name == "a.webm" and m.label_columns == ("label",)


@pytest.mark.parametrize("text, message", [
    ("video\taudio\tlabel\na.webm\ta.wav\t1\n", "is tab-separated; CSV manifests use commas"),
    ("video;audio;label\na.webm;a.wav;1\n", "is semicolon-separated"),
    ("video audio label\na.webm a.wav 1\n", "is space-separated; CSV manifests use commas"),
    ("path,wav,label\na.webm,a.wav,1\n", "bad header 'path,wav,label': no `video` column"),
    ("a.webm,a.wav,1\nb.webm,b.wav,0\n", "is a row, not a header"),
])
def test_manifest_format_errors_name_the_real_problem(tmp_path, text, message):
    from dali_pipelines import ManifestError, read_manifest

    with pytest.raises(ManifestError, match=message):
        read_manifest(manifest(tmp_path, text), check_files=False)


@pytest.mark.parametrize("labels, task, num_outputs, message", [
    (["1", "9"], "classification", 4, r"line 3: label 9 is not a class index \[0, num_outputs=4\)"),
    (["1.5", "2"], "classification", 4, "line 2: label 1.5 is not a class index"),
    (["-1", "2"], "classification", 4, "line 2: label -1 is not a class index"),
    (["1", "2"], "regression", 2, "1 label column.*regression task has num_outputs=2"),
])
def test_labels_are_checked_against_the_configured_task_naming_the_row(tmp_path, labels, task, num_outputs,
                                                                        message):
    from dali_pipelines import ManifestError, read_manifest

    rows = "".join(f"c{i}.webm,c{i}.wav,{label}\n" for i, label in enumerate(labels))
    path = manifest(tmp_path, "video,audio,label\n" + rows)
    with pytest.raises(ManifestError, match=message):
        read_manifest(path, check_files=False, task=task, num_outputs=num_outputs)


def test_the_configured_task_wins_over_what_the_values_suggest(tmp_path):
    from dali_pipelines import ManifestError, read_manifest

    path = manifest(tmp_path, "video,audio,label\na.webm,a.wav,1\nb.webm,b.wav,0\n")
    regression = read_manifest(path, check_files=False, task="regression", num_outputs=1)
    assert regression.task == "regression" and regression.labels().dtype.name == "float32"
    assert read_manifest(path, check_files=False, task="classification", num_outputs=2).task == "classification"
    unlabelled = manifest(tmp_path, "video,audio\na.webm,a.wav\n")
    with pytest.raises(ManifestError, match="no labels, but the config's task is classification"):
        read_manifest(unlabelled, check_files=False, task="classification", num_outputs=2)


# --- every config key checked before any process group exists -----------------------------------------


@pytest.mark.parametrize("ds, message", [
    ({"train_micro_batch_size_per_gpu": "4"}, "train_micro_batch_size_per_gpu: must be an integer >= 1, got '4'"),
    ({"train_micro_batch_size_per_gpu": 0}, "train_micro_batch_size_per_gpu: must be an integer >= 1, got 0"),
    ({"gradient_accumulation_steps": 1.5}, "gradient_accumulation_steps: must be an integer >= 1"),
    ({"train_batch_size": 5}, "train_batch_size: must be a multiple of .* = 2, got 5"),
    ({"gradient_clipping": -1}, "gradient_clipping: must be a number >= 0"),
    ({"gradient_clipping": "1.0"}, "gradient_clipping: must be a number >= 0"),
    ({"fp16": {"enabled": "true"}}, "fp16.enabled: must be true or false"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "fp16 and bf16 are both enabled"),
    ({"fp16": {"enabled": True, "initial_scale_power": -2}}, "fp16.initial_scale_power: must be an integer >= 0"),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage: must be 0, 1, 2 or 3, got 4"),
    ({"zero_optimization": {"stage": 3, "reduce_bucket_size": "5e8"}}, "zero_optimization.reduce_bucket_size"),
    ({"zero_optimization": {"overlap_comm": 1}}, "zero_optimization.overlap_comm: must be true or false"),
    ({"zero_optimization": [3]}, "zero_optimization: must be a JSON object"),
    ({"optimizer": {"type": "Adam"}}, "optimizer: the trainer builds AdamW"),
])
def test_deepspeed_keys_are_validated_naming_the_key(tmp_path, ds, message):
    from avfmae.training import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, ds))


def test_the_batch_arithmetic_uses_the_launchers_world_size(tmp_path, monkeypatch):
    from avfmae.training import ConfigError, load_config

    path = write_config(tmp_path, {"train_batch_size": 8, "gradient_accumulation_steps": 2})
    monkeypatch.setenv("WORLD_SIZE", "2")
    load_config(path)  # 2 x 2 x 2
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"= 2 x 2 x 4 = 16, got 8"):
        load_config(path)
    ds, _ = load_config(write_config(tmp_path, {"zero_optimization": {"stage": 3, "reduce_bucket_size": 5e8}}))
    assert ds["zero_optimization"]["reduce_bucket_size"] == 5e8  # JSON's 5e8 is integral: accepted as is


@pytest.mark.parametrize("section, message", [
    ({"epochs": "2"}, "avfmae.epochs: must be an integer, got '2'"),
    ({"lr": "1e-3"}, "avfmae.lr: must be a number, got '1e-3'"),
    ({"lr": float("nan")}, "avfmae.lr: must be a number"),
    ({"seed": 1.0}, "avfmae.seed: must be an integer, got 1.0"),
    ({"activation_checkpointing": "false"}, "avfmae.activation_checkpointing: must be true or false"),
    ({"size": 3}, "avfmae.size: must be a string"),
    ({"max_steps": "10"}, "avfmae.max_steps: must be an integer or null"),
    ({"betas": ["0.9", 0.95]}, "avfmae.betas"),
    ({"mask": {"video_ratio": "0.9"}}, "avfmae.mask.video_ratio: must be a number"),
    ({"max_nonfinite_steps": 0}, "avfmae.max_nonfinite_steps: must be a positive number"),
])
def test_every_avfmae_key_has_its_type_checked(tmp_path, section, message):
    from avfmae.training import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, **section))


@pytest.fixture(scope="module")
def classifier():
    import avfmae

    return avfmae.build_model("tiny", "finetune", num_outputs=4)


def test_an_init_checkpoint_that_is_not_a_safe_state_dict_names_the_key(tmp_path, classifier):
    import pickle

    import torch

    from avfmae.trainer import read_init_checkpoint
    from avfmae.training import ConfigError

    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="avfmae.init_checkpoint: .*notes.txt is not a weights file") as err:
        read_init_checkpoint(str(text), classifier)
    assert "never opened" in str(err.value)
    unsafe = tmp_path / "unsafe.pt"
    with open(unsafe, "wb") as fh:
        pickle.dump({"video_encoder.x": object()}, fh)  # loads only with weights_only=False
    with pytest.raises(ConfigError, match="avfmae.init_checkpoint: .*unsafe.pt is not a weights file"):
        read_init_checkpoint(str(unsafe), classifier)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(ConfigError, match="holds a Tensor, not a state dict"):
        read_init_checkpoint(str(tensor), classifier)
    unrelated = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(2), "fc.bias": torch.zeros(2)}, unrelated)
    with pytest.raises(ConfigError, match="no key of .*resnet.pt matches this model's encoders.*conv1.weight"):
        read_init_checkpoint(str(unrelated), classifier)
    good = tmp_path / "model_fp32.pt"
    torch.save({"model": {f"module.{k}": v for k, v in classifier.state_dict().items()}}, good)
    assert "model" in read_init_checkpoint(str(good), classifier)


# --- media checked before they poison training -----------------------------------------------------------


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A good clip and one of every kind of bad one (VP9 WebM + wav), as (video, audio) paths by name."""
    import io

    import numpy as np
    import soundfile as sf

    from dali_pipelines.synthetic import encode_video, encode_wav, face_frames

    out = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    good_video = encode_video(face_frames(0, 4, 20, 64, rng))
    good_audio = encode_wav(np.zeros(16000, np.float32), 16000)
    wave = np.zeros(16000, np.float32)
    wave[100:110] = np.nan
    nan_audio = io.BytesIO()
    sf.write(nan_audio, wave, 16000, format="WAV", subtype="FLOAT")
    videos = {"good": good_video, "truncated": good_video[: len(good_video) // 2], "empty": b"",
              "short": encode_video(face_frames(0, 4, 2, 64, rng)), "text": b"not a video at all\n" * 10,
              "nan_audio": good_video}
    audios = {"nan_audio": nan_audio.getvalue(), "empty": b""}
    paths = {}
    for name, data in videos.items():
        (out / f"{name}.webm").write_bytes(data)
        (out / f"{name}.wav").write_bytes(audios.get(name, good_audio))
        paths[name] = (out / f"{name}.webm", out / f"{name}.wav")
    return paths


def test_the_start_up_probe_rejects_empty_and_non_media_files(media):
    from dali_pipelines.source import quick_check

    assert quick_check(media["good"][0], "video") is None and quick_check(media["good"][1], "audio") is None
    assert quick_check(media["truncated"][0], "video") is None  # cut short: found at decode time
    assert quick_check(media["empty"][0], "video") == "empty file (0 bytes)"
    assert quick_check(media["empty"][1], "audio") == "empty file (0 bytes)"
    assert "not a video container DALI reads" in quick_check(media["text"][0], "video")
    assert "not a audio container" in quick_check(media["good"][0], "audio")


@pytest.mark.parametrize("name, message", [
    ("truncated", r"truncated.webm: truncated video: the header declares 20 frames, the file holds \d+"),
    ("short", "short.webm: 2 frame.s., fewer than the 16 the model samples"),
    ("empty", "empty.webm: empty video file"),
    ("text", "text.webm: undecodable video"),
    ("nan_audio", r"nan_audio.wav: 10 non-finite audio sample\(s\)"),
])
def test_decode_time_checks_name_the_file_the_reason_and_the_fix(media, name, message):
    import numpy as np

    from dali_pipelines import ClipSpec
    from dali_pipelines.manifest import Clip
    from dali_pipelines.source import BadClipError, check_clip

    video, audio = media[name]
    clip = Clip(video, audio, (), 7)
    with pytest.raises(BadClipError, match=message) as err:
        check_clip(np.fromfile(video, np.uint8), np.fromfile(audio, np.uint8), clip, ClipSpec(), "m.csv")
    assert "Fix: re-extract or re-encode the file, or remove line 7 of m.csv" in str(err.value)
    assert "bad_clips: skip" in str(err.value)
    good = check_clip(*(np.fromfile(p, np.uint8) for p in media["good"]), Clip(*media["good"], (), 2), ClipSpec(),
                      "m.csv")
    assert good.num_frames == 20


def _source(media, names, policy, fraction=0.0):
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy

    from dali_pipelines import write_manifest
    from dali_pipelines.manifest import read_manifest
    from dali_pipelines.source import ClipSource
    from dali_pipelines.spec import LoaderOptions

    path = write_manifest(media["good"][0].parent / f"{policy}.csv",
                          [(*media[n], i % 2) for i, n in enumerate(names)])
    manifest = read_manifest(path)
    options = LoaderOptions(device="cpu", bad_clips=policy, max_bad_clip_fraction=fraction)
    return ClipSource(manifest, len(names), False, LastBatchPolicy.PARTIAL, options)


class Info:
    epoch_idx, iteration = 0, 0


def test_bad_clips_error_stops_at_the_bad_clip(media):
    from dali_pipelines.source import BadClipError

    with pytest.raises(BadClipError, match="truncated.webm: truncated video"):
        _source(media, ["good", "truncated", "good"], "error")(Info())


def test_bad_clips_skip_logs_each_and_a_good_clip_stands_in(media, capsys):
    source = _source(media, ["good", "truncated", "good", "nan_audio"], "skip", fraction=0.5)
    *_, labels, index = source(Info())
    assert [int(i) for i in index] == [0, 2, 2, 0]  # rows 1 and 3 replaced by the next usable rows
    assert [int(x) for x in labels] == [0, 0, 0, 0]  # and their labels come with them
    log = capsys.readouterr().err
    assert "skipping" in log and "truncated.webm" in log and "nan_audio.wav" in log
    assert set(source.skipped) == {1, 3}
    with pytest.raises(ValueError, match="2 bad clips .* more than max_bad_clip_fraction=0.25"):
        _source(media, ["good", "truncated", "good", "nan_audio"], "skip", fraction=0.25)(Info())


def test_the_trainer_probe_applies_the_policy_to_every_rank_alike(media, tmp_path):
    from types import SimpleNamespace

    from avfmae.trainer import Trainer
    from avfmae.training import JsonlLog
    from dali_pipelines import ManifestError, write_manifest
    from dali_pipelines.manifest import read_manifest

    path = write_manifest(tmp_path / "m.csv", [(*media[n], 0) for n in ["good", "empty", "text", "good"]])
    manifest = read_manifest(path)

    def probe(policy, fraction):
        cfg = SimpleNamespace(bad_clips=policy, max_bad_clip_fraction=fraction)
        trainer = SimpleNamespace(rank=0, world=1, cfg=cfg, log=JsonlLog(tmp_path / "log.jsonl"))
        return Trainer.probe_media(trainer, "train_manifest", manifest)

    with pytest.raises(ManifestError, match=r"2 of 4 clips .* fail the start-up probe:\n  line 3: .*empty.webm: "
                                            r"empty file \(0 bytes\)\n  line 4: .*text.webm: not a video"):
        probe("error", 0.9)
    with pytest.raises(ManifestError, match="more than max_bad_clip_fraction"):
        probe("skip", 0.25)
    kept = probe("skip", 0.5)
    assert [c.line for c in kept.clips] == [2, 5]
    logged = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert logged["event"] == "bad_clips" and set(logged["skipped"]) == {"3", "4"}


# --- non-finite losses and skipped steps (the loop's bookkeeping, without DeepSpeed) -----------------------


def bookkeeping(tmp_path: Path, max_nonfinite_steps: int = 3):
    from types import SimpleNamespace

    from avfmae.trainer import Trainer
    from avfmae.training import JsonlLog

    trainer = Trainer.__new__(Trainer)  # the loop's state only: no process group, no engine
    trainer.cfg = SimpleNamespace(max_nonfinite_steps=max_nonfinite_steps)
    trainer.world, trainer.nonfinite_streak, trainer.skipped_steps = 1, 0, 0
    trainer.log = JsonlLog(tmp_path / "log.jsonl")
    trainer.ckpt = saved_run(tmp_path / "checkpoints", [4], world=1)
    return trainer


def logged(tmp_path: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if r["event"] == event]


def test_non_finite_losses_stop_after_n_in_a_row_naming_the_step_and_the_term(tmp_path):
    trainer = bookkeeping(tmp_path, max_nonfinite_steps=2)
    nan = float("nan")
    trainer.check_finite(5, True, {"loss": nan, "loss_audio": nan})
    trainer.check_finite(6, False, {})  # a finite step ends the streak
    assert trainer.nonfinite_streak == 0
    trainer.check_finite(7, True, {"loss_video": float("inf")})
    with pytest.raises(RunError) as err:
        trainer.check_finite(8, True, {"loss_video": nan})
    message = str(err.value)
    assert "stopped at step 8: non-finite loss for 2 step(s) in a row (rank 0: loss_video=nan)" in message
    assert "the last checkpoint, step_00000004" in message
    assert [e["step"] for e in logged(tmp_path, "nonfinite")] == [5, 7, 8]
    assert logged(tmp_path, "nonfinite")[0]["terms"] == {"0": {"loss": "nan", "loss_audio": "nan"}}  # strict JSON


def test_no_checkpoint_is_written_right_after_a_non_finite_loss(tmp_path):
    trainer = bookkeeping(tmp_path)
    trainer.rank = 0
    trainer.check_finite(5, True, {"loss": float("nan")})
    assert trainer.save(TrainState(step=5), reason="periodic") is None  # the engine is never asked
    assert logged(tmp_path, "checkpoint_refused") == [{"event": "checkpoint_refused", "step": 5, "reason": "periodic",
                                                       "time": logged(tmp_path, "checkpoint_refused")[0]["time"]}]
    assert trainer.ckpt.tags() == ["step_00000004"]


def test_steps_deepspeed_skipped_are_logged_and_counted(tmp_path):
    from types import SimpleNamespace

    trainer = bookkeeping(tmp_path)
    trainer.engine = SimpleNamespace(skipped_steps=0, optimizer=SimpleNamespace(cur_scale=65536.0))
    trainer.count_skipped_step(1)
    trainer.engine.skipped_steps, trainer.engine.optimizer.cur_scale = 1, 32768.0  # fp16 overflow at step 2
    trainer.count_skipped_step(2)
    trainer.count_skipped_step(3)
    trainer.engine.skipped_steps = 2
    trainer.count_skipped_step(4)
    assert [(e["step"], e["skipped_steps"]) for e in logged(tmp_path, "skipped_step")] == [(2, 1), (4, 2)]
    assert logged(tmp_path, "skipped_step")[0]["loss_scale"] == 32768.0 and trainer.skipped_steps == 2


def test_weights_that_went_non_finite_are_never_checkpointed(tmp_path):
    from types import SimpleNamespace

    import torch

    trainer = bookkeeping(tmp_path)
    trainer.rank, trainer.device = 0, torch.device("cpu")
    module = torch.nn.Linear(3, 2)
    trainer.engine = SimpleNamespace(module=module)
    assert trainer.weights_finite()
    with torch.no_grad():
        module.bias[1] = float("inf")  # an update diverged while the loss that drove it was finite
    assert not trainer.weights_finite()
    with pytest.raises(RunError, match="step 9: the weights hold NaN/inf .* The last checkpoint is step_00000004"):
        trainer.save(TrainState(step=9), reason="periodic")
    assert trainer.ckpt.tags() == ["step_00000004"]


def test_a_run_without_resume_refuses_a_used_output_dir(tmp_path):
    from avfmae.trainer import Trainer

    def claim(resume: bool):
        trainer = Trainer.__new__(Trainer)  # the start-up claim only: no process group
        trainer.rank, trainer.resume, trainer.out = 0, resume, tmp_path
        trainer.ckpt, trainer.lock = CheckpointManager(tmp_path / "checkpoints"), OutputLock(tmp_path)
        trainer.claim_output_dir()
        return trainer

    claim(resume=False).lock.release()  # an empty output_dir is fine
    saved_run(tmp_path / "checkpoints", [2])
    before = contents(tmp_path / "checkpoints")
    with pytest.raises(RunError, match=f"output_dir {tmp_path} already holds a run \\(step_00000002\\); continue it "
                                       "with --resume"):
        claim(resume=False)
    claim(resume=True).lock.release()  # another process holding the lock: see the subprocess test above
    assert contents(tmp_path / "checkpoints") == before
