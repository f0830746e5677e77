"""Configs of the post-training jobs: SFT, DPO, the reward model and RL (GRPO, PPO). Plain pydantic: importable
without torch or Ray.

They share pretraining's training fields (`TrainConfig`); the defaults below differ because
post-training runs are short, start from trained weights and use small batches.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from jobs.train.config import TrainConfig


class PostTrainConfig(TrainConfig):
    """Fields shared by jobs.sft, jobs.dpo and jobs.reward (each adds its own `kind`)."""

    init_from: str
    """Starting weights: a checkpoint directory, a run directory (its newest checkpoint is used), or an HF export
    directory (config.json + model.safetensors + tokenizer.json)."""
    data: str
    """Training records, JSONL (local or s3://)."""
    eval_file: str | None = None
    """Held-out records in the same format, evaluated every `eval_every` steps and at the end."""
    max_seq_len: int | None = Field(None, ge=2)
    """Longest example in tokens (longer ones are truncated); default: the model's max_seq_len."""
    num_workers: int = Field(1, ge=1)
    """Ray Train workers (one per GPU on GPU clusters)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage: 0 plain data parallel, 1 optimizer state, 2 + gradients, 3 + parameters."""
    global_batch_size: int = Field(16, ge=1)
    """Examples per optimizer step, across all workers and accumulation steps."""
    max_steps: int = Field(100, ge=1)
    """Optimizer steps; the data is reshuffled and reused when a step runs past its end."""
    lr: float = Field(1e-4, gt=0)
    """Peak learning rate."""
    warmup_steps: int = Field(10, ge=0)
    """Linear warm-up steps from 0 to lr."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay on matmul weights."""
    eval_every: int = Field(50, ge=1)
    """Evaluate on `eval_file` every this many steps (and at the end)."""
    checkpoint_every: int = Field(100, ge=1)
    """Save a checkpoint every this many steps (and at the end)."""


class SFTConfig(PostTrainConfig):
    """Supervised fine-tuning on chat conversations (loss on assistant tokens only)."""

    kind: Literal["sft"] = "sft"


class DPOConfig(PostTrainConfig):
    """Direct preference optimisation on (prompt, chosen, rejected) pairs."""

    kind: Literal["dpo"] = "dpo"
    reference_path: str | None = None
    """Frozen reference model (same forms as init_from); default: init_from itself."""
    beta: float = Field(0.1, gt=0)
    """Strength of the implicit KL penalty: rewards are beta * log(pi / pi_ref)."""
    lr: float = Field(1e-5, gt=0)
    """Peak learning rate (DPO wants a smaller one than SFT)."""


class RewardConfig(PostTrainConfig):
    """Train a reward model (base model + scalar head) on (prompt, chosen, rejected) pairs."""

    kind: Literal["reward"] = "reward"
    lr: float = Field(5e-5, gt=0)
    """Peak learning rate."""


class RLConfig(PostTrainConfig):
    """Reinforcement learning from a prompt file: GRPO with verifiable rewards, or PPO (RLHF)
    against a jobs.reward model. One iteration: rollout (sample completions), score, advantages,
    `ppo_epochs` passes of clipped updates, weight sync to the rollout actors."""

    kind: Literal["rl"] = "rl"
    algorithm: Literal["grpo", "ppo"] = "grpo"
    """`grpo`: group-relative advantages over `samples_per_prompt` samples, rewards from the rule-based
    answer check, no critic. `ppo`: a learned reward (`reward_path`), a critic, GAE and a per-token KL
    penalty in the reward."""
    data: str
    """Training prompts, JSONL: {"prompt": "..."} or {"messages": [...]}, with "answer" (and "match":
    "exact" or "number") for rule-based rewards; the prompt becomes a user turn of the chat template."""
    eval_file: str | None = None
    """Held-out prompts in the same format (with answers): greedy accuracy before training, every
    `eval_every` iterations and at the end."""
    reference_path: str | None = None
    """Frozen reference model for the KL term (same forms as init_from); default: init_from itself."""
    reward_path: str | None = None
    """PPO: a jobs.reward checkpoint (or its run directory) that scores each completion."""
    critic_init: Literal["reward", "actor"] = "reward"
    """PPO: the critic starts as the reward model (body and head) or as the actor's body with a fresh head."""
    max_steps: int = Field(20, ge=1)
    """RL iterations (rollout, score, update, sync)."""
    prompts_per_iteration: int = Field(16, ge=1)
    """Prompts sampled per iteration (a multiple of num_workers: each worker takes whole groups)."""
    samples_per_prompt: int = Field(4, ge=1)
    """Completions sampled per prompt (GRPO's group size G, at least 2)."""
    max_new_tokens: int = Field(16, ge=1)
    """Longest completion; one that reaches it without <|end|> ends there."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of rollouts (log-probabilities are taken at the same temperature)."""
    top_k: int | None = Field(None, ge=1)
    """Sample only from the k most likely tokens (None: the whole vocabulary, as the policy gradient assumes)."""
    global_batch_size: int = Field(16, ge=1)
    """Sequences per optimizer step, across workers; divides prompts_per_iteration x samples_per_prompt."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per forward/backward pass on one worker."""
    ppo_epochs: int = Field(1, ge=1)
    """Passes over each iteration's rollouts (each pass: rollouts / global_batch_size optimizer steps)."""
    clip_eps: float = Field(0.2, gt=0)
    """Clip range of the policy ratio pi / pi_old."""
    value_clip_eps: float = Field(0.2, gt=0)
    """PPO: clip range of the value update around the value the advantages were computed with."""
    vf_coef: float = Field(0.5, ge=0)
    """PPO: weight of the value loss in the combined actor-critic loss."""
    critic_lr: float | None = Field(None, gt=0)
    """PPO: peak learning rate of the critic (default: lr)."""
    gamma: float = Field(1.0, ge=0, le=1)
    """PPO: discount per token in GAE."""
    lam: float = Field(0.95, ge=0, le=1)
    """PPO: GAE's lambda."""
    kl_coef: float = Field(0.05, ge=0)
    """Weight of the KL to the reference: PPO, per token in the reward (k1); GRPO, a k3 loss term (0: off)."""
    kl_target: float | None = Field(None, gt=0)
    """PPO: steer kl_coef adaptively towards this KL (nats per sequence, Ziegler et al.); None: fixed."""
    kl_horizon: int = Field(10000, ge=1)
    """PPO: horizon (sequences) of the adaptive KL controller."""
    scale_by_std: bool = True
    """GRPO: divide advantages by the group's std (false: Dr. GRPO's mean-only advantages)."""
    entropy_coef: float = Field(0.0, ge=0)
    """Weight of an entropy bonus in the policy loss (0: entropy is logged only)."""
    rollout_workers: int = Field(0, ge=0)
    """0: colocated, the training workers generate their own rollouts. N > 0: split, a pool of N Ray
    actors generates and receives the new weights after every update (a GPU each with `use_gpu`)."""
    rollout_cpus: float = Field(1.0, gt=0)
    """CPUs reserved by each rollout actor (split mode)."""
    rollout_retries: int = Field(3, ge=0)
    """Times an iteration's rollout is retried after a rollout actor died (it is replaced first)."""
    eval_every: int = Field(5, ge=1)
    """Held-out accuracy every this many iterations (and at the end)."""
    checkpoint_every: int = Field(5, ge=1)
    """Save a checkpoint every this many iterations (and at the end)."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up in optimizer steps."""
    min_lr_ratio: float = Field(1.0, ge=0, le=1)
    """Cosine floor as a fraction of lr (1: constant lr, the usual choice for RL)."""
    lr: float = Field(1e-5, gt=0)
    """Peak learning rate of the actor."""

    @property
    def rollout_size(self) -> int:
        """Sequences per iteration."""
        return self.prompts_per_iteration * self.samples_per_prompt

    @model_validator(mode="after")
    def _check_rl(self):
        if self.algorithm == "grpo" and self.samples_per_prompt < 2:
            raise ValueError("samples_per_prompt: GRPO compares samples of one prompt, it needs at least 2")
        if self.algorithm == "ppo" and not self.reward_path:
            raise ValueError("reward_path: PPO needs a jobs.reward checkpoint")
        if self.rollout_size % self.global_batch_size:
            raise ValueError(f"global_batch_size ({self.global_batch_size}) must divide prompts_per_iteration x "
                             f"samples_per_prompt ({self.rollout_size})")
        if self.prompts_per_iteration % self.num_workers:
            raise ValueError(f"prompts_per_iteration ({self.prompts_per_iteration}) must be a multiple of "
                             f"num_workers ({self.num_workers})")
        return self
