"""Inter MRD frames: changes coded against a reference grid; exact round trips, wrong references refused."""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mridc.shared.bitstream import (
    FLAG_INTER,
    BitstreamError,
    TokenFrame,
    compress,
    decompress,
    inspect,
    write_varint,
)
from mridc.shared.entropy import TokenPrior
from mridc.shared.fuzz import _fix_crc
from mridc.shared.inter import (
    InterFrame,
    ReferenceGrid,
    apply_inter,
    compress_inter,
    decode_tokens_ref,
    decompress_inter,
    encode_tokens_ref,
    inter_token_frame,
    is_inter,
    parse_inter_header,
)

PRIOR = TokenPrior.from_counts(np.arange(1, 257)[::-1] ** 2)


def change_frame(mask: np.ndarray, new: np.ndarray, **extra) -> TokenFrame:
    h, w = mask.shape
    fields = {"width": w * 16, "height": h * 16, "grid_h": h, "grid_w": w, "model_id": 0x1234ABCD,
              "codebook_bits": 8, "keep_mask": mask, "kept_tokens": new[mask].astype(np.uint16), "rate_q": 3}
    return TokenFrame(**(fields | extra))


def scene(seed: int = 0, grid=(12, 20), known: float = 1.0, change: float = 0.3):
    """A reference, a new grid differing from it at `change` of the positions, and the change frame."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, grid)
    reference = ReferenceGrid(tokens, rng.random(grid) < known)
    new = tokens.copy()
    mask = rng.random(grid) < change
    new[mask] = (tokens[mask] + rng.integers(1, 256, int(mask.sum()))) % 256  # really changed
    return reference, new, change_frame(mask, new)


def round_trip(reference: ReferenceGrid, frame: TokenFrame, token_coder="auto", seq=7) -> InterFrame:
    data = compress_inter(frame, reference, seq, PRIOR, token_coder=token_coder)
    result = decompress_inter(data, PRIOR, reference, model_id=0x1234ABCD)
    assert result.changes == frame and result.ref_sequence == seq and result.ref_crc == reference.crc()
    assert result.grid == apply_inter(reference, frame)
    return result


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("grid", [(1, 1), (1, 17), (9, 1), (12, 20), (32, 48)])
@pytest.mark.parametrize("coder", ["auto", "static", "ref"])
def test_random_grids_round_trip(grid, coder):
    for seed in range(3):
        reference, _, frame = scene(seed, grid, known=0.8)
        round_trip(reference, frame, coder)


@pytest.mark.parametrize("coder", ["auto", "static", "ref"])
def test_all_and_none_changed(coder):
    reference, new, _ = scene(1)
    everything = change_frame(np.ones(new.shape, bool), (new + 1) % 256)
    nothing = change_frame(np.zeros(new.shape, bool), new)
    data_all = compress_inter(everything, reference, 1, PRIOR, token_coder=coder)
    data_none = compress_inter(nothing, reference, 1, PRIOR, token_coder=coder)
    assert inspect(data_all)["all_kept"] and [s["name"] for s in inspect(data_all)["sections"]][:1] == ["reference"]
    info = inspect(data_none)
    assert info["none_kept"] and [s["name"] for s in info["sections"]] == ["reference"]
    assert len(data_none) <= 30  # an identical frame: header, reference section, CRC
    for frame in (everything, nothing):
        round_trip(reference, frame, coder)
    assert decompress_inter(data_none, PRIOR, reference).grid == reference


def test_reference_with_unknown_positions_and_refreshes():
    rng = np.random.default_rng(3)
    reference, new, _ = scene(3, known=0.5)
    # Refresh: send positions the reference does not know, some with the token it happens to store there.
    mask = ~reference.known & (rng.random(new.shape) < 0.7) | (reference.known & (rng.random(new.shape) < 0.1))
    frame = change_frame(mask, new)
    result = round_trip(reference, frame)
    assert np.array_equal(result.grid.known, reference.known | mask)
    assert np.array_equal(result.grid.tokens[mask], new[mask])
    # Nothing known: the inter frame refreshes like an intra frame.
    empty = ReferenceGrid.empty(*new.shape)
    round_trip(empty, change_frame(rng.random(new.shape) < 0.5, new), "ref")


def test_a_changed_token_equal_to_the_reference_still_round_trips():
    # Not useful to send, but legal: the coder excludes it from the candidates and falls back to the prior.
    reference, new, _ = scene(4)
    round_trip(reference, change_frame(np.ones(new.shape, bool), np.array(reference.tokens)), "ref")


def test_frame_fields_are_carried():
    reference, _, frame = scene(5)
    for extra in ({"flags": 9}, {"resampled": True}, {"rate_q": 2**32 - 1}, {"model_id": 0}):
        data = compress_inter(replace(frame, **extra), reference, 2**32 - 1, PRIOR)
        assert decompress_inter(data, PRIOR, reference).changes == replace(frame, **extra)


# --------------------------------------------------------------------------- semantics


def test_apply_inter_and_the_token_frame_to_complete():
    tokens = np.array([[1, 2, 3], [4, 5, 6]])
    known = np.array([[True, True, False], [False, True, True]])
    reference = ReferenceGrid(tokens, known)
    mask = np.array([[False, True, True], [False, False, False]])
    changes = change_frame(mask, np.array([[0, 20, 30], [0, 0, 0]]))
    grid = apply_inter(reference, changes)
    assert grid == ReferenceGrid(np.array([[1, 20, 30], [0, 5, 6]]), np.array([[1, 1, 1], [0, 1, 1]], bool))
    assert grid.tokens[1, 0] == 0  # unknown positions are stored as 0
    data = compress_inter(changes, reference, 0, PRIOR)
    result = decompress_inter(data, PRIOR, reference)
    frame = inter_token_frame(grid, parse_inter_header(data)[0])
    assert result.frame == frame
    assert np.array_equal(frame.keep_mask, grid.known) and frame.kept_tokens.tolist() == [1, 20, 30, 5, 6]
    assert (frame.width, frame.grid_h, frame.model_id, frame.rate_q) == (48, 2, 0x1234ABCD, 3)
    # The same grid from an intra frame: known = keep_mask.
    intra = change_frame(grid.known, grid.tokens)
    assert ReferenceGrid.from_frame(intra) == grid and ReferenceGrid.from_frame(intra).crc() == grid.crc()
    with pytest.raises(ValueError, match="does not match"):
        apply_inter(reference, change_frame(np.ones((3, 3), bool), np.zeros((3, 3), int)))


def test_reference_crc_is_canonical():
    tokens = np.array([[1, 2], [3, 4]])
    known = np.array([[True, False], [True, True]])
    grid = ReferenceGrid(tokens, known)
    expected = (b"\x00\x02\x00\x02" + bytes([0b10110000]) + b"\x01\x00\x03\x00\x04\x00")
    assert grid.crc() == zlib.crc32(expected)
    assert ReferenceGrid(np.where(known, tokens, 77), known).crc() == grid.crc()  # unknown tokens do not count
    assert ReferenceGrid(tokens, np.ones((2, 2), bool)).crc() != grid.crc()
    assert ReferenceGrid(tokens.T.copy(), known.T.copy()).crc() != grid.crc()
    assert ReferenceGrid(np.zeros((1, 4), int), np.zeros((1, 4), bool)).crc() != ReferenceGrid.empty(2, 2).crc()
    for bad, why in [((tokens, known.astype(int)), "bool"), ((tokens[:1], known), "shape"),
                     ((-tokens, known), r"\[0, 65535\]"), ((tokens * 1.0, known), "integers")]:
        with pytest.raises(ValueError, match=why):
            ReferenceGrid(*bad)
    assert not grid.tokens.flags.writeable and not grid.known.flags.writeable


def test_is_inter_and_intra_streams_are_not_confused():
    reference, _, frame = scene(6)
    data = compress_inter(frame, reference, 3, PRIOR)
    intra = compress(frame, PRIOR)
    assert is_inter(data) and not is_inter(intra) and not is_inter(b"") and not is_inter(b"XY\x01\x10")
    with pytest.raises(BitstreamError, match="inter frame .*reference"):
        decompress(data, PRIOR)
    with pytest.raises(BitstreamError, match="not an inter frame"):
        decompress_inter(intra, PRIOR, reference)
    with pytest.raises(BitstreamError, match="not an inter frame"):
        parse_inter_header(intra)
    info = inspect(data)
    assert info["inter"] and info["ref_sequence"] == 3 and info["ref_crc32"] == f"{reference.crc():08x}"
    assert not inspect(intra)["inter"] and "ref_sequence" not in inspect(intra)
    assert decompress(intra, PRIOR) == frame  # intra unaffected
    header, seq, crc = parse_inter_header(data)
    assert header.flags & FLAG_INTER and (seq, crc) == (3, reference.crc()) and header.grid_w == 20


# --------------------------------------------------------------------------- refusals


def test_wrong_or_absent_reference_is_refused_by_name():
    reference, _, frame = scene(7)
    data = compress_inter(frame, reference, 12, PRIOR)
    with pytest.raises(BitstreamError, match=r"needs its reference frame \(sequence 12, crc [0-9a-f]{8}\): none"):
        decompress_inter(data, PRIOR, None)
    other = ReferenceGrid(np.array(reference.tokens) ^ 1, reference.known)
    with pytest.raises(BitstreamError, match="wrong reference: .*sequence 12.*the given reference has crc"):
        decompress_inter(data, PRIOR, other)
    one_unknown = np.array(reference.known)
    one_unknown[0, 0] = False
    with pytest.raises(BitstreamError, match="wrong reference"):
        decompress_inter(data, PRIOR, ReferenceGrid(reference.tokens, one_unknown))
    with pytest.raises(BitstreamError, match="reference grid 12x21 does not match the frame's 12x20 grid"):
        decompress_inter(data, PRIOR, ReferenceGrid.empty(12, 21))
    with pytest.raises(BitstreamError, match="made with model"):
        decompress_inter(data, PRIOR, reference, model_id=1)
    with pytest.raises(BitstreamError, match="prior has 4 symbols"):
        decompress_inter(data, TokenPrior.uniform(4), reference)


def split_sections(data: bytes) -> tuple[bytes, list[bytes]]:
    """The header bytes and each section's raw bytes (type, length, payload) of a stream."""
    info = inspect(data)
    raw = []
    for sec in info["sections"]:
        start = sec["offset"] - 1 - len(write_varint(sec["bytes"]))
        raw.append(data[start: sec["offset"] + sec["bytes"]])
    return data[: info["header_bytes"]], raw


