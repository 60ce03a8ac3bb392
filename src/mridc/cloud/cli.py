"""mridc-cloud: the cloud side of MRIDC Edge.

Commands:
  decode    reconstruct an image from an .mrd stream (BPCG token completion + diffusion)
  inspect   print an .mrd stream's header and section sizes (no models needed)
  serve     run the ingest/decoder service (MQTT shared subscription and/or gRPC)
  frames    list decoded frames stored by the service
  adapt     fine-tune the decoder to one fixed camera's scene from calibration frames
  train     train the tokenizer, predictor or diffusion model (or all: a session)
  export    build the edge bundle (ONNX fp32/int8, codebook, token prior) from the tokenizer
  data      build the training corpus (train/val, deduplicated, with a provenance manifest)

Exit status: 0 success, 2 invalid input or arguments, 1 internal error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mridc.cloud.defaults import DEFAULT_BACKEND, DEFAULT_REFINE_REALISM, DEFAULT_REFINE_STEPS
from mridc.shared.cli_util import EXIT_OK, HelpFormatter, InvalidInput, run_command
from mridc.shared.zoo import default_models_dir, default_shared_data_dir

PROG = "mridc-cloud"
MAX_STREAM_BYTES = 16 * 1024 * 1024


def _read_stream(path: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise InvalidInput(f"no such file: {path}")
    size = p.stat().st_size
    if size > MAX_STREAM_BYTES:
        raise InvalidInput(f"{path} is {size} bytes; MRD streams are at most {MAX_STREAM_BYTES} bytes")
    return p.read_bytes()


def cmd_inspect(args) -> int:
    from mridc.shared.bitstream import inspect

    info = inspect(_read_stream(args.stream))
    if args.json:
        print(json.dumps(info))
        return EXIT_OK
    for key, value in info.items():
        if key == "sections":
            for s in value:
                print(f"  section {s['name']:<12} offset {s['offset']:>5}  {s['bytes']:>6} bytes")
        else:
            print(f"{key:>16}: {value}")
    return EXIT_OK


def cmd_decode(args) -> int:
    from PIL import Image

    from mridc.cloud.pipeline import FILLS, DecodeSettings

    if not 0.0 <= args.realism <= 1.0:
        raise InvalidInput(f"--realism must be within 0..1, got {args.realism}")
    if args.fill not in FILLS:
        raise InvalidInput(f"--fill must be one of {FILLS}")
    if args.steps is not None and not 1 <= args.steps <= 1000:
        raise InvalidInput("--steps must be within 1..1000")
    if Path(args.stream).is_dir():
        return _decode_sequence(args)
    data = _read_stream(args.stream)
    decoder = _open_decoder(args)
    t0 = time.perf_counter()
    slices_info = None
    from mridc.shared.slices import decompress_slices, is_sliced_file, unpack_slices

    if is_sliced_file(data):  # a sliced file: decode whatever slices are left, missing rows masked
        from mridc.shared.bitstream import BitstreamError

        try:
            slices = unpack_slices(data)
            dropped = set(args.drop_slices or ())
            sliced = decompress_slices([x for i, x in enumerate(slices) if i not in dropped], decoder.prior,
                                       model_id=decoder.model_id)
        except BitstreamError as exc:
            raise InvalidInput(f"{args.stream}: {exc}") from exc
        frame = sliced.frame
        decoder.check_size(frame)
        slices_info = {"slices": len(slices), "used": sliced.slices_used, "dropped": sorted(dropped),
                       "rows_missing": int((~sliced.rows_present).sum()), "rejected": sliced.rejected}
    else:
        if args.drop_slices:
            raise InvalidInput("--drop-slices needs a sliced file (mridc-edge encode --slice-bytes N)")
        frame = decoder.validate(data)
    settings = DecodeSettings(realism=args.realism, seed=args.seed, fill=args.fill,
                              steps=args.steps or DEFAULT_REFINE_STEPS)
    out = decoder.decode_frames([frame], settings)[0]
    elapsed = time.perf_counter() - t0
    path = Path(args.output)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(out.image).save(tmp)
    tmp.replace(path)
    summary = {"input": args.stream, "output": str(path), "width": frame.width, "height": frame.height,
               "bytes": len(data), "bpp": len(data) * 8 / (frame.width * frame.height),
               "kept_tokens": int(frame.keep_mask.sum()), "tokens": int(frame.keep_mask.size),
               "realism": args.realism, "seed": args.seed, "fill": args.fill, "backend": decoder.backend,
               "steps": settings.steps, "seconds": round(elapsed, 3),
               **({"sliced": slices_info} if slices_info else {}),
               "timings_s": {k: round(v, 3) for k, v in out.timings.items()}}
    print(json.dumps(summary) if args.json else
          f"{path}: {frame.width}x{frame.height} from {len(data)} bytes ({summary['bpp']:.4f} bpp), "
          f"realism {args.realism}, {elapsed:.2f} s")
    return EXIT_OK


def _open_decoder(args):
    """The MRIDC decoder `decode` asks for (--models, --device, --backend, --threads); a bad models folder is
    invalid input."""
    import torch

    from mridc.cloud.adapt import open_decoder
    from mridc.cloud.zoo import ModelFileError

    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # a scene folder (mridc-cloud adapt) decodes with its adapter
        return open_decoder(args.models, device=args.device, backend=args.backend)
    except ModelFileError as exc:
        raise InvalidInput(str(exc)) from exc


def _decode_sequence(args) -> int:
    """`mridc-cloud decode DIR -o OUTDIR`: every NNNNNN.mrd of a sequence, in order, to NNNNNN.png; an inter
    frame is decoded against the frames before it (mridc.cloud.sequence)."""
    from PIL import Image

    from mridc.cloud.pipeline import DecodeSettings
    from mridc.cloud.sequence import NeedIntra, SequenceFrames
    from mridc.shared.bitstream import BitstreamError

    streams = sorted(Path(args.stream).glob("*.mrd"))
    if not streams:
        raise InvalidInput(f"{args.stream}: no .mrd files")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"{out} exists and is not a folder (a sequence decodes into -o OUTDIR)")
    out.mkdir(parents=True, exist_ok=True)
    decoder = _open_decoder(args)
    frames = SequenceFrames(decoder.prior, model_id=decoder.model_id)
    settings = DecodeSettings(realism=args.realism, seed=args.seed, fill=args.fill,
                              steps=args.steps or DEFAULT_REFINE_STEPS)
    done = []
    for path in streams:
        try:
            number = int(path.stem)
        except ValueError:
            raise InvalidInput(f"{path}: sequence files are named NNNNNN.mrd") from None
        try:
            frame = frames.token_frame(path.read_bytes(), "sequence", number)
        except (BitstreamError, NeedIntra) as exc:
            raise InvalidInput(f"{path}: {exc}") from exc
        decoder.check_size(frame)
        image = decoder.decode_frames([frame], settings)[0].image
        target = out / f"{path.stem}.png"
        tmp = target.with_name(target.name + ".tmp.png")
        Image.fromarray(image).save(tmp)
        tmp.replace(target)
        done.append(target.name)
    print(json.dumps({"input": args.stream, "output": str(out), "frames": len(done)}) if args.json else
          f"{out}: {len(done)} frames decoded")
    return EXIT_OK


def cmd_adapt(args) -> int:
    """`mridc-cloud adapt IMAGES_OR_VIDEO... --out DIR`: a models folder adapted to the scene."""
    import torch

    from mridc.cloud.adapt import AdaptConfig, adapt_scene, open_decoder, pick_frames, write_scene_folder
    from mridc.cloud.pipeline import MRIDCDecoder
    from mridc.cloud.zoo import ModelFileError
    from mridc.edge.capture import CaptureError, open_source
    from mridc.edge.encoder import EdgeEncoder

    if args.minutes <= 0 and args.steps <= 0:
        raise InvalidInput("give a budget: --minutes > 0 or --steps > 0")
    if args.threads < 1:
        raise InvalidInput("--threads must be at least 1")
    if not 2 <= args.max_frames <= 1000:
        raise InvalidInput("--max-frames must be within 2..1000 (one frame is held out to decide)")
    try:
        bpps = tuple(float(b) for b in args.bpp.split(",") if b.strip())
    except ValueError:
        raise InvalidInput(f"--bpp takes comma-separated budgets, got {args.bpp!r}") from None
    if not bpps or not all(0 < b <= 1 for b in bpps):
        raise InvalidInput("--bpp budgets must be within (0, 1]")
    try:
        scale = args.scale if args.scale == "auto" else float(args.scale)
    except ValueError:
        raise InvalidInput(f"--scale takes auto or a factor, got {args.scale!r}") from None
    torch.set_num_threads(args.threads)
    frames = []
    try:
        for uri in args.inputs:
            for index, captured in enumerate(open_source(uri, fps=0)):
                if index % args.every == 0:
                    frames.append(captured.image)
    except CaptureError as exc:
        raise InvalidInput(str(exc)) from exc
    frames = pick_frames(frames, args.max_frames)
    if len(frames) < 2:
        raise InvalidInput(f"adaptation needs at least 2 calibration frames (one is held out), got {len(frames)}")
    base_dir = Path(args.models) if args.models else default_models_dir()
    out = Path(args.out)
    try:
        decoder = MRIDCDecoder.from_models(base_dir, with_diffusion=False)
        encoder = EdgeEncoder.from_bundle(models_dir=base_dir, backend="onnx", scale=scale)
        current = open_decoder(out, with_diffusion=False) if (out / "adapter.pt").exists() else None
    except ModelFileError as exc:
        raise InvalidInput(str(exc)) from exc
    cfg = AdaptConfig(minutes=args.minutes, steps=args.steps, bpps=bpps, part=args.part, seed=args.seed)
    print(f"adapting to {len(frames)} frames ({len(frames) - 1} for training, the newest held out), "
          f"{args.minutes:g} min on {args.threads} threads", file=sys.stderr)
    adaptation = adapt_scene(frames, encoder, decoder, cfg, meta={"inputs": list(args.inputs)},
                             progress=not args.json, current=current)
    info = write_scene_folder(out, adaptation, base_dir)
    r = adaptation.result
    summary = {"out": str(out), "accepted": r.accepted, "version": info["version"], "frames": len(frames),
               "held_out_psnr_before": round(r.base_psnr, 3), "held_out_psnr_after": round(r.adapted_psnr, 3),
               "steps": r.steps, "cpu_seconds": round(r.cpu_seconds, 1), "adapter_bytes": info["bytes"]}
    if args.json:
        print(json.dumps(summary))
    else:
        verdict = "accepted" if r.accepted else "NOT accepted (kept in rejected/; the folder's decoder is unchanged)"
        print(f"{out}: {verdict}: held-out frame {r.base_psnr:.2f} -> {r.adapted_psnr:.2f} dB after {r.steps} steps "
              f"({r.cpu_seconds / 60:.1f} CPU min), adapter {info['bytes'] / 1e3:.0f} kB, version {info['version']}")
    return EXIT_OK if r.accepted else 3


def cmd_train(args) -> int:
    module = {"tokenizer": "mridc.cloud.train.tokenizer", "predictor": "mridc.cloud.train.predictor",
              "diffusion": "mridc.cloud.train.diffusion", "all": "mridc.cloud.train.session"}[args.model]
    import importlib

    return importlib.import_module(module).main(args.rest) or EXIT_OK


def cmd_export(args) -> int:
    from mridc.cloud.export import build_edge_bundle

    build_edge_bundle(Path(args.tokenizer), Path(args.out), Path(args.shared_data), args.calib,
                      calib_method=args.calib_method)
    return EXIT_OK


def cmd_data(args) -> int:
    from mridc.cloud.corpus import DEFAULT_PACKAGES, build_corpus

    packages = list(args.install_packages or DEFAULT_PACKAGES) if args.install_packages is not None else []
    manifest = build_corpus(Path(args.out), Path(args.shared_data) if args.shared_data else None,
                            folders=[Path(f) for f in args.from_], packages=packages, install=bool(packages),
                            max_side=args.max_side, val_percent=args.val_percent, video_every=args.video_every,
                            include_shared=not args.no_shared, progress=not args.json,
                            log=(lambda m: print(m, file=sys.stderr)) if args.json else print)
    if args.json:
        print(json.dumps({"out": args.out, **manifest["counts"]}))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("decode", help="decode an .mrd stream to a PNG", formatter_class=HelpFormatter,
                       description="Decode: kept tokens -> BPCG completion of masked tokens -> tokenizer decode -> "
                                   "diffusion refinement. --realism 0 is the deterministic tokenizer decode "
                                   "(fidelity), 1 full diffusion (realism).\n"
                                   "Example: mridc-cloud decode photo.mrd -o photo.png --realism 0.5")
    p.add_argument("stream", help="input .mrd file, or a folder of NNNNNN.mrd frames (mridc-edge encode VIDEO -o DIR)")
    p.add_argument("-o", "--output", required=True, help="output PNG (a folder for a sequence: NNNNNN.png)")
    p.add_argument("--realism", type=float, default=DEFAULT_REFINE_REALISM,
                   help="0 = fidelity (no diffusion) .. 1 = full diffusion (default: the service's refined picture)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same pixels")
    p.add_argument("--steps", type=int, help=f"diffusion DDIM steps at realism 1 (default {DEFAULT_REFINE_STEPS}: "
                   "one step at realism 0.5)")
    p.add_argument("--backend", default=DEFAULT_BACKEND, choices=("auto", "torch", "onnxruntime"),
                   help="auto: ONNX Runtime on a CPU (about 2x faster, the same picture up to float rounding)")
    p.add_argument("--fill", default="bpcg", help="masked-token completion: bpcg, maskgit, nearest, mode "
                                                  "(mridc.cloud.pipeline.FILLS)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--models", help="models folder (default: $MRIDC_MODELS or the repository's models/)")
    p.add_argument("--drop-slices", type=lambda t: [int(x) for x in t.split(",") if x], metavar="I,J",
                   help="with a sliced file: leave these slices out (0-based), as a lossy link would; their "
                        "token rows are masked and completed")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("inspect", help="print an .mrd stream's header and section sizes", formatter_class=HelpFormatter)
    p.add_argument("stream")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    from mridc.cloud.service.cli import add_frames_arguments, add_serve_arguments, run_frames, run_serve

    p = sub.add_parser("serve", help="run the ingest/decoder service", formatter_class=HelpFormatter,
                       description="Ingest frames from devices over MQTT (shared subscription) and/or gRPC, validate, "
                                   "dedupe, decode, store PNG + JSON sidecars, ack. See docs/deploy-cloud.md.")
    add_serve_arguments(p)
    p.set_defaults(func=run_serve)
    p = sub.add_parser("frames", help="list stored frames", formatter_class=HelpFormatter)
    add_frames_arguments(p)
    p.set_defaults(func=run_frames)

    p = sub.add_parser("adapt", help="fine-tune the decoder to one fixed camera's scene (a models folder)",
                       formatter_class=HelpFormatter,
                       description="Scene adaptation for a fixed camera: the calibration frames are encoded the way "
                                   "the camera encodes live frames (--bpp), and a small part of the cloud's decoder "
                                   "is fine-tuned to decode them. The encoder and codebook do not change, so the "
                                   "camera's streams stay valid. The newest frame is held out: the result is kept "
                                   "only if it decodes that frame better than the folder's current decoder "
                                   "(exit 3 otherwise; it is then written to OUT/rejected/). See "
                                   "docs/adaptation.md.\n"
                                   "Example: mridc-cloud adapt lobby.mp4 --out models-lobby --minutes 15 --threads 2\n"
                                   "         mridc-cloud decode frame.mrd -o frame.png --models models-lobby")
    p.add_argument("inputs", nargs="+", metavar="IMAGES_OR_VIDEO",
                   help="calibration frames: image files, image folders or video files (oldest first)")
    p.add_argument("--out", required=True, help="the scene's models folder to write (adapter.pt, adaptation.json)")
    p.add_argument("--minutes", type=float, default=15.0, help="optimisation budget in wall-clock minutes")
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0 = no step limit)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--max-frames", type=int, default=20, help="calibration frames used, spread over the inputs")
    p.add_argument("--every", type=int, default=1, help="take every K-th frame of the inputs")
    p.add_argument("--bpp", default="0.02,0.03", help="the live budgets the camera encodes at, comma-separated")
    p.add_argument("--scale", default="auto", help="the camera's encoder scale setting (auto, or a factor)")
    p.add_argument("--part", default="tail", choices=("norms", "tail", "all"),
                   help="decoder weights that move: norms (~20 kB), tail (default) or all (a full copy)")
    p.add_argument("--models", help="base models folder (default: $MRIDC_MODELS or the repository's models/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print a JSON summary (no progress bar)")
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("train",
                       help="train a model (arguments after the model name go to its trainer; see --help there)",
                       description="mridc-cloud train {tokenizer,predictor,diffusion,all} [trainer options]\n"
                                   "e.g. mridc-cloud train tokenizer --out runs/tok --minutes 60\n"
                                   "     mridc-cloud train all --tokenizer-minutes 90 --bpcg-minutes 60",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=["tokenizer", "predictor", "diffusion", "all"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options for the trainer")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="build models/edge from models/tokenizer.pt",
                       description="Build the edge bundle (ONNX fp32 + int8, codebook, token prior, manifest).")
    p.add_argument("--tokenizer", default=str(default_models_dir() / "tokenizer.pt"), help="tokenizer weights")
    p.add_argument("--out", default=str(default_models_dir() / "edge"), help="bundle folder to write")
    p.add_argument("--shared-data", default=str(default_shared_data_dir()), help="training data (calibration, prior)")
    # 24: what the shipped bundle used (rebuilt with 24, encoder_int8.onnx is byte-identical to the shipped one)
    p.add_argument("--calib", type=int, default=24, help="training crops that calibrate the int8 encoder")
    p.add_argument("--calib-method", default="minmax", choices=("minmax", "percentile", "entropy"),
                   help="int8 activation ranges: minmax (moving average; made the shipped bundle), percentile "
                        "(99.999) or entropy")
    p.set_defaults(func=cmd_export)

    from mridc.cloud.corpus import (
        DEFAULT_MAX_SIDE,
        DEFAULT_VAL_PERCENT,
        DEFAULT_VIDEO_EVERY,
        PACKAGES,
        RESERVED_PACKAGES,
        default_corpus_dir,
    )

    p = sub.add_parser("data", help="build the training corpus (deduplicated, train/val, provenance manifest)",
                       formatter_class=HelpFormatter,
                       description="Gather the shared data folder's training photos, every Nth vtest frame 0-489, "
                                   "your own folders (--from) and optionally Debian photo packages; drop exact and "
                                   "near duplicates and evaluation images; split train/val by content hash; write "
                                   "PNG/JPEG/WebP with manifest.json (source, licence, size, sha256 of each file). "
                                   "Re-running skips what is done. Training uses the corpus when "
                                   "$MRIDC_CORPUS or data/corpus holds one. See docs/data.md.\n"
                                   f"Never used (reserved for independent evaluation): {', '.join(RESERVED_PACKAGES)}."
                                   "\nExample: mridc-cloud data --out data/corpus --from ~/photos")
    p.add_argument("--out", default=str(default_corpus_dir()), help="corpus folder to write")
    p.add_argument("--from", dest="from_", action="append", default=[], metavar="FOLDER",
                   help="also take the images in FOLDER (recursive; licence from LICENSE/credits files beside them); "
                        "repeatable")
    p.add_argument("--install-packages", nargs="*", metavar="PACKAGE",
                   help=f"apt-get install (as root) and take photos from Debian packages: {', '.join(PACKAGES)} "
                        "(all of them when none is named)")
    p.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE, help="longest side written (larger: resized)")
    p.add_argument("--val-percent", type=float, default=DEFAULT_VAL_PERCENT, help="share of images in val/")
    p.add_argument("--video-every", type=int, default=DEFAULT_VIDEO_EVERY, help="take every Nth vtest frame 0-489")
    p.add_argument("--shared-data", default=str(default_shared_data_dir()), help="the shared data folder")
    p.add_argument("--no-shared", action="store_true", help="only --from folders and packages (eval images are "
                                                            "still recognised from --shared-data)")
    p.add_argument("--json", action="store_true", help="print the counts as JSON (no progress bar)")
    p.set_defaults(func=cmd_data)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(args.func, args, PROG)


if __name__ == "__main__":
    sys.exit(main())
