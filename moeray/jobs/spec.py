"""Training job specs: a union over methods, loaded from YAML.

Contract: `JobSpec` holds what every method shares (model, data, optimisation, MoE, scaling,
checkpoints, outputs); each method (`moeray.jobs.methods`) subclasses it with
`method: Literal[name]` and its own options section (`sft:`, `dpo:`, `grpo:`).
`JobSpec.from_yaml(path)` and `parse_spec(data)` return the method's spec, validated, or raise
`JobSpecError` whose message names the file, the line and the dotted key (`spec.yaml:7: setting
'train.learing_rate': unknown setting`); malformed YAML and an unknown method name the file and
line too. Every model forbids unknown keys and every field carries a description. Cross-field
rules: `data.eval` and `data.eval_fraction` exclude each other, and `output_format: adapter`
needs a `lora` section. `to_yaml()` writes a document that `from_yaml` reads back to an equal
spec.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from moeray.config_io import YamlDocument, explain, line_of, read_yaml
from moeray.jobs.eval.spec import TaskSpec

# Attention projections of DeepSeek-V2/V3 (multi-head latent attention), by Hugging Face name.
DEFAULT_LORA_TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


class JobSpecError(ValueError):
    """A job spec is unreadable, unknown keys or invalid values included."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSpec(_Strict):
    """Low-rank adapters on chosen linear layers; the base weights stay frozen."""

    rank: int = Field(8, ge=1, description="Rank r of each adapter pair (A: r x in, B: out x r).")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: adapter output is multiplied by alpha / rank.")
    dropout: float = Field(0.0, ge=0, le=1, description="Dropout on the adapter input during training.")
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_LORA_TARGETS), min_length=1,
                                      description="Hugging Face module names (last path component) that get "
                                      "adapters.")

    @field_validator("target_modules")
    @classmethod
    def _names_not_blank(cls, names: list[str]) -> list[str]:
        if any(not name.strip() for name in names):
            raise PydanticCustomError("blank_module", "module names must not be blank")
        return names


class DataSpec(_Strict):
    """Where the training and evaluation rows come from (JSONL, one example a line)."""

    train: str = Field(description="Training JSONL: a local path or an s3:// URI.")
    eval: str | None = Field(None, description="Evaluation JSONL: a local path or an s3:// URI; empty: none, or "
                             "a share of the training rows (eval_fraction).")
    eval_fraction: float = Field(0.0, ge=0, le=0.5, description="Share of training rows held out for "
                                 "evaluation when no eval file is given.")
    shuffle: bool = Field(True, description="Shuffle the training examples once, seeded by train.seed, "
                          "before the first epoch; false: the order they are read in.")

    @model_validator(mode="after")
    def _one_eval_source(self) -> DataSpec:
        if self.eval is not None and self.eval_fraction > 0:
            raise PydanticCustomError("two_eval_sources", "set either eval or eval_fraction, not both")
        return self


class TrainSpec(_Strict):
    """Optimisation hyperparameters."""

    learning_rate: float = Field(1e-4, gt=0, description="Peak AdamW learning rate.")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="Decay after warmup: "
                                                                 "none, linear to zero, or cosine to zero.")
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear warmup from zero.")
    epochs: int = Field(1, ge=1, description="Passes over the training rows.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps; empty: run "
                                  "all epochs.")
    per_device_batch_size: int = Field(4, ge=1, description="Rows per worker per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches summed into one optimizer step.")
    max_length: int = Field(512, ge=2, description="Longest tokenized row; longer rows are truncated.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this; empty: "
                                        "no clipping.")
    seed: int = Field(0, description="Seed for initialisation, shuffling, dropout and rollouts.")


class MoeSpec(_Strict):
    """Mixture-of-Experts specifics: load balancing and the router."""

    router_aux_loss_coef: float = Field(0.0, ge=0, description="Weight of the auxiliary load-balancing loss; "
                                        "0: none.")
    bias_update_rate: float = Field(0.0, ge=0, description="Step of the aux-loss-free balancing update of each "
                                    "router's expert bias; 0: biases stay fixed.")
    freeze_router: bool = Field(False, description="Keep router (gate) weights fixed.")


