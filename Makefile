# Two commands do all the set-up: `make demo` (the main job) and `make test` (the suite).
# Both create .venv with the pinned stack from setup.cfg on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast install browser bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "tfkarpa needs Python 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: install
	$(BIN)/python -m pipelines demo

# The suite in two tiers (pytest marks, setup.cfg): the fast tier (unit tests, at most a few
# training steps, one process) after every edit; `make test` runs it first, so a broken unit
# fails in minutes, then the slow and process tests. Two test processes, one file each at a
# time: most of the suite waits on single-threaded work (tracing, subprocesses), so two use this
# 2-core machine's cores.
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadfile

test: install browser
	$(PYTEST) -m "not slow and not process" --durations=10 tests
	$(PYTEST) -m "slow or process" --durations=20 tests

test-fast: install
	$(PYTEST) -m "not slow and not process" --durations=10 tests

# The report test opens report.html in a real browser: Debian's Chromium and its driver.
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
	  command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	  echo "note: the report test needs Debian's chromium and chromium-driver"

bench: install
	$(BIN)/python benchmarks/accuracy.py
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
