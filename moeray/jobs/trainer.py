"""Fine-tuning on Ray Train: one `TorchTrainer` run per job spec.

Contract:
- `prepare(spec)` checks everything a user can get wrong before any worker starts (base model,
  tokenizer/model match, every data row with its file and line, storage) and tokenizes the data;
  for DPO it also computes the reference log-probabilities in one pass (no second model lives
  during training).
- `run(spec)` trains over the spec's workers with DDP (gloo on CPU) or FSDP2 (GPU by default;
  also runs on CPU), data sharded per worker through Ray Data, checkpoints to
  `checkpoint.storage/name` every N steps (Ray Train publishes a checkpoint only once it is
  complete, keeps the newest `keep`), continues after a worker failure from the last checkpoint,
  and resumes when the same spec runs again. Every checkpoint holds the metrics of all steps so
  far (`metrics.jsonl`) and their loss curve (`loss.png`), so the final one documents the whole
  run, resumptions included. Returns the final checkpoint and the per-step metrics; `export`
  turns it into the spec's output.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import moeray.model
from moeray.jobs.data import (IGNORE_INDEX, flatten, pack, read_jsonl, split_eval, tokenize_dpo, tokenize_sft,
                              tokenize_text, validate_dpo_row, validate_sft_row, validate_text_row)
from moeray.jobs.losses import dpo_loss, router_aux_loss, target_logprobs, update_routing_bias
from moeray.jobs.curves import plot_loss_curve
from moeray.jobs.spec import JobSpec
from moeray.model.tokenizer import Tokenizer
from moeray.storage import check_writable, local_copy, ray_storage

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss.png"


@dataclass
class PreparedData:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]


def _rows(spec: JobSpec, uri: str):
    validate = {"pretrain": validate_text_row, "sft": validate_sft_row, "dpo": validate_dpo_row}[spec.method]
    rows = read_jsonl(uri)
    for line, row in rows:
        validate(row, uri, line)
    return [row for _, row in rows]


def _dpo_example(model, tokenizer: Tokenizer, row: dict, max_length: int) -> dict[str, Any]:
    parts = tokenize_dpo(row, tokenizer, max_length)
    example = {}
    for side in ("chosen", "rejected"):
        example[f"{side}_ids"] = parts["prompt_ids"] + parts[f"{side}_ids"]
        example[f"{side}_mask"] = [0] * len(parts["prompt_ids"]) + [1] * len(parts[f"{side}_ids"])
    with torch.no_grad():
        ref_chosen, ref_rejected = _pair_logprobs(model, [example])
    example["ref_chosen"], example["ref_rejected"] = float(ref_chosen[0]), float(ref_rejected[0])
    return example


def prepare(spec: JobSpec, check_only: bool = False) -> PreparedData | None:
    """Check the spec against the world, then tokenize. With `check_only` it stops after the
    checks (what `moeray jobs submit` runs on the submitting machine: no tokenization, no DPO
    reference pass, and no model weights fetched, only config and tokenizer)."""
    base = local_copy(spec.base_model, skip_suffixes=(".safetensors",))
    if not (base / "config.json").exists():
        raise FileNotFoundError(f"base_model {spec.base_model!r}: no config.json there")
    tokenizer = Tokenizer.from_pretrained(base)
    args = moeray.model.ModelArgs.from_file(base / "config.json")
    if tokenizer.vocab_size > args.vocab_size:
        raise ValueError(f"the tokenizer in {base} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{args.vocab_size}: tokenizer and model do not match")
    check_writable(spec.checkpoint.storage)
    check_writable(spec.output)
    train_rows = _rows(spec, spec.data.train)
    eval_rows = _rows(spec, spec.data.eval) if spec.data.eval else []
    if spec.data.eval_fraction:
        train_rows, eval_rows = split_eval(train_rows, spec.data.eval_fraction, spec.train.seed)
    if check_only:
        return None
    max_len = spec.train.max_length
    if spec.method == "pretrain":
        return PreparedData(tokenize_text([r["text"] for r in train_rows], tokenizer, max_len),
                            tokenize_text([r["text"] for r in eval_rows], tokenizer, max_len))
    if spec.method == "sft":
        def encode(rows, packed):
            examples = [tokenize_sft(r["messages"], tokenizer, max_len, r.get("tools")) for r in rows]
            if packed:
                return pack(examples, max_len)
            return [{"input_ids": ids, "labels": labels} for ids, labels in examples]
        return PreparedData(encode(train_rows, spec.train.packing), encode(eval_rows, False))
    reference = moeray.model.load(spec.base_model).eval()  # the reference pass, then it is gone
    data = PreparedData([_dpo_example(reference, tokenizer, r, max_len) for r in train_rows],
                        [_dpo_example(reference, tokenizer, r, max_len) for r in eval_rows])
    del reference
    return data


def _lr_factor(spec: JobSpec, step: int, total: int) -> float:
    warmup = spec.train.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if spec.train.lr_schedule == "linear":
        return max(0.0, 1.0 - progress)
    if spec.train.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def _response_rows(example: dict[str, Any], side: str) -> dict[str, list[int]]:
    """A DPO side as a row whose labels are its response tokens (the prompt is IGNORE_INDEX)."""
    ids = example[f"{side}_ids"]
    return {"input_ids": ids, "labels": [t if m else IGNORE_INDEX for t, m in zip(ids, example[f"{side}_mask"])]}


def _pair_logprobs(model, examples: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probabilities [B] of the chosen and of the rejected sides: both sides of
    every pair in one padding-free forward."""
    device = next(model.parameters()).device
    rows = [_response_rows(e, "chosen") for e in examples] + [_response_rows(e, "rejected") for e in examples]
    logprobs, sequence = target_logprobs(model, flatten(rows).to(device))
    totals = torch.zeros(len(rows), device=device, dtype=logprobs.dtype).index_add(0, sequence, logprobs)
    return totals[:len(examples)], totals[len(examples):]


