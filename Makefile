# The two set-up commands of the README: `make demo` and `make test`. Each creates the
# virtualenv on first use; the local Kafka broker's jars are fetched once into ~/.cache.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install demo test test-unit lint bench clean browser

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	touch $@

install: $(BIN)/.installed

## The main job: a real multi-stage pipeline over a real local broker.
demo: $(BIN)/.installed
	$(BIN)/python -m examples.orders.demo

## Everything CI checks: lint, types, unit and integration tests against a real broker
## (and the dashboard's in headless Chromium).
test: $(BIN)/.installed lint browser
	$(BIN)/pytest -q --durations=15

## Debian's chromium and chromium-driver, for the dashboard's browser tests (once).
CHROMEDRIVER ?= /usr/bin/chromedriver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser: $(CHROMEDRIVER)
$(CHROMEDRIVER):
	@echo "installing Debian's chromium and chromium-driver (the dashboard's browser tests)"
	$(SUDO) apt-get install -y -q chromium chromium-driver \
	  || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium chromium-driver)

## Fast loop: unit tests only (no broker).
test-unit: $(BIN)/.installed
	$(BIN)/pytest -q tests/unit

lint: $(BIN)/.installed
	$(BIN)/ruff check pipeline stages tests examples bench
	$(BIN)/ruff format --check pipeline stages tests examples bench
	$(BIN)/mypy

## Benchmarks: ratios against baselines measured in the same run (bench/README.md).
bench: $(BIN)/.installed
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
