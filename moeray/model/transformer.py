"""The DeepSeek-V2/V3 decoder stack and causal LM head.

Contract:
- `DeepseekForCausalLM(args)(input_ids [B, S])` returns logits [B, S, V]: causal, no cache.
- `forward_tokens(token_ids [T], positions [T], attention, experts=None)` runs T flat tokens of
  any number of sequences through the stack and returns final hidden states [T, D]; the
  attention backend decides which keys each token sees and the expert backend where the routed
  experts run. Every MoE layer routes all T tokens at once. `logits(hidden)` applies the head.
- The training form, `model(token_ids [N], positions [N], lengths=..., logits_at=[M])`: sequences
  concatenated without padding, each causal within itself, and logits [M, V] only at the
  positions a loss looks at. It goes through `forward`, so DDP and FSDP wrappers see it.
- Parameter names are the Hugging Face names (`model.layers.N.self_attn.q_a_proj.weight`, ...);
  routed experts use the grouped transformers-5 names (`...mlp.experts.gate_up_proj`).
- Multi-token prediction (DeepSeek-V3 section 2.2): built with `mtp_depth=K`, the model holds
  `model.mtp_layers[k]` (an `MTPLayer` each; the checkpoint's layer `num_hidden_layers + k`).
  `mtp_forward(k, hidden, next_ids, positions, attention)` runs one depth over flat tokens and
  returns its hidden states and the head's input, which `logits` turns into its predictions. The main stack never runs them: `forward_tokens` and
  every decode path are the same with or without them.
"""

from __future__ import annotations

import torch
from torch import nn

from moeray.model.config import ModelArgs
from moeray.model.layers import MLP, Linear, RMSNorm
from moeray.model.mla import (AttentionBackend, DenseCausalAttention, MultiHeadLatentAttention,
                              VarlenCausalAttention)
from moeray.model.moe import ExpertBackend, MoE, TopkGate
from moeray.model.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, local_experts: bool = True):
        super().__init__()
        self.self_attn = MultiHeadLatentAttention(args, layer_idx)
        self.mlp = (MoE(args, layer_idx, local_experts) if args.is_moe_layer(layer_idx)
                    else MLP(args.hidden_size, args.intermediate_size))
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def attend(self, x: torch.Tensor, rope, attention: AttentionBackend) -> torch.Tensor:
        return x + self.self_attn(self.input_layernorm(x), rope, attention)

    def forward(self, x: torch.Tensor, rope, attention: AttentionBackend,
                experts: ExpertBackend | None) -> torch.Tensor:
        x = self.attend(x, rope, attention)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, experts) if isinstance(self.mlp, MoE) else self.mlp(h))


class SharedHead(nn.Module):
    """An MTP layer's output norm. The head itself is the main model's `lm_head`, shared as in
    the paper (V3's checkpoints carry a copy, `shared_head.head`, which `checkpoint` writes on
    save and does not read back)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """One MTP depth: a full decoder block (MLA + MoE) behind the projection of the previous
    depth's hidden state joined with the embedding of the next token. Tensor names are
    DeepSeek-V3's: `enorm`, `hnorm`, `eh_proj`, the block's own, `shared_head.norm`."""

    def __init__(self, args: ModelArgs, layer_idx: int, local_experts: bool = True):
        super().__init__(args, layer_idx, local_experts)
        self.enorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.hnorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.eh_proj = Linear(2 * args.hidden_size, args.hidden_size, bias=False)
        self.shared_head = SharedHead(args)

    def forward(self, hidden: torch.Tensor, next_embeds: torch.Tensor, rope, attention: AttentionBackend,
                experts: ExpertBackend | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, shared_head.norm(h)): h = block(eh_proj([enorm(next_embeds); hnorm(hidden)])) is the
        next depth's input, its norm the output head's. The embedding comes first in the
        concatenation: the order DeepSeek's weights were trained with (vLLM and SGLang read them
        so). The head's norm runs here, not after: FSDP reshards a layer once its forward ends."""
        joined = torch.cat([self.enorm(next_embeds), self.hnorm(hidden)], dim=-1)  # [T, 2D]
        h = super().forward(self.eh_proj(joined), rope, attention, experts)
        return h, self.shared_head.norm(h)


