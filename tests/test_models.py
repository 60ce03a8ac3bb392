"""Tiny models built on the fly: shapes, the MaskGIT sampler's guarantees, the diffusion knob."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mridc.cloud.diffusion.pipeline import ResidualDiffusionPipeline
from mridc.cloud.diffusion.scheduler import DDIMScheduler
from mridc.cloud.diffusion.unet import ConditionalUNet, tiny_unet_config
from mridc.cloud.maskgit import fill_masked_tokens
from mridc.cloud.predictor import BidirectionalTokenPredictor, tiny_predictor_config
from mridc.cloud.tokenizer import TokenizerConfig, VQTokenizer, tiny_tokenizer_config


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = VQTokenizer(tiny_tokenizer_config()).eval()
    pred = BidirectionalTokenPredictor(tiny_predictor_config(tok.cfg.codebook_size)).eval()
    unet = ConditionalUNet(tiny_unet_config()).eval()
    return tok, pred, unet


def test_tokenizer_shapes_follow_the_configured_stride(tiny):
    tok, _, _ = tiny
    x = torch.rand(2, 3, 64, 96) * 2 - 1
    out = tok(x)
    assert tok.cfg.stride == 16
    assert out.indices.shape == (2, 4, 6)
    assert out.reconstruction.shape == x.shape
    assert int(out.indices.max()) < tok.cfg.codebook_size
    assert torch.equal(tok.encode_indices(x), out.indices)
    cfg = TokenizerConfig(encoder_widths=(8, 8, 8), decoder_widths=(8, 8, 8, 8), decoder_blocks=(1, 1, 1, 1),
                          code_dim=8, codebook_size=32)
    assert VQTokenizer(cfg).encode_indices(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 4)  # stride 8


def test_dead_codes_are_restarted_from_encoder_outputs(tiny):
    _, _, _ = tiny
    q = VQTokenizer(tiny_tokenizer_config()).quantizer
    z = torch.nn.functional.normalize(torch.randn(1, q.codebook.shape[1], 4, 4), dim=1)
    restarted = q.restart_dead_codes(z)
    assert restarted == q.codebook.shape[0]  # usage starts at zero: every code is dead
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    assert all(any(torch.allclose(c, f) for f in flat) for c in q.codebook.data)


def test_maskgit_keeps_kept_tokens_and_fills_every_masked_one(tiny):
    _, pred, _ = tiny
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (2, 5, 7), generator=g)
    keep = torch.rand(2, 5, 7, generator=g) < 0.4
    filled, conf = fill_masked_tokens(pred, tokens, keep, steps=4, seed=3)
    assert torch.equal(filled[keep], tokens[keep])
    assert filled.min() >= 0 and filled.max() < 64
    assert torch.all(conf[keep] == 1)
    again, _ = fill_masked_tokens(pred, tokens, keep, steps=4, seed=3)
    assert torch.equal(filled, again)


def test_maskgit_sampling_is_seeded(tiny):
    _, pred, _ = tiny
    tokens = torch.zeros(1, 6, 6, dtype=torch.long)
    keep = torch.zeros(1, 6, 6, dtype=torch.bool)
    a, _ = fill_masked_tokens(pred, tokens, keep, steps=3, seed=5, temperature=1.0)
    b, _ = fill_masked_tokens(pred, tokens, keep, steps=3, seed=5, temperature=1.0)
    c, _ = fill_masked_tokens(pred, tokens, keep, steps=3, seed=6, temperature=1.0)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_maskgit_with_a_perfect_predictor_recovers_the_grid():
    truth = torch.randint(0, 16, (1, 4, 4), generator=torch.Generator().manual_seed(0))

    def oracle(tokens, known):
        return torch.nn.functional.one_hot(truth, 16).float().expand(tokens.shape[0], -1, -1, -1) * 10

    keep = torch.zeros_like(truth, dtype=torch.bool)
    keep[0, 0, 0] = True
    filled, _ = fill_masked_tokens(oracle, truth, keep, steps=5)
    assert torch.equal(filled, truth)


def test_scheduler_timesteps_and_clean_step():
    s = DDIMScheduler()
    assert s.timesteps(0.0, 8) == []
    ts = s.timesteps(1.0, 4)
    assert len(ts) == 4 and ts == sorted(ts, reverse=True) and ts[0] == 999
    x0 = torch.randn(1, 3, 4, 4)
    assert torch.equal(s.step(x0, torch.randn_like(x0), 100, 0), x0)
    ab = s.alpha_bar(torch.tensor([0, 500, 999]))
    assert ab[0] > ab[1] > ab[2] > 0


def test_realism_zero_returns_the_decode_and_seed_fixes_the_sample(tiny):
    _, _, unet = tiny
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)  # a zero-initialised head would hide the sampler
    pipe = ResidualDiffusionPipeline(unet)
    decoded = torch.rand(2, 3, 32, 32) * 2 - 1
    trust = torch.ones(2, 2, 2)
    assert torch.equal(pipe(decoded, trust, realism=0.0), decoded)
    a = pipe(decoded, trust, realism=1.0, steps=3, seed=7)
    b = pipe(decoded, trust, realism=1.0, steps=3, seed=7)
    c = pipe(decoded, trust, realism=1.0, steps=3, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    single = pipe(decoded[1:], trust[1:], realism=1.0, steps=3, seed=7)
    assert torch.allclose(single, a[1:], atol=1e-5)  # a frame decodes the same alone or in a batch
    assert float((a - decoded).abs().mean()) > 1e-3  # realism 1 refines: the output is not the input


def test_unet_preserves_the_image_shape(tiny):
    _, _, unet = tiny
    out = unet(torch.randn(1, 3, 32, 48), torch.tensor([10]), torch.randn(1, 4, 32, 48))
    assert out.shape == (1, 3, 32, 48)
    assert np.isfinite(out.detach().numpy()).all()


def test_copy_votes_count_kept_neighbours_by_index():
    """The copy term against a direct count: each kept token within the window votes for its own index with
    the kernel weight of its offset; masked tokens never vote."""
    torch.manual_seed(1)
    cfg = tiny_predictor_config(8)
    model = BidirectionalTokenPredictor(cfg)
    with torch.no_grad():
        model.copy_weight.normal_()
    tokens = torch.randint(0, 8, (2, 5, 6))
    keep = torch.rand(2, 5, 6) < 0.5
    votes = model.copy_votes(tokens, keep)
    kernel = model.copy_weight.exp()[0, 0]
    r = cfg.copy_kernel // 2
    expected = torch.zeros(2, 5, 6, 8)
    for n in range(2):
        for y in range(5):
            for x in range(6):
                for dy in range(-r, r + 1):
                    for dx in range(-r, r + 1):
                        yy, xx = y + dy, x + dx
                        if 0 <= yy < 5 and 0 <= xx < 6 and keep[n, yy, xx]:
                            expected[n, y, x, tokens[n, yy, xx]] += kernel[dy + r, dx + r]
    assert torch.allclose(votes, expected, atol=1e-6)


def test_an_untrained_copy_predictor_already_copies_an_isolated_neighbour():
    """With the copy term a new model starts from "a neighbour's token": one kept token in a masked field is
    the top-1 guess at every masked position next to it."""
    model = BidirectionalTokenPredictor(tiny_predictor_config(16)).eval()
    tokens = torch.zeros(1, 5, 5, dtype=torch.long)
    tokens[0, 2, 2] = 11
    keep = torch.zeros(1, 5, 5, dtype=torch.bool)
    keep[0, 2, 2] = True
    with torch.no_grad():
        top1 = model(tokens, keep).argmax(-1)[0]
    assert (top1[1:4, 1:4] == 11).all()


def test_a_position_offset_changes_only_the_positions():
    """Training shifts the position grid; a shift of zero is the plain forward pass, and a shift changes it."""
    torch.manual_seed(2)
    model = BidirectionalTokenPredictor(tiny_predictor_config(16)).eval()
    torch.nn.init.normal_(model.head.weight)  # a new model's head is zero; a trained one reads the positions
    tokens = torch.randint(0, 16, (1, 4, 4))
    keep = torch.rand(1, 4, 4) < 0.5
    with torch.no_grad():
        plain = model(tokens, keep)
        assert torch.equal(plain, model(tokens, keep, position_offset=(0, 0)))
        assert not torch.allclose(plain, model(tokens, keep, position_offset=(3, 5)))
