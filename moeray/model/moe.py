"""DeepSeekMoE: the top-k gate, grouped routed experts, shared experts.

Contract:
- `TopkGate(x [T, D])` returns `(weights [T, k] float32, expert_ids [T, k] int64)` for every
  scoring function / top-k method of DeepSeek-V2 and V3; weights already carry
  `norm_topk_prob` and `routed_scaling_factor`.
- `RoutedExperts` stores all routed experts of a layer in two tensors (`gate_up_proj`
  [E, 2I, D], `down_proj` [E, D, I], the transformers-5 shapes) and computes a step's tokens in
  one grouped pass: pairs sorted by expert, one matmul per expert that received tokens.
  `down_proj` is stored column-major per expert ([E, I, D] in memory): its rows are short (I), and
  reading it as I rows of D streams better in the decode kernels; GEMMs do not mind.
  `keep_fp8(block)` switches both to float8_e4m3fn with block scales (`gate_up_proj_scale_inv`,
  `down_proj_scale_inv`, layout in `moeray.kernels.fp8.ExpertScales`), for FP8 checkpoints served
  without a full-precision copy: the fused MoE dequantises in the kernel on CUDA, the torch path
  one expert at a time.
- `MoE.forward(x, experts=None)` adds the shared experts to the routed output. Routed experts
  may be computed elsewhere: an `ExpertBackend` (experts in other processes) is passed in.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moeray import kernels
from moeray.kernels.fp8 import ExpertScales
from moeray.model.config import ModelArgs
from moeray.model.layers import MLP


class ExpertBackend(Protocol):
    """Computes the weighted routed-expert output [T, D] for one MoE layer."""

    def __call__(self, layer_idx: int, x: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor: ...


class TopkGate(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.num_experts = args.n_routed_experts
        self.scoring_func, self.topk_method = args.scoring_func, args.topk_method
        self.n_group, self.topk_group = args.n_group, args.topk_group
        self.norm_topk_prob = args.norm_topk_prob
        self.routed_scaling_factor = args.routed_scaling_factor
        # The router runs in float32 whatever the model dtype: routing is a discrete choice and
        # bf16 logits flip near-ties.
        self.weight = nn.Parameter(torch.empty(self.num_experts, args.hidden_size, dtype=torch.float32))
        if self.topk_method == "noaux_tc":
            # Aux-loss-free balancing: a per-expert bias that shifts the choice, never the weight.
            self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        logits = kernels.linear(x.float(), self.weight.float())  # [T, E]
        return logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.scores(x)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.topk_method != "greedy" and self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)  # [T, G, E/G]
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices  # [T, topk_group]
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
        expert_ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, expert_ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, expert_ids


def expert_pairs_forward(x: torch.Tensor, token_of_pair: torch.Tensor, expert_of_pair: torch.Tensor,
                         weight_of_pair: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                         scales: ExpertScales | None = None) -> torch.Tensor:
    """sum over pairs p of weight_p * expert_p(x[token_p]), one matmul per expert hit.

    x [T, D]; token_of_pair, expert_of_pair, weight_of_pair [P] (experts index the first dim of
    gate_up [E, 2I, D] and down [E, D, I]). Returns [T, D] in x's dtype. The same computation
    serves local experts and expert shards (which receive only their pairs). `kernels` may take
    it whole: the Triton fused MoE on CUDA, the C kernel for a few float32 pairs on CPU.
    With `scales` the experts are FP8 and each expert hit is dequantised to x's dtype here.
    """
    fused = kernels.fused_expert_pairs(x, token_of_pair, expert_of_pair, weight_of_pair, gate_up, down, scales)
    if fused is not None:
        return fused
    order = expert_of_pair.argsort(stable=True)  # pairs grouped by expert
    tokens_sorted = token_of_pair[order]
    counts = torch.bincount(expert_of_pair, minlength=gate_up.shape[0]).tolist()
    x_sorted = x.index_select(0, tokens_sorted)  # [P, D]
    # Under autograd every piece is taken with split/unbind and the rows are concatenated once at
    # the end: indexing or slicing per expert would make each expert's backward allocate, clear
    # and accumulate a gradient as large as the whole input (or all experts' weights).
    weights = (zip(gate_up.unbind(0), down.unbind(0)) if scales is None
               else (scales.dequantize(e, gate_up, down, x.dtype) for e in range(gate_up.shape[0])))
    outputs = []
    for rows, count, (w_gate_up, w_down) in zip(x_sorted.split(counts), counts, weights):
        if count == 0:
            continue
        gate, up = F.linear(rows, w_gate_up).chunk(2, dim=-1)
        outputs.append(F.linear(F.silu(gate) * up, w_down))
    out_sorted = torch.cat(outputs) if outputs else torch.empty_like(x_sorted)  # [P, D]
    out_sorted = out_sorted * weight_of_pair[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add_(0, tokens_sorted, out_sorted)


def grouped_expert_forward(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                           gate_up: torch.Tensor, down: torch.Tensor,
                           scales: ExpertScales | None = None) -> torch.Tensor:
    """Routed-expert output for x [T, D] with expert_ids, weights [T, k]; returns [T, D]."""
    num_tokens, top_k = expert_ids.shape
    token_of_pair = torch.arange(num_tokens, device=x.device).repeat_interleave(top_k)
    return expert_pairs_forward(x, token_of_pair, expert_ids.flatten(), weights.flatten(), gate_up, down, scales)


class RoutedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size).transpose(1, 2))
        self.fp8_block: tuple[int, int] | None = None  # set by keep_fp8

    def keep_fp8(self, block: tuple[int, int]) -> None:
        """Store the experts as float8 e4m3 with (bn, bk) block scales, uninitialised (the loader
        fills them), on the current device: call it on a meta model before materialising."""
        e, i, d = self.num_experts, self.intermediate_size, self.gate_up_proj.shape[2]
        bn, bk = block
        device, fp8 = self.gate_up_proj.device, torch.float8_e4m3fn
        frozen = lambda t: nn.Parameter(t, requires_grad=False)  # no gradients through FP8 weights
        self.gate_up_proj = frozen(torch.empty(e, 2 * i, d, dtype=fp8, device=device))
        self.down_proj = frozen(torch.empty(e, i, d, dtype=fp8, device=device).transpose(1, 2))
        self.gate_up_proj_scale_inv = frozen(torch.empty(e, 2 * -(-i // bn), -(-d // bk), device=device))
        self.down_proj_scale_inv = frozen(torch.empty(e, -(-d // bn), -(-i // bk), device=device))
        self.fp8_block = block

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        scales = (None if self.fp8_block is None else
                  ExpertScales(self.gate_up_proj_scale_inv, self.down_proj_scale_inv, self.fp8_block))
        return grouped_expert_forward(x, expert_ids, weights, self.gate_up_proj, self.down_proj, scales)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, local_experts: bool = True):
        super().__init__()
        self.layer_idx = layer_idx
        self.gate = TopkGate(args)
        # Without local experts the routed experts live elsewhere (expert shards) and every
        # forward must be given the backend that reaches them.
        self.experts = (RoutedExperts(args.n_routed_experts, args.hidden_size, args.moe_intermediate_size)
                        if local_experts else None)
        self.shared_experts = (MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts)
                               if args.n_shared_experts else None)
        # Tokens routed to each expert since start (serving metrics, load balancing). A plain
        # attribute, not a buffer: it is runtime state, never part of a checkpoint.
        self.routed_tokens: torch.Tensor | None = None
        self.last_routing: tuple[torch.Tensor, torch.Tensor] | None = None

    def _count(self, expert_ids: torch.Tensor) -> None:
        counts = torch.bincount(expert_ids.flatten(), minlength=self.gate.num_experts)
        if self.routed_tokens is None:
            self.routed_tokens = counts
        else:
            self.routed_tokens += counts  # in place: the native decoder holds a pointer to it

    def start(self, x: torch.Tensor, experts) -> "Callable[[], torch.Tensor]":
        """Route x and submit its routed experts to an async backend (`submit(...).wait()`); the
        shared experts run here meanwhile. Returns the function that completes the layer's output."""
        weights, expert_ids = self.gate(x)
        if not self.training:
            self._count(expert_ids)
        pending = experts.submit(self.layer_idx, x, expert_ids, weights)
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        return lambda: pending.wait() if shared is None else pending.wait() + shared

    def forward(self, x: torch.Tensor, experts: ExpertBackend | None = None) -> torch.Tensor:
        weights, expert_ids = self.gate(x)
        if not self.training:
            self._count(expert_ids)
        else:
            # What the training losses need from this step's routing (auxiliary balance loss,
            # aux-loss-free bias updates); overwritten every forward.
            self.last_routing = (self.gate.scores(x), expert_ids)
        if experts is None:
            if self.experts is None:
                raise RuntimeError(f"MoE layer {self.layer_idx} has no local experts and no expert backend was given")
            out = self.experts(x, expert_ids, weights)
        else:
            out = experts(self.layer_idx, x, expert_ids, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
