"""Training code on tiny models: it runs, logs, keeps the best checkpoint and resumes exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mridc.cloud.train import tokenizer as train_tok
from mridc.cloud.zoo import load_model, save_model, tokenizer_model_id


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_imgs")
    rng = np.random.default_rng(0)
    for i in range(3):
        base = rng.integers(0, 255, (4, 6, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((192, 128), Image.BILINEAR)
        img.save(d / f"img{i}.png")
    return d


def _args(out, data, steps, extra=()):
    p = train_tok.argparse.ArgumentParser()
    train_tok.add_arguments(p)
    return p.parse_args(["--out", str(out), "--data", str(data), "--val", str(data), "--steps", str(steps),
                         "--tiny", "--batch", "2", "--crop", "64", "--eval-every", "2", "--gan-start", "0.25",
                         "--device", "cpu", *extra])


def test_tokenizer_training_resumes_exactly(tmp_path, data_dir):
    torch.set_num_threads(1)
    train_tok.train_tokenizer(_args(tmp_path / "straight", data_dir, 6))
    train_tok.train_tokenizer(_args(tmp_path / "resumed", data_dir, 4))
    train_tok.train_tokenizer(_args(tmp_path / "resumed", data_dir, 6))  # continues from last.pt at step 4
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "eval" in r]
    assert evals and all(np.isfinite(r["eval"]["psnr"]) for r in evals)
    best = torch.load(tmp_path / "straight" / "best.pt", weights_only=False)
    assert best["meta"]["val"]["score"] == max(r["eval"]["score"] for r in evals)


def test_shipped_file_round_trip_keeps_the_model_id(tmp_path, data_dir):
    from mridc.cloud.tokenizer import VQTokenizer, tiny_tokenizer_config

    model = VQTokenizer(tiny_tokenizer_config())
    save_model(tmp_path / "tok.pt", "tokenizer", model)
    loaded = load_model(tmp_path / "tok.pt", "tokenizer")
    assert tokenizer_model_id(loaded) == tokenizer_model_id(model)  # the codebook is shipped in fp32
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    agree = (loaded.encode_indices(x) == model.eval().encode_indices(x)).float().mean()
    assert agree >= 0.75  # fp16 encoder weights may move a few near-ties, not the grid
    with pytest.raises(Exception, match="expected 'predictor'"):
        load_model(tmp_path / "tok.pt", "predictor")


def test_predictor_and_diffusion_trainers_run_resume_and_ship(tmp_path, data_dir):
    from mridc.cloud.tokenizer import VQTokenizer, tiny_tokenizer_config
    from mridc.cloud.train import diffusion as train_diff
    from mridc.cloud.train import predictor as train_pred

    torch.set_num_threads(1)
    save_model(tmp_path / "tok.pt", "tokenizer", VQTokenizer(tiny_tokenizer_config()))
    common = ["--tokenizer", str(tmp_path / "tok.pt"), "--data", str(data_dir), "--tiny", "--batch", "2",
              "--crop", "64", "--device", "cpu"]
    train_pred.main(["--out", str(tmp_path / "pred"), "--steps", "2", "--eval-every", "1", *common])
    train_pred.main(["--out", str(tmp_path / "pred"), "--steps", "3", "--eval-every", "1", *common])
    train_pred.main(["--out", str(tmp_path / "pred_straight"), "--steps", "3", "--eval-every", "1", *common])
    resumed = torch.load(tmp_path / "pred" / "last.pt", weights_only=False)
    straight = torch.load(tmp_path / "pred_straight" / "last.pt", weights_only=False)
    assert resumed["step"] == straight["step"] == 3
    for key in straight["model"]:  # 2 + 1 steps with a resume == 3 steps straight: exact resume
        assert torch.equal(resumed["model"][key], straight["model"][key]), key
    pred = torch.load(tmp_path / "pred" / "best.pt", weights_only=False)
    assert pred["kind"] == "predictor" and 0.0 <= pred["meta"]["val"]["top1"] <= 1.0
    train_diff.main(["--out", str(tmp_path / "diff"), "--steps", "2", "--save-every", "1", *common])
    assert load_model(tmp_path / "diff" / "best.pt", "diffusion").cfg.patch == 2


def test_inference_never_imports_training_code():
    import subprocess
    import sys

    code = ("import sys, mridc.cloud.pipeline, mridc.cloud.zoo; "
            "sys.exit(any(m.startswith('mridc.cloud.train') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_weights_without_config_round_trip_in_fp16(tmp_path):
    from mridc.cloud.discriminator import PatchDiscriminator
    from mridc.cloud.zoo import load_checkpoint, save_checkpoint

    disc = PatchDiscriminator(width=8)
    save_checkpoint(tmp_path / "disc.pt", "discriminator", disc.state_dict(), half=True)
    raw = torch.load(tmp_path / "disc.pt", weights_only=False)
    assert raw["kind"] == "discriminator" and raw["state_dict"]["head.weight"].dtype == torch.float16
    loaded = load_checkpoint(tmp_path / "disc.pt", "discriminator")["state_dict"]
    assert loaded["head.weight"].dtype == torch.float32
    assert torch.allclose(loaded["head.weight"], disc.state_dict()["head.weight"], atol=1e-3)
    with pytest.raises(Exception, match="expected 'tokenizer'"):
        load_checkpoint(tmp_path / "disc.pt", "tokenizer")


def _tiny_tasks(tmp_path, data_dir):
    """The three tasks on tiny models, with the trainer options their command lines use."""
    from mridc.cloud.tokenizer import VQTokenizer, tiny_tokenizer_config
    from mridc.cloud.train.diffusion import DiffusionTask, DiffusionTrainConfig
    from mridc.cloud.train.predictor import PredictorTask, PredictorTrainConfig
    from mridc.cloud.train.tokenizer import TokenizerTask, TokenizerTrainConfig

    torch.manual_seed(0)
    tok = tmp_path / "tok.pt"
    if not tok.exists():
        save_model(tok, "tokenizer", VQTokenizer(tiny_tokenizer_config()))
    data = {"data": [str(data_dir)], "tiny": True, "batch": 2, "crop": 64}
    return {
        "tokenizer": (lambda: TokenizerTask(TokenizerTrainConfig(val=[str(data_dir)], gan_start=0.2, disc_warmup=1,
                                                                 gan_ramp=2, r1_every=2, **data)), {}),
        "predictor": (lambda: PredictorTask(PredictorTrainConfig(tokenizer=str(tok), mask_source="mixed", **data)), {}),
        "diffusion": (lambda: DiffusionTask(DiffusionTrainConfig(tokenizer=str(tok), **data)), {"ema": 0.999}),
    }


def _logged_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k not in ("elapsed", "step")} for r in rows if "eval" not in r}


def test_one_trainer_runs_all_three_tasks_and_resumes_exactly(tmp_path, data_dir):
    from mridc.cloud.train.trainer import Trainer, TrainerConfig

    torch.set_num_threads(1)
    for name, (make_task, options) in _tiny_tasks(tmp_path, data_dir).items():
        def run(out, steps, name=name, make_task=make_task, options=options):
            cfg = TrainerConfig(out=str(tmp_path / name / out), steps=steps, eval_every=2, device="cpu",
                                log_every=1, progress=False, **options)
            return Trainer(cfg, make_task()).run()

        best = run("straight", 5)
        run("resumed", 3)  # evaluates and saves last.pt at steps 2 and 3 (the end of its budget)
        run("resumed", 5)
        a = torch.load(tmp_path / name / "straight" / "last.pt", weights_only=False)
        b = torch.load(tmp_path / name / "resumed" / "last.pt", weights_only=False)
        assert a["step"] == b["step"] == 5 and a["task"] == name
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), (name, key)
        straight, resumed = _logged_losses(best.parent), _logged_losses(tmp_path / name / "resumed")
        assert sorted(straight) == [1, 2, 3, 4, 5]
        assert resumed == straight, name  # the same losses step by step after the resume
        assert load_model(best, name).training is False  # best.pt is a model file: it rebuilds from itself
        shipped = torch.load(best, weights_only=False)
        assert shipped["kind"] == name and "score" in shipped["meta"]["val"]
        if options.get("ema"):  # the EMA weights are evaluated and shipped, and resume with the rest
            assert shipped["meta"]["ema"] == 0.999
            assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
            assert not all(torch.equal(a["ema"][k], a["model"][k]) for k in a["ema"])


def test_tokenizer_resumes_a_last_pt_of_the_old_layout(tmp_path, data_dir):
    """Files written by the per-trainer loop (keys model, disc, opt_g, opt_d, step, best_score, gan_start_step,
    elapsed, rng, data_rng = the crop stream's python state) resume exactly under the one Trainer."""
    torch.set_num_threads(1)
    gan = ("--gan-start", "0.1", "--disc-warmup", "1", "--gan-ramp", "2")  # adversarial steps before and after
    train_tok.train_tokenizer(_args(tmp_path / "straight", data_dir, 6, gan))
    train_tok.train_tokenizer(_args(tmp_path / "old", data_dir, 4, gan))
    new = torch.load(tmp_path / "old" / "last.pt", weights_only=False)
    old = {k: new[k] for k in ("model", "disc", "opt_g", "opt_d", "step", "best_score", "gan_start_step",
                               "elapsed", "rng")}
    old["data_rng"] = new["data_rng"]["python"]  # the old trainer drew crops from one random.Random
    assert old["gan_start_step"] == 1  # the GAN phase had begun: its step must carry over
    torch.save(old, tmp_path / "old" / "last.pt")
    train_tok.train_tokenizer(_args(tmp_path / "old", data_dir, 6, gan))
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "old" / "last.pt", weights_only=False)
    assert b["step"] == 6 and b["format"] == 2
    for part in ("model", "disc"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)


