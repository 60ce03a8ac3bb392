"""Scene adaptation: fine-tune the cloud's decoder to one fixed camera from a few calibration frames.

A camera bolted to a wall sees one scene for months, so the cloud can learn that scene's prior. Only the
decoder side moves: the tokenizer's decoder (a small subset of its weights, `AdaptConfig.part`). The edge
encoder, the codebook and the predictor stay frozen, so the device's streams and model id stay valid and
nothing changes on the camera.

Training pairs are made exactly as a live frame is decoded: each calibration image (and augmented copies of
it: crops, small shifts, exposure jitter) is encoded by the real edge encoder at the live byte budgets, its
masked tokens are filled by the cloud's own fill, and the decoder learns to map that completed latent to the
calibration image. The newest calibration frame is held out; an adapted set is only *accepted* when it
decodes the held-out frame better than the weights it would replace (`AdaptResult.accepted`).

The adapted weights are stored as a delta over the base decoder (the trained subset only, fp16) in the zoo's
checkpoint format (kind `decoder_adapter`), keyed by the base model id.
"""

from __future__ import annotations

import copy
import hashlib
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mridc.cloud.zoo import ModelFileError, load_checkpoint, save_checkpoint

ADAPTER_KIND = "decoder_adapter"
ADAPTER_FILE = "adapter.pt"
PARTS = ("norms", "tail", "all")


@dataclass
class AdaptConfig:
    minutes: float = 15.0  # wall-time budget of the optimisation (pair making is extra and reported)
    steps: int = 0  # 0 = no step limit
    bpps: tuple[float, ...] = (0.02, 0.03)  # live budgets the pairs are encoded at
    variants: int = 4  # augmented copies per calibration frame (the original is one of them)
    crop_tokens: int = 12  # training crops, in tokens per side
    batch: int = 4
    lr: float = 3e-4
    part: str = "tail"  # which decoder weights move: norms (+biases), tail (+ the last stages) or all
    tail_stages: int = 2
    eval_every: int = 50  # steps between held-out checks (the best state is kept, not the last)
    min_gain_db: float = 0.0  # accepted only if the held-out PSNR improves by more than this
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CalibrationPair:
    """One training example: the completed latent a live stream of the image decodes from, and the image."""

    latent: torch.Tensor  # (D, gh, gw) code vectors after the fill
    target: torch.Tensor  # (3, gh*stride, gw*stride) in [-1, 1]: the frame the encoder saw
    bpp: float
    nbytes: int


@dataclass
class AdaptResult:
    state: dict[str, torch.Tensor]  # the trained subset of the decoder's weights (best held-out step)
    base_psnr: float  # held-out PSNR (dB) of the weights it would replace
    adapted_psnr: float  # held-out PSNR of the adapted weights
    accepted: bool
    steps: int
    best_step: int
    train_seconds: float
    cpu_seconds: float
    history: list[dict] = field(default_factory=list)  # {"step", "seconds", "holdout_psnr"}

    @property
    def gain_db(self) -> float:
        return self.adapted_psnr - self.base_psnr


