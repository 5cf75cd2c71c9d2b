# make demo: a fresh machine to a finished migration (embedded S3 + SQLite) in one command.
# make test: ruff (format + lint) and the whole pytest suite.
# make bench: migrator against aws s3 sync and rclone on s3fast (about 10 minutes; not in test).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint format bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m migrator.demo --dir demo --objects 2000

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench.compare $(BENCH_ARGS)

clean:
	rm -rf demo .pytest_cache .ruff_cache
