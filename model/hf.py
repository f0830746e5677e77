"""Our GPT <-> Hugging Face Llama / GPT-2: state-dict key mapping and config.json conversion.

Plain PyTorch on dicts of tensors; reading and writing HF directories is jobs.checkpoint.hf.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from model.config import ModelConfig

HF_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"

HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ----------------------------------------------------------------------------- key mapping

_LLAMA_LAYER = {  # ours -> HF, inside blocks.{i} / model.layers.{i}
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}
_GPT2_NORMS = {"attn_norm": "ln_1", "mlp_norm": "ln_2"}
# HF GPT-2 uses Conv1D (y = x @ W + b, W is (in, out)), so these weights are transposed nn.Linear ones.
_GPT2_LINEARS = {"attn.wo": "attn.c_proj", "mlp.up": "mlp.c_fc", "mlp.down": "mlp.c_proj"}


class _Keys:
    """A state dict consumed key by key, so that missing and left-over keys are reported by name."""

    def __init__(self, sd: dict[str, torch.Tensor], source: str):
        self.sd, self.source, self.used = sd, source, set()

    def take(self, key: str) -> torch.Tensor:
        if key not in self.sd:
            raise KeyError(f"{self.source}: missing weight {key!r}")
        self.used.add(key)
        return self.sd[key]

    def check_all_used(self, ignore: re.Pattern | None = None) -> None:
        extra = sorted(k for k in self.sd if k not in self.used and not (ignore and ignore.fullmatch(k)))
        if extra:
            raise ValueError(f"{self.source}: unexpected weights {extra[:8]}{' ...' if len(extra) > 8 else ''}")


def _tied_lm_head(keys: _Keys, sd: dict, emb_key: str, head_key: str) -> None:
    """With tied embeddings the head may be listed too; it must then be the embedding itself."""
    if head_key in sd:
        if not torch.equal(sd[head_key], sd[emb_key]):
            raise ValueError(f"{keys.source}: tie_embeddings is set but {head_key} differs from {emb_key}")
        keys.used.add(head_key)


def _dtype_name(sd: dict[str, torch.Tensor]) -> str:
    dtypes = {t.dtype for t in sd.values() if t.is_floating_point()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in HF_DTYPE_NAMES:
        raise ValueError(f"state dict: expected one floating dtype among {list(HF_DTYPE_NAMES)}, got {dtypes}")
    return HF_DTYPE_NAMES[dtypes.pop()]


def to_hf(state_dict: dict[str, torch.Tensor], mcfg: ModelConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Our GPT state dict -> (HF state dict, HF config.json dict), Llama or GPT-2 layout.

    `state_dict` is `GPT.state_dict()` or a checkpoint's model.safetensors (lm_head.weight may be
    absent when tied). Tensors keep their dtype; the config's dtype is theirs. Token ids
    (bos/eos/pad) are not known here: `export_dir` adds them from the tokenizer.
    """
    keys = _Keys(state_dict, "state dict")
    out: dict[str, torch.Tensor] = {}
    if mcfg.arch == "llama":
        out["model.embed_tokens.weight"] = keys.take("tok_emb.weight")
        for i in range(mcfg.n_layers):
            for ours, theirs in _LLAMA_LAYER.items():
                out[f"model.layers.{i}.{theirs}"] = keys.take(f"blocks.{i}.{ours}")
        out["model.norm.weight"] = keys.take("norm.weight")
        head = "lm_head.weight"
        config = llama_config(mcfg)
    else:
        if mcfg.kv_heads != mcfg.n_heads:
            raise ValueError(f"model.n_kv_heads ({mcfg.n_kv_heads}) must equal model.n_heads ({mcfg.n_heads}) for a "
                             "GPT-2 export: GPT2LMHeadModel has no grouped-query attention")
        out["transformer.wte.weight"] = keys.take("tok_emb.weight")
        out["transformer.wpe.weight"] = keys.take("pos_emb.weight")
        for i in range(mcfg.n_layers):
            b, h = f"blocks.{i}", f"transformer.h.{i}"
            for ours, theirs in _GPT2_NORMS.items():
                for p in ("weight", "bias"):
                    out[f"{h}.{theirs}.{p}"] = keys.take(f"{b}.{ours}.{p}")
            qkv = [f"{b}.attn.{w}" for w in ("wq", "wk", "wv")]
            out[f"{h}.attn.c_attn.weight"] = torch.cat([keys.take(f"{n}.weight") for n in qkv], dim=0).t().contiguous()
            out[f"{h}.attn.c_attn.bias"] = torch.cat([keys.take(f"{n}.bias") for n in qkv], dim=0)
            for ours, theirs in _GPT2_LINEARS.items():
                out[f"{h}.{theirs}.weight"] = keys.take(f"{b}.{ours}.weight").t().contiguous()
                out[f"{h}.{theirs}.bias"] = keys.take(f"{b}.{ours}.bias")
        for p in ("weight", "bias"):
            out[f"transformer.ln_f.{p}"] = keys.take(f"norm.{p}")
        head = "lm_head.weight"
        config = gpt2_config(mcfg)
    if mcfg.tie_embeddings:
        _tied_lm_head(keys, state_dict, "tok_emb.weight", head)  # HF re-ties it from the embedding on load
    else:
        out[head] = keys.take("lm_head.weight")
    keys.check_all_used()
    dtype = _dtype_name(out)
    config.update(torch_dtype=dtype, dtype=dtype)  # `torch_dtype` for transformers 4.x, `dtype` for 5.x
    return out, config