def _batch_loss(model, spec: JobSpec, batch: list[dict[str, Any]]):
    """Loss and metrics of one batch (list-of-rows form, as Ray Data hands them over). Rows run
    without padding (`flatten`) and the output head only where the loss looks."""
    device = next(model.parameters()).device
    if spec.method in ("pretrain", "sft"):
        logprobs, _ = target_logprobs(model, flatten(batch).to(device))
        loss = -logprobs.mean() if logprobs.numel() else logprobs.sum()
        metrics = {"tokens": int(logprobs.numel())}
    else:
        policy_chosen, policy_rejected = _pair_logprobs(model, batch)
        ref_c = torch.tensor([r["ref_chosen"] for r in batch], device=device)
        ref_r = torch.tensor([r["ref_rejected"] for r in batch], device=device)
        loss, metrics = dpo_loss(policy_chosen, policy_rejected, ref_c, ref_r, spec.train.beta)
        metrics["tokens"] = sum(sum(r["chosen_mask"]) + sum(r["rejected_mask"]) for r in batch)
    if spec.moe.router_aux_loss_coef:
        loss = loss + spec.moe.router_aux_loss_coef * router_aux_loss(model)
    return loss, metrics


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from moeray.jobs.lora import apply_lora

    spec = JobSpec.model_validate(config["spec"])
    torch.manual_seed(spec.train.seed)
    context = ray.train.get_context()
    base = local_copy(spec.base_model)
    if spec.init == "random":
        model = moeray.model.build(moeray.model.ModelArgs.from_file(base / "config.json"), seed=spec.train.seed)
    else:
        model = moeray.model.load(base)
    model.train()
    if spec.lora is not None:
        apply_lora(model, spec.lora.target_modules, spec.lora.rank, spec.lora.alpha, spec.lora.dropout, spec.train.seed)
    if spec.moe.freeze_router:
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.requires_grad_(False)
    step, history, state = 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # resumed: after a worker failure, or the same job run again
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, weights_only=False)
        model.load_state_dict(state["model"], strict=False)
        step, history = state["step"], state.get("history", [])
    strategy = spec.scaling.resolved_strategy() if context.get_world_size() > 1 else "single"
    parallel_model = _parallelize(model, strategy)
    trainable = [p for p in model.parameters() if p.requires_grad]  # after FSDP: its sharded parameters
    optimizer = torch.optim.AdamW(trainable, lr=spec.train.learning_rate)
    if state is not None:
        _load_optimizer_state(model, optimizer, state["optimizer"], strategy)
    start_time = run_start = time.time()
    first_step = step  # 0, or the step this (resumed) run continues from
    shard = ray.train.get_dataset_shard("train")
    batch_size, accumulate = spec.train.per_device_batch_size, spec.train.gradient_accumulation_steps
    rows_per_epoch = config["num_train_rows"] // context.get_world_size()
    steps_per_epoch = max(1, rows_per_epoch // (batch_size * accumulate))
    total_steps = spec.train.max_steps or steps_per_epoch * spec.train.epochs
    done = step >= total_steps
    while not done:
        micro = 0
        for batch in _batches(shard, batch_size):  # one pass over this worker's shard = one epoch
            loss, metrics = _batch_loss(parallel_model, spec, batch)
            (loss / accumulate).backward()
            micro += 1
            if micro % accumulate:
                continue
            if spec.train.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, spec.train.max_grad_norm)
            for group in optimizer.param_groups:
                group["lr"] = spec.train.learning_rate * _lr_factor(spec, step, total_steps)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if spec.moe.bias_update_rate:
                update_routing_bias(model, spec.moe.bias_update_rate)
            step += 1
            elapsed = time.time() - start_time
            report = {"step": step, "loss": float(loss), "lr": optimizer.param_groups[0]["lr"],
                      "tokens_per_s": metrics.pop("tokens") * context.get_world_size() / max(elapsed, 1e-6),
                      "eta_s": (time.time() - run_start) / (step - first_step) * (total_steps - step), **metrics}
            start_time = time.time()
            if step % spec.eval.every_steps == 0 or step == total_steps:
                report["eval_loss"] = _eval_loss(model, spec, config["eval_rows"])
            save = step % spec.checkpoint.every_steps == 0 or step == total_steps
            history.append(report)
            if context.get_world_rank() == 0 and config.get("metrics_path"):
                with open(config["metrics_path"], "a") as metrics_file:  # one JSON line per step
                    metrics_file.write(json.dumps(report) + "\n")
            _report(report, history, model, optimizer, step, save, context.get_world_rank() == 0, strategy)
            if step >= total_steps:
                done = True
                break
        if micro == 0:
            break


