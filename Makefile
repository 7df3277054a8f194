# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv (if needed), install the toolkit into it, then run.
PYTHON ?= python3
VENV ?= .venv
# torch is not pinned by the package; this pin matches the wheels cached on the dev machines.
# Override with `make TORCH="torch torchvision"` (or your CUDA build) elsewhere.
TORCH ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
# bash with pipefail, so that a failing benchmark piped into tee stops make
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

.PHONY: install demo test test-gpu bench bench-gpu clean browser

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test,serve]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/mora-ret demo

test: install browser
	$(BIN)/python -m pytest -q

# On a CUDA machine: the whole suite with the `gpu` tests (they skip where CUDA is absent).
test-gpu: install
	$(BIN)/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'test-gpu: no CUDA device is visible')"
	$(BIN)/python -m pytest -q -rs

# The browser test (tests/test_serve_browser.py) drives Debian's chromium through chromium-driver.
# Where we are root with apt-get they are installed here (about 40 s); elsewhere that test skips.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium and chromium-driver for the browser test (apt-get)"; \
		( timeout 600 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq \
			--no-install-recommends chromium chromium-driver >/dev/null ) \
		|| echo "note: could not install chromium; the browser test will be skipped"; \
	else echo "note: no chromium/chromedriver (apt-get install chromium chromium-driver); the browser test will be skipped"; fi

# The CPU benchmarks of BENCHMARKS.md (add --device cuda on a GPU machine).
bench: install
	$(BIN)/python benchmarks/bench_adapters.py --arch mora-tiny --batch 64
	$(BIN)/python benchmarks/bench_cir.py --arch mora-tiny --batch 64 --steps 20
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_engine.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_prepared.py
	$(BIN)/python benchmarks/bench_retrieval.py
	$(BIN)/python benchmarks/bench_serve.py

# On a CUDA machine: issue #13's GPU figures (ViT-B-16, random weights; the speed does not depend
# on them), each script's comparisons from one run.
# Logs go to $(BENCH_OUT); BENCHMARKS.md says how to read each table.
BENCH_OUT ?= runs/bench-gpu
bench-gpu: install
	$(BIN)/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'bench-gpu: no CUDA device is visible')"
	mkdir -p $(BENCH_OUT)
	$(BIN)/python benchmarks/bench_cir.py --arch ViT-B-16 --batch 256 --device cuda 2>&1 | tee $(BENCH_OUT)/cir.txt
	$(BIN)/python benchmarks/bench_train_e2e.py --arch ViT-B-16 --batch 128 --world medium --device cuda --workers 12 \
		2>&1 | tee $(BENCH_OUT)/train_e2e.txt
	$(BIN)/python benchmarks/bench_retrieval.py --device cuda --skip-index 2>&1 | tee $(BENCH_OUT)/retrieval.txt
	$(BIN)/python benchmarks/bench_inference.py --arch ViT-B-16 --device cuda 2>&1 | tee $(BENCH_OUT)/inference.txt

clean:
	rm -rf $(VENV) build *.egg-info
