"""mridc-edge: the camera side of MRIDC Edge (no torch needed).

Commands:
  encode   encode one image file to an MRD stream at a bit budget (--bpp) or keep ratio
  run      capture, encode, queue durably and send frames to the cloud over MQTT or gRPC
  info     show the installed edge bundle (model id, backends available)

Exit status: 0 success, 2 invalid input or arguments, 1 internal error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mridc.shared.cli_util import EXIT_OK, HelpFormatter, InvalidInput, run_command

PROG = "mridc-edge"


def _add_encode(sub) -> None:
    p = sub.add_parser("encode", help="encode one image to an .mrd stream", formatter_class=HelpFormatter,
                       description="Encode an image: VQ tokens, map-guided masking under the budget, entropy coding.\n"
                                   "Example: mridc-edge encode photo.jpg -o photo.mrd --bpp 0.02")
    p.add_argument("image", help="input image (PNG, JPEG, ...)")
    p.add_argument("-o", "--output", required=True, help="output .mrd file")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--bpp", type=float, help="byte budget in bits per pixel of the input; the stream (header, "
                                                "mask, tokens) is at most this and as close as token granularity allows")
    rate.add_argument("--keep-ratio", type=float, help="keep this fraction of tokens instead of a budget (0..1)")
    p.add_argument("--scale", default="auto", help="resolution scale: 1 = full, a factor such as 0.7, or 'auto' "
                                                "(with --bpp: lower resolution rather than masking most tokens)")
    p.add_argument("--backend", default="onnx", choices=["onnx", "onnx-fp32", "litert", "torch"],
                   help="encoder runtime: onnx = ONNX Runtime int8")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the encoder")
    p.add_argument("--faces", action="store_true", help="protect faces (Haar cascade) as key regions")
    p.add_argument("--roi", action="append", default=[], metavar="X0,Y0,X1,Y1",
                   help="a key region box in pixels (repeatable); its tokens are kept first")
    p.add_argument("--models", help="models folder (default: $MRIDC_MODELS or the repository's models/)")
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
        raise InvalidInput(f"--scale {text!r}: expected a number within 0.05..1 or 'auto'") from exc
    if not 0.05 <= value <= 1.0:
        raise InvalidInput(f"--scale must be within 0.05..1 or 'auto', got {text}")
    return value


def cmd_encode(args) -> int:
    from mridc.edge.encoder import EdgeEncoder, EncoderError, read_image

    if args.keep_ratio is not None and not 0.0 <= args.keep_ratio <= 1.0:
        raise InvalidInput(f"--keep-ratio must be within 0..1, got {args.keep_ratio}")
    if args.bpp is not None and not 0.0 < args.bpp <= 64:
        raise InvalidInput(f"--bpp must be within (0, 64], got {args.bpp}")
    image = read_image(args.image)
    try:
        encoder = EdgeEncoder(args.models, backend=args.backend, threads=args.threads, use_faces=args.faces)
    except EncoderError as exc:
        raise InvalidInput(str(exc)) from exc
    scale = args.scale if args.scale == "auto" else _parse_scale(args.scale)
    result = encoder.encode(image, bpp=args.bpp, keep_ratio=args.keep_ratio, rois=[_parse_roi(r) for r in args.roi],
                            scale=scale)
    out = Path(args.output)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(result.bitstream)
    tmp.replace(out)
    summary = {"input": args.image, "output": str(out), "width": image.shape[1], "height": image.shape[0],
               "backend": args.backend, **result.summary()}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{out}: {summary['bytes']} bytes, {summary['bpp']:.4f} bpp, kept {summary['kept_tokens']}/"
              f"{result.tokens.size} tokens ({summary['keep_ratio']:.0%}), encode {summary['timings_ms']['total']:.0f} ms")
    if result.warning:
        print(f"{PROG}: warning: {result.warning}", file=sys.stderr)
    return EXIT_OK


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show the edge bundle and which backends load", formatter_class=HelpFormatter)
    p.add_argument("--models", help="models folder")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from mridc.edge.encoder import BACKENDS, EdgeEncoder, EncoderError, load_bundle
    from mridc.shared.zoo import default_models_dir

    models = Path(args.models) if args.models else default_models_dir()
    try:
        manifest, _, _ = load_bundle(models)
    except EncoderError as exc:
        raise InvalidInput(str(exc)) from exc
    print(f"bundle {models / 'edge'}: model id {manifest['model_id_hex']}, stride {manifest['stride']}, "
          f"codebook {manifest['codebook_size']}")
    for backend in BACKENDS:
        try:
            EdgeEncoder(models, backend=backend)
            print(f"  {backend:10s} ok")
        except EncoderError as exc:
            print(f"  {backend:10s} unavailable: {exc}")
    return EXIT_OK


def _add_run(sub) -> None:
    from mridc.edge.agent import add_run_arguments, run_from_args

    p = sub.add_parser("run", help="capture, encode, queue and send frames", formatter_class=HelpFormatter,
                       description="The camera agent: frames from a camera, video or image folder are encoded, stored "
                                   "in a durable queue and sent over MQTT or gRPC until the cloud acknowledges them.")
    add_run_arguments(p)
    p.set_defaults(func=run_from_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
