"""The binding of the native decoder (`decoder.c`): the engine's decode steps in one C call.

Contract:
- `decoder_weights(model)` is the one place that knows how the model's parameters map onto the
  decoder's roles (as torchtitan's state-dict adapters do): it returns a `DecoderWeights` by
  parameter name, and raises `NotApplicable` naming any parameter it has no role for (a bias,
  FP8 scales, a new module), so a model it does not fully cover never runs natively.
- `prepare(model, cache)` is the explicit build step: it packs every weight into panels (the
  layout in `decoder.h`) in one huge-page arena, each in its own dtype (float32, or bfloat16
  computed with float32 accumulation), and returns a `NativeDecoder`; or None, logging why,
  where the decoder does not apply (no C compiler, CUDA, FP8 or remote experts, float16). The
  model is not modified: the packed panels are a copy, so a weight changed after `prepare` is
  not seen until `prepare` runs again.
- `NativeDecoder.step(token_ids, positions, token_seq, block_tables, block_size)` returns the
  logits [T, V] (float32) that `model.logits(model.forward_tokens(...))` returns for those tokens
  over the paged cache, with the same cache writes and routed-token counts (see
  `moeray_decoder_step` in `decoder.h` for the arguments' meaning). `run` adds what speculative
  decoding needs: logits at chosen rows only, the hidden states, and the model's MTP layers
  (`depth=k`, fed the previous depth's hidden states; packed where the cache has their layer).
The struct layout comes from `decoder.h` alone, through cffi.
"""

from __future__ import annotations

import array
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moeray.kernels import cpu

logger = logging.getLogger(__name__)

HEADER = Path(__file__).with_name("decoder.h")
LANES = 32  # rows per panel (decoder.h)
TOPK_METHODS = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}
PACKED_DTYPES = (torch.float32, torch.bfloat16)


class NotApplicable(Exception):
    """The model has something the native decoder does not implement (the message says what)."""


# Role of each parameter of a decoder layer, by its name under `model.layers.<i>.` (Hugging Face
# DeepSeek-V3 names). Shared experts and a dense MLP take the same three roles.
LAYER_ROLES = {
    "input_layernorm.weight": "input_norm",
    "post_attention_layernorm.weight": "post_norm",
    "self_attn.q_a_proj.weight": "q_a",
    "self_attn.q_a_layernorm.weight": "q_a_norm",
    "self_attn.q_b_proj.weight": "q_b",
    "self_attn.q_proj.weight": "q_b",
    "self_attn.kv_a_proj_with_mqa.weight": "kv_a",
    "self_attn.kv_a_layernorm.weight": "kv_a_norm",
    "self_attn.kv_b_proj.weight": "kv_b",
    "self_attn.o_proj.weight": "o_proj",
    "mlp.gate_proj.weight": "gate",
    "mlp.up_proj.weight": "up",
    "mlp.down_proj.weight": "down",
    "mlp.shared_experts.gate_proj.weight": "gate",
    "mlp.shared_experts.up_proj.weight": "up",
    "mlp.shared_experts.down_proj.weight": "down",
    "mlp.gate.weight": "router",
    "mlp.gate.e_score_correction_bias": "router_bias",
    "mlp.experts.gate_up_proj": "experts_gate_up",
    "mlp.experts.down_proj": "experts_down",
}
MODEL_ROLES = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm", "lm_head.weight": "lm_head"}
# An MTP layer's own tensors beyond a decoder layer's, under `model.mtp_layers.<k>.`.
MTP_ROLES = {"enorm.weight": "enorm", "hnorm.weight": "hnorm", "eh_proj.weight": "eh_proj",
             "shared_head.norm.weight": "head_norm"}


@dataclass
class DecoderWeights:
    """The model's tensors by role: `model` for the embedding, final norm and head, `layers[i]`
    for layer i, `mtp_layers[k]` for MTP depth k; `names` lists every parameter and buffer name
    mapped (for the coverage test)."""

    model: dict[str, torch.Tensor] = field(default_factory=dict)
    layers: list[dict[str, torch.Tensor]] = field(default_factory=list)
    mtp_layers: list[dict[str, torch.Tensor]] = field(default_factory=list)
    names: set[str] = field(default_factory=set)


