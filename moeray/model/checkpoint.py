"""Hugging Face checkpoint folders: read (streaming, FP8-aware, any subset) and write.

Contract:
- `CheckpointReader(folder)` indexes `model.safetensors`, a sharded set with
  `model.safetensors.index.json`, or loose `*.safetensors`; `get(name)` returns one tensor,
  dequantising `float8_e4m3fn` weights with their `weight_scale_inv` block scales.
  `routed_expert(layer, expert)` returns one expert's weights from either the per-expert
  layout (`...experts.E.gate_proj.weight`) or the grouped one (`...experts.gate_up_proj`).
- `load_weights(model, reader)` streams tensors one at a time into a model's preallocated
  parameters (never two full copies in memory) and fails on missing, unexpected or wrongly
  shaped tensors, naming the tensor and the file. Layers at index >= num_hidden_layers (the MTP
  module) are skipped and reported.
- `save_checkpoint(model, folder)` writes the Hugging Face layout with per-expert names, which
  transformers and this reader both load.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeray.model.config import ModelArgs

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_SCALE_SUFFIX = "_scale_inv"


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete, inconsistent or does not match the model."""


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W = q * scale_inv[i // block_rows, j // block_cols]; edge blocks are partial.

    weight [rows, cols] float8_e4m3fn; scale_inv [ceil(rows / br), ceil(cols / bc)].
    """
    rows, cols = weight.shape
    br, bc = block
    expected = (-(-rows // br), -(-cols // bc))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(f"scale shape {tuple(scale_inv.shape)} does not match weight {rows}x{cols} "
                              f"with {br}x{bc} blocks (expected {expected})")
    scales = scale_inv.float().repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    return (weight.float() * scales).to(dtype)


class CheckpointReader:
    def __init__(self, folder: str | Path, block_size: tuple[int, int] | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder {self.folder} does not exist")
        self.file_of = self._index()
        if block_size is None and (self.folder / "config.json").exists():
            block_size = ModelArgs.from_file(self.folder / "config.json").fp8_block_size
        self.block_size = block_size or (128, 128)
        self._handles: dict[str, object] = {}

    def _index(self) -> dict[str, str]:
        index_path = self.folder / INDEX_FILE
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except json.JSONDecodeError as err:
                raise CheckpointError(f"{index_path}:{err.lineno}: invalid JSON ({err.msg})") from None
            except KeyError:
                raise CheckpointError(f"{index_path}: missing 'weight_map'") from None
            for name, file in weight_map.items():
                if not (self.folder / file).exists():
                    raise CheckpointError(f"{index_path}: tensor {name} points to missing file {file}")
            return dict(weight_map)
        files = [self.folder / SINGLE_FILE] if (self.folder / SINGLE_FILE).exists() \
            else sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {self.folder}")
        file_of = {}
        for file in files:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    file_of[name] = file.name
        return file_of

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = safe_open(self.folder / file, framework="pt", device="cpu")
        return self._handles[file]

    def names(self) -> list[str]:
        """Tensor names, without the FP8 scale companions (those are read with their weight)."""
        return [n for n in self.file_of if not n.endswith(_SCALE_SUFFIX)]

    def where(self, name: str) -> Path:
        return self.folder / self.file_of[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.file_of[name]).get_slice(name).get_shape())

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self.file_of:
            raise CheckpointError(f"tensor {name} is not in checkpoint {self.folder}")
        tensor = self._handle(self.file_of[name]).get_tensor(name)
        if tensor.dtype == torch.float8_e4m3fn:
            scale_name = name + _SCALE_SUFFIX
            if scale_name not in self.file_of:
                raise CheckpointError(f"FP8 tensor {name} in {self.where(name)} has no {scale_name}")
            scale = self._handle(self.file_of[scale_name]).get_tensor(scale_name)
            try:
                return dequantize_fp8_blocks(tensor, scale, self.block_size, dtype or torch.float32)
            except CheckpointError as err:
                raise CheckpointError(f"{name} in {self.where(name)}: {err}") from None
        return tensor if dtype is None else tensor.to(dtype)

    def routed_expert(self, layer: int, expert: int, dtype: torch.dtype | None = None):
        """One routed expert's (gate_up [2I, D], down [D, I]) from either checkpoint layout."""
        prefix = f"model.layers.{layer}.mlp.experts"
        if f"{prefix}.{expert}.gate_proj.weight" in self.file_of:
            gate = self.get(f"{prefix}.{expert}.gate_proj.weight", dtype)
            up = self.get(f"{prefix}.{expert}.up_proj.weight", dtype)
            return torch.cat((gate, up)), self.get(f"{prefix}.{expert}.down_proj.weight", dtype)
        if f"{prefix}.gate_up_proj" in self.file_of:
            handle = self._handle(self.file_of[f"{prefix}.gate_up_proj"])
            gate_up = handle.get_slice(f"{prefix}.gate_up_proj")[expert]
            down = self._handle(self.file_of[f"{prefix}.down_proj"]).get_slice(f"{prefix}.down_proj")[expert]
            return (gate_up, down) if dtype is None else (gate_up.to(dtype), down.to(dtype))
        raise CheckpointError(f"expert {expert} of layer {layer} is not in checkpoint {self.folder}")


@dataclass
class LoadReport:
    loaded: int = 0
    skipped: list[str] = field(default_factory=list)  # e.g. the MTP layer's tensors
    dequantized_fp8: int = 0


def is_routed_expert(name: str) -> bool:
    return ".mlp.experts." in name


def load_weights(model: torch.nn.Module, reader: CheckpointReader, num_layers: int,
                 progress: bool | None = None, skip=None) -> LoadReport:
    """Copy every checkpoint tensor into `model`'s parameters and buffers, tensor by tensor.

    `skip(name)` marks tensors the model deliberately does not hold (routed experts that live
    in expert shards); they are neither loaded nor unexpected.
    """
    targets = dict(model.state_dict(keep_vars=True))
    filled: dict[str, torch.Tensor] = {}  # name -> bool mask of loaded experts / rows
    report = LoadReport()
    names = reader.names()
    show = sys.stderr.isatty() if progress is None else progress

    for i, name in enumerate(names):
        layer_match = _LAYER_RE.match(name)
        if layer_match and int(layer_match.group(1)) >= num_layers:
            report.skipped.append(name)
            continue
        if skip is not None and skip(name):
            continue
        dest, expert_idx, target_name = _resolve(name, targets)
        if dest is None:
            raise CheckpointError(f"unexpected tensor {name} in {reader.where(name)}: the model has no such weight")
        expected = tuple(dest.shape)
        if tuple(reader.shape(name)) != expected:
            raise CheckpointError(f"tensor {name} in {reader.where(name)} has shape {tuple(reader.shape(name))}, "
                                  f"the model expects {expected}")
        if reader.file_of.get(name + _SCALE_SUFFIX):
            report.dequantized_fp8 += 1
        with torch.no_grad():
            dest.copy_(reader.get(name))
        mask = filled.setdefault(target_name, torch.zeros(_coverage_shape(targets[target_name], target_name),
                                                          dtype=torch.bool))
        if expert_idx is None:
            mask.fill_(True)
        else:
            mask[expert_idx] = True
        report.loaded += 1
        if show and (i % 16 == 0 or i == len(names) - 1):
            print(f"\rloading {reader.folder.name}: {i + 1}/{len(names)} tensors", end="", file=sys.stderr)
    if show:
        print(file=sys.stderr)

    for target_name, tensor in targets.items():
        mask = filled.get(target_name)
        if mask is None or not bool(mask.all()):
            shape = _coverage_shape(tensor, target_name)
            raise CheckpointError(f"checkpoint {reader.folder} is missing tensor "
                                  f"{_missing_name(target_name, mask, shape)}")
    if report.skipped:
        print(f"moeray: skipped {len(report.skipped)} tensors of layers >= {num_layers} "
              f"(multi-token prediction module) in {reader.folder}", file=sys.stderr)
    return report


def _resolve(name: str, targets: dict[str, torch.Tensor]):
    """Checkpoint name -> (destination view, expert coverage index, model tensor name)."""
    if name in targets:
        return targets[name], None, name
    match = _EXPERT_RE.match(name)
    if not match:
        return None, None, None
    prefix, expert, proj = match.group(1), int(match.group(2)), match.group(3)
    if proj == "down_proj":
        target = f"{prefix}.down_proj"
        if target not in targets or expert >= targets[target].shape[0]:
            return None, None, None
        return targets[target][expert], (expert, 0), target
    target = f"{prefix}.gate_up_proj"
    if target not in targets or expert >= targets[target].shape[0]:
        return None, None, None
    half = targets[target].shape[1] // 2
    part = 0 if proj == "gate_proj" else 1
    return targets[target][expert, part * half:(part + 1) * half], (expert, part), target


def _coverage_shape(tensor: torch.Tensor, name: str) -> tuple[int, ...]:
    if name.endswith("experts.gate_up_proj"):
        return (tensor.shape[0], 2)
    if name.endswith("experts.down_proj"):
        return (tensor.shape[0], 1)
    return (1,)


def _missing_name(target_name: str, mask: torch.Tensor | None, shape: tuple[int, ...]) -> str:
    """The Hugging Face name of the first tensor that never arrived for `target_name`."""
    if len(shape) < 2:
        return target_name
    mask = torch.zeros(shape, dtype=torch.bool) if mask is None else mask
    expert, part = (~mask).nonzero()[0].tolist()
    prefix = target_name.rsplit(".", 1)[0]
    proj = "down_proj" if target_name.endswith("down_proj") else ("gate_proj", "up_proj")[part]
    return f"{prefix}.{expert}.{proj}.weight"


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under Hugging Face names, routed experts split per expert."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("experts.gate_up_proj"):
            prefix, half = name.rsplit(".", 1)[0], tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = tensor[e, :half]
                out[f"{prefix}.{e}.up_proj.weight"] = tensor[e, half:]
        elif name.endswith("experts.down_proj"):
            prefix = name.rsplit(".", 1)[0]
            for e in range(tensor.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = tensor[e]
        else:
            out[name] = tensor
    return out


def save_checkpoint(model: torch.nn.Module, folder: str | Path, args: ModelArgs,
                    max_shard_bytes: int = 2 << 30, dtype: torch.dtype | None = None) -> None:
    """Write config.json and safetensors shards (with an index when more than one)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v if dtype is None or not v.is_floating_point() else v.to(dtype)).contiguous().cpu()
               for k, v in hf_state_dict(model).items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / SINGLE_FILE, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, folder / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                     "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(args.to_hf_config(), indent=2))
