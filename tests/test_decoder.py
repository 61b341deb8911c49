"""The hierarchical decoder (eq. 2) against a block-by-block reference built from its own modules."""

import pytest
import torch

from avfmae.decoder import Decoder
from tests.test_model_lgi_former import randomise

C_ENC, D, N = 48, 32, 20


def test_decoder_matches_blockwise_reference_with_deepest_skip_first():
    dec = randomise(Decoder(C_ENC, D, num_heads=2, depth=3, num_tokens=N, out_dim=12), seed=7)
    B, Me, Md = 2, 5, 6
    g = torch.Generator().manual_seed(0)
    enc, skips = torch.randn(B, Me, C_ENC, generator=g), [torch.randn(B, Me, C_ENC, generator=g) for _ in range(2)]
    perm = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    enc_idx, dec_idx = perm[:, :Me], perm[:, Me:Me + Md]
    out = dec(enc, enc_idx, dec_idx, skips)

    pos, e2d = dec.pos, dec.encoder_to_decoder
    for b in range(B):
        x = torch.cat([e2d(enc[b]) + pos[enc_idx[b]], dec.mask_token() + pos[dec_idx[b]]])[None]
        x = dec.blocks[0](x)
        for j in (1, 2):  # block j reads skip map number depth - j: the deepest first
            x = dec.blocks[j](x, (e2d(skips[-j][b]) + pos[enc_idx[b]])[None])
        torch.testing.assert_close(out[b], dec.head(dec.norm(x[0, Me:])), atol=1e-4, rtol=1e-4)


def test_decoder_refuses_skip_maps_of_another_shape():
    dec = Decoder(C_ENC, D, num_heads=2, depth=2, num_tokens=N, out_dim=12)
    enc_idx, dec_idx = torch.arange(5).expand(2, -1), torch.arange(5, 9).expand(2, -1)
    with pytest.raises(ValueError, match=r"skips must match enc's shape \(2, 5, 48\)"):
        dec(torch.randn(2, 5, C_ENC), enc_idx, dec_idx, [torch.randn(2, 4, C_ENC)])
