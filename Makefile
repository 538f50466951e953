# nudgeflow: `make demo` runs the main job on the embedded default, `make test` runs the tests.
# Both work on a fresh machine with Python 3.11 and pip: everything else is installed here.
# The interpreter: the distribution's Python 3.11 when it can make venvs, else python3.11 (or python3) on
# PATH; `make PYTHON=...` chooses. A distribution's build is optimised with PGO and LTO and its executable
# holds the interpreter; pyenv's default build has neither, and ran the main flow 15-30 % slower an event
# (benchmarks/RESULTS.md, 2026-12-06). An existing .venv keeps the interpreter it was made with.
PYTHON ?= $(shell for p in /usr/bin/python3.11 "$$(command -v python3.11)" "$$(command -v python3)"; do \
            [ -x "$$p" ] && "$$p" -c "import ensurepip, venv" 2>/dev/null && { echo "$$p"; break; }; done)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# moto's S3 server for the broker-restart test (tansu's s3:// storage), in a venv of its own:
# moto needs botocore, which pins python-dateutil below the project's
MOTO   := $(VENV)/moto/bin/moto_server

.PHONY: install demo test bench bench-clickhouse bench-latency bench-models bench-instructions tools schema clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

$(MOTO): | $(STAMP)
	$(PYTHON) -m venv $(VENV)/moto
	$(VENV)/moto/bin/pip install -q "moto[server]==5.2.5"

## the main job on the embedded default: simulator -> flow -> embedded Redis, chDB, files
demo: install
	rm -rf .nudgeflow
	$(BIN)/nudgeflow run --config config/local.yaml

## system tools some tests drive (the compose file check needs Debian's docker-compose, the report test Chromium)
tools:
	@command -v docker-compose >/dev/null 2>&1 || { \
	  echo "installing docker-compose (Debian) for the compose file check"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null) \
	  || echo "could not install docker-compose: tests/test_compose.py will say so"; }
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium (Debian) for the report test (headless browser)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	  || echo "could not install chromium: tests/test_report.py will say so"; }

test: install tools $(MOTO)
	$(BIN)/pytest -q

bench: install
	$(BIN)/python -m benchmarks.run

## rows/s through the ClickHouse writer into chDB per batching policy, and the sink's share of flow time (~1 min)
bench-clickhouse: install
	$(BIN)/python -m benchmarks.clickhouse

## event->action latency p50/p99 at half the measured maximum rate, trigger cost per event with 0/10/50 triggers (~2 min)
bench-latency: install
	$(BIN)/python -m benchmarks.latency

## model quality on the simulator (progressive AUC, log loss, ECE vs a heuristic): 1M events in-process
bench-models: install
	$(BIN)/python -m benchmarks.models

## instructions per event of each step of the main flow, counted by valgrind: repeatable on a busy machine (~2 min)
bench-instructions: install
	@command -v valgrind >/dev/null 2>&1 || { \
	  echo "installing valgrind (Debian) to count instructions"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; }
	$(BIN)/python -m benchmarks.instructions

## JSON Schemas of the config files, for editors
schema: install
	$(BIN)/nudgeflow schema --out-dir config

clean:
	rm -rf .nudgeflow .pytest_cache .hypothesis
