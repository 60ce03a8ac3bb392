"""The demo run: checks, broker, cloud service, links and cameras, then the wait, the measurement and the report."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from mridc.lab.link import PROFILES, LinkProfile
from mridc.lab.provenance import machine
from mridc.shared.protocol import all_topics_filter

from . import __doc__ as DEMO_DOC
from .cameras import (
    ASSETS_DIR,
    FINAL_STATUSES,
    SAMPLE_IMAGES,
    DemoCamera,
    SentFrame,
    load_edge_encoder,
    plan_shots,
)
from .errors import DemoError, MissingPiece
from .measure import avif_at_same_bytes, count_delivery, load_avif, load_perceptual, measure_frames
from .processes import CloudService
from .report import print_summary, summarise, write_html, write_markdown

log = logging.getLogger("mridc.sim.demo")

DEMO_MARKER = ".mridc-demo"  # a folder with this file is a previous demo output and may be replaced

LINK_PROFILES: dict[str, LinkProfile | None] = {
    **PROFILES,
    "64k": LinkProfile(64_000, 64_000, 300, 50, "64 kbit/s both ways, 300 ms latency"),
    "none": None,
}
DEFAULT_LINK = "nbiot"
DEFAULT_REALISM = 0.25  # a real diffusion pass at a fraction of the steps; 0 skips diffusion (fastest)


# -- console --------------------------------------------------------------------------------------------------
class Console:
    """Progress lines with the time since start; everything also goes to logs/demo.log."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self._lock = threading.Lock()

    def say(self, stage: str, message: str) -> None:
        line = f"[{time.monotonic() - self.started:6.1f}s] {stage:<9} {message}"
        with self._lock:
            print(line, flush=True)
        log.info("%s %s", stage, message)


# -- pieces that must be present ------------------------------------------------------------------------------
def check_cloud_models(models_dir: Path) -> None:
    missing = [name for name in ("tokenizer.pt", "predictor.pt", "diffusion.pt", "edge/token_prior.npz")
               if not (models_dir / name).is_file()]
    if missing:
        raise MissingPiece(f"the cloud decoder's model files are missing in {models_dir}: {', '.join(missing)} "
                           "(they ship in models/; `make train` rebuilds them, MRIDC_MODELS points elsewhere)")


