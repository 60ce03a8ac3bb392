"""``mridc-bench loss``: frames and quality over a lossy datagram link, sliced MRIDC against whole streams.

Real UDP sockets on loopback through ``mridc.lab.datagram.DatagramLink`` (Bernoulli or Gilbert-Elliott loss on
the way up; the way back is clean). For each loss rate every frame is sent as datagrams of at most
``--packet-bytes``:

- ``mridc-sliced``: the frame's slices (``compress_sliced``), one per datagram; the cloud decodes whatever
  arrived, missing rows masked and completed;
- ``mridc-whole``: the unsliced MRD stream cut into fragments; the frame decodes only if every fragment came;
- ``avif-whole``: AVIF (best setting at the MRIDC stream's bytes, any downscale) cut the same way.

With ``--retransmit N``, the receiver reports what it is missing after each round and the sender resends
those datagrams, up to N more rounds. A datagram carries an 8-byte bench header (frame, packet, count);
that framing is the benchmark's, not a product transport's. Decodes are the service's first picture
(realism 0). Output: ``loss.json``, ``summary.md``, ``loss.png``.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import struct
import sys
import time
from pathlib import Path

import numpy as np

from mridc.lab.provenance import load_1min, machine

from .edge_bench import command_line, cover_crop, parse_size

HELP = "frames decoded and their quality over a lossy UDP link: MRIDC slices vs whole MRIDC / AVIF streams"
HEADER = struct.Struct("!HHHH")  # variant, frame, packet index, packet count
VARIANTS = ("mridc-sliced", "mridc-whole", "avif-whole")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--images", nargs="*", default=["photos-eval", "vtest"], help="eval sets, folders or files")
    p.add_argument("--limit", type=int, default=8, help="frames (spread evenly over the sets)")
    p.add_argument("--size", default="768x512")
    p.add_argument("--bpp", type=float, default=0.02)
    p.add_argument("--packet-bytes", type=int, default=222, help="datagram payload size (LoRaWAN: 222)")
    p.add_argument("--losses", default="0,0.05,0.1,0.2,0.3", help="loss rates, comma-separated")
    p.add_argument("--loss-model", choices=("bernoulli", "gilbert"), default="bernoulli")
    p.add_argument("--retransmit", default="0,3", help="retransmission rounds to run, comma-separated")
    p.add_argument("--trials", type=int, default=2, help="sends of every frame per setting (new losses each)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models-dir", default=None)
    p.add_argument("--seed", type=int, default=0)


def fragments(payload: bytes, size: int) -> list[bytes]:
    return [payload[i:i + size] for i in range(0, len(payload), size)] or [b""]


class Receiver:
    """The cloud end: a UDP socket collecting (variant, frame, packet) -> bytes."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.got: dict[tuple[int, int], dict[int, bytes]] = {}

    def drain(self, quiet_s: float = 0.3, timeout: float = 10.0) -> None:
        deadline, last = time.monotonic() + timeout, time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - last < quiet_s:
            try:
                data, _ = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            last = time.monotonic()
            variant, frame, index, _count = HEADER.unpack_from(data)
            self.got.setdefault((variant, frame), {})[index] = data[HEADER.size:]

    def close(self) -> None:
        self.sock.close()


def send_frames(link_port: int, receiver: Receiver, packets: dict[tuple[int, int], list[bytes]],
                rounds: int) -> dict[tuple[int, int], int]:
    """Send every frame's packets; then up to `rounds` resends of what the receiver lacks. Returns sends."""
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sends = {key: 0 for key in packets}
    pending = {key: set(range(len(p))) for key, p in packets.items()}
    for _round in range(rounds + 1):
        for key, missing in pending.items():
            variant, frame = key
            for index in sorted(missing):
                header = HEADER.pack(variant, frame, index, len(packets[key]))
                sender.sendto(header + packets[key][index], ("127.0.0.1", link_port))
                sends[key] += 1
                time.sleep(0.0005)  # a camera paces its packets; a burst would only fill socket buffers
        receiver.drain()
        pending = {key: set(range(len(p))) - set(receiver.got.get(key, {})) for key, p in packets.items()}
        pending = {k: v for k, v in pending.items() if v}
        if not pending:
            break
    sender.close()
    return sends


