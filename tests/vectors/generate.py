"""Regenerate mrd_v1.json: MRD v1 test vectors (inputs + expected bytes in hex).

    .venv/bin/python tests/vectors/generate.py

Only run this for a deliberate format change (and bump FORMAT_VERSION then): the stored bytes are
the proof that the coder is deterministic across platforms, and an ARM run is checked against them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from mridc.shared.bitstream import TokenFrame, compress
from mridc.shared.entropy import TokenPrior, encode_mask, encode_tokens_adaptive, encode_tokens_static
from mridc.shared.fuzz import synthetic_frame, zipf_prior

OUT = Path(__file__).with_name("mrd_v1.json")


def frame_case(name: str, frame: TokenFrame, prior_name: str, prior: TokenPrior) -> dict:
    mask = np.asarray(frame.keep_mask, dtype=bool)
    case = {
        "name": name,
        "prior": prior_name,
        "frame": {
            "width": frame.width, "height": frame.height, "grid_h": frame.grid_h, "grid_w": frame.grid_w,
            "model_id": frame.model_id, "codebook_bits": frame.codebook_bits, "rate_q": frame.rate_q,
            "flags": frame.flags,
            "keep_mask": ["".join("1" if b else "0" for b in row) for row in mask],
            "kept_tokens": [int(t) for t in frame.kept_tokens],
        },
        "mask_hex": encode_mask(mask).hex(),
        "static_hex": encode_tokens_static(frame.kept_tokens, prior).hex(),
        "adaptive_hex": encode_tokens_adaptive(frame.kept_tokens, mask, prior).hex(),
    }
    for coder in ("auto", "static", "adaptive"):
        case[f"stream_{coder}_hex"] = compress(frame, prior, token_coder=coder).hex()
    return case


def main() -> None:
    priors = {"zipf1024": zipf_prior(), "uniform1024": TokenPrior.uniform(1024), "uniform4": TokenPrior.uniform(4)}
    rng = np.random.default_rng(20261126)
    cases = []
    for name, (h, w), keep, prior_name in [
        ("1x1-kept", (1, 1), 1.0, "zipf1024"),
        ("1x1-dropped", (1, 1), 0.0, "zipf1024"),
        ("3x5-half-uniform4", (3, 5), 0.5, "uniform4"),
        ("7x1-column", (7, 1), 0.4, "uniform1024"),
        ("32x48-keep10", (32, 48), 0.1, "zipf1024"),
        ("32x48-keep50", (32, 48), 0.5, "zipf1024"),
        ("32x48-all", (32, 48), 1.0, "zipf1024"),
        ("32x48-none", (32, 48), 0.0, "zipf1024"),
    ]:
        prior = priors[prior_name]
        frame = synthetic_frame(rng, h, w, keep, prior)
        if name.startswith("3x5"):
            frame = TokenFrame(**{**frame.__dict__, "flags": 5, "rate_q": 70000, "model_id": 0xFFFFFFFF})
        cases.append(frame_case(name, frame, prior_name, prior))
    doc = {
        "format": "MRD",
        "version": 1,
        "note": "Inputs and expected bytes; regenerate only for a deliberate format change.",
        "priors": {k: list(p.freqs) for k, p in priors.items()},
        "cases": cases,
    }
    text = json.dumps(doc, indent=1)
    # One line per list of numbers or strings: a readable, diffable file.
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    OUT.write_text(text + "\n")
    print(f"wrote {OUT} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
