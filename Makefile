# `make test` builds a project-local virtual environment from scratch, then runs the suite.
# On a machine without torch it installs the local CPU wheel (torch==2.13.0) before anything else, so no
# dependency can pull CUDA wheels; a torch already visible to python3 (a CUDA build on a GPU box) is kept.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0
TRITON_CPU ?= triton==3.7.1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-fast bench sm90-check clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q $(TRITON_CPU) numpy
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
	touch $@

test: install
	$(PY) -m pytest tests -n 2 -q

test-fast: install
	$(PY) -m pytest tests -n 2 -q -m "not slow"

# Every op x backend x shape and the model train / decode steps; skipped cases (Triton without CUDA) print why.
bench: install
	$(PY) -m pytest benchmarks -q -rs --benchmark-json=benchmarks/results/cpu_latest.json \
		--benchmark-columns=median,mean,min,rounds --benchmark-sort=fullname

# Compile every Triton kernel offline for sm_90a (no GPU needed): registers, spills, shared memory, wgmma and grid
# per kernel at the presets' shapes, into benchmarks/results/sm90_check.md/.json (Titans) and cms_sm90_check.json.
sm90-check: install
	$(PY) -m benchmarks.sm90_check
	$(PY) -m benchmarks.cms_sm90_check

clean:
	rm -rf $(VENV) build *.egg-info

.PHONY: demo
# The main job: train Hope and Transformer++ on an embedded corpus (~10 min on 2 CPU cores; a GPU when present).
demo: install
	$(PY) -m hope.train --demo