# -- the run --------------------------------------------------------------------------------------------------
def prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / DEMO_MARKER).exists():
            raise MissingPiece(f"--out {out} exists and is not a demo output folder (no {DEMO_MARKER}); "
                               "choose another folder or empty it")
        shutil.rmtree(out)
    for sub in ("originals", "bitstreams", "avif", "side_by_side", "logs", "edge"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by python -m mridc.firmware_sim.demo; replaced by the next run\n")

class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.console = Console()
        self.cameras: list[DemoCamera] = []
        self.links: dict[str, object] = {}
        self.frames: list[SentFrame] = []
        self._lock = threading.Lock()
        self._acked = 0
        self._jobs: dict[str, Future] = {}
        self._endpoints: tuple = (None, None, {})
        self.pids: dict[str, int] = {}  # processes this demo started, by role (in report.json)

    def say(self, stage: str, message: str) -> None:
        self.console.say(stage, message)

    def run(self, stack: contextlib.ExitStack) -> dict:
        args, out = self.args, self.out
        from mridc.shared.zoo import default_models_dir

        models_dir = Path(args.models_dir).resolve() if args.models_dir else default_models_dir()
        self.say("check", f"models in {models_dir}, sample assets in {ASSETS_DIR}")
        check_cloud_models(models_dir)
        encoder = load_edge_encoder(models_dir / "edge" if args.models_dir else None, args.backend)
        avif = load_avif()
        perceptual, why_not = None, "--no-perceptual"
        if not args.no_perceptual:
            try:
                perceptual = load_perceptual()
            except MissingPiece as exc:  # an optional metric: its weights live beside the checkout, not in it
                why_not = str(exc)
                self.say("check", f"perceptual distance skipped: {why_not}")
        perceptual_label = f"not measured ({why_not})" if perceptual is None else (
            perceptual.name + ("" if perceptual.standard else ": LPIPS-style unit-normalised MobileNetV2 ImageNet "
                               "feature distance, not the standard LPIPS"))
        plan = plan_shots(args.images, args.frames)
        total_planned = sum(len(s) for s in plan.values())
        if not total_planned:
            raise MissingPiece("nothing to send: --images 0 and --frames 0")
        self.say("plan", ", ".join(f"{dev}: {len(shots)} frame(s)" for dev, shots in plan.items()))

        # 1. the broker (or gRPC) ---------------------------------------------------------------------
        transport = args.transport
        broker = None
        if transport == "mqtt":
            from mridc.lab.broker import BrokerError, MosquittoBroker

            try:
                broker = MosquittoBroker()
            except BrokerError as exc:
                self.say("broker", f"{exc}")
                self.say("broker", "falling back to the gRPC transport (cameras -> link -> gRPC ingest)")
                transport = "grpc"
        if broker is not None:
            def stop_broker() -> None:
                with contextlib.suppress(OSError):
                    shutil.copyfile(broker.log_path, out / "logs" / "mosquitto.log")
                broker.stop()

            stack.callback(stop_broker)  # before start: an interrupt inside start() must not leak it
            broker.start()
            self.pids["mosquitto"] = broker._proc.pid  # MosquittoBroker has no public pid
            self.say("broker", f"mosquitto listening on {broker.url} (pid {self.pids['mosquitto']})")

        # 2. the cloud service ------------------------------------------------------------------------
        serve = ["--out", str(out / "cloud"), "--worker-id", f"demo-cloud-{os.getpid()}", "--refine-realism", "0",
                 "--realism",
                 str(args.realism), "--seed", str(args.seed), "--log-format", "text"]
        if args.models_dir:
            serve += ["--models", str(models_dir)]
        serve += ["--mqtt", broker.url] if broker is not None else ["--grpc", "127.0.0.1:0", "--insecure"]
        self.say("cloud", f"starting mridc-cloud serve (realism {args.realism}); loading the decoder ...")
        cloud = CloudService(serve, out / "logs" / "cloud.log")
        stack.callback(cloud.stop)
        self.pids["cloud"] = cloud.proc.pid
        cloud.wait_ready()
        upstream = ("127.0.0.1", broker.port) if broker is not None else ("127.0.0.1", int(cloud.ready["grpc_port"]))
        self.say("cloud", f"ready (pid {cloud.proc.pid}), storing into {out / 'cloud'}")

        # 3. one emulated link per camera -------------------------------------------------------------
        from mridc.lab.link import LinkEmulator

        profile = LINK_PROFILES[args.link_profile]
        link_info = {"profile": args.link_profile,
                     "description": profile.description if profile else "no link emulation (loopback)",
                     **(profile.as_kwargs() if profile else {})}
        scheme = "mqtt" if broker is not None else "grpc"
        urls = {}
        for device_id in plan:
            if profile is None:
                urls[device_id] = f"{scheme}://{upstream[0]}:{upstream[1]}"
                continue
            link = LinkEmulator(upstream, **profile.as_kwargs(), seed=args.seed)
            stack.callback(link.stop)
            link.start()
            self.links[device_id] = link
            urls[device_id] = f"{scheme}://{link.address}"
        if profile is not None:
            self.say("link", f"{profile.description}: one emulated link per camera -> {upstream[0]}:{upstream[1]}")

        # 4. cameras ----------------------------------------------------------------------------------
        from mridc.edge.encoder import EdgeEncoder

        analysis = ThreadPoolExecutor(max_workers=1, thread_name_prefix="avif")
        stack.callback(analysis.shutdown, wait=False, cancel_futures=True)

        def on_accepted(frame: SentFrame) -> None:
            with self._lock:
                self.frames.append(frame)
            self._jobs[frame.name] = analysis.submit(avif_at_same_bytes, frame, avif, perceptual, out)
            self.say("camera", f"{frame.device_id} #{frame.sequence} {frame.source} "
                               f"{frame.image.shape[1]}x{frame.image.shape[0]} -> {len(frame.bitstream)} B "
                               f"({frame.bpp:.4f} bpp, encode {frame.encode_s * 1000:.0f} ms), queued")

        def on_ack(frame: SentFrame, entry: dict) -> None:
            if entry["status"] in FINAL_STATUSES and frame.final_ack is entry:
                with self._lock:
                    self._acked += 1
                    acked = self._acked
                self.say("delivery", f"{frame.device_id} #{frame.sequence} {entry['status']} after "
                                     f"{entry['t'] - frame.capture_time_us / 1e6:.1f} s "
                                     f"(acked {acked}/{total_planned})"
                                     + (f": {entry['reason']}" if entry["reason"] else ""))

        for device_id, shots in plan.items():
            camera_encoder = encoder if not self.cameras else EdgeEncoder.from_bundle(
                models_dir=models_dir / "edge" if args.models_dir else None, backend=args.backend)
            camera = DemoCamera(device_id, shots, url=urls[device_id], workdir=out / "edge", bpp=args.bpp,
                                fps=args.fps, encoder=camera_encoder, on_accepted=on_accepted, on_ack=on_ack)
            self.cameras.append(camera)
            stack.callback(camera.stop)
        self.say("camera", f"{len(self.cameras)} cameras, {args.bpp} bpp, {args.fps} frame/s each, "
                           f"{total_planned} frames in all")
        for camera in self.cameras:
            camera.start()

        # 5. wait until every accepted frame is acknowledged ------------------------------------------
        self._wait(cloud, broker, total_planned)
        with self._lock:
            frames = sorted(self.frames, key=lambda f: (f.device_id, f.sequence))
        stats = {c.device_id: c.agent.status() for c in self.cameras}
        link_stats = {d: dict(link.stats) for d, link in self.links.items()}
        # A clean stop (the last status says "offline, shutdown"); in parallel, each waits on its slow link.
        stoppers = [threading.Thread(target=c.stop, name=f"stop-{c.device_id}") for c in self.cameras]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join(60)
        with (out / "logs" / "link_events.json").open("w") as fh:
            json.dump({d: link.events for d, link in self.links.items()}, fh, indent=1, default=str)

        # 6. measure ----------------------------------------------------------------------------------
        if not args.keep_running:
            cloud.stop()
            self.say("cloud", "stopped")
        self.say("measure", f"AVIF at the same bytes and quality metrics for {len(frames)} frames ...")
        rows = measure_frames(frames, perceptual, out, avif_jobs=self._jobs, links=self.links, say=self.say)
        delivery = count_delivery(frames, stats, self.out / "cloud")
        report = {
            "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join([Path(sys.executable).name, "-m", "mridc.firmware_sim.demo", *sys.argv[1:]]),
            "out": str(out),
            "setup": {
                "machine": machine(), "transport": "MQTT 5 via mosquitto" if broker is not None else "gRPC",
                "transport_fallback": args.transport != transport, "link": link_info, "realism": args.realism,
                "seed": args.seed, "bpp": args.bpp, "fps": args.fps, "backend": args.backend,
                "models_dir": str(models_dir), "perceptual": perceptual_label,
                "avif": avif.label, "cameras": {d: [s.source for s in shots] for d, shots in plan.items()},
            },
            "processes": dict(self.pids),
            "delivery": delivery,
            "link": {"bytes_up": sum(s["bytes_up"] for s in link_stats.values()),
                     "bytes_down": sum(s["bytes_down"] for s in link_stats.values()), "per_camera": link_stats},
            "edge_status": stats,
            "frames": rows,
            "summary": summarise(rows),
            "elapsed_s": round(time.monotonic() - self.console.started, 1),
        }
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        write_markdown(report, out / "report.md")
        write_html(report, out / "index.html")
        self._endpoints = (broker, cloud, urls)
        return report

    def _wait(self, cloud: CloudService, broker, total_planned: int) -> None:
        deadline = time.monotonic() + self.args.timeout
        last_line = 0.0
        while True:
            capturing = any(c.capturing for c in self.cameras)
            with self._lock:
                accepted = len(self.frames)
                done = sum(1 for f in self.frames if f.final_ack)
            for camera in self.cameras:
                if camera.error:
                    raise DemoError(f"camera {camera.device_id} failed: {camera.error}")
            if not capturing and done == accepted:
                break
            if not cloud.alive:
                raise DemoError(f"the cloud service died (status {cloud.proc.returncode}):\n{cloud.log_tail()}")
            if broker is not None and not broker.running:
                raise DemoError(f"mosquitto died:\n{broker.log_tail()}")
            now = time.monotonic()
            if now > deadline:
                with self._lock:
                    missing = [f"{f.device_id} #{f.sequence}" for f in self.frames if not f.final_ack]
                raise DemoError(f"timed out after {self.args.timeout:.0f} s: {done}/{accepted} accepted frames "
                                f"acknowledged; waiting for {', '.join(missing) or 'capture to finish'}. "
                                f"See {self.out / 'logs'} (cloud.log, demo.log); raise --timeout on a slow machine.")
            if now - last_line > 10.0:
                queued = sum(len(c.agent.queue) for c in self.cameras)
                self.say("progress", f"acked {done}/{total_planned}, accepted {accepted}, in camera queues {queued}"
                                     + (", cameras still capturing" if capturing else ", cloud decoding"))
                last_line = now
            time.sleep(0.2)
        refused = [f"{c.device_id}: {r}" for c in self.cameras for r in c.refused]
        if refused:
            raise DemoError("frames were not accepted by the camera queues: " + "; ".join(refused))
        self.say("delivery", f"all {accepted} accepted frames acknowledged")

    def keep_running(self) -> None:
        broker, cloud, urls = self._endpoints
        print()
        print("--keep-running: the broker, the cloud service and the links stay up until Ctrl-C.")
        if broker is not None:
            print(f"  broker        {broker.url}   (mosquitto_sub -p {broker.port} -t '{all_topics_filter()}' -v)")
        else:
            print(f"  gRPC ingest   127.0.0.1:{cloud.ready['grpc_port']}")
        for device_id, url in urls.items():
            print(f"  {device_id:<13} link {url}   (mridc-edge run --device-id {device_id} --transport {url} ...)")
        print(f"  frames        mridc-cloud frames --out {self.out / 'cloud'}")
        while cloud.alive:
            time.sleep(1.0)
        raise DemoError(f"the cloud service exited (status {cloud.proc.returncode})")


# -- command line ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    profiles = "; ".join(f"{name}: {p.description}" if p else f"{name}: plain loopback"
                         for name, p in LINK_PROFILES.items())
    parser = argparse.ArgumentParser(
        prog="python -m mridc.firmware_sim.demo",
        description="MRIDC Edge end to end on this machine: simulated cameras encode sample frames at an extreme "
                    "low bitrate, send them through emulated low-bandwidth links to a local MQTT broker (or gRPC), "
                    "the cloud service decodes and stores them, and a report compares every reconstruction with "
                    "the original and with AVIF at the same number of bytes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=DEMO_DOC.split("\n\n", 2)[2],
    )
    parser.add_argument("--out", default="demo-out", metavar="DIR",
                        help="output folder; a previous demo output there is replaced (default demo-out)")
    parser.add_argument("--bpp", type=float, default=0.02, help="target bits per pixel for every camera (default 0.02)")
    parser.add_argument("--realism", type=float, default=DEFAULT_REALISM,
                        help=f"cloud decode realism, 0 (token completion + tokenizer decode, fastest) to 1 (full "
                             f"diffusion, slowest) (default {DEFAULT_REALISM})")
    parser.add_argument("--transport", choices=("mqtt", "grpc"), default="mqtt",
                        help="mqtt: cameras -> mosquitto -> cloud (falls back to grpc, with a message, when "
                             "mosquitto is not installed); grpc: cameras -> the cloud's gRPC ingest (default mqtt)")
    parser.add_argument("--link-profile", choices=list(LINK_PROFILES), default=DEFAULT_LINK,
                        help=f"the emulated link in front of each camera (default {DEFAULT_LINK}). {profiles}")
    parser.add_argument("--frames", type=int, default=6, metavar="N",
                        help="clip frames, spread over the 40-frame sample clip and dealt to two cameras (default 6)")
    parser.add_argument("--images", type=int, default=3, choices=range(len(SAMPLE_IMAGES) + 1), metavar="K",
                        help=f"sample photos for the photo camera, 0..{len(SAMPLE_IMAGES)} (default 3)")
    parser.add_argument("--fps", type=float, default=0.5,
                        help="frames per second each camera captures (0 = as fast as it encodes) (default 0.5)")
    parser.add_argument("--timeout", type=float, default=600.0, metavar="S",
                        help="give up when the frames are not all acknowledged after S seconds (default 600)")
    parser.add_argument("--keep-running", action="store_true",
                        help="after the report, keep the broker, links and cloud service up until Ctrl-C")
    parser.add_argument("--seed", type=int, default=0, help="decoder seed and link jitter seed (default 0)")
    parser.add_argument("--backend", choices=("onnx", "litert", "torch"), default="onnx",
                        help="edge encoder backend (default onnx)")
    parser.add_argument("--models-dir", metavar="DIR", help="models folder (default $MRIDC_MODELS or models/)")
    parser.add_argument("--no-perceptual", action="store_true",
                        help="skip the perceptual distance "
                             "(it needs MobileNetV2 ImageNet weights, see lab/perceptual.py)")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0 < args.bpp <= 1:
        parser.error("--bpp must be in (0, 1]")
    if not 0 <= args.realism <= 1:
        parser.error("--realism must be in [0, 1]")
    if not 0 <= args.frames <= 40:
        parser.error("--frames must be 0..40 (the sample clip has 40 frames)")
    if args.fps < 0 or args.timeout <= 0:
        parser.error("--fps must be >= 0 and --timeout > 0")


