"""The trainer's own bookkeeping (avfmae/trainer.py): per-micro-step seeds, the best-checkpoint rule,
what run() returns for each way a run ends, and the order its set-up steps need."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from avfmae.stopping import ExitCode, StopReason
from avfmae.trainer import Trainer, TrainState, improves, step_seed
from avfmae.training import JsonlLog
from tests.helpers.ports import free_port

from .test_training_deepspeed import DEEPSPEED, ROOT, config, dataset, events, wait_until  # noqa: F401 (fixture)


def old_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The packed integer the trainer used before step_seed (kept here to show its collisions)."""
    return ((seed * 1_000_003 + step) * 64 + micro) * 4096 + rank


# --- seeds --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("a, b", [
    ((0, 1, 0, 0), (0, 0, 64, 0)),       # 64 accumulation steps: micro 64 of step 0 is micro 0 of step 1
    ((0, 0, 1, 0), (0, 0, 0, 4096)),     # 4096 ranks: rank 4096 of micro 0 is rank 0 of micro 1
    ((1, 0, 0, 0), (0, 1_000_003, 0, 0)),  # the seed's multiplier: seed 1 step 0 is seed 0 step 1000003
])
def test_step_seeds_differ_where_the_packed_integer_collided(a, b):
    assert old_seed(*a) == old_seed(*b)  # the collision the old formula had
    assert step_seed(*a) != step_seed(*b)
    # and the streams differ, not just the seeds
    draws = [torch.rand(8, generator=torch.Generator().manual_seed(step_seed(*t))) for t in (a, b)]
    assert not torch.equal(*draws)


def test_step_seeds_are_distinct_over_deep_accumulation_and_many_ranks():
    keys = [(s, step, micro, rank) for s in (0, 1) for step in (0, 1, 2) for micro in (0, 1, 63, 64, 65, 200)
            for rank in (0, 1, 4095, 4096, 4097, 10_000)]
    seeds = [step_seed(*k) for k in keys]
    assert len(set(seeds)) == len(keys)
    assert len({old_seed(*k) for k in keys}) < len(keys)  # the old formula did collide on this grid
    assert all(0 <= s < 2**64 for s in seeds)  # what torch.manual_seed and Generator.manual_seed accept


def test_a_step_seed_depends_on_its_arguments_only():
    # a resumed run (another process) must draw what the uninterrupted one drew
    code = "from avfmae.trainer import step_seed; print(step_seed(7, 123, 3, 5))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert int(out.stdout) == step_seed(7, 123, 3, 5)
    torch.manual_seed(step_seed(7, 123, 3, 5))  # accepted as a torch seed


# --- the best checkpoint ----------------------------------------------------------------------------------


def test_improves_treats_nan_as_never_best():
    nan = float("nan")
    assert improves(0.5, None) and improves(0.5, nan)  # a NaN best is replaced by the next finite score
    assert not improves(nan, None) and not improves(nan, 0.5) and not improves(nan, nan)
    assert improves(0.6, 0.5) and not improves(0.5, 0.5) and not improves(0.4, 0.5)


def test_the_best_checkpoint_follows_a_finite_score_after_a_nan_one(tmp_path, monkeypatch):
    """evaluate_and_keep_best with a NaN then finite scores: the finite ones are saved and exported
    (a bare ``score > best`` stays False forever once best is NaN)."""
    import avfmae.metrics as metrics

    scores = iter([float("nan"), 0.25, 0.125, 0.5])
    monkeypatch.setattr(metrics, "evaluation_scores", lambda *a: ({"war": next(scores)}, "war"))
    trainer = Trainer.__new__(Trainer)  # the evaluation bookkeeping only: no process group, no engine
    trainer.cfg = SimpleNamespace(regression=False)
    trainer.rank, trainer.out, trainer.log = 0, tmp_path, JsonlLog(tmp_path / "log.jsonl")
    view = (torch.arange(4), torch.zeros(4, 3), torch.zeros(4))
    trainer.predict = lambda loader: view
    saved, exported = [], []
    trainer.save = lambda state, reason: saved.append((state.step, reason)) or f"step_{state.step:08d}"
    trainer.export = lambda tag, path: exported.append((tag, path.name))
    state = TrainState()
    for step in (1, 2, 3, 4):
        state.step, state.epoch = step, step
        trainer.evaluate_and_keep_best([None], state)
    assert state.best_metric == 0.5
    assert saved == [(2, "best"), (4, "best")]
    assert exported == [("step_00000002", "best_fp32.pt"), ("step_00000004", "best_fp32.pt")]
    best = json.loads((tmp_path / "metrics.json").read_text())
    assert best["step"] == 4 and best["best"] == {"war": 0.5}


