# clipcoco: the index of the project. `make help` lists every target.
# Paths are variables: override them on the command line, e.g. `make shards COCO_ROOT=/data/coco`.

## PYTHON      the Python that makes the venv
PYTHON    ?= python3
## VENV        where `make install` puts the virtual environment
VENV      ?= .venv
BIN       := $(VENV)/bin
## COCO_ROOT   the COCO download (train2014/ val2014/ dataset_coco.json, or annotations/ train2017/ val2017/)
COCO_ROOT ?= data/coco
## KARPATHY    Karpathy's split file (from caption_datasets.zip)
KARPATHY  ?= $(COCO_ROOT)/dataset_coco.json
## DATA        where the shard folders go
DATA      ?= data/shards
## SPLIT       karpathy (train+restval / test, the retrieval benchmark) or 2017 (COCO's train2017 / val2017)
SPLIT     ?= karpathy
## TRAIN       the training shards (and their text cache)
TRAIN     ?= $(DATA)/$(if $(filter 2017,$(SPLIT)),train2017,karpathy-trainval)
## EVAL        the held-out shards scored during and after training
EVAL      ?= $(DATA)/$(if $(filter 2017,$(SPLIT)),val2017,karpathy-test)
## TEXT_MODEL  the frozen text tower: a Hugging Face name or a local model folder
TEXT_MODEL ?= distilbert-base-uncased
## POOLING     mean or cls pooling of the text tower's tokens
POOLING   ?= mean
# The cache's name: pipeline/text_cache.py's model_slug, the one rule (embed-text is given it with --out, so train and
# eval always find the file embed-text wrote); worked out once, when a target that names a cache runs (after `install`).
TEXT_SLUG ?= $(eval TEXT_SLUG := $(shell $(BIN)/python -c 'import sys; from pipeline.text_cache import model_slug; \
	print(model_slug(sys.argv[1]))' '$(TEXT_MODEL)')-$(POOLING))$(TEXT_SLUG)
## CONFIG      the training preset (a name of configs/ or a YAML path); TRAIN, EVAL and their caches override its paths
CONFIG    ?= configs/coco-karpathy.yaml
## RUN         the run folder train writes and eval scores
RUN       ?= runs/coco-$(SPLIT)
## TRAIN_ARGS  more `clipcoco train` flags, e.g. TRAIN_ARGS="--steps 2000 --batch-size 128"
TRAIN_ARGS ?=
## DEMO_OUT    where `make demo` writes
DEMO_OUT  ?= demo-out
## WORKERS     `clipcoco shards` worker processes (0: one per core)
WORKERS   ?= 0
## PYTEST_ARGS more pytest arguments for `make test`, e.g. PYTEST_ARGS="-k loader"
PYTEST_ARGS ?=
# Test files run on this many processes (pytest-xdist; each file's tests stay together, so its fixtures are built
# once): the suite takes about 4 minutes on 2 CPU cores this way, against about 5.5 in one process. 0: one process.
## TEST_WORKERS test processes for `make test` (0: one)
TEST_WORKERS ?= 2
## BENCH_ARGS  more arguments for scripts/bench.py
BENCH_ARGS ?=
HELP_VARS := $(shell sed -n 's/^## \([A-Z_]*\) .*/\1/p' $(firstword $(MAKEFILE_LIST)))
TRAIN_TEXT = $(TRAIN)/text-$(TEXT_SLUG).parquet
EVAL_TEXT  = $(EVAL)/text-$(TEXT_SLUG).parquet

.DEFAULT_GOAL := help
.PHONY: help install shards shards-2017 embed-text embed-images train eval demo test bench lint clean

help: ## list the targets, then the variables with their values (override: make TARGET NAME=value)
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | sed $(foreach v,$(HELP_VARS),-e 's|$$($(v))|$($(v))|g') \
		| awk -F':.*## ' '{printf "  \033[1m%-12s\033[0m %s\n", $$1, $$2}'
	@printf '\nvariables (make TARGET NAME=value):\n'
	@$(foreach v,$(HELP_VARS),printf '  \033[1m%-12s\033[0m = %-30s %s\n' '$(v)' '$($(v))' \
		"$$(sed -n 's/^## $(v)  *//p' $(firstword $(MAKEFILE_LIST)))";)

