"""Run a few ZeRO-3 training steps of each tiny model in one process and compare with plain PyTorch.

Printed as JSON: for each case, the losses of 3 steps under DeepSpeed ZeRO-3 (every parameter
partitioned) and of the same 3 steps with a plain AdamW on an identically initialised model.
"""

import json
import os
import sys

import torch

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")

import deepspeed  # noqa: E402

import avfmae  # noqa: E402

DS = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0, "steps_per_print": 10**9,
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
CASES = {
    "pretrain": ("pretrain", {}),
    "pretrain_checkpointed": ("pretrain", {"checkpoint_activations": True}),
    "hicmae_pretrain": ("hicmae_pretrain", {}),
    "finetune": ("finetune", {"num_outputs": 4, "drop_path": 0.0}),
    "finetune_checkpointed": ("finetune", {"num_outputs": 4, "drop_path": 0.0, "checkpoint_activations": True}),
}


def build(task, kwargs, zero):
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=DS, enabled=zero):
        return avfmae.build_model("tiny", task, **kwargs)


def losses(model, step_fn, task, steps=3):
    gen = torch.Generator().manual_seed(1)
    video, audio = torch.randn(2, 3, 16, 160, 160, generator=gen), torch.randn(2, 1, 256, 128, generator=gen)
    out = []
    for step in range(steps):
        torch.manual_seed(100 + step)  # the same masks in both runs
        result = model(video, audio)
        loss = result["loss"] if task != "finetune" else model_of(model).compute_loss(result, torch.tensor([0, 3]))
        step_fn(loss)
        out.append(float(loss))
    return out


def model_of(model):
    return getattr(model, "module", model)


def group_layout(model) -> list:
    """(name, weight decay, lr scale, parameter count) of every optimizer group the model asks for."""
    return [[g["name"], g["weight_decay"], g["lr_scale"], len(g["params"])]
            for g in model.param_groups(0.05, layer_decay=0.75)]


def worst_update_error(start, plain, zero) -> list:
    """Largest ||zero3 - plain|| / ||plain update|| (Frobenius) over all parameters, and its name: a
    parameter whose update went missing under ZeRO-3 scores ~1, rounding noise far below (Adam moves an
    element with a near-zero gradient by the sign of its noise, so element-wise maxima are not used)."""
    worst = (0.0, "")
    params = dict(zero.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for name, p in plain.named_parameters():
            update = (p.detach() - start[name]).norm().item()
            if update == 0:  # unused by this task (e.g. the last layer's stage IV in pre-training): plain
                continue     # AdamW skips it, ZeRO-3 still applies weight decay to its partition
            error = (params[name].detach() - p.detach()).norm().item()
            worst = max(worst, (error / max(update, 1e-12), name))
    return list(worst)


def main():
    deepspeed.init_distributed(dist_backend="gloo")
    report = {}
    for name, (task, kwargs) in CASES.items():
        plain = build(task, kwargs, zero=False)
        opt = torch.optim.AdamW(plain.param_groups(0.05), lr=1e-3)

        def plain_step(loss, opt=opt):
            opt.zero_grad()
            loss.backward()
            opt.step()

        zero = build(task, kwargs, zero=True)
        engine, *_ = deepspeed.initialize(model=zero, config=DS,
                                          optimizer=torch.optim.AdamW(zero.param_groups(0.05), lr=1e-3))

        def zero_step(loss, engine=engine):
            engine.backward(loss)
            engine.step()

        start = {k: v.detach().clone() for k, v in plain.named_parameters()}
        report[name] = {"groups": [group_layout(plain), group_layout(zero)],
                        "plain": losses(plain, plain_step, task), "zero3": losses(engine, zero_step, task),
                        "worst_update_error": worst_update_error(start, plain, zero)}
    print("RESULT " + json.dumps(report))


if __name__ == "__main__":
    main()