def test_a_best_that_could_not_be_saved_is_not_the_best(tmp_path, monkeypatch):
    """Right after a non-finite loss save() returns None: best_fp32.pt is not replaced, so neither are
    metrics.json and best_metric (they would describe weights that were never kept)."""
    import avfmae.metrics as metrics

    scores = iter([0.25, 0.5, 0.375])
    monkeypatch.setattr(metrics, "evaluation_scores", lambda *a: ({"war": next(scores)}, "war"))
    trainer = Trainer.__new__(Trainer)
    trainer.cfg = SimpleNamespace(regression=False)
    trainer.rank, trainer.out, trainer.log = 0, tmp_path, JsonlLog(tmp_path / "log.jsonl")
    trainer.predict = lambda loader: (torch.arange(4), torch.zeros(4, 3), torch.zeros(4))
    refused = {2}  # the step after a non-finite loss
    trainer.save = lambda state, reason: None if state.step in refused else f"step_{state.step:08d}"
    exported = []
    trainer.export = lambda tag, path: exported.append(tag)
    state = TrainState()
    for step in (1, 2, 3):
        state.step = state.epoch = step
        trainer.evaluate_and_keep_best([None], state)
        if step == 2:
            assert state.best_metric == 0.25 and json.loads((tmp_path / "metrics.json").read_text())["step"] == 1
    assert exported == ["step_00000001", "step_00000003"] and state.best_metric == 0.375
    assert json.loads((tmp_path / "metrics.json").read_text())["best"] == {"war": 0.375}


class Crash(Exception):
    """The process dying mid-step."""


class Watched(torch.Tensor):
    """A tensor that counts its reads on the host (each one makes the CPU wait for the device)."""

    reads = 0

    def _read(self, how):
        Watched.reads += 1
        return how(self.as_subclass(torch.Tensor))

    def tolist(self):
        return self._read(torch.Tensor.tolist)

    def item(self):
        return self._read(torch.Tensor.item)

    def __float__(self):
        return self._read(float)

    def __bool__(self):
        return self._read(bool)


class StubEngine:
    """DeepSpeed's engine as the loop uses it, on one process: each optimizer step changes the weights
    (so files tell steps apart); checkpoints are one file per tag, loaded back by load_checkpoint.
    ``losses``: each micro-step's loss terms ({name: value}; fine-tuning has "loss" only), as
    :class:`Watched` tensors."""

    def __init__(self, crash_at_step: int | None = None, losses: list[dict[str, float]] | None = None):
        self.module = torch.nn.Linear(1, 1)
        self.losses = iter(losses or [])
        self.module.compute_loss = lambda logits, target: self.micro_losses()["loss"]
        self.module.sample_masks = lambda batch, device, generator: "masks"
        self.skipped_steps, self.steps, self.crash_at_step = 0, 0, crash_at_step

    def micro_losses(self) -> dict[str, torch.Tensor]:
        terms = next(self.losses, {"loss": 1.0})
        return {k: torch.tensor(v).as_subclass(Watched) for k, v in terms.items()}

    def __call__(self, video, audio, masks=None):
        return self.module(video) if masks is None else self.micro_losses()

    def get_data_types(self):
        return (torch.float32,)

    def train(self):
        pass

    def backward(self, loss):
        pass

    def step(self):
        if self.steps + 1 == self.crash_at_step:
            raise Crash(f"killed during step {self.crash_at_step}")
        self.steps += 1
        with torch.no_grad():
            self.module.bias += 1.0

    def save_checkpoint(self, directory, tag, client_state, save_latest):
        (Path(directory) / tag).mkdir()
        torch.save({"module": self.module.state_dict(), **client_state}, Path(directory) / tag / "states.pt")

    def load_checkpoint(self, directory, tag):
        saved = torch.load(Path(directory) / tag / "states.pt", weights_only=True)
        self.module.load_state_dict(saved.pop("module"))
        return str(Path(directory) / tag), saved