def _raise_interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    out = Path(args.out).resolve()
    try:
        prepare_out(out)
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return exc.exit_code
    logging.basicConfig(level=logging.INFO, filename=out / "logs" / "demo.log",
                        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C, kill and a closed terminal all end in the same cleanup (even where the shell that
        # started us in the background set SIGINT to "ignore").
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _raise_interrupt)
        signal.signal(signal.SIGHUP, _raise_interrupt)
    demo = Demo(args)
    try:
        with contextlib.ExitStack() as stack:
            report = demo.run(stack)
            if args.keep_running:
                print_summary(report)
                demo.keep_running()
            demo.say("cleanup", "stopping the links and the processes it started")
        demo.say("cleanup", "done: every process the demo started has stopped")
    except KeyboardInterrupt:
        print("\ndemo: interrupted; every process it started has been stopped", file=sys.stderr)
        return 130
    except DemoError as exc:
        print(f"\ndemo: FAILED: {exc}", file=sys.stderr)
        print(f"demo: logs in {out / 'logs'}; every process it started has been stopped", file=sys.stderr)
        return exc.exit_code
    if not args.keep_running:
        print_summary(report)
    problems = []
    d = report["delivery"]
    if not d["exactly_once"] or d["stored"] != d["accepted"]:
        problems.append(f"{d['stored']}/{d['accepted']} frames stored exactly once")
    if d["rejected"]:
        problems.append(f"{d['rejected']} frame(s) rejected by the cloud")
    if any(r["mridc"] is None for r in report["frames"]):
        problems.append("some frames have no reconstruction")
    if any(r["avif"] is None or "error" in r["avif"] and r["avif"].get("fits") is not False
           for r in report["frames"]):
        problems.append("the AVIF comparison failed for some frames (see report.json)")
    if problems:
        print(f"demo: FAILED: {'; '.join(problems)}", file=sys.stderr)
        return 1
    return 0

