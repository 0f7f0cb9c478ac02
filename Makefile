# The two commands of the README. Both do all set-up first (idempotent).
.PHONY: setup demo test
setup:
	scripts/setup.sh
demo: setup
	.venv/bin/hafloc demo --output hafloc-demo $(ARGS)
test:
	scripts/setup.sh --test
	.venv/bin/python -m pytest -q -rs