def _stub_run(tmp_path: Path, engine: StubEngine, *, resume: bool, overrides: list[str], validate: bool = True,
              accum: int = 1) -> Trainer:
    """A Trainer whose run() goes through the real loop, checkpoints, evaluation bookkeeping and export,
    with the engine, loaders and predictions stubbed (one rank, no process group, 2 optimizer steps
    an epoch of ``accum`` micro-batches each)."""
    from avfmae.checkpoints import CheckpointManager
    from avfmae.training import load_config

    (tmp_path / "val.csv").write_text("video,audio,label\n")
    val = ["val_manifest=" + str(tmp_path / "val.csv")] if validate else []
    ds_config, cfg = load_config(tmp_path / "cfg.json", [*val, *overrides])
    trainer = Trainer.__new__(Trainer)
    trainer.cfg, trainer.ds_config, trainer.resume = cfg, {}, resume
    trainer.rank, trainer.world, trainer.device, trainer.accum = 0, 1, torch.device("cpu"), accum
    trainer.out = Path(cfg.output_dir)
    trainer.out.mkdir(exist_ok=True)
    trainer.log = JsonlLog(trainer.out / "log.jsonl")
    trainer.ckpt = CheckpointManager(trainer.out / "checkpoints", keep=cfg.keep_checkpoints)
    trainer.stop, trainer.mixup, trainer.progress = SimpleNamespace(requested=False), None, None
    trainer.nonfinite_streak = trainer.skipped_steps = 0
    trainer.peak_lr, trainer.min_lr, trainer.lr = 1e-3, 0.0, 0.0
    trainer.optimizer = SimpleNamespace(param_groups=[{}])
    trainer.read_manifests = lambda: None
    trainer.setup_engine = lambda: setattr(trainer, "engine", engine)
    trainer.micro_batches_per_epoch = lambda: 2 * accum
    batch = {"video": torch.zeros(1, 1), "audio": torch.zeros(1, 1), "label": torch.zeros(1, dtype=torch.long)}
    trainer.build_loaders = lambda start_epoch, start_batch: [batch] * (2 * accum - start_batch)
    trainer.progress_bar = lambda total, start: None
    trainer.agree_flags = lambda *flags: list(flags)
    trainer.val_loaders = lambda: [None]
    trainer.predict = lambda loader: (torch.arange(2), torch.zeros(2, 4), torch.zeros(2))
    return trainer