def llama_config(mcfg: ModelConfig) -> dict[str, Any]:
    """HF `LlamaConfig` fields of a llama-arch ModelConfig (as config.json stores them)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": mcfg.vocab_size,
        "hidden_size": mcfg.d_model,
        "intermediate_size": mcfg.ff_dim,
        "num_hidden_layers": mcfg.n_layers,
        "num_attention_heads": mcfg.n_heads,
        "num_key_value_heads": mcfg.kv_heads,
        "head_dim": mcfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": mcfg.max_seq_len,
        "initializer_range": mcfg.init_std,
        "rms_norm_eps": mcfg.norm_eps,
        # transformers 4.x reads the top-level rope_theta, 5.x the rope_parameters dict.
        "rope_theta": mcfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": mcfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": mcfg.dropout,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": mcfg.tie_embeddings,
        "use_cache": True,
    }


def gpt2_config(mcfg: ModelConfig) -> dict[str, Any]:
    """HF `GPT2Config` fields of a gpt2-arch ModelConfig (as config.json stores them)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": mcfg.vocab_size,
        "n_positions": mcfg.max_seq_len,
        "n_embd": mcfg.d_model,
        "n_layer": mcfg.n_layers,
        "n_head": mcfg.n_heads,
        "n_inner": mcfg.ff_dim,
        "activation_function": "gelu_new",  # the tanh approximation, as in model/gpt.py
        "resid_pdrop": mcfg.dropout,
        "embd_pdrop": mcfg.dropout,
        "attn_pdrop": mcfg.dropout,
        "layer_norm_epsilon": mcfg.norm_eps,
        "initializer_range": mcfg.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": mcfg.tie_embeddings,
        "use_cache": True,
    }


# ----------------------------------------------------------------------------- HF -> ours


def _field(hf: dict, source: str, *names: str, default: Any = ...) -> Any:
    for n in names:
        if hf.get(n) is not None:
            return hf[n]
    if default is ...:
        raise ValueError(f"{source}: missing field {names[0]!r}")
    return default


def _require(hf: dict, source: str, name: str, allowed: tuple, default: Any) -> None:
    value = hf.get(name, default)
    if value not in allowed:
        raise ValueError(f"{source}: {name}={value!r} is not supported by model/gpt.py (supported: {list(allowed)})")


def _llama_model_config(hf: dict, source: str) -> ModelConfig:
    _require(hf, source, "hidden_act", ("silu",), "silu")
    _require(hf, source, "attention_bias", (False,), False)
    _require(hf, source, "mlp_bias", (False,), False)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{source}: RoPE scaling {rope_type!r} is not supported by model/gpt.py (only plain RoPE)")
    d, heads = _field(hf, source, "hidden_size"), _field(hf, source, "num_attention_heads")
    head_dim = hf.get("head_dim") or d // heads
    if head_dim * heads != d:
        raise ValueError(f"{source}: head_dim={head_dim} * num_attention_heads={heads} != hidden_size={d}; "
                         "model/gpt.py derives head_dim as hidden_size / num_attention_heads")
    kv = _field(hf, source, "num_key_value_heads", default=heads)
    return ModelConfig(
        arch="llama",
        vocab_size=_field(hf, source, "vocab_size"),
        n_layers=_field(hf, source, "num_hidden_layers"),
        n_heads=heads,
        n_kv_heads=kv if kv != heads else None,
        d_model=d,
        d_ff=_field(hf, source, "intermediate_size"),
        max_seq_len=_field(hf, source, "max_position_embeddings"),
        rope_theta=float(rope.get("rope_theta") or hf.get("rope_theta") or 10000.0),
        norm_eps=_field(hf, source, "rms_norm_eps", default=1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),  # LlamaConfig's default
        dropout=float(hf.get("attention_dropout") or 0.0),
        init_std=_field(hf, source, "initializer_range", default=0.02),
    )


