# Two commands on a fresh machine (Python 3.10+ and make):
#   make demo      - install into .venv, then run the whole pipeline on synthetic data (embedded Ray)
#   make test      - install into .venv, then the fast tests (unit and embedded-Ray integration)
#   make test-slow - the slow tier: fault injection, S3, subprocess kills, the local `ray start --head`,
#                    and the checks on ../shared/data/all-taleqani (skipped where it is absent)
#   make test-all  - every test, both tiers (.ci/run runs `make test` then `make test-slow`)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-all install clean

# PYTHONWARNINGS: setuptools' "Editable installation" notice is advice for package authors,
# printed on every install.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/leukray demo

# pytest exits 5 when a marker selects no test (e.g. an optional extra is missing): not a failure.
PYTEST = $(BIN)/python -m pytest -q
define pytest_tier
	$(PYTEST) $(1) || test $$? -eq 5
endef

# Fast tier (the README command): every test without a marker below. Slow tests take more
# than ~20 s each or start their own Ray/processes. `gpu` tests run here (skipped without
# CUDA: tests/conftest.py); `real_data` ones run in the slow tier.
test: $(STAMP)
	$(call pytest_tier,-m "not slow and not faults and not cluster and not real_data")

# Slow tier; the local-cluster test runs in its own pytest process, apart from the embedded
# Ray the other tests share.
# One rerun of a failed test (pytest-rerunfailures): these tests kill processes and nodes and
# wait on Ray's recovery, so a machine busy with other work can push one past its timeout; a
# real failure fails twice. The fast tier never reruns.
test-slow: $(STAMP)
	$(call pytest_tier,-m "(slow or faults or real_data) and not cluster" --reruns 1)
	$(call pytest_tier,-m cluster --reruns 1)

# Everything, including the checks on ../shared/data/all-taleqani (minutes of CPU training).
# The local-cluster test again in its own process.
test-all: $(STAMP)
	$(call pytest_tier,-m "not cluster")
	$(call pytest_tier,-m cluster)

clean:
	rm -rf runs .pytest_cache
