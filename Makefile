# Selaras: `make help` lists the targets.
SHELL := /bin/bash
# The first supported interpreter on the machine (3.11 first: CI tests on it); override with PYTHON=python3.13.
PYTHON ?= $(firstword $(foreach candidate,python3.11 python3.12 python3.13,$(if $(shell command -v $(candidate)),$(candidate))) python3.11)
VENV ?= .venv
PY := $(VENV)/bin/python
PROD_STAMP := $(VENV)/.installed-prod
DEV_STAMP := $(VENV)/.installed-dev
# The OpenAPI client generator in its own virtualenv: it pins typer below the version the selaras CLI needs.
CODEGEN_VENV ?= $(VENV)-codegen
CODEGEN := $(CODEGEN_VENV)/bin/openapi-python-client
export OPENAPI_PYTHON_CLIENT := $(abspath $(CODEGEN))
DATA_DIR ?= data

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(PY):
	@command -v $(PYTHON) >/dev/null || { echo "need Python 3.11, 3.12 or 3.13 (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Both install the exact versions of constraints.txt; pyproject.toml only holds the compatible ranges.
$(PROD_STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --quiet -c constraints.txt -e .
	@touch $(PROD_STAMP)

# The dev install is a superset of the production one, so it satisfies the production stamp too.
$(DEV_STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,dask]"
	@touch $(DEV_STAMP) $(PROD_STAMP)

$(CODEGEN): constraints-codegen.txt
	$(PYTHON) -m venv $(CODEGEN_VENV)
	$(CODEGEN_VENV)/bin/pip install --quiet -c constraints-codegen.txt "openapi-python-client>=0.29,<0.30"
	@touch $(CODEGEN)

install: $(PROD_STAMP) ## production virtualenv (.venv): the services and the CLI, pinned, no dev tools

install-dev: $(DEV_STAMP) ## development virtualenv: production + test, lint and Dask tools

codegen: $(CODEGEN) ## the OpenAPI Python client generator in its own virtualenv ($(CODEGEN_VENV), for the client test)

demo: $(PROD_STAMP) ## generate the demo shop, train, run its experiment, start both services (embedded stores) and print URLs and curls
	$(PY) -m services.cli demo --data-dir $(DATA_DIR)

# Tests of everything that depends on "now" (messages, experiments, policy evaluation, aggregation, the clock
# itself), run again with the process's wall clock shifted 60 days either way: a test that passes only on some
# calendar dates reads the wall clock where it should set the business clock.
CLOCK_TESTS := tests/common/test_clock.py tests/profile/test_aggregations.py tests/messages/test_messages.py \
	tests/messages/test_message_endpoints.py tests/messages/test_message_model.py \
	tests/messages/test_message_ope.py tests/experiments/test_experiments.py \
	tests/experiments/test_store.py tests/experiments/test_stats.py tests/experiments/test_assignment.py \
	tests/offline/test_policy_eval.py tests/recommend/test_item_cache.py tests/recommend/test_time_safety.py
CLOCK_SHIFTED := scripts/with_redis.sh $(PY) -m pytest -q -p no:cacheprovider

test: $(DEV_STAMP) $(CODEGEN) ## ruff, mypy, the whole pytest suite against a real Redis, then the clock-shift runs
	scripts/ensure_system_packages.sh
	$(VENV)/bin/ruff check services tests bench
	$(VENV)/bin/ruff format --check services tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	scripts/with_redis.sh $(PY) -m pytest $(PYTEST_ARGS)
	$(CLOCK_SHIFTED) --shift-clock-days=60 $(CLOCK_TESTS)
	$(CLOCK_SHIFTED) --shift-clock-days=-60 $(CLOCK_TESTS)

test-clock: $(DEV_STAMP) ## only the date-dependent tests, with the wall clock shifted +60 and -60 days
	$(CLOCK_SHIFTED) --shift-clock-days=60 $(CLOCK_TESTS)
	$(CLOCK_SHIFTED) --shift-clock-days=-60 $(CLOCK_TESTS)

lint: $(DEV_STAMP) ## ruff, mypy and the import contracts (pyproject.toml [tool.importlinter])
	$(VENV)/bin/ruff check services tests bench
	$(VENV)/bin/ruff format --check services tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: $(DEV_STAMP) ## apply ruff's formatting and safe fixes
	$(VENV)/bin/ruff format services tests bench
	$(VENV)/bin/ruff check --fix services tests bench

aggregator: $(PROD_STAMP) ## the aggregator as its own process (set PROFILE_AGGREGATOR_ENABLED=false on the profile API)
	$(PY) -m services.cli run aggregator --data-dir $(DATA_DIR)

bench: $(DEV_STAMP) ## run the benchmark suite (real services, Redis online store); writes bench/results.{json,md}
	scripts/with_redis.sh $(PY) -m bench.run

profile: $(DEV_STAMP) ## py-spy samples of both services under load (after make bench); writes bench/profile.md
	scripts/with_redis.sh $(PY) -m bench.profile

soak: $(DEV_STAMP) ## 10-minute soak at a fixed rate: memory growth and errors
	scripts/with_redis.sh $(PY) -m bench.soak

# Public purchase histories (NAME.txt + NAME_item2attributes.json); the default is the team's shared copy.
DATA ?= $(if $(wildcard ../shared/data/amazon),../shared/data/amazon,)
eval-public: $(PROD_STAMP) ## published-protocol ranking evaluation of every NAME.txt in DATA=folder; writes docs/quality.md
	@test -n "$(DATA)" || { echo "usage: make eval-public DATA=<folder with NAME.txt histories>"; exit 2; }
	$(PY) -m services.cli evaluate public $(DATA) --report docs/quality.md

ABLATION ?= Toys_and_Games
eval-ablation: $(PROD_STAMP) ## generators added one at a time on DATA/ABLATION.txt; writes docs/quality-ablation.md
	@test -n "$(DATA)" || { echo "usage: make eval-ablation DATA=<folder> ABLATION=<name>"; exit 2; }
	$(PY) -m services.cli evaluate ablation $(DATA)/$(ABLATION).txt --attributes $(DATA)/$(ABLATION)_item2attributes.json

clean: ## remove generated data (keeps the virtualenv)
	rm -rf $(DATA_DIR) bench/tmp

.PHONY: help install install-dev codegen demo aggregator test test-clock lint format bench profile soak eval-public eval-ablation clean
