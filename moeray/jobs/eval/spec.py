"""Evaluation job specs: which model, which tasks, where the report goes.

Contract: `EvalJobSpec.from_yaml(path)` returns a validated spec or raises `JobSpecError` naming
the file, the line and the key, as training specs do. The target is exactly one of `model` (a
checkpoint folder or s3:// URI, run in this process by moeray's engine) and `endpoint` (a
running OpenAI-compatible server: `url` up to `/v1`, the model name, a key from `api_key` or
the environment variable `api_key_env`). Each task names its JSONL file and its kind:
- `exact_match`: generate from `prompt_template` (Python format fields of the row), extract the
  answer (`extractor`) and compare it with the row's `answer`;
- `pass_at_k`: sample `samples` completions of the row's `prompt`, run the row's `tests` on
  prompt + completion in the sandbox, report the unbiased pass@k for each k;
- `multiple_choice`: the row's `choices`, each scored by the summed log-probability of its
  tokens after the prompt; correct when the best is the row's `answer` (an index).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from moeray.config_io import YamlDocument, explain, read_yaml


class _Strict(BaseModel):
    # Not jobs.spec's: training specs embed TaskSpec (eval.tasks), so this module must not import them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EndpointSpec(_Strict):
    url: str = Field(description="Base URL of an OpenAI-compatible API, up to /v1 "
                     "(e.g. http://127.0.0.1:8000/v1).")
    model: str = Field(description="The served model name to ask for.")
    api_key: str | None = Field(None, description="API key sent as a bearer token; prefer api_key_env.")
    api_key_env: str | None = Field(None, description="Environment variable that holds the API key.")
    timeout_s: float = Field(120.0, gt=0, description="Time limit of each HTTP request.")


class TaskSpec(_Strict):
    file: str = Field(description="Task JSONL: a local path or an s3:// URI (format: docs/eval-tasks.md).")
    kind: Literal["exact_match", "pass_at_k", "multiple_choice"] = Field(description="How items are scored.")
    name: str | None = Field(None, description="Name in the report; empty: the file's stem.")
    prompt_template: str = Field("{prompt}", description="Python format string over the row's fields giving the "
                                 "prompt (the context, for multiple_choice).")
    choice_template: str = Field(" {choice}", description="multiple_choice: the continuation scored for each "
                                 "choice.")
    extractor: Literal["text", "first_line", "first_number", "last_number"] = Field(
        "first_line", description="exact_match: what of the completion is compared with the answer (stripped); "
        "last_number also reads GSM8K's '#### N'.")
    max_tokens: int = Field(32, ge=1, description="Longest completion.")
    stop: list[str] = Field(default_factory=lambda: ["\n"], description="Strings that end a completion.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature (0: greedy). pass_at_k needs > 0 "
                               "for samples > 1.")
    samples: int = Field(1, ge=1, description="pass_at_k: completions sampled per item (n).")
    k: list[int] = Field(default_factory=lambda: [1], min_length=1, description="pass_at_k: the k of each "
                         "reported pass@k (each <= samples).")
    timeout_s: float = Field(5.0, gt=0, description="pass_at_k: wall-clock limit of each test run.")
    limit: int | None = Field(None, ge=1, description="Score only the first N items.")

    @model_validator(mode="after")
    def _k_within_samples(self) -> TaskSpec:
        if self.kind == "pass_at_k" and max(self.k) > self.samples:
            raise PydanticCustomError("k_above_samples", "every k must be at most samples ({samples})",
                                      {"samples": self.samples})
        return self

    @property
    def label(self) -> str:
        return self.name or Path(self.file).stem


class EvalJobSpec(_Strict):
    """One evaluation: a checkpoint or an endpoint, and the tasks to score it on."""

    name: str = Field(min_length=1, description="Evaluation name, used in the report.")
    model: str | None = Field(None, description="Checkpoint to evaluate: a local folder or an s3:// URI.")
    endpoint: EndpointSpec | None = Field(None, description="A running OpenAI-compatible endpoint to evaluate.")
    tasks: list[TaskSpec] = Field(min_length=1, description="The tasks, scored in order.")
    output: str | None = Field(None, description="Where the JSON report goes (a local path or an s3:// URI); "
                               "empty: printed only.")
    seed: int = Field(0, description="Seed of sampled completions.")
    max_model_len: int | None = Field(None, ge=16, description="Context length of the local engine (model "
                                      "targets); default: the model's own.")

    @model_validator(mode="after")
    def _one_target(self) -> EvalJobSpec:
        if (self.model is None) == (self.endpoint is None):
            raise PydanticCustomError("one_target", "set exactly one of model and endpoint")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> EvalJobSpec:
        from moeray.jobs.spec import JobSpecError

        path = Path(path)
        if not path.is_file():
            raise JobSpecError(f"eval spec not found: {path}")
        return cls.from_document(read_yaml(path, JobSpecError, "eval spec"))

    @classmethod
    def from_document(cls, document: YamlDocument) -> EvalJobSpec:
        from moeray.jobs.spec import JobSpecError

        try:
            return cls.model_validate(document.data)
        except ValidationError as err:
            raise JobSpecError(explain(err, document)) from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)
