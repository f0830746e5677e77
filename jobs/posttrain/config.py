"""Configs of the post-training jobs: SFT, DPO and the reward model. Plain pydantic: importable
without torch or Ray.

They share pretraining's training fields (`TrainConfig`); the defaults below differ because
post-training runs are short, start from trained weights and use small batches.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

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
