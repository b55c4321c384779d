# emseg: all set-up goes through these targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test bench reproduce clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Install torch first when none is present: the pinned CPU build is small, whereas an
# open `torch` requirement would pull a multi-GB CUDA build.
install: $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@# napari (dev extra) draws with OpenGL: headless, Qt's offscreen platform takes it from Xvfb.
	@# Installed only when missing and apt-get is there; skipped silently otherwise (the tests skip).
	@command -v Xvfb >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends xvfb >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1 && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends xvfb >/dev/null 2>&1; } || true

demo: install
	$(BIN)/emseg demo

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: install
	$(BIN)/python benchmarks/train_vnc.py

# Every experiment of docs/results.md (hours on a small CPU); QUICK=1: each script end to end on
# tiny settings in a temporary folder (minutes).
reproduce: install
	$(BIN)/python benchmarks/results/reproduce.py $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
