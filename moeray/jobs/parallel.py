"""Data parallelism for training workers: DDP or FSDP2, and whole states for checkpoints.

Contract: `parallelize(model, strategy)` returns the module the training step calls: the model
itself ("single"), DDP around it ("ddp") or the model sharded in place with FSDP2 ("fsdp",
one unit per decoder layer, MTP layers included, plus the root). `full_state(model, optimizer,
strategy)` returns (trainable parameters and buffers, optimizer state), whole and on CPU (under
FSDP a collective: every worker calls it); `load_optimizer_state` puts a saved one back.
"""

from __future__ import annotations

import torch


def parallelize(model: torch.nn.Module, strategy: str) -> torch.nn.Module:
    """The module the training step calls: the model itself, DDP around it, or the model sharded
    in place with FSDP2 (one unit per decoder layer plus the root)."""
    import ray.train.torch

    if strategy == "single":
        return model.to(ray.train.torch.get_device())
    if strategy == "ddp":
        return ray.train.torch.prepare_model(model, parallel_strategy="ddp")
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        device = ray.train.torch.get_device()
        model.to(device)
        with torch.no_grad():
            for param in model.parameters():
                if not param.is_contiguous():  # FSDP shards flat storage; down_proj is stored column-major
                    param.data = param.data.contiguous()
        for layer in [*model.model.layers, *getattr(model.model, "mtp_layers", ())]:
            fully_shard(layer)
        fully_shard(model)
        return model
    raise ValueError(f"unknown parallel strategy {strategy!r}")


def full_state(model: torch.nn.Module, optimizer, strategy: str) -> tuple[dict, dict]:
    """(trainable parameters and buffers, optimizer state), whole and on CPU. Under FSDP this is a
    collective: every worker must call it."""
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=options)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
        return ({n: t for n, t in weights.items() if n in trainable},
                get_optimizer_state_dict(model, optimizer, options=options))
    trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach().cpu() for n, b in model.named_buffers()}
    return {**trainable, **buffers}, optimizer.state_dict()


def load_optimizer_state(model: torch.nn.Module, optimizer, saved: dict, strategy: str) -> None:
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(saved)


