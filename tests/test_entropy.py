"""Portable integer entropy coder: priors, round trips, corrupt input, speed."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mridc.shared.entropy import (
    CorruptStreamError,
    TokenPrior,
    decode_mask,
    decode_tokens_adaptive,
    decode_tokens_static,
    encode_mask,
    encode_tokens_adaptive,
    encode_tokens_static,
)
from mridc.shared.fuzz import synthetic_frame, zipf_prior

FAST = settings(max_examples=60, deadline=None)

masks = st.tuples(st.integers(1, 12), st.integers(1, 12)).flatmap(
    lambda hw: hnp.arrays(bool, hw, elements=st.booleans())
)


# --------------------------------------------------------------------------- TokenPrior


def test_uniform_prior_sums_to_precision():
    for n in (1, 3, 1000, 1024, 65536):
        prior = TokenPrior.uniform(n)
        assert sum(prior.freqs) == 1 << 16 and min(prior.freqs) >= 1 and prior.size == n


@FAST
@given(st.lists(st.integers(0, 10**12), min_size=1, max_size=2000))
def test_from_counts_is_a_valid_monotone_table(counts):
    prior = TokenPrior.from_counts(counts)
    assert sum(prior.freqs) == 1 << 16 and min(prior.freqs) >= 1
    by_count: dict[int, list[int]] = {}
    for c, f in zip(counts, prior.freqs):
        by_count.setdefault(c, []).append(f)
    groups = [by_count[c] for c in sorted(by_count)]
    for smaller, larger in itertools.pairwise(groups):
        assert max(smaller) <= min(larger)  # a larger count never gets a smaller frequency


def test_prior_rejects_bad_tables(tmp_path):
    with pytest.raises(ValueError):
        TokenPrior((1, 2, 3))
    with pytest.raises(ValueError):
        TokenPrior((0, 1 << 16))
    np.savez(tmp_path / "bad.npz", freqs=np.array([0.5, 0.5]))
    with pytest.raises(ValueError):
        TokenPrior.load(tmp_path / "bad.npz")


def test_prior_save_load_round_trip(tmp_path):
    prior = zipf_prior()
    prior.save(tmp_path / "token_prior.npz")
    loaded = TokenPrior.load(tmp_path / "token_prior.npz")
    assert loaded == prior
    with np.load(tmp_path / "token_prior.npz") as z:
        assert z["freqs"].dtype.kind == "u"


# --------------------------------------------------------------------------- round trips


@FAST
@given(masks)
def test_mask_round_trip(mask):
    data = encode_mask(mask)
    assert np.array_equal(decode_mask(data, *mask.shape), mask)


@FAST
@given(masks, st.integers(1, 10), st.data())
def test_token_coders_round_trip(mask, bits, data):
    n = int(mask.sum())
    tokens = np.asarray(data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=n, max_size=n)),
                        dtype=np.uint16)
    prior = TokenPrior.uniform(1 << bits) if data.draw(st.booleans()) else TokenPrior.from_counts(
        [1 + (i * 7919) % 97 for i in range(1 << bits)])
    static = encode_tokens_static(tokens, prior)
    assert np.array_equal(decode_tokens_static(static, n, prior), tokens)
    adaptive = encode_tokens_adaptive(tokens, mask, prior)
    assert np.array_equal(decode_tokens_adaptive(adaptive, mask, prior), tokens)


def test_extreme_priors_round_trip():
    # One symbol holding almost all the mass, and 2**16 symbols of frequency 1.
    skewed = TokenPrior(((1 << 16) - 1023,) + (1,) * 1023)
    tokens = np.array([0] * 500 + [1023, 5, 0, 0], dtype=np.uint16)
    assert np.array_equal(decode_tokens_static(encode_tokens_static(tokens, skewed), 504, skewed), tokens)
    flat = TokenPrior.uniform(1 << 16)
    tokens = np.array([0, 65535, 12345, 1], dtype=np.uint16)
    assert np.array_equal(decode_tokens_static(encode_tokens_static(tokens, flat), 4, flat), tokens)


def test_constant_mask_costs_almost_nothing():
    assert len(encode_mask(np.zeros((32, 48), bool))) <= 2
    assert len(encode_mask(np.ones((32, 48), bool))) <= 12


def test_out_of_range_tokens_are_refused():
    with pytest.raises(ValueError):
        encode_tokens_static(np.array([4]), TokenPrior.uniform(4))


# --------------------------------------------------------------------------- corrupt input


@FAST
@given(st.binary(max_size=64), st.integers(0, 300))
def test_static_decoder_on_garbage_returns_or_raises_cleanly(data, count):
    prior = zipf_prior()
    try:
        tokens = decode_tokens_static(data, count, prior)
    except CorruptStreamError:
        return
    assert tokens.shape == (count,) and int(tokens.max(initial=0)) < prior.size


@FAST
@given(st.binary(max_size=64), masks)
def test_mask_and_adaptive_decoders_on_garbage(data, mask):
    assert decode_mask(data, *mask.shape).shape == mask.shape
    try:
        tokens = decode_tokens_adaptive(data, mask, TokenPrior.uniform(16))
    except CorruptStreamError:
        return
    assert tokens.shape == (int(mask.sum()),)


# --------------------------------------------------------------------------- speed


def test_speed_of_a_48x32_frame():
    """The edge codes a frame several times for rate control: one pass must take a few ms."""
    prior = zipf_prior()
    frame = synthetic_frame(np.random.default_rng(1), 32, 48, 0.5, prior)
    mask, tokens = frame.keep_mask, frame.kept_tokens
    timings = {}
    for name, fn in [("mask", lambda: encode_mask(mask)),
                     ("static", lambda: encode_tokens_static(tokens, prior)),
                     ("adaptive", lambda: encode_tokens_adaptive(tokens, mask, prior))]:
        start = time.perf_counter()
        for _ in range(5):
            fn()
        timings[name] = (time.perf_counter() - start) / 5 * 1e3
    print("encode ms, 48x32 grid, half kept:", {k: round(v, 2) for k, v in timings.items()})
    assert sum(timings.values()) < 60  # generous: the machine is shared; typical is ~3 ms
