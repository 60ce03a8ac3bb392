"""VQ tokenizer: a light int8-friendly encoder (runs on the camera), an L2-normalised codebook, and a
larger decoder (runs in the cloud).

The encoder uses plain convolutions and ReLU only, no normalisation layers, so that it quantises cleanly to
int8 (ONNX Runtime QDQ, LiteRT PT2E). The codebook lookup is cosine nearest-neighbour on L2-normalised
vectors (factorised codes, as in ViT-VQGAN): it keeps codebook usage high and is cheap to run in numpy on
the device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TokenizerConfig:
    encoder_widths: tuple[int, ...] = (32, 64, 128, 256)  # one stride-2 stage each: stride = 2**len
    encoder_bottleneck_blocks: int = 2
    code_dim: int = 32
    codebook_size: int = 1024
    decoder_widths: tuple[int, ...] = (256, 192, 128, 64, 32)  # first at token resolution
    decoder_blocks: tuple[int, ...] = (2, 2, 1, 1, 1)
    commitment: float = 0.25
    # 0: the codebook learns by gradient. >0: it is the EMA decay of a spherical k-means update (the code is the
    # normalised running mean of the encoder outputs assigned to it), which keeps far more codes alive.
    codebook_ema: float = 0.0

    @property
    def stride(self) -> int:
        return 2 ** len(self.encoder_widths)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TokenizerConfig:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**fields)


def tiny_tokenizer_config() -> TokenizerConfig:
    """A very small configuration for tests (builds in milliseconds, same structure)."""
    return TokenizerConfig(
        encoder_widths=(8, 8, 16, 16), encoder_bottleneck_blocks=1, code_dim=8, codebook_size=64,
        decoder_widths=(16, 16, 8, 8, 8), decoder_blocks=(1, 1, 1, 1, 1),
    )


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 -> 1x1 residual block with ReLU; cheap at the token resolution."""

    def __init__(self, channels: int):
        super().__init__()
        mid = max(channels // 4, 8)
        self.reduce = nn.Conv2d(channels, mid, 1)
        self.conv = nn.Conv2d(mid, mid, 3, padding=1)
        self.expand = nn.Conv2d(mid, channels, 1)

    def forward(self, x):
        h = F.relu(self.reduce(x))
        h = F.relu(self.conv(h))
        return F.relu(x + self.expand(h))


class Encoder(nn.Module):
    """Image in [-1, 1] (N,3,H,W), H and W multiples of the stride -> L2-normalised code vectors."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for width in cfg.encoder_widths:
            layers += [nn.Conv2d(in_ch, width, 3, stride=2, padding=1), nn.ReLU()]
            in_ch = width
        layers += [BottleneckBlock(in_ch) for _ in range(cfg.encoder_bottleneck_blocks)]
        layers.append(nn.Conv2d(in_ch, cfg.code_dim, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return F.normalize(self.net(x), dim=1)


class VectorQuantizer(nn.Module):
    """Cosine nearest-neighbour codebook with dead-code restarts from recent encoder outputs."""

    def __init__(self, codebook_size: int, code_dim: int, commitment: float, ema_decay: float = 0.0):
        super().__init__()
        self.ema_decay = ema_decay
        self.codebook = nn.Parameter(F.normalize(torch.randn(codebook_size, code_dim), dim=1),
                                     requires_grad=ema_decay == 0.0)
        self.commitment = commitment
        self.register_buffer("usage", torch.zeros(codebook_size))
        if ema_decay > 0:  # only then, so checkpoints of gradient codebooks load unchanged
            self.register_buffer("ema_sum", self.codebook.detach().clone())
            self.register_buffer("ema_count", torch.ones(codebook_size))
            self.register_buffer("data_initialised", torch.zeros((), dtype=torch.bool))

    def normalized_codebook(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=1)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """z: (N,D,h,w) normalised -> (N,h,w) int64."""
        cb = self.normalized_codebook()
        sim = torch.einsum("ndhw,kd->nkhw", z, cb)
        return sim.argmax(dim=1)

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """(N,h,w) indices -> (N,D,h,w) code vectors."""
        return self.normalized_codebook()[idx].permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor):
        if self.training and self.ema_decay > 0 and not bool(self.data_initialised):
            self._init_from_data(z.detach())
        idx = self.indices(z.detach())
        if self.training:
            with torch.no_grad():
                counts = torch.bincount(idx.flatten(), minlength=self.usage.numel()).float()
                self.usage.mul_(0.99).add_(counts, alpha=0.01)
                if self.ema_decay > 0:
                    self._ema_update(z.detach(), idx, counts)
        zq = self.lookup(idx)
        commit_loss = F.mse_loss(z, zq.detach())
        codebook_loss = F.mse_loss(zq, z.detach()) if self.ema_decay == 0 else torch.zeros((), device=z.device)
        zq_st = z + (zq - z).detach()  # straight-through
        return zq_st, idx, codebook_loss + self.commitment * commit_loss

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor, threshold: float = 1e-3) -> int:
        """Replace codes unused lately by random encoder outputs of the current batch."""
        dead = (self.usage < threshold).nonzero().flatten()
        if dead.numel() == 0:
            return 0
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        pick = torch.randint(0, flat.shape[0], (dead.numel(),), device=z.device)
        self.codebook.data[dead] = F.normalize(flat[pick].float(), dim=1)
        self.usage[dead] = 1.0 / self.usage.numel()
        if self.ema_decay > 0:
            self.ema_sum[dead] = self.codebook.data[dead]
            self.ema_count[dead] = 1.0
        return int(dead.numel())

    @torch.no_grad()
    def _init_from_data(self, z: torch.Tensor) -> None:
        # Random codes all land on the few directions a fresh encoder emits; start from its outputs instead.
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
        pick = torch.randint(0, flat.shape[0], (self.codebook.shape[0],), device=z.device)
        codes = F.normalize(flat[pick] + 0.01 * torch.randn_like(flat[pick]), dim=1)
        self.codebook.data.copy_(codes)
        self.ema_sum.copy_(codes)
        self.ema_count.fill_(1.0)
        self.data_initialised.fill_(True)

    @torch.no_grad()
    def _ema_update(self, z: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> None:
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
        sums = torch.zeros_like(self.ema_sum).index_add_(0, idx.flatten(), flat)
        self.ema_count.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
        self.ema_sum.mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)
        # Codes that got nothing keep their direction: the normalised running sum only shrinks.
        self.codebook.data.copy_(F.normalize(self.ema_sum, dim=1))


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(32, channels // 4), channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(min(32, channels // 4), channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class Decoder(nn.Module):
    """Code vectors (N,D,h,w) -> image in [-1, 1] (N,3,h*stride,w*stride)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        widths, blocks = cfg.decoder_widths, cfg.decoder_blocks
        assert len(widths) == len(blocks) == len(cfg.encoder_widths) + 1
        self.conv_in = nn.Conv2d(cfg.code_dim, widths[0], 3, padding=1)
        stages: list[nn.Module] = []
        for i, (width, n_blocks) in enumerate(zip(widths, blocks)):
            stage: list[nn.Module] = []
            if i > 0:
                stage += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(widths[i - 1], width, 3, padding=1)]
            stage += [ResBlock(width) for _ in range(n_blocks)]
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.norm_out = nn.GroupNorm(min(32, widths[-1] // 4), widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 3, 3, padding=1)

    def forward(self, zq):
        h = self.stages(self.conv_in(zq))
        return self.conv_out(F.silu(self.norm_out(h)))

    @property
    def last_layer_weight(self) -> torch.Tensor:
        return self.conv_out.weight


@dataclass
class TokenizerOutput:
    reconstruction: torch.Tensor
    indices: torch.Tensor
    vq_loss: torch.Tensor
    z: torch.Tensor = field(repr=False)


class VQTokenizer(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.code_dim, cfg.commitment, cfg.codebook_ema)
        self.decoder = Decoder(cfg)

    def forward(self, x: torch.Tensor) -> TokenizerOutput:
        z = self.encoder(x)
        zq, idx, vq_loss = self.quantizer(z)
        return TokenizerOutput(self.decoder(zq), idx, vq_loss, z)

    @torch.no_grad()
    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer.indices(self.encoder(x))

    @torch.no_grad()
    def decode_indices(self, idx: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.quantizer.lookup(idx))
