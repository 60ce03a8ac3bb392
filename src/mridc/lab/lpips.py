"""Standard perceptual distances, offline: LPIPS v0.1 (AlexNet and VGG16 heads) and DISTS.

The ``lpips`` and ``DISTS-pytorch`` packages import torchvision (which does not import beside this project's
CPU torch) and download their backbones at run time, so the networks are written here in plain torch with
torchvision's parameter names and load converted weights from ``weights/lpips_dists/`` in the shared data
folder (``$MRIDC_LPIPS_DISTS_WEIGHTS`` overrides the folder):

- ``alexnet_features_torchvision_names+lpips_v0.1_lin.pth``: AlexNet ``features.*`` + ``lpips_lin0..4``;
- ``vgg16_features_torchvision_names+lpips_v0.1_lin.pth``: VGG16 ``features.*`` + ``lpips_lin0..4``;
- ``dists_alpha_beta.pt``: DISTS ``alpha``/``beta`` (1x1475x1x1); DISTS uses the VGG16 ``features.*`` above.

Preprocessing follows the original implementations:

- LPIPS (Zhang et al. 2018, ``lpips`` 0.1): input scaled to [-1, 1], ScalingLayer (shift
  [-.030, -.088, -.188], scale [.458, .448, .450]); at relu1..relu5 (Alex) or relu1_2..relu5_3 (VGG),
  features are unit-normalised over channels, squared differences weighted by the 1x1 linear heads,
  averaged over space; the five layer values are summed.
- DISTS (Ding et al. 2020, ``DISTS_pytorch`` 0.1): VGG16 with max-pooling replaced by L2 pooling (3x3
  Hann window, stride 2), ImageNet mean/std normalisation, the input image itself as stage 0; structure
  and texture terms per channel (c1 = c2 = 1e-6), weighted by alpha/beta normalised to sum 1;
  ``1 - sum``. DISTS does not resize here: its command-line helper shrinks inputs whose short side exceeds
  256 px, the metric itself does not.

Which metric shares a network with a training loss: LPIPS-VGG uses the VGG16 backbone a VGG LPIPS term in
a tokenizer's training loss would use, and DISTS uses the same VGG16 features, so both are not independent
of such a loss. LPIPS-Alex (AlexNet) and MNv2-LPIPS (MobileNetV2, ``perceptual.py``) share no network with it.

The first argument of every distance is the reference: its features are cached (one image per network),
so measuring many decodes of the same original runs the backbone once for it. Distances are symmetric.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mridc.shared.zoo import default_shared_data_dir

WEIGHTS_ENV = "MRIDC_LPIPS_DISTS_WEIGHTS"
ALEX_FILE = "alexnet_features_torchvision_names+lpips_v0.1_lin.pth"
VGG_FILE = "vgg16_features_torchvision_names+lpips_v0.1_lin.pth"
DISTS_FILE = "dists_alpha_beta.pt"
METRICS = ("lpips_alex", "lpips_vgg", "dists")  # the record keys (meter.STANDARD_PERCEPTUAL)
LABELS = {"lpips_alex": "LPIPS-Alex v0.1", "lpips_vgg": "LPIPS-VGG v0.1", "dists": "DISTS"}
# Whether each metric shares a backbone with a VGG LPIPS term that may be a tokenizer training loss.
SHARES_TRAINING_LOSS_NETWORK = {"lpips_alex": False, "lpips_vgg": True, "dists": True, "perceptual": False}

_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_DISTS_CHANNELS = (3, 64, 128, 256, 512, 512)
# torchvision ``features`` layouts: (index, module) with conv (in, out, kernel, stride, padding).
_ALEX_CONVS = {0: (3, 64, 11, 4, 2), 3: (64, 192, 5, 1, 2), 6: (192, 384, 3, 1, 1), 8: (384, 256, 3, 1, 1),
               10: (256, 256, 3, 1, 1)}
_ALEX_POOLS = (2, 5, 12)
_ALEX_TAPS = (1, 4, 7, 9, 11)  # relu1..relu5
_VGG_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
_VGG_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


def default_weights_dir() -> Path:
    """``$MRIDC_LPIPS_DISTS_WEIGHTS``, else ``weights/lpips_dists`` in the shared data folder."""
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env) if env else default_shared_data_dir() / "weights" / "lpips_dists"


def alexnet_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    for index in range(13):
        if index in _ALEX_CONVS:
            cin, cout, k, s, p = _ALEX_CONVS[index]
            layers.append(nn.Conv2d(cin, cout, k, s, p))
        elif index in _ALEX_POOLS:
            layers.append(nn.MaxPool2d(3, 2))
        else:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for v in _VGG_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(*layers)


class L2Pooling(nn.Module):
    """DISTS's L2 pooling: sqrt(hann3x3 * x^2), stride 2, padding 1, per channel."""

    def __init__(self, channels: int):
        super().__init__()
        a = np.hanning(5)[1:-1]
        g = torch.tensor(a[:, None] * a[None, :], dtype=torch.float32)
        self.register_buffer("filter", (g / g.sum())[None, None].repeat(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x * x, self.filter, stride=2, padding=1, groups=x.shape[1])
        return (out + 1e-12).sqrt()


def _split_state(state: dict) -> tuple[dict, list[torch.Tensor]]:
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    heads = [state[f"lpips_lin{i}.weight"] for i in range(5)]
    return features, heads


def _unit(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return f / (torch.sqrt(torch.sum(f * f, dim=1, keepdim=True)) + eps)


def _to_tensor01(image: np.ndarray, device: torch.device) -> torch.Tensor:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device).permute(2, 0, 1)[None] / 255.0


def _key(image: np.ndarray) -> tuple:
    array = np.ascontiguousarray(image)
    return array.shape, str(array.dtype), hashlib.blake2b(array.tobytes(), digest_size=16).digest()


class _Net:
    """One backbone with a one-image feature cache for the reference."""

    def __init__(self, stages: list[nn.Module], prepare, device: torch.device):
        self.stages = [s.to(device).eval() for s in stages]
        self.prepare = prepare
        self.device = device
        self._cache: tuple | None = None

    @torch.no_grad()
    def features(self, image: np.ndarray, cache: bool) -> list[torch.Tensor]:
        key = _key(image) if cache else None
        if cache and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        x = self.prepare(_to_tensor01(image, self.device))
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(self.post(x))
        if cache:
            self._cache = (key, feats)
        return feats

    @staticmethod
    def post(x: torch.Tensor) -> torch.Tensor:
        return x


class _LpipsNet(_Net):
    def __init__(self, features: nn.Sequential, taps: tuple[int, ...], heads: list[torch.Tensor], device):
        bounds = [0, *[t + 1 for t in taps]]
        stages = [features[a:b] for a, b in itertools.pairwise(bounds)]
        shift = torch.tensor(_LPIPS_SHIFT, device=device).view(1, 3, 1, 1)
        scale = torch.tensor(_LPIPS_SCALE, device=device).view(1, 3, 1, 1)
        super().__init__(stages, lambda x: ((x * 2 - 1) - shift) / scale, device)
        self.heads = [h.to(device) for h in heads]

    @staticmethod
    def post(x: torch.Tensor) -> torch.Tensor:
        return _unit(x)  # only the unit-normalised features are needed (and cached)

    @torch.no_grad()
    def distance(self, ref: np.ndarray, dec: np.ndarray) -> float:
        f0 = self.features(ref, cache=True)
        f1 = self.features(dec, cache=False)
        total = 0.0
        for a, b, head in zip(f0, f1, self.heads, strict=True):
            total += float(F.conv2d((a - b) ** 2, head).mean())
        return total


class _DistsNet(_Net):
    def __init__(self, features: nn.Sequential, alpha: torch.Tensor, beta: torch.Tensor, device):
        bounds = [(0, 4), (5, 9), (10, 16), (17, 23), (24, 30)]
        stages: list[nn.Module] = [nn.Identity()]
        for i, (a, b) in enumerate(bounds):
            body = list(features[a:b])
            stages.append(nn.Sequential(*body) if i == 0 else nn.Sequential(L2Pooling(_DISTS_CHANNELS[i]), *body))
        mean = torch.tensor(_IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD, device=device).view(1, 3, 1, 1)
        super().__init__(stages, lambda x: (x - mean) / std, device)
        self.input_stage = True
        w_sum = alpha.sum() + beta.sum()
        self.alpha = torch.split((alpha / w_sum).to(device), list(_DISTS_CHANNELS), dim=1)
        self.beta = torch.split((beta / w_sum).to(device), list(_DISTS_CHANNELS), dim=1)

    @torch.no_grad()
    def features(self, image: np.ndarray, cache: bool) -> list[torch.Tensor]:
        key = _key(image) if cache else None
        if cache and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        raw = _to_tensor01(image, self.device)
        x = self.prepare(raw)
        feats = [raw]  # stage 0 is the input image itself, in [0, 1] (as in DISTS)
        for stage in self.stages[1:]:
            x = stage(x)
            feats.append(x)
        if cache:
            self._cache = (key, feats)
        return feats

    @torch.no_grad()
    def distance(self, ref: np.ndarray, dec: np.ndarray) -> float:
        f0 = self.features(ref, cache=True)
        f1 = self.features(dec, cache=False)
        c1 = c2 = 1e-6
        dist1 = dist2 = 0.0
        for x, y, alpha, beta in zip(f0, f1, self.alpha, self.beta, strict=True):
            x_mean = x.mean([2, 3], keepdim=True)
            y_mean = y.mean([2, 3], keepdim=True)
            s1 = (2 * x_mean * y_mean + c1) / (x_mean ** 2 + y_mean ** 2 + c1)
            dist1 += float((alpha * s1).sum())
            x_var = ((x - x_mean) ** 2).mean([2, 3], keepdim=True)
            y_var = ((y - y_mean) ** 2).mean([2, 3], keepdim=True)
            xy_cov = (x * y).mean([2, 3], keepdim=True) - x_mean * y_mean
            s2 = (2 * xy_cov + c2) / (x_var + y_var + c2)
            dist2 += float((beta * s2).sum())
        return 1.0 - (dist1 + dist2)


class StandardPerceptual:
    """LPIPS-Alex, LPIPS-VGG and DISTS on HxWx3 uint8 images (lower is closer; 0 for identical images).

    ``StandardPerceptual.load(device)`` loads whichever networks have their weights; ``missing`` maps each
    metric that could not be loaded to the reason, and its method then returns None.
    """

    def __init__(self, nets: dict, missing: dict[str, str], weights_dir: Path):
        self._nets = nets
        self.missing = missing
        self.weights_dir = weights_dir

    @classmethod
    def load(cls, device: str | torch.device = "cpu", weights_dir: str | os.PathLike | None = None,
             metrics=METRICS) -> StandardPerceptual:
        device = torch.device(device)
        folder = Path(weights_dir) if weights_dir is not None else default_weights_dir()
        nets: dict = {}
        missing: dict[str, str] = {}
        wanted = set(metrics)

        def read(name: str):
            path = folder / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found (set ${WEIGHTS_ENV} to the lpips_dists weights folder)")
            return torch.load(path, map_location="cpu", weights_only=True)

        if "lpips_alex" in wanted:
            try:
                feats, heads = _split_state(read(ALEX_FILE))
                net = alexnet_features()
                net.load_state_dict(feats, strict=True)
                nets["lpips_alex"] = _LpipsNet(net, _ALEX_TAPS, heads, device)
            except (OSError, RuntimeError, KeyError) as exc:
                missing["lpips_alex"] = f"{type(exc).__name__}: {exc}"
        if wanted & {"lpips_vgg", "dists"}:
            try:
                feats, heads = _split_state(read(VGG_FILE))
                vgg = vgg16_features()
                vgg.load_state_dict(feats, strict=True)
            except (OSError, RuntimeError, KeyError) as exc:
                vgg = None
                for m in wanted & {"lpips_vgg", "dists"}:
                    missing[m] = f"{type(exc).__name__}: {exc}"
            if vgg is not None and "lpips_vgg" in wanted:
                nets["lpips_vgg"] = _LpipsNet(vgg, _VGG_TAPS, heads, device)
            if vgg is not None and "dists" in wanted:
                try:
                    ab = read(DISTS_FILE)
                    nets["dists"] = _DistsNet(vgg, ab["alpha"], ab["beta"], device)
                except (OSError, RuntimeError, KeyError) as exc:
                    missing["dists"] = f"{type(exc).__name__}: {exc}"
        return cls(nets, missing, folder)

    @property
    def available(self) -> tuple[str, ...]:
        return tuple(m for m in METRICS if m in self._nets)

    def distance(self, metric: str, ref: np.ndarray, dec: np.ndarray) -> float | None:
        if np.shape(ref) != np.shape(dec):
            raise ValueError(f"shape mismatch: {np.shape(ref)} vs {np.shape(dec)}")
        net = self._nets.get(metric)
        return None if net is None else net.distance(ref, dec)

    def lpips_alex(self, ref: np.ndarray, dec: np.ndarray) -> float | None:
        return self.distance("lpips_alex", ref, dec)

    def lpips_vgg(self, ref: np.ndarray, dec: np.ndarray) -> float | None:
        return self.distance("lpips_vgg", ref, dec)

    def dists(self, ref: np.ndarray, dec: np.ndarray) -> float | None:
        return self.distance("dists", ref, dec)

    def measure(self, ref: np.ndarray, dec: np.ndarray, metrics=METRICS) -> dict[str, float | None]:
        return {m: self.distance(m, ref, dec) for m in metrics}
