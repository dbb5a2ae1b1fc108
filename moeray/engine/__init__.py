"""One model replica: continuous batching over a paged MLA latent cache.

`sequence`, `block_manager` and `scheduler` import no torch; `runner` turns scheduled steps into
tensors; `engine` ties them to the sampler and detokenizer; `llm` and `async_engine` are the
offline and asyncio front ends. The public names below load on first use, so importing the
torch-free modules stays torch-free.
"""

from importlib import import_module

_EXPORTS = {
    "AsyncEngine": "async_engine", "EngineDeadError": "async_engine",
    "EngineConfig": "config", "EngineConfigError": "config",
    "Engine": "engine", "EngineStats": "engine",
    "LLM": "llm", "Completion": "llm", "GenerationResult": "llm",
    "CompletionDelta": "output", "RequestOutput": "output",
    "InvalidRequestError": "params", "SamplingParams": "params",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"moeray.engine.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'moeray.engine' has no attribute {name!r}")
