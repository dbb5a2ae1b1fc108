"""Training on Ray Train: one `TorchTrainer` run per job spec, any method.

Contract:
- `prepare(spec)` checks everything a user can get wrong before any worker starts (base model,
  tokenizer/model match, storage, the method's own checks, and every data row with its file
  and line, read on the driver for that alone) and returns the `Prepared` facts the run needs
  (row counts, the held-out split). It never tokenizes.
- `run(spec)` reads the data with Ray Data (`read_text` over local or s3:// JSONL, parsed and
  encoded by the method inside Ray Data tasks, held-out rows chosen by a hash of each row),
  then trains over the spec's workers with DDP (gloo on CPU) or FSDP2 (`jobs.parallel`). The
  loop is the same for every method (`jobs.methods`): the method plans each round of rows
  into optimiser steps and computes their loss; the loop adds the router aux loss, clipping,
  the schedule, bias updates, metrics, evaluation and checkpoints (`jobs.checkpointing`). A
  worker failure continues from the last checkpoint, and the same spec run again resumes.
  Rank 0 hands each step's metrics to the driver, which prints them (`jobs.console`). Returns the Ray Train `Result`; `export` turns its checkpoint into the spec's output.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

import moeray.model
from moeray.jobs.checkpointing import METRICS_FILE, load_latest, report_step
from moeray.jobs.console import ProgressFeed, StepPrinter, publish, quiet_ray_data
from moeray.jobs.data import read_jsonl
from moeray.jobs.eval.tasks import load_items
from moeray.jobs.losses import router_aux_loss, update_routing_bias
from moeray.jobs.methods import Method, WorkerContext, method_for
from moeray.jobs.parallel import load_optimizer_state, parallelize
from moeray.jobs.spec import JobSpec, parse_spec
from moeray.model.tokenizer import Tokenizer
from moeray.storage import absolute_local, check_writable, local_copy, ray_storage


SHUFFLE_KEY = "_shuffle_key"  # the column training examples are sorted by when data.shuffle is on


@dataclass(frozen=True)
class Prepared:
    num_train_rows: int  # data rows (documents, conversations, prompts) used for training
    num_eval_rows: int
    held_out_below: int | None  # rows of the training file whose hash is below this are held out


def row_hash(row: dict[str, Any], seed: int) -> int:
    """A row's place in the held-out split: the same on the driver and in Ray Data tasks."""
    canonical = json.dumps(row, sort_keys=True, ensure_ascii=False)
    return int.from_bytes(hashlib.blake2b(f"{seed}:{canonical}".encode(), digest_size=8).digest(), "little")


def held_out_threshold(rows: list[dict[str, Any]], fraction: float, seed: int) -> int:
    """`data.eval_fraction`'s split of `rows` (at least two): those whose `row_hash` is below the
    returned value are held out, at least one row and at most all but one."""
    count = min(max(round(len(rows) * fraction), 1), len(rows) - 1)
    return sorted(row_hash(row, seed) for row in rows)[count]


def _validated_rows(method: Method, uri: str) -> list[dict[str, Any]]:
    rows = read_jsonl(uri)
    for line, row in rows:
        method.validate_row(row, uri, line)
    return [row for _, row in rows]


