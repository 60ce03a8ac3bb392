"""The two halves of `make test-arm64` (driven by tools/arm64_test.sh).

    .venv/bin/python tools/arm64_check.py prepare --out DIR         # x86: sample frames as PNG (exact pixels)
    qemu-aarch64-static -L ROOT ROOT/usr/bin/python3.11 tools/arm64_check.py arm --out DIR
    .venv/bin/python tools/arm64_check.py verify --out DIR          # x86: decode, compare, report.json

`arm` imports only what a camera has (the edge extra's aarch64 wheels, no torch, no onnxruntime): it encodes
every frame with the LiteRT int8 backend at a byte budget and with every token kept, runs the `mridc-edge
encode` command once, re-encodes the MRD test vectors, and writes the streams plus the tokens it computed.
`verify` decodes the ARM streams with the x86 parser (tokens must be equal), re-encodes the same frames with
the x86 LiteRT backend (streams compared bit for bit; token agreement reported if int8 kernels differ),
checks the vectors' bytes, and decodes one stream through the cloud decoder to the frame's size. Failures:
a decode that differs from the ARM tokens, a vector byte mismatch, torch/onnxruntime imported on ARM, a
failed command. Differences between ARM and x86 encodes are measured and reported, not failures (they are
a property of the runtimes, not of the bitstream); set ARM64_STRICT=1 to fail on them too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BPP = 0.02
VECTORS = REPO / "tests" / "vectors" / "mrd_v1.json"


# ------------------------------------------------------------------------------------------ x86: inputs
def prepare(out: Path, count: int) -> None:
    """PNG frames both sides read: eval photos at 768x512, vtest eval frames, one odd size (padding)."""
    import cv2
    from PIL import Image

    from mridc.shared.zoo import default_shared_data_dir

    shared = default_shared_data_dir()
    frames_dir = out / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    photos = sorted(p for p in (shared / "photos" / "eval").iterdir() if p.suffix.lower() in {".png", ".jpg"})
    images: list[tuple[str, np.ndarray]] = []
    for path in photos[: max(1, count // 2)]:
        with Image.open(path) as im:
            images.append((f"photo-{path.stem}", np.asarray(im.convert("RGB").resize((768, 512), Image.BICUBIC))))
    cap = cv2.VideoCapture(str(shared / "camera" / "vtest.avi"))
    index, wanted = 0, {500 + 90 * i for i in range(max(1, count - len(images) - 1))}
    while wanted and index <= max(wanted):
        ok, bgr = cap.read()
        if not ok:
            break
        if index in wanted:
            images.append((f"vtest-f{index:04d}", np.ascontiguousarray(bgr[..., ::-1])))
        index += 1
    cap.release()
    images.append(("odd-500x333", images[0][1][:333, :500]))  # not a multiple of 16: padding on the edge
    for name, image in images:
        Image.fromarray(image).save(frames_dir / f"{name}.png")
    print(f"{len(images)} frames in {frames_dir}")


# ------------------------------------------------------------------------------------------ arm64: encode
def encode_modes(result, prior) -> dict:
    """The budgeted stream the encoder made, and the same grid with every token kept (no second tokenize)."""
    from dataclasses import replace

    from mridc.shared.bitstream import compress

    frame = result.token_frame
    keep_all = np.ones_like(frame.keep_mask, dtype=bool)
    full = replace(frame, keep_mask=keep_all, kept_tokens=result.tokens.reshape(-1).astype(np.uint16), rate_q=0)
    return {"bpp": (result.bitstream, frame.keep_mask), "full": (compress(full, prior), keep_all)}


def cli_input(out: Path) -> Path:
    return max((out / "frames").glob("*.png"))


def cli_args(out: Path, output: Path) -> list[str]:
    return ["encode", str(cli_input(out)), "-o", str(output), "--backend", "litert", "--bpp", str(BPP), "--json"]


def run_arm(out: Path) -> None:
    from mridc.edge import cli
    from mridc.edge.encoder import EdgeEncoder, read_image
    from mridc.shared.bitstream import TokenFrame, compress
    from mridc.shared.entropy import TokenPrior

    assert "torch" not in sys.modules, "the edge code imported torch"
    streams = out / "arm_streams"
    streams.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    encoder = EdgeEncoder.from_bundle(backend="litert")
    report: dict = {"machine": platform.machine(), "python": platform.python_version(), "numpy": np.__version__,
                    "load_seconds": round(time.perf_counter() - t0, 2), "frames": {}}
    for png in sorted((out / "frames").glob("*.png")):
        image = read_image(png)
        entry: dict = {"width": image.shape[1], "height": image.shape[0]}
        t1 = time.perf_counter()
        result = encoder.encode(image, bpp=BPP, scale=1)
        seconds = round(time.perf_counter() - t1, 2)
        for mode, (stream, keep) in encode_modes(result, encoder.prior).items():
            (streams / f"{png.stem}.{mode}.mrd").write_bytes(stream)
            entry[mode] = {"bytes": len(stream), "tokens": result.tokens.astype(int).tolist(),  # the whole grid
                           "keep_mask": keep.astype(int).tolist()}
        entry["encode_seconds"] = seconds
        report["frames"][png.stem] = entry
        print(f"arm64 {png.stem}: {entry['bpp']['bytes']} bytes at {BPP} bpp ({seconds} s), "
              f"{entry['full']['bytes']} bytes with every token", flush=True)
    # The command a camera runs (default --scale auto), in this process: an aarch64 subprocess would need
    # binfmt registration.
    report["cli"] = {"rc": cli.main(cli_args(out, streams / "cli.mrd")), "input": cli_input(out).stem}
    # MRD test vectors: the same inputs must give the same bytes on every platform.
    doc = json.loads(VECTORS.read_text())
    priors = {name: TokenPrior(tuple(freqs)) for name, freqs in doc["priors"].items()}
    vectors = {}
    for case in doc["cases"]:
        f = case["frame"]
        mask = np.array([[c == "1" for c in row] for row in f["keep_mask"]], dtype=bool).reshape(f["grid_h"],
                                                                                                  f["grid_w"])
        frame = TokenFrame(width=f["width"], height=f["height"], grid_h=f["grid_h"], grid_w=f["grid_w"],
                           model_id=f["model_id"], codebook_bits=f["codebook_bits"], keep_mask=mask,
                           kept_tokens=np.array(f["kept_tokens"], dtype=np.uint16), rate_q=f["rate_q"],
                           flags=f["flags"])
        vectors[case["name"]] = {c: compress(frame, priors[case["prior"]], token_coder=c).hex()
                                 for c in ("auto", "static", "adaptive")}
    report["vectors"] = vectors
    report["torch_imported"] = "torch" in sys.modules
    report["onnxruntime_imported"] = "onnxruntime" in sys.modules
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "arm_report.json").write_text(json.dumps(report))
    print(f"arm64 done in {report['total_seconds']} s ({len(report['frames'])} frames, {len(vectors)} vectors)")


# ------------------------------------------------------------------------------------------ x86: verify
def verify(out: Path, arm_seconds: float | None) -> int:
    from mridc.edge.encoder import EdgeEncoder, read_image
    from mridc.shared.bitstream import decompress

    arm = json.loads((out / "arm_report.json").read_text())
    streams = out / "arm_streams"
    encoder = EdgeEncoder.from_bundle(backend="litert")
    failures: list[str] = []
    same_tokens = total_tokens = 0
    same_streams = n_streams = 0
    frames = {}
    for name, entry in arm["frames"].items():
        image = read_image(out / "frames" / f"{name}.png")
        frames[name] = {}
        x86 = encoder.encode(image, bpp=BPP, scale=1)
        x86_modes, x86_tokens = encode_modes(x86, encoder.prior), x86.tokens
        for mode, (x86_stream, _) in x86_modes.items():
            data = (streams / f"{name}.{mode}.mrd").read_bytes()
            tokens = np.array(entry[mode]["tokens"], dtype=np.uint16)
            keep = np.array(entry[mode]["keep_mask"], dtype=bool)
            frame = decompress(data, encoder.prior)  # the x86 parser on ARM bytes
            if not (np.array_equal(frame.keep_mask, keep) and np.array_equal(frame.kept_tokens, tokens[keep])
                    and (frame.width, frame.height) == (entry["width"], entry["height"])):
                failures.append(f"{name}.{mode}: the x86 decode differs from the tokens the ARM side reported")
            equal = x86_stream == data
            agreement = float((x86_tokens == tokens).mean())
            same_streams += equal
            n_streams += 1
            same_tokens += int((x86_tokens == tokens).sum())
            total_tokens += tokens.size
            frames[name][mode] = {"bytes": len(data), "x86_stream_identical": bool(equal),
                                  "token_agreement_arm_vs_x86": round(agreement, 4)}
    from mridc.edge import cli

    cli_arm = (streams / "cli.mrd").read_bytes()
    cli_rc = cli.main(cli_args(out, out / "x86_cli.mrd"))
    cli_x86 = (out / "x86_cli.mrd").read_bytes()
    cli_identical = cli_rc == 0 and cli_x86 == cli_arm
    # --scale auto resizes with cv2.INTER_AREA, whose SIMD paths differ by one level on a few pixels
    # between ARM and x86; the ARM stream still decodes exactly, but the tokens may differ a little.
    a, b = decompress(cli_arm, encoder.prior), decompress(cli_x86, encoder.prior)
    cli_agreement = float((a.kept_tokens == b.kept_tokens).mean()) if (
        a.grid_h, a.grid_w) == (b.grid_h, b.grid_w) and np.array_equal(a.keep_mask, b.keep_mask) else None
    if arm["cli"]["rc"] != 0:
        failures.append("mridc-edge encode failed on arm64")
    doc = json.loads(VECTORS.read_text())
    vector_mismatches = [f"{case['name']}/{coder}" for case in doc["cases"] for coder in ("auto", "static", "adaptive")
                         if arm["vectors"][case["name"]][coder] != case[f"stream_{coder}_hex"]]
    if vector_mismatches:
        failures.append(f"MRD vectors differ on arm64: {', '.join(vector_mismatches)}")
    if arm.get("torch_imported") or arm.get("onnxruntime_imported"):
        failures.append("the ARM run imported torch or onnxruntime")
    if os.environ.get("ARM64_STRICT") == "1" and (same_streams < n_streams or not cli_identical):
        failures.append("ARM64_STRICT: an ARM stream differs from the x86 encode of the same frame")
    decoded = _decode_one(streams, arm)
    if decoded and decoded.get("error"):
        failures.append(decoded["error"])
    report = {
        "arm": {k: arm[k] for k in ("machine", "python", "numpy", "load_seconds", "total_seconds")},
        "arm_run_seconds_with_startup": arm_seconds,
        "streams": n_streams,
        "streams_bit_identical_to_x86": same_streams,
        "token_agreement_arm_vs_x86": round(same_tokens / max(1, total_tokens), 5),
        "x86_decode_equals_arm_tokens": not any("x86 decode" in f for f in failures),
        "cli_scale_auto_stream_bit_identical_to_x86": cli_identical,
        "cli_scale_auto_token_agreement_arm_vs_x86": cli_agreement,
        "vectors_checked": len(doc["cases"]) * 3,
        "vector_mismatches": vector_mismatches,
        "cloud_decode": decoded,
        "frames": frames,
        "failures": failures,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "frames"}, indent=1))
    return 1 if failures else 0


def _decode_one(streams: Path, arm: dict) -> dict | None:
    """One ARM stream through the cloud decoder (realism 0): the output has the frame's size."""
    try:
        from mridc.cloud.pipeline import MRIDCDecoder
    except ImportError:
        return None  # no cloud extra here: the token check above is the portability proof
    name = next(n for n in arm["frames"] if n.startswith("odd")) if any(n.startswith("odd") for n in arm["frames"]) \
        else next(iter(arm["frames"]))
    entry = arm["frames"][name]
    t0 = time.perf_counter()
    image = MRIDCDecoder.from_models().decode((streams / f"{name}.bpp.mrd").read_bytes(), realism=0)
    result = {"frame": name, "shape": list(image.shape), "seconds": round(time.perf_counter() - t0, 2)}
    if tuple(image.shape) != (entry["height"], entry["width"], 3):
        result["error"] = f"cloud decode of {name} gave {image.shape}, expected {entry['height']}x{entry['width']}"
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["prepare", "arm", "verify"])
    p.add_argument("--out", type=Path, required=True, help="run folder (frames/, arm_streams/, reports)")
    p.add_argument("--images", type=int, default=4, help="prepare: how many frames")
    p.add_argument("--arm-seconds", type=float, help="verify: wall time of the arm64 run, for the report")
    args = p.parse_args(argv)
    if args.command == "prepare":
        prepare(args.out, args.images)
        return 0
    if args.command == "arm":
        run_arm(args.out)
        return 0
    return verify(args.out, args.arm_seconds)


if __name__ == "__main__":
    sys.exit(main())
