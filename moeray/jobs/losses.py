"""Training objectives: SFT cross-entropy on labelled tokens, DPO, MoE balancing.

Contract:
- `sft_loss(logits [B, S, V], labels [B, S])`: next-token cross-entropy over positions whose label
  is not -100 (only assistant tokens carry labels), averaged over those tokens.
- `sequence_logprobs(logits, input_ids, loss_mask)`: per-row sum of log p(token) over the masked
  positions (the response), the quantity DPO compares.
- `target_logprobs(model, batch)`: the training path for both: log p of every labelled next token
  of a padding-free `SequenceBatch`, with the output head run on those positions only;
  `sft_loss` is minus their mean and `sequence_logprobs` their per-sequence sum.
- `token_loss(model, rows, device, mtp=None)`: minus the mean of `target_logprobs` over rows
  (pretraining and SFT), with the number of labelled tokens. With `mtp=(depth, weight)` it adds
  DeepSeek-V3's sequential multi-token-prediction objective: depth k (1..depth) predicts each
  labelled token k tokens earlier than the main head does, L_mtp = mean_k CE_k, and the loss is
  L_main + weight * L_mtp (metrics `lm_loss`, `mtp_loss`, `mtp_loss_k`).
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
from moeray.model.transformer import mtp_rows

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


def token_loss(model, rows, device, mtp: tuple[int, float] | None = None) -> tuple[torch.Tensor, dict]:
    """Mean next-token loss over the rows' labelled tokens (padding-free), and their count; with
    `mtp`, plus the weighted MTP loss (see the module docstring)."""
    if mtp is None:
        logprobs, _ = target_logprobs(model, flatten(rows).to(device))
        loss = -logprobs.mean() if logprobs.numel() else logprobs.sum()
        return loss, {"tokens": int(logprobs.numel())}
    depth, weight = mtp
    batch = flatten(rows).to(device)
    where = (batch.next_labels != IGNORE).nonzero().squeeze(1)  # [M]
    # Depth k's row r embeds the token at rows[r] + k and predicts the one after it, whose label
    # is next_labels[rows[r] + k]: the same labels the main head learns, k positions earlier.
    depth_rows = [mtp_rows(batch.lengths, k).to(device) for k in range(1, depth + 1)]
    depth_labels = [batch.next_labels[rows + k] for k, rows in enumerate(depth_rows, start=1)]
    depth_at = [(labels != IGNORE).nonzero().squeeze(1) for labels in depth_labels]
    logits, depth_logits = model(batch.input_ids, batch.position_ids, lengths=batch.lengths, logits_at=where,
                                 mtp_logits_at=depth_at)
    lm_loss = _mean_cross_entropy(logits, batch.next_labels[where])
    per_depth = [_mean_cross_entropy(out, labels[at]) for out, labels, at in zip(depth_logits, depth_labels, depth_at)]
    mtp_loss = torch.stack(per_depth).mean()
    metrics = {"tokens": int(where.numel()), "lm_loss": lm_loss.detach().item(), "mtp_loss": mtp_loss.detach().item()}
    metrics.update({f"mtp_loss_{k}": value.detach().item() for k, value in enumerate(per_depth, start=1)})
    return lm_loss + weight * mtp_loss, metrics


def _mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if not labels.numel():
        return logits.sum() * 0.0  # nothing labelled: no contribution, but still in the graph
    return F.cross_entropy(logits.float(), labels)


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
