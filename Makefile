# Two commands on a fresh machine (Python 3.10+ and make):
#   make demo   - install into .venv, then run the whole pipeline on synthetic data (embedded Ray)
#   make test   - install into .venv, then run the test suite (starts and stops its own local Ray head)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/leukray demo

# The local-cluster test runs in its own pytest process, apart from the embedded Ray the
# other tests share.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not real_data and not cluster"
	$(BIN)/python -m pytest -q -m cluster

# also the checks on ../shared/data/all-taleqani (minutes of CPU training)
test-all: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
