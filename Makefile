# Two entry points that do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast lint results-doc

setup:
	./scripts/setup.sh

demo: setup
	$(VENV)/bin/lemoe demo

test: setup
	./scripts/setup_browser.sh
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# docs/results.md is assembled from the per-area pages (each holds its own commands).
RESULT_PAGES := foundation lemoe realistic bench coachhook oedit malmen store
results-doc:
	{ cat docs/results/_header.md; for p in $(RESULT_PAGES); do [ -f docs/results/$$p.md ] && { echo; echo '---'; echo; sed 's/^#/##/' docs/results/$$p.md; }; done; } > docs/results.md
