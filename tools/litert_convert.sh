#!/usr/bin/env bash
# `make export-litert`: build models/edge/encoder_int8.tflite from models/tokenizer.pt with litert-torch
# (PT2E int8), in its own virtualenv (.venv-litert, ~1.5 GB): neither the edge nor the cloud env carries it.
# Then, when the project's .venv exists, print the token agreement of every backend against torch fp32.
# Usage: bash tools/litert_convert.sh [args for tools/litert_convert.py convert, e.g. --calib 64 --fp32]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${LITERT_VENV:-.venv-litert}
STAMP="$VENV/.installed"
if [ ! -f "$STAMP" ]; then
  test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch is pinned: pip takes the CPU build from the machine's wheel folder (an unpinned one pulls CUDA).
  # opencv reads the calibration frames of vtest.avi; mridc goes in without its extras.
  "$VENV/bin/python" -m pip install -q "torch==2.13.0" litert-torch ai-edge-litert opencv-python-headless
  "$VENV/bin/python" -m pip install -q --no-deps -e .
  touch "$STAMP"
fi
"$VENV/bin/python" tools/litert_convert.py convert "$@"
if [ -x .venv/bin/python ]; then
  .venv/bin/python tools/litert_convert.py check
fi
