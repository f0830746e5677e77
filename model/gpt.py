"""A decoder-only transformer in plain PyTorch.

Llama-style by default (pre-norm RMSNorm, RoPE, grouped-query attention, SwiGLU, no biases);
the 2021 GPT-2 style (LayerNorm, learned positions, GELU MLP, biases) is the same code with
``arch: gpt2``. Reads top to bottom: norm and RoPE helpers, KV cache, attention, MLP, block,
then the model with ``forward`` and ``generate``. The architecture itself is `model.config`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model.config import ModelConfig


# ----------------------------------------------------------------------------- norm and RoPE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "gpt2":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
    return RMSNorm(cfg.d_model, cfg.norm_eps)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables, (max_len, head_dim), in the rotate-half layout used by HF Llama."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # (T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hd)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, hd) by position-dependent angles; cos/sin are (T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


# ----------------------------------------------------------------------------- KV cache


class KVCache:
    """Preallocated keys and values for incremental decoding, one slot per layer."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (cfg.n_layers, batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens already cached

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k/v (B, Hkv, T, hd) at the current position; return everything cached so far."""
        T = k.size(2)
        self.k[layer, :, :, self.pos : self.pos + T] = k
        self.v[layer, :, :, self.pos : self.pos + T] = v
        end = self.pos + T
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


# ----------------------------------------------------------------------------- attention


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=cfg.bias)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * hd, bias=cfg.bias)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * hd, bias=cfg.bias)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=cfg.bias)
        self.wo.residual_out = True

    def forward(self, x, rope, cache: KVCache | None = None, layer: int = 0):
        B, T, _ = x.shape
        cfg = self.cfg
        q = self.wq(x).view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.wv(x).view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        mask, causal = None, True
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, hd), S = cached + T
            S = k.size(2)
            if S != T:  # queries sit at the end of the keys: bottom-right aligned causal mask
                causal = False
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        # SDPA dispatches to FlashAttention on GPU; enable_gqa shares each kv head across its group.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None,
            dropout_p=cfg.dropout if self.training else 0.0,
            enable_gqa=cfg.kv_heads != cfg.n_heads,
        )  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, cfg.n_heads * cfg.head_dim)
        return self.wo(y)


# ----------------------------------------------------------------------------- MLP


class MLP(nn.Module):
    """SwiGLU for llama, GELU (tanh) for gpt2."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.arch == "llama"
        f = cfg.ff_dim
        self.up = nn.Linear(cfg.d_model, f, bias=cfg.bias)
        if self.swiglu:
            self.gate = nn.Linear(cfg.d_model, f, bias=False)
        self.down = nn.Linear(f, cfg.d_model, bias=cfg.bias)
        self.down.residual_out = True

    def forward(self, x):
        if self.swiglu:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh"))


# ----------------------------------------------------------------------------- block


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, cache: KVCache | None = None, layer: int = 0):
        x = x + self.drop(self.attn(self.attn_norm(x), rope, cache, layer))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


# ----------------------------------------------------------------------------- model


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.arch == "gpt2" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.arch == "llama":
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        std = self.cfg.init_std
        if isinstance(module, nn.Linear):
            if getattr(module, "residual_out", False):
                std = std / math.sqrt(2 * self.cfg.n_layers)  # GPT-2's scaled residual init
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            n -= 0 if self.cfg.tie_embeddings else self.lm_head.weight.numel()
            n -= self.pos_emb.weight.numel() if self.pos_emb is not None else 0
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        return self.cfg.flops_per_token(seq_len)

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay matmul weights only, never norms, biases or embeddings."""
        embeddings = {id(self.tok_emb.weight)} | ({id(self.pos_emb.weight)} if self.pos_emb else set())
        decay, no_decay = [], []
        for p in self.parameters():
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        """idx (B, T) token ids -> logits (B, T, V); with targets, (logits, mean cross-entropy).

        Targets equal to -100 are ignored (prompt tokens in SFT, padding).
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        x = self.tok_emb(idx)  # (B, T, d)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device))
        else:
            rope = (self.rope_cos[start : start + T], self.rope_sin[start : start + T])
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            if self.cfg.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, cache, i)
        if cache is not None:
            cache.pos += T
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_token: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample continuations of idx (B, T) with the KV cache; returns (B, T + new tokens).

        temperature 0 is greedy. Sequences that emit stop_token are padded with it until all stop.
        """
        was_training = self.training
        self.eval()
        B, T = idx.shape
        max_new_tokens = min(max_new_tokens, self.cfg.max_seq_len - T)
        cache = KVCache(self.cfg, B, T + max_new_tokens, idx.device, self.tok_emb.weight.dtype)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        logits = self(idx, cache=cache)[:, -1, :]  # prefill: (B, V)
        out = [idx]
        for _ in range(max_new_tokens):
            nxt = sample(logits, temperature, top_k, top_p, generator)  # (B, 1)
            if stop_token is not None:
                nxt = torch.where(done[:, None], torch.full_like(nxt, stop_token), nxt)
                done |= nxt[:, 0] == stop_token
            out.append(nxt)
            if stop_token is not None and bool(done.all()):
                break
            if cache.pos < cache.k.size(3):
                logits = self(nxt, cache=cache)[:, -1, :]
        self.train(was_training)
        return torch.cat(out, dim=1)


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None) -> torch.Tensor:
    """Pick the next token (B, 1) from logits (B, V)."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)
