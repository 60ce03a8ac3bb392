"""The one training loop of the cloud models; a task (tokenizer, predictor, diffusion) supplies the rest.

A task builds its models and optimizers, draws a batch from the data streams, takes one training step on it,
evaluates a model (metrics with a `score`: higher is better) and hands over its state for resume. The trainer
owns everything else:

* the budget in steps and/or minutes (`Budget`);
* bf16 autocast on CUDA only (`StepContext.autocast`) and gradient clipping (`StepContext.optimize`);
* an optional EMA of the weights (`TrainerConfig.ema`); when on, the EMA weights are the ones evaluated and
  shipped, as the diffusion model does (0.999);
* periodic evaluation; the best-scoring weights, not the last, are written to `best.pt` through
  `mridc.cloud.zoo` (the one model-file format);
* exact resume from `last.pt`: task state (models, optimizers), EMA, step, best score, elapsed time, the
  python/numpy/torch RNGs and the data streams (crops, masks), so a resumed run computes the same losses as an
  uninterrupted one. Files written before this trainer existed (the per-trainer layouts) are read too;
* a JSONL log (`log.jsonl`) and a tqdm progress bar.

Resume format (`RESUME_FORMAT` 2): the task's own keys (tokenizer: model, disc, opt_g, opt_d, gan_start_step;
predictor and diffusion: model, opt) beside the trainer's: step, best_score, elapsed, rng, data_rng
({"python", "torch"}), ema (when on), format, task. The tokenizer's keys are the ones its trainer always wrote,
so older tokenizer files differ only in `data_rng` (the python state alone).
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mridc.cloud.train.common import Budget, JsonlLog, pick_device, rng_state, seed_everything, set_rng_state
from mridc.cloud.zoo import atomic_save, save_model

RESUME_FORMAT = 2


@dataclass
class TrainerConfig:
    out: str  # run folder: last.pt (resume), best.pt, log.jsonl
    steps: int = 20000  # optimizer steps (0 = no step limit)
    minutes: float = 0.0  # wall-time budget (0 = none); stops at whichever comes first
    eval_every: int = 500  # steps between evaluations (and last.pt saves)
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast, on CUDA only
    clip_grad: float = 1.0  # max gradient norm for StepContext.optimize(clip=True); 0 = off
    ema: float = 0.0  # EMA decay of the evaluated/shipped weights; 0 = off
    tf32: bool = False  # TF32 matmuls and cudnn autotuning on CUDA
    log_every: int = 100  # log training losses every n steps ...
    log_seconds: float = 10.0  # ... or after this many seconds
    progress: bool = True  # tqdm bar


class DataStreams:
    """The random streams a task draws its batches from: `rng` (crops) and `gen` (masks, noise, timesteps)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def state(self) -> dict:
        return {"python": self.rng.getstate(), "torch": self.gen.get_state()}

    def load(self, state) -> None:
        """The current layout, the predictor's/diffusion's old (python, torch) pair or the tokenizer's old python
        state alone."""
        if state is None:
            return
        if isinstance(state, Mapping):
            py, gen = state.get("python"), state.get("torch")
        elif len(state) == 2 and isinstance(state[1], torch.Tensor):
            py, gen = state
        else:
            py, gen = state, None
        if py is not None:
            self.rng.setstate(tuple(py))
        if gen is not None:
            self.gen.set_state(gen.cpu())


class EMA:
    """An exponential moving average of a model's state (floating tensors averaged, the others copied)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model)
        for param in self.model.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        src = model.state_dict()
        for key, avg in self.model.state_dict().items():
            value = src[key]
            if value.is_floating_point():
                avg.mul_(self.decay).add_(value, alpha=1 - self.decay)
            else:
                avg.copy_(value)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


class StepContext:
    """What a task's `train_step` gets from the trainer: the step, the budget progress, AMP and the optimizer
    step with the trainer's gradient clipping."""

    def __init__(self, device: torch.device, amp: bool, clip_grad: float):
        self.device = device
        self.amp = amp
        self.clip_grad = clip_grad
        self.step = 0
        self.progress = 0.0

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def optimize(self, loss: torch.Tensor, opt: torch.optim.Optimizer,
                 params: Iterable[torch.nn.Parameter] | None = None, clip: bool = True) -> None:
        """zero_grad, backward, clip (over `params`, default the optimizer's), step."""
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip and self.clip_grad > 0:
            if params is None:
                params = [p for group in opt.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
        opt.step()


class TrainTask:
    """The part of training that differs per model. Subclasses set `name` (the model kind, the bar's label) and
    `model` (in `build`: the model that is evaluated, EMA'd and shipped)."""

    name: str = "task"
    model: torch.nn.Module
    opt: torch.optim.Optimizer  # the one optimizer of a single-model task (the default resume state below)
    postfix_keys: tuple[str, ...] = ("loss",)

    def build(self, device: torch.device, resuming: bool) -> None:
        """Models and optimizers (and starting weights unless `resuming`), in a fixed order: it draws from the
        seeded torch RNG, which a resume then overwrites."""
        raise NotImplementedError

    def prepare_data(self, device: torch.device) -> None:
        """Training sources and the fixed validation set (random streams of their own, not the seeded ones)."""

    def sample(self, streams: DataStreams) -> Any:
        raise NotImplementedError

    def train_step(self, batch: Any, ctx: StepContext) -> dict:
        """One step on `batch`; the values to log (tensors or numbers)."""
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, step: int) -> dict:
        """Validation metrics of `model`, with `score` (higher is better) for best-checkpoint selection."""
        raise NotImplementedError

    def save_best(self, path: Path, model: torch.nn.Module, meta: dict) -> None:
        save_model(path, self.name, model, meta, half=False)  # fp32: best.pt is resumed from and shipped later

    def best_meta(self, step: int, metrics: dict) -> dict:
        return {"step": step, "val": metrics}

    def state_dict(self) -> dict:
        """Resume state: models, optimizers and whatever the task carries between steps (default: `model`, `opt`)."""
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])

    def evaluate_initial(self) -> bool:
        """Whether the starting weights are a best.pt candidate (e.g. fine-tuning shipped weights)."""
        return False

    def after_checkpoint(self, run_dir: Path) -> None:
        """Called after each last.pt save (e.g. the tokenizer writes its discriminator)."""

    def describe(self, metrics: dict) -> str:
        return " ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))

    def config_dict(self) -> dict:
        cfg = getattr(self, "cfg", None)
        return asdict(cfg) if cfg is not None else {}