def test_after_a_resume_a_worse_score_does_not_replace_the_best(tmp_path, monkeypatch):
    """Step 2 ends epoch 1 and is checkpointed: the checkpoint must carry epoch 1's score as the best
    (the periodic save used to run before the evaluation and keep the old best), so the resumed run's
    worse scores leave best_fp32.pt and metrics.json alone."""
    import avfmae.metrics as metrics

    scores = iter([0.5, 0.375, 0.25])  # epochs 1 (run 1), 2 and 3 (the resumed run)
    monkeypatch.setattr(metrics, "evaluation_scores", lambda *a: ({"war": next(scores)}, "war"))
    _tiny_config(tmp_path, "finetune")
    settings = ["epochs=3", "checkpoint_every_steps=2", "eval_every_epochs=1", "keep_checkpoints=5"]
    first = StubEngine(crash_at_step=3)
    with pytest.raises(Crash):
        _stub_run(tmp_path, first, resume=False, overrides=settings).run()
    out = tmp_path / "out"
    best_weights, best_record = (out / "best_fp32.pt").read_bytes(), json.loads((out / "metrics.json").read_text())
    assert best_record["step"] == 2 and best_record["best"] == {"war": 0.5}
    saved = torch.load(out / "checkpoints" / "step_00000002" / "states.pt", weights_only=True)
    assert saved["train_state"] == {"step": 2, "epoch": 1, "best_metric": 0.5}
    exported = torch.load(out / "best_fp32.pt", weights_only=True)
    assert exported.keys() == saved["module"].keys()
    assert all(torch.equal(exported[k], saved["module"][k]) for k in exported)  # step 2's weights

    code = _stub_run(tmp_path, StubEngine(), resume=True, overrides=settings).run()
    assert code == ExitCode.COMPLETED
    assert (out / "best_fp32.pt").read_bytes() == best_weights
    assert json.loads((out / "metrics.json").read_text()) == best_record
    final = torch.load(out / "checkpoints" / "step_00000006" / "states.pt", weights_only=True)
    assert final["train_state"] == {"step": 6, "epoch": 3, "best_metric": 0.5}
    assert [(e["step"], e["war"]) for e in map(json.loads, (out / "log.jsonl").read_text().splitlines())
            if e["event"] == "eval"] == [(2, 0.5), (4, 0.375), (6, 0.25)]


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_a_micro_step_leaves_its_loss_terms_on_the_device(tmp_path, stage):
    """Reading a loss before engine.backward makes the CPU wait for the forward on every micro-step:
    the terms stay on the device until read_terms reads the optimizer step's in one copy."""
    terms = {"loss": 0.5, "loss_video": 0.25, "loss_audio": 0.75} if stage == "pretrain" else {"loss": 0.5}
    trainer = Trainer.__new__(Trainer)
    trainer.cfg = SimpleNamespace(seed=0, stage=stage, video_only=False)
    trainer.rank, trainer.device, trainer.mixup = 0, torch.device("cpu"), None
    trainer.engine = StubEngine(losses=[terms, terms])
    batch = {"video": torch.zeros(2, 1), "audio": torch.zeros(2, 1), "label": torch.zeros(2, dtype=torch.long)}
    Watched.reads = 0
    micro_steps = [trainer.train_micro_step(batch, step=0, micro=micro) for micro in (0, 1)]
    assert Watched.reads == 0
    assert [names for names, _ in micro_steps] == [list(terms)] * 2
    assert Trainer.read_terms(micro_steps) == (terms, {})
    assert Watched.reads == 1


def test_a_steps_terms_are_its_last_micro_steps_and_its_non_finite_ones_any_micro_steps(tmp_path):
    """Gradient accumulation over 2 micro-batches: the log shows each optimizer step's last micro-step's
    loss, a NaN in any micro-step counts the step as non-finite (naming the term), and the terms are
    read once per optimizer step."""
    _tiny_config(tmp_path, "finetune")
    losses = [{"loss": float("nan")}, {"loss": 2.0}, {"loss": 3.0}, {"loss": 4.0}]
    trainer = _stub_run(tmp_path, StubEngine(losses=losses), resume=False, validate=False, accum=2,
                        overrides=["epochs=1", "log_every_steps=1"])
    Watched.reads = 0
    assert trainer.run() == ExitCode.COMPLETED
    assert Watched.reads == 2  # one read per optimizer step, none per micro-step
    records = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records if r["event"] == "train"] == [(1, 2.0), (2, 4.0)]
    assert [(r["step"], r["terms"]) for r in records if r["event"] == "nonfinite"] == [(1, {"0": {"loss": "nan"}})]
    assert (tmp_path / "out" / "model_fp32.pt").exists()  # step 2 was finite: the run saved and exported


def test_train_state_round_trips_through_a_checkpoints_dict():
    import dataclasses

    state = TrainState(step=7, epoch=2, best_metric=0.5)
    assert TrainState.from_checkpoint(dataclasses.asdict(state)) == state
    assert TrainState.from_checkpoint({"step": 3}) == TrainState(step=3)  # keys a checkpoint lacks: defaults
    assert math.isnan(TrainState.from_checkpoint({"best_metric": float("nan")}).best_metric)


# --- set-up order and exit codes ----------------------------------------------------------------------------


def test_steps_that_need_an_earlier_one_name_it():
    trainer = Trainer.__new__(Trainer)
    with pytest.raises(RuntimeError, match=r"setup_engine\(\) first"):
        _ = trainer.engine
    with pytest.raises(RuntimeError, match=r"build_model\(\)"):
        _ = trainer.model_config
    trainer.manifests = None
    with pytest.raises(RuntimeError, match=r"read_manifests\(\) first"):
        trainer.manifest("val_manifest")
    trainer.manifests = {"train_manifest": object()}
    with pytest.raises(ValueError, match="avfmae.val_manifest: not set"):
        trainer.manifest("val_manifest")


