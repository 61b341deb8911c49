"""mae_kernels meets users where they are (issue 12): [1, N, C] tables, the autocast dtype rule, empty
index sets, float64 on the reference, boolean masks, every target-normalisation convention, head dims
outside the tuned set, attention dropout, and the error for TRITON_INTERPRET set after import.

Each behaviour runs on both backends (Triton under the interpreter on CPU) against plain torch."""

import os
import subprocess
import sys
from pathlib import Path

import mae_kernels
import pytest
import torch
import torch.nn.functional as F
from mae_kernels.masked_mse_loss import masked_mse_loss_reference

from avfmae import masking
from tests.conftest import DEVICE, INTERPRETED
from tests.test_grouped_attention import kernel_calls  # noqa: F401  (the fixture recording Triton launches)

BACKENDS = ["torch"] + (["triton"] if INTERPRETED or torch.cuda.is_available() else [])


def leaf(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype).requires_grad_()


def positions(B, N, M, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(N, generator=gen)[:M] for _ in range(B)]
    return (torch.stack(rows) if rows else torch.zeros(0, M, dtype=torch.long)).to(DEVICE)


def grads(out, *leaves):
    return torch.autograd.grad(out.float().square().sum(), leaves)


# --- positional tables [1, N, C] and the dtype rule ----------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_pos_table_with_a_leading_one(backend):
    x, pos = leaf(2, 9, 16), leaf(1, 9, 16, seed=1)
    idx, dec = positions(2, 9, 4), positions(2, 9, 5, seed=1)
    with mae_kernels.backend(backend):
        got = mae_kernels.gather_tokens(x, idx, pos)
        asm = mae_kernels.assemble_decoder_tokens(got, pos[0, 0], pos, idx, dec)
    want = x[torch.arange(2)[:, None], idx] + pos[0][idx]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(asm[:, 4:], pos[0, 0] + pos[0][dec])
    g_got, g_want = grads(got, pos), grads(want, pos)
    assert g_got[0].shape == (1, 9, 16)
    torch.testing.assert_close(g_got, g_want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_parameters_next_to_half_activations_take_the_activation_dtype(backend):
    """Under autocast the activations are half and pos / mask_token stay fp32: the op casts them."""
    x, pos, token = leaf(2, 9, 16, dtype=torch.float16), leaf(1, 9, 16, seed=1), leaf(16, seed=2)
    idx, dec = positions(2, 9, 4), positions(2, 9, 5, seed=1)
    with mae_kernels.backend(backend):
        vis = mae_kernels.gather_tokens(x, idx, pos)
        full = mae_kernels.assemble_decoder_tokens(vis, token, pos, idx, dec)
    assert vis.dtype == full.dtype == torch.float16
    pos16, token16 = pos.half(), token.half()
    want_vis = x[torch.arange(2)[:, None], idx] + pos16[0][idx]
    want_full = torch.cat([want_vis + pos16[0][idx], token16 + pos16[0][dec]], dim=1)
    torch.testing.assert_close(full, want_full)
    g_pos, g_token = torch.autograd.grad(full.float().sum(), (pos, token))
    assert g_pos.dtype == g_token.dtype == torch.float32
    w_pos, w_token = torch.autograd.grad(want_full.float().sum(), (pos, token))
    torch.testing.assert_close(g_pos, w_pos)
    torch.testing.assert_close(g_token, w_token)


# --- empty index sets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_index_sets_give_empty_results_and_zero_gradients(backend):
    x, pos, token = leaf(2, 9, 16), leaf(9, 16, seed=1), leaf(16, seed=2)
    none, some = positions(2, 9, 0), positions(2, 9, 5)
    with mae_kernels.backend(backend):
        out = mae_kernels.gather_tokens(x, none, pos)
        assert out.shape == (2, 0, 16)
        gx, gpos = torch.autograd.grad(out.sum(), (x, pos))
        assert gx.shape == x.shape and gpos.shape == pos.shape
        assert not gx.any() and not gpos.any()
        # mask ratio 1.0: no encoder token; mask ratio 0.0: no mask token
        for enc_idx, dec_idx in ((none, some), (some, none), (none, none)):
            enc = mae_kernels.gather_tokens(x, enc_idx)
            full = mae_kernels.assemble_decoder_tokens(enc, token, pos, enc_idx, dec_idx)
            want = torch.cat([enc + pos[enc_idx], token + pos[dec_idx]], dim=1)
            torch.testing.assert_close(full, want)
            got_g = torch.autograd.grad(full.square().sum(), (x, token, pos), allow_unused=True, retain_graph=True)
            want_g = torch.autograd.grad(want.square().sum(), (x, token, pos), allow_unused=True)
            for g, w, t in zip(got_g, want_g, (x, token, pos)):
                torch.testing.assert_close(g if g is not None else torch.zeros_like(t),
                                           w if w is not None else torch.zeros_like(t))
        pred = leaf(2, 0, 12)
        loss = mae_kernels.masked_mse_loss(pred, torch.randn(2, 9, 12, device=DEVICE), none, norm_pix=True)
        assert loss.item() == 0.0 and torch.autograd.grad(loss, pred)[0].shape == (2, 0, 12)



@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_channel_dims_agree_between_backends(backend):
    """B = 0 or C = 0 (issue 13): the token ops give empty results and empty gradients shaped like their
    inputs, with and without index validation; the loss refuses P = 0 (a mean over no values) by name."""
    for B, C in ((0, 16), (2, 0)):
        x, pos, token = leaf(B, 9, C), leaf(9, C, seed=1), leaf(C, seed=2)
        enc_idx, dec_idx = positions(B, 9, 4), positions(B, 9, 5, seed=1)
        for validate in (False, True):
            runs = {}
            for name in ("torch", backend):
                with mae_kernels.backend(name):
                    enc = mae_kernels.gather_tokens(x, enc_idx, validate=validate)
                    full = mae_kernels.assemble_decoder_tokens(enc, token, pos, enc_idx, dec_idx, validate=validate)
                    grad = torch.autograd.grad(full.sum(), (x, token, pos))
                assert enc.shape == (B, 4, C) and full.shape == (B, 9, C)
                assert tuple(g.shape for g in grad) == (x.shape, token.shape, pos.shape)
                assert not grad[1].any() and not grad[2].any()
                runs[name] = (enc, full, *grad)
            for got, want in zip(runs[backend], runs["torch"]):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    with mae_kernels.backend(backend), pytest.raises(ValueError, match=r"P >= 1"):
        mae_kernels.masked_mse_loss(leaf(2, 4, 0), torch.randn(2, 9, 0, device=DEVICE), positions(2, 9, 4))

# --- float64 --------------------------------------------------------------------------------------------


def test_float64_runs_the_reference_and_gradchecks():
    x, pos, token = (leaf(2, 6, 4, dtype=torch.float64, seed=s) for s in (0, 1, 2))
    idx, dec = positions(2, 6, 3), positions(2, 6, 2, seed=1)
    patches = torch.randn(2, 6, 12, dtype=torch.float64, device=DEVICE)
    q, k, v = (leaf(1, 2, 3, 2, 8, dtype=torch.float64, seed=s) for s in (3, 4, 5))
    pred = leaf(2, 3, 12, dtype=torch.float64, seed=6)
    checks = [
        (lambda x, pos: mae_kernels.gather_tokens(x, idx, pos[0]), (x, pos)),
        (lambda e, t, p: mae_kernels.assemble_decoder_tokens(e[:, :3], t[0, 0], p[0], idx, dec), (x, token, pos)),
        (lambda p: mae_kernels.masked_mse_loss(p, patches, idx, norm_pix=True, norm_groups=3, unbiased=True,
                                               eps_on="std", channels_last=True), (pred,)),
        (lambda q, k, v: mae_kernels.grouped_attention(q, k, v), (q, k, v)),
    ]
    for fn, args in checks:  # auto picks the reference for float64, also under the interpreter
        assert torch.autograd.gradcheck(fn, args)
    if BACKENDS[-1] == "triton":
        with mae_kernels.backend("triton"), pytest.raises(TypeError, match="float64 runs on the reference"):
            mae_kernels.gather_tokens(x, idx)


# --- boolean masks ---------------------------------------------------------------------------------------


def test_mask_to_indices_lists_true_positions_in_raster_order():
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 20, generator=gen).argsort(dim=1) < 7  # exactly 7 True per row
    idx = mae_kernels.mask_to_indices(mask.to(DEVICE), 7)
    x = torch.randn(3, 20, 5, device=DEVICE)
    torch.testing.assert_close(mae_kernels.gather_tokens(x, idx), x[mask.to(DEVICE)].reshape(3, 7, 5))
    assert masking.mask_to_indices is mae_kernels.mask_to_indices  # one owner, imported by avfmae
    with pytest.raises(ValueError, match="count=6 True entries"):
        mae_kernels.mask_to_indices(mask, 6, validate=True)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        mae_kernels.mask_to_indices(mask.int(), 7)
    with pytest.raises(ValueError, match="count must be an int in"):
        mae_kernels.mask_to_indices(mask, 21)
    for bad in (7.0, True, "7"):
        with pytest.raises(TypeError, match="count must be an int"):
            mae_kernels.mask_to_indices(mask, bad)


