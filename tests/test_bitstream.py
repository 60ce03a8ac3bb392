"""MRD bitstream: round trips, stored vectors, header rules, error messages, sizes."""

from __future__ import annotations

import json
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mridc.shared.bitstream import (
    FORMAT_VERSION,
    BitstreamError,
    TokenFrame,
    compress,
    decompress,
    header_size,
    inspect,
    write_varint,
)
from mridc.shared.entropy import (
    TokenPrior,
    encode_mask,
    encode_tokens_adaptive,
    encode_tokens_static,
)
from mridc.shared.fuzz import measure, synthetic_frame, zipf_prior

VECTORS = Path(__file__).parent / "vectors" / "mrd_v1.json"
PRIOR = zipf_prior()


def make_frame(h=4, w=6, keep=0.5, seed=0, **fields) -> TokenFrame:
    frame = synthetic_frame(np.random.default_rng(seed), h, w, keep, PRIOR)
    return replace(frame, **fields)


def with_crc(body: bytes) -> bytes:
    return body + zlib.crc32(body).to_bytes(4, "big")


def body_of(data: bytes) -> bytes:
    return data[:-4]


# --------------------------------------------------------------------------- round trips


@st.composite
def frames(draw):
    h, w = draw(st.integers(1, 16)), draw(st.integers(1, 16))
    bits = draw(st.integers(1, 10))
    mode = draw(st.sampled_from(["random", "empty", "full"]))
    if mode == "random":
        mask = draw(hnp.arrays(bool, (h, w), elements=st.booleans()))
    else:
        mask = np.full((h, w), mode == "full")
    n = int(mask.sum())
    tokens = draw(hnp.arrays(np.uint16, (n,), elements=st.integers(0, (1 << bits) - 1)))
    return TokenFrame(
        width=draw(st.integers(1, 16384)), height=draw(st.integers(1, 16384)), grid_h=h, grid_w=w,
        model_id=draw(st.integers(0, 2**32 - 1)), codebook_bits=bits, keep_mask=mask, kept_tokens=tokens,
        rate_q=draw(st.integers(0, 2**32 - 1)), flags=draw(st.sampled_from([0, 1, 2**32 - 1])),
    )