def run(args: argparse.Namespace) -> int:
    import torch

    from mridc.cloud.pipeline import DecodeSettings, MRIDCDecoder
    from mridc.edge.encoder import EdgeEncoder
    from mridc.lab.codecs import BudgetTooSmall, make_codec
    from mridc.lab.datagram import DatagramLink, Impairments
    from mridc.lab.datasets import resolve
    from mridc.lab.metrics import psnr
    from mridc.lab.perceptual import PerceptualDistance
    from mridc.shared.bitstream import BitstreamError
    from mridc.shared.slices import compress_sliced, decompress_slices

    from .refine_bench import spread, write_outputs

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_start = load_1min()
    width, height = parse_size(args.size)
    items = spread(resolve(args.images, max_side=0), args.limit)
    frames = [(item.name, cover_crop(item.image, width, height)) for item in items]
    encoder = EdgeEncoder.from_bundle(models_dir=args.models_dir, backend="onnx")
    decoder = MRIDCDecoder.from_models(args.models_dir, device="cpu", backend="auto")
    avif = make_codec("avif")
    mnv2 = PerceptualDistance(backend="mnv2")
    settings = DecodeSettings(realism=0.0, seed=args.seed)
    budget = args.packet_bytes - HEADER.size
    coded = []
    for name, image in frames:
        result = encoder.encode(image, bpp=args.bpp)
        whole = bytes(result.bitstream)
        # Equal bytes: the slices repeat headers, so the sliced frame is encoded at a lower rate until all its
        # slices together are no larger than the whole stream.
        sliced_result, bpp = result, args.bpp
        slices = compress_sliced(result.token_frame, encoder.prior, budget)
        for _ in range(6):
            total = sum(map(len, slices))
            if total <= len(whole):
                break
            bpp *= 0.98 * len(whole) / total
            sliced_result = encoder.encode(image, bpp=bpp)
            slices = compress_sliced(sliced_result.token_frame, encoder.prior, budget)
        sliced_lossless = decoder.decode_frames([sliced_result.token_frame], settings)[0].image
        try:
            avif_payload, avif_decoded, _ = avif.encode(image, len(whole) * 8)
        except BudgetTooSmall:  # no AVIF setting fits the MRIDC stream's bytes: that variant sits out
            avif_payload, avif_decoded = None, None
        lossless = decoder.decode_frames([result.token_frame], settings)[0].image
        coded.append({"name": name, "image": image, "whole": whole, "slices": slices, "avif": avif_payload,
                      "avif_decoded": avif_decoded, "lossless_psnr": psnr(image, lossless),
                      "sliced_lossless_psnr": psnr(image, sliced_lossless),
                      "avif_psnr": None if avif_decoded is None else psnr(image, avif_decoded)})
        print(f"loss: {name}: MRIDC {len(whole)} B whole / {sum(map(len, slices))} B in {len(slices)} slices, "
              f"AVIF {len(avif_payload) if avif_payload else 'none fits'} B", file=sys.stderr, flush=True)
    rows = []
    for rounds in [int(r) for r in args.retransmit.split(",") if r]:
        for loss in [float(x) for x in args.losses.split(",") if x]:
            for trial in range(args.trials):
                receiver = Receiver()
                packets: dict[tuple[int, int], list[bytes]] = {}
                for i, c in enumerate(coded):
                    packets[(0, i)] = c["slices"]
                    packets[(1, i)] = fragments(c["whole"], budget)
                    if c["avif"] is not None:
                        packets[(2, i)] = fragments(c["avif"], budget)
                imp = Impairments(loss=loss, loss_model=args.loss_model)
                seed = args.seed * 1000 + int(loss * 100) * 10 + trial + 100 * rounds
                with DatagramLink(("127.0.0.1", receiver.port), up=imp, seed=seed) as link:
                    sends = send_frames(link.port, receiver, packets, rounds)
                for i, c in enumerate(coded):
                    for v, variant in enumerate(VARIANTS):
                        if (v, i) not in packets:
                            continue
                        got = receiver.got.get((v, i), {})
                        n = len(packets[(v, i)])
                        row = {"variant": variant, "loss": loss, "retransmit": rounds, "trial": trial,
                               "frame": c["name"], "packets": n, "received": len(got), "sends": sends[(v, i)],
                               "decoded": False, "psnr": None, "mnv2_lpips": None, "rows_missing": None}
                        decoded = None
                        if variant == "mridc-sliced" and got:
                            try:
                                sliced = decompress_slices(list(got.values()), encoder.prior,
                                                           model_id=decoder.model_id)
                                decoded = decoder.decode_frames([sliced.frame], settings)[0].image
                                row["rows_missing"] = int((~sliced.rows_present).sum())
                            except BitstreamError:
                                decoded = None
                        elif len(got) == n:
                            payload = b"".join(got[k] for k in range(n))
                            if variant == "mridc-whole":
                                decoded = decoder.decode_frames([decoder.validate(payload)], settings)[0].image
                            else:
                                decoded = c["avif_decoded"] if payload == c["avif"] else None
                        if decoded is not None:
                            row.update(decoded=True, psnr=psnr(c["image"], decoded),
                                       mnv2_lpips=mnv2(c["image"], decoded))
                        rows.append(row)
                receiver.close()
                this = [r for r in rows if (r["loss"], r["retransmit"], r["trial"]) == (loss, rounds, trial)]
                print(f"loss: {loss:.2f} retransmit {rounds} trial {trial}: " + ", ".join(
                    f"{v} {sum(r['decoded'] for r in this if r['variant'] == v)}/"
                    f"{sum(r['variant'] == v for r in this)}" for v in VARIANTS), file=sys.stderr, flush=True)
    summary = summarise(rows, coded)
    doc = {"meta": {"command": command_line(), "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
                    "machine": machine(), "load_1min_start": load_start, "load_1min_end": load_1min()},
           "config": {"frames": [c["name"] for c in coded], "size": [width, height], "bpp": args.bpp,
                      "packet_bytes": args.packet_bytes, "loss_model": args.loss_model, "trials": args.trials,
                      "bytes": {c["name"]: {"whole": len(c["whole"]), "sliced": sum(map(len, c["slices"])),
                                            "slices": len(c["slices"]),
                                            "avif": len(c["avif"]) if c["avif"] else None} for c in coded},
                      "lossless_psnr": float(np.mean([c["lossless_psnr"] for c in coded])),
                      "sliced_lossless_psnr": float(np.mean([c["sliced_lossless_psnr"] for c in coded])),
                      "avif_psnr": float(np.mean([c["avif_psnr"] for c in coded if c["avif_psnr"] is not None]
                                                 or [np.nan]))},
           "summary": summary, "rows": rows}
    write_outputs(out, "loss", doc, render_markdown, plot)
    return 0


