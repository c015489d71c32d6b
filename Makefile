# nanoseek — the README's commands. `make run` and `make test` set everything up on a fresh clone.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup chromium run test test-all lint bench peers clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned to the CPU wheel on disk; a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP) chromium

# Debian's chromium for the web chat's browser test (playwright drives it; it downloads no browser). Installed
# when missing and we can (root with apt-get); otherwise the reason is printed, make goes on and the test is
# skipped with the same reason.
CHROMIUM := /usr/bin/chromium
chromium:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's chromium (apt-get) for the web chat test"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
			|| echo "chromium could not be installed: the web chat test will be skipped"; \
	else \
		echo "no $(CHROMIUM), and installing it needs root with apt-get: the web chat test will be skipped"; \
	fi

run: $(STAMP)
	$(VENV)/bin/nanoseek speedrun

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(VENV)/bin/nanoseek bench moe-step

# llama.cpp's own llama-server, llama-bench and llama-perplexity (the serve, decode and quality benchmarks'
# peers), built once into ~/.cache/nanoseek/peers from the llama.cpp tree in llama-cpp-python's sdist (~6 min
# on 2 cores; then instant; a build made before llama-perplexity was listed builds just that).
peers: $(STAMP)
	$(VENV)/bin/nanoseek bench peers

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .hypothesis