def _batches(shard, batch_size: int):
    """Batches of rows (dicts of lists) from this worker's Ray Data shard, prefetched in the
    background so the training step does not wait on the data pipeline."""
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=4):
        columns = list(batch)
        yield [{column: _as_list(batch[column][i]) for column in columns} for i in range(len(batch[columns[0]]))]


def _as_list(value):
    return value.tolist() if hasattr(value, "tolist") else value


@torch.no_grad()
def _eval_loss(model, spec: JobSpec, rows: list[dict[str, Any]]) -> float | None:
    if not rows:
        return None
    model.eval()
    losses = [float(_batch_loss(model, spec, rows[i:i + 8])[0]) for i in range(0, len(rows), 8)]
    model.train()
    return sum(losses) / len(losses)


def _parallelize(model: torch.nn.Module, strategy: str) -> torch.nn.Module:
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
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    raise ValueError(f"unknown parallel strategy {strategy!r}")


def _full_state(model: torch.nn.Module, optimizer, strategy: str) -> tuple[dict, dict]:
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


def _load_optimizer_state(model: torch.nn.Module, optimizer, saved: dict, strategy: str) -> None:
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(saved)


def _report(metrics: dict, history: list[dict], model, optimizer, step: int, save: bool, is_rank0: bool,
            strategy: str) -> None:
    """Log the step's progress; on checkpoint steps report to Ray Train with a checkpoint holding
    the training state, the metrics of every step so far (metrics.jsonl) and their loss curve
    (loss.png). Only checkpoint steps call `ray.train.report`: each call synchronises with the
    Train controller (about 2 s on a small machine), far longer than a small model's step."""
    import ray.train

    if is_rank0:
        eta = metrics.get("eta_s")
        print(f"moeray: step {step} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
              f"tokens/s {metrics['tokens_per_s']:.0f}"
              + (f" eval_loss {metrics['eval_loss']:.4f}" if metrics.get("eval_loss") is not None else "")
              + (f" eta {eta:.0f}s" if eta is not None else ""), flush=True)
    if not save:
        return
    weights, optimizer_state = _full_state(model, optimizer, strategy)
    if not is_rank0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save({"model": weights, "optimizer": optimizer_state, "step": step, "history": history},
                   Path(folder) / STATE_FILE)
        (Path(folder) / "metrics.json").write_text(json.dumps(metrics))
        (Path(folder) / METRICS_FILE).write_text("".join(json.dumps(row) + "\n" for row in history))
        plot_loss_curve(history, Path(folder) / LOSS_CURVE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def absolute_paths(spec: JobSpec) -> JobSpec:
    """Local paths made absolute: training workers do not run in the submitter's directory."""
    def fix(value: str | None) -> str | None:
        return value if value is None or "://" in value else os.path.abspath(value)

    return spec.model_copy(update={
        "base_model": fix(spec.base_model), "output": fix(spec.output),
        "data": spec.data.model_copy(update={"train": fix(spec.data.train), "eval": fix(spec.data.eval)}),
        "checkpoint": spec.checkpoint.model_copy(update={"storage": fix(spec.checkpoint.storage)})})


def run(spec: JobSpec, data: PreparedData | None = None):
    """Train to completion (or resume); returns the Ray Train `Result`."""
    spec = absolute_paths(spec)
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    data = data or prepare(spec)
    storage, filesystem = ray_storage(spec.checkpoint.storage)
    if filesystem is None:
        (Path(storage) / spec.name).mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.model_dump(), "eval_rows": data.eval,
                           "num_train_rows": len(data.train),
                           "metrics_path": None if filesystem else str(Path(storage) / spec.name / "metrics.jsonl")},
        scaling_config=ScalingConfig(num_workers=spec.scaling.num_workers, use_gpu=spec.scaling.use_gpu,
                                     resources_per_worker=spec.scaling.resources_per_worker),
        run_config=RunConfig(name=spec.name, storage_path=storage, storage_filesystem=filesystem,
                             checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
                             failure_config=FailureConfig(max_failures=3)),
        datasets={"train": ray.data.from_items(data.train)},
    )
    return trainer.fit()
