"""The whole decode step of a few sequences in one native call (`moeray/kernels/cpu/decoder.c`).

Contract: `NativeDecoder.build(model, cache)` binds the C decoder stack to a model's weights and
the latent cache, or returns None where it does not apply: no C kernels, weights not float32 on
CPU, biases, FP8 or remote experts, a weight layout the kernels cannot read. `takes(num_tokens)`
says whether a step of that many single-token decodes may run natively (at most `MAX_TOKENS`, the
kernels switched on); `step(token_ids, positions, key_slots)` then returns the logits [B, V]
that `model.logits(model.forward_tokens(...))` returns for that step over the paged cache, with
the same cache writes and routed-token counts. key_slots[b] lists the cache slots of sequence b's
keys in position order, the last being the new token's own.

`build` first moves the model's float32 weights into one huge-page arena (same tensors to every
other reader; see `kernels.pack_weights`). The step goes from token ids to logits without a
torch op: the inputs travel as one int64 array, and embedding, rope, every layer, the final
norm and the output head run in one OpenMP region. The decoder reads the parameters' storage in
place: it keeps a reference to every tensor it points at, so a parameter whose `.data` is
replaced after `build` is not seen (build again).
"""

from __future__ import annotations

import array
import ctypes

import torch

from moeray import kernels
from moeray.engine.cache import LatentCache
from moeray.kernels import cpu
from moeray.model.layers import MLP
from moeray.model.moe import MoE
from moeray.model.transformer import DeepseekForCausalLM

MAX_TOKENS = kernels.MAX_DECODE_TOKENS  # beyond this batched GEMMs reuse each weight enough to win

_c_long, _c_float, _ptr = ctypes.c_long, ctypes.c_float, ctypes.c_void_p
TOPK_METHODS = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}


class Matrix(ctypes.Structure):
    _fields_ = [("w", _ptr), ("rows", _c_long), ("cols", _c_long), ("ld", _c_long), ("column_major", _c_long)]


class Layer(ctypes.Structure):
    _fields_ = [("input_norm", _ptr), ("q_a_norm", _ptr), ("kv_a_norm", _ptr), ("post_norm", _ptr),
                ("q_a", Matrix), ("q_b", Matrix), ("kv_a", Matrix), ("o_proj", Matrix),
                ("kv_b", _ptr), ("cache", _ptr),
                ("gate", Matrix), ("up", Matrix), ("down", Matrix),
                ("router", _ptr), ("router_bias", _ptr), ("experts_gate_up", _ptr), ("experts_down", _ptr),
                ("num_experts", _c_long), ("expert_dim", _c_long), ("top_k", _c_long), ("n_group", _c_long),
                ("topk_group", _c_long), ("scoring_sigmoid", _c_long), ("topk_method", _c_long),
                ("norm_topk_prob", _c_long), ("routed_scaling_factor", _c_float), ("routed_counts", _ptr)]


class Dims(ctypes.Structure):
    _fields_ = [("hidden", _c_long), ("heads", _c_long), ("nope_dim", _c_long), ("rope_dim", _c_long),
                ("v_dim", _c_long), ("kv_rank", _c_long), ("q_rank", _c_long), ("rope_interleave", _c_long),
                ("eps", _c_float), ("softmax_scale", _c_float), ("final_norm", _ptr), ("embed", _ptr),
                ("inv_freq", _ptr), ("rope_scale", _c_float), ("lm_head", Matrix)]


class NotApplicable(Exception):
    """The model has something the native decoder does not implement (the message says what)."""


