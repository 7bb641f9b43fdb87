# Newcomer targets: `make demo` (main job: sample volumes from the bundled demo model) and `make test` (the test
# suite). Both create .venv if missing.
PYTHON ?= python3
VENV ?= .venv
# The torch and triton this machine class has locally; override e.g. `make test TORCH_SPEC="torch==2.14.1"`.
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.9.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pydiffmed-installed

.PHONY: install build demo run test bench clean

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)" "pybind11>=2.11" "setuptools>=64" wheel
	$(PY) -m pip install -q -e ".[test,io]"
	touch $(STAMP)

install: $(STAMP)

# Rebuild the C++ extension in place after editing csrc/ (pip install -e builds it once).
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

DEMO_OUT ?= samples
demo: build
	$(VENV)/bin/pydiffmed sample --model demo --num 4 --batch 4 --solver dpmpp_2m --steps 20 --seed 0 \
		--out $(DEMO_OUT) --overwrite
	@echo "demo volumes (NIfTI), previews (PNG) and sidecars (JSON) are in $(abspath $(DEMO_OUT))/"

run: build
	$(VENV)/bin/pydiffmed info

test: build
	$(VENV)/bin/ruff check pydiffmed tests benchmarks triton_kernels setup.py
	$(PY) -m pytest -q tests

bench: build
	$(PY) benchmarks/run_all.py

clean:
	rm -rf build *.egg-info pydiffmed/*.so