@settings(max_examples=150, deadline=None)
@given(frames(), st.sampled_from(["auto", "static", "adaptive"]), st.booleans())
def test_round_trip(frame, coder, uniform):
    prior = TokenPrior.uniform(1 << frame.codebook_bits) if uniform else TokenPrior.from_counts(
        [10**6 // (i + 1) for i in range(1 << frame.codebook_bits)])
    data = compress(frame, prior, token_coder=coder)
    assert decompress(data, prior) == frame
    info = inspect(data)
    assert (info["grid_h"], info["grid_w"], info["model_id"]) == (frame.grid_h, frame.grid_w, frame.model_id)
    assert info["total_bytes"] == len(data)


def test_auto_picks_the_smaller_token_section():
    frame = make_frame(32, 48, 0.5)
    sizes = {c: len(compress(frame, PRIOR, token_coder=c)) for c in ("static", "adaptive")}
    assert len(compress(frame, PRIOR)) == min(sizes.values())


def test_special_masks_have_no_mask_section():
    full = make_frame(keep=1.0)
    empty = make_frame(keep=0.0)
    assert [s["name"] for s in inspect(compress(full, PRIOR))["sections"]] in (["tokens-static"],
                                                                               ["tokens-adaptive"])
    info = inspect(compress(empty, PRIOR))
    assert info["none_kept"] and info["sections"] == []
    assert decompress(compress(empty, PRIOR), PRIOR) == empty


# --------------------------------------------------------------------------- stored vectors


def _vector_cases():
    doc = json.loads(VECTORS.read_text())
    priors = {name: TokenPrior(tuple(freqs)) for name, freqs in doc["priors"].items()}
    for case in doc["cases"]:
        f = case["frame"]
        mask = np.array([[c == "1" for c in row] for row in f["keep_mask"]], dtype=bool).reshape(
            f["grid_h"], f["grid_w"])
        frame = TokenFrame(
            width=f["width"], height=f["height"], grid_h=f["grid_h"], grid_w=f["grid_w"],
            model_id=f["model_id"], codebook_bits=f["codebook_bits"], keep_mask=mask,
            kept_tokens=np.array(f["kept_tokens"], dtype=np.uint16), rate_q=f["rate_q"], flags=f["flags"])
        yield pytest.param(case, frame, priors[case["prior"]], id=case["name"])


@pytest.mark.parametrize(("case", "frame", "prior"), list(_vector_cases()))
def test_stored_vectors_are_byte_exact(case, frame, prior):
    """The portable coder's bytes are pinned: a change here is a format change (bump the version)."""
    assert encode_mask(frame.keep_mask).hex() == case["mask_hex"]
    assert encode_tokens_static(frame.kept_tokens, prior).hex() == case["static_hex"]
    assert encode_tokens_adaptive(frame.kept_tokens, frame.keep_mask, prior).hex() == case["adaptive_hex"]
    for coder in ("auto", "static", "adaptive"):
        data = bytes.fromhex(case[f"stream_{coder}_hex"])
        assert compress(frame, prior, token_coder=coder) == data
        assert decompress(data, prior) == frame


# --------------------------------------------------------------------------- header and size


def test_header_is_a_few_bytes():
    frame = make_frame(32, 48, 0.25, width=768, height=512)
    assert header_size(frame) <= 22  # 16 header + 4 CRC for this frame; sections add 2-3 bytes each
    data = compress(frame, PRIOR)
    info = inspect(data)
    overhead = len(data) - sum(s["bytes"] for s in info["sections"])
    assert overhead <= 26


def test_768x512_at_low_rate_is_under_1kb():
    frame = make_frame(32, 48, 0.25, width=768, height=512)
    data = compress(frame, PRIOR)
    assert len(data) < 1024
    print(f"768x512, 25% kept: {len(data)} bytes = {8 * len(data) / (768 * 512):.4f} bpp")


def test_inspect_reports_fields():
    frame = make_frame(4, 6, 0.5, width=96, height=64, model_id=0xDEADBEEF, rate_q=42, flags=3)
    info = inspect(compress(frame, PRIOR))
    assert info["version"] == FORMAT_VERSION and info["model_id_hex"] == "deadbeef"
    assert (info["width"], info["height"], info["rate_q"], info["frame_flags"]) == (96, 64, 42, 3)
    assert info["sections"][0]["name"] == "mask"


def test_coded_size_vs_fixed_width_indices():
    rows = measure(frames=2, grid=(32, 48))
    for r in rows:
        print(f"keep {r['keep_ratio']:.2f}: mask {r['mask_raw']:.0f} -> {r['mask']:.0f} bits, tokens "
              f"{r['tokens_raw']:.0f} -> static {r['static']:.0f} / adaptive {r['adaptive']:.0f} bits, "
              f"stream {r['stream'] / 8:.0f} bytes")
        assert r["static"] < r["tokens_raw"] and r["mask"] < r["mask_raw"]


# --------------------------------------------------------------------------- errors


def expect_error(data: bytes, match: str, prior: TokenPrior = PRIOR) -> None:
    with pytest.raises(BitstreamError, match=match):
        decompress(data, prior)


def test_empty_and_foreign_input():
    expect_error(b"", "empty")
    expect_error(b"\x89PNG\r\n", "not an MRD stream")
    expect_error(b"MR", "truncated")
    with pytest.raises(BitstreamError):
        inspect(b"")


def test_unknown_version_is_named():
    data = bytearray(compress(make_frame(), PRIOR))
    data[2] = 7
    expect_error(with_crc(bytes(data[:-4])), "version 7")


def test_every_truncation_is_rejected():
    data = compress(make_frame(8, 8, 0.5), PRIOR)
    for cut in range(len(data)):
        expect_error(data[:cut], ".")


def test_crc_mismatch():
    data = bytearray(compress(make_frame(), PRIOR))
    data[-6] ^= 0x10
    expect_error(bytes(data), "CRC mismatch")


def test_reserved_features_are_refused_by_name():
    body = bytearray(body_of(compress(make_frame(), PRIOR)))
    body[3] |= 0x08
    expect_error(with_crc(bytes(body)), "sliced")
    body[3] = (body[3] & ~0x08) | 0x10
    expect_error(with_crc(bytes(body)), "inter")
    body[3] = 0x80
    expect_error(with_crc(bytes(body)), "unknown header flags")


def test_forged_sizes_are_capped():
    def header(width=64, height=64, gh=4, gw=4, bits=10):
        out = b"MR\x01\x01" + b"".join(write_varint(v) for v in (width, height, gh, gw))
        return out + b"\0\0\0\1" + bytes([bits]) + b"\0"

    expect_error(with_crc(header(width=16385)), "width 16385 out of range")
    expect_error(with_crc(header(height=0)), "height 0 out of range")
    expect_error(with_crc(header(gh=1025)), "grid_h 1025 out of range")
    expect_error(with_crc(header(gw=2**34)), "grid_w")
    expect_error(with_crc(header(bits=17)), "codebook_bits")
    expect_error(with_crc(header() + b"\x02\xff\xff\x03"), "declares 65535 bytes")
    expect_error(with_crc(b"MR\x01\x01" + b"\x80" * 6 + b"\0" * 10), "longer than")
    expect_error(with_crc(b"MR\x01\x01" + b"\x80\x00" + b"\0" * 10), "non-canonical")


def test_sections_rules():
    frame = make_frame(4, 6, 0.5)
    body = body_of(compress(frame, PRIOR))
    # Ancillary sections (type bit 7) are skipped, unknown critical ones refused.
    assert decompress(with_crc(body + b"\x90\x03abc"), PRIOR) == frame
    expect_error(with_crc(body + b"\x06\x00"), "unknown critical section type 0x06")
    expect_error(with_crc(body + b"\x04\x00"), "unknown critical section type 0x04")  # reserved slice
    info = inspect(with_crc(body + b"\x90\x03abc"))
    assert info["sections"][-1]["name"] == "ancillary 0x90"
    sections = body[inspect(with_crc(body))["header_bytes"]:]
    expect_error(with_crc(body + sections), "duplicate")


def test_model_and_prior_mismatch():
    frame = make_frame(model_id=0x01020304)
    data = compress(frame, PRIOR)
    assert decompress(data, PRIOR, model_id=0x01020304) == frame
    with pytest.raises(BitstreamError, match="made with model 01020304"):
        decompress(data, PRIOR, model_id=0x0A0B0C0D)
    expect_error(data, "prior has 4 symbols", TokenPrior.uniform(4))


def test_compress_validates_the_frame():
    frame = make_frame()
    with pytest.raises(ValueError, match="kept tokens"):
        compress(replace(frame, kept_tokens=frame.kept_tokens[:-1]), PRIOR)
    with pytest.raises(ValueError, match="grid_h"):
        compress(replace(frame, grid_h=2000), PRIOR)
    with pytest.raises(ValueError, match="prior has"):
        compress(frame, TokenPrior.uniform(8))
