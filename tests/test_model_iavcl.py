"""IAV-CL: DiER units (eqs. 9-11), shared ER layer (eqs. 12-13), HAFE (eqs. 14-16)."""

import math

import pytest
import torch

from avfmae.iavcl import HAFE, IAVCL, DenseInteraction, EvolutionaryRefinement, GatePair, UnitAggregation
from tests.test_model_lgi_former import randomise, ref_mha

C, H = 64, 2


def ref_block(block, x, ctx=None):
    n = block.norm_q(x)
    x = x + (ref_mha(block.attn, n, n) if ctx is None else ref_mha(block.attn, n, block.norm_kv(ctx)))
    return x + block.mlp(block.mlp_norm(x))


def test_dense_interaction_matches_eq_9_to_11():
    di = randomise(DenseInteraction(C, H), seed=3)
    f, other = torch.randn(2, 8, C), torch.randn(2, 5, C)
    out = di(f, other)
    (w_s, w_c), (b_s, b_c) = di.gates.weight.chunk(2), di.gates.bias.chunk(2)   # eq. 9's two gates
    for b in range(2):
        f_s = ref_block(di.self_block, f[b])                           # eq. 10
        f_c = ref_block(di.cross_block, f[b], other[b])                # eq. 11: keys from the other modality
        f_sc = torch.cat([f_s, f_c], -1)
        ref = di.norm(torch.sigmoid(f_sc @ w_s.T + b_s) * f_s + torch.sigmoid(f_sc @ w_c.T + b_c) * f_c)
        torch.testing.assert_close(out[b], ref, atol=1e-4, rtol=1e-4)


def test_gate_pair_initialises_each_gate_as_its_own_linear():
    torch.manual_seed(0)
    gates = GatePair(2 * 256, 256)
    bound = math.sqrt(6 / (2 * 256 + 256))          # Xavier-uniform of one 2C -> C gate, not of 2C -> 2C
    for half in gates.weight.detach().chunk(2):
        assert half.abs().max() <= bound and half.abs().max() > 0.95 * bound
        assert abs(half.var().item() - bound ** 2 / 3) < 0.05 * bound ** 2 / 3
    assert not gates.bias.any()


def test_hafe_feedback_matches_eq_16_per_modality():
    # both modalities' queries share one MHCA call; each must get what a call of its own would give
    hafe = randomise(HAFE(C, H), seed=6)
    stacked_v, stacked_a, f_av = torch.randn(2, 7, 2, C), torch.randn(2, 3, 2, C), torch.randn(2, 4, C)
    f4_v, f4_a = hafe(stacked_v, stacked_a, f_av)
    av = hafe.feedback_norm_av(f_av)
    for f4, units, norm_q, mlp_norm, mlp in ((f4_v, hafe.video_units(stacked_v), hafe.video_norm_q,
                                              hafe.video_mlp_norm, hafe.video_mlp),
                                             (f4_a, hafe.audio_units(stacked_a), hafe.audio_norm_q,
                                              hafe.audio_mlp_norm, hafe.audio_mlp)):
        for b in range(2):
            ref = units[b] + ref_mha(hafe.feedback_attn, norm_q(units[b]), av[b])     # eq. 16
            ref = ref + mlp(mlp_norm(ref))
            torch.testing.assert_close(f4[b], ref, atol=1e-4, rtol=1e-4)


def test_er_layer_matches_eqs_12_13():
    er = randomise(EvolutionaryRefinement(C), seed=4).eval()
    f_av0, f2_v, f2_a = torch.randn(2, 8, 2 * C), torch.randn(2, 8, C), torch.randn(2, 8, C)
    out = er(f_av0, f2_v, f2_a, project=True)
    f_av1 = er.in_proj(f_av0)

    def residual(conv, f_m):                  # Conv(SHCA(F_av^1, F_m^2, F_m^2)), single head, no projections
        att = torch.softmax(f_av1 @ f_m.transpose(1, 2) / math.sqrt(C), -1) @ f_m
        return conv(att.transpose(1, 2)).transpose(1, 2)

    ref = er.norm(f_av1 + residual(er.conv_audio, f2_a) + residual(er.conv_video, f2_v))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_unit_aggregation_attends_across_units_per_token():
    agg = randomise(UnitAggregation(C, H), seed=5)
    stacked = torch.randn(2, 6, 3, C)                                   # [B, L, N_c, C]
    out = agg(stacked)
    assert out.shape == (2, 6, C)
    for b, i in ((0, 0), (1, 4)):
        s = stacked[b, i]
        n = agg.norm(s)
        gamma = s + ref_mha(agg.attn, n, n)                              # eq. 14
        gamma = gamma + agg.mlp(agg.mlp_norm(gamma))
        ref = (torch.sigmoid(agg.select(gamma)) * gamma).sum(0)          # eq. 15
        torch.testing.assert_close(out[b, i], ref, atol=1e-4, rtol=1e-4)
    changed = stacked.clone()
    changed[:, 5] += 1.0
    torch.testing.assert_close(agg(changed)[:, :5], out[:, :5])         # tokens do not mix here


@pytest.mark.parametrize("Lv,La,Lav", [(8, 8, 8), (80, 24, 1)])
def test_iavcl_shapes_and_shared_er(Lv, La, Lav):
    torch.manual_seed(0)
    fusion = IAVCL(C, H, depth=2)
    calls = []
    fusion.refine.register_forward_hook(lambda *a: calls.append(1))
    f4_v, f4_a = fusion(torch.randn(2, Lv, C), torch.randn(2, La, C), torch.randn(2, Lav, 2 * C))
    assert f4_v.shape == (2, Lv, C) and f4_a.shape == (2, La, C)
    assert len(calls) == 2, "one ER layer, applied after every DiER unit"
    assert sum(isinstance(m, EvolutionaryRefinement) for m in fusion.modules()) == 1
    (f4_v.sum() + f4_a.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fusion.parameters())


def test_iavcl_is_permutation_equivariant_over_regions():
    torch.manual_seed(1)
    fusion = IAVCL(C, H).eval()
    f_v, f_a, f_av = torch.randn(2, 8, C), torch.randn(2, 8, C), torch.randn(2, 8, 2 * C)
    perm = torch.randperm(8)
    out_v, out_a = fusion(f_v, f_a, f_av)
    p_v, p_a = fusion(f_v[:, perm], f_a[:, perm], f_av[:, perm])
    torch.testing.assert_close(p_v, out_v[:, perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p_a, out_a[:, perm], atol=1e-5, rtol=1e-5)


def test_modalities_interact():
    torch.manual_seed(2)
    fusion = IAVCL(C, H).eval()
    f_v, f_a, f_av = torch.randn(1, 8, C), torch.randn(1, 8, C), torch.randn(1, 8, 2 * C)
    out_v, _ = fusion(f_v, f_a, f_av)
    out_v2, _ = fusion(f_v, f_a + 1.0, f_av)
    assert not torch.allclose(out_v, out_v2), "video features must depend on audio"


def test_the_hicmae_baseline_fusion_takes_stochastic_depth_like_its_encoders():
    import avfmae
    from avfmae.layers import DropPath

    model = avfmae.build_model("tiny", "hicmae_pretrain", drop_path=0.2)
    rates = [m.p for m in model.fusion.modules() if isinstance(m, DropPath)]
    encoder_rates = [m.p for m in model.video_encoder.modules() if isinstance(m, DropPath)]
    assert max(encoder_rates) == pytest.approx(0.2)
    assert rates and max(rates) == pytest.approx(0.2) and min(rates) == 0.0
