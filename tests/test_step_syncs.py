"""No host syncs in a training step: every model task's forward and backward, and every kernel op on
both backends, dispatch none of the ops that read device data back to the host
(``avfmae.op_count.SYNC_OPS``). A sync drains the GPU queue and blocks CUDA-graph capture."""

import warnings

import mae_kernels
import pytest
import torch

import avfmae
from avfmae.op_count import SYNC_OPS, count_ops

TASKS = {
    "pretrain": dict(task="pretrain"),
    "pretrain-hicmae-fusion": dict(task="pretrain", fusion="hicmae"),
    "hicmae-baseline": dict(task="hicmae_pretrain"),
    "finetune": dict(task="finetune", num_outputs=4, drop_path=0.1),
    "finetune-regression": dict(task="finetune", num_outputs=2, regression=True),
    "finetune-video-only": dict(task="finetune", num_outputs=3, video_only=True),
}


def _inputs(cfg, batch=2):
    torch.manual_seed(0)
    video = torch.randn(batch, 3, cfg.num_frames, cfg.image_size, cfg.image_size)
    audio = torch.randn(batch, 1, cfg.audio_frames, cfg.audio_bins)
    return video, audio


def _training_step(name: str):
    kwargs = dict(TASKS[name])
    task = kwargs.pop("task")
    model = avfmae.build_model("tiny", task, **kwargs).train()
    video, audio = _inputs(model.cfg)
    if task == "finetune":
        target = torch.randn(2, 2) if kwargs.get("regression") else torch.tensor([1, 0])
        audio_in = None if kwargs.get("video_only") else audio

        def step():
            model.compute_loss(model(video, audio_in), target).backward()
    else:
        masks = model.sample_masks(2, "cpu", torch.Generator().manual_seed(0))

        def step():
            model(video, audio, masks)["loss"].backward()
    return step


@pytest.mark.parametrize("name", sorted(TASKS))
def test_training_step_makes_no_host_sync(name):
    counts = count_ops(_training_step(name))
    assert counts.ops > 100, "the counter saw the step"
    assert counts.num_syncs == 0, f"{name}: host syncs {counts.syncs}"


def test_counter_sees_syncs():
    """The sync list is live: the calls a training step must avoid are all caught."""
    x = torch.arange(6.0)
    counts = count_ops(lambda: (x.sum().item(), bool(x.any()), x.nonzero(), torch.equal(x, x),
                                torch.masked_select(x, x > 2), x.unique()))
    assert counts.syncs == {"_local_scalar_dense": 2, "nonzero": 1, "equal": 1, "masked_select": 1, "_unique2": 1}
    assert set(counts.syncs) <= SYNC_OPS
    if torch.cuda.is_available():  # .tolist()/.cpu() of a CUDA tensor copies to the host
        y = x.cuda()
        assert count_ops(lambda: (y.tolist(), y.cpu())).syncs.get("device_to_host", 0) >= 1


def _set_zero(x, index):
    x.clone()[index] = 0.0


def _uint8_columns(x, mask):
    with warnings.catch_warnings():  # uint8 masks are deprecated, still taken (index_put_ refuses them)
        warnings.simplefilter("ignore", UserWarning)
        return x[:, mask[0].to(torch.uint8)]  # a None (``:``) first in the index list


_x, _mask, _repeats = torch.randn(4, 8), torch.randn(4, 8) > 0, torch.tensor([1, 2, 3])
_KERNEL_SYNCS = {  # the kernel reads data back itself (nonzero, the sum of repeats, the max) to size its output
    "x[bool_mask]": lambda: _x[_mask],
    "x[:, bool_mask]": lambda: _x[:, _mask[0]],
    "x[bool_mask] = v": lambda: _set_zero(_x, _mask),
    "x[:, uint8_mask]": lambda: _uint8_columns(_x, _mask),
    "index_put(bool mask)": lambda: torch.index_put(_x, (_mask,), torch.tensor(0.0)),
    "repeat_interleave(repeats)": lambda: torch.repeat_interleave(_repeats),
    "repeat_interleave(x, repeats)": lambda: _x.repeat_interleave(torch.tensor([1, 2, 1, 2]), dim=0),
    "bincount": lambda: torch.bincount(_repeats, minlength=8),
}
_NO_SYNC = {  # the same results, sized from what the host already knows
    "x[int_index]": lambda: _x[torch.tensor([0, 2])],
    "x[int_index] = v": lambda: _set_zero(_x, torch.tensor([0, 2])),
    "repeat_interleave(repeats, output_size)": lambda: torch.repeat_interleave(_repeats, output_size=6),
    "repeat_interleave(x, int)": lambda: _x.repeat_interleave(2, dim=0),
    "gather": lambda: _x.gather(1, torch.zeros(4, 2, dtype=torch.long)),
    "where(bool_mask)": lambda: torch.where(_mask, _x, 0.0),
}


