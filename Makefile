# The two commands of the README. Both do all set-up first (idempotent).
# `make docs` builds the documentation site into site/ (open site/index.html; works offline).
.PHONY: setup demo test lint typecheck docs docs-strict docs-serve
SETUP ?= scripts/setup.sh
PYTHON ?= .venv/bin/python
MKDOCS ?= .venv/bin/mkdocs
export NO_MKDOCS_2_WARNING = 1
setup:
	scripts/setup.sh
demo: setup
	.venv/bin/hafloc demo --output hafloc-demo $(ARGS)
test:
	scripts/setup.sh --test
	.venv/bin/python -m pytest -q -rs
# ruff (pinned in the test extra; its rules are [tool.ruff] in pyproject.toml).
# Fix: ruff format hafloc tests benchmarks scripts docs && ruff check --fix hafloc tests benchmarks scripts docs
lint:
	scripts/setup.sh --test
	.venv/bin/ruff check hafloc tests benchmarks scripts docs
	.venv/bin/ruff format --check hafloc tests benchmarks scripts docs
# mypy (pinned in the test extra) on the package; its settings are [tool.mypy] in pyproject.toml.
typecheck:
	scripts/setup.sh --test
	.venv/bin/mypy
# docs/cli.md is generated from the argparse parsers on every build, so it cannot drift from --help.
docs:
	$(SETUP) --docs
	$(PYTHON) scripts/gen_cli_docs.py
	$(MKDOCS) build $(DOCSFLAGS)
# CI: a broken link, a missing page or an API member that does not render fails the build.
# It also fails when a page would load a script or stylesheet from the network (the site is offline).
docs-strict:
	$(MAKE) docs DOCSFLAGS=--strict
	@if grep -lE '<(script|link)[^>]+(src|href)="(https?:)?//' site/*.html; then \
	  echo "docs: the pages above load a script or stylesheet from the network" >&2; exit 1; fi
docs-serve:
	$(SETUP) --docs
	$(PYTHON) scripts/gen_cli_docs.py
	$(MKDOCS) serve
