"""Post-training losses: sequence log-probabilities and the preference-optimisation objectives."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jobs.data.chat import IGNORE


def sequence_logprobs(model, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of log p(target) over the positions whose target is not IGNORE: (B,)."""
    logits = model(idx)
    logp = logits.float().log_softmax(-1)
    mask = targets != IGNORE
    tok = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))).

    Returns (mean loss, chosen rewards, rejected rewards); rewards are beta * log-ratio, so at
    initialisation, where policy == reference, both are 0 and the loss is log 2.
    """
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen - rejected).mean()
    return loss, chosen.detach(), rejected.detach()
