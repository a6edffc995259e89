# The two commands the README opens with:
#   make example   the main job: the arithmetic example end to end, W&B offline
#   make test      the whole test suite
# and the paper's own run on 2 CPU cores, one seed (resumes when started again; docs/paper.md):
#   make paper [SEED=0] [BASIS=hessian|random]
# Both create .venv on first use. TORCH_SPEC picks the torch build: the default asks for
# torch==2.13.0, which pip takes from a local wheel where one is configured (a CPU build)
# and from PyPI otherwise (the CUDA build on Linux). Use your own, e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
# The package and its extras (dev, transformers: examples/huggingface.py and its test) come
# second, pinned to the torch just installed, so that no dependency can replace it.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

SEED ?= 0
BASIS ?= hessian

.PHONY: install example test paper benchmark clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev,transformers]" "torch==$$($(PY) -c 'from importlib.metadata import version; print(version("torch"))')"
	touch $@

install: $(VENV)/.installed

example: $(VENV)/.installed
	WANDB_MODE=offline $(PY) examples/arithmetic.py --overwrite

test: $(VENV)/.installed
	WANDB_MODE=offline $(PY) -m pytest -q

paper: $(VENV)/.installed
	$(PY) studies/paper_run.py run --seeds $(SEED) --bases $(BASIS) --out runs/paper

benchmark: $(VENV)/.installed
	$(PY) benchmarks/engine.py
	$(PY) benchmarks/engine_families.py
	$(PY) benchmarks/callback.py
	$(PY) benchmarks/analysis.py
	$(PY) benchmarks/snapshot_compression.py
	$(PY) benchmarks/scale.py

clean:
	rm -rf $(VENV) runs wandb
