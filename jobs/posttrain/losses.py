"""Post-training losses: sequence log-probabilities, the preference-optimisation objectives, and
the reinforcement-learning math of PPO (RLHF) and GRPO (verifiable rewards).

The RL functions work on per-token tensors (B, T) over response tokens, right-padded, with a
response `mask` (B, T) that is 1 on real tokens; they return per-token values, and the caller
reduces them with `token_mean` or `sequence_mean`.
"""

from __future__ import annotations

from dataclasses import dataclass

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


# ----------------------------------------------------------------------------- RL: log-probs, reductions


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) under softmax(logits / temperature): logits (B, T, V), tokens (B, T) -> (B, T).

    The same temperature as the rollout's, so that these are the log-probs it sampled with.
    """
    logp = (logits.float() / temperature).log_softmax(-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) at each position, (B, T, V) -> (B, T): -sum p log p, with
    0 log 0 = 0 so that -inf logits (masked tokens) count as probability 0, not NaN."""
    return torch.special.entr(logits.float().softmax(-1)).sum(-1)


def token_mean(x: torch.Tensor, mask: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    """Token-level normalisation (DAPO, Yu et al. 2025, "DAPO: an open-source LLM reinforcement
    learning system at scale"): the sum over every response token of the batch divided by their
    count, so every token weighs the same however long its sequence.

    When one batch is split into micro-batches or across workers, pass the whole batch's token
    count as `num_tokens`: the parts then sum to the loss of the whole batch.
    """
    total = (x * mask).sum()
    return total / (num_tokens if num_tokens is not None else mask.sum().clamp(min=1))


def sequence_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence normalisation (GRPO as published, Shao et al. 2024): the mean over each
    sequence's response tokens, then over sequences; a token of a short answer weighs more than
    one of a long answer."""
    per_seq = (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_seq.mean()


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise x to unit variance (and zero mean) over the masked tokens of the batch, as PPO
    implementations do with advantages (OpenAI baselines, lm-human-preferences). Padding gets 0."""
    n = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# ----------------------------------------------------------------------------- RL: KL to the reference


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (J. Schulman,
    "Approximating KL divergence", 2020, http://joschu.net/blog/kl-approx.html). With
    log r = log pi_ref - log pi:

    * k1 = -log r: unbiased, high variance, negative on some tokens (the RLHF reward penalty);
    * k2 = (log r)^2 / 2: biased, low variance;
    * k3 = (r - 1) - log r: unbiased, low variance, never negative (GRPO's KL term, DeepSeekMath
      eq. 4).
    """
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"kl estimator: expected k1, k2 or k3, got {estimator!r}")


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RLHF's per-token reward (Ziegler et al. 2019, "Fine-tuning language models from human
    preferences"; Ouyang et al. 2022): -kl_coef * k1 on every response token, plus the sequence's
    score (B,) on its last response token. Returns (rewards (B, T), k1 (B, T)), 0 on padding."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    T = mask.size(1)
    last = (mask * torch.arange(1, T + 1, device=mask.device)).argmax(-1)  # (B,) last real token
    rewards = rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))
    return rewards * mask, kl


@dataclass
class AdaptiveKLController:
    """The KL coefficient that steers the policy's KL to the reference towards a target (Ziegler et
    al. 2019, section 2.2): beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon),
    after each batch of n episodes. A plain dataclass, so its state checkpoints as JSON."""

    value: float
    """The current coefficient (beta)."""
    target: float
    """The KL (nats per sequence) to steer towards."""
    horizon: int
    """Episodes over which a persistent error changes beta by about e^0.2."""

    def update(self, kl: float, n_steps: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


# ----------------------------------------------------------------------------- RL: advantages


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, "High-dimensional continuous control
    using generalized advantage estimation"), per token of right-padded responses (B, T).

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}; a response
    ends at its last real token (the value after it is 0). Returns (advantages, returns = A + V,
    the value targets), both 0 on padding.
    """
    rewards, values = rewards * mask, values * mask
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    running = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        adv[:, t] = running
    return adv, (adv + values) * mask


@torch.no_grad()
def group_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's outcome advantages (Shao et al. 2024, "DeepSeekMath", section 4.1.2): rewards (P, G)
    for G samples of each of P prompts; each reward minus its group's mean, divided by the group's
    std + eps when scale_by_std (Dr. GRPO, Liu et al. 2025, leaves the division out: it upweights
    groups that are nearly all right or all wrong). The std is the unbiased one, as TRL and verl
    use. A group whose samples all scored the same gets 0: there is nothing to learn from it."""
    if rewards.dim() != 2 or rewards.size(1) < 2:
        raise ValueError(f"group_advantages needs rewards (prompts, samples >= 2), got shape {tuple(rewards.shape)}")
    adv = rewards - rewards.mean(1, keepdim=True)
    if scale_by_std:
        adv = adv / (rewards.std(1, keepdim=True) + eps)
    return adv


# ----------------------------------------------------------------------------- RL: PPO losses


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, "Proximal policy optimization algorithms",
    eq. 7) as a per-token loss: max(-A * r, -A * clip(r, 1 - eps, 1 + eps)), r = pi / pi_old.

    Returns (loss (B, T), clipped (B, T) bool: where the clipped term won, so the token gives no
    gradient; its masked mean is the clip fraction to log).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (OpenAI baselines' ppo2, as OpenRLHF and TRL use it), per token:
    0.5 * max((V - R)^2, (V_clip - R)^2) with V_clip = V_old + clip(V - V_old, -eps, eps), so one
    update cannot move a value far from the one the advantages were computed with.

    Returns (loss (B, T), clipped (B, T) bool: where the clipped term won).
    """
    v_clip = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    unclipped = (values - returns) ** 2
    clipped = (v_clip - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped
