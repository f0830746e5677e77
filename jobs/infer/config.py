"""Configs of the inference jobs: generate, evaluate and serve. Plain pydantic: importable
without torch or Ray."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jobs.config import JobConfig


class GenerateConfig(JobConfig):
    """Sample continuations of prompts from a checkpoint."""

    kind: Literal["generate"] = "generate"
    run: str | None = None
    """Run directory (local or s3://); its newest complete checkpoint is used."""
    checkpoint: str | None = None
    """A specific checkpoint directory instead of the run's newest."""
    prompts_file: str | None = None
    """JSONL of prompts (`{"prompt": ...}` or `{"messages": [...]}` per line), generated in batches; replaces `prompts`."""
    batch_size: int = Field(16, ge=1)
    """Prompts per batch with `prompts_file`."""
    prompts: list[str] = Field(default_factory=lambda: ["\n"])
    """Prompts to continue, one sample each."""
    max_new_tokens: int = Field(200, ge=1)
    """Tokens to generate per prompt (capped by the model's context)."""
    temperature: float = Field(0.8, ge=0)
    """Sampling temperature; 0 is greedy."""
    top_k: int | None = Field(50, ge=1)
    """Sample among the k most likely tokens."""
    top_p: float | None = Field(None, gt=0, le=1)
    """Nucleus sampling: the smallest set of tokens whose probability reaches p."""
    stop_at_eot: bool = True
    """Stop a sample at <|endoftext|>."""
    seed: int = 0
    """Sampling seed."""
    use_gpu: bool = False
    """Run the sampling task on a GPU worker."""
    output: str | None = None
    """Write the samples here as JSONL (one {prompt, completion} per line)."""

    @model_validator(mode="after")
    def _has_model(self):
        if not self.run and not self.checkpoint:
            raise ValueError("set run (a run directory) or checkpoint")
        return self


class TaskSpec(BaseModel):
    """One task file and how to score it."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str
    """Name in the results table."""
    task_file: str
    """JSONL items (local or s3://)."""
    type: Literal["multiple_choice", "generative"]
    """`multiple_choice`: items have choices and an answer index; `generative`: an answer string."""
    match: Literal["exact", "number"] = "exact"
    """Generative scoring: exact string match, or GSM8K-style numeric answer extraction."""
    max_new_tokens: int = Field(16, ge=1)
    """Generative tasks: the longest answer generated."""
    limit: int | None = Field(None, ge=1)
    """Score only the first this many items."""


class EvaluateConfig(JobConfig):
    """Score checkpoints on held-out shards and on multiple-choice and generative tasks."""

    kind: Literal["evaluate"] = "evaluate"
    checkpoints: list[str] = Field(min_length=1)
    """Checkpoint or run directories (a run's newest checkpoint), compared side by side in this order."""
    data: str | None = None
    """A jobs.prepare output whose `val` shards give loss, perplexity and bits-per-byte (skipped if unset)."""
    max_sequences: int | None = Field(256, ge=1)
    """Score at most this many validation sequences (None: all)."""
    tasks: list[TaskSpec] = Field(default_factory=list)
    """Task files to score."""
    batch_size: int = Field(16, ge=1)
    """Sequences per forward pass."""
    use_gpu: bool = False
    """Run each checkpoint's evaluation on a GPU worker."""
    output: str
    """Directory (local or s3://) for results.json and results.md."""

    @field_validator("tasks")
    @classmethod
    def _unique_names(cls, v):
        names = [t.name for t in v]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        return v


class ServeConfig(JobConfig):
    """Serve a checkpoint with OpenAI-compatible /v1/completions and /v1/chat/completions."""

    kind: Literal["serve"] = "serve"
    checkpoint: str
    """Checkpoint or run directory (its newest checkpoint), local or s3://."""
    model_name: str | None = None
    """Model id reported by the API; default: the run directory's name."""
    host: str = "127.0.0.1"
    """HTTP host of the Serve proxy (loopback by default; 0.0.0.0 to expose it)."""
    port: int = Field(8000, ge=1, le=65535)
    """HTTP port of the Serve proxy."""
    num_replicas: int = Field(1, ge=1)
    """Model replicas; Serve spreads requests across them."""
    max_batch_size: int = Field(8, ge=1)
    """Most non-streaming requests decoded together."""
    batch_wait_timeout_s: float = Field(0.02, ge=0)
    """How long the first request of a batch waits for others to join it."""
    max_tokens_limit: int = Field(512, ge=1)
    """Upper bound on a request's max_tokens (also capped by the model's context)."""
    use_gpu: bool = False
    """Give each replica a GPU."""
    output: str | None = None
    """Directory (local or s3://) that receives serve.json: URL, model id, checkpoint and this config."""
