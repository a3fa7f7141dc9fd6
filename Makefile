# torchloom developer tasks. Quickstart: `make demo`, `make test`.
# Installs are idempotent: the venv is rebuilt only when pyproject.toml or the lock changes (stamp file).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.torchloom-installed
# CI and the Makefile pin torch; pyproject.toml keeps a range so users may bring their own build.
TORCH_VERSION := 2.13.0
PYTEST_ARGS ?=
# The suite runs on this many pytest-xdist workers. Most of an integration test's time is waiting
# (a job's processes importing torch, heartbeats, grace periods), so two workers finish the suite in
# about 13 minutes on the 2-core machine where one took 19 to 21 (docs/benchmarks.md, "The suite").
# TEST_WORKERS=0 runs it in this process, one test at a time. --dist worksteal: the default
# scheduler hands each worker a first batch of a quarter of the tests in collection order, which put
# nearly all integration tests on one worker (17.5 minutes); a worker with nothing left takes half of
# the other's pending tests instead.
TEST_WORKERS ?= 2

.PHONY: help venv proto check test demo clean-runs ui-setup

help:
	@echo "make demo    run a 2-rank job with the web UI and steer it live (examples/demo.py)"
	@echo "make test    unit and integration tests (sets up the venv and the UI's test tools first)"
	@echo "make check   ruff format --check, ruff check, mypy --strict"
	@echo "make proto   regenerate torchloom/v1 from proto/torchloom/v1/torchloom.proto"
	@echo "make venv    create $(VENV) and install torch==$(TORCH_VERSION) and torchloom[dev,data,hf,lightning,tensorboard]"

venv: $(STAMP)

# The second install names torch again, so no extra's dependency (transformers, lightning) can make
# pip swap the pinned build for another.
$(STAMP): pyproject.toml requirements-dev.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==$(TORCH_VERSION) numpy -c requirements-dev.lock
	$(PIP) install --quiet -e '.[dev,data,hf,lightning,tensorboard]' torch==$(TORCH_VERSION) -c requirements-dev.lock
	touch $@

proto: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. \
		--mypy_out=. --mypy_grpc_out=. proto/torchloom/v1/torchloom.proto

check: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# The web UI's own setup (npm packages, a browser for its tests) lives in ui/ui.mk, owned by the UI;
# it must define a `ui-setup` target. Until it exists, ui-setup does nothing.
-include ui/ui.mk
ifeq ($(wildcard ui/ui.mk),)
ui-setup:
	@echo "ui-setup: ui/ui.mk not present; nothing to set up"
endif

test: $(STAMP) ui-setup
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=30 $(PYTEST_ARGS) tests

# The CLI lives in $(VENV)/bin: the last line says how to put `torchloom` on PATH in a new shell.
demo: $(STAMP)
	@OMP_NUM_THREADS=1 $(PY) examples/demo.py; status=$$?; \
	echo "make demo: torchloom is installed in $(VENV); in a new shell run 'source $(VENV)/bin/activate'" \
		"to put torchloom on PATH (then: torchloom --version)"; \
	exit $$status

# Embedded nats-server stores of finished runs accumulate under $TORCHLOOM_HOME/runs.
clean-runs:
	rm -rf "$${TORCHLOOM_HOME:-$$HOME/.torchloom}/runs"
