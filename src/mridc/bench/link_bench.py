"""``mridc-bench link``: time from capture to decoded-at-cloud for one 768x512 frame over emulated links.

Real traffic: the edge MQTT transport (paho, MQTT 5, QoS 1) publishes a ``FrameEnvelope`` through
``LinkEmulator`` (a TCP proxy shaping bandwidth per direction, with one-way latency) to a real mosquitto;
a receiver subscribed directly at the broker (the cloud side) takes the envelope and decodes it. The time of
one frame is: encode on the camera (measured live, 1 thread) + link (send -> the receiver has the message)
+ decode by the receiver (measured live). The MQTT connection is made once before timing, as a deployed
camera keeps it open.

MRIDC is encoded at ``--bpp`` (0.02) and decoded at ``--realism`` (0.5). For each classical codec the file
sent is its smallest one whose perceptual distance (MNv2-LPIPS, ``lab/perceptual.py``) to the frame is at
most MRIDC's, found over quality x downscale (a geometric ladder of byte budgets up to ``--max-bpp``, then
bisection). When no setting in that range reaches MRIDC's distance, the codec sends its perceptually best
file at MRIDC's byte count instead; the JSON says which (``match``).

Frames per minute a link sustains: a burst of frames sent back to back, 60 / (interval between the first
and the last arrival / (frames - 1)); the camera's encode time caps it as well (``fpm``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from mridc.cloud.defaults import DEFAULT_BACKEND, DEFAULT_REFINE_STEPS
from mridc.lab.provenance import load_1min, machine, write_json_atomic

from .edge_bench import command_line, cover_crop, parse_size

HELP = "capture-to-decoded time of one 768x512 frame over emulated 9.6/64 kbit/s links: MRIDC vs JPEG/WebP/AVIF"
MATCH_FACTORS = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--image", default="photos-eval", help="set name, folder or image file: its first image, "
                   "cover-cropped to 768x512, is the frame")
    p.add_argument("--image-index", type=int, default=0)
    p.add_argument("--size", default="768x512", help="frame size WxH (the benchmark is defined at 768x512)")
    p.add_argument("--bpp", type=float, default=0.02, help="MRIDC rate")
    p.add_argument("--realism", type=float, default=0.5, help="MRIDC refined decode realism (the final picture)")
    p.add_argument("--steps", type=int, default=DEFAULT_REFINE_STEPS,
                   help="DDIM steps at realism 1 of the refined decode (default: the service's)")
    p.add_argument("--backend", default=DEFAULT_BACKEND, choices=("auto", "torch", "onnxruntime"),
                   help="decoder backend (default: the service's, ONNX Runtime on a CPU)")
    p.add_argument("--preview-realism", type=float, default=0.0,
                   help="MRIDC first-picture realism (the service's preview, stored and acked before refining)")
    p.add_argument("--links", default="9600,64000", help="link rates in bit/s, comma-separated (both directions)")
    p.add_argument("--latency-ms", type=float, default=300.0, help="one-way latency of each direction")
    p.add_argument("--codecs", default="jpeg,webp,avif,avif-obu")
    p.add_argument("--max-bpp", type=float, default=1.0, help="largest classical file tried when matching quality")
    p.add_argument("--match-steps", type=int, default=12, help="byte budgets on the matching ladder")
    p.add_argument("--match-bisect", type=int, default=4, help="bisection steps after the ladder")
    p.add_argument("--repeats", type=int, default=2, help="single-frame timings per codec and link (median)")
    p.add_argument("--burst", type=int, default=4, help="fewest frames per burst for the sustained rate")
    p.add_argument("--burst-min-seconds", type=float, default=8.0, help="more frames until a burst lasts this long")
    p.add_argument("--burst-seconds", type=float, default=60.0, help="cap on a burst's expected duration")
    p.add_argument("--burst-max-frames", type=int, default=200)
    p.add_argument("--models-dir", default=None)
    p.add_argument("--threads", type=int, default=1, help="encoder threads (camera)")
    p.add_argument("--decode-threads", type=int, default=1, help="torch threads of the receiver's decode")
    p.add_argument("--perceptual-weights", default=None)
    p.add_argument("--seed", type=int, default=0)


# ---- matching classical files to MRIDC's perceptual quality ----------------------------------------------
class _Explorer:
    """Encodes (factor, quality) settings of one codec on one frame, each decoded and scored once."""

    def __init__(self, codec, frame: np.ndarray, perceptual):
        self.codec, self.frame, self.perceptual = codec, frame, perceptual
        self.seen: dict[tuple[float, int], dict] = {}

    def best_at(self, budget_bits: int) -> dict | None:
        from mridc.lab.codecs import upscale

        h, w = self.frame.shape[:2]
        best = None
        for cand in self.codec.candidates(self.frame, budget_bits):
            key = (cand.factor, cand.quality)
            if key not in self.seen:
                small = self.codec.decode_file(cand.file)
                decoded = small if cand.factor == 1.0 else upscale(small, w, h)
                self.seen[key] = {"downscale": cand.factor, "quality": cand.quality, "bytes": len(cand.payload),
                                  "coded_size": [int(small.shape[1]), int(small.shape[0])],
                                  "perceptual": self.perceptual(self.frame, decoded), "payload": cand.payload,
                                  "decoded": decoded}
            entry = self.seen[key]
            if best is None or entry["perceptual"] < best["perceptual"]:
                best = entry
        return best


def match_codec(codec, frame: np.ndarray, target: float, ref_bytes: int, max_bytes: int, perceptual,
                steps: int = 12, bisect: int = 4) -> dict:
    """The smallest file of ``codec`` with perceptual distance <= ``target`` (searched from ref_bytes / 2 to
    max_bytes), else its perceptually best file within ``ref_bytes``."""
    explorer = _Explorer(codec, frame, perceptual)
    lo_bytes = max(64, ref_bytes // 2)
    steps = max(2, steps)
    ladder = [round(lo_bytes * (max_bytes / lo_bytes) ** (i / (steps - 1))) for i in range(steps)]
    passed_at = None
    for i, size in enumerate(ladder):
        best = explorer.best_at(size * 8)
        if best is not None and best["perceptual"] <= target:
            passed_at = i
            break
    if passed_at is not None:
        lo, hi = (ladder[passed_at - 1] if passed_at else 0), ladder[passed_at]
        for _ in range(bisect):
            mid = (lo + hi) // 2
            if mid <= lo:
                break
            best = explorer.best_at(mid * 8)
            if best is not None and best["perceptual"] <= target:
                hi = mid
            else:
                lo = mid
        passing = [e for e in explorer.seen.values() if e["perceptual"] <= target]
        chosen = min(passing, key=lambda e: (e["bytes"], e["perceptual"]))
        match = "perceptual"
    else:
        chosen = explorer.best_at(ref_bytes * 8)
        match = "same_bytes"
        if chosen is None:
            return {"match": "none", "reason": f"no setting fits {ref_bytes} bytes", "explored": len(explorer.seen)}
    codec.clear_cache()
    return {"match": match, "explored": len(explorer.seen), "search_max_bytes": max_bytes, **chosen}


# ---- the wire: edge MQTT transport -> link emulator -> mosquitto -> receiver ---------------------------------
def envelope(device_id: str, sequence: int, payload: bytes, model_id: int, codec: str):
    from mridc.shared.protocol import build_envelope

    return build_envelope(device_id, sequence, payload, model_id, meta={"codec": codec})


def run_link(rate_bps: float, latency_ms: float, broker, items: list[dict], frame: np.ndarray, args,
             seq_start: int = 0) -> dict:
    from mridc.cloud.service.receiver import MqttReceiver
    from mridc.edge.transport import open_transport
    from mridc.lab.link import LinkEmulator

    device_id = f"linkbench-{int(rate_bps)}"
    rows = []
    seq = seq_start
    with LinkEmulator((broker.host, broker.port), up_bps=rate_bps, down_bps=rate_bps, latency_ms=latency_ms) as link:
        # The cloud side, subscribed directly at the broker; it sends no acks, which would share the link.
        receiver = MqttReceiver(broker.port, host=broker.host, client_id="mridc-link-bench-receiver",
                                send_acks=False, session_expiry_s=None).start()
        transport = open_transport(f"mqtt://127.0.0.1:{link.port}", device_id)
        transport.start()
        t = time.monotonic()
        if not transport.wait_connected(60):
            raise RuntimeError(f"edge transport did not connect through the {rate_bps:g} bit/s link")
        connect_s = time.monotonic() - t
        try:
            for item in items:
                wire = len(envelope(device_id, 0, item["payload"], item["model_id"], item["codec"]).SerializeToString())
                expect_s = wire * 8 / rate_bps + latency_ms / 1000
                timeout = 3 * expect_s + 30
                singles = []
                for _ in range(args.repeats):
                    load = load_1min()
                    t0 = time.monotonic()
                    payload = item["encode"](frame)
                    t1 = time.monotonic()
                    seq += 1
                    if not transport.send(envelope(device_id, seq, payload, item["model_id"], item["codec"])):
                        raise RuntimeError("transport refused the frame (not connected)")
                    arrived, env = receiver.next_arrival(timeout)
                    t2 = time.monotonic()
                    # Progressive delivery (the service's default): a cheap first picture, then the refined one.
                    preview = item.get("preview")
                    first = preview(bytes(env.bitstream)) if preview else None
                    t_first = time.monotonic()
                    decoded = item["decode"](bytes(env.bitstream))
                    t3 = time.monotonic()
                    if decoded.shape != frame.shape or hashlib.sha256(env.bitstream).digest() != env.content_hash:
                        raise RuntimeError(f"{item['codec']}: the receiver got a bad frame")
                    if first is not None and first.shape != frame.shape:
                        raise RuntimeError(f"{item['codec']}: the first picture has the wrong size")
                    first_s = (t_first if preview else t3) - t0
                    singles.append({"encode_s": t1 - t0, "link_s": arrived - t1, "decode_s": t3 - t_first,
                                    "preview_decode_s": t_first - t2, "first_picture_s": first_s,
                                    "total_s": t3 - t0, "bytes": len(payload), "load_1min": load})
                # Long enough that the bucket's initial burst allowance does not flatter small frames.
                tx_s = wire * 8 / rate_bps
                n_burst = max(args.burst, math.ceil(args.burst_min_seconds / tx_s))
                n_burst = max(2, min(n_burst, args.burst_max_frames, int(args.burst_seconds / tx_s)))
                load = load_1min()
                for _ in range(n_burst):
                    seq += 1
                    transport.send(envelope(device_id, seq, item["payload"], item["model_id"], item["codec"]))
                arrivals = [receiver.next_arrival(timeout * n_burst)[0] for _ in range(n_burst)]
                interval = (arrivals[-1] - arrivals[0]) / (n_burst - 1)
                med = {k: statistics.median(s[k] for s in singles) for k in (
                    "encode_s", "link_s", "decode_s", "preview_decode_s", "first_picture_s", "total_s")}
                fpm_link = 60.0 / interval if interval > 0 else math.inf
                rows.append({
                    "codec": item["codec"], "bytes": len(item["payload"]), "wire_bytes": wire,
                    **{k: round(v, 4) for k, v in med.items()},
                    "singles": [{k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()}
                                for s in singles],
                    "burst_frames": n_burst, "burst_interval_s": round(interval, 4),
                    "fpm_link": round(fpm_link, 2),
                    "fpm": round(min(fpm_link, 60.0 / max(med["encode_s"], 1e-6)), 2),
                    "fpm_ideal": round(60.0 * rate_bps / (8 * wire), 2), "load_1min_burst": load,
                })
                print(f"link {rate_bps / 1000:g} kbit/s {item['codec']}: {len(item['payload'])} B, "
                      f"{med['first_picture_s']:.2f} s capture->first picture, "
                      f"{med['total_s']:.2f} s capture->decoded (link {med['link_s']:.2f} s), "
                      f"{rows[-1]['fpm']:.1f} frames/min", file=sys.stderr, flush=True)
        finally:
            transport.close()
            receiver.stop()
    return {"rate_bps": rate_bps, "latency_ms": latency_ms, "connect_s": round(connect_s, 3),
            "link_stats": dict(link.stats), "rows": rows, "last_seq": seq}


# ---- report ------------------------------------------------------------------------------------------------
def plot(doc: dict, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    links = doc["links"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    codecs = [r["codec"] for r in links[0]["rows"]]
    width = 0.8 / max(1, len(links))
    for li, link in enumerate(links):
        x = np.arange(len(link["rows"])) + (li - (len(links) - 1) / 2) * width
        enc = np.array([r["encode_s"] for r in link["rows"]])
        lnk = np.array([r["link_s"] for r in link["rows"]])
        pre = np.array([r.get("preview_decode_s", 0.0) for r in link["rows"]])
        dec = np.array([r["decode_s"] for r in link["rows"]])
        tag = f"{link['rate_bps'] / 1000:g} kbit/s"
        axes[0].bar(x, lnk, width, label=f"link, {tag}", alpha=0.9 if li == 0 else 0.6)
        axes[0].bar(x, enc, width, bottom=lnk, color="black", label="encode (camera)" if li == 0 else None)
        axes[0].bar(x, pre, width, bottom=lnk + enc, color="tab:green",
                    label="first-picture decode (cloud)" if li == 0 else None)
        axes[0].bar(x, dec, width, bottom=lnk + enc + pre, color="grey",
                    label="(refined) decode (cloud)" if li == 0 else None)
        axes[1].bar(x, [r["fpm"] for r in link["rows"]], width, label=tag)
    for ax, title in zip(axes, ("capture -> decoded at cloud, s (one frame)", "frames per minute the link sustains"),
                         strict=True):
        ax.set_xticks(np.arange(len(codecs)), codecs, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    fig.suptitle(f"one {'x'.join(map(str, doc['config']['frame_size']))} frame over MQTT through the link emulator "
                 f"({doc['config']['latency_ms']:g} ms one-way); "
                 f"classical files matched to MRIDC's perceptual distance", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "link.png")
    plt.close(fig)
    return "link.png"


def render_markdown(doc: dict) -> str:
    meta, cfg = doc["meta"], doc["config"]
    lines = [f"# Link benchmark ({meta['date']})", "", f"Command: `{meta['command']}`  ",
             f"Machine: {meta['machine']}  ",
             f"1-minute load average: {meta['load_1min_start']} at start, {meta['load_1min_end']} at end  ",
             (f"Frame: {cfg['frame']} cover-cropped to {'x'.join(map(str, cfg['frame_size']))}. "
              f"Transport: edge MQTT client (MQTT 5, QoS 1) -> "
              f"LinkEmulator ({cfg['latency_ms']:g} ms one-way latency, rate both ways) -> mosquitto -> receiver "
              f"at the broker. Encode {cfg['threads']} thread, decode {cfg['decode_threads']} torch thread(s)."), "",
             "## Files sent", "",
             (f"Perceptual distance: {doc['perceptual']}. MRIDC: {cfg['bpp']:g} bpp decoded at realism "
              f"{cfg['realism']:g}."), "",
             "| codec | bytes | bpp | setting | perceptual | PSNR | match |", "|---|---|---|---|---|---|---|"]
    for f in doc["files"]:
        setting = (f"downscale {f['downscale']:g}, q {f['quality']}" if "downscale" in f
                   else f"{cfg['bpp']:g} bpp, realism {cfg['realism']:g}")
        lines.append(f"| {f['codec']} | {f['bytes']} | {f['bpp']:.4f} | {setting} | {f['perceptual']:.4f} | "
                     f"{f['psnr']:.2f} | {f['match']} |")
    for link in doc["links"]:
        lines += ["", f"## {link['rate_bps'] / 1000:g} kbit/s, {link['latency_ms']:g} ms", "",
                  ("| codec | wire bytes | encode s | link s | first-picture decode s | capture->first picture s | "
                   "refined decode s | capture->decoded s | frames/min (link) | frames/min | ideal frames/min |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in link["rows"]:
            first = r.get("first_picture_s", r["total_s"])
            preview = r.get("preview_decode_s", 0.0)
            lines.append(f"| {r['codec']} | {r['wire_bytes']} | {r['encode_s']:.3f} | {r['link_s']:.2f} | "
                         f"{preview:.3f} | {first:.2f} | "
                         f"{r['decode_s']:.3f} | {r['total_s']:.2f} | {r['fpm_link']:.1f} | {r['fpm']:.1f} | "
                         f"{r['fpm_ideal']:.1f} |")
    lines += ["", ("Wire bytes: the serialized FrameEnvelope (payload + device id, sequence, time, SHA-256, model id); "
                   "MQTT adds its framing and topic. Frames/min (link): measured over a burst of frames sent back to "
                   "back; frames/min: that, capped by the camera's encode time; ideal: link rate / wire bits. "
                   "Cloud decode is not a cap (workers decode in parallel). Capture->first picture: MRIDC's "
                   f"preview decode at realism {cfg.get('preview_realism', 0):g}, which the service stores, acks and "
                   "announces before it refines (progressive delivery); capture->decoded adds the refined decode "
                   "after it. Medians of the single-frame repeats. A classical codec's first picture is its only one.")]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    import torch

    from mridc.cloud.pipeline import MRIDCDecoder
    from mridc.edge.encoder import EdgeEncoder
    from mridc.lab import codecs as classical
    from mridc.lab.broker import MosquittoBroker
    from mridc.lab.datasets import resolve
    from mridc.lab.metrics import ms_ssim, psnr
    from mridc.lab.perceptual import PerceptualDistance

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, args.decode_threads))
    load_start = load_1min()
    items = resolve([args.image], max_side=0)
    item = items[min(args.image_index, len(items) - 1)]
    frame = cover_crop(item.image, *parse_size(args.size))
    h, w = frame.shape[:2]
    encoder = EdgeEncoder.from_bundle(models_dir=args.models_dir, backend="onnx", threads=args.threads)
    decoder = MRIDCDecoder.from_models(models_dir=args.models_dir, device="cpu", backend=args.backend)
    perceptual = PerceptualDistance(weights=args.perceptual_weights)

    def mridc_encode(img):
        return bytes(encoder.encode(img, bpp=args.bpp).bitstream)

    def mridc_decode(data):
        return np.asarray(decoder.decode(data, realism=args.realism, seed=args.seed, steps=args.steps),
                          dtype=np.uint8)

    def mridc_preview(data):
        return np.asarray(decoder.decode(data, realism=args.preview_realism, seed=args.seed), dtype=np.uint8)

    t = time.perf_counter()
    ref_payload = mridc_encode(frame)
    ref_decoded = mridc_decode(ref_payload)
    target = perceptual(frame, ref_decoded)
    files = [{"codec": "mridc", "bytes": len(ref_payload), "bpp": len(ref_payload) * 8 / (w * h),
              "perceptual": target, "psnr": psnr(frame, ref_decoded), "ms_ssim": ms_ssim(frame, ref_decoded),
              "match": "reference", "realism": args.realism}]
    send_items = [{"codec": "mridc", "payload": ref_payload, "model_id": encoder.model_id, "encode": mridc_encode,
                   "decode": mridc_decode, **({"preview": mridc_preview} if args.preview_realism < args.realism
                                              else {})}]
    print(f"link: MRIDC {len(ref_payload)} B, perceptual {target:.4f} ({time.perf_counter() - t:.1f} s)",
          file=sys.stderr, flush=True)
    skipped = {}
    max_bytes = int(args.max_bpp * w * h / 8)
    for name in [c for c in args.codecs.split(",") if c]:
        reason = classical.availability(name)
        if reason:
            skipped[name] = reason
            continue
        kw = {"factors": MATCH_FACTORS}
        codec = classical.make_codec(name, **kw)
        t = time.perf_counter()
        found = match_codec(codec, frame, target, len(ref_payload), max_bytes, perceptual, steps=args.match_steps,
                            bisect=args.match_bisect)
        if found["match"] == "none":
            skipped[name] = found["reason"]
            continue
        decoded = found.pop("decoded")
        payload = found.pop("payload")
        files.append({"codec": name, "bpp": found["bytes"] * 8 / (w * h), "psnr": psnr(frame, decoded),
                      "ms_ssim": ms_ssim(frame, decoded), "label": codec.label, "search_s": round(
                          time.perf_counter() - t, 1), **found})
        factor, quality, (sw, sh) = found["downscale"], found["quality"], found["coded_size"]

        def encode(img, codec=codec, factor=factor, quality=quality, sw=sw, sh=sh):
            small = img if factor == 1.0 else classical.downscale(img, sw, sh)
            data = codec.encode_file(small, quality)
            return data if factor == 1.0 else data + classical.SIZE_TRAILER.pack(img.shape[1], img.shape[0])

        if encode(frame) != payload:
            print(f"link: {name}: re-encode differs from the searched file (non-deterministic encoder?)",
                  file=sys.stderr)
        send_items.append({"codec": name, "payload": payload, "model_id": 0, "encode": encode,
                           "decode": codec.decode})
        print(f"link: {name} {found['match']} {found['bytes']} B (downscale {factor:g}, q {quality}), perceptual "
              f"{found['perceptual']:.4f} ({files[-1]['search_s']} s)", file=sys.stderr, flush=True)

    doc = {"meta": {"command": command_line(), "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                    "machine": machine(), "cpus": os.cpu_count(), "load_1min_start": load_start},
           "config": {"frame": item.name, "frame_size": [w, h], "bpp": args.bpp, "realism": args.realism,
                      "preview_realism": args.preview_realism, "steps": args.steps,
                      "backend": decoder.backend,
                      "latency_ms": args.latency_ms, "links_bps": [float(r) for r in args.links.split(",") if r],
                      "repeats": args.repeats, "burst": args.burst, "max_bpp": args.max_bpp, "threads": args.threads,
                      "decode_threads": args.decode_threads, "transport": "mqtt (edge MqttTransport, QoS 1)",
                      "match_factors": list(MATCH_FACTORS)},
           "perceptual": perceptual.name,
           "match_rule": "smallest file with perceptual distance <= MRIDC's (searched up to max_bpp); else "
                         "the codec's perceptually best file within MRIDC's bytes ('same_bytes')",
           "files": files, "skipped": skipped, "links": []}
    seq = 0
    with MosquittoBroker() as broker:
        for rate in doc["config"]["links_bps"]:
            result = run_link(rate, args.latency_ms, broker, send_items, frame, args, seq_start=seq)
            seq = result.pop("last_seq")
            doc["links"].append(result)
            _write(out, doc)
    doc["meta"]["load_1min_end"] = load_1min()
    doc["plots"] = [plot(doc, out)]
    _write(out, doc)
    (out / "summary.md").write_text(render_markdown(doc))
    print(render_markdown(doc))
    return 0


def _write(out: Path, doc: dict) -> None:
    write_json_atomic(out / "link.json", doc, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
