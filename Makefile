# Two entry points: `make test` and `make report`. Both create/use .venv and install the project.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that lies on the dev/CI machines; override on a GPU runner (TORCH_SPEC="torch").
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test report clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e .
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest tests -n auto -q

report: install
	$(PY) -m dflash.cli report

clean:
	rm -rf $(VENV) reports/*/
