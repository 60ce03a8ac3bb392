"""mridc-edge: the camera side of MRIDC Edge (no torch needed).

Commands:
  encode   encode one image file to an MRD stream at a bit budget (--bpp) or keep ratio; a video file or an
           image folder (with -o DIR) to one NNNNNN.mrd per frame, inter frames against the previous ones
  run      capture, encode, queue durably and send frames to the cloud over MQTT or gRPC
  info     show the installed edge bundle (model id, backends available)

Exit status: 0 success, 2 invalid input or arguments, 1 internal error; `run` exits 3 when a finite source
ended with frames still queued after --drain-timeout (they stay queued for the next run).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from mridc.edge.rate import MAX_SCALE, MIN_SCALE
from mridc.shared.cli_util import EXIT_OK, HelpFormatter, InvalidInput, run_command

PROG = "mridc-edge"
_log = logging.getLogger("mridc.edge.agent")  # the agent's logger: one stream for `run`
DEFAULT_DRAIN_TIMEOUT_S = 300.0  # a finite source waits this long for its last acks


def _add_encode(sub) -> None:
    from mridc.edge.runners import RUNNERS

    p = sub.add_parser("encode", help="encode an image (or a video / image folder) to .mrd streams",
                       formatter_class=HelpFormatter,
                       description="Encode an image: VQ tokens, map-guided masking under the budget, entropy coding.\n"
                                   "Example: mridc-edge encode photo.jpg -o photo.mrd --bpp 0.02\n"
                                   "A video file or an image folder is a fixed camera's sequence: -o names a folder "
                                   "that gets one NNNNNN.mrd per frame, in order, intra or inter (coded against the "
                                   "frames before it, as if the cloud stored each one), and sequence.json.\n"
                                   "Example: mridc-edge encode clip.avi -o clip_mrd/ --bpp 0.02 --every 10")
    p.add_argument("image", help="input image (PNG, JPEG, ...), or a video file or image folder (a sequence)")
    p.add_argument("-o", "--output", required=True, help="output .mrd file (a folder for a sequence)")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--bpp", type=float,
                      help="byte budget in bits per pixel of the input; the stream (header, "
                           "mask, tokens) is at most this and as close as token granularity allows")
    rate.add_argument("--keep-ratio", type=float, help="keep this fraction of tokens instead of a budget (0..1)")
    p.add_argument("--scale", default="auto",
                   help="resolution scale: 1 = full, a factor such as 0.7, or 'auto' (with --bpp: lower resolution "
                        "rather than masking most tokens); above 1 (up to 2) a finer grid than full resolution, "
                        "for budgets that full resolution cannot spend, at scale^2 the encoder time; "
                        "'auto:1.5' = auto, allowed to choose such a finer grid up to 1.5")
    p.add_argument("--backend", default="onnx", choices=RUNNERS.names(),
                   help="encoder runtime: onnx = ONNX Runtime int8 "
                        "(torch: the cloud's reference, with the cloud extra)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the encoder")
    p.add_argument("--faces", action="store_true", help="protect faces (Haar cascade) as key regions")
    p.add_argument("--roi", action="append", default=[], metavar="X0,Y0,X1,Y1",
                   help="a key region box in pixels (repeatable); its tokens are kept first")
    p.add_argument("--models", help="models folder (default: $MRIDC_MODELS or the repository's models/)")
    p.add_argument("--slice-bytes", type=int, metavar="N",
                   help="write a sliced file: the frame cut into bands of token rows, each an MRD stream of at "
                        "most N bytes that decodes alone (for lossy datagram links; each slice repeats the "
                        "header, so the file is larger than the --bpp budget; docs/bitstream.md)")
    p.add_argument("--every", type=int, default=1, metavar="K", help="sequence: take every K-th frame")
    p.add_argument("--max-frames", type=int, help="sequence: stop after this many frames")
    p.add_argument("--intra-only", action="store_true", help="sequence: code every frame alone (no inter frames)")
    p.add_argument("--refresh", type=int, default=60, metavar="N",
                   help="sequence: an intra frame at least every N frames (0: only when the scene changes)")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    p.set_defaults(func=cmd_encode)


def _parse_roi(text: str) -> dict:
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError as exc:
        raise InvalidInput(f"--roi {text!r}: expected X0,Y0,X1,Y1") from exc
    return {"box": [x0, y0, x1, y1]}


def _parse_scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise InvalidInput(f"--scale {text!r}: expected a number within {MIN_SCALE}..{MAX_SCALE} or 'auto'") from exc
    if not MIN_SCALE <= value <= MAX_SCALE:
        raise InvalidInput(f"--scale must be within {MIN_SCALE}..{MAX_SCALE} or 'auto', got {text}")
    return value


def cmd_encode(args) -> int:
    from mridc.edge.encoder import EdgeEncoder, EncoderError, read_image

    if args.keep_ratio is not None and not 0.0 <= args.keep_ratio <= 1.0:
        raise InvalidInput(f"--keep-ratio must be within 0..1, got {args.keep_ratio}")
    if args.bpp is not None and not 0.0 < args.bpp <= 64:
        raise InvalidInput(f"--bpp must be within (0, 64], got {args.bpp}")
    if args.every < 1:
        raise InvalidInput(f"--every must be >= 1, got {args.every}")
    source = Path(args.image)
    sequence = source.is_dir() or source.suffix.lower() in (".avi", ".mp4", ".mkv", ".mov", ".webm", ".mjpg")
    if sequence and args.bpp is None:
        raise InvalidInput("a sequence needs --bpp (the byte budget of every frame)")
    if sequence and args.slice_bytes is not None:
        raise InvalidInput("--slice-bytes is for single images; inter frames are not sliced")
    image = None if sequence else read_image(args.image)
    try:
        encoder = EdgeEncoder.from_bundle(args.models, backend=args.backend, threads=args.threads,
                                          use_faces=args.faces)
    except EncoderError as exc:
        raise InvalidInput(str(exc)) from exc
    scale = args.scale if args.scale.startswith("auto") else _parse_scale(args.scale)
    if sequence:
        return _encode_sequence(args, encoder, scale)
    result = encoder.encode(image, bpp=args.bpp, keep_ratio=args.keep_ratio, rois=[_parse_roi(r) for r in args.roi],
                            scale=scale)
    payload = result.bitstream
    sliced = None
    if args.slice_bytes is not None:
        from mridc.shared.slices import compress_sliced, pack_slices

        try:
            slices = compress_sliced(result.token_frame, encoder.prior, args.slice_bytes)
        except ValueError as exc:
            raise InvalidInput(f"--slice-bytes: {exc}") from exc
        payload = pack_slices(slices)
        sliced = {"slices": len(slices), "slice_bytes": [len(x) for x in slices],
                  "bytes_sliced": sum(len(x) for x in slices), "bytes_whole": len(result.bitstream)}
    out = Path(args.output)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(payload)
    tmp.replace(out)
    summary = {"input": args.image, "output": str(out), "width": image.shape[1], "height": image.shape[0],
               "backend": args.backend, **result.summary(), **({"sliced": sliced} if sliced else {})}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{out}: {summary['bytes']} bytes, {summary['bpp']:.4f} bpp, kept {summary['kept_tokens']}/"
              f"{result.tokens.size} tokens ({summary['keep_ratio']:.0%}), "
              f"encode {summary['timings_ms']['total']:.0f} ms")
        if sliced:
            print(f"  sliced: {sliced['slices']} slices of at most {args.slice_bytes} bytes, "
                  f"{sliced['bytes_sliced']} bytes in all (+{sliced['bytes_sliced'] - sliced['bytes_whole']})")
    if result.warning:
        print(f"{PROG}: warning: {result.warning}", file=sys.stderr)
    return EXIT_OK


def _encode_sequence(args, encoder, scale) -> int:
    """`mridc-edge encode VIDEO_OR_FOLDER -o DIR`: NNNNNN.mrd per frame (numbered from 1) and sequence.json."""
    from mridc.edge.capture import CaptureError, open_source
    from mridc.edge.sequence import SequenceConfig, SequenceEncoder

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"{out} exists and is not a folder (a sequence writes one .mrd per frame into -o DIR)")
    out.mkdir(parents=True, exist_ok=True)
    if args.intra_only:
        coder = None
    else:
        chain_scale = None if isinstance(scale, str) else scale  # 'auto' -> the inter default (full resolution)
        coder = SequenceEncoder(encoder, SequenceConfig(refresh_period=args.refresh,
                                                        scale=chain_scale if chain_scale is not None else 1.0))
    try:
        source = open_source(args.image, fps=0)
        frames = []
        number = 0
        for index, captured in enumerate(source):
            if index % args.every:
                continue
            number += 1
            if coder is None:
                result = encoder.encode(captured.image, bpp=args.bpp, scale=scale)
                payload, kind, ref = result.bitstream, "intra", None
            else:
                coded = coder.encode(captured.image, number, args.bpp)
                coder.acknowledge(number)  # offline: the cloud is assumed to store every frame
                payload, kind, ref = coded.bitstream, coded.kind, coded.ref_sequence
            name = f"{number:06d}.mrd"
            (out / name).write_bytes(payload)
            frames.append({"file": name, "source": captured.name, "kind": kind, "ref": ref, "bytes": len(payload)})
            if args.max_frames and number >= args.max_frames:
                break
    except CaptureError as exc:
        raise InvalidInput(str(exc)) from exc
    if not frames:
        raise InvalidInput(f"{args.image}: no frames")
    summary = {"input": args.image, "output": str(out), "frames": len(frames), "every": args.every,
               "bpp": args.bpp, "intra_only": args.intra_only,
               "mean_bytes": sum(f["bytes"] for f in frames) / len(frames),
               "intra": sum(f["kind"] == "intra" for f in frames), "per_frame": frames}
    (out / "sequence.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "per_frame"}))
    else:
        print(f"{out}: {len(frames)} frames, {summary['intra']} intra, {summary['mean_bytes']:.0f} bytes per frame "
              "on average")
    return EXIT_OK


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show the edge bundle and which backends load", formatter_class=HelpFormatter)
    p.add_argument("--models", help="models folder")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from mridc.edge.encoder import EdgeEncoder, EncoderError, load_bundle
    from mridc.edge.runners import RUNNERS
    from mridc.shared.zoo import default_models_dir

    models = Path(args.models) if args.models else default_models_dir()
    try:
        manifest, _, _ = load_bundle(models)
    except EncoderError as exc:
        raise InvalidInput(str(exc)) from exc
    print(f"bundle {models / 'edge'}: model id {manifest.model_id_hex}, stride {manifest.stride}, "
          f"codebook {manifest.codebook_size}")
    for backend in RUNNERS.names():
        try:
            EdgeEncoder.from_bundle(models, backend=backend)
            print(f"  {backend:10s} ok")
        except EncoderError as exc:
            print(f"  {backend:10s} unavailable: {exc}")
    return EXIT_OK


# -- mridc-edge run ------------------------------------------------------------------------------------
def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``mridc-edge run``. Each overrides the matching field of ``--config``."""
    parser.add_argument("--config", metavar="FILE", help="device TOML config (docs/deploy-edge.md)")
    parser.add_argument("--source", help="camera:INDEX, VIDEO_FILE or IMAGE_DIR [source.uri]")
    parser.add_argument("--transport", metavar="URL",
                        help="mqtt://HOST:PORT, mqtts://..., grpc://HOST:PORT, grpcs://... or coap://HOST:PORT "
                             "(datagram links: frames go as slices, one per UDP datagram) [transport.url]")
    parser.add_argument("--device-id", help="device id, [A-Za-z0-9_-]{1,64} [device.id]")
    parser.add_argument("--bpp", type=float, help="target bits per pixel [encoder.bpp]")
    parser.add_argument("--fps", type=float, help="frames per second taken from the source, 0 = unpaced [source.fps]")
    parser.add_argument("--loop", action="store_true", default=None, help="loop a video file or image folder")
    parser.add_argument("--backend", choices=("onnx", "litert", "torch"), help="encoder backend [encoder.backend]")
    parser.add_argument("--models-dir", help="edge model folder [encoder.models_dir]")
    parser.add_argument("--queue", metavar="PATH", help="queue SQLite file [queue.path]")
    parser.add_argument("--queue-max-frames", type=int, help="queue bound in frames [queue.max_frames]")
    parser.add_argument("--queue-policy", choices=("drop_oldest", "drop_newest", "lower_bpp"),
                        help="what to do when the queue is full [queue.policy]")
    parser.add_argument("--username", help="MQTT user name [transport.username]")
    parser.add_argument("--password-file", help="file holding the MQTT password [transport.password_file]")
    parser.add_argument("--token-file", help="file holding the device token: the gRPC bearer token, or the key "
                        "that signs CoAP datagrams [transport.token_file]")
    parser.add_argument("--ca-file", help="CA certificate for TLS URLs [transport.ca_file]")
    parser.add_argument("--cert-file", help="client certificate for mutual TLS [transport.cert_file]")
    parser.add_argument("--key-file", help="client key for mutual TLS [transport.key_file]")
    parser.add_argument("--slice-bytes", type=int, metavar="N",
                        help="cut each frame into slices of at most N bytes that decode alone; a lost one costs a "
                             "band of tokens, not the frame. Default over coap://: what fits --mtu, else whole "
                             "frames [encoder.slice_bytes]")
    parser.add_argument("--inter", action="store_true", default=None,
                        help="fixed camera: send only what changed since the newest frame the cloud stored (inter "
                             "frames), the unchanged background costs nothing [encoder.inter]")
    parser.add_argument("--refresh", type=int, dest="refresh_frames", metavar="N",
                        help="with --inter: an intra frame at least every N frames (default 60) "
                             "[encoder.refresh_frames]")
    parser.add_argument("--mtu", type=int, help="coap://: largest datagram the link carries, e.g. 222 for LoRaWAN "
                        "(default 1152) [transport.mtu]")
    parser.add_argument("--no-retransmit", dest="retransmit", action="store_false", default=None,
                        help="coap://: send every slice once and never again; the cloud decodes what arrived "
                             "[transport.retransmit = false]")
    parser.add_argument("--deadline", type=float, metavar="S", dest="deadline_s",
                        help="coap://: the cloud decodes a frame S seconds after its first slice with what came; "
                             "later slices refine it (default 5) [transport.deadline_s]")
    parser.add_argument("--max-frames", type=int, help="stop after capturing this many frames")
    parser.add_argument("--drain-timeout", type=float, default=None, metavar="S",
                        help="when the source ends, wait up to S seconds until the cloud has acknowledged every "
                             f"queued frame. Default: {DEFAULT_DRAIN_TIMEOUT_S:.0f} s for a video file or image "
                             "folder (exit status 3, naming the frames, if some are still queued), 0 for a camera "
                             "or a looping source, which run until stopped. Queued frames are never lost: the "
                             "next run sends them")


