# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv (if needed), install the toolkit into it, then run.
PYTHON ?= python3
VENV ?= .venv
# torch is not pinned by the package; this pin matches the wheels cached on the dev machines.
# Override with `make TORCH="torch torchvision"` (or your CUDA build) elsewhere.
TORCH ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin

.PHONY: install demo test test-gpu bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/mora-ret demo

test: install
	$(BIN)/python -m pytest -q

# On a CUDA machine: the whole suite with the `gpu` tests (they skip where CUDA is absent).
test-gpu: install
	$(BIN)/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'test-gpu: no CUDA device is visible')"
	$(BIN)/python -m pytest -q -rs

# The CPU benchmarks of BENCHMARKS.md (add --device cuda on a GPU machine).
bench: install
	$(BIN)/python benchmarks/bench_adapters.py --arch mora-tiny --batch 64
	$(BIN)/python benchmarks/bench_cir.py --arch mora-tiny --batch 64 --steps 20
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_engine.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_prepared.py
	$(BIN)/python benchmarks/bench_retrieval.py

clean:
	rm -rf $(VENV) build *.egg-info
