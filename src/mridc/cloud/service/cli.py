"""`mridc-cloud serve` and `mridc-cloud frames`: argument definitions and runners.

cloud/cli.py wires them in:
    add_serve_arguments(subparsers.add_parser("serve")); ... run_serve(args)
    add_frames_arguments(subparsers.add_parser("frames")); ... run_frames(args)
`python -m mridc.cloud.service.cli serve|frames ...` runs the same code without the umbrella CLI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
import time

from .config import ConfigError, load_config

# flag -> config field; every flag defaults to None so a config file's value wins unless the flag is given.
_SERVE_FLAGS = {
    "mqtt": "mqtt_url", "grpc": "grpc_addr", "coap": "coap_addr", "coap_tokens": "coap_tokens",
    "out": "out_dir", "workers": "workers", "worker_id": "worker_id",
    "metrics": "metrics_addr", "mqtt_username": "mqtt_username", "mqtt_password": "mqtt_password",
    "mqtt_ca": "mqtt_ca", "mqtt_cert": "mqtt_cert", "mqtt_key": "mqtt_key", "grpc_cert": "grpc_cert",
    "grpc_key": "grpc_key", "grpc_client_ca": "grpc_client_ca", "grpc_tokens": "grpc_tokens",
    "decoder": "decoder", "models": "models_dir", "device": "device", "realism": "realism", "seed": "seed",
    "refine_realism": "refine_realism", "steps": "steps", "backend": "backend", "queue_size": "queue_size",
    "batch_size": "batch_size",
    "rate_limit": "rate_limit_fps",
    "rate_burst": "rate_limit_burst", "max_payload": "max_payload_bytes", "log_format": "log_format",
    "adapt": "adapt", "adapt_minutes": "adapt_minutes", "adapt_threads": "adapt_threads",
    "calibration_devices": "calibration_devices",
}


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = ("Run the cloud ingest/decoder service (MQTT shared subscription, gRPC and/or CoAP for "
                          "datagram links).")
    parser.add_argument("--config", help="TOML config file (flags override it; see docs/deploy-cloud.md)")
    parser.add_argument("--mqtt", metavar="URL", help="broker: mqtt://HOST:PORT or mqtts://HOST:PORT")
    parser.add_argument("--grpc", metavar="ADDR", help="serve gRPC on HOST:PORT")
    parser.add_argument("--coap", metavar="ADDR",
                        help="serve CoAP on UDP HOST:PORT (5683 is CoAP's port): frames as slices from lossy "
                             "datagram links; a frame is decoded when complete or at its deadline with what came, "
                             "and again when late slices arrive")
    parser.add_argument("--coap-tokens", help="per-device keys for CoAP (same format as --grpc-tokens, which is "
                        "the default): each datagram carries an HMAC under the device key")
    parser.add_argument("--out", metavar="DIR", help="output store (PNGs, sidecars, index.sqlite)")
    parser.add_argument("--workers", type=int, help="worker processes on this machine (default 1)")
    parser.add_argument("--worker-id", help="unique id of this live worker (its MQTT client id and persistent "
                        "session); a second live process with the same id is refused. Default HOST-PID")
    parser.add_argument("--metrics", metavar="ADDR", help="Prometheus endpoint HOST:PORT (worker i: PORT+i)")
    parser.add_argument("--mqtt-username")
    parser.add_argument("--mqtt-password", help="or set MRIDC_MQTT_PASSWORD")
    parser.add_argument("--mqtt-ca", help="CA certificate that signed the broker's certificate")
    parser.add_argument("--mqtt-cert", help="client certificate (brokers that require one)")
    parser.add_argument("--mqtt-key")
    parser.add_argument("--grpc-cert", help="gRPC server certificate (PEM)")
    parser.add_argument("--grpc-key", help="gRPC server key (PEM)")
    parser.add_argument("--grpc-client-ca", help="require client certificates signed by this CA (mTLS)")
    parser.add_argument("--grpc-tokens", help="per-device token file (see security.write_token_file)")
    parser.add_argument("--insecure", action="store_true", default=None,
                        help="allow gRPC without TLS and tokens, and unsigned CoAP (local tests only)")
    parser.add_argument("--decoder", help="'mridc' (default) or 'package.module:factory'")
    parser.add_argument("--models", help="models folder (default: MRIDC_MODELS or the shipped models/)")
    parser.add_argument("--device", help="torch device for decoding: cpu (default) or cuda")
    parser.add_argument("--realism", type=float,
                        help="the first picture's realism: 0 = tokenizer decode (cheap, default), 1 = full diffusion")
    parser.add_argument("--refine-realism", type=float,
                        help="the final picture's realism (default 0.5, as `mridc-cloud decode`): each frame's "
                             "preview is stored, acked and announced first, then replaced by this refined decode "
                             "when no live frame waits; 0 turns refinement off")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--steps", type=int, help="diffusion DDIM steps at realism 1 (default 2: one step at the "
                        "refined picture's realism 0.5)")
    parser.add_argument("--backend", choices=("auto", "torch", "onnxruntime"),
                        help="decoder backend; auto (default): ONNX Runtime on a CPU, PyTorch on CUDA")
    parser.add_argument("--queue-size", type=int, help="decode queue bound = MQTT Receive Maximum")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--rate-limit", type=float, help="frames/s per device per worker (0 = off)")
    parser.add_argument("--rate-burst", type=int)
    parser.add_argument("--max-payload", type=int, help="largest accepted message in bytes")
    parser.add_argument("--log-format", choices=("json", "text"))
    parser.add_argument("--adapt", action="store_true", default=None,
                        help="scene adaptation: accept calibration stills from devices and adapt each device's "
                             "decoder to its scene in the background (docs/adaptation.md)")
    parser.add_argument("--adapt-minutes", type=float, help="budget of one adaptation run (default 15)")
    parser.add_argument("--adapt-threads", type=int, help="CPU threads of one run, at nice 19 (default 1)")
    parser.add_argument("--calibration-devices", metavar="A,B",
                        help="only these devices may send calibration stills (default: every device)")
    return parser


def config_from_args(args: argparse.Namespace):
    overrides = {field: getattr(args, flag, None) for flag, field in _SERVE_FLAGS.items()}
    if getattr(args, "insecure", None):
        overrides["allow_insecure"] = True
    if overrides["mqtt_password"] is None and os.environ.get("MRIDC_MQTT_PASSWORD"):
        overrides["mqtt_password"] = os.environ["MRIDC_MQTT_PASSWORD"]
    return load_config(args.config, **overrides)


def run_serve(args: argparse.Namespace) -> int:
    from .server import run_supervisor, run_worker

    try:
        config = config_from_args(args)
    except (ConfigError, OSError) as exc:
        print(f"mridc-cloud serve: {exc}", file=sys.stderr)
        return 2
    return run_supervisor(config) if config.workers > 1 else run_worker(config)


# -- frames --------------------------------------------------------------------------------------------------
_RELATIVE = re.compile(r"^-?(\d+(?:\.\d+)?)\s*([smhd])$")


def parse_time_us(text: str, *, now: float | None = None) -> int:
    """ISO 8601 ('2026-11-27T10:00', UTC unless it names a zone), UNIX seconds, or an age ('10m', '2h')."""
    text = text.strip()
    match = _RELATIVE.match(text)
    if match:
        seconds = float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return int(((now if now is not None else time.time()) - seconds) * 1e6)
    try:
        return int(float(text) * 1e6)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)  # 3.11 reads a trailing Z
    except ValueError:
        raise ValueError(f"cannot read time {text!r}: use ISO 8601, UNIX seconds or an age like 10m") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1e6)


def add_frames_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = "List decoded frames from a service's output store."
    parser.add_argument("--out", required=True, metavar="DIR", help="the service's --out folder")
    parser.add_argument("--device", help="only this device id")
    parser.add_argument("--since", help="capture time >= this (ISO 8601, UNIX seconds, or an age: 10m, 2h, 1d)")
    parser.add_argument("--until", help="capture time < this")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    return parser


def run_frames(args: argparse.Namespace) -> int:
    from .store import open_store_readonly

    try:
        since = parse_time_us(args.since) if args.since else None
        until = parse_time_us(args.until) if args.until else None
        store = open_store_readonly(args.out)
    except (ValueError, FileNotFoundError) as exc:
        print(f"mridc-cloud frames: {exc}", file=sys.stderr)
        return 2
    try:
        rows = store.query(args.device, since, until, args.limit)
    finally:
        store.close()
    from pathlib import Path

    from .adaptation import adaptation_state

    adaptation = {d: s for d, s in adaptation_state(Path(args.out)).items() if not args.device or d == args.device}
    if args.json:
        for row in rows:
            print(json.dumps(row))
        for device, state in adaptation.items():
            print(json.dumps({"adaptation": device, **state}))
        return 0
    print(f"{'device':<20} {'sequence':>10} {'capture time (UTC)':<26} {'bytes':>6} {'bpp':>8}  png")
    for row in rows:
        when = dt.datetime.fromtimestamp(row["capture_time_us"] / 1e6, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        print(f"{row['device_id']:<20} {row['sequence']:>10} {when:<26} {row['bytes']:>6} {row['bpp']:>8.4f}  "
              f"{row['png_path']}")
    print(f"{len(rows)} frame(s)")
    for device, state in adaptation.items():
        for model, m in state["models"].items():
            last = m["last_run"] or {}
            print(f"adaptation {device} (model {model}): decoder {m['version']}, {state['stills']} still(s), "
                  f"{m['runs']} run(s)" + (f", last {last.get('result')}" if last else "")
                  + (", running" if m["running"] else ""))
        if not state["models"]:
            print(f"adaptation {device}: decoder base, {state['stills']} still(s), no run yet")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mridc.cloud.service.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_arguments(sub.add_parser("serve"))
    add_frames_arguments(sub.add_parser("frames"))
    args = parser.parse_args(argv)
    return run_serve(args) if args.command == "serve" else run_frames(args)


if __name__ == "__main__":
    sys.exit(main())
