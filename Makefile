# Two commands on a fresh machine:  make demo  (train + sample on CPU)  and  make test.
# A virtualenv (.venv) is created unless one is already active.
PYTHON ?= python3
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo
DEMO_STEPS ?= 1500
DEMO_SFT_STEPS ?= 1200
# The chat set's answers: short ("it says quack .") is what the tiny model learns in the demo's
# budget; sentence ("a duck says quack .") needs the subject copied back, which it does not learn.
DEMO_ANSWERS ?= short
# sequences a step (pre-training windows of 128 tokens; SFT dialogues)
DEMO_BATCH ?= 16
DEMO_SFT_BATCH ?= 16
# CPU ranks the demo trains on (launch/local.sh: torchrun, gloo, one OpenMP thread a rank), as a
# multi-GPU job is launched; on 2 cores two ranks step faster than one process with two threads.
# Masks are keyed by sample index, so the losses are the one-rank run's up to float rounding.
DEMO_RANKS ?= 2
DEMO_LAUNCH = LLADA_PYTHON=$(abspath $(PY)) launch/local.sh --nproc $(DEMO_RANKS) --device cpu
# Warmup-Stable-Decay scaled to the demo's token budget (DEMO_BATCH x 128 tokens a step): warmup
# 20 steps to 3e-3, stable, the drop to 1e-3 at 60% of the tokens, linear to 1e-4 over the last 20%
DEMO_TOKENS = $(shell echo $$(( $(DEMO_STEPS) * $(DEMO_BATCH) * 128 )))
DEMO_WSD = schedule=wsd schedule.peak_lr=3e-3 schedule.warmup_steps=20 \
	schedule.total_tokens=$(DEMO_TOKENS) schedule.drop_at_tokens=$(shell echo $$(( $(DEMO_TOKENS) * 6 / 10 ))) \
	schedule.drop_lr=1e-3 schedule.decay_tokens=$(shell echo $$(( $(DEMO_TOKENS) * 2 / 10 ))) schedule.final_lr=1e-4
# Every install is pinned by constraints.txt (refresh on purpose with `make lock`).
# CONSTRAINTS= (empty) installs the newest releases pyproject.toml allows instead.
CONSTRAINTS ?= constraints.txt
PIP_INSTALL = $(PY) -m pip install $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: install dev demo test lint bench lock clean golden golden-spread

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(PY) pyproject.toml constraints.txt scripts/install_torch.sh
	scripts/install_torch.sh $(PY)
	$(PIP_INSTALL) -e '.[plot]'
	touch $@

install: $(VENV)/.installed

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP_INSTALL) -e '.[dev]'
	touch $@

dev: $(VENV)/.installed-dev

# Demo corpus -> BPE tokenizer -> shards -> pre-train `tiny` on CPU -> export -> SFT on the
# demo chat set -> samples from both. Re-running resumes finished stages instead of redoing them.
demo: install
	$(PY) -m data_pipelines.demo --out $(DEMO_DIR)/data --answers $(DEMO_ANSWERS)
	$(DEMO_LAUNCH) pretrain run_dir=$(DEMO_DIR)/pretrain data=demo \
		data.path=$(DEMO_DIR)/data/shards data.tokenizer=$(DEMO_DIR)/data/tokenizer.json \
		trainer.max_steps=$(DEMO_STEPS) trainer.global_batch_size=$(DEMO_BATCH) \
		trainer.micro_batch_size=$$(( $(DEMO_BATCH) / $(DEMO_RANKS) )) $(DEMO_WSD) logging.log_every=100 logging.progress_bar=false \
		data.val_fraction=0.02 trainer.eval_every=100
	$(DEMO_LAUNCH) sft run_dir=$(DEMO_DIR)/sft init_from=$(DEMO_DIR)/pretrain/export data=sft_demo \
		data.path=$(DEMO_DIR)/data/sft data.tokenizer=$(DEMO_DIR)/data/tokenizer.json \
		trainer=sft_demo schedule=sft_demo schedule.peak_lr=2e-3 schedule.final_lr=2e-4 \
		trainer.max_steps=$(DEMO_SFT_STEPS) trainer.global_batch_size=$(DEMO_SFT_BATCH) \
		trainer.micro_batch_size=$$(( $(DEMO_SFT_BATCH) / $(DEMO_RANKS) )) logging.log_every=100 logging.progress_bar=false
	$(VENV)/bin/llada-plot $(DEMO_DIR)/pretrain
	$(PY) -m llada_train.cli.demo_report --run-dir $(DEMO_DIR)/pretrain --sft-dir $(DEMO_DIR)/sft \
		--chat $(DEMO_DIR)/data/chat.jsonl

# two pytest workers: most tests wait on process start-up, so 2 cores run two at a time;
# loadscope: a module runs on one worker (its module fixtures, e.g. the live SLURM cluster, once)
TEST_WORKERS ?= 2
test: dev
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadscope --durations=10

# Re-record tests/assets/losses/{pretrain,sft}.json (the golden loss curves) after a numeric
# change made on purpose; review and commit the diff.
golden: dev
	LLADA_RECORD_GOLDEN=1 $(PY) -m pytest -q tests/test_golden_losses.py

# How far the golden curves move across instruction sets here (the tolerances' evidence).
golden-spread: dev
	$(PY) scripts/golden_spread.py

lint: dev
	$(VENV)/bin/ruff check .

bench: dev
	$(PY) benchmarks/data_bench.py
	$(PY) benchmarks/train_bench.py
	$(PY) benchmarks/sample_bench.py  # trains its model: ~15 min on 2 CPU cores
	$(PY) benchmarks/paper_mini.py --out runs/paper_mini  # ~13 min on 2 CPU cores

# Re-resolve the newest allowed releases into constraints.txt (then run make test and commit).
lock:
	scripts/lock.sh $(PYTHON)

clean:
	rm -rf runs outputs .pytest_cache