_OVERRIDES = {
    "source": ("source", "uri"), "transport": ("transport", "url"), "device_id": ("device", "id"),
    "bpp": ("encoder", "bpp"), "fps": ("source", "fps"), "loop": ("source", "loop"),
    "backend": ("encoder", "backend"), "models_dir": ("encoder", "models_dir"), "queue": ("queue", "path"),
    "queue_max_frames": ("queue", "max_frames"), "queue_policy": ("queue", "policy"),
    "username": ("transport", "username"), "password_file": ("transport", "password_file"),
    "token_file": ("transport", "token_file"), "ca_file": ("transport", "ca_file"),
    "cert_file": ("transport", "cert_file"), "key_file": ("transport", "key_file"),
    "slice_bytes": ("encoder", "slice_bytes"), "inter": ("encoder", "inter"),
    "refresh_frames": ("encoder", "refresh_frames"), "mtu": ("transport", "mtu"),
    "retransmit": ("transport", "retransmit"),
    "deadline_s": ("transport", "deadline_s"),
}


def config_from_args(args: argparse.Namespace):
    """The validated ``DeviceConfig``: ``--config`` file (if any) with command-line overrides applied."""
    from mridc.edge.config import DeviceConfig, load_config

    config = load_config(args.config) if getattr(args, "config", None) else DeviceConfig()
    for attr, (section, name) in _OVERRIDES.items():
        value = getattr(args, attr, None)
        if value is not None:
            setattr(getattr(config, section), name, value)
    config.encoder.min_bpp = min(config.encoder.min_bpp, config.encoder.bpp)
    return config.validate()


