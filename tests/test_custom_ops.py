"""mae_kernels ops are registered torch custom ops: ``torch.library.opcheck`` (schema, fake tensors,
autograd registration, AOT dispatch) passes for each op on both backends, and ``torch.export`` of an
encoder keeps them as ops in the exported graph."""

import mae_kernels  # noqa: F401  (registers torch.ops.mae_kernels)
import pytest
import torch

import avfmae
from tests.conftest import INTERPRETED

ops = torch.ops.mae_kernels
BACKENDS = ["torch"] + (["triton"] if INTERPRETED or torch.cuda.is_available() else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cases(backend):
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=gen).to(DEVICE).requires_grad_(grad)

    def perm(B, N, M):
        return torch.stack([torch.randperm(N, generator=gen)[:M] for _ in range(B)]).to(DEVICE)

    B, N, M, C = 2, 9, 4, 16
    idx, dec = perm(B, N, M), perm(B, N, 5)
    valid = (torch.rand(B, M, generator=gen) > 0.3).to(DEVICE)
    q, k = rand(B, 2, 5, 2, 16), rand(B, 2, 7, 2, 16)
    out, lse = ops.grouped_attention(q, k, k, 0.25, backend)
    return {
        "gather_tokens": (ops.gather_tokens, (rand(B, N, C), idx, rand(N, C), backend)),
        "gather_tokens-batched-pos": (ops.gather_tokens, (rand(B, N, C), idx.int(), rand(B, N, C), backend)),
        "gather_tokens-no-pos": (ops.gather_tokens, (rand(B, N, C), idx, None, backend)),
        "scatter_rows": (ops.scatter_rows, (rand(B, M, C, grad=False), idx, N, False, backend)),
        "scatter_rows-sum-batch": (ops.scatter_rows, (rand(B, M, C, grad=False), idx, N, True, backend)),
        "assemble_decoder_tokens": (ops.assemble_decoder_tokens,
                                    (rand(B, M, C), rand(C), rand(N, C), idx, dec, backend)),
        "masked_mse_loss": (ops.masked_mse_loss,
                            (rand(B, M, 12), rand(B, N, 12, grad=False), idx, valid, True, 1e-6, 3, False, False, False,
                             backend)),
        "masked_mse_loss-no-valid": (ops.masked_mse_loss,
                                     (rand(B, M, 12), rand(B, N, 12, grad=False), idx, None, False, 1e-6, 1, False,
                                      False, False, backend)),
        "masked_mse_loss_backward": (ops.masked_mse_loss_backward,
                                     (torch.tensor(1.5, device=DEVICE), rand(B, M, 12, grad=False),
                                      rand(B, N, 12, grad=False), idx, valid, True, 1e-6, 3, False, False, False,
                                      backend)),
        # issue 12: empty index sets, conventions normalised outside the kernel
        "gather_tokens-empty": (ops.gather_tokens, (rand(B, N, C), idx[:, :0], rand(N, C), backend)),
        "assemble_decoder_tokens-no-mask-tokens": (ops.assemble_decoder_tokens,
                                                   (rand(B, M, C), rand(C), rand(N, C), idx, dec[:, :0], backend)),
        "masked_mse_loss-videomae": (ops.masked_mse_loss,
                                     (rand(B, M, 12), rand(B, N, 12, grad=False), idx, valid, True, 1e-6, 3, True,
                                      True, True, backend)),
        "grouped_attention": (ops.grouped_attention, (q, k, k.detach().clone().requires_grad_(), 0.25, backend)),
        "grouped_attention_backward": (ops.grouped_attention_backward,
                                       (torch.randn_like(out), q.detach(), k.detach(), k.detach(), out.detach(),
                                        lse.detach(), 0.25, backend)),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(_cases("torch")))
def test_opcheck(case, backend):
    op, args = _cases(backend)[case]
    torch.library.opcheck(op, args)


def test_export_encoder_keeps_the_custom_ops():
    model = avfmae.build_model("tiny", "pretrain").eval()
    cfg = model.cfg
    encoder = model.video_encoder
    video = torch.randn(2, 3, cfg.num_frames, cfg.image_size, cfg.image_size)
    visible = model.sample_masks(2, "cpu", torch.Generator().manual_seed(0)).video_visible

    class Encode(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, video, visible):
            return self.encoder(video, visible).tokens

    exported = torch.export.export(Encode(), (video, visible))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "mae_kernels.grouped_attention.default" in targets
    other = model.sample_masks(2, "cpu", torch.Generator().manual_seed(1)).video_visible
    torch.testing.assert_close(exported.module()(video, other), encoder(video, other).tokens)
