"""torch.compile captures the whole training step: every model task traces as one graph
(``fullgraph=True``: no graph break, the mae_kernels custom ops included), AOT autograd traces the
backward through the ops' registered autograd, and the compiled step gives the eager loss and
gradients.

Compiling is slow on a 2-core CPU, so every case uses the tiny model, and each compiled model is
built once per module; ``backend="eager"`` checks capture only (dynamo), ``aot_eager`` the joint
forward/backward graph, ``inductor`` the generated code.
"""

import pytest
import torch

import avfmae

pytestmark = pytest.mark.slow

VARIANTS = {
    "pretrain": dict(task="pretrain"),
    "pretrain-hicmae-fusion": dict(task="pretrain", fusion="hicmae"),
    "hicmae-baseline": dict(task="hicmae_pretrain"),
    "finetune": dict(task="finetune", num_outputs=4),
    "finetune-video-only": dict(task="finetune", num_outputs=4, video_only=True),
}


def _build(name: str, **overrides):
    kwargs = {**VARIANTS[name], **overrides}
    task = kwargs.pop("task")
    torch.manual_seed(0)
    model = avfmae.build_model("tiny", task, **kwargs).train()
    cfg = model.cfg
    gen = torch.Generator().manual_seed(1)
    video = torch.randn(2, 3, cfg.num_frames, cfg.image_size, cfg.image_size, generator=gen)
    audio = torch.randn(2, 1, cfg.audio_frames, cfg.audio_bins, generator=gen)
    if task == "finetune":
        target = torch.tensor([1, 3])
        args = (video, None if kwargs.get("video_only") else audio)

        def loss_of(m):
            return model.compute_loss(m(*args), target)
    else:
        masks = model.sample_masks(2, "cpu", torch.Generator().manual_seed(2))

        def loss_of(m):
            return m(video, audio, masks)["loss"]
    return model, loss_of


def _loss_and_grads(model, loss_of, runner):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the same drop-path draws for both runs
    loss = loss_of(runner)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_step(model, loss_of, compiled, rtol=1e-4, atol=1e-5):
    want_loss, want = _loss_and_grads(model, loss_of, model)
    got_loss, got = _loss_and_grads(model, loss_of, compiled)
    torch.testing.assert_close(got_loss, want_loss, rtol=rtol, atol=atol)
    assert got.keys() == want.keys() and len(want) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_fullgraph_capture_without_graph_break(name):
    """Dynamo traces forward as a single graph (a graph break raises under fullgraph=True)."""
    model, loss_of = _build(name)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    _assert_same_step(model, loss_of, compiled, rtol=0, atol=0)
    assert len(graphs) == 1
    ops = {str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"}
    assert any("mae_kernels.grouped_attention" in op for op in ops), "the kernels are ops in the graph"


@pytest.mark.parametrize("name", ["pretrain", "finetune"])
def test_aot_autograd_traces_the_backward(name):
    """The joint forward+backward graph traces through the ops' registered autograd (drop path off:
    compiled code draws its own random numbers)."""
    model, loss_of = _build(name, **({"drop_path": 0.0} if name == "finetune" else {}))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _assert_same_step(model, loss_of, compiled)


def test_inductor_step_matches_eager():
    """Inductor's generated code (our ops as extern calls) gives the eager loss and gradients. Two
    encoder layers and one fusion unit instead of tiny's 3 and 2: the same graph structure, a third
    less C++ to compile on a 2-core machine."""
    model, loss_of = _build("pretrain", depth=2, fusion_depth=1)
    compiled = torch.compile(model, fullgraph=True)
    _assert_same_step(model, loss_of, compiled, rtol=2e-4, atol=2e-5)
