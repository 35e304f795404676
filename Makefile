# Two commands on a fresh Debian 12 (root, Python 3.11): `make demo` and `make test`.
# Both install what is missing: apt softhsm2/opensc/libnss3-tools/openssl, and this package.
SHELL := /bin/bash
PYTHON ?= python3
ROOT := $(CURDIR)
VAR := $(ROOT)/var
export SOFTHSM2_CONF := $(VAR)/softhsm2.conf
# This checkout's own environment (scripts/install-deps.sh makes it): its commands come first.
export PATH := $(ROOT)/.venv/bin:$(PATH)
RUNPY = $(ROOT)/.venv/bin/python

.PHONY: demo test lint bench deps clean

# Run every time (about 2 s when nothing is missing): a stamp file would miss an editable install
# that another clone of this repository has since pointed at itself.
deps:
	@PYTHON=$(PYTHON) bash scripts/install-deps.sh
	@mkdir -p $(VAR)

$(SOFTHSM2_CONF): softhsm.conf | deps
	@$(RUNPY) -c "from pathlib import Path; from hsm.core.softhsm import render_config; render_config(Path('softhsm.conf'), Path('$@'), Path('$(ROOT)'))"

demo: deps $(SOFTHSM2_CONF)
	@bash scripts/demo.sh

test: deps
	$(RUNPY) -m pytest -q

# The type checker over suite, hsm, release, ceremony and kms (configuration: pyproject.toml [tool.mypy]).
lint: deps
	$(RUNPY) -m mypy

bench: deps
	$(RUNPY) -m pytest benchmarks/ --benchmark-only -q

clean:
	rm -rf $(VAR)
