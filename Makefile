# Two commands for a new user: `make demo` runs the default comparison end to end, offline;
# `make test` runs the tests. Both install everything into .venv/ first.
.PHONY: setup browser demo test test-fast lint bench

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/samesheep run

browser:
	bash scripts/setup_browser.sh

test: setup browser
	.venv/bin/python -m pytest -q

test-fast: setup
	.venv/bin/python -m pytest -q -m "not real"

lint: setup
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/ruff format --check src tests benchmarks

bench: setup
	.venv/bin/pip install --quiet --disable-pip-version-check -e ".[bench]"
	.venv/bin/python benchmarks/extract_speed.py
	.venv/bin/python benchmarks/train_speed.py
