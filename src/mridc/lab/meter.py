"""One place that measures a decoded image against its original, for every benchmark."""

from __future__ import annotations

import math

import numpy as np

STANDARD_PERCEPTUAL = ("lpips_alex", "lpips_vgg", "dists")  # = lpips.METRICS; None where weights are absent
ALL_METRICS = ("psnr", "ms_ssim", "perceptual", *STANDARD_PERCEPTUAL, "niqe", "roi")
ROI_KEYS = ("roi_psnr", "roi_psnr_mean", "roi_ms_ssim_mean", "outside_psnr", "roi_fraction")


class Meter:
    """PSNR, MS-SSIM, the perceptual distances, NIQE and inside/outside-box metrics, as selected by ``metrics``.

    The perceptual networks are loaded once here. With ``perceptual_required=False`` a machine without the
    MobileNetV2 weights still measures the rest: ``perceptual`` is None and ``perceptual_missing`` says why.
    The standard distances (``lpips_alex``, ``lpips_vgg``, ``dists``) are never required: where their weights
    are absent they are None and ``standard_missing[metric]`` says why.
    """

    def __init__(self, metrics=ALL_METRICS, perceptual_weights: str | None = None, *,
                 perceptual_required: bool = True, standard_weights: str | None = None, device: str = "cpu"):
        self.metrics = set(metrics)
        self.perceptual = None
        self.perceptual_name = None
        self.perceptual_missing = None
        self.standard = None
        self.standard_missing: dict[str, str] = {}
        wanted = [m for m in STANDARD_PERCEPTUAL if m in self.metrics]
        if wanted:
            try:
                from .lpips import StandardPerceptual

                self.standard = StandardPerceptual.load(device, standard_weights, metrics=wanted)
                self.standard_missing = dict(self.standard.missing)
            except ImportError as exc:
                self.standard_missing = {m: f"{type(exc).__name__}: {exc}" for m in wanted}
        if "perceptual" in self.metrics:
            try:
                from .perceptual import PerceptualDistance

                self.perceptual = PerceptualDistance(weights=perceptual_weights)
                self.perceptual_name = self.perceptual.name
            except (OSError, RuntimeError, ImportError) as exc:  # weights not on this machine
                if perceptual_required:
                    raise
                self.perceptual_missing = f"{type(exc).__name__}: {exc}"

    def standard_labels(self) -> dict[str, str]:
        """Per selected standard distance: its name, or "unavailable (reason)"."""
        from .lpips import LABELS

        return {m: (f"unavailable ({self.standard_missing[m]})" if m in self.standard_missing else LABELS[m])
                for m in STANDARD_PERCEPTUAL if m in self.metrics}

    @staticmethod
    def niqe(image: np.ndarray) -> float | None:
        """No-reference quality; None where the image is smaller than one 96-px block or the fit diverges."""
        from .niqe import niqe

        try:
            value = niqe(image)
        except ValueError:
            return None
        return value if math.isfinite(value) else None

    def measure(self, ref: np.ndarray, dec: np.ndarray, boxes=()) -> dict:
        """The selected metrics; ``perceptual`` is None where the network could not be loaded."""
        from . import metrics as m

        out: dict = {}
        if "psnr" in self.metrics:
            out["psnr"] = m.psnr(ref, dec)
        if "ms_ssim" in self.metrics:
            out["ms_ssim"] = m.ms_ssim(ref, dec)
        if "perceptual" in self.metrics:
            out["perceptual"] = self.perceptual(ref, dec) if self.perceptual is not None else None
        for metric in STANDARD_PERCEPTUAL:
            if metric in self.metrics:
                out[metric] = self.standard.distance(metric, ref, dec) if self.standard is not None else None
        if "niqe" in self.metrics:
            out["niqe"] = self.niqe(dec)
        if "roi" in self.metrics and boxes:
            roi = m.roi_metrics(ref, dec, boxes)
            out.update({k: roi[k] for k in ROI_KEYS})
        return out

    @staticmethod
    def boxes(ref: np.ndarray, dec: np.ndarray, boxes: list, prefix: str) -> dict:
        """PSNR and mean MS-SSIM inside ``boxes`` as ``{prefix}_psnr`` / ``{prefix}_ms_ssim`` (empty without boxes)."""
        from . import metrics as m

        if not boxes:
            return {}
        r = m.roi_metrics(ref, dec, boxes)
        return {f"{prefix}_psnr": r["roi_psnr"], f"{prefix}_ms_ssim": r["roi_ms_ssim_mean"]}
