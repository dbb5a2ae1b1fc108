"""JobSpec: YAML round trip, errors that name file, line and key, cross-field rules, descriptions."""

import types
import typing

import pytest
from pydantic import BaseModel

from moeray.jobs.spec import JobSpec, JobSpecError

FULL_SPEC = """\
name: tiny-sft
base_model: s3://models/tiny-v3
method: sft
output: /tmp/out
output_format: adapter
lora:
  rank: 4
  alpha: 8
  dropout: 0.05
  target_modules: [q_b_proj, o_proj]
data:
  train: s3://data/train.jsonl
  eval_fraction: 0.1
train:
  learning_rate: 0.0002
  lr_schedule: linear
  warmup_steps: 3
  epochs: 2
  max_steps: 40
  per_device_batch_size: 2
  gradient_accumulation_steps: 2
  max_length: 256
  max_grad_norm: null
  seed: 7
sft:
  packing: true
moe:
  router_aux_loss_coef: 0.01
  bias_update_rate: 0.001
  freeze_router: true
scaling:
  num_workers: 2
  use_gpu: false
  resources_per_worker: {CPU: 2}
checkpoint:
  storage: /tmp/checkpoints
  every_steps: 10
  keep: 3
eval:
  every_steps: 5
"""

MINIMAL_SPEC = """\
name: tiny
base_model: /models/tiny
method: {method}
output: /tmp/out
data:
  train: train.jsonl
checkpoint:
  storage: /tmp/checkpoints
"""


def write(tmp_path, text):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_full_spec_round_trips(tmp_path):
    spec = JobSpec.from_yaml(write(tmp_path, FULL_SPEC))
    assert spec.lora.target_modules == ["q_b_proj", "o_proj"] and spec.lora.alpha == 8
    assert spec.train.max_grad_norm is None and spec.sft.packing and spec.train.lr_schedule == "linear"
    assert spec.scaling.resources_per_worker == {"CPU": 2.0} and spec.eval.every_steps == 5
    assert JobSpec.from_yaml(write(tmp_path, spec.to_yaml())) == spec


def test_minimal_spec_gets_defaults(tmp_path):
    spec = JobSpec.from_yaml(write(tmp_path, MINIMAL_SPEC.format(method="dpo")))
    assert spec.lora is None and spec.output_format == "merged"
    assert spec.train.learning_rate == 1e-4 and spec.train.lr_schedule == "cosine" and spec.dpo.beta == 0.1
    assert spec.scaling.num_workers == 1 and spec.checkpoint.every_steps == 50 and spec.checkpoint.keep == 2
    assert JobSpec.from_yaml(write(tmp_path, spec.to_yaml())) == spec


def test_lora_defaults_target_mla_projections(tmp_path):
    spec = JobSpec.from_yaml(write(tmp_path, MINIMAL_SPEC.format(method="sft") + "lora: {}\n"))
    assert spec.lora.rank == 8 and spec.lora.alpha == 16 and spec.lora.dropout == 0.0
    assert spec.lora.target_modules == ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


def test_unknown_key_names_file_line_and_key(tmp_path):
    path = write(tmp_path, MINIMAL_SPEC.format(method="sft") + "train:\n  epochs: 2\n  learing_rate: 0.1\n")
    with pytest.raises(JobSpecError, match=r"spec\.yaml:11: setting 'train\.learing_rate': unknown setting"):
        JobSpec.from_yaml(path)


def test_wrong_type_names_file_line_and_key(tmp_path):
    path = write(tmp_path, MINIMAL_SPEC.format(method="sft") + "scaling:\n  num_workers: many\n")
    with pytest.raises(JobSpecError, match=r"spec\.yaml:10: setting 'scaling\.num_workers': .*integer"):
        JobSpec.from_yaml(path)


def test_out_of_range_and_bad_choice(tmp_path):
    path = write(tmp_path, MINIMAL_SPEC.format(method="ppo"))
    with pytest.raises(JobSpecError, match=r"spec\.yaml:3: setting 'method': 'ppo' is not a method; choose one of "
                                           r"'pretrain', 'sft', 'dpo', 'grpo'"):
        JobSpec.from_yaml(path)
    path = write(tmp_path, MINIMAL_SPEC.format(method="sft") + "lora:\n  rank: 0\n  target_modules: []\n")
    with pytest.raises(JobSpecError, match=r"spec\.yaml:10: setting 'lora\.rank'.*spec\.yaml:11: setting "
                                           r"'lora\.target_modules'"):
        JobSpec.from_yaml(path)


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "name: x\ndata:\n  train: [unclosed\n")
    with pytest.raises(JobSpecError, match=r"spec\.yaml:\d+: invalid YAML"):
        JobSpec.from_yaml(path)


def test_missing_file(tmp_path):
    with pytest.raises(JobSpecError, match="not found"):
        JobSpec.from_yaml(tmp_path / "absent.yaml")


def test_each_method_has_its_own_section(tmp_path):
    """Options of one method are unknown to another: DPO's beta is not a train setting, and
    packing belongs to SFT."""
    path = write(tmp_path, MINIMAL_SPEC.format(method="dpo") + "sft:\n  packing: true\n")
    with pytest.raises(JobSpecError, match=r"spec\.yaml:9: setting 'sft': unknown setting"):
        JobSpec.from_yaml(path)
    path = write(tmp_path, MINIMAL_SPEC.format(method="sft") + "train:\n  beta: 0.2\n")
    with pytest.raises(JobSpecError, match=r"spec\.yaml:10: setting 'train\.beta': unknown setting"):
        JobSpec.from_yaml(path)
    assert JobSpec.from_yaml(write(tmp_path, MINIMAL_SPEC.format(method="sft") + "sft:\n  packing: true\n")).sft.packing
    assert JobSpec.from_yaml(write(tmp_path, MINIMAL_SPEC.format(method="dpo") + "dpo:\n  beta: 0.3\n")).dpo.beta == 0.3


def test_missing_method_names_the_choices(tmp_path):
    path = write(tmp_path, MINIMAL_SPEC.format(method="sft").replace("method: sft\n", ""))
    with pytest.raises(JobSpecError, match=r"spec\.yaml: setting 'method': missing; choose one of"):
        JobSpec.from_yaml(path)


def test_eval_file_and_fraction_exclude_each_other(tmp_path):
    text = MINIMAL_SPEC.format(method="sft").replace("  train: train.jsonl\n",
                                                     "  train: train.jsonl\n  eval: eval.jsonl\n  eval_fraction: 0.1\n")
    with pytest.raises(JobSpecError, match=r"spec\.yaml:5: setting 'data': set either eval or eval_fraction"):
        JobSpec.from_yaml(write(tmp_path, text))


def test_adapter_output_needs_lora(tmp_path):
    path = write(tmp_path, MINIMAL_SPEC.format(method="sft") + "output_format: adapter\n")
    with pytest.raises(JobSpecError, match=r"setting 'lora': output_format 'adapter' needs a lora section"):
        JobSpec.from_yaml(path)


def _models(annotation):
    """The pydantic models inside an annotation such as `LoraSpec | None` or `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for argument in typing.get_args(annotation):
        yield from _models(argument)


def test_every_field_has_a_description():
    from moeray.jobs.methods import METHODS

    seen, pending, checked = set(), [JobSpec, *(method.spec_class for method in METHODS.values())], 0
    while pending:
        model = pending.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            checked += 1
            pending.extend(_models(field.annotation))
    assert len(seen) == 21 and checked > 50  # JobSpec, its sections (tracking: 3), each method's options, MtpSpec
    assert isinstance(JobSpec.model_fields["lora"].annotation, types.UnionType)