def _gpt2_model_config(hf: dict, source: str) -> ModelConfig:
    _require(hf, source, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gelu_new")
    _require(hf, source, "scale_attn_weights", (True,), True)
    _require(hf, source, "scale_attn_by_inverse_layer_idx", (False,), False)
    _require(hf, source, "add_cross_attention", (False,), False)
    d = _field(hf, source, "n_embd", "hidden_size")
    return ModelConfig(
        arch="gpt2",
        vocab_size=_field(hf, source, "vocab_size"),
        n_layers=_field(hf, source, "n_layer", "num_hidden_layers"),
        n_heads=_field(hf, source, "n_head", "num_attention_heads"),
        d_model=d,
        d_ff=_field(hf, source, "n_inner", default=4 * d),
        max_seq_len=_field(hf, source, "n_positions", "max_position_embeddings"),
        norm_eps=_field(hf, source, "layer_norm_epsilon", default=1e-5),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),  # GPT2Config's default
        dropout=float(hf.get("resid_pdrop") or 0.0),
        init_std=_field(hf, source, "initializer_range", default=0.02),
    )


def hf_model_config(hf: dict, source: str = HF_CONFIG) -> ModelConfig:
    """Our ModelConfig from an HF config.json dict; anything model/gpt.py cannot reproduce is an error."""
    model_type = hf.get("model_type")
    if model_type == "llama":
        return _llama_model_config(hf, source)
    if model_type == "gpt2":
        return _gpt2_model_config(hf, source)
    raise ValueError(f"{source}: model_type {model_type!r} is not supported (supported: 'llama', 'gpt2')")


def from_hf_state(hf_sd: dict[str, torch.Tensor], hf_config: dict, source: str = "HF model"
                  ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, our state dict) from an HF state dict and config.json dict.

    The state dict is in checkpoint form: fp32, lm_head.weight left out when tied (load it with
    `load_state`).
    """
    mcfg = hf_model_config(hf_config, f"{source}/{HF_CONFIG}")
    sd: dict[str, torch.Tensor] = {}
    if mcfg.arch == "llama":
        base = {k[len("model."):] if k.startswith("model.") else k: v for k, v in hf_sd.items()}
        keys = _Keys(base, f"{source}/{HF_WEIGHTS}")
        sd["tok_emb.weight"] = keys.take("embed_tokens.weight")
        for i in range(mcfg.n_layers):
            for ours, theirs in _LLAMA_LAYER.items():
                sd[f"blocks.{i}.{ours}"] = keys.take(f"layers.{i}.{theirs}")
        sd["norm.weight"] = keys.take("norm.weight")
        emb, ignore = "embed_tokens.weight", re.compile(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
    else:
        base = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in hf_sd.items()}
        keys = _Keys(base, f"{source}/{HF_WEIGHTS}")
        sd["tok_emb.weight"] = keys.take("wte.weight")
        sd["pos_emb.weight"] = keys.take("wpe.weight")
        d = mcfg.d_model
        for i in range(mcfg.n_layers):
            b, h = f"blocks.{i}", f"h.{i}"
            for ours, theirs in _GPT2_NORMS.items():
                for p in ("weight", "bias"):
                    sd[f"{b}.{ours}.{p}"] = keys.take(f"{h}.{theirs}.{p}")
            w, bias = keys.take(f"{h}.attn.c_attn.weight"), keys.take(f"{h}.attn.c_attn.bias")
            if w.shape != (d, 3 * d):
                raise ValueError(f"{keys.source}: {h}.attn.c_attn.weight has shape {tuple(w.shape)}, expected {(d, 3 * d)}")
            for j, name in enumerate(("wq", "wk", "wv")):
                sd[f"{b}.attn.{name}.weight"] = w[:, j * d:(j + 1) * d].t().contiguous()
                sd[f"{b}.attn.{name}.bias"] = bias[j * d:(j + 1) * d].contiguous()
            for ours, theirs in _GPT2_LINEARS.items():
                sd[f"{b}.{ours}.weight"] = keys.take(f"{h}.{theirs}.weight").t().contiguous()
                sd[f"{b}.{ours}.bias"] = keys.take(f"{h}.{theirs}.bias")
        for p in ("weight", "bias"):
            sd[f"norm.{p}"] = keys.take(f"ln_f.{p}")
        # Older GPT-2 saves carry the causal-mask buffers; they are not weights.
        emb, ignore = "wte.weight", re.compile(r"h\.\d+\.attn\.(masked_)?bias")
    if mcfg.tie_embeddings:
        _tied_lm_head(keys, base, emb, "lm_head.weight")
    else:
        sd["lm_head.weight"] = keys.take("lm_head.weight")
    keys.check_all_used(ignore)
    return mcfg, {k: v.float().contiguous() for k, v in sd.items()}
