"""Fixtures of the fine-tuning tests."""

import pytest

from support import write_hf_model_folder


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """The tiny transformers checkpoint (with the tiny tokenizer) that jobs fine-tune."""
    folder = tmp_path_factory.mktemp("base")
    write_hf_model_folder(folder, "v3", seed=5)
    return folder
