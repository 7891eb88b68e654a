# Everything a fresh machine needs: `make demo`, `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of torch; GPU users: install their CUDA torch into the venv first (README).
TORCH_PIN ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install demo test test-all test-slow bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip show torch >/dev/null 2>&1 || $(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

# The whole path a user walks: compress (the recipe's run directory), generate from the checkpoint on this machine
# (the whole-model C++ decode step), shard onto two servers (expert model: the home holds the dense weights), then
# generate across them (the second server runs as a local process).
DEMO := runs/demo
demo: install
	$(BIN)/moecompress quantize --recipe recipes/demo.yaml
	$(BIN)/moecompress generate --model $(DEMO)/checkpoint --prompt "def main(" --prompt "import os" --max-new-tokens 24
	rm -rf $(DEMO)/deploy
	$(BIN)/moecompress shard --model $(DEMO)/checkpoint --stats $(DEMO)/calibration --servers 2x1.5MB --mode expert \
		--out $(DEMO)/deploy
	$(BIN)/moecompress generate --bundles $(DEMO)/deploy --prompt "def main(" --prompt "import os" --max-new-tokens 24

# The default run (CI's): everything but the tests marked slow (multi-process runs, SIGKILL points, the reference
# models' longer checks); `make test-all` runs those too.
test: install
	$(BIN)/python -m pytest -q -m "not slow" tests

test-all: install
	$(BIN)/python -m pytest -q tests

test-slow: install
	$(BIN)/python -m pytest -q -m slow tests

clean:
	rm -rf $(VENV) build *.egg-info
