"""``mridc-bench loss``: frames and quality over a lossy datagram link, sliced MRIDC against whole streams.

Real UDP sockets on loopback through ``mridc.lab.datagram.DatagramLink`` (Bernoulli or Gilbert-Elliott loss on
the way up; the way back is clean). For each loss rate every frame is sent as datagrams of at most
``--packet-bytes``:

- ``mridc-sliced``: the frame's slices (``compress_sliced``), one per datagram; the cloud decodes whatever
  arrived, missing rows masked and completed;
- ``mridc-whole``: the unsliced MRD stream cut into fragments; the frame decodes only if every fragment came;
- ``avif-whole``: AVIF (best setting at the MRIDC stream's bytes, any downscale) cut the same way;
- ``mridc-coap``: the product path. The frame's slices (cut so that each datagram fits ``--packet-bytes``)
  go out through the edge's ``CoapTransport``, the link loses datagrams both ways, and the real decode service
  (``CoapIngest`` + store) decodes each frame when complete or at its deadline (``--deadline``). Quality is
  read from the stored picture, latency is capture to stored (first and final version).

For the first three, with ``--retransmit N`` the receiver reports what it is missing after each round and the
sender resends those datagrams, up to N more rounds; a datagram carries an 8-byte bench header (frame,
packet, count), the benchmark's framing. ``mridc-coap`` with N > 0 runs the transport's own resend protocol
(queries and reports), without N > 0 it runs ``--no-retransmit``. Decodes are the service's first picture
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
VARIANTS = ("mridc-sliced", "mridc-whole", "avif-whole", "mridc-coap")
COAP_DEVICE = "bench-cam"


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
    p.add_argument("--deadline", type=float, default=2.0,
                   help="mridc-coap: seconds the service waits for a frame's slices before decoding what came")
    p.add_argument("--no-coap", action="store_true", help="leave out the mridc-coap variant")


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


def equal_bytes_slices(encoder, image, result, whole: bytes, budget: int, bpp: float):
    """Slices of at most `budget` bytes whose total is no larger than the whole stream: the slices repeat
    headers, so the frame is encoded at a lower rate until they fit. Returns (slices, its encode result)."""
    from mridc.shared.slices import compress_sliced

    sliced_result = result
    slices = compress_sliced(result.token_frame, encoder.prior, budget)
    for _ in range(6):
        total = sum(map(len, slices))
        if total <= len(whole):
            break
        bpp *= 0.98 * len(whole) / total
        sliced_result = encoder.encode(image, bpp=bpp)
        slices = compress_sliced(sliced_result.token_frame, encoder.prior, budget)
    return slices, sliced_result


def run_coap(coded: list[dict], decoder, *, loss: float, loss_model: str, retransmit: bool, seed: int,
             packet_bytes: int, deadline_s: float, workdir: Path, metric) -> list[dict]:
    """One setting of the mridc-coap variant: every frame through CoapTransport -> DatagramLink -> the service."""
    import shutil

    from PIL import Image

    from mridc.cloud.service.config import ServiceConfig
    from mridc.cloud.service.server import Worker
    from mridc.cloud.service.store import FrameStore
    from mridc.edge.transport.coap import CoapTransport
    from mridc.lab.datagram import DatagramLink, Impairments
    from mridc.lab.metrics import psnr
    from mridc.shared.protocol import build_envelope
    from mridc.shared.slices import pack_slices

    shutil.rmtree(workdir, ignore_errors=True)
    config = ServiceConfig(out_dir=workdir, coap_addr="127.0.0.1:0", allow_insecure=True, realism=0.0,
                           refine_realism=0.0, decoder="bench", coap_max_deadline_s=max(60.0, deadline_s)).validate()
    worker = Worker(config, decoder)
    worker.start()
    acks: dict[int, float] = {}
    imp = Impairments(loss=loss, loss_model=loss_model)
    try:
        with DatagramLink(("127.0.0.1", worker.coap.port), up=imp, down=imp, seed=seed) as link:
            transport = CoapTransport("127.0.0.1", link.port, COAP_DEVICE, retransmit=retransmit,
                                      deadline_s=deadline_s, query_interval_s=0.3, query_timeout_s=1.0,
                                      give_up_s=10.0, mtu=packet_bytes)
            transport.on_ack = lambda ack: acks.setdefault(ack.sequence, time.time())
            transport.start()
            for i, c in enumerate(coded):
                transport.send(build_envelope(COAP_DEVICE, i + 1, pack_slices(c["coap_slices"]), decoder.model_id))
                time.sleep(0.05)  # a camera captures one frame at a time
            deadline = time.monotonic() + 60 + 10 * len(coded)
            while len(acks) < len(coded) and time.monotonic() < deadline:
                time.sleep(0.1)
            sends = dict(transport.slices_sent_by_sequence)
            transport.close()
    finally:
        worker.stop(drain_timeout=30)
    store = FrameStore(workdir)
    rows = []
    for i, c in enumerate(coded):
        n = len(c["coap_slices"])
        row = {"variant": "mridc-coap", "frame": c["name"], "packets": n, "received": 0, "sends": sends.get(i + 1, 0),
               "decoded": False, "psnr": None, "mnv2_lpips": None, "rows_missing": None, "latency_first_s": None,
               "latency_final_s": None, "acked": i + 1 in acks}
        if store.stored_slices(COAP_DEVICE, i + 1) is not None:
            record = store.load_record(COAP_DEVICE, i + 1)
            decoded = np.asarray(Image.open(workdir / record.png_path).convert("RGB"))
            updates = record.versions.get("updates", [])
            first = updates[0]["stored_at"] if updates else record.stored_at
            row.update(decoded=True, psnr=psnr(c["image"], decoded), mnv2_lpips=metric(c["image"], decoded),
                       received=len(record.slices.get("held", [])) if record.slices else n,
                       latency_first_s=first - record.capture_time_us / 1e6,
                       latency_final_s=record.stored_at - record.capture_time_us / 1e6)
        rows.append(row)
    store.close()
    return rows


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
    from mridc.shared.slices import decompress_slices

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
    from mridc.edge.transport.coap import CoapTransport

    coap_budget = CoapTransport("127.0.0.1", 5683, COAP_DEVICE, mtu=args.packet_bytes).max_slice_bytes
    coded = []
    for name, image in frames:
        result = encoder.encode(image, bpp=args.bpp)
        whole = bytes(result.bitstream)
        # Equal bytes: the slices repeat headers, so the sliced frame is encoded at a lower rate until all its
        # slices together are no larger than the whole stream.
        slices, sliced_result = equal_bytes_slices(encoder, image, result, whole, budget, args.bpp)
        # Over CoAP the datagram's own fields take their share of each packet (the transport's slice budget).
        coap_slices, coap_result = equal_bytes_slices(encoder, image, result, whole, coap_budget, args.bpp)
        sliced_lossless = decoder.decode_frames([sliced_result.token_frame], settings)[0].image
        try:
            avif_payload, avif_decoded, _ = avif.encode(image, len(whole) * 8)
        except BudgetTooSmall:  # no AVIF setting fits the MRIDC stream's bytes: that variant sits out
            avif_payload, avif_decoded = None, None
        lossless = decoder.decode_frames([result.token_frame], settings)[0].image
        coded.append({"name": name, "image": image, "whole": whole, "slices": slices, "coap_slices": coap_slices,
                      "coap_lossless_psnr": psnr(image, decoder.decode_frames([coap_result.token_frame],
                                                                              settings)[0].image),
                      "avif": avif_payload,
                      "avif_decoded": avif_decoded, "lossless_psnr": psnr(image, lossless),
                      "sliced_lossless_psnr": psnr(image, sliced_lossless),
                      "avif_psnr": None if avif_decoded is None else psnr(image, avif_decoded)})
        print(f"loss: {name}: MRIDC {len(whole)} B whole / {sum(map(len, slices))} B in {len(slices)} slices, "
              f"AVIF {len(avif_payload) if avif_payload else 'none fits'} B", file=sys.stderr, flush=True)
    rows = []
    import tempfile

    coap_store = Path(tempfile.mkdtemp(prefix="mridc-loss-coap-"))  # the service's store: scratch, not results
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
                if not args.no_coap:
                    for row in run_coap(coded, decoder, loss=loss, loss_model=args.loss_model,
                                        retransmit=rounds > 0, seed=seed, packet_bytes=args.packet_bytes,
                                        deadline_s=args.deadline, workdir=coap_store, metric=mnv2):
                        rows.append(row | {"loss": loss, "retransmit": rounds, "trial": trial})
                this = [r for r in rows if (r["loss"], r["retransmit"], r["trial"]) == (loss, rounds, trial)]
                print(f"loss: {loss:.2f} retransmit {rounds} trial {trial}: " + ", ".join(
                    f"{v} {sum(r['decoded'] for r in this if r['variant'] == v)}/"
                    f"{sum(r['variant'] == v for r in this)}" for v in VARIANTS), file=sys.stderr, flush=True)
    import shutil

    shutil.rmtree(coap_store, ignore_errors=True)
    summary = summarise(rows, coded)
    doc = {"meta": {"command": command_line(), "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
                    "machine": machine(), "load_1min_start": load_start, "load_1min_end": load_1min()},
           "config": {"frames": [c["name"] for c in coded], "size": [width, height], "bpp": args.bpp,
                      "packet_bytes": args.packet_bytes, "loss_model": args.loss_model, "trials": args.trials,
                      "bytes": {c["name"]: {"whole": len(c["whole"]), "sliced": sum(map(len, c["slices"])),
                                            "slices": len(c["slices"]), "coap_slices": len(c["coap_slices"]),
                                            "coap_sliced": sum(map(len, c["coap_slices"])),
                                            "avif": len(c["avif"]) if c["avif"] else None} for c in coded},
                      "lossless_psnr": float(np.mean([c["lossless_psnr"] for c in coded])),
                      "sliced_lossless_psnr": float(np.mean([c["sliced_lossless_psnr"] for c in coded])),
                      "coap_lossless_psnr": float(np.mean([c["coap_lossless_psnr"] for c in coded])),
                      "coap_slice_bytes": coap_budget, "deadline_s": args.deadline,
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
                    "sends_per_packet": sum(r["sends"] for r in mine) / max(1, sum(r["packets"] for r in mine)),
                    "latency_first_s": _median([r.get("latency_first_s") for r in ok]),
                    "latency_final_s": _median([r.get("latency_final_s") for r in ok])})
    return out


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def render_markdown(doc: dict) -> str:
    meta, cfg = doc["meta"], doc["config"]
    lines = [f"# Lossy datagram link ({meta['date']})", "", f"Command: `{meta['command']}`  ",
             f"Machine: {meta['machine']}  ",
             (f"{len(cfg['frames'])} frames, {cfg['size'][0]}x{cfg['size'][1]}, {cfg['bpp']:g} bpp, datagrams of "
              f"at most {cfg['packet_bytes']} bytes, {cfg['loss_model']} loss on the way up, {cfg['trials']} "
              f"trials. Every variant sends at most the whole MRIDC stream's bytes (the sliced frame is encoded "
              f"at a lower rate to pay for its headers). Lossless delivery, first picture: MRIDC whole "
              f"{cfg['lossless_psnr']:.2f} dB, MRIDC sliced {cfg['sliced_lossless_psnr']:.2f} dB, MRIDC over CoAP "
              f"(slices of {cfg.get('coap_slice_bytes')} bytes) {cfg.get('coap_lossless_psnr', float('nan')):.2f} "
              f"dB; AVIF {cfg['avif_psnr']:.2f} dB. mridc-coap loses datagrams both ways, runs the real service "
              f"with a {cfg.get('deadline_s')} s deadline, and its latency is capture to stored picture (median; "
              "first version / final version)."), "",
             ("| retransmit rounds | loss | variant | frames decoded | PSNR of decoded | MNv2-LPIPS of decoded | "
              "sends per packet | latency first / final, s |"), "|---|---|---|---|---|---|---|---|"]
    for s in doc["summary"]:
        psnr_text = "-" if s["psnr_decoded"] is None else f"{s['psnr_decoded']:.2f}"
        lp = "-" if s["mnv2_lpips_decoded"] is None else f"{s['mnv2_lpips_decoded']:.4f}"
        latency = "-" if s.get("latency_first_s") is None else (
            f"{s['latency_first_s']:.2f} / {s['latency_final_s']:.2f}")
        lines.append(f"| {s['retransmit']} | {s['loss']:.2f} | {s['variant']} | {s['decoded_fraction']:.0%} | "
                     f"{psnr_text} | {lp} | {s['sends_per_packet']:.2f} | {latency} |")
    sizes = cfg["bytes"]
    lines += ["", "Bytes per frame (whole / sliced, slices / AVIF): " + "; ".join(
        f"{k}: {v['whole']} / {v['sliced']}, {v['slices']} / {v['avif']}" for k, v in sizes.items()) + "."]
    return "\n".join(lines) + "\n"


def plot(doc: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=110)
    for rounds in sorted({s["retransmit"] for s in doc["summary"]}):
        for variant in VARIANTS:
            pts = [s for s in doc["summary"] if s["retransmit"] == rounds and s["variant"] == variant]
            style = "-" if rounds == 0 else "--"
            label = f"{variant}, {rounds} resend rounds"
            axes[0].plot([p["loss"] for p in pts], [p["decoded_fraction"] for p in pts], style, marker="o",
                         label=label)
            pp = [p for p in pts if p["psnr_decoded"] is not None]
            axes[1].plot([p["loss"] for p in pp], [p["psnr_decoded"] for p in pp], style, marker="o", label=label)
            pl = [p for p in pts if p.get("latency_final_s") is not None]
            if pl:
                axes[2].plot([p["loss"] for p in pl], [p["latency_final_s"] for p in pl], style, marker="o",
                             label=f"{label}, final")
                axes[2].plot([p["loss"] for p in pl], [p["latency_first_s"] for p in pl], ":", marker="x",
                             label=f"{label}, first")
    axes[0].set_title("frames decoded", fontsize=9)
    axes[1].set_title("mean PSNR of the decoded frames, dB", fontsize=9)
    axes[2].set_title("mridc-coap: capture to stored picture (median), s", fontsize=9)
    for ax in axes:
        ax.set_xlabel("datagram loss rate")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "loss.png")
    plt.close(fig)
