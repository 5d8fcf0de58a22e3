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

.PHONY: install test test-quality test-gpu gpu-check demo pretrain-router pretrain-view-router sft expert-group eval plan plan-compare bench bench-gpu reproduce-toy clean

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

# Only the tests that need a CUDA GPU (bf16 kernels, FSDP, GPU training/eval); `make test` skips them without one.
# Install a CUDA torch first, e.g. make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
test-gpu: install
	$(PY) -m pytest -q -m cuda $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/mose demo --config $(CONFIG) $(ARGS)

pretrain-router: install
	$(VENV)/bin/mose pretrain-router --config $(CONFIG) $(ARGS)

# The view router on cached vision features (a config with views.enabled; default the toy view config).
VIEW_CONFIG = $(if $(filter command line environment,$(origin CONFIG)),$(CONFIG),configs/experiment/toy_view_moe.yaml)

pretrain-view-router: install
	$(VENV)/bin/mose pretrain-view-router --config $(VIEW_CONFIG) $(ARGS)

sft: install
	$(VENV)/bin/mose sft --config $(CONFIG) $(ARGS)

# Expert groups need an expert_group config: CONFIG when given, else the toy one.
EXPERT_GROUP_CONFIG = $(if $(filter command line environment,$(origin CONFIG)),$(CONFIG),configs/experiment/toy_mose_expert_group.yaml)

expert-group: install
	$(VENV)/bin/mose expert-group --config $(EXPERT_GROUP_CONFIG) $(ARGS)

eval: install
	$(VENV)/bin/mose eval --config $(CONFIG) $(ARGS)

# The planner head on the VLM (trajectory-level Action MoE on the toy unless CONFIG=...): train, save, evaluate.
PLAN_CONFIG = $(if $(filter command line environment,$(origin CONFIG)),$(CONFIG),configs/experiment/toy_plan.yaml)

plan: install
	$(VENV)/bin/mose plan --config $(PLAN_CONFIG) $(ARGS)

# Dense / token-level / trajectory-level / MoSE-chain planners on the synthetic set, 3 seeds (about 20 min on CPU).
plan-compare: install
	$(VENV)/bin/mose plan-compare $(ARGS)

bench: install
	$(PY) -m benchmarks.run_all

# The GPU benchmarks in bf16 (results in benchmarks/results/cuda/): the MoE layer at 2B size, generation,
# memory, and the full-size training step of Qwen2-VL-2B with random weights.
bench-gpu: install
	$(PY) -m benchmarks.run_all --only moe_layer,generate,memory --results-dir benchmarks/results/cuda -- --device cuda --dtype bfloat16 --repeats 20 --warmup 3
	$(PY) -m benchmarks.run_all --only train_step --results-dir benchmarks/results/cuda -- --device cuda --dtype bfloat16 --repeats 5 --warmup 2

# Everything a lent GPU should check, in one go (planned to take under 8 minutes on one H100/H200).
gpu-check: test-gpu bench-gpu

reproduce-toy: install
	$(VENV)/bin/mose reproduce-toy $(ARGS)

clean:
	rm -rf runs artifacts .pytest_cache