def test_predictor_resumes_a_last_pt_of_the_old_layout(tmp_path, data_dir):
    from mridc.cloud.tokenizer import VQTokenizer, tiny_tokenizer_config
    from mridc.cloud.train import predictor as train_pred

    torch.set_num_threads(1)
    save_model(tmp_path / "tok.pt", "tokenizer", VQTokenizer(tiny_tokenizer_config()))
    common = ["--tokenizer", str(tmp_path / "tok.pt"), "--data", str(data_dir), "--tiny", "--batch", "2",
              "--crop", "64", "--device", "cpu", "--eval-every", "1"]
    train_pred.main(["--out", str(tmp_path / "straight"), "--steps", "3", *common])
    train_pred.main(["--out", str(tmp_path / "old"), "--steps", "2", *common])
    new = torch.load(tmp_path / "old" / "last.pt", weights_only=False)
    old = {k: new[k] for k in ("model", "opt", "step", "elapsed", "rng")}
    old.update(best=new["best_score"], data_rng=(new["data_rng"]["python"], new["data_rng"]["torch"]))
    torch.save(old, tmp_path / "old" / "last.pt")
    train_pred.main(["--out", str(tmp_path / "old"), "--steps", "3", *common])
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "old" / "last.pt", weights_only=False)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_edge_masks_follow_the_camera_policy(data_dir):
    from mridc.cloud.tokenizer import VQTokenizer, tiny_tokenizer_config
    from mridc.cloud.train.masks import keep_masks, tokens_and_quant_error
    from mridc.edge.masking import MapGuidedSelection, MapPriority

    torch.manual_seed(0)
    tok = VQTokenizer(tiny_tokenizer_config()).eval()
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    tokens, qerr = tokens_and_quant_error(tok, x)
    assert torch.equal(tokens, tok.encode_indices(x))
    gen = torch.Generator().manual_seed(1)
    masks = keep_masks(x, tok.cfg.stride, gen, source="edge", tokens=tokens, quant_error=qerr)
    assert masks.shape == tokens.shape and masks.dtype == torch.bool
    # Each mask is the edge's own selection of that many tokens.
    rgb = ((x + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    for i in range(3):
        score = MapPriority().score(rgb[i], tokens.shape[1:], tok.cfg.stride, quant_error=qerr[i].numpy(),
                                    tokens=tokens[i].numpy())
        expect = MapGuidedSelection().select(score, int(masks[i].sum()), None).keep_mask
        assert np.array_equal(masks[i].numpy(), expect)
    mixed = keep_masks(x, tok.cfg.stride, gen, source="mixed", tokens=tokens, quant_error=qerr)
    assert mixed.shape == tokens.shape
    with pytest.raises(ValueError):
        keep_masks(x, tok.cfg.stride, gen, source="bogus", tokens=tokens)


def test_tokenizer_lr_decays_over_the_last_part_of_the_budget():
    from mridc.cloud.train.tokenizer import lr_factor

    assert lr_factor(0.5, 1.0) == 1.0 and lr_factor(0.7, 0.75) == 1.0
    assert lr_factor(0.875, 0.75) == pytest.approx(0.05 + 0.95 * 0.5)
    assert lr_factor(1.0, 0.75) == pytest.approx(0.05) and lr_factor(2.0, 0.75) == pytest.approx(0.05)
