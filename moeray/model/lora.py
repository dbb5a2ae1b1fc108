"""LoRA adapters for moeray models, stored in the PEFT on-disk format. Imports no ray.

Contract:
- `LoraLinear` wraps a frozen `moeray.model.layers.Linear` (kept as `base_layer`) and adds
  lora_A [r, in] and lora_B [out, r]: y = base_layer(x) + lora_B(lora_A(dropout(x))) * alpha / r.
  lora_A starts kaiming-uniform (a=sqrt(5)) and lora_B at zero, as PEFT does, so a fresh adapter
  changes nothing. `.weight` / `.bias` are the base layer's; code that reads `.weight` directly
  (MLA's absorbed decode path reads `kv_b_proj.weight`) sees the base weight only, so merge
  before serving such a model.
- `apply_lora(model, target_modules, rank, alpha, dropout)` wraps every `Linear` whose last name
  component is in `target_modules` (PEFT's list semantics: "q_a_proj" matches
  `model.layers.0.self_attn.q_a_proj`), freezes every other parameter and returns the wrapped
  names. A target that matches nothing raises `ValueError` naming it and the available layers.
- `lora_state_dict(model)` names tensors as PEFT writes them:
  `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`.
- `save_adapter(model, folder, ...)` writes `adapter_model.safetensors` and the
  `adapter_config.json` PEFT writes for a LoRA adapter; `load_adapter(model, folder)` reads such a
  folder back into a base model (dropout ignored) and returns its config. Unsupported or
  inconsistent adapters raise `AdapterError` naming the file and, for weights, the tensor; a
  failed load leaves the model as it was.
- `merge_lora(model)` folds every adapter into its base weight (W += alpha / r * B @ A) and puts
  the plain `Linear` back, so `save_checkpoint` writes an ordinary Hugging Face checkpoint.
- `merged_variant(model, folder)` serves an adapter beside its base model: a second model that
  shares every tensor with `model` except the adapter's target weights, which it holds merged.
  Memory per adapter is those weights only; `model` itself is not changed.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moeray.model.layers import Linear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's wrapper path in front of the base model's own names

# Config values PEFT may write that this implementation does not reproduce; loading an adapter
# that uses one would silently compute something else, so it is refused instead.
_UNSUPPORTED_UNLESS = {"use_dora": (False, None), "use_rslora": (False, None), "bias": ("none", None),
                       "fan_in_fan_out": (False, None), "modules_to_save": (None, []),
                       "rank_pattern": (None, {}), "alpha_pattern": (None, {}), "layers_to_transform": (None, [])}


class AdapterError(ValueError):
    """An adapter folder is missing, unsupported or does not match the model."""


class LoraLinear(nn.Module):
    def __init__(self, base_layer: Linear, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **factory)   # weight [r, in]
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **factory)  # weight [out, r]
        with torch.no_grad():
            # Drawn on CPU in float32 then copied, so a seed gives the same adapter on any device/dtype.
            init_a = torch.empty(rank, self.in_features)
            nn.init.kaiming_uniform_(init_a, a=math.sqrt(5), generator=generator)
            self.lora_A.weight.copy_(init_a)
            nn.init.zeros_(self.lora_B.weight)

    # Properties, not attributes: nn.Module.__setattr__ would register a Parameter assigned here
    # as a second copy of the weight, under a name that checkpoints would then contain.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., in] -> [..., out]; the low-rank path goes through [..., r].
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLinear)}


def apply_lora(model: nn.Module, target_modules: list[str], rank: int, alpha: float, dropout: float = 0.0,
               seed: int = 0) -> list[str]:
    """Wrap the targeted Linear layers of the main stack in LoraLinear and freeze everything else.
    MTP layers are never wrapped: transformers has no MTP module, so no PEFT adapter of a
    Hugging Face model holds tensors for them, and an adapter must load on a model with or
    without them."""
    if isinstance(target_modules, str):
        raise TypeError(f"target_modules must be a list of module names, got the string {target_modules!r}")
    if not (isinstance(rank, int) and rank > 0):
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if lora_modules(model):
        raise ValueError("model already has LoRA adapters; call merge_lora first to add another")
    linear_names = [name for name, module in model.named_modules()
                    if isinstance(module, Linear) and not name.startswith("model.mtp_layers.")]
    targets = set(target_modules)
    chosen = [name for name in linear_names if name.rsplit(".", 1)[-1] in targets]
    unmatched = sorted(targets - {name.rsplit(".", 1)[-1] for name in chosen})
    if unmatched:
        available = sorted({name.rsplit(".", 1)[-1] for name in linear_names})
        raise ValueError(f"target_modules {unmatched} match no module; available linear layers: {available}")

    # Everything is checked above: from here on nothing fails half-way through the model.
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name in chosen:
        _replace(model, name, LoraLinear(model.get_submodule(name), rank, alpha, dropout, generator))
    return chosen


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under PEFT's on-disk names (A [r, in], B [out, r])."""
    out: dict[str, torch.Tensor] = {}
    for name, module in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.weight
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.weight
    return out