def test_crc_mismatch_and_malformed_sections():
    reference, _, frame = scene(8)
    data = compress_inter(frame, reference, 300, PRIOR)
    corrupt = bytearray(data)
    corrupt[len(corrupt) // 2] ^= 0x08
    for call in (lambda d: parse_inter_header(d), lambda d: decompress_inter(d, PRIOR, reference)):
        with pytest.raises(BitstreamError, match="CRC mismatch"):
            call(bytes(corrupt))
    head, (ref_sec, mask_sec, token_sec) = split_sections(data)
    rest = mask_sec + token_sec
    assert ref_sec[0] == 0x05 and mask_sec[0] == 0x01
    cases = [
        (head + rest, "without a reference section"),
        (head + ref_sec + ref_sec + rest, "duplicate reference section"),
        (head + b"\x05\x04\x01abc" + rest, "expected 4"),
        (head + b"\x05\x06\x01abcde" + rest, "expected 4"),
        (head + b"\x05\x09\x80\x80\x80\x80\x10abcd" + rest, "exceeds 32 bits"),
        (head + ref_sec + rest + b"\x03\x00", "more than one token section|duplicate"),
        (head + ref_sec + rest + b"\x07\x00", "unknown critical section type 0x07"),
        (head + ref_sec + rest + b"\x06\x00", "more than one token section|duplicate"),
        (head + ref_sec + mask_sec, "token section missing"),
        (head + ref_sec + token_sec, "mask section missing"),
    ]
    for body, why in cases:
        stream = _fix_crc(body + b"\0\0\0\0")
        with pytest.raises(BitstreamError, match=why):
            decompress_inter(stream, PRIOR, reference)
    assert decompress_inter(_fix_crc(head + ref_sec + rest + b"\x91\x02hi" + b"\0" * 4), PRIOR,
                            reference).changes == frame  # ancillary sections are skipped
    # In an intra stream the inter section types stay unknown critical types.
    intra = compress(frame, PRIOR)[:-4]
    with pytest.raises(BitstreamError, match="unknown critical section type 0x05"):
        decompress(_fix_crc(intra + ref_sec + b"\0" * 4), PRIOR)


def test_compress_inter_validates_its_inputs():
    reference, _, frame = scene(9)
    with pytest.raises(ValueError, match="does not match the frame's"):
        compress_inter(frame, ReferenceGrid.empty(3, 3), 0, PRIOR)
    with pytest.raises(ValueError, match="ref_sequence"):
        compress_inter(frame, reference, -1, PRIOR)
    with pytest.raises(ValueError, match="ref_sequence"):
        compress_inter(frame, reference, 2**32, PRIOR)
    with pytest.raises(ValueError, match="token_coder"):
        compress_inter(frame, reference, 0, PRIOR, token_coder="maskgit")
    with pytest.raises(ValueError, match="outside the frame's 2\\*\\*4 codebook"):
        compress_inter(replace(frame, codebook_bits=4, kept_tokens=frame.kept_tokens % 16), reference, 0,
                       TokenPrior.uniform(16))
    with pytest.raises(ValueError, match="must be a ReferenceGrid"):
        compress_inter(frame, reference.tokens, 0, PRIOR)


# --------------------------------------------------------------------------- coding gain and pinned bytes


def shifted_object(seed: int = 0, grid=(24, 32)):
    """A static background with an object that moved one token to the right."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 256, grid)
    before = background.copy()
    before[8:16, 6:14] = rng.integers(0, 256, (8, 8))
    after = background.copy()
    after[8:16, 7:15] = before[8:16, 6:14]
    mask = after != before
    return ReferenceGrid(before, np.ones(grid, bool)), change_frame(mask, after)


def test_ref_coder_beats_static_on_a_shifted_object():
    reference, frame = shifted_object()
    static = compress_inter(frame, reference, 1, PRIOR, token_coder="static")
    ref = compress_inter(frame, reference, 1, PRIOR, token_coder="ref")
    auto = compress_inter(frame, reference, 1, PRIOR)
    token_bytes = [inspect(d)["sections"][-1]["bytes"] for d in (static, ref)]
    assert token_bytes[1] * 3 < token_bytes[0] and len(ref) < len(static) and auto == ref
    assert inspect(ref)["sections"][-1]["name"] == "tokens-ref"
    round_trip(reference, frame, "ref")
    # With independent new tokens the flags buy nothing and auto keeps static.
    reference, _, frame = scene(10, grid=(16, 16), change=0.5)
    assert inspect(compress_inter(frame, reference, 1, PRIOR))["sections"][-1]["name"] == "tokens-static"


def test_token_coder_alone_round_trips():
    reference, frame = shifted_object(1)
    payload = encode_tokens_ref(frame.kept_tokens, frame.keep_mask, reference, PRIOR)
    assert np.array_equal(decode_tokens_ref(payload, frame.keep_mask, reference, PRIOR), frame.kept_tokens)
    with pytest.raises(ValueError, match="changed positions"):
        encode_tokens_ref(frame.kept_tokens[:-1], frame.keep_mask, reference, PRIOR)


def test_inter_bytes_are_pinned():
    # The bytes of a fixed inter frame: a change here is a format change (bump the version) or a bug.
    reference, frame = shifted_object(2)
    data = compress_inter(frame, reference, 1234, PRIOR, token_coder="ref")
    partial, _, changes = scene(11, known=0.6)
    data += compress_inter(changes, partial, 5, PRIOR, token_coder="ref")
    assert hashlib.sha256(data).hexdigest()[:16] == PINNED


PINNED = "5321d5bcbb2b9976"


# --------------------------------------------------------------------------- fuzzing

FUZZ_SEEDS = [compress_inter(f, r, s, PRIOR, token_coder=c) for (r, _, f), s, c in [
    (scene(20, (5, 7), known=0.7), 1, "ref"), (scene(21, (3, 3), change=1.0), 2**31, "static"),
    (scene(22, (6, 4), change=0.0), 0, "auto"), (scene(23, (8, 8), known=0.3, change=0.5), 99, "ref")]]
FUZZ_REFS = [scene(20, (5, 7), known=0.7)[0], scene(21, (3, 3), change=1.0)[0], scene(22, (6, 4), change=0.0)[0],
             scene(23, (8, 8), known=0.3, change=0.5)[0]]


def check_inter(data: bytes, reference: ReferenceGrid | None) -> None:
    """Every input decodes or raises BitstreamError; nothing else."""
    try:
        parse_inter_header(data)
    except BitstreamError:
        pass
    try:
        inspect(data)
    except BitstreamError:
        pass
    try:
        result = decompress_inter(data, PRIOR, reference)
    except BitstreamError:
        return
    assert reference is not None
    assert result.changes.kept_tokens.size == int(result.changes.keep_mask.sum())
    assert result.grid.shape == reference.shape


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(FUZZ_SEEDS) - 1), st.sampled_from(["set", "xor", "cut", "insert", "delete"]),
       st.integers(0, 10**6), st.integers(0, 255), st.booleans(), st.booleans())
def test_fuzz_mutated_inter_streams(which, kind, where, value, fix, with_reference):
    data = bytearray(FUZZ_SEEDS[which])
    i = where % len(data)
    if kind == "set":
        data[i] = value
    elif kind == "xor":
        data[i] ^= value or 1
    elif kind == "cut":
        data = data[:i]
    elif kind == "insert":
        data.insert(i, value)
    else:
        del data[i]
    data = bytes(data)
    check_inter(_fix_crc(data) if fix else data, FUZZ_REFS[which] if with_reference else None)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.booleans(), st.booleans())
def test_fuzz_arbitrary_bytes(data, fix, with_reference):
    stream = _fix_crc(b"MR\x01" + bytes([FLAG_INTER | (data[0] & 0x23 if data else 0)]) + data[1:] + b"\0" * 4) \
        if fix else data
    check_inter(stream, FUZZ_REFS[0] if with_reference else None)


def test_every_single_byte_mutation_and_truncation():
    data, reference = FUZZ_SEEDS[0], FUZZ_REFS[0]
    for cut in range(len(data)):
        with pytest.raises(BitstreamError):
            decompress_inter(data[:cut], PRIOR, reference)
    for i in range(len(data)):
        for value in (0x00, 0xFF, data[i] ^ 0x01, data[i] ^ 0x80):
            mutated = bytearray(data)
            mutated[i] = value
            check_inter(bytes(mutated), reference)
            check_inter(_fix_crc(bytes(mutated)), reference)


def test_new_content_takes_the_adaptive_coder_and_round_trips():
    """Tokens that repeat their own left/up neighbours (new content the reference cannot predict) are coded with
    the intra coder's neighbour flags: smaller than static, and each forced coder round-trips."""
    rng = np.random.default_rng(4)
    h, w = 12, 16
    reference = ReferenceGrid(rng.integers(0, 256, (h, w)), np.zeros((h, w), bool))  # nothing known yet
    tokens = np.repeat(rng.integers(0, 256, (h, w // 4)), 4, axis=1)  # runs of 4 equal tokens
    mask = np.ones((h, w), bool)
    frame = change_frame(mask, tokens)
    sizes = {}
    for coder in ("static", "adaptive", "ref", "auto"):
        data = compress_inter(frame, reference, 3, PRIOR, token_coder=coder)
        assert decompress_inter(data, PRIOR, reference).changes == frame
        sizes[coder] = len(data)
    assert sizes["adaptive"] < 0.8 * sizes["static"] and sizes["auto"] == min(sizes.values())
