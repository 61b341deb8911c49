"""Run every mae_kernels op on its Triton path and its torch reference at a pre-training shape and
print how far apart they are. Without a GPU the Triton path runs on the interpreter (slow, exact)."""

import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mae_kernels  # noqa: E402  (after TRITON_INTERPRET)

device = "cuda" if torch.cuda.is_available() else "cpu"
gen = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=gen).to(device).requires_grad_()


def visible(B, N, M):
    return torch.stack([torch.randperm(N, generator=gen)[:M].sort().values for _ in range(B)]).to(device)


B, N, C, P = 2, 800, 64, 1536
x, pos, enc = randn(B, N, C), randn(N, C), randn(B, 80, C)
token = randn(C)
enc_idx, dec_idx = visible(B, N, 80), visible(B, N, 400)
pred, patches = randn(B, 400, P), torch.randn(B, N, P, generator=gen).to(device)
q = randn(1, 8, 11, 2, 32)
cases = {
    "gather_tokens": lambda: mae_kernels.gather_tokens(x, enc_idx, pos),
    "assemble_decoder_tokens": lambda: mae_kernels.assemble_decoder_tokens(enc, token, pos, enc_idx, dec_idx),
    "masked_mse_loss": lambda: mae_kernels.masked_mse_loss(pred, patches, dec_idx, norm_groups=3),
    "grouped_attention": lambda: mae_kernels.grouped_attention(q, q, q),
}
print(f"device: {device}  (Triton {'interpreter' if os.environ.get('TRITON_INTERPRET') == '1' else 'compiled'})")
print(f"{'op':26s} {'max |triton - torch| fwd':>26s} {'grad':>12s} {'triton s':>9s}")
for name, run in cases.items():
    outs = {}
    for backend in ("torch", "triton"):
        with mae_kernels.backend(backend):
            start = time.perf_counter()
            out = run()
            grads = torch.autograd.grad(out.float().sum(), [x, pos, enc, token, pred, q], allow_unused=True)
            outs[backend] = (out.detach(), [g for g in grads if g is not None], time.perf_counter() - start)
    (o_t, g_t, _), (o_k, g_k, secs) = outs["torch"], outs["triton"]
    grad_err = max((a - b).abs().max().item() for a, b in zip(g_t, g_k))
    print(f"{name:26s} {(o_t.float() - o_k.float()).abs().max().item():26.3g} {grad_err:12.3g} {secs:9.2f}")