def save_adapter(model: nn.Module, folder: str | Path, base_model_name_or_path: str, rank: int, alpha: float,
                 dropout: float, target_modules: list[str]) -> None:
    """Write adapter_model.safetensors and adapter_config.json as PEFT does."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("model has no LoRA adapters to save (apply_lora first)")
    for name, module in modules.items():
        # The config must describe the weights, or whoever loads them scales them wrongly.
        if module.rank != rank or module.scaling != alpha / rank:
            raise ValueError(f"{name} has rank {module.rank}, alpha {module.alpha}; save_adapter was told "
                             f"rank {rank}, alpha {alpha}")
        if name.rsplit(".", 1)[-1] not in target_modules:
            raise ValueError(f"{name} carries an adapter but is not covered by target_modules {target_modules}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    save_file(tensors, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "lora_dropout": dropout, "target_modules": list(target_modules),
              "base_model_name_or_path": base_model_name_or_path, "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "modules_to_save": None, "init_lora_weights": True,
              "use_rslora": False, "use_dora": False}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / ADAPTER_CONFIG
    if not path.exists():
        raise AdapterError(f"{path} not found: not a PEFT adapter folder")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    for key in ("peft_type", "r", "lora_alpha", "target_modules"):
        if key not in config:
            raise AdapterError(f"{path}: missing key '{key}'")
    if config["peft_type"] != "LORA":
        raise AdapterError(f"{path}: peft_type {config['peft_type']!r} is not supported, only 'LORA'")
    if not isinstance(config["target_modules"], list):
        raise AdapterError(f"{path}: target_modules must be a list of module names, got "
                           f"{config['target_modules']!r} (regular expressions are not supported)")
    for key, accepted in _UNSUPPORTED_UNLESS.items():
        if config.get(key) not in accepted:
            raise AdapterError(f"{path}: {key}={config[key]!r} is not supported (expected {accepted[0]!r})")
    return config


def load_adapter(model: nn.Module, folder: str | Path) -> dict[str, Any]:
    """Wrap `model` as the adapter's config says and load its weights; returns the config."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    weights_path = folder / ADAPTER_WEIGHTS
    if not weights_path.exists():
        raise AdapterError(f"{weights_path} not found (only the safetensors adapter format is read)")
    saved = load_file(weights_path)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        apply_lora(model, config["target_modules"], config["r"], config["lora_alpha"], dropout=0.0)
    except ValueError as err:
        raise AdapterError(f"{folder / ADAPTER_CONFIG}: {err}") from None
    try:
        _copy_adapter_weights(model, saved, weights_path)
    except AdapterError:
        _unwrap(model)  # leave the caller's model as it was, flags included
        for name, param in model.named_parameters():
            param.requires_grad_(requires_grad[name])
        raise
    return config


def _copy_adapter_weights(model: nn.Module, saved: dict[str, torch.Tensor], path: Path) -> None:
    expected = lora_state_dict(model)
    for key, tensor in saved.items():
        if key not in expected:
            raise AdapterError(f"tensor {key} in {path} does not match a LoRA-wrapped module of the model")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise AdapterError(f"tensor {key} in {path} has shape {tuple(tensor.shape)}, "
                               f"the model expects {tuple(expected[key].shape)}")
    missing = sorted(set(expected) - set(saved))
    if missing:
        raise AdapterError(f"{path} is missing tensor {missing[0]} ({len(missing)} missing in all)")
    with torch.no_grad():
        for key, tensor in saved.items():
            expected[key].copy_(tensor)


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight in place and restore the plain Linear layers.

    requires_grad flags are left as apply_lora set them (base weights frozen).
    """
    with torch.no_grad():
        for module in lora_modules(model).values():
            weight = module.base_layer.weight  # [out, in]
            # B [out, r] @ A [r, in] in float32, so a bf16 model is rounded once, not twice.
            delta = module.lora_B.weight.float() @ module.lora_A.weight.float()
            weight.add_((delta * module.scaling).to(weight.dtype))
    _unwrap(model)


def _unwrap(model: nn.Module) -> None:
    """Put each LoraLinear's base layer back in its place, discarding the adapter."""
    for name, module in lora_modules(model).items():
        _replace(model, name, module.base_layer)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def merged_variant(model: nn.Module, folder: str | Path) -> nn.Module:
    """`model` with the adapter in `folder` merged, sharing all tensors the adapter leaves alone."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    for module in model.modules():  # derived tensors some layers cache as plain attributes
        shared.update({id(v): v for v in vars(module).values() if isinstance(v, torch.Tensor)})
    variant = copy.deepcopy(model, memo=dict(shared))
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    try:
        load_adapter(variant, folder)
        with torch.no_grad():
            for module in lora_modules(variant).values():  # own copies of the weights merged into
                base = module.base_layer
                base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        merge_lora(variant)
    finally:
        for param in model.parameters():  # apply_lora froze the shared parameters: undo that
            param.requires_grad_(requires_grad[id(param)])
    return variant
