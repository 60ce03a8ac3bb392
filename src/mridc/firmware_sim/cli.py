"""``mridc-sim``: emulate bad links and fleets of cameras on one machine.

    mridc-sim link --listen 127.0.0.1:11883 --upstream 127.0.0.1:1883 --profile nbiot --latency 300
    mridc-sim fleet --devices 50 --source frames/ --transport mqtt://127.0.0.1:1883 --duration 60
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import tempfile
import threading
from pathlib import Path

from mridc.lab.datagram import DATAGRAM_PROFILES, LOSS_MODELS
from mridc.lab.link import OUTAGE_MODES, PROFILES


def _profiles_help() -> str:
    return "; ".join(f"{name}: {p.description}" for name, p in PROFILES.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mridc-sim", description="Emulate bad links and fleets of cameras for MRIDC Edge.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__,
    )
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    link = sub.add_parser(
        "link", help="TCP proxy that shapes bandwidth, adds latency/jitter and outages",
        description="A TCP proxy between a device and its broker/server. Real MQTT or gRPC traffic passes "
                    "through unchanged, at the speed and reliability of the emulated link. A --profile sets "
                    "bandwidth, latency and jitter; explicit flags override it. Profiles: " + _profiles_help(),
    )
    link.add_argument("--listen", required=True, metavar="HOST:PORT", help="where devices connect (port 0 = any)")
    link.add_argument("--upstream", required=True, metavar="HOST:PORT", help="the real broker or gRPC server")
    link.add_argument("--profile", choices=sorted(PROFILES), help="preset link class")
    link.add_argument("--bandwidth", type=float, metavar="BITS_PER_S", help="both directions, e.g. 9600")
    link.add_argument("--up-bandwidth", type=float, metavar="BITS_PER_S", help="device -> upstream only")
    link.add_argument("--down-bandwidth", type=float, metavar="BITS_PER_S", help="upstream -> device only")
    link.add_argument("--latency", type=float, metavar="MS", help="one-way delay per direction")
    link.add_argument("--jitter", type=float, metavar="MS", help="+/- uniform jitter on the delay (no reordering)")
    link.add_argument("--outage-every", type=float, metavar="S", help="take the link down every S seconds")
    link.add_argument("--outage-for", type=float, metavar="S", help="for S seconds each time")
    link.add_argument("--outage-mode", choices=OUTAGE_MODES,
                      help="drop: reset connections and refuse new ones; stall: freeze all data (default drop)")
    link.add_argument("--random-outages", type=float, metavar="PER_MIN",
                      help="random outages, on average this many per minute (length about --outage-for)")
    link.add_argument("--seed", type=int, help="random seed for jitter and random outages")
    link.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (default: until Ctrl-C)")
    udp = link.add_argument_group("datagram mode (--udp): a UDP proxy for CoAP/UDP traffic")
    udp.add_argument("--udp", action="store_true", help="proxy UDP datagrams instead of TCP connections")
    udp.add_argument("--udp-profile", choices=sorted(DATAGRAM_PROFILES), help="datagram preset (lora, nbiot)")
    udp.add_argument("--loss", type=float, metavar="P", help="datagram loss probability, both directions")
    udp.add_argument("--loss-model", choices=LOSS_MODELS, help="bernoulli (default) or gilbert (bursts)")
    udp.add_argument("--mtu", type=int, metavar="BYTES", help="drop datagrams larger than this")
    udp.add_argument("--duplicate", type=float, metavar="P", help="deliver a datagram twice with this probability")
    udp.add_argument("--reorder", type=float, metavar="P", help="delay this fraction of datagrams (reorders them)")
    udp.add_argument("--duty-cycle", type=float, metavar="F", help="airtime fraction, e.g. 0.01 (EU868 LoRa)")

    fleet = sub.add_parser(
        "fleet", help="N simulated cameras, each with its own device id and durable queue",
        description="Run N edge agents (threads) fed from one video file or image folder (looped), each with "
                    "its own device id (PREFIX0001...), queue file and connection. Prints a JSON report.",
    )
    fleet.add_argument("--devices", type=int, required=True, metavar="N")
    fleet.add_argument("--source", required=True, metavar="DIR_OR_VIDEO")
    fleet.add_argument("--transport", required=True, metavar="URL", help="mqtt[s]://HOST:PORT or grpc[s]://HOST:PORT")
    fleet.add_argument("--prefix", default="sim-", help="device id prefix (default sim-)")
    fleet.add_argument("--fps", type=float, default=0.2, help="frames per second per device (default 0.2)")
    fleet.add_argument("--bpp", type=float, default=0.02, help="target bits per pixel (default 0.02)")
    fleet.add_argument("--size", metavar="WxH", help="resize frames, e.g. 768x512")
    fleet.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    fleet.add_argument("--max-frames", type=int, metavar="N", help="frames per device, then drain and stop")
    fleet.add_argument("--drain-timeout", type=float, default=10.0, metavar="S",
                       help="at the end, wait up to S s for queues to empty (default 10)")
    fleet.add_argument("--workdir", help="queue files go here (default: a new temporary folder)")
    fleet.add_argument("--encoder", choices=("synthetic", "model"), default="synthetic",
                       help="synthetic: real MRD streams from random tokens, no model (default); "
                            "model: mridc.edge.encoder.EdgeEncoder")
    fleet.add_argument("--encode-delay-ms", type=float, default=0.0,
                       help="extra time per encode, to emulate a slow device CPU (synthetic encoder)")
    fleet.add_argument("--username", help="MQTT user name for every device (default: the device id with "
                                          "--password-file)")
    fleet.add_argument("--password-file", help="MQTT password for every device")
    fleet.add_argument("--token-file", help="gRPC bearer token for every device")
    fleet.add_argument("--ca-file", help="CA certificate for TLS URLs")
    fleet.add_argument("--json", metavar="FILE", help="also write the report here")
    return parser


def link_options(args: argparse.Namespace) -> dict:
    """LinkEmulator keyword arguments: the profile first, explicit flags on top."""
    options: dict = PROFILES[args.profile].as_kwargs() if args.profile else {}
    if args.bandwidth is not None:
        options["up_bps"] = options["down_bps"] = args.bandwidth
    if args.up_bandwidth is not None:
        options["up_bps"] = args.up_bandwidth
    if args.down_bandwidth is not None:
        options["down_bps"] = args.down_bandwidth
    for flag, key in (("latency", "latency_ms"), ("jitter", "jitter_ms"), ("outage_every", "outage_every_s"),
                      ("outage_for", "outage_for_s"), ("outage_mode", "outage_mode"),
                      ("random_outages", "random_outages_per_min"), ("seed", "seed")):
        value = getattr(args, flag)
        if value is not None:
            options[key] = value
    return options


def datagram_options(args: argparse.Namespace) -> dict:
    """Impairments keyword arguments for --udp: the preset first, explicit flags on top."""
    options: dict = dict(DATAGRAM_PROFILES[args.udp_profile]) if args.udp_profile else {}
    for flag, key in (("loss", "loss"), ("loss_model", "loss_model"), ("mtu", "mtu"), ("duplicate", "duplicate"),
                      ("reorder", "reorder"), ("duty_cycle", "duty_cycle"), ("latency", "latency_ms"),
                      ("jitter", "jitter_ms"), ("bandwidth", "rate_bps")):
        value = getattr(args, flag)
        if value is not None:
            options[key] = value
    return options


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _run_link(args: argparse.Namespace) -> int:
    from mridc.lab.link import LinkEmulator

    try:
        if args.udp:
            from mridc.lab.datagram import DatagramLink

            link = DatagramLink.symmetric(_host_port(args.upstream), _host_port(args.listen), seed=args.seed or 0,
                                          **datagram_options(args))
        else:
            link = LinkEmulator(args.upstream, args.listen, **link_options(args))
        link.start()
    except (ValueError, OSError) as exc:
        print(f"mridc-sim link: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"link listening on {link.address} -> {args.upstream}", flush=True)
    try:
        stop.wait(args.duration)
    except KeyboardInterrupt:
        pass
    finally:
        link.stop()
    print(json.dumps(link.stats), flush=True)
    return 0


def _read(path: str | None) -> str | None:
    return Path(path).read_text().strip() if path else None


def _run_fleet(args: argparse.Namespace) -> int:
    from mridc.edge.transport.base import TlsFiles
    from mridc.lab.fleet import Fleet
    from mridc.lab.synthetic import SyntheticEncoder

    if args.encoder == "model":
        from mridc.edge.encoder import EdgeEncoder

        def factory():
            return EdgeEncoder.from_bundle()
    else:
        def factory():
            return SyntheticEncoder(delay_s=args.encode_delay_ms / 1000.0)

    size = None
    if args.size:
        try:
            width, height = (int(v) for v in args.size.lower().split("x"))
            size = (width, height)
        except ValueError:
            print(f"mridc-sim fleet: --size {args.size!r} must be WxH, e.g. 768x512", file=sys.stderr)
            return 2
    password, token = _read(args.password_file), _read(args.token_file)

    def credentials(device_id: str) -> dict:
        username = args.username or (device_id if password else None)
        return {"username": username, "password": password, "token": token}

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mridc-fleet-"))
    try:
        fleet = Fleet(devices=args.devices, source=args.source, transport_url=args.transport, workdir=workdir,
                      prefix=args.prefix, fps=args.fps, bpp=args.bpp, size=size, encoder_factory=factory,
                      max_frames=args.max_frames, credentials=credentials,
                      tls=TlsFiles(args.ca_file) if args.ca_file else None)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"mridc-sim fleet: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: fleet.stop())
    try:
        report = fleet.run(duration_s=args.duration, drain_timeout_s=args.drain_timeout)
    except KeyboardInterrupt:
        fleet.stop()
        return 130
    summary = {k: v for k, v in report.items() if k != "per_device"}
    summary["workdir"] = str(workdir)
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0 if not report["errors"] else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "link":
        return _run_link(args)
    return _run_fleet(args)


if __name__ == "__main__":
    sys.exit(main())