class MtpSpec(_Strict):
    """DeepSeek-V3's multi-token prediction as an extra objective (pretrain and SFT)."""

    depth: int = Field(1, ge=1, le=4, description="MTP layers: depth k predicts the token k+1 ahead. Layers the "
                       "base checkpoint lacks start from random weights.")
    loss_weight: float = Field(0.3, gt=0, description="Weight of the MTP loss (the mean over depths) beside the "
                               "main loss; DeepSeek-V3 used 0.3, then 0.1.")


class ScalingSpec(_Strict):
    """Ray Train workers (data parallel)."""

    num_workers: int = Field(1, ge=1, description="Training workers, each holding a model copy.")
    use_gpu: bool = Field(False, description="Give each worker a GPU.")
    strategy: Literal["auto", "ddp", "fsdp"] = Field("auto", description="Data parallelism: 'ddp' keeps a full "
                                                     "model copy per worker; 'fsdp' shards parameters, gradients "
                                                     "and optimizer state over the workers (FSDP2, per decoder "
                                                     "layer); 'auto': fsdp on GPU, ddp on CPU.")
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1.0},
                                                   description="Ray resources reserved per worker, e.g. "
                                                   "{CPU: 4, GPU: 1}.")

    @field_validator("resources_per_worker")
    @classmethod
    def _non_negative(cls, resources: dict[str, float]) -> dict[str, float]:
        if any(amount < 0 for amount in resources.values()):
            raise PydanticCustomError("negative_resource", "resource amounts must not be negative")
        return resources

    def resolved_strategy(self) -> str:
        if self.strategy != "auto":
            return self.strategy
        return "fsdp" if self.use_gpu else "ddp"


class CheckpointSpec(_Strict):
    """Training checkpoints for resuming."""

    storage: str = Field(description="Checkpoint folder: a local path or an s3:// URI.")
    every_steps: int = Field(50, ge=1, description="Optimizer steps between checkpoints.")
    keep: int = Field(2, ge=1, description="Most recent checkpoints kept; older ones are deleted.")


class EvalSpec(_Strict):
    """Periodic evaluation: on the eval rows, and on benchmark tasks."""

    every_steps: int = Field(50, ge=1, description="Optimizer steps between evaluations.")
    tasks: list[TaskSpec] = Field(default_factory=list, description="Tasks (as in an eval spec) run on the "
                                  "current weights at each evaluation; their metrics are logged as "
                                  "eval/<task>/<metric> beside the loss.")


class MlflowSpec(_Strict):
    """An MLflow tracking server."""

    tracking_uri: str | None = Field(None, description="The server, e.g. http://mlflow:5000; empty: "
                                     "MLFLOW_TRACKING_URI.")
    experiment: str = Field("moeray", min_length=1, description="Experiment the run goes into (created if new).")
    run_name: str | None = Field(None, description="The run's name; empty: the job's name.")
    log_model: bool = Field(True, description="Upload the exported model folder as the run's artefact "
                            "(an s3:// output is recorded as a tag instead).")


class TensorBoardSpec(_Strict):
    """TensorBoard event files."""

    log_dir: str = Field(min_length=1, description="Folder the event files go to (a run folder per job name).")


class TrackingSpec(_Strict):
    """Experiment tracking, from the job's driver: the config at the start, each step's metrics
    (the numbers of the progress line, held-out metrics and task scores), the final artefact."""

    mlflow: MlflowSpec | None = Field(None, description="Log to MLflow.")
    tensorboard: TensorBoardSpec | None = Field(None, description="Write TensorBoard event files.")


