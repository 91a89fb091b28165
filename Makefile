# The two commands of the README: `make run` (main job on embedded defaults) and `make test`.
# Both set up everything on a fresh machine first (a virtual environment in .venv).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/demo
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install run test bench clean

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
	$(VENV)/bin/specdeepmap sample-data $(OUT)/scene
	$(VENV)/bin/specdeepmap chip $(OUT)/scene/demo_s2.tif $(OUT)/scene/demo_s2_labels.tif $(OUT)/chips \
		--tile-x 64 --tile-y 64 --step-x 64 --step-y 64
	$(VENV)/bin/specdeepmap split $(OUT)/chips --scaler 10000
	$(VENV)/bin/specdeepmap train $(OUT)/chips --out $(OUT)/train --epochs 8 --batch-size 16 \
		--device auto --tracking-uri sqlite:///$(OUT)/mlflow.db
	$(VENV)/bin/specdeepmap test $(OUT)/chips/test_files.csv $(OUT)/train/model.pt --out $(OUT)/test
	$(VENV)/bin/specdeepmap map $(OUT)/scene/demo_s2.tif $(OUT)/train/model.pt \
		$(OUT)/map/demo_s2_classes.tif --ground-truth $(OUT)/scene/demo_s2_labels.tif \
		--iou-csv $(OUT)/map/iou.csv --confidence $(OUT)/map/demo_s2_confidence.tif
	@echo "Outputs in $(OUT). MLflow UI: $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(OUT)/mlflow.db"
	@echo "TensorBoard: $(VENV)/bin/specdeepmap tensorboard --logdir $(OUT)/train"

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/bench_chipping.py
	$(PY) benchmarks/bench_splitting.py

clean:
	rm -rf $(VENV) runs
