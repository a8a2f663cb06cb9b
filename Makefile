# Quick start:  make demo  (train a small CrossFormer on the built-in digits example)
#               make test  (install what the tests need, run the whole suite)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# pytest-xdist workers for make test: test files are dealt to them whole (--dist loadfile), so a
# file's module fixtures (one reference training run, one compilation cache) are built once.
TEST_WORKERS ?= 2
DEMO_DIR ?= workdirs/digits_demo
SEG_DEMO_DIR ?= workdirs/segmentation_demo
DET_DEMO_DIR ?= workdirs/detection_demo
MASK_DEMO_DIR ?= workdirs/mask_rcnn_demo

.PHONY: install lint format test test-slow demo demo-seg demo-det demo-mask benchmark report clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

# One house style: ruff format + ruff check, configured in pyproject.toml.
lint: install
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: install
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

test-slow: install
	$(PY) -m pytest -m slow

report: install
	$(PY) -m crossformer_jax.models.complexity

benchmark: install
	$(PY) benchmarks/cpu_benchmark.py --model crossformer_tiny

# The built-in example: scikit-learn's digits as an image folder, then train.py on it (a CPU run:
# with the XLA:CPU plug-in, which falls back to plain JAX where it cannot be built).
demo: install
	$(PY) scripts/make_digits_dataset.py --out workdirs/digits_data
	CROSSFORMER_CPU_KERNELS=1 $(PY) train.py --config configs/digits_demo.py --workdir $(DEMO_DIR)

# The built-in segmentation example: digits pasted on photographs (ADE20K layout), then train.py.
demo-seg: install
	$(PY) scripts/make_segmentation_demo.py --out workdirs/segmentation_demo_data
	CROSSFORMER_CPU_KERNELS=1 $(PY) train.py --config configs/segmentation/digits_demo.py --workdir $(SEG_DEMO_DIR)

# The built-in detection example: digits and shapes pasted on photographs, written as a COCO
# folder (boxes and masks), then a small RetinaNet trained from scratch through train.py.
demo-det: install
	$(PY) scripts/make_detection_demo.py --out workdirs/detection_demo_data
	CROSSFORMER_CPU_KERNELS=1 $(PY) train.py --config configs/detection/demo.py --workdir $(DET_DEMO_DIR)

# The same data, a small Mask R-CNN (boxes and instance masks) trained from scratch.
demo-mask: install
	$(PY) scripts/make_detection_demo.py --out workdirs/detection_demo_data
	CROSSFORMER_CPU_KERNELS=1 $(PY) train.py --config configs/detection/mask_rcnn_demo.py --workdir $(MASK_DEMO_DIR)

clean:
	rm -rf $(VENV) workdirs .pytest_cache
