# Quick start:  make demo   |   make test
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-quick mutation clean

$(STAMP): requirements.txt requirements-dev.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	# gRPC client protos; --no-deps because it declares the full `tensorflow`
	# package, while the CPU build installed above provides all it imports.
	$(PY) -m pip install -q --no-deps tensorflow-serving-api==2.21.0
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.pipeline --flagfile=experiments/configs/demo_pipeline.flags --output_dir=runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# Mutation testing of the numerics-critical modules (setup.cfg [mutmut]);
# `.venv/bin/mutmut results` lists the survivors, `mutmut show NAME` one of them.
mutation: $(STAMP)
	$(PY) -m pip install -q mutmut==3.8.1
	$(VENV)/bin/mutmut run --max-children 2

clean:
	rm -rf $(VENV) runs mutants
