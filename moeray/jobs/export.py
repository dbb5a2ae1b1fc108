"""Turn a finished job's checkpoint into something `moeray serve` loads.

Contract: `export(spec, checkpoint_dir)` rebuilds the trained model (base weights + the trained
tensors of the checkpoint) and writes `spec.output`: a merged Hugging Face folder (safetensors,
config, tokenizer) or, for LoRA jobs with `output_format: adapter`, a PEFT adapter folder.
`starting_model(spec, base)` is the model a job trains, built the same way for training and
for export: the base checkpoint (or seeded random weights), LoRA where the spec asks, then the
spec's MTP layers that the base lacks, randomly initialised from the job's seed and trained in
full.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

import moeray.model
from moeray.jobs.checkpointing import STATE_FILE
from moeray.model.lora import apply_lora, merge_lora, save_adapter
from moeray.jobs.spec import JobSpec
from moeray.model import save_checkpoint
from moeray.storage import is_remote, local_copy, upload_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")


def starting_model(spec: JobSpec, base: Path, lora_dropout: float | None = None) -> torch.nn.Module:
    mtp = getattr(spec, "mtp", None)
    args = moeray.model.ModelArgs.from_file(base / "config.json")
    if spec.init == "random":  # seeded: an export rebuilds the same untrained tensors
        model = moeray.model.build(args, seed=spec.train.seed)
    else:
        wanted = mtp.depth if mtp is not None else 0
        model = moeray.model.load(base, mtp_depth=min(wanted, moeray.model.mtp_depth_of(base)))
    if spec.lora is not None:
        dropout = spec.lora.dropout if lora_dropout is None else lora_dropout
        apply_lora(model, spec.lora.target_modules, spec.lora.rank, spec.lora.alpha, dropout, spec.train.seed)
    if mtp is not None and mtp.depth > model.mtp_depth:
        if spec.lora is not None and spec.output_format == "adapter":
            raise ValueError(f"mtp.depth {mtp.depth}: the base model has {model.mtp_depth} MTP layers, and an "
                             f"adapter export cannot carry the ones trained from scratch; use output_format: merged")
        generator = torch.Generator().manual_seed(spec.train.seed + 1)
        model.add_mtp_layers(mtp.depth, generator)  # after LoRA, which would freeze them
    return model


def trained_model(spec: JobSpec, checkpoint_dir: str | Path):
    """The base model with the checkpoint's trained tensors (LoRA wrapped when the job used LoRA)."""
    model = starting_model(spec, local_copy(spec.base_model), lora_dropout=0.0)
    state = torch.load(Path(checkpoint_dir) / STATE_FILE, weights_only=False)
    missing = set(state["model"]) - set(model.state_dict())
    if missing:
        raise ValueError(f"checkpoint {checkpoint_dir} has tensors the model lacks: {sorted(missing)[:5]}")
    model.load_state_dict(state["model"], strict=False)
    return model.eval()


def export(spec: JobSpec, checkpoint_dir: str | Path) -> Path | str:
    """Write the output locally, or to a temporary folder uploaded to an s3:// output."""
    if is_remote(spec.output):
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            _write(spec, checkpoint_dir, Path(folder))
            upload_dir(folder, spec.output)
        return spec.output
    out = Path(spec.output)
    out.mkdir(parents=True, exist_ok=True)
    return _write(spec, checkpoint_dir, out)


def _write(spec: JobSpec, checkpoint_dir: str | Path, out: Path) -> Path:
    model = trained_model(spec, checkpoint_dir)
    if spec.output_format == "adapter":
        if spec.lora is None:
            raise ValueError("output_format 'adapter' needs a LoRA job (set lora in the spec)")
        save_adapter(model, out, spec.base_model, spec.lora.rank, spec.lora.alpha, spec.lora.dropout,
                     spec.lora.target_modules)
        return out
    if spec.lora is not None:
        merge_lora(model)
    save_checkpoint(model, out, model.args)
    for name in TOKENIZER_FILES:
        source = local_copy(spec.base_model) / name
        if source.exists():
            shutil.copy(source, out / name)
    return out
