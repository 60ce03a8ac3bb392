#!/usr/bin/env bash
# One GPU training session on a lent accelerator (device tool). Needs .data/ (a copy of ../shared/data's
# training split) and .whl/ (pytorch-msssim wheel) carried along; writes shipping weights + logs to $OUT.
# Continues from the weights in models/ when present, so GPU sessions add up.
set -u
REPO="$PWD"
MINUTES_TOK=${MINUTES_TOK:-5.3}
MINUTES_BPCG=${MINUTES_BPCG:-2.6}
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$REPO/src:/tmp/site" PYTHONUNBUFFERED=1 MRIDC_DATA="$REPO/.data" TQDM_MININTERVAL=30
cd /tmp
nvidia-smi -L; python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
python3 -m mridc.cloud.train.session --runs /tmp/runs --ship-dir "$OUT" --init-dir "$REPO/models" --device cuda \
  --tokenizer-minutes "$MINUTES_TOK" --bpcg-minutes "$MINUTES_BPCG" --tokenizer-batch 32 \
  --predictor-batch 64 --predictor-crop 384 --diffusion-batch 32 --diffusion-crop 256 --eval-every 250 \
  ${EXTRA_ARGS:-} --hardware "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" 2>&1 | tee "$OUT/session.log"
rc=${PIPESTATUS[0]}
(cd /tmp/runs && tar czf "$OUT/logs.tar.gz" */log.jsonl)
exit "$rc"