def run_from_args(args: argparse.Namespace, encoder=None) -> int:
    """``mridc-edge run``: 0 when the source ended (or SIGTERM/SIGINT), 1 when capture failed, 2 on a
    config error. ``encoder`` defaults to ``EdgeEncoder`` built from the config."""
    from mridc.edge.agent import build_agent
    from mridc.edge.capture import CaptureError
    from mridc.edge.config import ConfigError
    from mridc.edge.queue import QueueError
    from mridc.edge.transport.base import TransportError

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        if encoder is None:
            from mridc.edge.encoder import EdgeEncoder

            # scale "auto": at very small budgets a lower-resolution grid beats masking most tokens (README).
            encoder = EdgeEncoder.from_bundle(models_dir=config.encoder.models_dir or None,
                                              backend=config.encoder.backend, scale="auto")
        agent = build_agent(config, encoder, max_frames=getattr(args, "max_frames", None))
    except (ConfigError, CaptureError, QueueError, TransportError, OSError) as exc:
        print(f"mridc-edge run: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def _on_signal(signum, _frame):
        _log.info("signal %d: stopping", signum)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
    _log.info("%s: %s -> %s, bpp %.4f, queue %s (%s)", config.device.id, config.source.uri, config.transport.url,
             config.encoder.bpp, config.queue_path(), config.queue.policy)
    drain_timeout = getattr(args, "drain_timeout", None)
    if drain_timeout is None:
        finite = agent.source_is_finite or getattr(args, "max_frames", None) is not None
        drain_timeout = DEFAULT_DRAIN_TIMEOUT_S if finite else 0.0
    try:
        status = agent.run(stop, max_frames=getattr(args, "max_frames", None), drain_timeout_s=drain_timeout)
    except CaptureError as exc:
        _log.error("%s: %s", config.device.id, exc)
        return 1
    finally:
        agent.queue.close()
    undelivered = status.get("undelivered", [])
    summary = {k: status[k] for k in ("agent", "forwarder")} | {"queue_depth": status["queue"]["depth"]}
    if undelivered and drain_timeout > 0 and not stop.is_set():
        shown = ", ".join(map(str, undelivered[:20])) + (" ..." if len(undelivered) > 20 else "")
        _log.error("%s: %d frame(s) not acknowledged after %.0f s, still queued in %s (sequences %s); "
                   "the next run sends them: %s", config.device.id, len(undelivered), drain_timeout,
                   config.queue_path(), shown, summary)
        return 3
    _log.info("%s: done%s: %s", config.device.id, f", {len(undelivered)} frame(s) left queued for the next run"
              if undelivered else ", every frame acknowledged", summary)
    return 0



def _add_run(sub) -> None:
    p = sub.add_parser("run", help="capture, encode, queue and send frames", formatter_class=HelpFormatter,
                       description="The camera agent: frames from a camera, video or image folder are encoded, stored "
                                   "in a durable queue and sent over MQTT, gRPC or CoAP until the cloud acknowledges "
                                   "them.")
    add_run_arguments(p)
    p.set_defaults(func=run_from_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_encode(sub)
    _add_run(sub)
    _add_info(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(args.func, args, PROG)


if __name__ == "__main__":
    sys.exit(main())
