# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv if missing, install torch==2.13.0 FIRST (an unpinned torch pulls a multi-GB
# CUDA build), then the project with its extras.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e ".[dev,dask,geometry]"
	# extra props (dxtb, reward components gap/dipole) without its dependency resolution: tad-mctc 0.7.0
	# declares numpy<2 and would downgrade numpy; these are dxtb 0.4.0's pinned requirements.
	$(BIN)/python -m pip install --no-deps dxtb==0.4.0 tad-mctc==0.7.0 tad-dftd3==0.6.0 tad-dftd4==0.8.0 \
		tad-multicharge==0.5.0 opt_einsum==3.4.0 tomli==2.5.0 tomli-w==1.2.0
	# headless browser for the HTML report test (Debian/Ubuntu; skipped where apt-get is missing)
	if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update && $$SUDO apt-get install -y chromium; fi
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/fdc-mol demo

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
