# make demo: D-Cube on PneumoniaMNIST (28 px), end to end.   make test: the full test suite.
# Both bootstrap .venv on first use: torch==2.13.0 first (a CPU wheel here, the CUDA build
# elsewhere), then dcube with its test extras. A stamp file keeps later calls fast.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.dcube-installed

.PHONY: demo test venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dcube demo

# two pytest workers of one torch thread each: the 2-core budget without oversubscription
TEST_JOBS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_JOBS) tests

clean:
	rm -rf $(VENV) runs .pytest_cache