install: $(VENV)/.installed ## create .venv and install clipcoco with its dali, plot, demo and dev extras

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dali,plot,demo,dev]'
	touch $@

shards: install ## COCO -> shards: $(TRAIN) and $(EVAL) (SPLIT=karpathy from $(KARPATHY); SPLIT=2017 from COCO's 2017 files)
ifeq ($(SPLIT),2017)
	$(BIN)/clipcoco shards --annotations $(COCO_ROOT)/annotations/captions_train2017.json --images $(COCO_ROOT)/train2017 --out $(TRAIN) --workers $(WORKERS)
	$(BIN)/clipcoco shards --annotations $(COCO_ROOT)/annotations/captions_val2017.json --images $(COCO_ROOT)/val2017 --out $(EVAL) --workers $(WORKERS)
	@echo "next: make embed-text train eval SPLIT=2017 (each target needs SPLIT=2017 to find these shards)"
else ifeq ($(SPLIT),karpathy)
	$(BIN)/clipcoco shards --karpathy $(KARPATHY) --split trainval --images $(COCO_ROOT) --out $(TRAIN) --workers $(WORKERS)
	$(BIN)/clipcoco shards --karpathy $(KARPATHY) --split test --images $(COCO_ROOT) --out $(EVAL) --workers $(WORKERS)
else
	@echo "SPLIT=$(SPLIT): pass SPLIT=karpathy or SPLIT=2017" >&2; exit 2
endif

shards-2017: ## the same as make shards SPLIT=2017: COCO's train2017 / val2017 split
	@$(MAKE) --no-print-directory shards SPLIT=2017

embed-text: install ## every caption of $(TRAIN) and $(EVAL) through frozen $(TEXT_MODEL), once
	$(BIN)/clipcoco embed-text $(TRAIN) --model $(TEXT_MODEL) --pooling $(POOLING) --out $(TRAIN_TEXT)
	$(BIN)/clipcoco embed-text $(EVAL) --model $(TEXT_MODEL) --pooling $(POOLING) --out $(EVAL_TEXT)

embed-images: install ## ImageNet ResNet-50 features of $(TRAIN), once, for `clipcoco train --lock-image --image-features`
	$(BIN)/clipcoco embed-images $(TRAIN) --image-weights imagenet --out $(TRAIN)/features-resnet50-224.parquet

train: install ## train with $(CONFIG) on $(TRAIN), scoring $(EVAL), into $(RUN) (rerun to resume)
	$(BIN)/clipcoco train --config $(CONFIG) --shards $(TRAIN) --text $(TRAIN_TEXT) --eval-shards $(EVAL) \
		--eval-text $(EVAL_TEXT) --out $(RUN) $(TRAIN_ARGS)

eval: install ## score $(RUN) on $(EVAL): Recall@1/5/10 both ways, all images and 5 folds (the 1K protocol)
	$(BIN)/clipcoco eval $(RUN) --shards $(EVAL) --text $(EVAL_TEXT) --folds 1
	$(BIN)/clipcoco eval $(RUN) --shards $(EVAL) --text $(EVAL_TEXT) --folds 5

demo: install ## the whole pipeline on generated data, offline, on a CPU, into $(DEMO_OUT)
	$(BIN)/clipcoco demo --out $(DEMO_OUT)

test: install ## run the test suite (GPU tests skip cleanly without a GPU)
	@$(BIN)/python -m pytest $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: treating that as a failure" >&2; fi; exit $$rc

bench: install ## every stage against its peer into docs/benchmarks.md, on coco-mini ($$CLIPCOCO_COCO_MINI) or generated data
	$(BIN)/python scripts/bench.py $(BENCH_ARGS)

lint: install ## ruff check
	$(BIN)/ruff check .

clean: ## remove generated data, runs and caches (keeps .venv)
	rm -rf data runs $(DEMO_OUT) .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
