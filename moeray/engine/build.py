"""The one way an engine is built, for `LLM` (offline) and the Serve replica alike.

Contract: `build_engine(model, config, experts=None, tokenizer=None, chat_template=None,
adapters=None)` loads the checkpoint (a folder, an s3:// URI: tensors stream from it, only the
tokenizer files are copied; or a Hugging Face model id, read from huggingface_hub's cache),
checks that tokenizer and model match, applies a chat template
override, builds the LoRA variants (`adapters(model)` returns them by name) and returns the
`Engine`, whose constructor runs the explicit build steps (cache, scheduler, and the native
decoder's `prepare` where `config.kernels` allows it). `experts` is an `ExpertBackend`
(routed experts elsewhere, e.g. `moeray.actors.dispatch.start_expert_parallel`); None keeps
them in this process. Nothing here imports Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import moeray.model
from moeray.engine.config import EngineConfig
from moeray.engine.engine import Engine
from moeray.model.moe import ExpertBackend
from moeray.model.tokenizer import Tokenizer
from moeray.model.transformer import DeepseekForCausalLM
from moeray.storage import local_copy, model_location

Adapters = Callable[[DeepseekForCausalLM], dict[str, DeepseekForCausalLM]]


def check_tokenizer_matches(tokenizer: Tokenizer, args: moeray.model.ModelArgs, where: str) -> None:
    if tokenizer.vocab_size > args.vocab_size:
        raise ValueError(f"the tokenizer in {where} has {tokenizer.vocab_size} tokens but the model's "
                         f"vocab_size is {args.vocab_size}: tokenizer and model do not match")


def build_engine(model: str | Path, config: EngineConfig, experts: ExpertBackend | None = None,
                 tokenizer: str | Path | None = None, chat_template: str | Path | None = None,
                 adapters: Adapters | None = None) -> Engine:
    model = model_location(model)  # a Hugging Face model id: its snapshot in huggingface_hub's cache
    # MTP drafting needs the checkpoint's MTP layers; Engine refuses a model without one.
    mtp = config.speculative is not None and config.speculative.method == "mtp"
    loaded = moeray.model.load(model, dtype=config.torch_dtype, device=config.device, local_experts=experts is None,
                               fp8=config.fp8, mtp_depth=moeray.model.mtp_depth_of(model) if mtp else 0)
    source = str(tokenizer or model)
    tok = Tokenizer.from_pretrained(local_copy(source, skip_suffixes=(".safetensors",)))
    check_tokenizer_matches(tok, loaded.args, source)
    if chat_template:
        tok = tok.with_chat_template(Path(chat_template).read_text(encoding="utf-8"), str(chat_template))
    return Engine(loaded, tok, config, experts, adapters(loaded) if adapters else None)
