# make demo: D-Cube on PneumoniaMNIST (28 px), end to end.   make test: the full test suite.
# Both bootstrap .venv on first use: torch==2.13.0 first (a CPU wheel here, the CUDA build
# elsewhere), then dcube with its test extras. A stamp file keeps later calls fast.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.dcube-installed

.PHONY: demo test venv clean browser docs

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dcube demo

# two pytest workers of one torch thread each: the 2-core budget without oversubscription; an idle worker
# takes tests from the busy one (worksteal), so that the suite does not end on one core
TEST_JOBS ?= 2
test: $(STAMP) browser
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_JOBS) --dist worksteal --durations=25 tests

# report.html is tested in headless Chromium (Debian's package): installed here when missing and
# apt-get can (root); otherwise the browser test skips outside CI and fails in CI
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "make test: could not install chromium; the report's browser test needs it"

# the generated configuration reference (tests/test_docs.py fails when it is stale)
docs: $(STAMP)
	$(PY) -m dcube.config > docs/config.md

clean:
	rm -rf $(VENV) runs .pytest_cache
