"""The DeepSpeed training loop behind ``train.py`` (all three PSI stages).

Reproducible by construction: every step seeds its own RNG from (seed, step, rank), so masks,
drop-path and mixup/CutMix (supervised stages) do not depend on whether the run was resumed; the
data order is a function of (seed, epoch), and a resumed run's loader starts at the first batch of the
interrupted epoch it had not consumed (the ones before it are not decoded again).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .checkpoints import CheckpointManager, atomic_write, atomic_write_text
from .eval_views import average_views, eval_views
from .mixup import AudioVisualMixup
from .output_lock import OutputLock
from .runlog import JsonlLog
from .schedule import lr_at, scaled_lrs
from .stopping import ExitCode, RunError, StopFlag, StopReason
from .train_config import ConfigError, TrainConfig, mixing, model_arguments

SUPERVISED = ("postpretrain", "finetune")


@dataclasses.dataclass
class TrainState:
    """What a checkpoint carries besides DeepSpeed's own state (``client_state["train_state"]``, a dict)."""

    step: int = 0                     # optimizer steps done
    epoch: int = 0                    # epochs done (step // steps_per_epoch after each pass)
    best_metric: float | None = None  # the best validation score so far (None: no evaluation yet)

    @classmethod
    def from_checkpoint(cls, saved: dict) -> TrainState:
        """The state a checkpoint recorded; keys it lacks keep their defaults (older checkpoints)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """The run's step counts, from the manifest and the batch arithmetic, fixed before the first step."""

    steps_per_epoch: int  # optimizer steps per epoch
    total: int            # optimizer steps of the whole run (epochs, or max_steps when lower)
    warmup: int           # lr warm-up steps


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The RNG seed of one micro-step of one rank: a function of (seed, step, micro, rank) only, so a
    resumed run draws what the uninterrupted one drew. NumPy's SeedSequence hashes the tuple (the
    spawn key is the child index it was designed for), so distinct tuples get distinct, uncorrelated
    streams for any accumulation depth or number of ranks (a packed integer would collide). 64 bits:
    what ``torch.manual_seed`` and ``torch.Generator.manual_seed`` take."""
    sequence = np.random.SeedSequence(entropy=seed, spawn_key=(step, micro, rank))
    return int(sequence.generate_state(1, dtype=np.uint64)[0])


def owned_elements(param: torch.Tensor) -> torch.Tensor:
    """The elements of ``param`` this rank holds: the whole tensor, or under ZeRO-3 its partition
    (``ds_tensor``) without the padding. DeepSpeed allocates a partition with ``torch.empty`` and copies
    only the parameter's elements into it, so the tail of the last partition (and any partition past the
    end) is uninitialised memory, NaN at random; it never reaches the model."""
    part = getattr(param, "ds_tensor", None)
    if part is None:
        return param.detach()
    group = getattr(param, "ds_process_group", None)
    rank = dist.get_rank(group=group) if dist.is_initialized() else 0
    valid = max(0, min(part.numel(), int(param.ds_numel) - part.numel() * rank))
    return part.detach().reshape(-1).narrow(0, 0, valid)


def improves(score: float, best: float | None) -> bool:
    """Whether ``score`` (higher is better) replaces ``best``: a NaN score never does; a finite score
    always replaces a missing or NaN best (a NaN would otherwise compare False forever)."""
    if math.isnan(score):
        return False
    return best is None or math.isnan(best) or score > best


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _agreed_error(error: str | None) -> None:
    """Raise :class:`RunError` on every rank when rank 0 found ``error`` (rank 0's value wins), so no
    rank is left waiting in a collective for one that left."""
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise RunError(error)


def _zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def read_init_checkpoint(path: str, model: torch.nn.Module) -> dict:
    """``init_checkpoint`` opened safely (``weights_only=True``: a file that needs more could run code):
    a state dict with at least one encoder key this model has, else a ConfigError naming the key.
    Checked by key names only, so it holds under ZeRO-3 (partitioned parameters) on every rank."""
    import pickle

    from .models import pretrained_encoder_state

    key = "config key avfmae.init_checkpoint"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{key}: {path} is not a weights file torch loads with weights_only=True ({first}). "
                          "Expected a plain state dict such as the previous stage's <output_dir>/model_fp32.pt; "
                          "files that need weights_only=False are never opened (unpickling can run code)") from err
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ConfigError(f"{key}: {path} holds a {type(state).__name__}, not a state dict (name -> tensor)")
    selected = pretrained_encoder_state(state)
    own = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    if not any(k in own and isinstance(v, torch.Tensor) for k, v in selected.items()):
        sample = ", ".join(list(state)[:5]) or "none"
        raise ConfigError(f"{key}: no key of {path} matches this model's encoders (video_encoder.*, "
                          f"audio_encoder.*, fusion.*); it has {len(state)} keys, e.g. {sample}. Wrong file, or a "
                          "checkpoint of another model?")
    return state


def clip_augmentations(cfg: TrainConfig) -> dict:
    """The ``dali_pipelines.ClipSpec`` fields of the training augmentations a config switches on."""
    from dali_pipelines.augment import RandAugmentSpec

    return dict(rand_augment=RandAugmentSpec.parse(cfg.rand_augment) if cfg.rand_augment else None,
                erase_prob=float(cfg.random_erase), erase_count=cfg.random_erase_count, audio_gain=cfg.audio_gain)


class Trainer:
    def __init__(self, ds_config: dict, cfg: TrainConfig, *, resume: bool, local_rank: int):
        import deepspeed

        self.deepspeed = deepspeed
        self.cfg = cfg
        self.ds_config = ds_config
        self.resume = resume
        self.cuda = torch.cuda.is_available()
        deepspeed.init_distributed(dist_backend="nccl" if self.cuda else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.cuda:
            torch.cuda.set_device(local_rank)
        self.device = torch.device("cuda", local_rank) if self.cuda else torch.device("cpu")
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = JsonlLog(self.out / "log.jsonl" if self.rank == 0 else None)
        self.ckpt = CheckpointManager(self.out / "checkpoints", keep=cfg.keep_checkpoints)
        self.lock = OutputLock(self.out)
        self.claim_output_dir()
        self.stop = StopFlag()
        self.mixup = self.build_mixup()
        self.nonfinite_streak = 0   # optimizer steps in a row with a non-finite loss term on some rank
        self.skipped_steps = 0      # steps DeepSpeed skipped (fp16 overflow)
        # the batch arithmetic and the lr it scales: known from the config and the world size alone
        self.accum = ds_config.get("gradient_accumulation_steps", 1)
        self.global_batch = ds_config["train_micro_batch_size_per_gpu"] * self.accum * self.world
        self.peak_lr, self.min_lr = scaled_lrs(cfg, self.global_batch)
        self.lr = 0.0               # the schedule's value at the current step (set before each micro-step)
        # built by the set-up steps of run(), in this order; the properties below name the missing step
        self.manifests: dict | None = None   # read_manifests()
        self._model_config = None            # build_model() (setup_engine())
        self._engine = None                  # setup_engine()
        self.optimizer = None                # setup_engine(): DeepSpeed's wrapper of the AdamW groups
        self.progress = None                 # run(): the rank-0 progress bar
        self._val_loaders = None             # val_loaders(): one per test view, built at the first evaluation

    @property
    def engine(self):
        if getattr(self, "_engine", None) is None:
            raise RuntimeError("Trainer.engine: no DeepSpeed engine yet; call setup_engine() first (run() does)")
        return self._engine

    @engine.setter
    def engine(self, engine) -> None:
        self._engine = engine

    @property
    def model_config(self):
        if getattr(self, "_model_config", None) is None:
            raise RuntimeError("Trainer.model_config: no model yet; call build_model() (setup_engine() does) first")
        return self._model_config

    def manifest(self, key: str):
        """The checked manifest ``key`` (``train_manifest`` or ``val_manifest``)."""
        if self.manifests is None:
            raise RuntimeError(f"Trainer.manifest({key!r}): call read_manifests() first (run() does)")
        if key not in self.manifests:
            raise ConfigError(f"config key avfmae.{key}: not set, and this step needs it")
        return self.manifests[key]

    def claim_output_dir(self) -> None:
        """Rank 0 takes the output_dir's lock; a run without --resume may not write over a run's
        checkpoints or weights. Every rank raises the same RunError when either fails."""
        error = None
        if self.rank == 0:
            try:
                self.lock.acquire()
                found = self.ckpt.tags() or [p.name for p in (self.out / "model_fp32.pt",) if p.exists()]
                if found and not self.resume:
                    error = (f"output_dir {self.out} already holds a run ({found[0]}); continue it with --resume, "
                             "or choose another output_dir (nothing was changed)")
            except RunError as err:
                error = str(err)
        _agreed_error(error)

    # --- setup ----------------------------------------------------------------------------------------

    def build_model(self) -> torch.nn.Module:
        from . import build_model

        cfg = self.cfg
        task, kwargs = model_arguments(cfg)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in every run
        with self.deepspeed.zero.Init(config_dict_or_path=self.ds_config, enabled=_zero_stage(self.ds_config) == 3):
            model = build_model(cfg.size, task, **kwargs)
        self._model_config = model.cfg
        return model

    def build_mixup(self) -> AudioVisualMixup | None:
        """Mixup/CutMix of supervised classification steps; None when the stage does not mix."""
        cfg = self.cfg
        if cfg.stage not in SUPERVISED or cfg.regression or not mixing(cfg):
            return None
        return AudioVisualMixup(cfg.num_outputs, mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                                switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.label_smoothing,
                                mix_audio=cfg.mixup_audio)

    def load_init_checkpoint(self, model: torch.nn.Module) -> None:
        path = self.cfg.init_checkpoint
        if path is None:
            return
        state = read_init_checkpoint(path, model)
        params = list(model.parameters())
        # under ZeRO-3 parameters are partitioned: gather them, let rank 0 write, re-partition; otherwise
        # every rank holds a full copy and loads it itself
        zero3 = _zero_stage(self.ds_config) == 3
        with self.deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=zero3):
            if self.rank == 0 or not zero3:
                missing, unexpected = model.load_pretrained_encoders(state)
            if self.rank == 0:
                self.report_init_checkpoint(path, missing, unexpected)

    def report_init_checkpoint(self, path: str, missing: list[str], unexpected: list[str]) -> None:
        def some(keys: list[str]) -> str:
            return ", ".join(keys[:12]) + (", ..." if len(keys) > 12 else "")

        print(f"init checkpoint {path}: {len(missing)} missing keys, {len(unexpected)} unexpected keys")
        if missing:
            print(f"  missing (initialised fresh): {some(missing)}")
        if unexpected:
            print(f"  unexpected (ignored): {some(unexpected)}")
        self.log.write(event="init_checkpoint", init_checkpoint=path, missing=missing, unexpected=unexpected)

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """AdamW over the model's parameter groups at the scaled peak lr (``scaled_lrs`` of the global batch)."""
        cfg = self.cfg
        layer_decay = cfg.layer_decay if cfg.stage != "pretrain" and cfg.layer_decay is not None else 1.0
        groups = model.param_groups(weight_decay=cfg.weight_decay, layer_decay=layer_decay)
        # torch's fused AdamW has CPU and CUDA kernels: one pass over all parameters, no host sync on
        # CUDA, and 3.3x the for-loop update on a 2-core CPU (design notes, "AdamW is fused")
        return torch.optim.AdamW(groups, lr=self.peak_lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                 fused=True)

    def loader_arguments(self) -> dict:
        """The arguments the train and validation loaders share (needs the model's geometry)."""
        from dali_pipelines import ClipSpec, LoaderOptions

        cfg, mc = self.cfg, self.model_config
        spec = ClipSpec.for_model(mc, **clip_augmentations(cfg))  # evaluation ignores the augmentations
        device = cfg.data_device if cfg.data_device != "auto" else ("gpu" if self.cuda else "cpu")
        options = LoaderOptions(device=device, num_threads=cfg.data_threads, seed=cfg.seed, shard_id=self.rank,
                                num_shards=self.world, spec=spec, device_id=self.device.index if self.cuda else None,
                                bad_clips=cfg.bad_clips, max_bad_clip_fraction=cfg.max_bad_clip_fraction,
                                video_decoder=cfg.data_video_decoder)
        return dict(batch_size=self.ds_config["train_micro_batch_size_per_gpu"], options=options)

    def build_loaders(self, start_epoch: int, start_batch: int = 0):
        """The train loader for this rank: its first pass is ``start_epoch`` from micro-batch ``start_batch``."""
        from dali_pipelines import build_loader

        return build_loader(self.manifest("train_manifest"), train=True, start_epoch=start_epoch,
                            start_batch=start_batch, **self.loader_arguments())

    def val_loaders(self) -> list:
        """One validation loader per test view (``test_clips`` x ``test_crops``), built once, on first use:
        a DALI pipeline cannot restart an epoch, so each view keeps its own and runs whole epochs."""
        if self._val_loaders is None:
            from dali_pipelines import build_loader

            common = self.loader_arguments()
            self._val_loaders = [build_loader(self.manifest("val_manifest"), train=False, view=view, **common)
                                 for view in eval_views(self.cfg)]
        return self._val_loaders

    # --- the loop -------------------------------------------------------------------------------------

    def read_manifests(self) -> None:
        """Read and check both manifests before any work: labels against the stage's task (stated by
        ``regression``, never guessed) and ``num_outputs``, naming each bad row."""
        from dali_pipelines import ManifestError, read_manifest

        cfg = self.cfg
        check = {} if cfg.stage == "pretrain" else dict(
            task="regression" if cfg.regression else "classification", num_outputs=cfg.num_outputs)
        self.manifests = {}
        for key in ("train_manifest", "val_manifest"):
            path = getattr(cfg, key)
            if path is not None:
                try:
                    self.manifests[key] = self.probe_media(key, read_manifest(path, **check))
                except ManifestError as err:
                    raise ConfigError(f"config key avfmae.{key}: {err}") from err

    def probe_media(self, key: str, manifest):
        """The start-up probe (file size, container signature; no decoding) of every clip, each rank a
        slice, gathered so that every rank draws the same conclusion: ``bad_clips: error`` stops with
        the list, ``skip`` drops those rows (logged) unless more than ``max_bad_clip_fraction`` are bad.
        The full checks run when a clip is first decoded (dali_pipelines.source.check_clip)."""
        from dali_pipelines import ManifestError
        from dali_pipelines.source import quick_check

        mine = {}
        for row in range(self.rank, len(manifest), self.world):
            clip = manifest.clips[row]
            for kind, path in (("video", clip.video), ("audio", clip.audio)):
                problem = quick_check(path, kind)
                if problem:
                    mine[row] = f"{path}: {problem}"
                    break
        found = [mine]
        if self.world > 1:
            found = [None] * self.world
            dist.all_gather_object(found, mine)
        bad = dict(sorted(kv for part in found for kv in part.items()))
        if not bad:
            return manifest
        lines = [f"  line {manifest.clips[row].line}: {why}" for row, why in bad.items()]
        fix = (f"Fix: re-extract or re-encode these files, or remove their rows; or set `bad_clips: skip` to leave "
               f"them out (up to max_bad_clip_fraction={self.cfg.max_bad_clip_fraction})")
        if self.cfg.bad_clips == "error" or len(bad) > self.cfg.max_bad_clip_fraction * len(manifest):
            limit = "" if self.cfg.bad_clips == "error" else " (more than max_bad_clip_fraction)"
            raise ManifestError(f"{len(bad)} of {len(manifest)} clips of {manifest.path} fail the start-up "
                                f"probe{limit}:\n" + "\n".join(lines[:10])
                                + (f"\n  ... and {len(lines) - 10} more" if len(lines) > 10 else "") + f"\n{fix}")
        if self.rank == 0:
            print(f"bad_clips=skip: leaving {len(bad)} of {len(manifest)} clips of {manifest.path} out:\n"
                  + "\n".join(lines), flush=True)
        self.log.write(event="bad_clips", manifest=str(manifest.path), skipped={manifest.clips[r].line: why
                                                                                for r, why in bad.items()})
        return dataclasses.replace(manifest, clips=tuple(c for r, c in enumerate(manifest.clips) if r not in bad))

    def run(self) -> ExitCode:
        """Train the configured stage to the end, or until stopped with a checkpoint (a signal,
        ``stop_at_step``). Returns :attr:`ExitCode.COMPLETED` or the stop's exit code; a run that
        cannot go on raises :class:`RunError` (or :class:`ConfigError`) on every rank instead."""
        self.read_manifests()
        plan = self.plan(self.micro_batches_per_epoch())  # from the manifest alone: before the model is built
        self.setup_engine()
        state = TrainState()
        if self.resume:
            state = self.load_resume(state)
        self.skipped_steps = int(getattr(self.engine, "skipped_steps", 0))  # a checkpoint restores DeepSpeed's count
        train_loader = self.build_loaders(start_epoch=state.step // plan.steps_per_epoch,
                                          start_batch=self.consumed_micro_batches(state, plan))
        self.progress = self.progress_bar(plan.total, state.step)
        stopped: StopReason | None = None
        while state.step < plan.total and stopped is None:
            stopped = self.train_epoch(train_loader, state, plan)
            state.epoch = state.step // plan.steps_per_epoch
            # a signal leaves at once; stop_at_step at the end of an epoch still evaluates it first
            if self.evaluation_due(state.step, plan) and stopped is not StopReason.SIGNAL:
                self.evaluate_and_keep_best(self.val_loaders(), state)
                if stopped is None and state.step % self.cfg.checkpoint_every_steps == 0:
                    self.save(state, reason="periodic")  # train_epoch left it to here: the new best included
            if stopped is not None:
                reason = f"signal {self.stop.signal_name}" if stopped is StopReason.SIGNAL else stopped.value
                self.save(state, reason=reason)
        if self.progress is not None:
            self.progress.close()
        if stopped is None:
            self.finish(state, train_loader)
            return ExitCode.COMPLETED
        if _is_rank0():
            print(f"stopped at step {state.step} ({stopped.value}) with a checkpoint in {self.ckpt.directory}; "
                  f"continue with --resume (exit {int(stopped.exit_code)})", flush=True)
        # The launcher kills the other ranks as soon as one exits non-zero: nobody leaves before every
        # rank is past its last write (rank 0's `latest`, the log line).
        _barrier()
        return stopped.exit_code

    def setup_engine(self) -> None:
        """Model (under zero.Init for ZeRO-3), init checkpoint, AdamW groups, DeepSpeed engine."""
        model = self.build_model()
        self.load_init_checkpoint(model)
        optimizer = self.build_optimizer(model)
        self.engine, self.optimizer, _, _ = self.deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config)
        self.compile_engine()

    def compile_engine(self) -> None:
        """torch.compile the model through DeepSpeed's ``engine.compile`` (which keeps ZeRO-3's parameter
        hooks working); the mode is passed to inductor only."""
        cfg = self.cfg
        if cfg.compile == "off":
            return
        kwargs = {"mode": cfg.compile} if cfg.compile != "default" and cfg.compile_backend == "inductor" else {}
        self.engine.compile(backend=cfg.compile_backend, compile_kwargs=kwargs)
        self.log.write(event="compile", mode=cfg.compile, backend=cfg.compile_backend,
                       compiled=bool(self.engine.is_compiled))

    def plan(self, micro_batches_per_epoch: int) -> StepPlan:
        """The run's step counts (and so the lr schedule's) from the micro-batches per epoch."""
        steps_per_epoch = micro_batches_per_epoch // self.accum
        if steps_per_epoch < 1:
            raise ConfigError(f"config key avfmae.train_manifest: {len(self.manifest('train_manifest'))} clips "
                              f"make {micro_batches_per_epoch} micro-batches of "
                              f"train_micro_batch_size_per_gpu={self.ds_config['train_micro_batch_size_per_gpu']} "
                              f"per rank ({self.world} ranks), no optimizer step of gradient_accumulation_steps="
                              f"{self.accum}: add clips or lower the batch size")
        total = self.cfg.epochs * steps_per_epoch
        if self.cfg.max_steps is not None:
            total = min(total, self.cfg.max_steps)
        return StepPlan(steps_per_epoch=steps_per_epoch, total=total,
                        warmup=round(self.cfg.warmup_epochs * steps_per_epoch))

    def micro_batches_per_epoch(self) -> int:
        """Micro-batches of every rank per epoch, from the manifest alone (before any loader exists)."""
        from dali_pipelines import LastBatchPolicy
        from dali_pipelines.source import batches_per_epoch

        clips = len(self.manifest("train_manifest"))
        micro = self.ds_config["train_micro_batch_size_per_gpu"]
        return batches_per_epoch(clips, self.rank, self.world, micro, LastBatchPolicy.DROP)

    def consumed_micro_batches(self, state: TrainState, plan: StepPlan) -> int:
        """Micro-batches of the current epoch already trained on (non-zero only when resuming mid-epoch)."""
        return (state.step % plan.steps_per_epoch) * self.accum

    def train_epoch(self, loader, state: TrainState, plan: StepPlan) -> StopReason | None:
        """One pass of ``loader``: a whole epoch, or, resuming mid-epoch, the rest of it (the loader was
        built to start there, so ``i`` counts micro-batches from the epoch's start either way).

        Returns None, or why the run stops here (the caller checkpoints).
        """
        self.engine.train()
        clock, samples = time.time(), 0
        for i, batch in enumerate(loader, start=self.consumed_micro_batches(state, plan)):
            if state.step >= plan.total:
                break  # max_steps reached mid-epoch
            self.lr = lr_at(state.step, plan.total, plan.warmup, self.peak_lr, self.min_lr)
            self.set_lr(self.optimizer, self.lr)
            if i % self.accum == 0:
                micro_steps = []  # this optimizer step's loss terms, on the device until it is done
            micro_steps.append(self.train_micro_step(batch, state.step, i % self.accum))
            samples += batch["video"].shape[0] * self.world
            if (i + 1) % self.accum:
                continue
            terms, nonfinite = self.read_terms(micro_steps)  # this rank's non-finite terms within the step
            state.step += 1
            rate = samples / max(time.time() - clock, 1e-9)
            self.count_skipped_step(state.step)
            self.report_step(state, terms, rate, plan.total)
            if state.step % self.cfg.log_every_steps == 0:
                clock, samples = time.time(), 0
            stop, any_nonfinite = self.agree_flags(self.stop.requested, bool(nonfinite))
            self.check_finite(state.step, any_nonfinite, nonfinite)
            if stop:
                return StopReason.SIGNAL
            if state.step == self.cfg.stop_at_step:
                return StopReason.STOP_AT_STEP
            # a step that evaluation follows is saved after it (run()): a checkpoint saved here would keep
            # the best score before that evaluation, and the save of a new best finds the step saved already
            if state.step % self.cfg.checkpoint_every_steps == 0 and not self.evaluation_due(state.step, plan):
                self.save(state, reason="periodic")
        return None

    def evaluation_due(self, step: int, plan: StepPlan) -> bool:
        """Whether run() evaluates after optimizer step ``step``: at the end of every
        ``eval_every_epochs``-th epoch and at the last step, when there is a validation set."""
        if not self.cfg.val_manifest:
            return False
        if step >= plan.total:
            return True
        return step % plan.steps_per_epoch == 0 and (step // plan.steps_per_epoch) % self.cfg.eval_every_epochs == 0

    def count_skipped_step(self, step: int) -> None:
        """Log a step DeepSpeed skipped (fp16 loss scaling found inf/NaN gradients); a host-side counter
        DeepSpeed keeps anyway, so no extra device sync."""
        skipped = int(getattr(self.engine, "skipped_steps", 0))
        if skipped > self.skipped_steps:
            self.skipped_steps = skipped
            scale = getattr(self.engine.optimizer, "cur_scale", None)
            self.log.write(event="skipped_step", step=step, skipped_steps=skipped, loss_scale=scale)

    def check_finite(self, step: int, any_nonfinite: bool, mine: dict[str, float]) -> None:
        """Count steps with a non-finite loss term on any rank; at ``max_nonfinite_steps`` in a row stop
        every rank with a RunError naming the step and the terms (no checkpoint, no export)."""
        if not any_nonfinite:
            self.nonfinite_streak = 0
            return
        self.nonfinite_streak += 1
        gathered = [mine]
        if dist.is_initialized() and self.world > 1:  # only on a bad step: which rank saw which term
            gathered = [None] * self.world
            dist.all_gather_object(gathered, mine)
        where = "; ".join(f"rank {r}: " + ", ".join(f"{k}={v}" for k, v in terms.items())
                          for r, terms in enumerate(gathered) if terms)
        self.log.write(event="nonfinite", step=step, streak=self.nonfinite_streak,
                       terms={r: t for r, t in enumerate(gathered) if t})
        if _is_rank0():
            print(f"step {step}: non-finite loss ({where}); {self.nonfinite_streak} step(s) in a row of "
                  f"max_nonfinite_steps={self.cfg.max_nonfinite_steps}", flush=True)
        if self.nonfinite_streak >= self.cfg.max_nonfinite_steps:
            last = self.ckpt.latest_tag()
            resume = (f"the last checkpoint, {last} in {self.ckpt.directory}, predates them: fix the cause "
                      "(lr, data, precision) and continue with --resume") if last else "no checkpoint was saved"
            raise RunError(f"stopped at step {step}: non-finite loss for {self.nonfinite_streak} step(s) in a row "
                           f"({where}); nothing was saved or exported after the first of them; {resume}")

    def report_step(self, state: TrainState, terms: dict[str, float], rate: float, total: int) -> None:
        lr = self.lr  # the schedule's value; parameter groups scale it by their layer-decay lr_scale
        if state.step % self.cfg.log_every_steps == 0 or state.step == total:
            extra = {"skipped_steps": self.skipped_steps} if self.skipped_steps else {}
            self.log.write(event="train", step=state.step, lr=lr, samples_per_s=round(rate, 2), **terms, **extra)
        if self.progress is not None:
            self.progress.set_postfix({**{k: f"{v:.4f}" for k, v in terms.items()}, "lr": f"{lr:.2e}",
                                       "samples/s": f"{rate:.1f}"}, refresh=False)
            self.progress.update(1)

    def finish(self, state: TrainState, train_loader) -> None:
        """Final checkpoint, consolidated fp32 export, reconstructions (pre-training), summary."""
        tag = self.save(state, reason="final")
        if tag is None:
            raise RunError(f"the run ended at step {state.step} right after a non-finite loss: no final checkpoint, "
                           f"no export; the last checkpoint is {self.ckpt.latest_tag()} in {self.ckpt.directory}")
        self.export(tag, self.out / "model_fp32.pt")
        if self.cfg.stage == "pretrain" and self.cfg.reconstruction_png:
            self.write_reconstructions(train_loader)
        if _is_rank0():
            summary = {"steps": state.step, "best_metric": state.best_metric}
            print(f"done: {json.dumps(summary)}; weights in {self.out / 'model_fp32.pt'}", flush=True)
        _barrier()

    def train_micro_step(self, batch: dict, step: int, micro: int) -> tuple[list[str], torch.Tensor]:
        """Forward, backward and (at the accumulation boundary) DeepSpeed's step of one micro-batch.
        Returns the loss terms' names and their values stacked on the device, unread: reading them here
        would make the CPU wait for the forward before it queues the backward (:meth:`read_terms` reads
        a whole optimizer step's at once)."""
        # one seed per (step, micro-step, rank): identical randomness whether or not the run resumed
        seed = step_seed(self.cfg.seed, step, micro, self.rank)
        torch.manual_seed(seed)
        engine = self.engine
        if self.cfg.stage == "pretrain":
            video, audio = self.inputs(batch)
            # masks drawn on the device, outside the (compiled) model: index inputs of a static graph
            masks = engine.module.sample_masks(video.shape[0], video.device,
                                               torch.Generator(video.device).manual_seed(seed))
            out = engine(video, audio, masks)
            loss = out["loss"]
            names = [k for k in out if k.startswith("loss")]
            values = torch.stack([out[k].detach().float() for k in names])
        else:
            video, audio, target = self.training_inputs(batch)
            logits = engine(video, audio)
            loss = engine.module.compute_loss(logits, target)
            names, values = ["loss"], loss.detach().float().reshape(1)
        engine.backward(loss)
        engine.step()
        return names, values

    @staticmethod
    def read_terms(micro_steps: list[tuple[list[str], torch.Tensor]]) -> tuple[dict[str, float], dict[str, float]]:
        """The loss terms of one optimizer step from its micro-steps' (names, device values), read in one
        device-to-host copy: (the last micro-step's terms, which are logged; every non-finite term of
        any micro-step, a later micro-step's value replacing an earlier one's)."""
        values = torch.cat([v for _, v in micro_steps]).tolist()  # the step's one host sync
        nonfinite, at = {}, 0
        for names, _ in micro_steps:
            terms = dict(zip(names, values[at:at + len(names)], strict=True))
            at += len(names)
            nonfinite.update({k: v for k, v in terms.items() if not math.isfinite(v)})
        return terms, nonfinite

    def inputs(self, batch: dict, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Video and audio on this rank's device in ``dtype``, by default the engine's compute dtype
        (DeepSpeed casts the model to bf16/fp16 but not its inputs); audio is None for a video-only
        classifier."""
        dtype = dtype or self.engine.get_data_types()[0]
        video = batch["video"].to(self.device, dtype)
        audio = None if self.cfg.video_only else batch["audio"].to(self.device, dtype)
        return video, audio

    def training_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Video, audio and target of a supervised training step: the labels as they come, or, with
        mixup/CutMix, the mixed clips and their soft targets (label smoothing included). Mixing runs
        in fp32 before the cast to the engine's dtype; the step's seed drives it."""
        label = batch["label"].to(self.device)
        if self.mixup is None:
            return *self.inputs(batch), label
        video, audio = self.inputs(batch, torch.float32)
        mixed = self.mixup(video, audio, label)
        dtype = self.engine.get_data_types()[0]
        audio = None if mixed.audio is None else mixed.audio.to(dtype)
        return mixed.video.to(dtype), audio, mixed.target

    @staticmethod
    def set_lr(optimizer, lr: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def agree_flags(self, *flags: bool) -> list[bool]:
        """Each flag OR-ed over the ranks in one all-reduce (the loop's one collective per step), so every
        rank stops, or counts a bad step, at the same step."""
        tensor = torch.tensor([1.0 if f else 0.0 for f in flags], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return [v > 0 for v in tensor.tolist()]

    def progress_bar(self, total: int, start: int):
        if self.rank != 0:
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=start, desc=f"{self.cfg.stage} {self.cfg.size}", unit="step",
                    dynamic_ncols=True, mininterval=1.0)

    # --- checkpoints ----------------------------------------------------------------------------------

    def save(self, state: TrainState, reason: str) -> str | None:
        """Checkpoint the current step (None: not saved, the weights follow a non-finite loss)."""
        if self.nonfinite_streak:
            if _is_rank0():
                print(f"step {state.step}: no {reason} checkpoint after a non-finite loss", flush=True)
            self.log.write(event="checkpoint_refused", step=state.step, reason=reason)
            return None
        tag = self.ckpt.tag_for(state.step)
        if tag in self.ckpt.tags() and self.ckpt.problem(tag) is None:
            # this very state is saved already (best and stop at one step; a resumed run with nothing left
            # to do): never overwrite a complete checkpoint
            self.log.write(event="checkpoint", step=state.step, tag=tag, reason=reason, saved_before=True)
            return tag
        if not self.weights_finite():
            raise RunError(f"step {state.step}: the weights hold NaN/inf (the last update diverged while its loss "
                           f"was still finite); no {reason} checkpoint written. The last checkpoint is "
                           f"{self.ckpt.latest_tag()} in {self.ckpt.directory}: fix the cause (lr, data, precision) "
                           "and continue with --resume")
        tag = self.ckpt.save(self.engine, state.step, client_state={"train_state": dataclasses.asdict(state)},
                             is_rank0=self.rank == 0, barrier=_barrier, world=self.world)
        self.log.write(event="checkpoint", step=state.step, tag=tag, reason=reason)
        return tag

    def weights_finite(self) -> bool:
        """Whether every rank's parameters (its ZeRO-3 partition, or the full tensors) are finite: one
        reduction and one all-reduce per checkpoint, nothing per step."""
        local = [owned_elements(p) for p in self.engine.module.parameters()]
        checks = [torch.isfinite(t).all() for t in local if t.numel()]
        ok = torch.stack(checks).all() if checks else torch.tensor(True)
        flag = ok.float().reshape(1).to(self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def load_resume(self, state: TrainState) -> TrainState:
        """Load the newest checkpoint complete on every rank (see CheckpointManager). Newer, unusable
        tags are renamed out of the way, never deleted; none usable among several is a RunError."""
        mine = {tag: self.ckpt.problem(tag, self.world) for tag in self.ckpt.tags()}
        every = [mine]
        if self.world > 1:
            every = [None] * self.world
            dist.all_gather_object(every, mine)
        tag, skipped = self.ckpt.choose(every)
        why = "".join(f"\n  skipped {t}: {reason}" for t, reason in skipped.items())
        if tag is None and not skipped:
            if _is_rank0():
                print(f"--resume: no checkpoint in {self.ckpt.directory} yet; starting from step 0", flush=True)
            return state
        if tag is None:
            raise RunError(f"--resume: no usable checkpoint in {self.ckpt.directory} (nothing was changed):{why}")
        if self.rank == 0:
            moved = [self.ckpt.set_aside(t) for t in skipped]
            if self.ckpt.latest_tag() != tag:
                atomic_write_text(self.ckpt.directory / self.ckpt.LATEST, tag)
            print(f"--resume: {tag} is the newest checkpoint complete on every rank" + why
                  + "".join(f"\n  kept as {p.name} (never deleted)" for p in moved), flush=True)
        _barrier()
        path, client = self.engine.load_checkpoint(str(self.ckpt.directory), tag=tag)
        if path is None or not client or "train_state" not in client:
            raise RunError(f"--resume: DeepSpeed could not load {self.ckpt.directory / tag}")
        restored = TrainState.from_checkpoint(client["train_state"])
        if _is_rank0():
            print(f"resumed from {tag} (step {restored.step})", flush=True)
        self.log.write(event="resume", tag=tag, step=restored.step, skipped=skipped)
        return restored

    def export(self, tag: str, path: Path) -> None:
        """Consolidated fp32 weights of checkpoint ``tag`` as a plain state dict (rank 0 writes); weights
        with a NaN/inf are a RunError on every rank, nothing written."""
        error = None
        if self.rank == 0:
            if _zero_stage(self.ds_config) > 0:
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                state_dict = get_fp32_state_dict_from_zero_checkpoint(str(self.ckpt.directory), tag=tag)
            else:
                state_dict = {k: v.float().cpu() for k, v in self.engine.module.state_dict().items()}
            bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
            if bad:
                error = (f"not exporting {path.name}: checkpoint {tag} holds non-finite weights in {len(bad)} "
                         f"tensor(s) ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''})")
            else:
                atomic_write(path, lambda fh: torch.save(state_dict, fh))
        _agreed_error(error)

    # --- evaluation -----------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(manifest rows, outputs, labels) of one pass of ``loader``, gathered from every rank, padding
        removed, in manifest order."""
        self.engine.eval()
        indices, outputs, labels = [], [], []
        for batch in loader:
            video, audio = self.inputs(batch)
            outputs.append(self.engine(video, audio).float().cpu())
            labels.append(batch["label"].float().cpu())
            indices.append(batch["index"].long().cpu())
        gathered = [None] * self.world
        dist.all_gather_object(gathered, (torch.cat(indices), torch.cat(outputs), torch.cat(labels)))
        index, out, lab = (torch.cat([g[k] for g in gathered]) for k in range(3))
        keep = index >= 0  # FILL padding carries index -1
        index, out, lab = index[keep], out[keep], lab[keep]
        order = torch.argsort(index, stable=True)
        self.engine.train()
        return index[order], out[order], lab[order]

    def evaluate_and_keep_best(self, loaders: list, state: TrainState) -> None:
        """Scores of the validation set, one pass per test view; a clip's prediction averages its views
        (softmax probabilities, or regression outputs: :func:`average_views`)."""
        from . import metrics

        views = [self.predict(loader) for loader in loaders]  # manifest order, no padding
        index, _, labels = views[0]
        if any(not torch.equal(idx, index) for idx, _, _ in views[1:]):
            raise RuntimeError("validation views hold different manifest rows; cannot average them per clip")
        outputs = average_views([out for _, out, _ in views], self.cfg.regression)
        scores, key = metrics.evaluation_scores(labels if self.cfg.regression else labels.long(), outputs,
                                                self.cfg.regression)
        self.log.write(event="eval", step=state.step, epoch=state.epoch, samples=len(labels),
                       views=len(views), **scores)
        if _is_rank0():
            print(f"eval epoch {state.epoch}: " + ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
        if improves(scores[key], state.best_metric):
            previous, state.best_metric = state.best_metric, scores[key]
            tag = self.save(state, reason="best")  # the checkpoint records the new best
            if tag is None:
                # not saved (right after a non-finite loss): best_metric, best_fp32.pt and metrics.json
                # keep describing the same weights, so the score is not the best either
                state.best_metric = previous
                return
            self.export(tag, self.out / "best_fp32.pt")
            if _is_rank0():
                best = {"best": scores, "step": state.step, "epoch": state.epoch}
                atomic_write_text(self.out / "metrics.json", json.dumps(best, indent=2))

    # --- pictures -------------------------------------------------------------------------------------

    @torch.no_grad()
    def write_reconstructions(self, loader) -> None:
        """Input, masked input and reconstruction of a few clips (video frames and spectrograms)."""
        from .visualize import save_reconstructions

        self.engine.eval()
        batch = next(iter(loader))
        torch.manual_seed(self.cfg.seed)
        out = self.engine(*self.inputs(batch), return_predictions=True)
        if self.rank == 0:
            path = save_reconstructions(out, batch, self.model_config, self.out / "reconstructions.png")
            print(f"reconstructions: {path}", flush=True)
        _barrier()
