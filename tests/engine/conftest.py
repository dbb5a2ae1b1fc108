import pytest
import torch

from support import write_hf_model_folder


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    """A random transformers DeepseekV3 checkpoint with the tiny tokenizer: (folder, reference model)."""
    folder = tmp_path_factory.mktemp("engine-v3")
    return folder, write_hf_model_folder(folder, "v3", seed=11)


@pytest.fixture(scope="session")
def prompts():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (5, 23, 40, 1, 12, 64)]
