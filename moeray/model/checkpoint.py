"""Hugging Face checkpoint folders: read (streaming, FP8-aware, any subset) and write.

Contract:
- `CheckpointReader(folder or s3:// URI)` indexes `model.safetensors`, a sharded set with
  `model.safetensors.index.json`, or loose `*.safetensors`; `get(name)` returns one tensor,
  dequantising `float8_e4m3fn` weights with their `weight_scale_inv` block scales.
  `routed_expert(layer, expert)` returns one expert's weights from either the per-expert
  layout (`...experts.E.gate_proj.weight`) or the grouped one (`...experts.gate_up_proj`).
  From s3:// each tensor (or one expert's row of a grouped tensor) is one byte-range request:
  an expert shard fetches only its own experts, never whole files. `is_fp8(name)` says whether a
  tensor is stored float8_e4m3fn (read from the header, no data); `get_fp8(name)` returns it as
  stored, with its scale.
- `load_weights(model, reader)` streams tensors one at a time into a model's preallocated
  parameters (never two full copies in memory) and fails on missing, unexpected or wrongly
  shaped tensors, naming the tensor and the file. Layers at index >= num_hidden_layers (the MTP
  module) load into the model's `model.mtp_layers` where it has them (their `embed_tokens` and
  `shared_head.head`, copies of the main model's, are not read) and are skipped and reported
  where it has not. An FP8 tensor is dequantised into a full-precision parameter,
  or copied as it is (with its scale into the `<parameter>_scale_inv` beside it) into a float8
  one: the model's parameter dtypes decide (see `moeray.model.load(fp8=...)`).
- `save_checkpoint(model, folder)` writes the Hugging Face layout with per-expert names, which
  transformers and this reader both load; MTP layers go back to index num_hidden_layers + k with
  the copies of the embedding and head that DeepSeek-V3's layout has, and config.json's
  `num_nextn_predict_layers` says how many there are.
"""

from __future__ import annotations

import json
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeray.model.config import ModelArgs

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_EXPERT_RE = re.compile(r"^(model\.(?:mtp_)?layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
# Tensors of an MTP layer in V3's layout that are copies of the main model's (shared, not read).
_MTP_SHARED = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}
_SCALE_SUFFIX = "_scale_inv"
_MTP_NAME_RE = re.compile(r"^model\.mtp_layers\.(\d+)\.(.*)$")


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


# safetensors dtype names -> torch dtypes, for tensors read from raw bytes (remote checkpoints).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class _LocalSafetensors:
    """One local safetensors file, memory-mapped by `safe_open`."""

    def __init__(self, path: Path):
        self._handle = safe_open(path, framework="pt", device="cpu")

    def keys(self) -> list[str]:
        return list(self._handle.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype | None:
        return _SAFETENSORS_DTYPES.get(self._handle.get_slice(name).get_dtype())

    def tensor(self, name: str) -> torch.Tensor:
        return self._handle.get_tensor(name)

    def row(self, name: str, index: int) -> torch.Tensor:
        return self._handle.get_slice(name)[index]


class _RemoteSafetensors:
    """One safetensors file in object storage: the header is read once, then each tensor (or
    one row of it) with a single byte-range request, so a reader fetches only what it uses."""

    def __init__(self, folder, file: str):
        self.folder, self.file = folder, file
        (header_size,) = struct.unpack("<Q", folder.read(file, 0, 8))
        try:
            header = json.loads(folder.read(file, 8, 8 + header_size))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{folder.uri}/{file}: not a safetensors file ({err})") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + header_size
        self.entries = header  # name -> {"dtype", "shape", "data_offsets": [begin, end]}

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype | None:
        return _SAFETENSORS_DTYPES.get(self.entries[name]["dtype"])

    def _read(self, name: str, begin: int, end: int, shape: tuple[int, ...]) -> torch.Tensor:
        entry = self.entries[name]
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.folder.uri}/{self.file}: tensor {name} has unsupported dtype "
                                  f"{entry['dtype']}")
        data = bytearray(self.folder.read(self.file, self.data_start + begin, self.data_start + end))
        if not data:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(shape)

    def tensor(self, name: str) -> torch.Tensor:
        begin, end = self.entries[name]["data_offsets"]
        return self._read(name, begin, end, self.shape(name))

    def row(self, name: str, index: int) -> torch.Tensor:
        shape = self.shape(name)
        begin, end = self.entries[name]["data_offsets"]
        row_bytes = (end - begin) // shape[0]
        return self._read(name, begin + index * row_bytes, begin + (index + 1) * row_bytes, shape[1:])


