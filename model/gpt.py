"""A decoder-only transformer in plain PyTorch.

Llama-style by default (pre-norm RMSNorm, RoPE, grouped-query attention, SwiGLU, no biases);
the 2021 GPT-2 style (LayerNorm, learned positions, GELU MLP, biases) is the same code with
``arch: gpt2``. Reads top to bottom: norm and RoPE helpers, KV cache, attention, MLP, block,
then the model with ``forward`` and ``generate``, then batched decoding of prompts of different
lengths (``generate_batch``). The architecture itself is `model.config`.

Padding: ``forward`` takes a (B, T) mask of real tokens. Padded keys are never attended to and
positions count from each row's first real token, so a left-padded row computes what it would
alone; that is what lets prompts of different lengths share one batch and one KV cache.
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
    """Rotate x (B, H, T, hd) by position-dependent angles; cos/sin are (T, hd), or (B, 1, T, hd)
    when each row has its own positions."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


# ----------------------------------------------------------------------------- KV cache


class KVCache:
    """Preallocated keys and values for incremental decoding, one slot per layer.

    Every row fills the same slots (`pos` of them so far). Once a padded batch has been fed,
    `real` records which slots hold real tokens, so later steps keep masking the padding.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (cfg.n_layers, batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # slots already filled
        self.real: torch.Tensor | None = None  # (B, max_len) bool, None while nothing was padded

    def extend_mask(self, mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
        """Record which of the next T slots are real; return the mask of all S = pos + T slots
        (B, S), or None while no padding has been seen."""
        if mask is None and self.real is None:
            return None
        if self.real is None:
            self.real = torch.ones(self.k.size(1), self.k.size(3), dtype=torch.bool, device=self.k.device)
        self.real[:, self.pos : self.pos + T] = True if mask is None else mask
        return self.real[:, : self.pos + T]

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

    def forward(self, x, rope, cache: KVCache | None = None, layer: int = 0, mask: torch.Tensor | None = None):
        """mask (B, 1, T, S) bool, True where a query may attend to a key; None means causal."""
        B, T, _ = x.shape
        cfg = self.cfg
        # Head counts come from the projections, not the config: under tensor parallelism wq/wk/wv
        # are column slices and this rank holds H/tp query and Hkv/tp kv heads of them.
        q = self.wq(x).view(B, T, -1, cfg.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(B, T, -1, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.wv(x).view(B, T, -1, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, hd), S = cached + T
            S = k.size(2)
            if mask is None and S != T:  # queries sit at the end of the keys: bottom-right aligned
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        # SDPA dispatches to FlashAttention on GPU; enable_gqa shares each kv head across its group.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None,
            dropout_p=cfg.dropout if self.training else 0.0,
            enable_gqa=q.size(1) != k.size(1),
        )  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H * hd)
        return self.wo(y)


def padding_mask(real: torch.Tensor, T: int) -> torch.Tensor:
    """Attention mask (B, 1, T, S) for the last T of S slots, from real (B, S): causal, never a
    padded key, and each query always sees itself, so no softmax row is empty (padding queries
    give finite, unused outputs)."""
    S = real.size(1)
    q = torch.arange(S - T, S, device=real.device)[:, None]  # (T, 1) slot of each query
    k = torch.arange(S, device=real.device)[None, :]  # (1, S)
    allowed = (k <= q) & real[:, None, :]  # (B, T, S)
    return (allowed | (k == q)).unsqueeze(1)


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

    def forward(self, x, rope, cache: KVCache | None = None, layer: int = 0, mask: torch.Tensor | None = None):
        x = x + self.drop(self.attn(self.attn_norm(x), rope, cache, layer, mask))
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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                mask: torch.Tensor | None = None):
        """idx (B, T) token ids -> logits (B, T, V); with targets, (logits, mean cross-entropy).

        mask (B, T) bool is False on padding (left padding for generation, right padding for
        training): padded keys are never attended to, and each row's positions count its real
        tokens only, so a padded row's real logits are those of the row alone. Logits at padded
        positions are meaningless. Targets equal to -100 are ignored (prompt tokens in SFT, padding).
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        real = cache.extend_mask(mask, T) if cache is not None else mask  # (B, S) or None
        attn_mask = None
        if real is None:  # every row has the same positions: plain causal attention
            if start + T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
            pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        else:
            pos = (real.long().cumsum(-1) - 1).clamp(min=0)[:, start:]  # (B, T): real tokens before it in its row
            longest = int(pos[:, -1].max()) + 1  # positions never decrease along a row
            if longest > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {longest} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
            attn_mask = padding_mask(real, T)  # (B, 1, T, S)
        x = self.tok_emb(idx)  # (B, T, d)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)  # (T, d) or (B, T, d)
        elif pos.dim() == 1:
            rope = (self.rope_cos[pos], self.rope_sin[pos])  # (T, hd)
        else:
            rope = (self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1))  # (B, 1, T, hd)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            if self.cfg.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, rope, None, i, attn_mask, use_reentrant=False)
            else:
                x = block(x, rope, cache, i, attn_mask)
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


