# Two entry points on a fresh machine with only Python 3:
#   make demo   the whole lifecycle on the demo world, with a report (creates .venv on first use)
#   make test   the test suite (creates .venv on first use)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# torch is pinned to the CPU wheel that lies on these machines' disk; a bare
# `pip install torch` could pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0" -e ".[serve,plot,test]"
	touch $(STAMP)

.PHONY: install browser demo test lint bench clean
install: $(STAMP)

# headless Chromium for the browser tests (tests/test_web_browser.py, skipped without it), from the system's
# packages where apt-get is there and we are root; its absence never fails the build
browser:
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  apt-get -qq update && DEBIAN_FRONTEND=noninteractive apt-get -qq install -y chromium >/dev/null; } || \
	  echo "chromium is not installed: the browser tests will be skipped"

demo: $(STAMP)
	$(BIN)/tristage pipeline --preset demo --out runs/demo

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=15

# ruff check only: the code keeps its compact hand-wrapped layout (continuation lines aligned under the opening
# bracket), which a formatter would spread over about 11% more lines; ruff check's rules (E, F, W, I, UP, B)
# are what CI enforces.
lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/bench_generate.py
	$(BIN)/python bench/bench_pretrain.py
	$(BIN)/python bench/bench_rl.py

clean:
	rm -rf $(VENV) runs
