# The two commands the README opens with:
#   make demo   create .venv, install, train LUT briefly on the built-in data (CPU), print where results are
#   make test   create .venv, install everything the tests need (apt + pip, DALI and FFCV included), run ruff and pytest
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# A new folder per demo (earlier runs and their evaluations are kept); DEMO_OUT=DIR picks one, never overwritten.
ifndef DEMO_OUT
DEMO_OUT := runs/demo-$(shell date +%Y%m%d-%H%M%S)
endif
# FFCV builds from source against these (docs/BACKENDS.md, "Installing")
APT_PACKAGES := pkg-config g++ libturbojpeg0-dev libopencv-dev

.PHONY: demo test install install-test sysdeps clean bench-cpu

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# Core install: torch/torchvision pinned by constraints.txt (taken from local disk where available),
# with the tensorboard extra so that the demo leaves event files to open with `tensorboard --logdir`.
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e '.[tensorboard]'
	touch $@

install: $(VENV)/.installed

sysdeps:
	@if ! pkg-config --exists libturbojpeg opencv4 2>/dev/null; then \
	  echo "installing system packages for FFCV: $(APT_PACKAGES)"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $(APT_PACKAGES); \
	fi

# Everything the tests need: test tools, Hugging Face datasets (coexistence test), DALI and FFCV.
$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml constraints.txt | sysdeps
	$(PIP) install -q -c constraints.txt -e '.[test,dali,ffcv,bench]'
	touch $@

install-test: $(VENV)/.installed-test

demo: install
	@echo "demo run folder: $(DEMO_OUT)"
	$(BIN)/lut-fast train configs/demo.yaml --out $(DEMO_OUT)
	@echo
	@echo "Results in $(DEMO_OUT)/: config.yaml, metrics.jsonl (online k-NN included), curves.png, tensorboard/, checkpoints/last.pt"
	@echo "Watch it: $(BIN)/tensorboard --logdir $(DEMO_OUT)/tensorboard   (or: $(BIN)/lut-fast plot $(DEMO_OUT))"
	@echo "lut-fast is in $(BIN)/: run 'source $(BIN)/activate' to call it as plain 'lut-fast'"
	@echo "Next: $(BIN)/lut-fast eval knn $(DEMO_OUT)/checkpoints/last.pt   (k-NN accuracy on the built-in val split)"

test: install-test
	$(BIN)/ruff check .
	$(BIN)/pytest

# Regenerate every CPU figure in docs/benchmarks/ (5-7 minutes on 2 cores once the images are made; run it on a quiet machine)
bench-cpu: install-test
	$(PIP) install -q -c constraints.txt -e '.[bench]'
	bash docs/benchmarks/run_cpu.sh

clean:
	rm -rf $(VENV) runs .pytest_cache *.egg-info