class _LocalFolder:
    def __init__(self, folder: Path):
        if not folder.is_dir():
            raise CheckpointError(f"checkpoint folder {folder} does not exist")
        self.folder = folder
        self.uri = str(folder)

    def exists(self, name: str) -> bool:
        return (self.folder / name).exists()

    def read_text(self, name: str) -> str:
        return (self.folder / name).read_text()

    def safetensors_files(self) -> list[str]:
        return sorted(p.name for p in self.folder.glob("*.safetensors"))

    def open(self, file: str) -> _LocalSafetensors:
        return _LocalSafetensors(self.folder / file)


class _S3Folder:
    def __init__(self, uri: str):
        from moeray.storage import RemoteFolder

        self.remote = RemoteFolder(uri)
        self.uri = self.remote.uri
        self._names = self.remote.names()
        if not self._names:
            raise CheckpointError(f"checkpoint {self.uri} does not exist (no objects under it)")

    @property
    def bytes_read(self) -> int:
        return self.remote.bytes_read

    def exists(self, name: str) -> bool:
        return name in self._names

    def read_text(self, name: str) -> str:
        return self.remote.read(name).decode()

    def read(self, name: str, start: int, end: int) -> bytes:
        return self.remote.read(name, start, end)

    def safetensors_files(self) -> list[str]:
        return [n for n in self._names if n.endswith(".safetensors")]

    def open(self, file: str) -> _RemoteSafetensors:
        return _RemoteSafetensors(self, file)


def _checkpoint_folder(location: str | Path):
    if str(location).startswith("s3://"):
        return _S3Folder(str(location))
    return _LocalFolder(Path(location))


def read_model_args(location: str | Path) -> ModelArgs:
    """The `ModelArgs` of a checkpoint folder or s3:// URI (its config.json)."""
    folder = _checkpoint_folder(location)
    if not folder.exists("config.json"):
        raise CheckpointError(f"{folder.uri}/config.json not found: not a Hugging Face checkpoint folder")
    return ModelArgs.from_json(folder.read_text("config.json"), f"{folder.uri}/config.json")