def prepare(spec: JobSpec) -> Prepared:
    """Check the spec against the world (config and tokenizer only: no weights are fetched)."""
    method = method_for(spec)
    base = local_copy(spec.base_model, skip_suffixes=(".safetensors",))
    if not (base / "config.json").exists():
        raise FileNotFoundError(f"base_model {spec.base_model!r}: no config.json there")
    tokenizer = Tokenizer.from_pretrained(base)
    args = moeray.model.ModelArgs.from_file(base / "config.json")
    if tokenizer.vocab_size > args.vocab_size:
        raise ValueError(f"the tokenizer in {base} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{args.vocab_size}: tokenizer and model do not match")
    method.check(tokenizer)
    for task in spec.eval.tasks:  # their rows are checked here too, not at the first evaluation
        load_items(task)
    check_writable(spec.checkpoint.storage)
    check_writable(spec.output)
    train_rows = _validated_rows(method, spec.data.train)
    eval_rows = _validated_rows(method, spec.data.eval) if spec.data.eval else []
    held_out_below = None
    if spec.data.eval_fraction:
        if len(train_rows) < 2:
            raise ValueError(f"data.eval_fraction: {spec.data.train} has {len(train_rows)} row(s), too few to hold "
                             "any out")
        held_out_below = held_out_threshold(train_rows, spec.data.eval_fraction, spec.train.seed)
        eval_rows = [row for row in train_rows if row_hash(row, spec.train.seed) < held_out_below]
        train_rows = [row for row in train_rows if row_hash(row, spec.train.seed) >= held_out_below]
    return Prepared(len(train_rows), len(eval_rows), held_out_below)


# ---- data, in Ray Data tasks ----------------------------------------------------------------------
def _encode_lines(batch: dict[str, Any], spec_data: dict[str, Any], training: bool, keep: str,
                  held_out_below: int | None):
    """Ray Data `map_batches` function: JSONL lines -> the method's examples (a pyarrow table).
    `keep` is "all", "train" (rows at or above the held-out hash) or "held_out"."""
    import pyarrow as pa

    spec = parse_spec(spec_data)
    method = method_for(spec)
    rows = [json.loads(line) for line in batch["text"] if line.strip()]
    if keep != "all":
        wanted = keep == "held_out"
        rows = [row for row in rows if (row_hash(row, spec.train.seed) < held_out_below) == wanted]
    tokenizer = Tokenizer.from_pretrained(local_copy(spec.base_model, skip_suffixes=(".safetensors",)))
    examples = method.encode(rows, tokenizer, training) if rows else []
    if training and spec.data.shuffle:
        for example in examples:  # int64 in Arrow: 63 bits of the hash
            example[SHUFFLE_KEY] = row_hash(example, spec.train.seed) >> 1
    return pa.Table.from_pylist(examples)


def _dataset(spec: JobSpec, uri: str, training: bool, keep: str, held_out_below: int | None):
    import ray.data

    path, filesystem = ray_storage(uri)
    # read_text, not read_json: chat rows differ in shape from line to line (tool calls, optional
    # fields), which Arrow's schema inference over a block refuses; the method parses each line.
    lines = ray.data.read_text(path, filesystem=filesystem)
    examples = lines.map_batches(_encode_lines, batch_format="numpy", batch_size=None, fn_kwargs={
        "spec_data": spec.model_dump(), "training": training, "keep": keep,
        "held_out_below": held_out_below})
    if training and spec.data.shuffle:
        # After encoding, so packed and cut rows mix across the whole file: a corpus written in
        # some order (the standard library, alphabetically) otherwise trains as a drifting stream.
        # A sort by a seeded hash of each example's content, not random_shuffle: Ray Data hands
        # blocks on in no fixed order (preserve_order is off), and a seeded random_shuffle of blocks
        # that arrive in another order is another order, where a sort is the same one whatever the
        # blocks' order, so a resumed or repeated job reads the examples in the same order.
        examples = examples.sort(SHUFFLE_KEY)
    return examples.materialize()


def _datasets(spec: JobSpec, prepared: Prepared) -> dict[str, Any]:
    split = prepared.held_out_below is not None
    datasets = {"train": _dataset(spec, spec.data.train, True, "train" if split else "all", prepared.held_out_below)}
    if spec.data.eval:
        datasets["eval"] = _dataset(spec, spec.data.eval, False, "all", None)
    elif split:
        datasets["eval"] = _dataset(spec, spec.data.train, False, "held_out", prepared.held_out_below)
    return datasets


# ---- the loop, on every worker --------------------------------------------------------------------
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


def _build_model(spec: JobSpec, base) -> torch.nn.Module:
    from moeray.jobs.export import starting_model

    model = starting_model(spec, base)
    model.train()
    if spec.moe.freeze_router:
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.requires_grad_(False)
    return model