# ---- which weights move -------------------------------------------------------------------------------
def trainable_names(decoder: torch.nn.Module, part: str = "tail", tail_stages: int = 2) -> list[str]:
    """Names of the decoder parameters that adaptation trains.

    `norms`: every GroupNorm's scale and shift and every bias (a few thousand numbers: colour, contrast and
    texture statistics of the scene). `tail`: those plus every weight of the last `tail_stages` upsampling
    stages and the output layer, where a scene's fine texture is drawn (about 3-4 % of the decoder). `all`:
    everything (a full copy per device)."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    names = []
    n_stages = len(decoder.stages)
    tail = {f"stages.{i}." for i in range(max(0, n_stages - tail_stages), n_stages)}
    for name, param in decoder.named_parameters():
        small = name.endswith(".bias") or "norm" in name
        in_tail = any(name.startswith(t) for t in tail) or name.startswith(("conv_out.", "norm_out."))
        if part == "all" or small or (part == "tail" and in_tail):
            names.append(name)
    return names


# ---- training pairs -------------------------------------------------------------------------------------
def augment(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """A crop of 75-100 % of each side at a random place (small shifts included), and exposure/gamma jitter."""
    h, w = image.shape[:2]
    ch, cw = int(h * rng.uniform(0.75, 1.0)), int(w * rng.uniform(0.75, 1.0))
    y, x = rng.randint(0, h - ch), rng.randint(0, w - cw)
    crop = image[y:y + ch, x:x + cw].astype(np.float32) / 255.0
    gain, gamma = rng.uniform(0.85, 1.15), rng.uniform(0.9, 1.1)
    return (np.clip(crop * gain, 0, 1) ** gamma * 255.0 + 0.5).astype(np.uint8)


@torch.no_grad()
def calibration_pairs(images: Sequence[np.ndarray], encoder, decoder, bpps: Sequence[float], variants: int = 1,
                      seed: int = 0, progress: Callable[[int, int], None] | None = None) -> list[CalibrationPair]:
    """Each image (plus `variants - 1` augmented copies) encoded by the edge encoder at each budget, and
    completed by the decoder's default fill: the latents a live stream of that image decodes from."""
    from mridc.cloud.pipeline import DecodeSettings

    rng = random.Random(seed)
    settings = DecodeSettings(realism=0.0)
    pairs: list[CalibrationPair] = []
    total, done = len(images) * variants * len(bpps), 0
    for image in images:
        for v in range(variants):
            seen = image if v == 0 else augment(image, rng)
            for bpp in bpps:
                result = encoder.encode(seen, bpp=bpp)
                frame = result.token_frame
                completion = decoder.complete([frame], settings)
                target = encoder.input_frame(seen, (frame.grid_h, frame.grid_w))
                pairs.append(CalibrationPair(
                    latent=completion.latent[0].float().cpu(),
                    target=torch.from_numpy(target.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous(),
                    bpp=float(bpp), nbytes=len(result.bitstream)))
                done += 1
                if progress:
                    progress(done, total)
    return pairs


def _crop_batch(pairs: Sequence[CalibrationPair], batch: int, crop: int, stride: int,
                rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    side = min([crop] + [min(p.latent.shape[1:]) for p in pairs])
    latents, targets = [], []
    for _ in range(batch):
        p = pairs[rng.randrange(len(pairs))]
        gh, gw = p.latent.shape[1:]
        y, x = rng.randint(0, gh - side), rng.randint(0, gw - side)
        latents.append(p.latent[:, y:y + side, x:x + side])
        targets.append(p.target[:, y * stride:(y + side) * stride, x * stride:(x + side) * stride])
    return torch.stack(latents), torch.stack(targets)


@torch.no_grad()
def holdout_psnr(decoder: torch.nn.Module, pairs: Sequence[CalibrationPair]) -> float:
    """Mean PSNR (dB) of the decoder on whole held-out frames (each at each budget)."""
    was_training = decoder.training
    decoder.eval()
    scores = []
    for p in pairs:
        out = decoder(p.latent[None]).clamp(-1, 1)[0]
        mse = float(((out - p.target) / 2).pow(2).mean())
        scores.append(-10 * math.log10(max(mse, 1e-10)))
    decoder.train(was_training)
    return float(np.mean(scores)) if scores else float("nan")


# ---- the optimisation -------------------------------------------------------------------------------------
def adapt_decoder(base_decoder: torch.nn.Module, train: Sequence[CalibrationPair], holdout: Sequence[CalibrationPair],
                  cfg: AdaptConfig, stride: int, on_eval: Callable[[dict, dict], None] | None = None,
                  progress: bool = False, current: torch.nn.Module | None = None) -> AdaptResult:
    """Fine-tune a copy of `base_decoder` (never changed) on `train`; select on `holdout`.

    The result is accepted when it beats `current` (the weights in use: an earlier adaptation; default the
    base) on the held-out pairs by more than `cfg.min_gain_db`.
    `on_eval(record, state)` is called at every held-out check with the trained subset at that step (for the
    benchmark's quality-against-minutes curve). The budget is `cfg.minutes` of wall time and/or `cfg.steps`."""
    if not train:
        raise ValueError("adaptation needs at least one training pair")
    if not holdout:
        raise ValueError("adaptation needs at least one held-out pair to decide whether to keep the result")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model = copy.deepcopy(base_decoder).float().train()
    names = set(trainable_names(model, cfg.part, cfg.tail_stages))
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
        if name in names:
            params.append(param)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    base_psnr = holdout_psnr(current if current is not None else model, holdout)
    best_psnr, best_step = holdout_psnr(model, holdout) if current is not None else base_psnr, 0
    best_state = {n: t.detach().clone() for n, t in model.state_dict().items() if n in names}
    history = [{"step": 0, "seconds": 0.0, "holdout_psnr": base_psnr}]
    start, cpu_start = time.perf_counter(), time.process_time()
    budget = cfg.minutes * 60 if cfg.minutes > 0 else math.inf
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps or None, desc="adapt", unit="step")
    step = 0
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= budget or (cfg.steps and step >= cfg.steps):
            break
        latent, target = _crop_batch(train, cfg.batch, cfg.crop_tokens, stride, rng)
        out = model(latent)
        # L1 keeps edges; MSE is what PSNR scores.
        loss = F.l1_loss(out, target) + F.mse_loss(out, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.4f}", best=f"{best_psnr:.2f}")
        last = cfg.steps and step >= cfg.steps or time.perf_counter() - start >= budget
        if step % cfg.eval_every == 0 or last:
            score = holdout_psnr(model, holdout)
            record = {"step": step, "seconds": time.perf_counter() - start, "holdout_psnr": score}
            history.append(record)
            state = {n: t.detach().clone() for n, t in model.state_dict().items() if n in names}
            if score > best_psnr:
                best_psnr, best_step, best_state = score, step, state
            if on_eval is not None:
                on_eval(record, state)
    if bar is not None:
        bar.close()
    accepted = best_step > 0 and best_psnr - base_psnr > cfg.min_gain_db
    if best_step == 0:  # nothing beat the starting point: the result is the base itself
        best_psnr = max(best_psnr, history[0]["holdout_psnr"])
    return AdaptResult(state=best_state, base_psnr=base_psnr, adapted_psnr=best_psnr, accepted=accepted,
                       steps=step, best_step=best_step, train_seconds=time.perf_counter() - start,
                       cpu_seconds=time.process_time() - cpu_start, history=history)


# ---- adapter files and adapted decoders -------------------------------------------------------------------
def state_version(state: dict[str, torch.Tensor]) -> str:
    """A short content hash of an adapted set: its version id."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().half().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def save_adapter(path: Path, state: dict[str, torch.Tensor], meta: dict) -> dict:
    """Write an adapter file (fp16 delta of the trained subset); returns its meta (with `version`, `bytes`)."""
    meta = {**meta, "version": meta.get("version") or state_version(state)}
    save_checkpoint(Path(path), ADAPTER_KIND, state, meta=meta, half=True)
    meta["bytes"] = Path(path).stat().st_size
    return meta


def load_adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    blob = load_checkpoint(Path(path), ADAPTER_KIND)
    return blob["state_dict"], blob["meta"]


def adapted_tokenizer(tokenizer: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of `tokenizer` whose decoder carries the adapted subset (the original is not touched)."""
    own = dict(tokenizer.decoder.named_parameters())
    unknown = [n for n in state if n not in own]
    if unknown:
        raise ModelFileError(f"adapter names weights this decoder lacks: {unknown[:3]}")
    wrong = [n for n, t in state.items() if tuple(t.shape) != tuple(own[n].shape)]
    if wrong:
        raise ModelFileError(f"adapter weights of the wrong shape for this decoder: {wrong[:3]}")
    out = copy.deepcopy(tokenizer)
    out.decoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return out.eval()


def adapted_decoder(base, state: dict[str, torch.Tensor], meta: dict):
    """An MRIDCDecoder like `base` (same fills, refiner, prior, device, backend) decoding with the adapted
    tokenizer decoder. The adapter must have been made for `base`'s model id."""
    from mridc.cloud.pipeline import MRIDCDecoder

    model_id = meta.get("model_id")
    if model_id is not None and int(model_id) != base.model_id:
        raise ModelFileError(f"adapter is for model {int(model_id):08x}, this decoder is {base.model_id:08x}")
    tokenizer = adapted_tokenizer(base.tokenizer, state)
    decoder = MRIDCDecoder(tokenizer, base.fills, base.refiner, base.prior, base.device, base.max_frame_pixels)
    decoder.adapter_version = str(meta.get("version", ""))
    if base.backend != "torch":
        # only the latent decoder changed: swap it, keep the refiner and predictor runners as they are
        from mridc.cloud.accel import accelerate_latent_decoder

        decoder.latent_decoder = accelerate_latent_decoder(tokenizer.decoder, tokenizer.cfg.code_dim)
        decoder.backend = base.backend
    return decoder


# ---- a scene's models folder --------------------------------------------------------------------------------
SCENE_FILE = "adaptation.json"


def open_decoder(models_dir: str | Path | None = None, **options):
    """`MRIDCDecoder.from_models(models_dir, **options)`, or for a scene folder (one with adapter.pt, made by
    `mridc-cloud adapt`) its base models with the adapter applied."""
    from mridc.cloud.pipeline import MRIDCDecoder

    if models_dir is not None and (Path(models_dir) / ADAPTER_FILE).exists():
        base = MRIDCDecoder.from_models(base_models_of(Path(models_dir)), **options)
        return adapted_decoder(base, *load_adapter(Path(models_dir) / ADAPTER_FILE))
    return MRIDCDecoder.from_models(models_dir, **options)


def base_models_of(scene_dir: Path) -> Path:
    """The base models folder a scene folder adapts (recorded in its adaptation.json)."""
    import json

    from mridc.shared.zoo import default_models_dir

    info_path = Path(scene_dir) / SCENE_FILE
    if not info_path.exists():
        return default_models_dir()
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{info_path} is unreadable: {exc}") from exc
    base = Path(info.get("base_models") or default_models_dir())
    if (base / ADAPTER_FILE).exists():
        raise ModelFileError(f"{info_path}: its base {base} is itself an adapted folder")
    return base


@dataclass
class SceneAdaptation:
    """What `adapt_scene` did: the result, the adapter's meta, and the cost of making the pairs."""

    result: AdaptResult
    meta: dict
    pair_seconds: float
    train_frames: int
    holdout_frames: int


def adapt_scene(frames: Sequence[np.ndarray], encoder, decoder, cfg: AdaptConfig, *, holdout: int = 1,
                meta: dict | None = None, on_eval: Callable[[dict, dict], None] | None = None,
                progress: bool = False, current=None) -> SceneAdaptation:
    """Calibration frames (oldest first) -> an adapted decoder subset. The newest `holdout` frames are only
    used to decide; `decoder` is the base MRIDCDecoder whose tokenizer decoder is adapted (it is not changed),
    `current` the MRIDCDecoder in use for this scene if it differs (an earlier adaptation)."""
    if len(frames) < holdout + 1:
        raise ValueError(f"adaptation needs at least {holdout + 1} calibration frames "
                         f"({holdout} held out), got {len(frames)}")
    start = time.perf_counter()
    train = calibration_pairs(frames[:-holdout], encoder, decoder, cfg.bpps, cfg.variants, cfg.seed)
    held = calibration_pairs(frames[-holdout:], encoder, decoder, cfg.bpps, 1, cfg.seed + 1)
    pair_seconds = time.perf_counter() - start
    result = adapt_decoder(decoder.tokenizer.decoder, train, held, cfg, decoder.stride, on_eval, progress,
                           current=current.tokenizer.decoder if current is not None else None)
    info = {**(meta or {}), "model_id": int(decoder.model_id), "config": cfg.to_dict(),
            "frames": len(frames), "holdout_frames": holdout, "base_psnr": result.base_psnr,
            "adapted_psnr": result.adapted_psnr, "accepted": result.accepted, "steps": result.steps,
            "best_step": result.best_step, "train_seconds": result.train_seconds,
            "cpu_seconds": result.cpu_seconds, "pair_seconds": pair_seconds,
            "parameters": int(sum(t.numel() for t in result.state.values())),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    info["version"] = state_version(result.state)
    return SceneAdaptation(result, info, pair_seconds, len(frames) - holdout, holdout)


def write_scene_folder(out_dir: Path, adaptation: SceneAdaptation, base_models: Path) -> dict:
    """A models folder for the scene: adapter.pt and adaptation.json (naming the base models), which
    `mridc-cloud decode --models out_dir` decodes with. A result that was not accepted goes to
    out_dir/rejected/ instead, and whatever adapter the folder held stays in use."""
    import json

    out_dir = Path(out_dir)
    target = out_dir if adaptation.result.accepted else out_dir / "rejected"
    target.mkdir(parents=True, exist_ok=True)
    meta = save_adapter(target / ADAPTER_FILE, adaptation.result.state, adaptation.meta)
    info = {**meta, "base_models": str(Path(base_models).resolve()), "history": adaptation.result.history}
    tmp = target / (SCENE_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(target / SCENE_FILE)
    return info


def pick_frames(frames: Sequence, count: int) -> list:
    """`count` frames spread evenly over `frames`, in order, always including the first and the last."""
    if count <= 0 or len(frames) <= count:
        return list(frames)
    if count == 1:
        return [frames[-1]]
    idx = sorted({round(i * (len(frames) - 1) / (count - 1)) for i in range(count)})
    return [frames[i] for i in idx]
