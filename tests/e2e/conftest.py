"""Fixtures of the HTTP tests: one tiny checkpoint, a LoRA adapter of it, the main app."""

import pytest

from support import API_KEY, deploy, undeploy, write_hf_model_folder, write_random_adapter  # noqa: F401


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served-model")
    write_hf_model_folder(folder, "v3", seed=21)
    return folder


@pytest.fixture(scope="session")
def lora_adapter(model_folder, tmp_path_factory):
    """(adapter folder, the in-memory base model with that adapter applied, unmerged)."""
    folder = tmp_path_factory.mktemp("served-adapter")
    return folder, write_random_adapter(model_folder, folder, seed=8)


@pytest.fixture(scope="module")
def served(serve_port, model_folder, lora_adapter):
    """The main app: the tiny transformers checkpoint, API keys on, one LoRA adapter beside it."""
    settings = {"model": str(model_folder), "served_model_name": "tiny-moe", "api_keys": [API_KEY],
                "lora_adapters": {"tiny-moe-lora": str(lora_adapter[0])},
                "engine": {"max_model_len": 256, "block_size": 4, "num_cache_blocks": 2048}}
    yield deploy(settings, "/", serve_port, "main")
    undeploy("main")
