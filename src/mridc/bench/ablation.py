"""``mridc-bench ablation``: the MLM and BPCG ablations of the paper, on the shipped models.

Two parts, each in its own module, sharing one set of images, one encoder/decoder pair and one meter:

- ``ablation_mlm``: map-guided masking vs uniform random vs a fixed checkerboard-like (ordered dither)
  pattern, and anchors on/off, each rate-controlled to the same byte budget with the same ``pack``,
  decoded by the same decoder (realism 0, default fill);
- ``ablation_bpcg``: token prediction accuracy on masked tokens, the decoder ablation at equal bits
  (nearest fill / prediction only / prediction + diffusion), the perception-distortion curve of the realism
  knob, decode time per stage with peak memory, and side-by-side figures with AVIF at the same bits.

The default image set is the public eval set used in ``docs/results/ablation``: the four ``*_by_*`` photos
and astronaut, chelsea, coffee and rocket from ``photos/eval`` (larger ones centre-cropped to 3:2 and
resized to 768x512, or 512x768 for portrait; smaller ones kept), plus four evaluation frames (500-794) of
``camera/vtest.avi``. ``--images`` takes sets, folders, image files or videos instead (``mridc.lab.datasets``).

Key regions: faces (``detect_faces``, grown by the encoder's face margin) on photos, pedestrians
(``detect_bodies``, the body cascade) on video frames. They are given to the encoder as ROIs, so the boxes
the map protects are the boxes the ROI metrics measure. Video frames also carry motion boxes (every moving
person, from a background model), measured separately as ``ped_*``.

Writes ``OUT/ablation.json`` (everything, per image), ``OUT/summary.md`` (tables) and ``OUT/figures/``.
``OUT/README.md`` is left alone (it holds the human-written findings).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mridc.lab.meter import Meter as LabMeter
from mridc.lab.provenance import machine, package_versions, peak_rss_mib, write_json_atomic

from . import ablation_bpcg, ablation_mlm
from .ablation_common import finite, fit_frame

HELP = "MLM and BPCG ablations (masking policies, token prediction, realism knob, decode stages)"

DEFAULT_OUT = "docs/results/ablation"
DEFAULT_PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket")  # plus every *_by_* photo
PARTS = {"mlm": ablation_mlm, "bpcg": ablation_bpcg}  # each has run(ctx) and render_markdown(result)
# The versions that move the ablation numbers: the decoder runtime, the metrics.
ABLATION_PACKAGES = ("torch", "numpy", "onnxruntime", "pillow", "pytorch-msssim", "scipy")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--part", choices=("all", "mlm", "bpcg", "timing"), default="all",
                   help="which ablation to run ('timing': only the decode-stage timing, into an existing bpcg result)")
    p.add_argument("--images", nargs="*", default=["default"],
                   help="'default' (the set above), or sets/folders/files/videos as for `mridc-bench rd`")
    p.add_argument("--vtest-frames", type=int, default=4, help="vtest evaluation frames in the default set")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--mlm-bpp", default="0.015,0.02,0.03", help="MLM ablation rates (bits per original pixel)")
    p.add_argument("--mlm-seeds", type=int, default=1, help="random masks per image and rate (averaged)")
    p.add_argument("--mlm-fill", default="bpcg", help="decoder fill for the MLM ablation (bpcg, nearest, ...)")
    p.add_argument("--bpcg-bpp", default="0.02,0.03", help="rates of the decoder ablation at equal bits")
    p.add_argument("--keep-ratios", default="0.75,0.5,0.3", help="keep ratios of the token accuracy test")
    p.add_argument("--curve", default="0,0.25,0.5,0.75,1", help="realism values of the perception-distortion curve")
    p.add_argument("--curve-bpp", default="0.02", help="rates at which the whole curve is measured")
    p.add_argument("--maskgit-accuracy", action="store_true",
                   help="also score the iterative MaskGIT fill in the token test (8 predictor passes per mask)")
    p.add_argument("--avif-table", action="store_true",
                   help="also encode every image with AVIF at each decoder-ablation rate (slow: ~8 s each)")
    p.add_argument("--timing-repeats", type=int, default=2, help="decode-stage timing repeats (0: skip timing)")
    p.add_argument("--no-figures", action="store_true", help="skip the figures (and their AVIF encodes)")
    p.add_argument("--figure-bpp", type=float, default=0.02, help="rate of the side-by-side figures")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the timing always uses 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models-dir", default=None, help="models folder (default: shipped / $MRIDC_MODELS)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder")


# ---- images -----------------------------------------------------------------------------------------
@dataclass
class AblationImage:
    name: str
    set: str  # "photos" | "vtest" | the set name of user images
    image: np.ndarray  # HxWx3 uint8
    source: str
    redistributable: bool
    key_kind: str  # "faces" | "bodies"
    key_boxes: list[list[int]] = field(default_factory=list)  # what the encoder protects and ROI metrics measure
    motion_boxes: list[list[int]] = field(default_factory=list)  # every moving person (video frames)

    @property
    def pixels(self) -> int:
        return int(self.image.shape[0] * self.image.shape[1])

    @property
    def rois(self) -> list[dict]:
        return [{"box": list(b)} for b in self.key_boxes]

    def meta(self) -> dict:
        return {"name": self.name, "set": self.set, "source": self.source,
                "size": [int(self.image.shape[1]), int(self.image.shape[0])], "key_kind": self.key_kind,
                "key_boxes": self.key_boxes, "motion_boxes": self.motion_boxes,
                "redistributable": self.redistributable}


def _int_boxes(boxes, height: int, width: int) -> list[list[int]]:
    out = []
    for b in boxes:
        x0, y0, x1, y1 = (float(v) for v in (b if isinstance(b, (list, tuple)) else (b.x0, b.y0, b.x1, b.y1)))
        x0, y0 = max(0, math.floor(x0)), max(0, math.floor(y0))
        x1, y1 = min(width, math.ceil(x1)), min(height, math.ceil(y1))
        if x1 > x0 and y1 > y0:
            out.append([x0, y0, x1, y1])
    return out


def key_boxes(image: np.ndarray, kind: str) -> list[list[int]]:
    from mridc.edge import keyregions as kr

    h, w = image.shape[:2]
    if kind == "faces":
        return _int_boxes([b.expanded(kr.FACE_MARGIN) for b in kr.detect_faces(image)], h, w)
    return _int_boxes(kr.detect_bodies(image), h, w)


def default_images(vtest_frames: int = 4) -> list[AblationImage]:
    from mridc.lab import datasets as ds

    folder = ds.data_root() / "photos" / "eval"
    if not folder.is_dir():
        raise FileNotFoundError(f"eval photos not found at {folder} (set ${ds.DATA_ENV})")
    paths = sorted(p for p in folder.iterdir() if "_by_" in p.stem and p.suffix.lower() in ds.IMAGE_SUFFIXES)
    paths += [p for name in DEFAULT_PHOTO_NAMES for p in sorted(folder.glob(name + ".*"))]
    out = [_photo(p.stem, ds.load_rgb(p), str(p), "photos", True) for p in paths]
    if vtest_frames > 0:
        lo, hi = ds.VTEST_EVAL_RANGE
        stride = max(1, (hi - 1 - lo) // max(1, vtest_frames - 1))
        for item in ds.vtest(stride=stride)[:vtest_frames]:
            out.append(_frame(item.name.split("/")[-1], item.image, item.source, "vtest", item.boxes))
    return out


def _photo(name: str, rgb: np.ndarray, source: str, set_name: str, redistributable: bool) -> AblationImage:
    image = fit_frame(rgb)
    return AblationImage(f"{set_name}/{name}", set_name, image, source, redistributable, "faces",
                         key_boxes(image, "faces"))


def _frame(name: str, rgb: np.ndarray, source: str, set_name: str, motion: list) -> AblationImage:
    return AblationImage(f"{set_name}/{name}", set_name, rgb, source, False, "bodies", key_boxes(rgb, "bodies"),
                         _int_boxes(motion, rgb.shape[0], rgb.shape[1]))


def load_images(specs: list[str], vtest_frames: int, limit: int | None) -> list[AblationImage]:
    from mridc.lab import datasets as ds

    images: list[AblationImage] = []
    for spec in specs:
        if spec == "default":
            images += default_images(vtest_frames)
            continue
        for item in ds.resolve([spec], max_side=0):
            if "#frame=" in item.source:
                images.append(_frame(item.name.split("/")[-1], item.image, item.source, item.set, item.boxes))
            else:
                images.append(_photo(item.name.split("/")[-1], item.image, item.source, item.set,
                                     item.redistributable))
    return images[:limit] if limit else images


# ---- measurements -----------------------------------------------------------------------------------
class Meter(LabMeter):
    """The lab meter (perceptual distance optional), per ablation image: whole frame and its key/pedestrian boxes."""

    def __init__(self):
        super().__init__(("psnr", "ms_ssim", "perceptual"), perceptual_required=False)

    def measure_image(self, item: AblationImage, dec: np.ndarray, niqe: bool = False) -> dict:
        out = self.measure(item.image, dec)
        if niqe:
            out["niqe"] = self.niqe(dec)
        out.update(self.boxes(item.image, dec, item.key_boxes, "key"))
        out.update(self.boxes(item.image, dec, item.motion_boxes, "ped"))
        return out


@dataclass
class Context:
    """What both parts share: images, encoders by masking config, the decoder, the meter, options."""

    images: list[AblationImage]
    decoder: object  # mridc.cloud.pipeline.MRIDCDecoder
    meter: Meter
    args: argparse.Namespace
    models_dir: str | None
    out: Path
    _encoders: dict = field(default_factory=dict)

    def encoder(self, anchor_spacing: int | None = None):
        """The edge encoder (ONNX int8, one thread); ``anchor_spacing`` overrides the default masking."""
        from mridc.edge import mlm
        from mridc.edge.encoder import EdgeEncoder

        if anchor_spacing not in self._encoders:
            masking = (mlm.MaskingConfig() if anchor_spacing is None
                       else mlm.MaskingConfig(anchor_spacing=anchor_spacing))
            self._encoders[anchor_spacing] = EdgeEncoder.from_bundle(self.models_dir, backend="onnx", threads=1,
                                                                     masking=masking)
        return self._encoders[anchor_spacing]

    def decode_many(self, stream: bytes, variants: list[tuple[str, float]], seed: int = 0, steps: int = 8) -> dict:
        """Real bytes -> {(fill, realism): (image, seconds per stage)}.

        Each fill completes the tokens and runs the tokenizer decoder once; every realism of that fill
        refines the same decode with the decoder's own stages, so the pixels are what ``decode`` gives."""
        from mridc.cloud.pipeline import DecodeSettings

        decoder = self.decoder
        frame = decoder.validate(stream)
        by_fill: dict[str, list[float]] = {}
        for fill, realism in variants:
            by_fill.setdefault(fill, []).append(realism)
        out = {}
        for fill, realisms in by_fill.items():
            t0 = time.perf_counter()
            completion = decoder.complete([frame], DecodeSettings(seed=seed, steps=steps, fill=fill))
            t1 = time.perf_counter()
            base = decoder.decode_latent(completion.latent)
            t2 = time.perf_counter()
            for realism in realisms:
                t3 = time.perf_counter()
                image = decoder.refine(base, completion.trust,
                                       DecodeSettings(realism=realism, seed=seed, steps=steps, fill=fill))
                t4 = time.perf_counter()
                out[(fill, realism)] = (decoder.to_images(image, [frame])[0],
                                        {"tokens_s": t1 - t0, "tokenizer_s": t2 - t1, "diffusion_s": t4 - t3})
        return out

    def decode(self, stream: bytes, **settings):
        """Real bytes -> (image, DecodeOutput); settings as ``DecodeSettings`` fields."""
        from mridc.cloud.pipeline import DecodeSettings

        frame = self.decoder.validate(stream)
        out = self.decoder.decode_frames([frame], DecodeSettings(**settings))[0]
        return out.image, out


