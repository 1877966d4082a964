# make setup | test | demo | bench — everything runs from ./.venv, created on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

# torch is pinned here only (a CPU wheel on this machine); pyproject keeps a loose range.
$(STAMP): pyproject.toml setup.py $(wildcard kernels/CMakeLists.txt)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	@if [ -f kernels/fetch_headers.sh ]; then bash kernels/fetch_headers.sh || echo "warning: onnxruntime headers not fetched; kernels will not be built"; fi
	$(PY) -m pip install -q -e '.[torch,coding,plot,dev,ray]' --config-settings editable_mode=compat
	touch $(STAMP)

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy -p onnxcompress
	$(VENV)/bin/pytest -q

demo: setup
	$(PY) -m onnxcompress.demo
	$(PY) benchmarks/demo_real.py

bench: setup
	$(PY) -m pip install -q -e '.[bench]' --config-settings editable_mode=compat
	@for script in benchmarks/*.py; do \
	  case $$script in */_*|*/data.py|*/models.py|*/common.py|*/demo_real.py) continue;; esac; \
	  echo "== $$script"; $(PY) $$script || exit 1; \
	done

clean:
	rm -rf build dist *.egg-info onnxcompress/_kernels/*.so
