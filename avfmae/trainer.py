"""The DeepSpeed training loop behind ``train.py`` (all three PSI stages).

Reproducible by construction: every step seeds its own RNG from (seed, step, rank), so masks,
drop-path and mixup/CutMix (supervised stages) do not depend on whether the run was resumed; the
data order is a function of (seed, epoch), and a resumed run's loader starts at the first batch of the
interrupted epoch it had not consumed (the ones before it are not decoded again).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .mixup import AudioVisualMixup
from .training import (
    CheckpointManager,
    JsonlLog,
    StopFlag,
    TrainConfig,
    atomic_write_text,
    average_views,
    eval_views,
    lr_at,
    mixing,
)

SUPERVISED = ("postpretrain", "finetune")


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
        self.stop = StopFlag()
        self.mixup = self.build_mixup()
        self._val_loaders = None  # one per test view, built at the first evaluation

    # --- setup ----------------------------------------------------------------------------------------

    def build_model(self) -> torch.nn.Module:
        from . import build_model

        cfg = self.cfg
        overrides = dict(drop_path=cfg.drop_path, checkpoint_activations=cfg.activation_checkpointing)
        geometry = dict(num_frames=cfg.num_frames, image_size=cfg.image_size, audio_frames=cfg.audio_frames)
        overrides.update({k: v for k, v in geometry.items() if v is not None})
        if cfg.stage == "pretrain":
            overrides.update(video_mask_ratio=cfg.mask.video_ratio, audio_mask_ratio=cfg.mask.audio_ratio,
                             video_decoder_mask_ratio=cfg.mask.video_decoder_ratio,
                             audio_decoder_mask_ratio=cfg.mask.audio_decoder_ratio)
            task, kwargs = "pretrain", {}
        else:
            task = "finetune"
            kwargs = dict(num_outputs=cfg.num_outputs, regression=cfg.regression, video_only=cfg.video_only,
                          label_smoothing=cfg.label_smoothing)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in every run
        with self.deepspeed.zero.Init(config_dict_or_path=self.ds_config, enabled=_zero_stage(self.ds_config) == 3):
            model = build_model(cfg.size, task, **kwargs, **overrides)
        self.model_config = model.cfg
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
        state = torch.load(path, map_location="cpu", weights_only=True)
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

    def build_optimizer(self, model: torch.nn.Module, global_batch: int) -> torch.optim.Optimizer:
        cfg = self.cfg
        self.peak_lr = cfg.lr * global_batch / cfg.lr_batch
        layer_decay = cfg.layer_decay if cfg.stage != "pretrain" and cfg.layer_decay is not None else 1.0
        groups = model.param_groups(weight_decay=cfg.weight_decay, layer_decay=layer_decay)
        kwargs = dict(lr=self.peak_lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        if self.cuda:
            kwargs["fused"] = True
        return torch.optim.AdamW(groups, **kwargs)

    def build_loaders(self, start_epoch: int, start_batch: int = 0):
        """The train loader for this rank (its first pass is ``start_epoch`` from micro-batch
        ``start_batch``); keeps the arguments the validation loaders share with it (:meth:`val_loaders`)."""
        from dali_pipelines import ClipSpec, build_loader

        cfg, mc = self.cfg, self.model_config
        spec = ClipSpec(num_frames=mc.num_frames, frame_size=mc.image_size, audio_frames=mc.audio_frames,
                        mel_bins=mc.audio_bins)
        device = cfg.data_device if cfg.data_device != "auto" else ("gpu" if self.cuda else "cpu")
        common = dict(batch_size=self.ds_config["train_micro_batch_size_per_gpu"], device=device,
                      num_threads=cfg.data_threads, seed=cfg.seed, shard_id=self.rank, num_shards=self.world,
                      spec=spec, device_id=self.device.index if self.cuda else None,
                      video_decoder=cfg.data_video_decoder)
        self._loader_args = common
        return build_loader(cfg.train_manifest, train=True, start_epoch=start_epoch, start_batch=start_batch,
                            **common)

    def val_loaders(self) -> list:
        """One validation loader per test view (``test_clips`` x ``test_crops``), built once, on first use:
        a DALI pipeline cannot restart an epoch, so each view keeps its own and runs whole epochs."""
        if self._val_loaders is None:
            from dali_pipelines import build_loader

            self._val_loaders = [build_loader(self.cfg.val_manifest, train=False, view=view, **self._loader_args)
                                 for view in eval_views(self.cfg)]
        return self._val_loaders

    # --- the loop -------------------------------------------------------------------------------------

    def run(self) -> int:
        """Train the configured stage to the end (or until stopped with a checkpoint); returns 0."""
        self.setup_engine()
        state = {"step": 0, "epoch": 0, "best_metric": None}
        if self.resume:
            state = self.load_latest(state)
        steps_per_epoch, total = self.plan(self.micro_batches_per_epoch())
        train_loader = self.build_loaders(start_epoch=state["step"] // steps_per_epoch,
                                          start_batch=self.consumed_micro_batches(state, steps_per_epoch))
        self.progress = self.progress_bar(total, state["step"])
        stopped = None
        while state["step"] < total and stopped is None:
            stopped = self.train_epoch(train_loader, state, steps_per_epoch, total)
            state["epoch"] = state["step"] // steps_per_epoch
            epoch_done = state["step"] % steps_per_epoch == 0 or state["step"] >= total
            due = epoch_done and (state["epoch"] % self.cfg.eval_every_epochs == 0 or state["step"] >= total)
            # a signal leaves at once; stop_at_step at the end of an epoch still evaluates it first
            if self.cfg.val_manifest and due and stopped != "signal":
                self.evaluate_and_keep_best(self.val_loaders(), state)
            if stopped is not None:
                self.save(state, reason=f"signal {self.stop.signal_name}" if stopped == "signal" else stopped)
        if self.progress is not None:
            self.progress.close()
        if not stopped:
            self.finish(state, train_loader)
        elif _is_rank0():
            print(f"stopped at step {state['step']} with a checkpoint in {self.ckpt.directory}; "
                  "continue with --resume", flush=True)
        return 0

    def setup_engine(self) -> None:
        """Model (under zero.Init for ZeRO-3), init checkpoint, AdamW groups, DeepSpeed engine."""
        model = self.build_model()
        self.load_init_checkpoint(model)
        self.accum = self.ds_config.get("gradient_accumulation_steps", 1)
        global_batch = self.ds_config["train_micro_batch_size_per_gpu"] * self.accum * self.world
        optimizer = self.build_optimizer(model, global_batch)
        self.engine, self.optimizer, _, _ = self.deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config)

    def plan(self, micro_batches_per_epoch: int) -> tuple[int, int]:
        """(optimizer steps per epoch, total steps); sets the lr schedule."""
        steps_per_epoch = micro_batches_per_epoch // self.accum
        if steps_per_epoch < 1:
            raise ValueError(f"train_manifest: {micro_batches_per_epoch} micro-batches per rank make no "
                             f"optimizer step (gradient_accumulation_steps={self.accum}); add clips or lower "
                             "the batch size")
        total = self.cfg.epochs * steps_per_epoch
        if self.cfg.max_steps is not None:
            total = min(total, self.cfg.max_steps)
        self.schedule = dict(total=total, warmup=round(self.cfg.warmup_epochs * steps_per_epoch))
        return steps_per_epoch, total

    def micro_batches_per_epoch(self) -> int:
        """Micro-batches of every rank per epoch, from the manifest alone (before any loader exists)."""
        from dali_pipelines import LastBatchPolicy, read_manifest
        from dali_pipelines.source import batches_per_epoch

        clips = len(read_manifest(self.cfg.train_manifest))
        micro = self.ds_config["train_micro_batch_size_per_gpu"]
        return batches_per_epoch(clips, self.rank, self.world, micro, LastBatchPolicy.DROP)

    def consumed_micro_batches(self, state: dict, steps_per_epoch: int) -> int:
        """Micro-batches of the current epoch already trained on (non-zero only when resuming mid-epoch)."""
        return (state["step"] % steps_per_epoch) * self.accum

    def train_epoch(self, loader, state: dict, steps_per_epoch: int, total: int) -> str | None:
        """One pass of ``loader``: a whole epoch, or, resuming mid-epoch, the rest of it (the loader was
        built to start there, so ``i`` counts micro-batches from the epoch's start either way).

        Returns None, or why the run stops here ("signal" or "stop_at_step"; the caller checkpoints).
        """
        self.engine.train()
        clock, samples = time.time(), 0
        for i, batch in enumerate(loader, start=self.consumed_micro_batches(state, steps_per_epoch)):
            if state["step"] >= total:
                break  # max_steps reached mid-epoch
            self.lr = lr_at(state["step"], total, self.schedule["warmup"], self.peak_lr, self.cfg.min_lr)
            self.set_lr(self.optimizer, self.lr)
            terms = self.train_micro_step(batch, state["step"], i % self.accum)
            samples += batch["video"].shape[0] * self.world
            if (i + 1) % self.accum:
                continue
            state["step"] += 1
            rate = samples / max(time.time() - clock, 1e-9)
            self.report_step(state, terms, rate, total)
            if state["step"] % self.cfg.log_every_steps == 0:
                clock, samples = time.time(), 0
            if self.stop_requested():
                return "signal"
            if state["step"] == self.cfg.stop_at_step:
                return "stop_at_step"
            if state["step"] % self.cfg.checkpoint_every_steps == 0:
                self.save(state, reason="periodic")
        return None

    def report_step(self, state: dict, terms: dict[str, float], rate: float, total: int) -> None:
        lr = self.lr  # the schedule's value; parameter groups scale it by their layer-decay lr_scale
        if state["step"] % self.cfg.log_every_steps == 0 or state["step"] == total:
            self.log.write(event="train", step=state["step"], lr=lr, samples_per_s=round(rate, 2), **terms)
        if self.progress is not None:
            self.progress.set_postfix({**{k: f"{v:.4f}" for k, v in terms.items()}, "lr": f"{lr:.2e}",
                                       "samples/s": f"{rate:.1f}"}, refresh=False)
            self.progress.update(1)

    def finish(self, state: dict, train_loader) -> None:
        """Final checkpoint, consolidated fp32 export, reconstructions (pre-training), summary."""
        tag = self.save(state, reason="final")
        self.export(tag, self.out / "model_fp32.pt")
        if self.cfg.stage == "pretrain" and self.cfg.reconstruction_png:
            self.write_reconstructions(train_loader)
        if _is_rank0():
            summary = {"steps": state["step"], "best_metric": state["best_metric"]}
            print(f"done: {json.dumps(summary)}; weights in {self.out / 'model_fp32.pt'}", flush=True)
        _barrier()

    def train_micro_step(self, batch: dict, step: int, micro: int) -> dict[str, float]:
        # one seed per (step, micro-step, rank): identical randomness whether or not the run resumed
        torch.manual_seed(((self.cfg.seed * 1_000_003 + step) * 64 + micro) * 4096 + self.rank)
        engine = self.engine
        if self.cfg.stage == "pretrain":
            out = engine(*self.inputs(batch))
            loss = out["loss"]
            names = [k for k in out if k.startswith("loss")]
            values = torch.stack([out[k].detach().float() for k in names]).tolist()  # one device sync
            terms = dict(zip(names, values, strict=True))
        else:
            video, audio, target = self.training_inputs(batch)
            logits = engine(video, audio)
            loss = engine.module.compute_loss(logits, target)
            terms = {"loss": float(loss.detach())}
        engine.backward(loss)
        engine.step()
        return terms

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

    def stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if self.stop.requested else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return bool(flag.item())

    def progress_bar(self, total: int, start: int):
        if self.rank != 0:
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=start, desc=f"{self.cfg.stage} {self.cfg.size}", unit="step",
                    dynamic_ncols=True, mininterval=1.0)

    # --- checkpoints ----------------------------------------------------------------------------------

    def save(self, state: dict, reason: str) -> str:
        tag = self.ckpt.save(self.engine, state["step"], client_state={"train_state": dict(state)},
                             is_rank0=self.rank == 0, barrier=_barrier)
        self.log.write(event="checkpoint", step=state["step"], tag=tag, reason=reason)
        return tag

    def load_latest(self, state: dict) -> dict:
        tag = self.ckpt.latest_tag()
        if tag is None:
            if _is_rank0():
                print(f"--resume: no complete checkpoint in {self.ckpt.directory}; starting from step 0")
            return state
        _, client = self.engine.load_checkpoint(str(self.ckpt.directory), tag=tag)
        restored = dict(client["train_state"])
        if _is_rank0():
            print(f"resumed from {tag} (step {restored['step']})")
        self.log.write(event="resume", tag=tag, step=restored["step"])
        return restored

    def export(self, tag: str, path: Path) -> None:
        """Consolidated fp32 weights of checkpoint ``tag`` as a plain state dict (rank 0 writes)."""
        if self.rank == 0:
            if _zero_stage(self.ds_config) > 0:
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                state_dict = get_fp32_state_dict_from_zero_checkpoint(str(self.ckpt.directory), tag=tag)
            else:
                state_dict = {k: v.float().cpu() for k, v in self.engine.module.state_dict().items()}
            atomic_torch_save(state_dict, path)
        _barrier()

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

    def evaluate_and_keep_best(self, loaders: list, state: dict) -> None:
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
        self.log.write(event="eval", step=state["step"], epoch=state["epoch"], samples=len(labels),
                       views=len(views), **scores)
        if _is_rank0():
            print(f"eval epoch {state['epoch']}: " + ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
        if state["best_metric"] is None or scores[key] > state["best_metric"]:
            state["best_metric"] = scores[key]
            tag = self.save(state, reason="best")
            self.export(tag, self.out / "best_fp32.pt")
            if _is_rank0():
                best = {"best": scores, "step": state["step"], "epoch": state["epoch"]}
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
