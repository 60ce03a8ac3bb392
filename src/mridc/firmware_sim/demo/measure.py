"""Measurement: each reconstruction and the best AVIF at the same bytes against the captured frame."""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from .cameras import SentFrame
from .errors import DemoError, MissingPiece
from .report import fmt

AVIF_CODEC = "avif-obu"  # the bench's strong AVIF baseline: AV1 bitstream, container rebuilt by the receiver


def load_avif():
    from mridc.lab.codecs import availability, make_codec

    reason = availability(AVIF_CODEC)
    if reason:
        raise MissingPiece(f"AVIF comparison impossible: {reason} (Pillow >= 11.3 has AVIF built in)")
    return make_codec(AVIF_CODEC)


def load_perceptual():
    try:
        from mridc.lab.perceptual import PerceptualDistance

        return PerceptualDistance(threads=1)
    except (FileNotFoundError, ImportError, RuntimeError) as exc:
        raise MissingPiece(f"perceptual distance unavailable: {exc}. Or run with --no-perceptual.") from exc


_LPIPS_LOCK = threading.Lock()
_LPIPS: list = []  # [StandardPerceptual or None], loaded on first use


def lpips_alex_meter():
    """Standard LPIPS-Alex (cheap: AlexNet; the VGG-based LPIPS-VGG and DISTS are left to the bench), loaded once;
    None where its weights are absent (the frame rows then carry ``lpips_alex: None``)."""
    with _LPIPS_LOCK:
        if not _LPIPS:
            try:
                from mridc.lab.lpips import StandardPerceptual

                meter = StandardPerceptual.load("cpu", metrics=("lpips_alex",))
                _LPIPS.append(meter if "lpips_alex" in meter.available else None)
            except ImportError:
                _LPIPS.append(None)
        return _LPIPS[0]


# -- measurement ----------------------------------------------------------------------------------------------
def _finite(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 4)


def quality(ref: np.ndarray, dec: np.ndarray, perceptual) -> dict:
    from mridc.lab.metrics import ms_ssim, psnr

    out = {"psnr": _finite(psnr(ref, dec)), "ms_ssim": _finite(ms_ssim(ref, dec))}
    if perceptual is not None:  # --no-perceptual skips both perceptual distances
        out["perceptual"] = _finite(perceptual(ref, dec))
        lpips = lpips_alex_meter()
        out["lpips_alex"] = _finite(lpips.lpips_alex(ref, dec)) if lpips is not None else None
    return out


def avif_at_same_bytes(frame: SentFrame, codec, perceptual, out: Path) -> dict:
    """The best AVIF (bench search over quality and downscale) within the MRIDC frame's bytes."""
    from PIL import Image

    from mridc.lab.codecs import BudgetTooSmall

    start = time.perf_counter()
    try:
        payload, decoded, info = codec.encode(frame.image, len(frame.bitstream) * 8)
    except BudgetTooSmall as exc:
        return {"fits": False, "error": str(exc), "search_s": round(time.perf_counter() - start, 2)}
    (out / "avif" / f"{frame.name}.avif-obu").write_bytes(payload)
    Image.fromarray(decoded).save(out / "avif" / f"{frame.name}.png")
    height, width = frame.image.shape[:2]
    return {
        "fits": True, "codec": codec.name, "label": codec.label, "bytes": len(payload),
        "bpp": round(len(payload) * 8 / (width * height), 5),
        "quality": info["quality"], "downscale": info["downscale"], "coded_size": info["coded_size"],
        "search_s": round(time.perf_counter() - start, 2), "png": f"avif/{frame.name}.png",
        **quality(frame.image, decoded, perceptual),
    }


def side_by_side(panels: list[tuple[np.ndarray | None, str]], height: int, width: int) -> np.ndarray:
    """Panels left to right, each with a caption strip above it; a missing panel is grey with its caption."""
    from PIL import Image, ImageDraw, ImageFont

    strip, gap = 24, 6
    canvas = Image.new("RGB", (len(panels) * width + (len(panels) - 1) * gap, height + strip), "white")
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=15)
    except TypeError:  # Pillow < 10.1: the small bitmap font
        font = ImageFont.load_default()
    for i, (image, caption) in enumerate(panels):
        x = i * (width + gap)
        if image is None:
            draw.rectangle([x, strip, x + width - 1, strip + height - 1], fill=(200, 200, 200))
        else:
            canvas.paste(Image.fromarray(image), (x, strip))
        draw.text((x + 4, 5), caption, fill="black", font=font)
    return np.asarray(canvas)