class DeepseekModel(nn.Module):
    def __init__(self, args: ModelArgs, local_experts: bool = True, mtp_depth: int = 0):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i, local_experts) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        if mtp_depth:  # absent, not empty, without MTP: state dicts stay as they were
            # An MTP layer's experts always live here: drafting must not wait on expert shards.
            self.mtp_layers = nn.ModuleList(MTPLayer(args, args.num_hidden_layers + k)
                                            for k in range(mtp_depth))


class DeepseekForCausalLM(nn.Module):
    def __init__(self, args: ModelArgs, local_experts: bool = True, mtp_depth: int = 0):
        super().__init__()
        if mtp_depth < 0:
            raise ValueError(f"mtp_depth must be >= 0, got {mtp_depth}")
        self.args = args
        self.local_experts = local_experts
        self.mtp_depth = mtp_depth
        self.model = DeepseekModel(args, local_experts, mtp_depth)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(args)

    def mtp_forward(self, depth: int, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                    attention: AttentionBackend, experts: ExpertBackend | None = None):
        """MTP depth `depth` (0-based) over T flat tokens: `hidden` [T, D] is the previous depth's
        output (the main model's final hidden state for depth 0), `next_ids` [T] the tokens one
        step further on, `positions` [T] theirs. Returns (the depth's hidden states [T, D], the
        head's input [T, D]); `logits(head_input)` predicts the token after each of next_ids."""
        layer = self.model.mtp_layers[depth]
        return layer(hidden, self.model.embed_tokens(next_ids), self.rotary(positions), attention, experts)

    def forward_tokens(self, token_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionBackend,
                       experts: ExpertBackend | None = None) -> torch.Tensor:
        rope = self.rotary(positions)
        x = self.model.embed_tokens(token_ids)  # [T, D]
        for layer in self.model.layers:
            x = layer(x, rope, attention, experts)
        return self.model.norm(x)

    def forward_microbatches(self, batches: list[tuple[torch.Tensor, torch.Tensor, AttentionBackend]],
                             experts) -> list[torch.Tensor]:
        """`forward_tokens` for several micro-batches, interleaved so that one micro-batch's
        attention runs while another's routed experts are computed remotely.

        `experts` must offer `submit(layer, x, ids, weights) -> pending` with `pending.wait()`.
        Per layer: attention of micro-batch 0, submit its experts; finish micro-batch 1's previous
        layer, its attention, submit; ... so every remote expert call overlaps local work.
        """
        states = []
        for token_ids, positions, attention in batches:
            states.append({"x": self.model.embed_tokens(token_ids), "rope": self.rotary(positions),
                           "attention": attention, "finish": None})
        for layer in self.model.layers:
            for state in states:
                if state["finish"] is not None:
                    state["x"] = state["x"] + state["finish"]()
                    state["finish"] = None
                x = layer.attend(state["x"], state["rope"], state["attention"])
                h = layer.post_attention_layernorm(x)
                state["x"] = x
                if isinstance(layer.mlp, MoE):
                    state["finish"] = layer.mlp.start(h, experts)
                else:
                    state["x"] = x + layer.mlp(h)
        outputs = []
        for state in states:
            if state["finish"] is not None:
                state["x"] = state["x"] + state["finish"]()
            outputs.append(self.model.norm(state["x"]))
        return outputs

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, *, lengths: list[int] | None = None,
                logits_at: torch.Tensor | None = None, mtp_logits_at: list[torch.Tensor] | None = None):
        """Logits [B, S, V] for input_ids [B, S]; packed rows pass position_ids and segment_ids [B, S].

        With `lengths`, input_ids and position_ids [N] hold sequences concatenated without padding
        (sum(lengths) == N): no compute is spent on padding and none crosses sequences; the result
        is logits [M, V] at the flat positions `logits_at` [M] (all N when None).

        With `mtp_logits_at` (one index tensor per MTP depth, padding-free form only) the result is
        (logits, [logits of depth k at the rows mtp_logits_at[k]]): depth k's rows are
        `mtp_rows(lengths, k + 1)`, and row r predicts the token at flat index mtp_rows[r] + k + 2.
        """
        if lengths is not None:
            if (input_ids.dim() != 1 or position_ids is None or position_ids.shape != input_ids.shape
                    or sum(lengths) != input_ids.numel()):
                raise ValueError(f"input_ids {tuple(input_ids.shape)} and position_ids must be flat and hold "
                                 f"sum(lengths) = {sum(lengths)} tokens")
            hidden = self.forward_tokens(input_ids, position_ids, VarlenCausalAttention(lengths))
            logits = self.logits(hidden if logits_at is None else hidden[logits_at])
            if mtp_logits_at is None:
                return logits
            return logits, self._mtp_training(hidden, input_ids, position_ids, lengths, mtp_logits_at)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [batch, seq], got {tuple(input_ids.shape)}")
        batch, seq_len = input_ids.shape
        if position_ids is None:
            positions = torch.arange(seq_len, device=input_ids.device).repeat(batch)
        else:
            positions = position_ids.flatten()
        attention = DenseCausalAttention(batch, seq_len, segment_ids)
        hidden = self.forward_tokens(input_ids.flatten(), positions, attention)
        return self.logits(hidden).view(batch, seq_len, -1)

    def _mtp_training(self, hidden: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      lengths: list[int], logits_at: list[torch.Tensor]) -> list[torch.Tensor]:
        """The sequential MTP chain over packed sequences: depth k drops each sequence's last row
        of depth k-1 (it has no token k+1 further on) and runs causally within each sequence."""
        if len(logits_at) > self.mtp_depth:
            raise ValueError(f"{len(logits_at)} MTP depths asked for; the model has {self.mtp_depth}")
        previous, out = torch.arange(input_ids.numel(), device=input_ids.device), []
        for depth, at in enumerate(logits_at):
            step = depth + 1
            rows = mtp_rows(lengths, step).to(input_ids.device)  # [M] flat index of each row's first token
            shorter = [n - step for n in lengths if n > step]
            if not shorter:
                out.append(hidden.new_zeros(0, self.args.vocab_size))
                continue
            kept = torch.searchsorted(previous, rows)  # rows is a subset of previous, both ascending
            hidden, head_input = self.mtp_forward(depth, hidden[kept], input_ids[rows + step],
                                                  position_ids[rows + step], VarlenCausalAttention(shorter))
            out.append(self.logits(head_input[at]))
            previous = rows
        return out

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random initialisation for checkpoints built from scratch (tests, pre-training)."""
        _init_weights(self, std, generator)

    def add_mtp_layers(self, depth: int, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        """Grow the model to `depth` MTP layers, the new ones randomly initialised: training the
        MTP objective on a base checkpoint that has none (or fewer)."""
        if depth <= self.mtp_depth:
            return
        like = self.lm_head.weight
        new = [MTPLayer(self.args, self.args.num_hidden_layers + k) for k in range(self.mtp_depth, depth)]
        for layer in new:
            _init_weights(layer, std, generator)
            layer.to(device=like.device, dtype=like.dtype)
            for module in layer.modules():
                if isinstance(module, TopkGate):
                    module.float()  # routing stays float32 whatever the model dtype
        if self.mtp_depth:
            self.model.mtp_layers.extend(new)
        else:
            self.model.mtp_layers = nn.ModuleList(new)
        self.mtp_depth = depth


@torch.no_grad()
def _init_weights(module: nn.Module, std: float, generator: torch.Generator | None) -> None:
    for name, param in module.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif param.dim() == 1:
            param.zero_()
        else:
            param.normal_(0.0, std, generator=generator)
    for child in module.modules():
        bias = getattr(child, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            bias.zero_()


def mtp_rows(lengths: list[int], depth: int) -> torch.Tensor:
    """Flat indices, in packed sequences of `lengths`, of the rows MTP depth `depth` (1-based)
    runs on: every token of a sequence but its last `depth`, whose tokens `depth` further on the
    depth embeds."""
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0).tolist()
    return torch.cat([torch.arange(start, start + n - depth) for start, n in zip(starts, lengths) if n > depth]
                     or [torch.zeros(0, dtype=torch.long)])
