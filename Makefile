# clipcoco: the index of the project. `make help` lists every target.
# Paths are variables: override them on the command line, e.g. `make shards COCO_ROOT=/data/coco`.

PYTHON    ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
COCO_ROOT ?= data/coco
KARPATHY  ?= $(COCO_ROOT)/dataset_coco.json
DATA      ?= data/shards
TRAIN     ?= $(DATA)/karpathy-trainval
EVAL      ?= $(DATA)/karpathy-test
TEXT_MODEL ?= distilbert-base-uncased
POOLING   ?= mean
# The cache's name, by pipeline/text_cache.py's model_slug rule (a hub name with / -> --, a local model folder -> its
# name, or its parent's when it is called "model"); embed-text is given it with --out, so train and eval always find
# the file embed-text wrote.
TEXT_DIR  := $(abspath $(TEXT_MODEL))
TEXT_SLUG ?= $(if $(wildcard $(TEXT_MODEL)/config.json),$(notdir $(if $(filter model,$(notdir $(TEXT_DIR))),$(patsubst %/,%,$(dir $(TEXT_DIR))),$(TEXT_DIR))),$(subst /,--,$(TEXT_MODEL)))-$(POOLING)
CONFIG    ?= configs/coco-karpathy.yaml
RUN       ?= runs/coco-karpathy
DEMO_OUT  ?= demo-out
WORKERS   ?= 0
PYTEST_ARGS ?=
# Test files run on this many processes (pytest-xdist; each file's tests stay together, so its fixtures are built
# once): the suite takes about 4 minutes on 2 CPU cores this way, against about 5.5 in one process. 0: one process.
TEST_WORKERS ?= 2
BENCH_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install shards shards-2017 embed-text embed-images train eval demo test bench lint clean

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[1m%-12s\033[0m %s\n", $$1, $$2}'

install: $(VENV)/.installed ## create .venv and install clipcoco with its dali, plot, demo and dev extras

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dali,plot,demo,dev]'
	touch $@

shards: install ## COCO -> shards, Karpathy recipe: $(TRAIN) (train+restval) and $(EVAL) (test)
	$(BIN)/clipcoco shards --karpathy $(KARPATHY) --split trainval --images $(COCO_ROOT) --out $(TRAIN) --workers $(WORKERS)
	$(BIN)/clipcoco shards --karpathy $(KARPATHY) --split test --images $(COCO_ROOT) --out $(EVAL) --workers $(WORKERS)

shards-2017: install ## COCO 2017 official split instead: $(DATA)/train2017 and $(DATA)/val2017
	$(BIN)/clipcoco shards --annotations $(COCO_ROOT)/annotations/captions_train2017.json --images $(COCO_ROOT)/train2017 --out $(DATA)/train2017 --workers $(WORKERS)
	$(BIN)/clipcoco shards --annotations $(COCO_ROOT)/annotations/captions_val2017.json --images $(COCO_ROOT)/val2017 --out $(DATA)/val2017 --workers $(WORKERS)

embed-text: install ## every caption of $(TRAIN) and $(EVAL) through frozen $(TEXT_MODEL), once
	$(BIN)/clipcoco embed-text $(TRAIN) --model $(TEXT_MODEL) --pooling $(POOLING) --out $(TRAIN)/text-$(TEXT_SLUG).parquet
	$(BIN)/clipcoco embed-text $(EVAL) --model $(TEXT_MODEL) --pooling $(POOLING) --out $(EVAL)/text-$(TEXT_SLUG).parquet

embed-images: install ## ImageNet ResNet-50 features of $(TRAIN), once, for `clipcoco train --lock-image --image-features`
	$(BIN)/clipcoco embed-images $(TRAIN) --image-weights imagenet --out $(TRAIN)/features-resnet50-224.parquet

train: install ## train with $(CONFIG) into $(RUN) (rerun to resume)
	$(BIN)/clipcoco train --config $(CONFIG) --shards $(TRAIN) --text $(TRAIN)/text-$(TEXT_SLUG).parquet --out $(RUN)

eval: install ## score $(RUN) on $(EVAL): Recall@1/5/10 both ways, 5K and 1K protocols
	$(BIN)/clipcoco eval $(RUN) --shards $(EVAL) --text $(EVAL)/text-$(TEXT_SLUG).parquet --folds 1
	$(BIN)/clipcoco eval $(RUN) --shards $(EVAL) --text $(EVAL)/text-$(TEXT_SLUG).parquet --folds 5

demo: install ## the whole pipeline on generated data, offline, on a CPU, into $(DEMO_OUT)
	$(BIN)/clipcoco demo --out $(DEMO_OUT)

test: install ## run the test suite (GPU tests skip cleanly without a GPU)
	@$(BIN)/python -m pytest $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: treating that as a failure" >&2; fi; exit $$rc

bench: install ## every stage against its peer into docs/benchmarks.md, on $(CLIPCOCO_COCO_MINI) or generated data
	$(BIN)/python scripts/bench.py $(BENCH_ARGS)

lint: install ## ruff check
	$(BIN)/ruff check .

clean: ## remove generated data, runs and caches (keeps .venv)
	rm -rf data runs $(DEMO_OUT) .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
