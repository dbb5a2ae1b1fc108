"""Training objectives: SFT cross-entropy on labelled tokens, DPO, MoE balancing.

Contract:
- `sft_loss(logits [B, S, V], labels [B, S])`: next-token cross-entropy over positions whose label
  is not -100 (only assistant tokens carry labels), averaged over those tokens.
- `sequence_logprobs(logits, input_ids, loss_mask)`: per-row sum of log p(token) over the masked
  positions (the response), the quantity DPO compares.
- `target_logprobs(model, batch)`: the training path for both: log p of every labelled next token
  of a padding-free `SequenceBatch`, with the output head run on those positions only;
  `sft_loss` is minus their mean and `sequence_logprobs` their per-sequence sum.
- `token_loss(model, rows, device)`: minus the mean of `target_logprobs` over rows (pretraining
  and SFT), with the number of labelled tokens.
- `dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)`: the sigmoid DPO
  loss -log sigmoid(beta * ((pc - rc) - (pr - rr))) and its metrics. With the policy equal to
  the reference (step 0) the loss is exactly ln 2.
- `router_aux_loss(model)`: switch-style balance loss E * sum_e f_e * P_e over MoE layers, from
  the routing the last training forward recorded; `update_routing_bias(model, rate)`: the
  aux-loss-free alternative, nudging `e_score_correction_bias` toward equal loads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeray.jobs.data import SequenceBatch, flatten
from moeray.model.moe import MoE

IGNORE = -100


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # [B*(S-1), V]
    shifted_labels = labels[:, 1:].reshape(-1)
    if (shifted_labels != IGNORE).sum() == 0:
        return shifted_logits.sum() * 0.0  # a batch without labelled tokens contributes nothing
    return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE)


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """[B] sum of log-probabilities of input_ids[:, 1:] where loss_mask[:, 1:] is set."""
    logprobs = logits[:, :-1].float().log_softmax(-1)  # [B, S-1, V]
    token_logprobs = logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # [B, S-1]
    return (token_logprobs * loss_mask[:, 1:].to(token_logprobs.dtype)).sum(-1)


def target_logprobs(model, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p [M] of each labelled next token, the sequence [M] it belongs to). Prompt tokens and
    each sequence's last token predict nothing the loss uses, so the head skips them."""
    where = (batch.next_labels != IGNORE).nonzero().squeeze(1)  # [M]
    logits = model(batch.input_ids, batch.position_ids, lengths=batch.lengths, logits_at=where).float()  # [M, V]
    logprobs = -F.cross_entropy(logits, batch.next_labels[where], reduction="none")
    return logprobs, batch.sequence_of_token[where]


def token_loss(model, rows, device) -> tuple[torch.Tensor, dict[str, int]]:
    """Mean next-token loss over the rows' labelled tokens (padding-free), and their count."""
    logprobs, _ = target_logprobs(model, flatten(rows).to(device))
    loss = -logprobs.mean() if logprobs.numel() else logprobs.sum()
    return loss, {"tokens": int(logprobs.numel())}


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    margins = chosen_rewards - rejected_rewards
    loss = -F.logsigmoid(margins).mean()
    metrics = {"rewards/chosen": chosen_rewards.mean().item(), "rewards/rejected": rejected_rewards.mean().item(),
               "rewards/margin": margins.mean().item(), "rewards/accuracy": (margins > 0).float().mean().item()}
    return loss, metrics


def _moe_layers(model: torch.nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def router_aux_loss(model: torch.nn.Module) -> torch.Tensor:
    total = None
    for moe in _moe_layers(model):
        if moe.last_routing is None:
            continue
        scores, expert_ids = moe.last_routing
        num_experts = scores.shape[-1]
        probs = scores / scores.sum(-1, keepdim=True)  # [T, E]
        routed = torch.bincount(expert_ids.flatten(), minlength=num_experts).float()
        fraction = routed / routed.sum()  # f_e: share of (token, expert) pairs
        loss = num_experts * (fraction * probs.mean(0)).sum()
        total = loss if total is None else total + loss
    if total is None:
        raise ValueError("router_aux_loss needs a training-mode forward of a model with MoE layers first")
    return total


@torch.no_grad()
def update_routing_bias(model: torch.nn.Module, rate: float) -> None:
    """Aux-loss-free balancing: raise the bias of under-used experts, lower the over-used ones."""
    for moe in _moe_layers(model):
        bias = moe.gate.e_score_correction_bias
        if bias is None or moe.last_routing is None:
            continue
        load = torch.bincount(moe.last_routing[1].flatten(), minlength=bias.numel()).float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Balance the global load, and keep the bias identical on every worker (FSDP does
            # not synchronise buffers as DDP does).
            torch.distributed.all_reduce(load)
        bias += rate * torch.sign(load.mean() - load)
