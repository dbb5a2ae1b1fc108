"""The embedded default model: a tiny DeepSeek-architecture model shipped inside the package.

Contract: `resolve_model(None)` is the folder of the embedded model (config, safetensors,
tokenizer with its chat template); any other value must be an existing checkpoint folder, an
s3:// URI with a config.json under it (returned as the URI: its tensors are read remotely), or
a Hugging Face model id (`org/name[@revision]`, the snapshot folder in huggingface_hub's cache).
`scripts/build_default_model.py` rebuilds it.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "default-model"
DEFAULT_MODEL_NAME = "moeray-default"


def resolve_model(model: str | None) -> Path | str:
    if not model:
        if not (DEFAULT_MODEL_DIR / "config.json").exists():
            raise FileNotFoundError(f"the embedded default model is missing from {DEFAULT_MODEL_DIR}; "
                                    f"rebuild it with scripts/build_default_model.py")
        return DEFAULT_MODEL_DIR
    if model.startswith("s3://"):
        from moeray.storage import RemoteFolder

        if not RemoteFolder(model, quick=True).exists("config.json"):
            raise FileNotFoundError(f"model {model!r}: no config.json there; expected a Hugging Face checkpoint")
        return model.rstrip("/")
    from moeray.hub import hub_snapshot, is_hub_id

    if is_hub_id(model):
        path = hub_snapshot(model)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model {model!r}: the Hugging Face repo has no config.json")
        return path
    path = Path(model).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"model {model!r}: no config.json there; expected a Hugging Face checkpoint folder")
    return path