def decoder_weights(model: torch.nn.Module) -> DecoderWeights:
    weights = DecoderWeights(layers=[{} for _ in range(model.args.num_hidden_layers)],
                             mtp_layers=[{} for _ in range(getattr(model, "mtp_depth", 0))])
    tensors = dict(model.named_parameters())
    tensors.update((name, buffer) for name, buffer in model.named_buffers() if name.endswith("correction_bias"))
    for name, tensor in tensors.items():
        if name in MODEL_ROLES:
            weights.model[MODEL_ROLES[name]] = tensor
        else:
            for prefix, stack, roles in (("model.layers.", weights.layers, LAYER_ROLES),
                                         ("model.mtp_layers.", weights.mtp_layers, {**LAYER_ROLES, **MTP_ROLES})):
                if name.startswith(prefix):
                    index, _, rest = name[len(prefix):].partition(".")
                    if rest not in roles or int(index) >= len(stack):
                        raise NotApplicable(f"no native role for parameter {name}")
                    stack[int(index)][roles[rest]] = tensor
                    break
            else:
                raise NotApplicable(f"no native role for parameter {name}")
        weights.names.add(name)
    return weights


def _ffi():
    try:
        import cffi
    except ImportError as err:
        raise NotApplicable(f"cffi is not installed ({err})") from None

    ffi = cffi.FFI()
    ffi.cdef("\n".join(line for line in HEADER.read_text().splitlines() if not line.lstrip().startswith("#")))
    return ffi


