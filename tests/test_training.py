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