def _worker_context(spec: JobSpec, method: Method, model, base, context) -> WorkerContext:
    import ray.train.torch

    tokenizer = Tokenizer.from_pretrained(base)
    device = ray.train.torch.get_device()
    reference = None
    if method.needs_reference():
        reference = moeray.model.load(base).to(device).eval().requires_grad_(False)
    return WorkerContext(spec, tokenizer, model, device, context.get_world_size(), context.get_world_rank(),
                         reference, method.make_rollouts(model, tokenizer))


def _task_engine(spec: JobSpec, model, ctx: WorkerContext):
    """An engine over a copy of the policy for `eval.tasks`, or None when there are none."""
    if not spec.eval.tasks:
        return None
    from moeray.jobs.rollouts import RolloutEngine

    return RolloutEngine(model, ctx.tokenizer, max_model_len=min(model.args.max_position_embeddings, 2048),
                         max_num_seqs=32, seed=spec.train.seed)


def _evaluate_tasks(spec: JobSpec, task_engine, model, is_rank0: bool) -> dict[str, float]:
    """`eval/<task>/<metric>` on the current weights (rank 0; every worker syncs, as FSDP needs)."""
    if task_engine is None:
        return {}
    from moeray.jobs.eval.runner import evaluate_engine

    task_engine.sync(model)
    return evaluate_engine(task_engine.engine, spec.eval.tasks, spec.train.seed) if is_rank0 else {}


def _rounds(shard, rows_per_round: int):
    for batch in shard.iter_batches(batch_size=rows_per_round, batch_format="pyarrow", prefetch_batches=2):
        if SHUFFLE_KEY in batch.column_names:
            batch = batch.drop_columns([SHUFFLE_KEY])
        yield batch.to_pylist()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train

    spec = parse_spec(config["spec"])
    method = method_for(spec)
    torch.manual_seed(spec.train.seed)
    context = ray.train.get_context()
    base = local_copy(spec.base_model)
    model = _build_model(spec, base)
    step, history, state = 0, [], load_latest()
    if state is not None:  # resumed: after a worker failure, or the same job run again
        model.load_state_dict(state["model"], strict=False)
        step, history = state["step"], state.get("history", [])
    ctx = _worker_context(spec, method, model, base, context)
    ctx.state.update((state or {}).get("method_state", {}))
    strategy = spec.scaling.resolved_strategy() if context.get_world_size() > 1 else "single"
    parallel_model = parallelize(model, strategy)
    if ctx.rollouts is not None:
        ctx.rollouts.sync(model)  # after a resume, and after FSDP replaced the parameters
    trainable = [p for p in model.parameters() if p.requires_grad]  # after FSDP: its sharded parameters
    optimizer = torch.optim.AdamW(trainable, lr=spec.train.learning_rate)
    if state is not None:
        load_optimizer_state(model, optimizer, state["optimizer"], strategy)
    eval_rows = [row for rows in _rounds(ray.train.get_dataset_shard("eval"), 256) for row in rows] \
        if config["has_eval"] else []
    task_engine = _task_engine(spec, model, ctx)
    shard = ray.train.get_dataset_shard("train")
    rows_per_worker = config["num_train_rows"] // context.get_world_size()
    rounds_per_epoch = max(1, math.ceil(rows_per_worker / method.rows_per_round()))
    total_steps = spec.train.max_steps or rounds_per_epoch * method.steps_per_round() * spec.train.epochs
    is_rank0 = context.get_world_rank() == 0
    run_start, first_step = time.time(), step
    while step < total_steps:
        rounds_done = 0
        for rows in _rounds(shard, method.rows_per_round()):  # one pass over this worker's shard = one epoch
            rounds_done += 1
            plan = method.plan(rows, ctx)
            for micro_batches in plan.steps:
                step_start = time.time()
                tokens, metrics = 0, {}
                for micro in micro_batches:
                    loss, metrics = method.loss(parallel_model, micro, ctx)
                    if spec.moe.router_aux_loss_coef:
                        loss = loss + spec.moe.router_aux_loss_coef * router_aux_loss(model)
                    (loss / len(micro_batches)).backward()
                    tokens += metrics.pop("tokens")
                if spec.train.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(trainable, spec.train.max_grad_norm)
                for group in optimizer.param_groups:
                    group["lr"] = spec.train.learning_rate * _lr_factor(spec, step, total_steps)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if spec.moe.bias_update_rate:
                    update_routing_bias(model, spec.moe.bias_update_rate)
                train_s = time.time() - step_start
                after = method.after_step(ctx)
                step += 1
                report = {"step": step, "loss": float(loss.detach()), "lr": optimizer.param_groups[0]["lr"],
                          "tokens_per_s": tokens * context.get_world_size() / max(train_s, 1e-6),
                          "eta_s": (time.time() - run_start) / (step - first_step) * (total_steps - step),
                          **plan.metrics, **metrics, **after}
                if step % spec.eval.every_steps == 0 or step == total_steps:
                    model.eval()
                    report.update(method.evaluate(eval_rows, ctx))
                    report.update(_evaluate_tasks(spec, task_engine, model, is_rank0))
                    model.train()
                save = step % spec.checkpoint.every_steps == 0 or step == total_steps
                history.append(report)
                if is_rank0:
                    publish(config.get("progress"), step, total_steps, report)
                if is_rank0 and config.get("metrics_path"):
                    with open(config["metrics_path"], "a") as metrics_file:  # one JSON line per step
                        metrics_file.write(json.dumps(report) + "\n")
                report_step(report, history, model, optimizer, step, save, is_rank0, strategy, ctx.state)
                if step >= total_steps:
                    return
        if rounds_done == 0:
            return


