# Two commands set up and run everything on a fresh machine:
#   make demo   - create .venv, install vpeft, run the built-in demo
#   make test   - create .venv, install vpeft with dev extras, run the test suite
#   make check-cuda - compile and load the CUDA kernels with this machine's nvcc (no GPU)
#   make check-sm90 - compile every Triton kernel config for sm_90 (no GPU): no spills, shared memory fits
#   make docs-check - run every shell and Python example of README.md as written
# PYTHON picks the interpreter used to create the virtual environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test bench check-cuda check-sm90 docs-check clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# torch first: the compiled extension builds against the installed torch, so the
# package itself is installed without build isolation (which would fetch torch again).
# The CPU extension is built here; the CUDA one only where a GPU is visible or
# TORCH_CUDA_ARCH_LIST / VPEFT_BUILD_CUDA=1 ask for it (see setup.py).
$(VENV)/.installed: $(BIN)/activate pyproject.toml setup.py $(wildcard csrc/*)
	$(BIN)/pip install torch torchvision setuptools wheel ninja
	$(BIN)/pip install --no-build-isolation -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/vpeft demo

test: install
	$(BIN)/python -m pytest -q tests

docs-check: install
	$(BIN)/python -m pytest -q tests/test_readme.py

check-cuda: install
	PYTHON=$(BIN)/python scripts/check_cuda_compile.sh

check-sm90: install
	env -u TRITON_INTERPRET $(BIN)/python -m vpeft_kernels.sm90_check --jobs $${MAX_JOBS:-2}

bench: install
	$(BIN)/python -m pytest benchmarks/ --benchmark-only -q

clean:
	rm -rf $(VENV) build *.egg-info