# ---- the subcommand ----------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    try:
        from mridc.cloud.pipeline import MRIDCDecoder

        decoder = MRIDCDecoder.from_models(models_dir=args.models_dir, device="cpu")
    except Exception as exc:  # noqa: BLE001 - no models, no numbers: say why
        print(f"mridc-bench ablation: models not loadable ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 1
    images = load_images(args.images, args.vtest_frames, args.limit)
    if not images:
        print("mridc-bench ablation: no images", file=sys.stderr)
        return 1
    meter = Meter()
    ctx = Context(images, decoder, meter, args, args.models_dir, out)
    meta = {
        "command": command_line(args),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(with_load=True),
        "versions": package_versions(ABLATION_PACKAGES),
        "torch_threads": torch.get_num_threads(),
        "model_id": f"{decoder.model_id:08x}",
        "perceptual": meter.perceptual_name or f"unavailable ({meter.perceptual_missing})",
        "images": [im.meta() for im in images],
        "bits": "len(stream) * 8 per original pixel; every stream is real MRD bytes, parsed back by the decoder",
    }
    print(f"ablation: {len(images)} images -> {out}", file=sys.stderr)
    result: dict = {"meta": meta}
    if args.part == "timing":
        path = out / "ablation.json"
        previous = json.loads(path.read_text()) if path.exists() else {}
        if "bpcg" not in previous:
            print(f"mridc-bench ablation --part timing: no bpcg result in {path} yet", file=sys.stderr)
            return 1
        result = {**previous, "meta": {**previous.get("meta", {}), "timing_command": meta["command"]}}
        result["bpcg"]["timing"] = finite(ablation_bpcg.timing(ctx))
        result["bpcg"]["timing_run"] = {"command": meta["command"], "date": meta["date"], "machine": meta["machine"]}
        _write(out, result, ("mlm", "bpcg"))
        return 0
    parts = {"all": ("mlm", "bpcg"), "mlm": ("mlm",), "bpcg": ("bpcg",)}[args.part]
    for part, module in PARTS.items():
        if part not in parts:
            continue
        t0 = time.perf_counter()
        result[part] = module.run(ctx)
        result[part]["run"] = {"command": meta["command"], "date": meta["date"], "machine": meta["machine"],
                               "torch_threads": meta["torch_threads"], "wall_s": round(time.perf_counter() - t0, 1)}
        _write(out, result, parts)
    meta["wall_s"] = {"total_s": round(time.perf_counter() - t_start, 1)}
    meta["peak_rss_mb_benchmark_process"] = round(peak_rss_mib(), 1)
    _write(out, result, parts)
    print(f"ablation: done in {meta['wall_s']['total_s']:.0f} s; {out / 'summary.md'}", file=sys.stderr)
    return 0


def command_line(args: argparse.Namespace) -> str:
    """The `mridc-bench ablation ...` line that reproduces ``args`` (options that differ from the defaults)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    words = ["mridc-bench", "ablation"]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            words.append(flag)
        elif isinstance(value, list):
            words += [flag, *map(str, value)]
        else:
            words += [flag, str(value)]
    return " ".join(words)


def _write(out: Path, result: dict, parts: tuple[str, ...] = ("mlm", "bpcg")) -> None:
    """Write this run's parts; a part this run does not measure keeps its numbers from the file."""
    path = out / "ablation.json"
    if path.exists():
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = {}
        for part in PARTS:
            if part not in parts and part in previous:
                result[part] = previous[part]
    write_json_atomic(path, finite(result), newline=True)
    meta = result["meta"]
    header = ("# MRIDC ablations: tables\n\nWritten by `mridc-bench ablation` (the command of each part is under "
              f"its tables) on {meta['machine']}; wall times on a shared machine are approximate. "
              f"Perceptual distance: {meta['perceptual']} (ranks methods on the same images; not LPIPS). "
              "Findings: README.md.\n")
    texts = [header]
    for part, module in PARTS.items():
        if part in result:
            texts.append(module.render_markdown(result[part]))
            run = result[part].get("run")
            if run:
                texts.append(f"_{part}: `{run['command']}`, {run['date']}, {run['torch_threads']} torch thread(s), "
                             f"wall {run['wall_s']} s (approximate, shared machine)._\n")
    (out / "summary.md").write_text("\n".join(texts))


if __name__ == "__main__":
    from .cli import main

    sys.exit(main(["ablation", *sys.argv[1:]]))
