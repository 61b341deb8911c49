"""Losses: eq. 3 through masked_mse_loss, HCMCL InfoNCE, and its all-gather across ranks."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from avfmae.embed import frame_difference
from avfmae.losses import hcmcl_loss, info_nce, pooled_embedding, reconstruction_loss
from tests.helpers.ports import free_port
from tests.helpers.references import norm_pix


def manual_info_nce(e_v, e_a, tau):
    logits = e_v @ e_a.T / tau
    labels = torch.arange(e_v.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def test_info_nce_matches_clip_formula():
    g = torch.Generator().manual_seed(0)
    e_v = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    e_a = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    torch.testing.assert_close(info_nce(e_v, e_a, 0.07), manual_info_nce(e_v, e_a, 0.07))
    # aligned pairs give a lower loss than mismatched ones
    assert info_nce(e_v, e_v, 0.07) < info_nce(e_v, e_a, 0.07)


def test_hcmcl_sums_layers_of_pooled_normalised_features():
    g = torch.Generator().manual_seed(1)
    hv = [torch.randn(4, 10, 8, generator=g) for _ in range(3)]
    ha = [torch.randn(4, 3, 8, generator=g) for _ in range(3)]
    expected = sum(manual_info_nce(F.normalize(v.mean(1), dim=-1), F.normalize(a.mean(1), dim=-1), 0.1)
                   for v, a in zip(hv, ha))
    torch.testing.assert_close(hcmcl_loss(hv, ha, 0.1), expected)
    torch.testing.assert_close(pooled_embedding(hv[0]).norm(dim=-1), torch.ones(4))
    with pytest.raises(ValueError, match="same, non-zero number"):
        hcmcl_loss(hv, ha[:2])


def test_reconstruction_loss_counts_only_valid_rows():
    g = torch.Generator().manual_seed(2)
    patches = torch.randn(2, 10, 12, generator=g) * 3 + 1
    idx = torch.tensor([[0, 3, 5, 9], [1, 2, 4, 8]])
    pred = torch.randn(2, 4, 12, generator=g)
    valid = torch.tensor([[True, False, True, True], [False, False, True, True]])
    target = norm_pix(torch.stack([patches[b, idx[b]] for b in range(2)]), 3)
    err = (pred - target).pow(2).mean(-1)
    torch.testing.assert_close(reconstruction_loss(pred, patches, idx, valid, norm_groups=3), err[valid].mean())


def test_frame_difference_target():
    g = torch.Generator().manual_seed(3)
    patches = torch.randn(1, 6, 3 * 2 * 4, generator=g)
    idx = torch.tensor([[1, 2, 5]])
    pred = torch.randn(1, 3, 24, generator=g)
    target = frame_difference(norm_pix(patches, 3), 2)[0, idx[0]]
    expected = (pred[0] - target).pow(2).mean()
    torch.testing.assert_close(reconstruction_loss(pred, patches, idx, None, 3, frame_diff_tubelet=2), expected)


# --- distributed: the global batch is contrasted on every rank --------------------------------------


def _rank_loss(rank, world, port, e_v, e_a, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b = e_v.shape[0] // world
        v = e_v[rank * b:(rank + 1) * b].clone().requires_grad_()
        a = e_a[rank * b:(rank + 1) * b].clone().requires_grad_()
        loss = info_nce(v, a, 0.07)
        loss.backward()
        results[rank] = (loss.detach(), v.grad, a.grad)
    finally:
        dist.destroy_process_group()


def test_info_nce_all_gathers_across_ranks():
    g = torch.Generator().manual_seed(4)
    e_v = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    e_a = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    full_v, full_a = e_v.clone().requires_grad_(), e_a.clone().requires_grad_()
    full = info_nce(full_v, full_a, 0.07)
    full.backward()
    results = mp.Manager().dict()
    mp.spawn(_rank_loss, args=(2, free_port(), e_v, e_a, results), nprocs=2, join=True)
    # the mean of the ranks' losses is the single-process loss over the whole batch ...
    torch.testing.assert_close((results[0][0] + results[1][0]) / 2, full.detach())
    # ... and the gradient reaching each rank's features is world_size x its share of the global one
    grad_v = torch.cat([results[0][1], results[1][1]]) / 2
    grad_a = torch.cat([results[0][2], results[1][2]]) / 2
    torch.testing.assert_close(grad_v, full_v.grad)
    torch.testing.assert_close(grad_a, full_a.grad)
