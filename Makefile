# Selaras: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR ?= data

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,dask]"
	@touch $(STAMP)

install: $(STAMP) ## create/update the virtualenv (.venv) with pinned dependencies

demo: $(STAMP) ## generate the demo shop, train, start both services (embedded stores) and print curls
	$(PY) -m services.cli demo --data-dir $(DATA_DIR)

test: $(STAMP) ## ruff, mypy and the whole pytest suite against a real Redis
	scripts/ensure_system_packages.sh
	$(VENV)/bin/ruff check services tests bench
	$(VENV)/bin/ruff format --check services tests bench
	$(VENV)/bin/mypy
	scripts/with_redis.sh $(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP) ## ruff + mypy only
	$(VENV)/bin/ruff check services tests bench
	$(VENV)/bin/ruff format --check services tests bench
	$(VENV)/bin/mypy

format: $(STAMP) ## apply ruff's formatting and safe fixes
	$(VENV)/bin/ruff format services tests bench
	$(VENV)/bin/ruff check --fix services tests bench

bench: $(STAMP) ## run the benchmark suite (real services, Redis online store); writes bench/results.{json,md}
	scripts/with_redis.sh $(PY) -m bench.run

profile: $(STAMP) ## py-spy samples of both services under load (after make bench); writes bench/profile.md
	scripts/with_redis.sh $(PY) -m bench.profile

soak: $(STAMP) ## 10-minute soak at a fixed rate: memory growth and errors
	scripts/with_redis.sh $(PY) -m bench.soak

# Public purchase histories (NAME.txt + NAME_item2attributes.json); the default is the team's shared copy.
DATA ?= $(if $(wildcard ../shared/data/amazon),../shared/data/amazon,)
eval-public: $(STAMP) ## published-protocol ranking evaluation of every NAME.txt in DATA=folder; writes docs/quality.md
	@test -n "$(DATA)" || { echo "usage: make eval-public DATA=<folder with NAME.txt histories>"; exit 2; }
	$(PY) -m services.cli evaluate public $(DATA) --report docs/quality.md

clean: ## remove generated data (keeps the virtualenv)
	rm -rf $(DATA_DIR) bench/tmp

.PHONY: help install demo test lint format bench profile soak eval-public clean
