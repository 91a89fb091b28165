# The two commands of the README: `make run` (main job on embedded defaults) and `make test`.
# Both set up everything on a fresh machine first (a virtual environment in .venv).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/demo
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install run test test-fast lint docs docs-serve bench clean

$(VENV)/.installed: pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q uv
	# torch first, with pip: it takes the wheels a machine has on disk (uv would download a
	# 3 GB CUDA build); torchvision must be the build that matches torch, else timm fails.
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	# everything else from the lock file, without pip's minutes of backtracking
	$(VENV)/bin/uv pip install -q --python $(PY) --compile-bytecode -r requirements.lock
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps -e .
	touch $@

install: $(VENV)/.installed

run: install
	# training_pipeline then map_flow on the generated demo scene: local folders, SQLite MLflow
	# in $(OUT)/mlflow.db, Prefect's ephemeral API (no server needed)
	$(PY) -m flows.demo --out $(OUT)

# test: the full suite (what .ci/run calls) on two pytest processes of one thread each: the
# deployed tests wait on processes of their own, so a second pytest process fills the cores
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --durations=15

# the loop while working: no services, no spawned processes, on two pytest processes of one
# thread each (< 3 min on 2 cores)
test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 -m "not integration and not slow"

# lint: the project's ruff rules (pyproject.toml) and its formatting; CI runs it before the tests
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# the documentation site: the CLI reference generated from the app, then mkdocs (strict:
# a broken link or a missing page fails the build)
docs: install
	$(VENV)/bin/typer specdeepmap.cli utils docs --name specdeepmap \
	  --title "Command line reference" --output docs/reference/cli.md
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site --quiet

docs-serve: docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve -a 127.0.0.1:8000

bench: install
	$(PY) benchmarks/bench_chipping.py
	$(PY) benchmarks/bench_splitting.py
	$(PY) benchmarks/bench_leakage.py
	$(PY) benchmarks/bench_training.py
	$(PY) benchmarks/bench_mapping.py
	$(PY) benchmarks/bench_ensemble.py
	$(PY) benchmarks/bench_quality.py
	$(PY) benchmarks/bench_spatial_context.py
	$(PY) benchmarks/bench_bands.py

clean:
	rm -rf $(VENV) runs site