def test_every_way_a_run_ends_has_its_own_exit_code():
    codes = [ExitCode.COMPLETED, ExitCode.CONFIG_ERROR, ExitCode.RUN_ERROR,
             *(reason.exit_code for reason in StopReason)]
    assert len(set(codes)) == len(codes) == len(ExitCode)
    assert ExitCode.COMPLETED == 0 and all(c != 0 and c != 1 for c in codes[1:])  # 1: Python's uncaught exception
    assert StopReason.SIGNAL.exit_code == 5 and StopReason.STOP_AT_STEP.exit_code == 4  # README's table


def _single_process(cfg: Path) -> subprocess.Popen:
    """train.py as one rank without the launcher (the cheapest real run: no second process)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", str(cfg)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.skipif(not DEEPSPEED.exists(), reason="needs the `train` extra (deepspeed)")
@pytest.mark.parametrize("ending", ["completed", "stop_at_step", "signal"])
def test_run_returns_the_exit_code_of_how_it_ended(dataset, tmp_path, ending):  # noqa: F811
    out = tmp_path / ending
    settings = {"completed": dict(max_steps=1), "stop_at_step": dict(stop_at_step=1),
                "signal": dict(epochs=50)}[ending]
    cfg = config(dataset, out, reconstruction_png=False, ds={"zero_optimization": {"stage": 0}}, **settings)
    proc = _single_process(cfg)
    if ending == "signal":
        wait_until(lambda: (out / "log.jsonl").exists() and events(out, "train"), proc, 240, "first train record")
        proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    expected = {"completed": ExitCode.COMPLETED, "stop_at_step": ExitCode.STOPPED_AT_STEP,
                "signal": ExitCode.STOPPED_BY_SIGNAL}[ending]
    assert proc.returncode == expected, output[-3000:]
    saved = events(out, "checkpoint")
    reason = {"completed": "final", "stop_at_step": "stop_at_step", "signal": "signal SIGTERM"}[ending]
    assert saved and saved[-1]["reason"] == reason, output[-3000:]
    assert (out / "model_fp32.pt").exists() == (ending == "completed")


def test_a_manifest_too_small_for_one_optimizer_step_is_a_config_error_before_the_model_is_built(tmp_path):
    from avfmae.train_config import ConfigError

    trainer = Trainer.__new__(Trainer)
    trainer.cfg = SimpleNamespace(epochs=1, max_steps=None, warmup_epochs=0.0)
    trainer.rank, trainer.world, trainer.accum = 0, 2, 2
    trainer.ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}
    built = []
    trainer.read_manifests = lambda: setattr(trainer, "manifests", {"train_manifest": ["clip"] * 5})
    trainer.setup_engine = lambda: built.append("engine")
    # 5 clips on 2 ranks: 3 per rank, 1 micro-batch of 2 (the rest dropped), one short of a step of 2 x 2
    with pytest.raises(ConfigError, match=r"avfmae.train_manifest: 5 clips make 1 micro-batches of "
                                          r"train_micro_batch_size_per_gpu=2 per rank \(2 ranks\), no optimizer "
                                          "step of gradient_accumulation_steps=2"):
        trainer.run()
    assert built == []
    trainer.manifests["train_manifest"] = ["clip"] * 8
    assert trainer.plan(trainer.micro_batches_per_epoch()).steps_per_epoch == 1


# --- drop-path: build_model owns the default ------------------------------------------------------------


def _tiny_config(tmp_path: Path, stage: str):
    """A loaded (ds_config, TrainConfig) pair for tiny at ``stage`` (an empty manifest: nothing is read)."""
    from avfmae.training import load_config

    (tmp_path / "train.csv").write_text("video,audio,label\n")
    section = {"size": "tiny", "stage": stage, "train_manifest": "train.csv", "output_dir": "out"}
    if stage != "pretrain":
        section["num_outputs"] = 4
    (tmp_path / "cfg.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "avfmae": section}))
    return load_config(tmp_path / "cfg.json")


@pytest.mark.parametrize("stage, task, kwargs", [
    ("pretrain", "pretrain", {}),
    ("finetune", "finetune", {"num_outputs": 4}),
    ("postpretrain", "finetune", {"num_outputs": 4}),
])
def test_the_trainers_model_gets_build_models_drop_path_default(tmp_path, stage, task, kwargs):
    import contextlib

    import avfmae
    from avfmae.training import load_config

    ds_config, cfg = _tiny_config(tmp_path, stage)
    assert cfg.drop_path is None  # the config leaves it to the model
    trainer = Trainer.__new__(Trainer)  # build_model only: no process group, so zero.Init (off at stage 0) stubbed
    zero = SimpleNamespace(Init=lambda config_dict_or_path, enabled: contextlib.nullcontext())
    trainer.cfg, trainer.ds_config, trainer.deepspeed = cfg, ds_config, SimpleNamespace(zero=zero)
    built = trainer.build_model()
    reference = avfmae.build_model("tiny", task, **kwargs).cfg.drop_path
    assert built.cfg.drop_path == reference == (0.1 if task == "finetune" else 0.0)
    # a value in the config still wins
    _, set_cfg = load_config(tmp_path / "cfg.json", ["drop_path=0.2"])
    trainer.cfg = set_cfg
    assert trainer.build_model().cfg.drop_path == 0.2


def test_the_optimizer_is_the_fused_adamw_on_cpu_and_updates_like_the_for_loop_one(tmp_path):
    """build_optimizer steps torch's fused AdamW on every device (its CPU kernel is 3.3x the for-loop
    update at base); one update with the config's groups matches the for-loop AdamW's."""
    import avfmae

    _, cfg = _tiny_config(tmp_path, "pretrain")
    torch.manual_seed(0)
    fused_model = avfmae.build_model("tiny", "pretrain")
    loop_model = avfmae.build_model("tiny", "pretrain")
    loop_model.load_state_dict(fused_model.state_dict())
    trainer = Trainer.__new__(Trainer)  # build_optimizer only: no process group, no engine
    trainer.cfg, trainer.peak_lr = cfg, 1e-2
    fused = trainer.build_optimizer(fused_model)
    assert fused.defaults["fused"] is True
    loop = torch.optim.AdamW(loop_model.param_groups(weight_decay=cfg.weight_decay), lr=1e-2, betas=cfg.betas,
                             weight_decay=cfg.weight_decay, foreach=False)
    assert [g["weight_decay"] for g in fused.param_groups] == [g["weight_decay"] for g in loop.param_groups]
    before = {n: p.detach().clone() for n, p in fused_model.named_parameters()}
    for model, optimizer in ((fused_model, fused), (loop_model, loop)):
        for p in model.parameters():
            p.grad = torch.linspace(-1, 1, p.numel()).reshape(p.shape)
        optimizer.step()
    for (name, got), want in zip(fused_model.named_parameters(), loop_model.parameters(), strict=True):
        assert not torch.equal(got, before[name]), name
        torch.testing.assert_close(got, want, msg=lambda m, n=name: f"{n}: {m}")


# --- the weights check under ZeRO-3 -------------------------------------------------------------------------


def test_the_weights_check_reads_a_zero3_partition_without_its_padding(tmp_path):
    """A ZeRO-3 partition is allocated with torch.empty and only the parameter's elements are copied in:
    NaN garbage in the padding must not stop a healthy run (it did, at random, in the launcher tests);
    a NaN among the real elements still does."""
    from avfmae.trainer import owned_elements

    module = torch.nn.Linear(3, 2)  # weight: 6 elements, bias: 2
    for param in module.parameters():
        with torch.no_grad():
            partition = torch.full((8,), float("nan"))  # one rank, partition of 8: the tail is padding
            partition[: param.numel()] = param.reshape(-1)
        param.ds_tensor, param.ds_numel = partition, param.numel()
    assert torch.equal(owned_elements(module.weight), module.weight.detach().reshape(-1))
    trainer = Trainer.__new__(Trainer)
    trainer.device, trainer.engine = torch.device("cpu"), SimpleNamespace(module=module)
    assert trainer.weights_finite()
    module.bias.ds_tensor[1] = float("inf")  # a real element of the partition diverged
    assert not trainer.weights_finite()
    plain = torch.nn.Linear(3, 2)  # no ZeRO-3: the whole tensor
    assert torch.equal(owned_elements(plain.weight), plain.weight.detach())
