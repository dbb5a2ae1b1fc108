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
"""

from __future__ import annotations

import torch
from torch import nn

from moeray.model.config import ModelArgs
from moeray.model.layers import MLP, Linear, RMSNorm
from moeray.model.mla import (AttentionBackend, DenseCausalAttention, MultiHeadLatentAttention,
                              VarlenCausalAttention)
from moeray.model.moe import MoE, ExpertBackend
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


class DeepseekModel(nn.Module):
    def __init__(self, args: ModelArgs, local_experts: bool = True):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i, local_experts) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class DeepseekForCausalLM(nn.Module):
    def __init__(self, args: ModelArgs, local_experts: bool = True):
        super().__init__()
        self.args = args
        self.local_experts = local_experts
        self.model = DeepseekModel(args, local_experts)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(args)

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
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, S, V] for input_ids [B, S]; packed rows pass position_ids and segment_ids [B, S].

        With `lengths`, input_ids and position_ids [N] hold sequences concatenated without padding
        (sum(lengths) == N): no compute is spent on padding and none crosses sequences; the result
        is logits [M, V] at the flat positions `logits_at` [M] (all N when None).
        """
        if lengths is not None:
            if (input_ids.dim() != 1 or position_ids is None or position_ids.shape != input_ids.shape
                    or sum(lengths) != input_ids.numel()):
                raise ValueError(f"input_ids {tuple(input_ids.shape)} and position_ids must be flat and hold "
                                 f"sum(lengths) = {sum(lengths)} tokens")
            hidden = self.forward_tokens(input_ids, position_ids, VarlenCausalAttention(lengths))
            return self.logits(hidden if logits_at is None else hidden[logits_at])
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

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random initialisation for checkpoints built from scratch (tests, pre-training)."""
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                elif param.dim() == 1:
                    param.zero_()
                else:
                    param.normal_(0.0, std, generator=generator)
            for module in self.modules():
                bias = getattr(module, "e_score_correction_bias", None)
                if isinstance(bias, torch.Tensor):
                    bias.zero_()