class CheckpointReader:
    """Tensors of a checkpoint in a local folder or under an s3:// URI (read by byte range)."""

    def __init__(self, location: str | Path, block_size: tuple[int, int] | None = None):
        self.source = _checkpoint_folder(location)
        self.uri = self.source.uri
        self.name = self.uri.rstrip("/").rsplit("/", 1)[-1]
        self._handles: dict[str, object] = {}
        self.file_of = self._index()
        if block_size is None and self.source.exists("config.json"):
            block_size = ModelArgs.from_json(self.source.read_text("config.json"),
                                             f"{self.uri}/config.json").fp8_block_size
        self.block_size = block_size or (128, 128)

    @property
    def bytes_read(self) -> int:
        """Bytes fetched from object storage so far (0 for local folders, which are mapped)."""
        return getattr(self.source, "bytes_read", 0)

    def _index(self) -> dict[str, str]:
        index_path = f"{self.uri}/{INDEX_FILE}"
        if self.source.exists(INDEX_FILE):
            try:
                weight_map = json.loads(self.source.read_text(INDEX_FILE))["weight_map"]
            except json.JSONDecodeError as err:
                raise CheckpointError(f"{index_path}:{err.lineno}: invalid JSON ({err.msg})") from None
            except KeyError:
                raise CheckpointError(f"{index_path}: missing 'weight_map'") from None
            for name, file in weight_map.items():
                if not self.source.exists(file):
                    raise CheckpointError(f"{index_path}: tensor {name} points to missing file {file}")
            return dict(weight_map)
        files = [SINGLE_FILE] if self.source.exists(SINGLE_FILE) else self.source.safetensors_files()
        if not files:
            raise CheckpointError(f"no *.safetensors files in {self.uri}")
        return {name: file for file in files for name in self._handle(file).keys()}

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = self.source.open(file)
        return self._handles[file]

    def names(self) -> list[str]:
        """Tensor names, without the FP8 scale companions (those are read with their weight)."""
        return [n for n in self.file_of if not n.endswith(_SCALE_SUFFIX)]

    def where(self, name: str) -> str:
        return f"{self.uri}/{self.file_of[name]}"

    def shape(self, name: str) -> tuple[int, ...]:
        return self._handle(self.file_of[name]).shape(name)

    def is_fp8(self, name: str) -> bool:
        """True when `name` is in the checkpoint as float8_e4m3fn (its header says so; no data read)."""
        return name in self.file_of and self._handle(self.file_of[name]).dtype(name) == torch.float8_e4m3fn

    def get_fp8(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """An FP8 weight as stored and its block scales: (q float8_e4m3fn, scale_inv float32)."""
        return self._fp8_pair(name, self._handle(self.file_of[name]).tensor(name))

    def _fp8_pair(self, name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale_name = name + _SCALE_SUFFIX
        if scale_name not in self.file_of:
            raise CheckpointError(f"FP8 tensor {name} in {self.where(name)} has no {scale_name}")
        scale = self._handle(self.file_of[scale_name]).tensor(scale_name).float()
        rows, cols = tensor.shape
        expected = (-(-rows // self.block_size[0]), -(-cols // self.block_size[1]))
        if tuple(scale.shape) != expected:
            raise CheckpointError(f"{name} in {self.where(name)}: scale shape {tuple(scale.shape)} does not match "
                                  f"weight {rows}x{cols} with {self.block_size[0]}x{self.block_size[1]} blocks "
                                  f"(expected {expected})")
        return tensor, scale

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self.file_of:
            raise CheckpointError(f"tensor {name} is not in checkpoint {self.uri}")
        tensor = self._handle(self.file_of[name]).tensor(name)
        if tensor.dtype == torch.float8_e4m3fn:
            q, scale = self._fp8_pair(name, tensor)
            return dequantize_fp8_blocks(q, scale, self.block_size, dtype or torch.float32)
        return tensor if dtype is None else tensor.to(dtype)

    def routed_expert_fp8(self, layer: int, expert: int):
        """One routed expert as stored in FP8 with its block scales, or None when the checkpoint
        does not hold it so (per-expert names only, as DeepSeek-V3 ships):
        (gate_up [2I, D] float8, gate_up scales [2 * ceil(I / bn), ceil(D / bk)] with gate's block
        rows before up's, down [D, I] float8, down scales [ceil(D / bn), ceil(I / bk)])."""
        prefix = f"model.layers.{layer}.mlp.experts.{expert}"
        if not self.is_fp8(f"{prefix}.gate_proj.weight"):
            return None
        gate, gate_scale = self.get_fp8(f"{prefix}.gate_proj.weight")
        up, up_scale = self.get_fp8(f"{prefix}.up_proj.weight")
        down, down_scale = self.get_fp8(f"{prefix}.down_proj.weight")
        return torch.cat((gate, up)), torch.cat((gate_scale, up_scale)), down, down_scale

    def routed_expert(self, layer: int, expert: int, dtype: torch.dtype | None = None):
        """One routed expert's (gate_up [2I, D], down [D, I]) from either checkpoint layout."""
        prefix = f"model.layers.{layer}.mlp.experts"
        if f"{prefix}.{expert}.gate_proj.weight" in self.file_of:
            gate = self.get(f"{prefix}.{expert}.gate_proj.weight", dtype)
            up = self.get(f"{prefix}.{expert}.up_proj.weight", dtype)
            return torch.cat((gate, up)), self.get(f"{prefix}.{expert}.down_proj.weight", dtype)
        if f"{prefix}.gate_up_proj" in self.file_of:
            gate_up = self._handle(self.file_of[f"{prefix}.gate_up_proj"]).row(f"{prefix}.gate_up_proj", expert)
            down = self._handle(self.file_of[f"{prefix}.down_proj"]).row(f"{prefix}.down_proj", expert)
            return (gate_up, down) if dtype is None else (gate_up.to(dtype), down.to(dtype))
        raise CheckpointError(f"expert {expert} of layer {layer} is not in checkpoint {self.uri}")


@dataclass
class LoadReport:
    loaded: int = 0
    skipped: list[str] = field(default_factory=list)  # e.g. the MTP layer's tensors
    dequantized_fp8: int = 0
    kept_fp8: int = 0  # FP8 tensors copied as stored into float8 parameters


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
    mtp_depth = getattr(model, "mtp_depth", 0)

    for i, name in enumerate(names):
        target = name
        layer_match = _LAYER_RE.match(name)
        if layer_match and int(layer_match.group(1)) >= num_layers:
            depth, rest = int(layer_match.group(1)) - num_layers, layer_match.group(2)
            if depth >= mtp_depth:
                report.skipped.append(name)
                continue
            if rest in _MTP_SHARED:
                continue
            target = f"model.mtp_layers.{depth}.{rest}"
        if skip is not None and skip(target):
            continue
        dest, scale_dest, expert_idx, target_name = _resolve(target, targets)
        if dest is None:
            raise CheckpointError(f"unexpected tensor {name} in {reader.where(name)}: the model has no such weight")
        expected = tuple(dest.shape)
        if tuple(reader.shape(name)) != expected:
            raise CheckpointError(f"tensor {name} in {reader.where(name)} has shape {tuple(reader.shape(name))}, "
                                  f"the model expects {expected}")
        with torch.no_grad():
            if dest.dtype == torch.float8_e4m3fn:
                if not reader.is_fp8(name) or scale_dest is None:
                    raise CheckpointError(f"tensor {name} in {reader.where(name)} is not FP8 with block scales, "
                                          f"but the model holds it in FP8")
                q, scale = reader.get_fp8(name)
                if tuple(scale.shape) != tuple(scale_dest.shape):
                    raise CheckpointError(f"{name}{_SCALE_SUFFIX} in {reader.where(name)} has shape "
                                          f"{tuple(scale.shape)}, the model expects {tuple(scale_dest.shape)}")
                dest.copy_(q)
                scale_dest.copy_(scale)
                report.kept_fp8 += 1
            else:
                if reader.file_of.get(name + _SCALE_SUFFIX):
                    report.dequantized_fp8 += 1
                dest.copy_(reader.get(name))
        mask = filled.setdefault(target_name, torch.zeros(_coverage_shape(targets[target_name], target_name),
                                                          dtype=torch.bool))
        if expert_idx is None:
            mask.fill_(True)
        else:
            mask[expert_idx] = True
        report.loaded += 1
        if show and (i % 16 == 0 or i == len(names) - 1):
            print(f"\rloading {reader.name}: {i + 1}/{len(names)} tensors", end="", file=sys.stderr)
    if show:
        print(file=sys.stderr)

    for target_name, tensor in targets.items():
        if target_name.endswith(_SCALE_SUFFIX):
            continue  # filled together with its weight, whose coverage is checked
        mask = filled.get(target_name)
        if mask is None or not bool(mask.all()):
            shape = _coverage_shape(tensor, target_name)
            raise CheckpointError(f"checkpoint {reader.uri} is missing tensor "
                                  f"{_missing_name(target_name, mask, shape)}")
    if report.skipped:
        print(f"moeray: skipped {len(report.skipped)} tensors of layers >= {num_layers} "
              f"(multi-token prediction module) in {reader.uri}", file=sys.stderr)
    return report


def _resolve(name: str, targets: dict[str, torch.Tensor]):
    """Checkpoint name -> (destination view, its scale's destination view or None, expert coverage
    index, model tensor name). A scale destination exists only for the model's FP8 parameters."""
    if name in targets:
        return targets[name], targets.get(name + _SCALE_SUFFIX), None, name
    match = _EXPERT_RE.match(name)
    if not match:
        return None, None, None, None
    prefix, expert, proj = match.group(1), int(match.group(2)), match.group(3)
    if proj == "down_proj":
        target = f"{prefix}.down_proj"
        if target not in targets or expert >= targets[target].shape[0]:
            return None, None, None, None
        scale = targets.get(target + _SCALE_SUFFIX)
        return targets[target][expert], None if scale is None else scale[expert], (expert, 0), target
    target = f"{prefix}.gate_up_proj"
    if target not in targets or expert >= targets[target].shape[0]:
        return None, None, None, None
    half = targets[target].shape[1] // 2
    part = 0 if proj == "gate_proj" else 1
    scale = targets.get(target + _SCALE_SUFFIX)  # [E, 2 * ceil(I / bn), ...]: gate's block rows, then up's
    if scale is not None:
        rows = scale.shape[1] // 2
        scale = scale[expert, part * rows:(part + 1) * rows]
    return targets[target][expert, part * half:(part + 1) * half], scale, (expert, part), target


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


# Grouped routed-expert tensors of the model -> the per-expert Hugging Face names they split into.
_GROUPED_EXPERT_NAMES = {
    "experts.gate_up_proj": ("gate_proj.weight", "up_proj.weight"),
    "experts.down_proj": ("down_proj.weight",),
    "experts.gate_up_proj_scale_inv": (f"gate_proj.weight{_SCALE_SUFFIX}", f"up_proj.weight{_SCALE_SUFFIX}"),
    "experts.down_proj_scale_inv": (f"down_proj.weight{_SCALE_SUFFIX}",),
}


def mtp_layers_in(reader: CheckpointReader, num_layers: int) -> int:
    """How many MTP layers (consecutive indices from num_layers on) `reader`'s index has tensors of."""
    layers = {int(match.group(1)) for match in map(_LAYER_RE.match, reader.names()) if match}
    depth = 0
    while num_layers + depth in layers:
        depth += 1
    return depth


def hf_name(name: str, num_layers: int) -> str:
    """A model tensor's checkpoint name: MTP depth k's `model.mtp_layers.k.*` is V3's
    `model.layers.{num_layers + k}.*`; every other name is its own."""
    mtp = _MTP_NAME_RE.match(name)
    return f"model.layers.{num_layers + int(mtp.group(1))}.{mtp.group(2)}" if mtp else name


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under Hugging Face names, routed experts split per expert (FP8 experts'
    scales too, as `...experts.E.gate_proj.weight_scale_inv`), MTP layers at their V3 index."""
    out: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    num_layers = model.args.num_hidden_layers if hasattr(model, "args") else None
    for depth in range(getattr(model, "mtp_depth", 0)):
        for copy, source in _MTP_SHARED.items():  # copies: safetensors refuses tensors that share memory
            state[f"model.mtp_layers.{depth}.{copy}"] = state[source].clone()
    for name, tensor in state.items():
        name = hf_name(name, num_layers)
        per_expert = next((names for suffix, names in _GROUPED_EXPERT_NAMES.items() if name.endswith(suffix)), None)
        if per_expert is None:
            out[name] = tensor
            continue
        prefix = name.rsplit(".", 1)[0]
        for e in range(tensor.shape[0]):  # gate_up rows (and their scale rows): gate's half, then up's
            for part, expert_name in zip(tensor[e].chunk(len(per_expert)), per_expert, strict=True):
                out[f"{prefix}.{e}.{expert_name}"] = part
    return out


def save_checkpoint(model: torch.nn.Module, folder: str | Path, args: ModelArgs,
                    max_shard_bytes: int = 2 << 30, dtype: torch.dtype | None = None) -> None:
    """Write config.json and safetensors shards (with an index when more than one)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    def keep_dtype(name: str, tensor: torch.Tensor) -> bool:  # FP8 weights and their scales stay as they are
        return (dtype is None or not tensor.is_floating_point() or tensor.dtype == torch.float8_e4m3fn
                or name.endswith(_SCALE_SUFFIX))

    tensors = {k: (v if keep_dtype(k, v) else v.to(dtype)).contiguous().cpu() for k, v in hf_state_dict(model).items()}
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
    config = args.to_hf_config()
    config["num_nextn_predict_layers"] = getattr(model, "mtp_depth", 0)  # what the tensors hold, whatever args said
    (folder / "config.json").write_text(json.dumps(config, indent=2))
