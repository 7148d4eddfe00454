# make test: set up .venv (CPU torch when none is importable), install babyllama[dev], ruff, pytest.
# make demo: set up .venv with babyllama[demo] and run the whole pipeline on the built-in corpus.
# Users with a GPU: make TORCH_SPEC='torch' to let pip choose your CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev

# glibc keeps large freed blocks instead of returning them to the kernel every step: ~20% faster CPU training
CPU_MALLOC := MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184

.PHONY: test lint setup demo clean browser

setup: $(VENV)/.installed-$(EXTRAS)

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

lint: setup
	$(VENV)/bin/ruff check src tests bench

# the chat page's test drives a headless Chromium (Playwright, through its executable path): take the
# distribution's package when there is none and apt-get can run; otherwise that one test is skipped
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	    echo "installing Debian's chromium for the page test" && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "note: no chromium, and no apt-get as root to install it: the chat page test will be skipped"

test: lint browser
	$(PY) -m pytest -q

demo:
	$(MAKE) setup EXTRAS=demo
	$(CPU_MALLOC) $(VENV)/bin/babyllama demo --out_dir runs/demo

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
