"""What `moeray serve` checks before it starts Ray or Serve, so a bad model or setting is one line.

Contract: `check_serving(settings)` returns nothing or raises `ServeConfigError`, a `ValueError`
whose message names the model, the file or the setting at fault. It reads only what a replica
would read first: the model's config.json, its tokenizer files and each LoRA adapter's config,
never weights; an s3:// location is probed with a client that gives up within seconds. A
replica that builds from the same settings meets the same faults in the same order (and raises
`ReplicaStartupError` with them), so a RayService, which has no CLI in front, names them too.
"""

from __future__ import annotations

from pathlib import Path

from moeray.platform.settings import ServeSettings


class ServeConfigError(ValueError):
    """The model, an adapter or a setting cannot be served."""


def check_serving(settings: ServeSettings) -> None:
    from moeray.engine.config import EngineConfigError
    from moeray.engine.speculative import SpeculativeConfigError
    from moeray.model import mtp_depth_of
    from moeray.engine.build import check_tokenizer_matches
    from moeray.model.checkpoint import read_model_args
    from moeray.model.tokenizer import Tokenizer
    from moeray.platform.default_model import resolve_model
    from moeray.storage import StorageError, local_copy

    name = repr(settings.model) if settings.model else "the embedded default model"
    try:
        folder = resolve_model(settings.model)
        args = read_model_args(folder)
        tokenizer_folder = local_copy(str(folder), skip_suffixes=(".safetensors",))
        tokenizer = Tokenizer.from_pretrained(tokenizer_folder)
        check_tokenizer_matches(tokenizer, args, str(folder))
    except (OSError, ValueError, StorageError) as err:
        raise ServeConfigError(_model_message(name, err)) from None
    try:
        config = settings.engine.to_engine_config()
        config.check(args)
        if config.speculative is not None and config.speculative.method == "mtp":
            config.speculative.check(mtp_depth_of(folder))
    except SpeculativeConfigError as err:
        raise ServeConfigError(f"setting 'engine.{err.option}': {str(err).removeprefix(err.option + ': ')}") from None
    except EngineConfigError as err:
        why = str(err).removeprefix(f"engine option {err.option}: ")
        raise ServeConfigError(f"setting 'engine.{err.option}': {why}") from None
    _check_adapters(settings)
    _check_expert_parallel(settings, args.n_routed_experts)
    if settings.chat_template:
        try:
            tokenizer.with_chat_template(Path(settings.chat_template).read_text(encoding="utf-8"),
                                         settings.chat_template)
        except (OSError, ValueError) as err:
            raise ServeConfigError(f"setting 'chat_template' ({settings.chat_template}): "
                                   f"{getattr(err, 'strerror', None) or err}") from None


def _model_message(name: str, err: BaseException) -> str:
    text = str(err)
    return text if name.strip("'") in text else f"model {name}: {text}"


def _check_adapters(settings: ServeSettings) -> None:
    from moeray.model.lora import read_adapter_config
    from moeray.storage import StorageError, local_copy

    for adapter, uri in settings.lora_adapters.items():
        try:
            read_adapter_config(local_copy(uri, skip_suffixes=(".safetensors",)))
        except (OSError, ValueError, StorageError) as err:
            raise ServeConfigError(f"setting 'lora_adapters.{adapter}' ({uri}): {err}") from None


def _check_expert_parallel(settings: ServeSettings, num_experts: int) -> None:
    ep = settings.expert_parallel
    if ep.redundant_experts and ep.shards < 2:
        raise ServeConfigError("setting 'expert_parallel.redundant_experts': redundant replicas live on other "
                               f"shards, so it needs expert_parallel.shards >= 2 (got {ep.shards})")
    if ep.shards > num_experts:
        raise ServeConfigError(f"setting 'expert_parallel.shards': {ep.shards} shards for {num_experts} routed "
                               f"experts per layer would leave shards with nothing to hold")