class JobSpec(_Strict):
    """What every training job has: base model, data, hyperparameters, scaling and outputs. A
    method's spec (see `moeray.jobs.methods`) adds `method` and its own options section."""

    name: str = Field(min_length=1, description="Job name, used in run and checkpoint names.")
    base_model: str = Field(description="Hugging Face checkpoint: a local folder, an s3:// URI or a Hub model id "
                                        "(org/name[@revision], through huggingface_hub's cache).")
    method: str = Field(description="The training method; each method's spec narrows this to its name.")
    init: Literal["base", "random"] = Field("base", description="base: start from the base model's weights; "
                                            "random: train from scratch with the base model's config and "
                                            "tokenizer (random weights, seeded by train.seed).")
    output: str = Field(description="Where the result goes: a local path or an s3:// URI.")
    output_format: Literal["merged", "adapter"] = Field("merged", description="merged: a full checkpoint with "
                                                        "adapters folded in; adapter: the LoRA weights only.")
    # validate_default: the output_format check must run when the lora section is left out.
    lora: LoraSpec | None = Field(None, validate_default=True, description="LoRA adapters; empty: train all "
                                  "weights.")
    data: DataSpec = Field(description="Training and evaluation data.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Optimisation hyperparameters.")
    moe: MoeSpec = Field(default_factory=MoeSpec, description="Load balancing and router options.")
    scaling: ScalingSpec = Field(default_factory=ScalingSpec, description="Ray Train workers and resources.")
    checkpoint: CheckpointSpec = Field(description="Training checkpoints.")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Periodic evaluation.")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="Experiment tracking (MLflow, "
                                   "TensorBoard); empty: metrics.jsonl beside the checkpoints only.")

    @field_validator("lora")
    @classmethod
    def _adapter_needs_lora(cls, lora: LoraSpec | None, info: ValidationInfo) -> LoraSpec | None:
        if lora is None and info.data.get("output_format") == "adapter":
            raise PydanticCustomError("adapter_without_lora", "output_format 'adapter' needs a lora section")
        return lora

    # A field validator rather than a model validator so that the error carries the 'lora' key
    # and with it a line number; `init` is declared earlier, so it is in info.data.
    @field_validator("lora")
    @classmethod
    def _lora_needs_base_weights(cls, lora: LoraSpec | None, info: ValidationInfo) -> LoraSpec | None:
        if lora is not None and info.data.get("init") == "random":
            raise PydanticCustomError("lora_from_scratch", "LoRA adapts trained weights; it cannot start from "
                                      "init 'random'")
        return lora

    @classmethod
    def from_yaml(cls, path: str | Path) -> JobSpec:
        path = Path(path)
        if not path.is_file():
            raise JobSpecError(f"job spec not found: {path}")
        document = read_yaml(path, JobSpecError, "job spec")
        return parse_spec(document.data, document)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_spec(path: str | Path):
    """A training spec (`JobSpec`) or an evaluation spec (`EvalJobSpec`: it has `tasks`) from YAML."""
    path = Path(path)
    if not path.is_file():
        raise JobSpecError(f"job spec not found: {path}")
    document = read_yaml(path, JobSpecError, "job spec")
    if "tasks" in document.data and "method" not in document.data:
        from moeray.jobs.eval.spec import EvalJobSpec

        return EvalJobSpec.from_document(document)
    return parse_spec(document.data, document)


def parse_spec(data: dict[str, Any], document: YamlDocument | None = None) -> JobSpec:
    """The spec of `data`'s method, validated; errors name the document's file and lines."""
    from moeray.jobs.methods import METHODS  # the methods import this module for JobSpec

    if not isinstance(data, dict):
        raise JobSpecError(f"a job spec is a mapping, got {type(data).__name__}")
    method = data.get("method")
    if method not in METHODS:
        where = ""
        if document is not None:
            line = line_of(document.node, ("method",))
            where = f"{document.path}:{line}: " if line else f"{document.path}: "
        choices = ", ".join(repr(name) for name in METHODS)
        problem = "missing" if method is None else f"{method!r} is not a method"
        raise JobSpecError(f"{where}setting 'method': {problem}; choose one of {choices}")
    try:
        return METHODS[method].spec_class.model_validate(data)
    except ValidationError as err:
        raise JobSpecError(explain(err, document)) from None
