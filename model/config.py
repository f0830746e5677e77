"""The model's architecture as data: `ModelConfig`, importable without torch.

Presets are YAML files shipped inside the package (`model/presets/*.yaml`), found with
`importlib.resources`, so an installed raylm resolves `{preset: tiny}` wherever it runs.
"""

from __future__ import annotations

import math
from importlib import resources
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, model_validator


def preset_names() -> list[str]:
    """Names of the model presets shipped with raylm."""
    return sorted(p.name[: -len(".yaml")] for p in resources.files("model.presets").iterdir()
                  if p.name.endswith(".yaml"))


def read_preset(name: str) -> dict:
    known = preset_names()
    if name not in known:  # a name, never a path: "../x" must not read other files
        raise ValueError(f"preset: unknown model preset {name!r}; known presets: {known}")
    return yaml.safe_load(resources.files("model.presets").joinpath(f"{name}.yaml").read_text())


class ModelConfig(BaseModel):
    """Architecture of one model. Build it from a preset with ``{"preset": "tiny", ...overrides}``."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    arch: Literal["llama", "gpt2"] = "llama"
    """`llama`: RMSNorm, RoPE, SwiGLU, no biases. `gpt2`: LayerNorm, learned positions, GELU, biases."""
    vocab_size: int = 32000
    """Rows of the embedding. Pretraining overrides it with the tokenizer's vocabulary size."""
    n_layers: int = 12
    """Number of transformer blocks."""
    n_heads: int = 12
    """Query heads per attention layer."""
    n_kv_heads: int | None = None
    """Key/value heads: `n_heads` gives MHA, 1 gives MQA, anything between (a divisor) GQA."""
    d_model: int = 768
    """Residual stream width."""
    d_ff: int | None = None
    """MLP hidden width. Default: 4*d_model for gpt2, 8/3*d_model rounded up to 256 for llama."""
    max_seq_len: int = 1024
    """Longest context the model accepts (RoPE tables and learned positions are this long)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm / LayerNorm."""
    tie_embeddings: bool = True
    """Share the input embedding with the output projection."""
    dropout: float = 0.0
    """Dropout on attention and residual branches (0 for pretraining)."""
    init_std: float = 0.02
    """Std of the normal init; residual output projections get init_std / sqrt(2 * n_layers)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of storing them."""

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data):
        if isinstance(data, dict) and "preset" in data:
            data = dict(data)
            name = data.pop("preset")
            data = {**read_preset(name), **data}
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads})")
        if self.arch == "llama" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        return self

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        return cls(preset=name, **overrides)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.arch == "gpt2":
            return 4 * self.d_model
        return 256 * math.ceil(int(8 * self.d_model / 3) / 256)

    @property
    def bias(self) -> bool:
        return self.arch == "gpt2"

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count from the shapes alone (no model is built), tied weights counted once."""
        d, f, hd = self.d_model, self.ff_dim, self.head_dim
        b = int(self.bias)
        attn = d * self.n_heads * hd + b * self.n_heads * hd  # q
        attn += 2 * (d * self.kv_heads * hd + b * self.kv_heads * hd)  # k, v
        attn += self.n_heads * hd * d + b * d  # o
        mlp = (3 * d * f) if self.arch == "llama" else (2 * d * f + b * (f + d))
        norm = d * (1 + b)
        block = attn + mlp + 2 * norm
        body = self.n_layers * block + norm  # + final norm
        if non_embedding:
            return body
        emb = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        pos = self.max_seq_len * d if self.arch == "gpt2" else 0
        return body + emb + head + pos

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): 6N + 12*L*d*T (PaLM, appendix B).

        N counts every weight used in a matmul: the non-embedding body plus the output head
        (the input embedding is a lookup, not a matmul).
        """
        T = seq_len or self.max_seq_len
        n_matmul = self.num_params(non_embedding=True) + self.vocab_size * self.d_model
        return 6 * n_matmul + 12 * self.n_layers * self.d_model * T


# What decides the computation (and the weights' shapes); the rest are training settings.
ARCH_FIELDS = ("arch", "vocab_size", "n_layers", "n_heads", "kv_heads", "d_model", "ff_dim", "max_seq_len",
               "rope_theta", "norm_eps", "tie_embeddings")


def same_architecture(a: ModelConfig, b: ModelConfig, ignore: tuple[str, ...] = ()) -> bool:
    """Whether two configs build the same network, however they spell it (n_kv_heads None or
    n_heads, d_ff None or its default); fields in `ignore` are not compared."""
    if a.arch == "gpt2":  # learned positions: rope_theta is never used
        ignore = (*ignore, "rope_theta")
    return all(getattr(a, f) == getattr(b, f) for f in ARCH_FIELDS if f not in ignore)
