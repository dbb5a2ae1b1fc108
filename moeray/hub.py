"""Hugging Face model ids (`org/name`, optionally `org/name@revision`) as model sources.

Contract:
- `is_hub_id(value)`: the value has the shape of a Hub repo id and is not an existing local
  path (a folder named `org/name` under the working directory wins, as in transformers and
  vLLM); s3:// URIs and absolute paths never are.
- `hub_snapshot(value, skip_suffixes)` returns the local snapshot folder (without files ending
  in `skip_suffixes`, e.g. the weights when only the tokenizer is wanted), through huggingface_hub's own cache
  (`HF_HOME` / `HF_HUB_CACHE`, shared with transformers and every other Hub client) and its
  offline mode (`HF_HUB_OFFLINE=1`: the cache only). Only what moeray reads is fetched
  (configs, tokenizer files, safetensors). A model it cannot get raises `FileNotFoundError`
  naming the id and why: offline and not cached, no such repo or revision, or the Hub not
  reachable and nothing cached.
Why huggingface_hub: its cache layout (blobs, snapshots, refs) and its offline rules are what
users' other tools already filled; a second cache would download every model twice.
"""

from __future__ import annotations

import re
from pathlib import Path

# What moeray reads from a checkpoint; the rest of a repo (PyTorch .bin copies, ONNX, GGUF,
# images) is left on the Hub.
ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}(@[\w./-]+)?$")


def is_hub_id(value: str) -> bool:
    if "://" in value or value.startswith(("/", ".", "~")) or not _REPO_ID.fullmatch(value):
        return False
    return not Path(value).exists()


def _split(value: str) -> tuple[str, str | None]:
    repo_id, _, revision = value.partition("@")
    return repo_id, revision or None


def hub_snapshot(value: str, skip_suffixes: tuple[str, ...] = ()) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, revision = _split(value)
    patterns = [p for p in ALLOW_PATTERNS if not p.endswith(skip_suffixes)] if skip_suffixes else list(ALLOW_PATTERNS)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise FileNotFoundError(
                f"model {value!r}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE "
                f"is set; download it where the Hub is reachable (huggingface-cli download {repo_id}) or "
                f"unset HF_HUB_OFFLINE") from None
        raise FileNotFoundError(f"model {value!r}: the Hugging Face Hub ({constants.ENDPOINT}) could not be "
                                f"reached and the model is not in the cache ({constants.HF_HUB_CACHE})") from None
    except GatedRepoError:
        raise FileNotFoundError(f"model {value!r}: the repo is gated; accept its terms on the Hub and set "
                                f"HF_TOKEN") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"model {value!r}: no revision {revision!r} in {repo_id}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"model {value!r}: no such model on the Hugging Face Hub (or it is private: "
                                f"set HF_TOKEN)") from None
