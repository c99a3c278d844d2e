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

# Baseline coverage (every gated case has an entry, no entry is orphaned), unit, property and lossless tests,
# then the tiny-profile ablations gated against baselines/. The ablations run in a session of their own, as the
# baselines were recorded (`pytest ablations -n 2`): timed cases share the cores only with other timed cases,
# not with CPU- and memory-heavy unit tests, whose contention shifted a CPU-time speedup by up to 14%.
test: install
	$(VENV)/bin/dflash baselines --check --profile tiny
	$(PY) -m pytest tests --profile tiny -n auto -q -m "not slow"
	$(PY) -m pytest ablations --profile tiny -n auto -q -m "not slow"

# The main job: every tiny-profile ablation, gated, with a markdown summary under reports/; then the full
# cascade replay (1200 queries; the collected table is reused when it is complete) under reports/cascade-tiny/.
report: install
	$(PY) -m pytest ablations --profile tiny -n auto -q --report
	@cat "$$(ls -td reports/tiny-*/ | head -1)summary.md"
	$(VENV)/bin/dflash cascade collect --profile tiny
	$(VENV)/bin/dflash cascade report --profile tiny

clean:
	rm -rf $(VENV) reports/*/
