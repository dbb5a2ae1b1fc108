"""moeray: serve and fine-tune DeepSeek-V3-class Mixture-of-Experts models on Ray.

`moeray.LLM` and `moeray.SamplingParams` are the offline entry points; they are imported on
first use so that `import moeray` stays cheap for the CLI.
"""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "AsyncEngine"]


def __getattr__(name: str):
    if name in __all__:
        import moeray.engine

        return getattr(moeray.engine, name)
    raise AttributeError(f"module 'moeray' has no attribute {name!r}")
