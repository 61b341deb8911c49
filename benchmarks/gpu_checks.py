"""GPU-only checks of run_gpu.sh: a training step makes no host sync, as CUDA itself reports it.

``torch.cuda.set_sync_debug_mode("error")`` makes every synchronising CUDA call raise. For each model
task (pre-training with both fusions, the HiCMAE baseline, fine-tuning) at the given size, one
warm-up step runs first (Triton autotuning and lazy initialisation may synchronise; they happen once),
then forward + backward run under "error", then the fused AdamW step. The result is one JSON file.

On a machine without CUDA the same steps run on the CPU and the syncs are counted at the dispatcher
(``avfmae.op_count``) instead, so the script's plumbing is testable anywhere:

    python -m benchmarks.gpu_checks --size base --out benchmarks/results/sync-check.json
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch

import avfmae
from avfmae.op_count import count_ops

TASKS = {
    "pretrain": dict(task="pretrain"),
    "pretrain-table4": dict(task="pretrain", fusion="hicmae"),
    "hicmae-baseline": dict(task="hicmae_pretrain"),
    "finetune": dict(task="finetune", num_outputs=7),
}


def _step_parts(name: str, size: str, batch: int, device: str):
    kwargs = dict(TASKS[name])
    task = kwargs.pop("task")
    model = avfmae.build_model(size, task, **kwargs).to(device).train()
    cfg = model.cfg
    video = torch.randn(batch, 3, cfg.num_frames, cfg.image_size, cfg.image_size, device=device)
    audio = torch.randn(batch, 1, cfg.audio_frames, cfg.audio_bins, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    if task == "finetune":
        target = torch.randint(7, (batch,), device=device)

        def fwd_bwd():
            model.compute_loss(model(video, audio), target).backward()
    else:
        masks = model.sample_masks(batch, device, torch.Generator(device).manual_seed(0))

        def fwd_bwd():
            model(video, audio, masks)["loss"].backward()

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def model_step():
        with autocast():
            fwd_bwd()

    return model_step, optimizer


def check(name: str, size: str, batch: int) -> dict:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    result: dict = {"task": name, "size": size, "batch": batch, "device": device}
    try:
        model_step, optimizer = _step_parts(name, size, batch, device)
        model_step()  # warm-up: autotuning, allocator, lazy CUDA state
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            result["model_step"] = _under_sync_error(model_step)
            result["optimizer_step"] = _under_sync_error(optimizer.step)
        else:
            counts = count_ops(model_step)
            result["model_step"] = "ok" if counts.num_syncs == 0 else f"host syncs {counts.syncs}"
            result["optimizer_step"] = "not checked on CPU"
    except Exception as err:  # recorded, so one broken task does not hide the others
        result["error"] = "".join(traceback.format_exception_only(err)).strip()
    return result


def _under_sync_error(fn) -> str:
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "ok"
    except RuntimeError as err:
        return f"synchronised: {err}".splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="base")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    results = [check(name, args.size, args.batch) for name in args.tasks.split(",")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    for r in results:
        print(f"sync check {r['task']} {r['size']}: model step {r.get('model_step')}, optimizer step "
              f"{r.get('optimizer_step')}{'; error ' + r['error'] if 'error' in r else ''}")
    return 0 if all(r.get("model_step") == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