# ----------------------------------------------------------------------------- batched decoding


@torch.no_grad()
def generate_batch(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int] | tuple[int, ...] = (),
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    logprobs: bool = False,
):
    """Decode prompts of different lengths in one left-padded batch with the KV cache.

    Returns each prompt's new tokens; a row that emitted a stop id ends with it (so callers tell
    a finished answer from one cut at max_new_tokens, and RL trains the stop decision too; drop it
    for text). Each row gets min(max_new_tokens, max_seq_len - its length) tokens at most. Under
    greedy decoding (temperature 0) every row gets exactly the tokens it would get alone.

    With logprobs, returns (tokens, logprobs): each new token's log-probability at the sampling
    temperature (0 counts as 1) from `completion_logprobs`, the values a trainer computes for the
    same tokens.
    """
    cfg = model.cfg
    if not prompts:
        return ([], []) if logprobs else []
    budgets = []
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        if len(p) >= cfg.max_seq_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens: no room for new ones in max_seq_len={cfg.max_seq_len}")
        budgets.append(min(max_new_tokens, cfg.max_seq_len - len(p)))
    device = model.tok_emb.weight.device
    B, L, steps = len(prompts), max(len(p) for p in prompts), max(budgets)
    idx = torch.zeros(B, L, dtype=torch.long, device=device)  # (B, L), left-padded
    real = torch.zeros(B, L, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        idx[i, L - len(p):] = torch.tensor(p, device=device)
        real[i, L - len(p):] = True
    budget = torch.tensor(budgets, device=device)  # (B,)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    cache = KVCache(cfg, B, L + steps, device, model.tok_emb.weight.dtype)
    logits = model(idx, cache=cache, mask=real)[:, -1, :]  # prefill: (B, V)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    new, alive = [], []
    for t in range(steps):
        nxt = sample(logits, temperature, top_k, top_p, generator)  # (B, 1)
        new.append(nxt)
        alive.append(~done[:, None])  # a row's token counts if the row had not finished before it
        done = done | torch.isin(nxt[:, 0], stops) | (t + 1 >= budget)
        if bool(done.all()):
            break
        # finished rows feed padding: their positions stop advancing, so none can pass max_seq_len
        logits = model(nxt, cache=cache, mask=~done[:, None])[:, -1, :]
    n = torch.cat(alive, dim=1).sum(1).tolist()  # (B,) new tokens per row: alive is a prefix
    tokens = torch.cat(new, dim=1).tolist()
    out = [row[:k] for row, k in zip(tokens, n)]
    lps = completion_logprobs(model, prompts, out, temperature or 1.0) if logprobs else None
    model.train(was_training)
    return (out, lps) if logprobs else out


@torch.no_grad()
def completion_logprobs(model: GPT, prompts: list[list[int]], completions: list[list[int]],
                        temperature: float = 1.0) -> list[list[float]]:
    """Log-probability of each completion token after its prompt and the tokens before it, under
    softmax(logits / temperature) without top-k/top-p truncation.

    One forward pass over the right-padded batch of prompt + completion: the layout a trainer
    scores with, so it gets the same values. (The logits of KV-cache decoding come from matrix
    products of other shapes and differ in the last bits: by up to 2e-5 in the log-probs of a
    trained 4-layer, d_model 128 model.)
    """
    seqs = [p + c for p, c in zip(prompts, completions)]
    device = model.tok_emb.weight.device
    B, T = len(seqs), max(len(s) for s in seqs)
    idx = torch.zeros(B, T, dtype=torch.long, device=device)  # (B, T), right-padded
    real = torch.zeros(B, T, dtype=torch.bool, device=device)
    for i, s in enumerate(seqs):
        idx[i, : len(s)] = torch.tensor(s, device=device)
        real[i, : len(s)] = True
    logp = (model(idx, mask=real)[:, :-1].float() / temperature).log_softmax(-1)  # (B, T-1, V)
    tok = logp.gather(-1, idx[:, 1:, None]).squeeze(-1).tolist()  # (B, T-1): log p(idx[t+1])
    return [row[len(p) - 1 : len(p) - 1 + len(c)] for row, p, c in zip(tok, prompts, completions)]
