# One entry point for users and CI. Every target creates .venv on first use.
PYTHON      ?= python3.11
VENV        ?= .venv
CONSTRAINTS := requirements/constraints.txt
# torch is pinned in $(CONSTRAINTS); override for a CUDA build, e.g.
#   make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC  ?= $(shell grep '^torch==' $(CONSTRAINTS))
PY          := $(VENV)/bin/python
CONFIG      ?= configs/experiment/toy_mose.yaml
ARGS        ?=
PYTEST_ARGS ?=

.PHONY: install test test-quality demo pretrain-router sft expert-group eval bench reproduce-toy clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	grep -v '^torch==' $(CONSTRAINTS) > $(VENV)/constraints-no-torch.txt
	$(PY) -m pip install -q -c $(VENV)/constraints-no-torch.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-quality: install
	$(PY) -m pytest -q -m toy_quality $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/mose demo --config $(CONFIG) $(ARGS)

pretrain-router: install
	$(VENV)/bin/mose pretrain-router --config $(CONFIG) $(ARGS)

sft: install
	$(VENV)/bin/mose sft --config $(CONFIG) $(ARGS)

# Expert groups need an expert_group config: CONFIG when given, else the toy one.
EXPERT_GROUP_CONFIG = $(if $(filter command line environment,$(origin CONFIG)),$(CONFIG),configs/experiment/toy_mose_expert_group.yaml)

expert-group: install
	$(VENV)/bin/mose expert-group --config $(EXPERT_GROUP_CONFIG) $(ARGS)

eval: install
	$(VENV)/bin/mose eval --config $(CONFIG) $(ARGS)

bench: install
	$(PY) -m benchmarks.run_all

reproduce-toy: install
	$(VENV)/bin/mose reproduce-toy $(ARGS)

clean:
	rm -rf runs artifacts .pytest_cache