def test_indices_to_mask_marks_exactly_the_listed_positions():
    gen = torch.Generator().manual_seed(1)
    idx = torch.rand(3, 20, generator=gen).argsort(dim=1)[:, :7]
    mask = mae_kernels.indices_to_mask(idx.to(DEVICE), 20)
    expected = torch.tensor([[j in set(row.tolist()) for j in range(20)] for row in idx])  # plain Python sets
    assert mask.dtype == torch.bool and torch.equal(mask.cpu(), expected)
    assert torch.equal(mae_kernels.mask_to_indices(mask, 7).cpu(), idx.sort(dim=1).values)  # round trip
    assert masking.indices_to_mask is mae_kernels.indices_to_mask  # one owner, imported by avfmae
    with pytest.raises(TypeError, match="idx must be an int32/int64 tensor"):
        mae_kernels.indices_to_mask(idx.float(), 20)
    with pytest.raises(ValueError, match="num_tokens must be a non-negative int"):
        mae_kernels.indices_to_mask(idx, -1)
    for bad in (20.0, True):
        with pytest.raises(TypeError, match="num_tokens must be an int"):
            mae_kernels.indices_to_mask(idx, bad)


# --- target normalisation conventions -------------------------------------------------------------------


def mae_target(target):
    """MAE's norm_pix_loss (facebookresearch/mae models_mae.py forward_loss): whole patch, torch.var's
    default (unbiased) variance, 1e-6 added inside the square root."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + 1.0e-6) ** 0.5


def videomae_target(target, channels):
    """VideoMAE's normalize_target (MCG-NJU/VideoMAE engine_for_pretraining.py; HiCMAE alike): statistics
    per channel of a (p c) patch, unbiased std, 1e-6 added to the std."""
    B, M, P = target.shape
    t = target.reshape(B, M, P // channels, channels)
    t = (t - t.mean(dim=-2, keepdim=True)) / (t.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
    return t.reshape(B, M, P)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("convention", ["mae", "videomae", "raw"])
def test_masked_mse_loss_reproduces_each_convention(backend, convention):
    gen = torch.Generator().manual_seed(1)
    B, N, M, P = 2, 30, 12, 48
    pred = torch.randn(B, M, P, generator=gen).to(DEVICE).requires_grad_()
    patches = (torch.rand(B, N, P, generator=gen) * 3 + 1).to(DEVICE)
    idx = positions(B, N, M, seed=2)
    target = patches[torch.arange(B)[:, None], idx]
    options = {
        "mae": dict(norm_pix=True, unbiased=True),
        "videomae": dict(norm_pix=True, norm_groups=3, channels_last=True, unbiased=True, eps_on="std"),
        "raw": {},
    }[convention]
    target = {"mae": mae_target, "videomae": lambda t: videomae_target(t, 3), "raw": lambda t: t}[convention](target)
    want = F.mse_loss(pred, target)
    with mae_kernels.backend(backend):
        got = mae_kernels.masked_mse_loss(pred, patches, idx, **options)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(got, pred)[0], torch.autograd.grad(want, pred)[0],
                               atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("groups,channels_last", [(1, False), (3, False), (3, True), (4, True)])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("eps_on", ["var", "std"])
def test_every_convention_matches_between_backends(groups, channels_last, unbiased, eps_on):
    if BACKENDS[-1] != "triton":
        pytest.skip("needs the Triton backend (CUDA or TRITON_INTERPRET=1)")
    gen = torch.Generator().manual_seed(3)
    pred = torch.randn(2, 7, 24, generator=gen).to(DEVICE).requires_grad_()
    patches = torch.rand(2, 11, 24, generator=gen).to(DEVICE)
    idx, valid = positions(2, 11, 7, seed=4), (torch.rand(2, 7, generator=gen) > 0.3).to(DEVICE)
    kw = dict(norm_pix=True, norm_groups=groups, unbiased=unbiased, eps_on=eps_on, channels_last=channels_last)
    with mae_kernels.backend("triton"):
        got = mae_kernels.masked_mse_loss(pred, patches, idx, valid, **kw)
    want = masked_mse_loss_reference(pred, patches, idx, valid, True, 1e-6, groups, unbiased, eps_on == "std",
                                     channels_last)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, pred)[0], torch.autograd.grad(want, pred)[0])


def test_norm_pix_is_off_by_default_like_mae():
    pred = leaf(1, 3, 8)
    patches = torch.randn(1, 5, 8, device=DEVICE) * 4 + 2
    idx = positions(1, 5, 3)
    want = F.mse_loss(pred, patches[0, idx[0]][None])
    torch.testing.assert_close(mae_kernels.masked_mse_loss(pred, patches, idx), want)


# --- grouped_attention: any head dim, dropout -----------------------------------------------------------


def sdpa(q, k, v, **kw):
    fold = lambda t: t.flatten(0, 1).transpose(1, 2)  # noqa: E731  [B, G, L, H, D] -> [B*G, H, L, D]
    out = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), **kw)
    return out.transpose(1, 2).reshape(q.shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [8, 24, 48])
def test_head_dims_outside_the_tuned_set_fall_back_to_the_reference(backend, D, request):
    launches = request.getfixturevalue("kernel_calls")  # Triton forward launches from here on
    q, k, v = (leaf(2, 1, 5, 4, D, seed=s) for s in range(3))  # e.g. dim 32 with 4 heads: D = 8
    with mae_kernels.backend(backend):
        out = mae_kernels.grouped_attention(q, k, v)
    want = sdpa(q, k, v)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(grads(out, q, k, v), grads(want, q, k, v))
    assert not launches  # the reference ran, even under backend("triton")
    if backend == "triton":  # the recorder sees launches: a tuned head dim does launch
        tuned = [leaf(2, 1, 5, 4, 16, seed=s) for s in range(3)]
        with mae_kernels.backend(backend):
            mae_kernels.grouped_attention(*tuned)
        assert len(launches) == 1


def test_attention_dropout_is_torch_sdpa_dropout():
    q, k, v = (leaf(2, 3, 6, 2, 16, seed=s) for s in range(3))
    torch.manual_seed(5)
    out = mae_kernels.grouped_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(5)
    want = sdpa(q, k, v, dropout_p=0.3)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(grads(out, q, k, v), grads(want, q, k, v))
    assert not torch.allclose(out, mae_kernels.grouped_attention(q, k, v, dropout_p=0.0))
    with pytest.raises(ValueError, match=r"dropout_p must be a float in \[0, 1\)"):
        mae_kernels.grouped_attention(q, k, v, dropout_p=1.0)


def test_zero_copy_multi_head_attention_idiom():
    """Ungrouped multi-head attention is G = 1 over slices of one fused qkv projection."""
    B, N, H, D = 2, 7, 4, 16
    qkv = leaf(B, N, 3 * H * D)
    q, k, v = qkv.view(B, 1, N, 3, H, D).unbind(3)
    out = mae_kernels.grouped_attention(q, k, v).view(B, N, H * D)
    heads = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)  # [3, B, H, N, D], as timm's Attention
    want = F.scaled_dot_product_attention(heads[0], heads[1], heads[2]).transpose(1, 2).reshape(B, N, H * D)
    torch.testing.assert_close(out, want)


# --- TRITON_INTERPRET after import ----------------------------------------------------------------------


def fresh_python(code: str, cwd) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter, as a user would: no TRITON_INTERPRET, no backend override."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MAE_KERNELS_BACKEND")}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_interpreter_switched_on_after_import_says_what_to_do(tmp_path):
    code = ("import os, torch, mae_kernels\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "try:\n"
            "    mae_kernels.gather_tokens(torch.randn(1, 3, 4), torch.zeros(1, 2, dtype=torch.long))\n"
            "except RuntimeError as e:\n"
            "    print(e)\n")
    out = fresh_python(code, tmp_path)
    assert "set after mae_kernels was imported" in out.stdout, out.stdout + out.stderr
    assert "before the first `import mae_kernels`" in out.stdout


# --- importing needs no GPU driver ------------------------------------------------------------------------


def test_import_builds_no_autotuner_so_it_needs_no_gpu_driver(tmp_path):
    # older Triton (3.3.1 seen) asks for the active GPU driver when an Autotuner is constructed: built
    # at import, they made `import mae_kernels` fail on a machine without a GPU, reference path included
    code = ("import torch, triton.runtime.autotuner as at\n"
            "def refuse(*args, **kwargs):\n"
            "    raise RuntimeError('0 active drivers')\n"
            "at.Autotuner.__init__ = refuse\n"
            "import mae_kernels\n"
            "x, idx = torch.randn(1, 3, 4), torch.zeros(1, 2, dtype=torch.long)\n"
            "q = torch.randn(1, 2, 5, 1, 16)\n"
            "with mae_kernels.backend('torch'):\n"
            "    print(mae_kernels.gather_tokens(x, idx).shape, mae_kernels.grouped_attention(q, q, q).shape)\n")
    out = fresh_python(code, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[0] == "torch.Size([1, 2, 4]) torch.Size([1, 2, 5, 1, 16])"


def test_too_old_torch_is_named_at_import_and_the_floor_matches_the_package_metadata():
    import tomllib
    from mae_kernels import _requirements

    with pytest.raises(ImportError, match=r"needs torch>=2\.5 .* found torch 2\.4\.1"):
        _requirements.check_torch("2.4.1")
    for version in ("2.5.1", "2.13.0+cpu", "2.10.0.dev20260101", "3.0.0"):
        _requirements.check_torch(version)
    floor = ".".join(map(str, _requirements.MIN_TORCH))
    root = Path(__file__).resolve().parents[1]
    for pyproject in (root / "pyproject.toml", root / "kernels" / "pyproject.toml"):
        deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
        assert f"torch>={floor}" in deps, pyproject