def summarise(rows: list[dict], coded: list[dict]) -> list[dict]:
    out = []
    keys = sorted({(r["retransmit"], r["loss"], r["variant"]) for r in rows})
    for rounds, loss, variant in keys:
        mine = [r for r in rows if (r["retransmit"], r["loss"], r["variant"]) == (rounds, loss, variant)]
        ok = [r for r in mine if r["decoded"]]
        out.append({"retransmit": rounds, "loss": loss, "variant": variant, "frames": len(mine),
                    "decoded_fraction": len(ok) / len(mine),
                    "psnr_decoded": statistics.mean(r["psnr"] for r in ok) if ok else None,
                    "mnv2_lpips_decoded": statistics.mean(r["mnv2_lpips"] for r in ok) if ok else None,
                    "sends_per_packet": sum(r["sends"] for r in mine) / max(1, sum(r["packets"] for r in mine))})
    return out


def render_markdown(doc: dict) -> str:
    meta, cfg = doc["meta"], doc["config"]
    lines = [f"# Lossy datagram link ({meta['date']})", "", f"Command: `{meta['command']}`  ",
             f"Machine: {meta['machine']}  ",
             (f"{len(cfg['frames'])} frames, {cfg['size'][0]}x{cfg['size'][1]}, {cfg['bpp']:g} bpp, datagrams of "
              f"at most {cfg['packet_bytes']} bytes, {cfg['loss_model']} loss on the way up, {cfg['trials']} "
              f"trials. Every variant sends at most the whole MRIDC stream's bytes (the sliced frame is encoded "
              f"at a lower rate to pay for its headers). Lossless delivery, first picture: MRIDC whole "
              f"{cfg['lossless_psnr']:.2f} dB, MRIDC sliced {cfg['sliced_lossless_psnr']:.2f} dB; AVIF "
              f"{cfg['avif_psnr']:.2f} dB."), "",
             ("| retransmit rounds | loss | variant | frames decoded | PSNR of decoded | MNv2-LPIPS of decoded | "
              "sends per packet |"), "|---|---|---|---|---|---|---|"]
    for s in doc["summary"]:
        psnr_text = "-" if s["psnr_decoded"] is None else f"{s['psnr_decoded']:.2f}"
        lp = "-" if s["mnv2_lpips_decoded"] is None else f"{s['mnv2_lpips_decoded']:.4f}"
        lines.append(f"| {s['retransmit']} | {s['loss']:.2f} | {s['variant']} | {s['decoded_fraction']:.0%} | "
                     f"{psnr_text} | {lp} | {s['sends_per_packet']:.2f} |")
    sizes = cfg["bytes"]
    lines += ["", "Bytes per frame (whole / sliced, slices / AVIF): " + "; ".join(
        f"{k}: {v['whole']} / {v['sliced']}, {v['slices']} / {v['avif']}" for k, v in sizes.items()) + "."]
    return "\n".join(lines) + "\n"


def plot(doc: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for rounds in sorted({s["retransmit"] for s in doc["summary"]}):
        for variant in VARIANTS:
            pts = [s for s in doc["summary"] if s["retransmit"] == rounds and s["variant"] == variant]
            style = "-" if rounds == 0 else "--"
            label = f"{variant}, {rounds} resend rounds"
            axes[0].plot([p["loss"] for p in pts], [p["decoded_fraction"] for p in pts], style, marker="o",
                         label=label)
            pp = [p for p in pts if p["psnr_decoded"] is not None]
            axes[1].plot([p["loss"] for p in pp], [p["psnr_decoded"] for p in pp], style, marker="o", label=label)
    axes[0].set_title("frames decoded", fontsize=9)
    axes[1].set_title("mean PSNR of the decoded frames, dB", fontsize=9)
    for ax in axes:
        ax.set_xlabel("datagram loss rate")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "loss.png")
    plt.close(fig)