def upgrade_resume_state(ck: dict) -> dict:
    """A last.pt of any layout this code has written, in the current one (data_rng is read by DataStreams)."""
    if ck.get("format", 1) >= RESUME_FORMAT:
        return ck
    ck = dict(ck)
    if "best_score" not in ck:  # the predictor kept its best top-1 as "best"; the diffusion trainer none
        ck["best_score"] = ck.pop("best", -math.inf)
    ck.setdefault("elapsed", 0.0)
    ck["format"] = RESUME_FORMAT
    return ck


def _scalar(value) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


class Trainer:
    def __init__(self, cfg: TrainerConfig, task: TrainTask):
        self.cfg = cfg
        self.task = task
        self.run_dir = Path(cfg.out)
        self.step = 0
        self.best_score = -math.inf
        self.ema: EMA | None = None

    def eval_model(self) -> torch.nn.Module:
        return self.ema.model if self.ema is not None else self.task.model

    def run(self) -> Path:
        cfg, task = self.cfg, self.task
        device = pick_device(cfg.device)
        seed_everything(cfg.seed)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log = JsonlLog(self.run_dir / "log.jsonl")
        if device.type == "cuda" and cfg.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True

        resume = self.run_dir / "last.pt"
        ck = upgrade_resume_state(torch.load(resume, map_location=device, weights_only=False)) \
            if resume.exists() else None
        task.build(device, resuming=ck is not None)
        self.ema = EMA(task.model, cfg.ema) if cfg.ema > 0 else None
        budget = Budget(cfg.steps, cfg.minutes)
        streams = DataStreams(cfg.seed)
        if ck is not None:
            task.load_state_dict(ck)
            if self.ema is not None and ck.get("ema") is not None:
                self.ema.load_state_dict(ck["ema"])
            self.step, self.best_score = ck["step"], ck["best_score"]
            budget.elapsed_before = ck["elapsed"]
            set_rng_state(ck["rng"])
            streams.load(ck.get("data_rng"))
            print(f"resumed from {resume} at step {self.step}")
        task.prepare_data(device)

        if self.step == 0 and task.evaluate_initial():  # the starting weights are a candidate too
            self._evaluate(initial=True)
        ctx = StepContext(device, cfg.amp and device.type == "cuda", cfg.clip_grad)
        budget.start()
        bar = tqdm(total=cfg.steps or None, initial=self.step, desc=task.name, dynamic_ncols=True,
                   disable=not cfg.progress)
        task.model.train()
        last_log = time.time()
        while not budget.done(self.step):
            ctx.step, ctx.progress = self.step, budget.progress(self.step)
            logs = task.train_step(task.sample(streams), ctx)
            if self.ema is not None:
                self.ema.update(task.model)
            self.step += 1
            bar.update(1)
            if time.time() - last_log > cfg.log_seconds or self.step % cfg.log_every == 0:
                last_log = time.time()
                self.log.write(step=self.step, elapsed=budget.elapsed(), **logs)
                bar.set_postfix({k: f"{_scalar(logs[k]):.4g}" for k in task.postfix_keys if k in logs})
            if self.step % cfg.eval_every == 0 or budget.done(self.step):
                self._evaluate()
                state = {**task.state_dict(), "step": self.step, "best_score": self.best_score,
                         "elapsed": budget.elapsed(), "rng": rng_state(), "data_rng": streams.state(),
                         "format": RESUME_FORMAT, "task": task.name}
                if self.ema is not None:
                    state["ema"] = self.ema.state_dict()
                atomic_save(state, resume)
                task.after_checkpoint(self.run_dir)
        bar.close()
        return self.run_dir / "best.pt"

    def _evaluate(self, initial: bool = False) -> dict:
        model = self.eval_model()
        metrics = self.task.evaluate(model, self.step)
        is_best = metrics["score"] > self.best_score
        if is_best:
            self.best_score = metrics["score"]
            meta = {**self.task.best_meta(self.step, metrics),
                    "train": {**asdict(self.cfg), **self.task.config_dict()}}
            if self.ema is not None:
                meta["ema"] = self.cfg.ema
            self.task.save_best(self.run_dir / "best.pt", model, meta)
        self.log.write(step=self.step, eval=metrics, best=is_best)
        tqdm.write(f"[eval {'start' if initial else f'step {self.step}'}] {self.task.describe(metrics)}"
                   f"{' *best*' if is_best else ''}")
        return metrics