@pytest.mark.parametrize("pattern", sorted(_KERNEL_SYNCS))
def test_counter_sees_syncs_inside_kernels(pattern):
    """No aten op of its own shows these syncs: the counter must tell them by the op's arguments."""
    counts = count_ops(_KERNEL_SYNCS[pattern])
    assert counts.num_syncs >= 1, f"{pattern}: ops {counts.by_op}"
    assert set(counts.syncs) <= SYNC_OPS


@pytest.mark.parametrize("pattern", sorted(_NO_SYNC))
def test_counter_passes_data_independent_ops(pattern):
    counts = count_ops(_NO_SYNC[pattern])
    assert counts.ops >= 1 and counts.num_syncs == 0, f"{pattern}: host syncs {counts.syncs}"


def test_sync_labels_are_no_ops():
    counts = count_ops(lambda: _x[_mask])
    assert counts.syncs == {"index(bool mask)": 1} and counts.ops == 1


@torch.library.custom_op("avfmae_test::reads_back", mutates_args=())
def _reads_back(x: torch.Tensor) -> torch.Tensor:
    return x * x.sum().item()  # a sync hidden inside a custom op's body


def test_counter_sees_syncs_inside_custom_ops():
    """A mode is off while it handles an op: the counter must still see what a custom op's body does,
    or a sync inside one of mae_kernels' ops would pass the tests below unseen."""
    counts = count_ops(lambda: _reads_back(torch.ones(3)))
    assert counts.num_syncs == 1 and set(counts.syncs) <= {"item", "_local_scalar_dense"}
    assert counts.by_op["reads_back"] == 1 and counts.by_op["sum"] == 1
    with mae_kernels.backend("torch"):
        q = torch.randn(1, 2, 5, 2, 16)
        inner = count_ops(lambda: mae_kernels.grouped_attention(q, q, q)).by_op
    assert inner["grouped_attention"] == 1 and inner["_scaled_dot_product_flash_attention_for_cpu"] == 1


def _op_steps():
    B, N, M, C = 2, 12, 5, 16
    x = torch.randn(B, N, C, requires_grad=True)
    pos = torch.randn(N, C, requires_grad=True)
    idx = torch.stack([torch.randperm(N)[:M] for _ in range(B)])
    dec = torch.stack([torch.randperm(N)[:M] for _ in range(B)])
    token = torch.randn(C, requires_grad=True)
    q = torch.randn(B, 2, 5, 2, 16, requires_grad=True)
    valid = torch.rand(B, M) > 0.3
    return {
        "gather_tokens": lambda: mae_kernels.gather_tokens(x, idx, pos).sum().backward(),
        "assemble_decoder_tokens": lambda: mae_kernels.assemble_decoder_tokens(x[:, :M], token, pos, idx,
                                                                               dec).sum().backward(),
        "masked_mse_loss": lambda: mae_kernels.masked_mse_loss(x[:, :M], x.detach(), idx, valid,
                                                               norm_pix=True).backward(),
        "grouped_attention": lambda: mae_kernels.grouped_attention(q, q, q).sum().backward(),
        # issue 12: the other conventions, [1, N, C] tables under mixed dtypes, bool masks, empty sets,
        # the reference fallback for untuned head dims
        "masked_mse_loss-videomae": lambda: mae_kernels.masked_mse_loss(
            x[:, :M], x.detach(), idx, norm_pix=True, norm_groups=4, unbiased=True, eps_on="std",
            channels_last=True).backward(),
        "gather_tokens-mask-1NC-half": lambda: mae_kernels.gather_tokens(
            x.half(), mae_kernels.mask_to_indices(torch.arange(N).expand(B, N) < M, M), pos[None]).float().sum()
        .backward(),
        "assemble_decoder_tokens-empty": lambda: mae_kernels.assemble_decoder_tokens(
            x[:, :0], token, pos, idx[:, :0], dec).sum().backward(),
        "grouped_attention-untuned-dim": lambda: mae_kernels.grouped_attention(
            q[..., :8], q[..., :8], q[..., :8]).sum().backward(),
    }


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", sorted(_op_steps()))
def test_kernel_ops_make_no_host_sync(op, backend):
    with mae_kernels.backend(backend):
        counts = count_ops(_op_steps()[op])
    assert counts.num_syncs == 0, f"{op} on {backend}: host syncs {counts.syncs}"


def test_validate_is_the_one_sync():
    x, idx = torch.randn(2, 10, 8), torch.zeros(2, 3, dtype=torch.long)
    assert count_ops(lambda: mae_kernels.gather_tokens(x, idx)).num_syncs == 0
    assert count_ops(lambda: mae_kernels.gather_tokens(x, idx, validate=True)).num_syncs > 0