def absolute_paths(spec: JobSpec) -> JobSpec:
    """Local paths made absolute: training workers do not run in the submitter's directory."""
    fix = absolute_local
    return spec.model_copy(update={
        "base_model": fix(spec.base_model), "output": fix(spec.output),
        "data": spec.data.model_copy(update={"train": fix(spec.data.train), "eval": fix(spec.data.eval)}),
        "checkpoint": spec.checkpoint.model_copy(update={"storage": fix(spec.checkpoint.storage)}),
        "eval": spec.eval.model_copy(update={"tasks": [t.model_copy(update={"file": fix(t.file)})
                                                       for t in spec.eval.tasks]})})


def run(spec: JobSpec, prepared: Prepared | None = None, verbose: bool = False, sinks: list | None = None):
    """Train to completion (or resume); returns the Ray Train `Result`. Each step's progress
    goes to `sinks` (default: a `StepPrinter` on stdout; also experiment tracking, see
    `jobs.tracking`); `verbose` keeps Ray Data's own progress output."""
    spec = absolute_paths(spec)
    from pathlib import Path

    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    prepared = prepared or prepare(spec)
    quiet_ray_data(verbose)
    storage, filesystem = ray_storage(spec.checkpoint.storage)
    if filesystem is None:
        (Path(storage) / spec.name).mkdir(parents=True, exist_ok=True)
    datasets = _datasets(spec, prepared)
    feed = ProgressFeed()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.model_dump(), "num_train_rows": prepared.num_train_rows,
                           "has_eval": "eval" in datasets, "progress": feed.queue,
                           "metrics_path": None if filesystem else str(Path(storage) / spec.name / METRICS_FILE)},
        scaling_config=ScalingConfig(num_workers=spec.scaling.num_workers, use_gpu=spec.scaling.use_gpu,
                                     resources_per_worker=spec.scaling.resources_per_worker),
        run_config=RunConfig(name=spec.name, storage_path=storage, storage_filesystem=filesystem,
                             checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
                             failure_config=FailureConfig(max_failures=3)),
        datasets=datasets,
        # Every worker evaluates the whole held-out set; only training rows are split.
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    with feed.following(*(sinks if sinks is not None else [StepPrinter()])):
        return trainer.fit()
