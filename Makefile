# MRIDC Edge. `make help` lists the targets. Every target sets itself up (virtualenv in .venv).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONUNBUFFERED := 1

.PHONY: help setup system-deps test test-all demo demo-short bench data train train-smoke export export-litert proto lint fuzz test-arm64 clean

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned (2.13.0): pip takes the CPU build from the machine's own wheel folder when it has one.
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP) system-deps ## create .venv and install everything the tests and the demo need (idempotent)

system-deps: ## install mosquitto (MQTT broker for tests/demo) and ffmpeg (video baselines) with apt-get when root
	@if command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto; then :; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
		echo "installing mosquitto (apt-get)"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q mosquitto >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q mosquitto >/dev/null; }; \
	else echo "mosquitto is missing: install the Debian package 'mosquitto' (sudo apt-get install mosquitto)"; exit 1; fi
	@# ffmpeg (libx264, libx265, SVT-AV1) is the video-codec baseline of `mridc-bench sequence`; optional: its tests
	@# skip, and the benchmark says so, where it cannot be installed.
	@if command -v ffmpeg >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
		echo "installing ffmpeg (apt-get, for the video-codec baseline)"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends ffmpeg >/dev/null 2>&1 || \
		echo "ffmpeg could not be installed: the video baseline is left out"; \
	else echo "note: ffmpeg is missing (Debian package 'ffmpeg'); mridc-bench sequence leaves the video codecs out"; fi

test: setup ## run the test suite (what CI runs)
	MRIDC_REQUIRE_MOSQUITTO=1 $(PY) -m pytest -q -p no:cacheprovider

test-all: setup ## the suite plus slow tests (30 s link outages)
	MRIDC_REQUIRE_MOSQUITTO=1 $(PY) -m pytest -q -m 'not arm64 and not gpu'

demo: setup ## end-to-end demo: simulated cameras -> emulated link -> cloud service -> demo-out/ report
	$(PY) -m mridc.firmware_sim.demo --out demo-out

bench: setup ## a reduced run of every benchmark (budgeted ~30 min, untimed); JSON + plots in docs/results/
	$(VENV)/bin/mridc-bench all --out docs/results

data: setup ## build the training corpus in data/corpus (dedup, train/val split, manifest; training then uses it)
	$(VENV)/bin/mridc-cloud data --out data/corpus $(DATA_ARGS)

train: setup ## train tokenizer, predictor, diffusion on the CPU (resumes from runs/ and models/; CUDA if present)
	$(VENV)/bin/mridc-cloud train all --runs runs --ship-dir models --init-dir models
	$(MAKE) export

train-smoke: setup ## a two-minute tiny training session (checks the training code end to end)
	$(VENV)/bin/mridc-cloud train all --runs runs/smoke --ship-dir runs/smoke/models --init-dir runs/smoke/none --tiny \
		--tokenizer-minutes 0.5 --bpcg-minutes 0.3 --tokenizer-batch 2 --predictor-batch 2 --diffusion-batch 2 \
		--predictor-crop 128 --diffusion-crop 64 --eval-every 20

export: setup ## rebuild models/edge (ONNX fp32 + int8, codebook, token prior, manifest) from models/tokenizer.pt
	$(VENV)/bin/mridc-cloud export

export-litert: setup ## rebuild models/edge/encoder_int8.tflite in a separate conversion venv (litert-torch)
	bash tools/litert_convert.sh

proto: setup ## regenerate the gRPC/protobuf stubs (grpcio-tools 1.85.1 -> protobuf >= 7.35 at run time)
	$(PY) -m grpc_tools.protoc -Isrc --python_out=src --grpc_python_out=src src/mridc/v1/mridc.proto

lint: setup ## ruff
	$(VENV)/bin/ruff check .

fuzz: setup ## long fuzz of the MRD parser (200k cases)
	$(PY) -m mridc.shared.fuzz --cases 200000

test-arm64: setup ## build an arm64 Debian root (debootstrap + qemu-user-static), run the edge there, check bit-exactness
	bash tools/arm64_test.sh

clean: ## remove build outputs (keeps .venv and models/)
	rm -rf build *.egg-info demo-out .pytest_cache .ruff_cache runs/smoke
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
