"""Fuzz driver for the MRD parser, and the synthetic frames it (and the size measurements) use.

    python -m mridc.shared.fuzz --cases 100000 [--seed 1]     # make fuzz
    python -m mridc.shared.fuzz --measure                     # coded size vs fixed-width indices

Every mutated stream must either decode or raise ``BitstreamError``; anything else (another
exception, or a case slower than ``--max-case-s``) is a failure, printed with the stream in hex
so it can be replayed. Half of the mutations recompute the CRC, so the parser and the entropy
decoders behind the CRC check are fuzzed too, not only the checksum.
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from dataclasses import dataclass, field

import numpy as np

from mridc.shared.bitstream import BitstreamError, TokenFrame, compress, decompress, inspect
from mridc.shared.entropy import TokenPrior

CODEBOOK_BITS = 10

# --------------------------------------------------------------------------- synthetic data


def zipf_counts(n: int, floor: int = 0) -> list[int]:
    """Integer Zipf counts 10**9 // rank + floor (integers, so the prior built from them is exact)."""
    return [10**9 // rank + floor for rank in range(1, n + 1)]


def zipf_prior(n: int = 1 << CODEBOOK_BITS) -> TokenPrior:
    """A smoothed Zipf prior: 1/rank plus a flat floor (the stand-in until a trained prior exists)."""
    return TokenPrior.from_counts(zipf_counts(n, floor=10**9 // (4 * n)))


def _smooth_field(rng: np.random.Generator, h: int, w: int, scale: int) -> np.ndarray:
    coarse = rng.random((h // scale + 2, w // scale + 2))
    field_ = np.kron(coarse, np.ones((scale, scale)))[:h, :w]
    for _ in range(2):  # box blur: blobs, not blocks
        padded = np.pad(field_, 1, mode="edge")
        field_ = sum(padded[dy: dy + h, dx: dx + w] for dy in range(3) for dx in range(3)) / 9
    return field_ + 0.05 * rng.random((h, w))


def synthetic_mask(rng: np.random.Generator, h: int, w: int, keep_ratio: float) -> np.ndarray:
    """Spatially coherent keep mask: the top ``keep_ratio`` of a smooth random "complexity" map."""
    if keep_ratio >= 1.0:
        return np.ones((h, w), dtype=bool)
    if keep_ratio <= 0.0:
        return np.zeros((h, w), dtype=bool)
    complexity = _smooth_field(rng, h, w, scale=4)
    keep = round(keep_ratio * h * w)
    order = np.argsort(-complexity.reshape(-1), kind="stable")
    mask = np.zeros(h * w, dtype=bool)
    mask[order[:keep]] = True
    return mask.reshape(h, w)


def synthetic_tokens(rng: np.random.Generator, h: int, w: int, prior: TokenPrior,
                     repeat: float = 0.3) -> np.ndarray:
    """A token grid: each token repeats its left or up neighbour with probability ``repeat``,
    otherwise it is drawn from ``prior`` (VQ grids repeat codes over uniform texture)."""
    p = np.asarray(prior.freqs, dtype=np.float64) / (1 << prior.precision_bits)
    draws = rng.choice(prior.size, size=(h, w), p=p)
    copy = rng.random((h, w))
    grid = np.zeros((h, w), dtype=np.int64)
    for y in range(h):
        for x in range(w):
            if copy[y, x] < repeat / 2 and x > 0:
                grid[y, x] = grid[y, x - 1]
            elif copy[y, x] < repeat and y > 0:
                grid[y, x] = grid[y - 1, x]
            else:
                grid[y, x] = draws[y, x]
    return grid


def synthetic_frame(rng: np.random.Generator, grid_h: int, grid_w: int, keep_ratio: float,
                    prior: TokenPrior, repeat: float = 0.3, stride: int = 16) -> TokenFrame:
    mask = synthetic_mask(rng, grid_h, grid_w, keep_ratio)
    grid = synthetic_tokens(rng, grid_h, grid_w, prior, repeat)
    return TokenFrame(
        width=grid_w * stride, height=grid_h * stride, grid_h=grid_h, grid_w=grid_w,
        model_id=0x5EED0001, codebook_bits=int(prior.size).bit_length() - 1, keep_mask=mask,
        kept_tokens=grid[mask].astype(np.uint16), rate_q=int(keep_ratio * 100),
    )


# --------------------------------------------------------------------------- fuzzing


def seed_streams(rng: np.random.Generator) -> list[tuple[bytes, TokenPrior]]:
    """Valid streams covering every header flag, both token coders and odd grid shapes."""
    priors = [zipf_prior(), TokenPrior.uniform(1 << CODEBOOK_BITS), TokenPrior.uniform(4)]
    streams = []
    shapes = [(1, 1), (1, 7), (5, 1), (3, 4), (8, 12), (32, 48)]
    for i, (h, w) in enumerate(shapes):
        for keep in (0.0, 0.3, 1.0):
            prior = priors[i % len(priors)]
            frame = synthetic_frame(rng, h, w, keep, prior)
            if i % 2:
                frame = TokenFrame(**{**frame.__dict__, "flags": i, "rate_q": 300 + i})
            for coder in ("static", "adaptive"):
                streams.append((compress(frame, prior, token_coder=coder), prior))
    return streams


def _fix_crc(data: bytes) -> bytes:
    if len(data) < 5:
        return data
    return data[:-4] + zlib.crc32(data[:-4]).to_bytes(4, "big")


def mutate(rng: np.random.Generator, data: bytes) -> bytes:
    """One random mutation of ``data`` (bit flips, truncation, forged fields, garbage...)."""
    buf = bytearray(data)
    kind = int(rng.integers(9))
    if kind == 0 and buf:  # flip 1..8 bits
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(len(buf)))
            buf[i] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # truncate
        del buf[int(rng.integers(len(buf) + 1)):]
    elif kind == 2 and buf:  # overwrite a header byte: forged sizes, versions, flags
        i = int(rng.integers(min(len(buf), 20)))
        buf[i] = int(rng.choice([0, 1, 0x7F, 0x80, 0xFF, int(rng.integers(256))]))
    elif kind == 3 and len(buf) > 6:  # splice a long varint into the header
        i = int(rng.integers(4, min(len(buf), 16)))
        buf[i:i] = bytes([0xFF] * int(rng.integers(1, 6)) + [int(rng.integers(128))])
    elif kind == 4:  # append garbage
        buf += rng.integers(0, 256, int(rng.integers(1, 64))).astype(np.uint8).tobytes()
    elif kind == 5 and buf:  # delete or insert a byte
        i = int(rng.integers(len(buf)))
        if rng.integers(2):
            del buf[i]
        else:
            buf.insert(i, int(rng.integers(256)))
    elif kind == 6:  # random bytes, sometimes behind a valid magic and version
        size = int(rng.integers(0, 80))
        buf = bytearray(rng.integers(0, 256, size).astype(np.uint8).tobytes())
        if rng.integers(2):
            buf[:3] = b"MR\x01"
    elif kind == 7 and len(buf) > 8:  # randomise a payload stretch
        i = int(rng.integers(len(buf)))
        j = min(len(buf), i + int(rng.integers(1, 16)))
        buf[i:j] = rng.integers(0, 256, j - i).astype(np.uint8).tobytes()
    elif kind == 8:
        buf = bytearray()
    out = bytes(buf)
    return _fix_crc(out) if rng.integers(2) else out


@dataclass
class FuzzReport:
    cases: int = 0
    decoded: int = 0
    rejected: int = 0
    slowest_s: float = 0.0
    failures: list[str] = field(default_factory=list)


def check_stream(data: bytes, prior: TokenPrior) -> bool:
    """True if ``data`` decodes, False if it is rejected cleanly; any other exception propagates."""
    try:
        inspect(data)
        frame = decompress(data, prior)
    except BitstreamError:
        return False
    if frame.kept_tokens.size != int(frame.keep_mask.sum()):
        raise AssertionError("decoded frame is inconsistent")
    return True


def run_fuzz(cases: int, seed: int = 0, max_case_s: float = 2.0) -> FuzzReport:
    rng = np.random.default_rng(seed)
    seeds = seed_streams(rng)
    report = FuzzReport()
    for _ in range(cases):
        data, prior = seeds[int(rng.integers(len(seeds)))]
        for _ in range(int(rng.integers(1, 3))):  # sometimes two mutations stacked
            data = mutate(rng, data)
        start = time.perf_counter()
        try:
            ok = check_stream(data, prior)
        except Exception as exc:  # noqa: BLE001 - the point is to catch everything
            report.failures.append(f"{type(exc).__name__}: {exc} :: {data.hex()}")
            ok = False
        elapsed = time.perf_counter() - start
        report.slowest_s = max(report.slowest_s, elapsed)
        if elapsed > max_case_s:
            report.failures.append(f"slow case ({elapsed:.2f} s) :: {data.hex()}")
        report.cases += 1
        report.decoded += ok
        report.rejected += not ok
    return report


# --------------------------------------------------------------------------- size measurement


def measure(prior: TokenPrior | None = None, frames: int = 8, seed: int = 0,
            grid: tuple[int, int] = (32, 48), repeat: float = 0.3) -> list[dict]:
    """Coded bits per frame vs fixed-width indices, on synthetic frames (see docs/bitstream.md)."""
    from mridc.shared.entropy import encode_mask, encode_tokens_adaptive, encode_tokens_static

    prior = prior or zipf_prior()
    bits = int(prior.size).bit_length() - 1
    rng = np.random.default_rng(seed)
    rows = []
    for keep in (0.1, 0.25, 0.5, 1.0):
        acc = {"keep_ratio": keep, "mask_raw": 0, "mask": 0, "tokens_raw": 0, "static": 0, "adaptive": 0,
               "stream": 0, "encode_ms": 0.0}
        for _ in range(frames):
            frame = synthetic_frame(rng, *grid, keep, prior, repeat)
            acc["mask_raw"] += frame.keep_mask.size
            acc["mask"] += 8 * len(encode_mask(frame.keep_mask)) if keep < 1 else 0
            acc["tokens_raw"] += bits * frame.kept_tokens.size
            acc["static"] += 8 * len(encode_tokens_static(frame.kept_tokens, prior))
            acc["adaptive"] += 8 * len(encode_tokens_adaptive(frame.kept_tokens, frame.keep_mask, prior))
            start = time.perf_counter()
            acc["stream"] += 8 * len(compress(frame, prior))
            acc["encode_ms"] += 1e3 * (time.perf_counter() - start)
        rows.append({k: (v / frames if k != "keep_ratio" else v) for k, v in acc.items()})
    return rows


def _print_measure(rows: list[dict], grid: tuple[int, int]) -> None:
    pixels = grid[0] * grid[1] * 256
    print(f"grid {grid[0]}x{grid[1]} ({pixels} px at stride 16), bits per frame (mean)")
    print("keep | mask raw -> ctx | tokens fixed -> static / adaptive | stream bytes | bpp | compress ms")
    for r in rows:
        print(f"{r['keep_ratio']:.2f} | {r['mask_raw']:.0f} -> {r['mask']:.0f} | {r['tokens_raw']:.0f} -> "
              f"{r['static']:.0f} / {r['adaptive']:.0f} | {r['stream'] / 8:.0f} | "
              f"{r['stream'] / pixels:.4f} | {r['encode_ms']:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mridc.shared.fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=10000, help="mutated streams to try (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--max-case-s", type=float, default=2.0, help="a case slower than this fails")
    parser.add_argument("--measure", action="store_true", help="print coded sizes instead of fuzzing")
    parser.add_argument("--prior", help="with --measure: a token_prior.npz to measure with")
    args = parser.parse_args(argv)
    if args.measure:
        prior = TokenPrior.load(args.prior) if args.prior else None
        _print_measure(measure(prior), (32, 48))
        return 0
    start = time.perf_counter()
    report = run_fuzz(args.cases, args.seed, args.max_case_s)
    print(f"{report.cases} cases in {time.perf_counter() - start:.1f} s: {report.decoded} decoded, "
          f"{report.rejected} rejected with BitstreamError, slowest {report.slowest_s * 1e3:.1f} ms, "
          f"{len(report.failures)} failures")
    for line in report.failures[:20]:
        print("FAIL", line)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