class NativeDecoder:
    def __init__(self, model: DeepseekForCausalLM, layers: ctypes.Array, dims: Dims, kept: list[torch.Tensor]):
        self.model, self.layers, self.dims, self._kept = model, layers, dims, kept
        self.lib = cpu.library()

    @classmethod
    def build(cls, model: DeepseekForCausalLM, cache: LatentCache, pack: bool = True) -> "NativeDecoder | None":
        """Bind to `model`, first moving its weights into one huge-page arena (`pack`, see
        `kernels.pack_weights`) when the model is one the decoder takes."""
        if cpu.library() is None:
            return None
        try:
            decoder = cls._bind(model, cache)
        except NotApplicable:
            return None
        if not pack:
            return decoder
        kernels.pack_weights(model)
        return cls._bind(model, cache)

    @classmethod
    def _bind(cls, model: DeepseekForCausalLM, cache: LatentCache) -> "NativeDecoder":
        kept: list[torch.Tensor] = []

        def pointer(tensor: torch.Tensor | None) -> int | None:
            if tensor is None:
                return None
            if tensor.device.type != "cpu" or tensor.dtype != torch.float32 or not tensor.is_contiguous():
                raise NotApplicable(f"a {tensor.dtype} tensor on {tensor.device} "
                                    f"(contiguous: {tensor.is_contiguous()})")
            kept.append(tensor)
            return tensor.data_ptr()

        def matrix(linear: torch.nn.Module | None) -> Matrix:
            if linear is None:
                return Matrix()
            if getattr(linear, "bias", None) is not None or not isinstance(linear, torch.nn.Linear):
                raise NotApplicable(f"{type(linear).__name__} with a bias or not a plain Linear")
            weight = linear.weight
            layout = kernels._layout(weight)
            if weight.device.type != "cpu" or weight.dtype != torch.float32 or layout is None:
                raise NotApplicable("a projection weight the kernels cannot read")
            kept.append(weight)
            return Matrix(weight.data_ptr(), weight.shape[0], weight.shape[1], layout[1], layout[0])

        args = model.args
        layers = (Layer * args.num_hidden_layers)()
        for i, decoder_layer in enumerate(model.model.layers):
            attn, mlp, layer = decoder_layer.self_attn, decoder_layer.mlp, layers[i]
            layer.input_norm = pointer(decoder_layer.input_layernorm.weight)
            layer.post_norm = pointer(decoder_layer.post_attention_layernorm.weight)
            layer.kv_a_norm = pointer(attn.kv_a_layernorm.weight)
            if attn.q_lora_rank is None:
                layer.q_b = matrix(attn.q_proj)
            else:
                layer.q_a, layer.q_b = matrix(attn.q_a_proj), matrix(attn.q_b_proj)
                layer.q_a_norm = pointer(attn.q_a_layernorm.weight)
            layer.kv_a, layer.o_proj = matrix(attn.kv_a_proj_with_mqa), matrix(attn.o_proj)
            layer.kv_b = pointer(attn.kv_b_proj.weight)  # row-major: read per head
            layer.cache = pointer(cache.layers[i])
            if isinstance(mlp, MoE):
                cls._bind_moe(mlp, layer, pointer, matrix)
            elif isinstance(mlp, MLP):
                layer.gate, layer.up, layer.down = matrix(mlp.gate_proj), matrix(mlp.up_proj), matrix(mlp.down_proj)
            else:
                raise NotApplicable(f"feed-forward {type(mlp).__name__}")
        eps = {layer.input_layernorm.eps for layer in model.model.layers} | {model.model.norm.eps}
        if len(eps) != 1:
            raise NotApplicable(f"norms with different eps {sorted(eps)}")
        rotary = model.rotary
        dims = Dims(args.hidden_size, args.num_attention_heads, args.qk_nope_head_dim, args.qk_rope_head_dim,
                    args.v_head_dim, args.kv_lora_rank, args.q_lora_rank or 0, int(args.rope_interleave),
                    eps.pop(), model.model.layers[0].self_attn.softmax_scale, pointer(model.model.norm.weight),
                    pointer(model.model.embed_tokens.weight), pointer(rotary.inv_freq(torch.device("cpu"))),
                    rotary.attention_factor, matrix(model.lm_head))
        return cls(model, layers, dims, kept)

    @staticmethod
    def _bind_moe(mlp: MoE, layer: Layer, pointer, matrix) -> None:
        experts, gate = mlp.experts, mlp.gate
        if experts is None or experts.fp8_block is not None:
            raise NotApplicable("remote or FP8 experts")
        if mlp.shared_experts is not None:
            shared = mlp.shared_experts
            layer.gate, layer.up = matrix(shared.gate_proj), matrix(shared.up_proj)
            layer.down = matrix(shared.down_proj)
        layer.router = pointer(gate.weight)
        layer.router_bias = pointer(gate.e_score_correction_bias)
        layer.experts_gate_up = pointer(experts.gate_up_proj)
        layer.experts_down = pointer(experts.down_proj.transpose(1, 2))  # stored as [E, I, D]
        layer.num_experts, layer.expert_dim, layer.top_k = gate.num_experts, experts.intermediate_size, gate.top_k
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
        layer.routed_counts = counts.data_ptr()

    @staticmethod
    def takes(num_tokens: int) -> bool:
        """A step of `num_tokens` single-token decodes (and nothing else) may run natively."""
        return 0 < num_tokens <= MAX_TOKENS and kernels.cpu_kernels_enabled()

    def step(self, token_ids: list[int], positions: list[int], key_slots: list[list[int]]) -> torch.Tensor:
        """Logits [B, V] (float32) of B decodes; see the module docstring for the arguments."""
        batch, stride = len(token_ids), max(map(len, key_slots))
        # One int64 array: token ids, positions and key counts [B] each, then the key slots [B, stride].
        packed = array.array("q", token_ids + positions + [len(s) for s in key_slots])
        for slots in key_slots:
            packed.extend(slots)
            packed.extend([0] * (stride - len(slots)))
        address = packed.buffer_info()[0]
        logits = torch.empty(batch, self.dims.lm_head.rows)
        self.lib.moeray_decode_stack(ctypes.addressof(self.layers), len(self.layers), ctypes.addressof(self.dims),
                                     batch, address, address + 8 * batch, address + 24 * batch, stride,
                                     address + 16 * batch, logits.data_ptr())
        return logits