def measure_frames(frames: list[SentFrame], perceptual, out: Path, *, avif_jobs: dict[str, Future], links: dict,
                   say: Callable[[str, str], None]) -> list[dict]:
    """Per frame: save original and bitstream, compare the stored reconstruction and the AVIF result with the
    original, write the side-by-side PNG; one report row each."""
    from PIL import Image

    from mridc.cloud.service.store import open_store_readonly

    store = open_store_readonly(out / "cloud")
    try:
        stored = {(r["device_id"], r["sequence"]): r for r in store.query()}
    finally:
        store.close()
    rows = []
    for frame in frames:
        Image.fromarray(frame.image).save(out / "originals" / f"{frame.name}.png")
        (out / "bitstreams" / f"{frame.name}.mrd").write_bytes(frame.bitstream)
        height, width = frame.image.shape[:2]
        ack = frame.final_ack or {}
        row = {
            "name": frame.name, "device": frame.device_id, "sequence": frame.sequence, "source": frame.source,
            "width": width, "height": height, "bytes": len(frame.bitstream), "bits": len(frame.bitstream) * 8,
            "bpp": round(len(frame.bitstream) * 8 / (width * height), 5), "encoder_bpp": round(frame.bpp, 5),
            "target_bpp": frame.target_bpp, "encode_s": round(frame.encode_s, 3),
            "ack": ack.get("status"), "ack_reason": ack.get("reason") or None,
            "acks": [a["status"] for a in frame.acks],
            "capture_to_ack_s": round(ack["t"] - frame.capture_time_us / 1e6, 3) if ack else None,
            "capture_to_stored_s": None, "link_time_s": None,
            "original": f"originals/{frame.name}.png", "bitstream": f"bitstreams/{frame.name}.mrd",
            "mridc": None, "avif": None, "side_by_side": None,
        }
        link = links.get(frame.device_id)
        if link is not None and link.up_bps:
            row["link_time_s"] = round(len(frame.bitstream) * 8 / link.up_bps, 3)
        record = stored.get((frame.device_id, frame.sequence))
        recon = None
        if record is not None:
            sidecar = json.loads((out / "cloud" / record["sidecar_path"]).read_text())
            row["capture_to_stored_s"] = round(record["stored_at"] - frame.capture_time_us / 1e6, 3)
            row["reconstruction"] = f"cloud/{record['png_path']}"
            row["cloud"] = {"timings": sidecar.get("timings"), "decode": sidecar.get("decode"),
                            "worker_id": sidecar.get("worker_id"), "transport": sidecar.get("transport"),
                            "bitstream_sha256_matches": sidecar.get("content_sha256")
                            == hashlib.sha256(frame.bitstream).hexdigest()}
            with Image.open(out / "cloud" / record["png_path"]) as im:
                recon = np.asarray(im.convert("RGB"))
            if recon.shape != frame.image.shape:
                raise DemoError(f"{frame.name}: reconstruction is {recon.shape}, the original {frame.image.shape}")
            row["mridc"] = quality(frame.image, recon, perceptual)
        try:
            row["avif"] = avif_jobs[frame.name].result()
        except Exception as exc:  # noqa: BLE001 - recorded; the demo fails below
            row["avif"] = {"error": f"{type(exc).__name__}: {exc}"}
        avif_png = None
        if row["avif"] and "png" in row["avif"]:
            with Image.open(out / row["avif"]["png"]) as im:
                avif_png = np.asarray(im.convert("RGB"))
        m, a = row["mridc"] or {}, row["avif"] or {}
        panels = [
            (frame.image, f"original {width}x{height}"),
            (recon, f"MRIDC {row['bytes']} B {row['bpp']:.4f} bpp  PSNR {fmt(m.get('psnr'))}"
                    if recon is not None else "MRIDC: not stored"),
            (avif_png, f"AVIF {a.get('bytes')} B (1/{a.get('downscale', 1):g} size, q{a.get('quality')})  "
                       f"PSNR {fmt(a.get('psnr'))}" if avif_png is not None
             else "AVIF: no setting fits these bytes"),
        ]
        Image.fromarray(side_by_side(panels, height, width)).save(out / "side_by_side" / f"{frame.name}.png")
        row["side_by_side"] = f"side_by_side/{frame.name}.png"
        rows.append(row)
        say("measure", f"{frame.name}: MRIDC PSNR {fmt(m.get('psnr'))}, AVIF PSNR {fmt(a.get('psnr'))}")
    return rows

def count_delivery(frames: list[SentFrame], stats: dict, store_dir: Path) -> dict:
    """What reached the cloud store, against what the cameras accepted: exactly once, nothing missing."""
    from mridc.cloud.service.store import open_store_readonly

    store = open_store_readonly(store_dir)
    try:
        rows = store.query()
    finally:
        store.close()
    stored_keys = [(r["device_id"], r["sequence"]) for r in rows]
    sent_keys = {(f.device_id, f.sequence) for f in frames}
    statuses = [a["status"] for f in frames for a in f.acks]
    return {
        "accepted": len(frames),
        "stored": sum(1 for k in stored_keys if k in sent_keys),
        "exactly_once": sorted(stored_keys) == sorted(sent_keys) and len(set(stored_keys)) == len(stored_keys),
        "unexpected_in_store": [list(k) for k in stored_keys if k not in sent_keys],
        "missing_in_store": [list(k) for k in sorted(sent_keys) if k not in set(stored_keys)],
        "stored_acks": statuses.count("STORED"),
        "duplicate_acks": statuses.count("DUPLICATE"),
        "retry_later_acks": statuses.count("RETRY_LATER"),
        "rejected": statuses.count("REJECTED"),
        "resent": sum(s["forwarder"]["resent"] for s in stats.values()),
        "queue_left": sum(s["queue"]["depth"] for s in stats.values()),
    }
