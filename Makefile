# Two commands do all set-up on a fresh machine:
#   make demo   start a local 4-engine cluster, train the MNIST CNN, sweep the paper's λ grid, show runs, stop
#   make test   pass the whole test suite
# Both create .venv when missing; `make test` also installs the Debian packages the tests need.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# real MNIST beside the checkout when it is there (no download then); else the user's cache
CLUSTER_DATA_DIR ?= $(if $(wildcard ../shared/data/MNIST/raw/train-images-idx3-ubyte),$(abspath ../shared/data),$(HOME)/.cache/cluster/data)
DEMO_SLAVES ?= 4
PYTEST_ARGS ?=
# test files run four at a time (pytest-xdist): a file's tests stay on one worker, so its shared clusters and
# slave namespaces are started once; in the order tests/conftest.py puts them (longest first). Four on two
# cores: much of a file's time is spent waiting for the processes it started (2 workers leave the cores 30 %
# idle, 4 keep them 95 % busy). TEST_WORKERS=0 runs them one after another
TEST_WORKERS ?= 4

.PHONY: demo test install system-deps clean bench

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	# --clear: a venv cut short while it was being made (Ctrl-C) has python but no pip
	$(BIN)/python -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv --clear $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# openssh-server and iproute2: the ssh/aws tests run real sshd's in network namespaces
system-deps:
	@if ! command -v sshd >/dev/null 2>&1 && ! test -x /usr/sbin/sshd || ! command -v ip >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server iproute2 >/dev/null; \
	  else echo "install openssh-server and iproute2 (as root) for the ssh/aws tests" >&2; fi; \
	fi

demo: export CLUSTER_DATA_DIR := $(CLUSTER_DATA_DIR)
demo: install
	@set -e; trap '$(BIN)/cluster stop' EXIT; \
	$(BIN)/cluster start --slaves $(DEMO_SLAVES); \
	$(BIN)/cluster train --epochs 1; \
	$(BIN)/cluster sweep --preset paper --epochs 1 --subset 5000; \
	$(BIN)/cluster runs --limit 5

# ruff (lint and format) and mypy first: configured in pyproject.toml, over the whole tree
test: install system-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder) $(PYTEST_ARGS)

bench: export CLUSTER_DATA_DIR := $(CLUSTER_DATA_DIR)
bench: install
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/time_to_accuracy.py
	$(BIN)/python benchmarks/scaling.py
	$(BIN)/python benchmarks/sweep.py
	$(BIN)/python benchmarks/ddp.py
	$(BIN)/python benchmarks/infer.py
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/elastic.py
	$(BIN)/python benchmarks/first_step.py
	$(BIN)/python benchmarks/eval_batch.py
	$(BIN)/python benchmarks/faults.py
	$(BIN)/python benchmarks/ssh_start.py
	$(BIN)/python benchmarks/ec2_client.py

clean:
	rm -rf $(VENV) .cluster build *.egg-info
