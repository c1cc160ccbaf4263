# atelier task file. `make run` and `make test` are the README's two commands: each installs
# what is missing first (a venv in .venv), so both work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup run test test-all lint bench clean llm

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU wheel on disk; anything else fetches a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(MAKE) --no-print-directory .build/lightfm.installed
	touch $@

# LightFM 1.17 (the peer baseline) only builds with setuptools < 70 and no build isolation;
# build its wheel in a throwaway venv so the project venv keeps a current setuptools.
.build/lightfm.installed:
	$(PY) -m venv .build/lightfm-venv
	.build/lightfm-venv/bin/pip install -q "setuptools<70" wheel cython numpy scipy
	.build/lightfm-venv/bin/pip wheel -q --no-build-isolation --no-deps -w .build/wheels "lightfm==1.17"
	$(BIN)/pip install -q .build/wheels/lightfm-1.17-*.whl
	touch $@

# The embedded LLM backends (optional, not part of `make test`): build the llama-cpp-python wheel
# once (about 6 min on 2 idle cores, niced) and reuse it from .build/wheels afterwards, then install
# the `llm` extra of pyproject.toml (llama-cpp-python from that wheel with its OpenAI-compatible server,
# gguf for the LoRA adapter), so the extra is the one list of what the LLM paths need. Re-run when
# pyproject.toml or this file change.
LLAMA_CPP := llama-cpp-python==0.3.36
llm: setup .build/llama.installed

.build/llama.installed: pyproject.toml Makefile
	ls .build/wheels/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || \
		CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) nice -n 10 $(BIN)/pip wheel --no-deps -w .build/wheels "$(LLAMA_CPP)"
	$(BIN)/pip install -q --find-links .build/wheels -e ".[llm]"
	# Fail here, not at the first product: every default LLM path imports these.
	$(BIN)/python -c "import llama_cpp, llama_cpp.server.app, gguf; print('llm extra ok: llama-cpp-python', llama_cpp.__version__, '+ server + gguf')"
	touch $@

run: setup  ## the main job: the whole pipeline on ../shared/data (or ATELIER_DATA_DIR)
	$(BIN)/atelier run

test: setup  ## the default test suite (slow tests excluded)
	$(BIN)/pytest -q -m "not slow"

test-all: setup
	$(BIN)/pytest -q

lint: setup  ## ruff, mypy and the import contracts of pyproject.toml (layers, serving never imports training)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .build runs .pytest_cache .mypy_cache .ruff_cache