class _Packer:
    """Lays weights out as panels in one huge-page arena (two passes: sizes, then copies). Each
    matrix keeps its own dtype (a bfloat16 checkpoint's routers stay float32, as the model
    computes them)."""

    def __init__(self):
        self.planned, self.arena, self.offset = [], None, 0

    @staticmethod
    def nbytes(stack: torch.Tensor) -> int:
        m, rows, cols = stack.shape
        cols = cols + cols % 2 if stack.dtype == torch.bfloat16 else cols
        return m * -(-rows // LANES) * LANES * cols * stack.dtype.itemsize

    def plan(self, stack: torch.Tensor) -> None:
        if stack.dtype not in PACKED_DTYPES:
            raise NotApplicable(f"a {stack.dtype} weight (float32 or bfloat16 only)")
        self.planned.append(self.nbytes(stack))

    def allocate(self) -> None:
        total = sum((n + 63) // 64 * 64 for n in self.planned)  # 64-byte aligned starts
        self.arena = cpu.huge_page_floats(max(total // 4, 1)).view(torch.uint8)

    def pack(self, stack: torch.Tensor, ffi, kept: list, refills: list) -> object:
        """stack [M, rows, cols] -> a Panels struct over its packed copy (`refills` gets the copy step)."""
        m, rows, cols = stack.shape
        dtype = stack.dtype
        packed = _panel_layout(stack, dtype)
        size = packed.numel() * dtype.itemsize
        region = self.arena[self.offset:self.offset + size].view(dtype).view(packed.shape)
        region.copy_(packed)
        self.offset += (size + 63) // 64 * 64
        kept.append(region)
        refills.append(lambda source, region=region: region.copy_(_panel_layout(source, region.dtype)))
        bf16 = dtype == torch.bfloat16
        padded_cols = packed.shape[2] * (2 if bf16 else 1)
        return ffi.new("Panels *", {"data": ffi.cast("void *", region.data_ptr()), "rows": rows, "cols": cols,
                                    "panel_stride": LANES * padded_cols, "matrix_stride": packed[0].numel(),
                                    "bf16": int(bf16)})[0]


def _panel_layout(stack: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """stack [M, rows, cols] -> panels [M, P, K, 32] (float32) or [M, P, K/2, 32, 2] (bfloat16),
    rows padded with zeros to P * 32 and, for bfloat16, cols to an even K (decoder.h)."""
    m, rows, cols = stack.shape
    panels = -(-rows // LANES)
    padded_cols = cols + cols % 2 if dtype == torch.bfloat16 else cols
    source = torch.zeros(m, panels * LANES, padded_cols, dtype=dtype)
    source[:, :rows, :cols] = stack.detach().to(dtype)
    if dtype == torch.bfloat16:  # [M, P, 32, K/2, 2] -> [M, P, K/2, 32, 2]
        return source.view(m, panels, LANES, padded_cols // 2, 2).permute(0, 1, 3, 2, 4).contiguous()
    return source.view(m, panels, LANES, cols).permute(0, 1, 3, 2).contiguous()  # [M, P, 32, K] -> [M, P, K, 32]


def _stacks(model: torch.nn.Module, weights: DecoderWeights) -> list[tuple[tuple, torch.Tensor]]:
    """Every matrix the decoder reads, as (where, stack [M, rows, cols]) in packing order."""
    args = model.args
    h, dn, dv, r = args.num_attention_heads, args.qk_nope_head_dim, args.v_head_dim, args.kv_lora_rank
    stacks = []
    # MTP depth k is layer num_hidden_layers + k, as in the checkpoint and the latent cache.
    for i, layer in enumerate(weights.layers + weights.mtp_layers):
        for role in ("q_a", "q_b", "kv_a", "o_proj", "gate", "up", "down", "router", "eh_proj"):
            if role in layer:
                stacks.append(((i, role), layer[role][None]))
        kv_b = layer["kv_b"].view(h, dn + dv, r)
        stacks.append(((i, "w_uk"), kv_b[:, :dn].transpose(1, 2)))  # [H, r, dn]
        stacks.append(((i, "w_uv"), kv_b[:, dn:]))                   # [H, dv, r]
        if "experts_gate_up" in layer:
            gate_up, intermediate = layer["experts_gate_up"], layer["experts_down"].shape[2]
            stacks.append(((i, "experts_gate"), gate_up[:, :intermediate]))
            stacks.append(((i, "experts_up"), gate_up[:, intermediate:]))
            stacks.append(((i, "experts_down"), layer["experts_down"]))  # [E, D, I]
    stacks.append(((None, "lm_head"), weights.model["lm_head"][None]))
    return stacks


def _check(model: torch.nn.Module, cache) -> None:
    params = list(model.parameters())
    dtypes = {p.dtype for p in params}
    if not dtypes <= set(PACKED_DTYPES):
        raise NotApplicable(f"parameter dtypes {sorted(map(str, dtypes))} (float32 or bfloat16 only)")
    if any(p.device.type != "cpu" for p in params):
        raise NotApplicable("parameters not on the CPU")
    if any(layer.dtype not in PACKED_DTYPES or layer.device.type != "cpu" for layer in cache.layers):
        raise NotApplicable("a latent cache that is not float32 or bfloat16 on the CPU")
    layers = [*model.model.layers, *getattr(model.model, "mtp_layers", [])]
    eps = {layer.input_layernorm.eps for layer in layers} | {model.model.norm.eps}
    if len(eps) != 1:
        raise NotApplicable(f"norms with different eps {sorted(eps)}")
    for layer in layers:
        experts = getattr(layer.mlp, "experts", None)
        if hasattr(layer.mlp, "gate") and (experts is None or experts.fp8_block is not None):
            raise NotApplicable("remote or FP8 experts")


class NativeDecoder:
    """The packed decoder: `step`/`run` for the main model, `run(..., depth=k)` for MTP depth k
    (`num_mtp_layers` of them, those whose latent cache layer exists)."""

    def __init__(self, ffi, lib, decoder, mtp_decoders: list, kept: list, args, refill):
        self.ffi, self.lib, self.decoder, self.mtp_decoders, self._kept = ffi, lib, decoder, mtp_decoders, kept
        self.vocab, self.hidden = args.vocab_size, args.hidden_size
        self._refill = refill

    @property
    def num_mtp_layers(self) -> int:
        return len(self.mtp_decoders)

    @torch.no_grad()
    def refresh(self, model: torch.nn.Module) -> None:
        """Copy `model`'s current weights into the packed panels (same shapes as at `prepare`):
        what a trainer calls after changing the weights of the model it prepared."""
        self._refill(model)

    def step(self, token_ids: list[int], positions: list[int], token_seq: list[int], block_tables: list[list[int]],
             block_size: int) -> torch.Tensor:
        """Logits [T, V] (float32) of T tokens; see the module docstring."""
        return self.run(token_ids, positions, token_seq, block_tables, block_size)[0]

    def run(self, token_ids: list[int], positions: list[int], token_seq: list[int], block_tables: list[list[int]],
            block_size: int, *, depth: int | None = None, previous_hidden: torch.Tensor | None = None,
            logit_rows: list[int] | None = None, want_hidden: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits [R, V], hidden [T, D] or None): the main model (`depth` None) or MTP depth
        `depth` fed `previous_hidden` [T, D]; logits only at `logit_rows` (ascending; all T rows
        when None), the hidden state the next MTP depth takes when `want_hidden`."""
        count, stride = len(token_ids), max(map(len, block_tables))
        # One int64 array: token ids, positions and sequence indices [T] each, the logit rows
        # [R], then the tables [S, stride].
        rows = list(range(count)) if logit_rows is None else logit_rows
        packed = array.array("q", token_ids + positions + token_seq + rows)
        for table in block_tables:
            packed.extend(table)
            packed.extend([0] * (stride - len(table)))
        address = packed.buffer_info()[0]
        logits = torch.empty(len(rows), self.vocab)
        hidden = torch.empty(count, self.hidden) if want_hidden else None
        cast, null = self.ffi.cast, self.ffi.NULL
        if depth is None:
            decoder, previous = self.decoder, null
        else:
            if previous_hidden is None or previous_hidden.shape != (count, self.hidden):
                raise ValueError(f"MTP depth {depth} needs previous_hidden [{count}, {self.hidden}]")
            previous_hidden = previous_hidden.detach().to(torch.float32).contiguous()
            decoder, previous = self.mtp_decoders[depth], cast("float *", previous_hidden.data_ptr())
        self.lib.moeray_decoder_run(
            decoder, count, cast("long *", address), previous, cast("long *", address + 8 * count),
            cast("long *", address + 16 * count), cast("long *", address + (24 * count + 8 * len(rows))), stride,
            block_size, len(rows), null if logit_rows is None else cast("long *", address + 24 * count),
            cast("float *", logits.data_ptr()), null if hidden is None else cast("float *", hidden.data_ptr()))
        return logits, hidden


def prepare(model: torch.nn.Module, cache) -> NativeDecoder | None:
    """Pack `model`'s weights for the native decoder over `cache`, or None (logged) where it does not apply."""
    path = cpu.library_path()
    if path is None:
        return None
    try:
        return _prepare(model, cache, path)
    except NotApplicable as why:
        logger.info("native decoder not used: %s", why)
        return None


_NORM_ROLES = ("input_norm", "q_a_norm", "kv_a_norm", "post_norm")
_PANEL_ROLES = ("q_a", "q_b", "kv_a", "o_proj", "w_uk", "w_uv", "gate", "up", "down", "router",
                "experts_gate", "experts_up", "experts_down")


@torch.no_grad()
def _prepare(model: torch.nn.Module, cache, path: Path) -> NativeDecoder:
    _check(model, cache)
    weights = decoder_weights(model)
    ffi = _ffi()
    lib = ffi.dlopen(str(path))
    kept: list = []

    vectors: list[tuple[torch.Tensor, torch.Tensor]] = []  # (source, float32 copy the decoder reads)

    def fp32(tensor: torch.Tensor | None):
        if tensor is None:
            return ffi.NULL
        copy = tensor.detach().to(torch.float32).contiguous().clone()
        kept.append(copy)
        vectors.append((tensor, copy))
        return ffi.cast("float *", copy.data_ptr())

    stacks = _stacks(model, weights)
    packer = _Packer()
    for _, stack in stacks:
        packer.plan(stack)
    packer.allocate()
    refills: list = []
    panels = {where: packer.pack(stack, ffi, kept, refills) for where, stack in stacks}

    def bind_layers(index: int, modules: list, roles_of: list[dict]):
        """A DecoderLayer array for `modules`, the first of which is layer `index`."""
        layers = ffi.new("DecoderLayer[]", len(modules))
        kept.append(layers)
        for offset, (module, roles) in enumerate(zip(modules, roles_of)):
            i, layer = index + offset, layers[offset]
            for role in _NORM_ROLES:
                setattr(layer, role, fp32(roles.get(role)))
            for role in _PANEL_ROLES:
                if (i, role) in panels:
                    setattr(layer, role, panels[(i, role)])
            layer.cache = ffi.cast("void *", cache.layers[i].data_ptr())
            layer.cache_bf16 = int(cache.layers[i].dtype == torch.bfloat16)
            if "router" in roles:
                _bind_routing(layer, module.mlp, fp32, ffi)
        return layers

    args = model.args
    final = weights.model
    embed = final["embed"].detach().contiguous()
    kept.append(embed)
    attn = model.model.layers[0].self_attn
    common = {
        "hidden": args.hidden_size, "heads": args.num_attention_heads, "nope_dim": args.qk_nope_head_dim,
        "rope_dim": args.qk_rope_head_dim, "v_dim": args.v_head_dim, "kv_rank": args.kv_lora_rank,
        "q_rank": args.q_lora_rank or 0, "rope_interleave": int(args.rope_interleave), "vocab": args.vocab_size,
        "eps": model.model.norm.eps, "softmax_scale": attn.softmax_scale,
        "rope_scale": model.rotary.attention_factor, "inv_freq": fp32(model.rotary.inv_freq(torch.device("cpu"))),
        "embed": ffi.cast("void *", embed.data_ptr()), "embed_bf16": int(embed.dtype == torch.bfloat16),
        "lm_head": panels[(None, "lm_head")]}
    n = args.num_hidden_layers
    decoder = ffi.new("Decoder *", {**common, "final_norm": fp32(final["final_norm"]), "num_layers": n,
                                    "layers": bind_layers(0, list(model.model.layers), weights.layers)})
    mtp_decoders = []
    for k, roles in enumerate(weights.mtp_layers):
        if n + k >= len(cache.layers):
            break  # a cache without this depth's layer: speculation does not use it
        mtp = ffi.new("Decoder *", {**common, "final_norm": fp32(roles["head_norm"]), "num_layers": 1,
                                    "layers": bind_layers(n + k, [model.model.mtp_layers[k]], [roles]),
                                    "enorm": fp32(roles["enorm"]), "hnorm": fp32(roles["hnorm"]),
                                    "eh_proj": panels[(n + k, "eh_proj")]})
        mtp_decoders.append(mtp)

    def refill(current: torch.nn.Module) -> None:
        for copy_in, (_, stack) in zip(refills, _stacks(current, decoder_weights(current)), strict=True):
            copy_in(stack)
        for source, copy in vectors:  # norms, the routers' correction biases (the same tensors)
            copy.copy_(source)
        if embed.data_ptr() != decoder_weights(current).model["embed"].data_ptr():
            embed.copy_(decoder_weights(current).model["embed"])

    return NativeDecoder(ffi, lib, decoder, mtp_decoders, kept, args, refill)


def _bind_routing(layer, mlp: torch.nn.Module, fp32, ffi) -> None:
    gate = mlp.gate
    layer.router_bias = fp32(gate.e_score_correction_bias)
    layer.num_experts, layer.top_k = gate.num_experts, gate.top_k
    layer.n_group, layer.topk_group = gate.n_group, gate.topk_group
    layer.scoring_sigmoid = int(gate.scoring_func == "sigmoid")
    layer.topk_method = TOPK_METHODS[gate.topk_method]
    layer.norm_topk_prob, layer.routed_scaling_factor = int(gate.norm_topk_prob), gate.routed_scaling_factor
    # The C side adds to the layer's counter in place (MoE._count adds in place too).
    if mlp.routed_tokens is None:
        mlp.routed_tokens = torch.zeros(gate.num_experts, dtype=torch.long)
    counts = mlp.routed_tokens
    if counts.dtype != torch.long or not counts.is_contiguous() or counts.device.type != "cpu":
        raise NotApplicable("routed-token counters not int64 on CPU")
    layer.routed_counts = ffi.cast("long *", counts.data_ptr())
