"""Export: a pretraining checkpoint -> a Hugging Face model directory, and back.

    python -m jobs.export --run runs/demo/pretrain --output runs/demo/hf
    python -m jobs.export --config configs/demo.yaml --set dtype=bf16

The output loads with `transformers.AutoModelForCausalLM.from_pretrained(dir)` (as
`LlamaForCausalLM` or `GPT2LMHeadModel`) and `AutoTokenizer.from_pretrained(dir)`, offline:

    model.safetensors        consolidated weights, HF key names, fp32 or bf16
    config.json              HF model config
    generation_config.json   eos/pad ids of the tokenizer's special tokens
    tokenizer.json           the run's byte-level BPE, unchanged
    tokenizer_config.json    tells transformers to use tokenizer.json as is
    special_tokens_map.json
    raylm_export.json        source checkpoint, step, model config and the export config

`from_hf` is the inverse (for our exports and for any compatible Llama/GPT-2 directory), and
`load_pretrained` reads either kind of directory, so pretraining and SFT can start from one.
Export is a file conversion, so it runs in the driver process: no Ray, no GPU.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import model_validator

from cluster import storage
from jobs.config import JobConfig, main
from model import GPT, ModelConfig
from model.config import same_architecture  # noqa: F401  (jobs.pretrain imports it from here)

EXPORT_FORMAT = "raylm.hf_export/1"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_CONFIG = "config.json"
EXPORT_INFO = "raylm_export.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class ExportConfig(JobConfig):
    """Export a pretraining checkpoint as a Hugging Face model directory (Llama or GPT-2 layout)."""

    kind: Literal["export"] = "export"
    run: str | None = None
    """Pretraining run directory (local or s3://); its newest complete checkpoint is exported."""
    checkpoint: str | None = None
    """A specific checkpoint directory to export instead of a run's newest."""
    output: str
    """Directory (local or s3://) that receives the Hugging Face model."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Precision of the exported weights (checkpoints are fp32; bf16 halves the size)."""
    overwrite: bool = False
    """Replace an existing export at `output` (otherwise a non-empty `output` is an error)."""

    @model_validator(mode="after")
    def _one_source(self):
        if (self.run is None) == (self.checkpoint is None):
            raise ValueError("set exactly one of run (newest checkpoint of a run) and checkpoint (a specific one)")
        return self


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


def read_hf_weights(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory: model.safetensors, or the shards a safetensors index lists."""
    from safetensors.torch import load_file

    d = Path(hf_dir)
    if (d / HF_WEIGHTS).is_file():
        return load_file(str(d / HF_WEIGHTS))
    if (d / HF_INDEX).is_file():
        shards = sorted(set(json.loads((d / HF_INDEX).read_text())["weight_map"].values()))
        sd: dict[str, torch.Tensor] = {}
        for shard in shards:
            sd.update(load_file(str(d / shard)))
        return sd
    raise FileNotFoundError(f"{d}: no {HF_WEIGHTS} or {HF_INDEX} (only safetensors weights are read)")


def from_hf(export_dir: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, our state dict) from an HF Llama/GPT-2 directory (local or s3://) with
    config.json and safetensors weights: our exports, or compatible third-party models.

    For our own exports the ModelConfig is the exact one of the source checkpoint (from
    raylm_export.json) as long as config.json still describes the same network."""
    local = storage.stage_local(str(export_dir))
    cfg_path = local / HF_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{export_dir}: no {HF_CONFIG}")
    mcfg, sd = from_hf_state(read_hf_weights(local), json.loads(cfg_path.read_text()), str(export_dir))
    if (local / EXPORT_INFO).is_file():
        ours = ModelConfig.model_validate(json.loads((local / EXPORT_INFO).read_text())["model"])
        if same_architecture(ours, mcfg):
            mcfg = ours
    return mcfg, sd


# ----------------------------------------------------------------------------- either kind of directory


def _checkpoint_dir(path: str) -> tuple[Path, str]:
    """(local dir, kind) of `path`: a checkpoint ("raylm"), an HF directory ("hf"), or a run's newest checkpoint."""
    from jobs.pretrain import TRAIN_STATE, latest_checkpoint, verify_checkpoint

    if storage.exists(storage.join(path, TRAIN_STATE)):
        # A torn or corrupt checkpoint must not quietly initialise (or be exported as) a model.
        why = verify_checkpoint(path)
        if why is not None:
            raise ValueError(f"{path}: incomplete or corrupt checkpoint: {why}")
        return storage.stage_local(path), "raylm"
    if storage.exists(storage.join(path, HF_CONFIG)):
        return storage.stage_local(path), "hf"
    if storage.exists(path):
        try:
            return storage.stage_local(latest_checkpoint(path)), "raylm"
        except FileNotFoundError:
            pass
    raise FileNotFoundError(f"{path}: neither a checkpoint ({TRAIN_STATE}), an HF model ({HF_CONFIG}) "
                            "nor a run directory with a complete checkpoint")


def load_pretrained(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, fp32 state dict) from a checkpoint directory, a run directory (its newest
    complete checkpoint) or an HF export directory; local or s3://.

    The state dict is in checkpoint form (lm_head.weight absent when tied): build
    `GPT(mcfg)` and call `load_state(model, sd)`.
    """
    from safetensors.torch import load_file

    from jobs.pretrain import TRAIN_STATE, WEIGHTS

    local, kind = _checkpoint_dir(storage.absolute(path))
    if kind == "hf":
        return from_hf(local)
    state = json.loads((local / TRAIN_STATE).read_text())
    if "model" not in state:
        raise ValueError(f"{local / TRAIN_STATE}: no 'model' entry (not written by jobs.pretrain?)")
    mcfg = ModelConfig.model_validate(state["model"])
    sd = {k: v.float() for k, v in load_file(str(local / WEIGHTS)).items()}
    if mcfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return mcfg, sd


def pretrained_tokenizer(path: str | os.PathLike):
    """The `tokenizers.Tokenizer` saved with a checkpoint, run or HF export (its tokenizer.json)."""
    from model.tokenizer import load_tokenizer

    local, _ = _checkpoint_dir(storage.absolute(path))
    tok_path = local / "tokenizer.json"
    if not tok_path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json")
    return load_tokenizer(str(tok_path))


def load_state(model: GPT, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> GPT:
    """Load a checkpoint-form state dict into `model`; only a tied lm_head.weight may be absent."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    allowed = {"lm_head.weight"} if model.cfg.tie_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise ValueError(f"{source}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    return model


# ----------------------------------------------------------------------------- writing an export


def _special_ids(tok) -> dict[str, int | None]:
    from model.tokenizer import EOT

    eot, pad = tok.token_to_id(EOT), tok.token_to_id("<|pad|>")
    if eot is None:
        raise ValueError(f"tokenizer.json: no {EOT} token; the export needs it as eos_token")
    return {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": pad}


def tokenizer_files(tok, max_seq_len: int) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json that make transformers use tokenizer.json as is."""
    from model.tokenizer import EOT

    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    if tok.token_to_id("<|pad|>") is not None:
        special["pad_token"] = "<|pad|>"
    return {
        "tokenizer_config.json": {
            # The generic fast class: a model-specific one (LlamaTokenizerFast) would add a BOS token.
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": max_seq_len,
        },
        "special_tokens_map.json": special,
    }


def write_export(out_dir: str | Path, sd: dict[str, torch.Tensor], mcfg: ModelConfig, tokenizer_json: str,
                 dtype: str = "fp32", info: dict | None = None) -> None:
    """Write an HF directory for our state dict into the local directory `out_dir`."""
    from safetensors.torch import save_file

    from model.tokenizer import load_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {list(DTYPES)}")
    tok = load_tokenizer(tokenizer_json)
    if tok.get_vocab_size() > mcfg.vocab_size:
        raise ValueError(f"tokenizer.json has {tok.get_vocab_size()} tokens but model.vocab_size is {mcfg.vocab_size}")
    cast = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in sd.items()}
    hf_sd, hf_config = to_hf(cast, mcfg)
    ids = _special_ids(tok)
    hf_config.update(ids)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf_sd.items()}, str(out / HF_WEIGHTS), metadata={"format": "pt"})
    files: dict[str, Any] = {HF_CONFIG: hf_config, "generation_config.json": dict(ids), **tokenizer_files(tok, mcfg.max_seq_len)}
    files[EXPORT_INFO] = {"format": EXPORT_FORMAT, "dtype": dtype, "model": mcfg.model_dump(mode="json"), **(info or {})}
    for name, obj in files.items():
        (out / name).write_text(json.dumps(obj, indent=2) + "\n")
    (out / "tokenizer.json").write_text(tokenizer_json)


def _publish(tmp: Path, output: str, overwrite: bool) -> None:
    """Move a finished export into place, so `output` never holds half of one."""
    if storage.is_s3(output):
        storage.copy_dir(tmp, output)
        return
    dest = Path(output)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def export(cfg: ExportConfig) -> dict:
    """Run the export; returns a summary (output, checkpoint, step, arch, dtype, parameter count)."""
    from jobs.pretrain import TRAIN_STATE, latest_checkpoint

    output = storage.absolute(cfg.output)
    if storage.list_files(output) and not cfg.overwrite:
        raise FileExistsError(f"output: {output} is not empty (set overwrite: true to replace it)")
    ckpt = storage.absolute(cfg.checkpoint) if cfg.checkpoint else latest_checkpoint(storage.absolute(cfg.run))
    if not storage.exists(storage.join(ckpt, TRAIN_STATE)):
        raise FileNotFoundError(f"checkpoint: {ckpt} has no {TRAIN_STATE}")
    # load_pretrained verifies the checkpoint's manifests and checksums.
    state = json.loads(storage.read_text(storage.join(ckpt, TRAIN_STATE)))
    mcfg, sd = load_pretrained(ckpt)
    info = {"source_checkpoint": ckpt, "step": state.get("step"), "tokenizer_sha256": state.get("tokenizer_sha256"),
            "export_config": cfg.resolved()}
    tok_json = storage.read_text(storage.join(ckpt, "tokenizer.json"))
    # Built beside the destination (same filesystem, so the final rename is atomic) or in /tmp for S3.
    parent = None if storage.is_s3(output) else Path(output).parent
    if parent:
        parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would survive the rename and hide the export from other users
    try:
        write_export(tmp, sd, mcfg, tok_json, cfg.dtype, info)
        _publish(tmp, output, cfg.overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {"output": output, "checkpoint": ckpt, "step": state.get("step"), "arch": mcfg.arch,
               "dtype": cfg.dtype, "params": mcfg.num_params()}
    print(f"exported {mcfg.arch} ({mcfg.num_params() / 1e6:.2f} M parameters, {cfg.dtype}) from {ckpt} "
          f"(step {summary['step']}) to {output}")
    return summary


def run(cfg: ExportConfig) -> dict:
    return export(cfg)


def _flags(parser):
    parser.add_argument("--run", help="pretraining run directory (its newest checkpoint is exported)")
    parser.add_argument("--checkpoint", help="a specific checkpoint directory")
    parser.add_argument("--output", help="output directory")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="precision of the exported weights")


def _flag_overrides(args) -> dict:
    out = {k: getattr(args, k) for k in ("run", "checkpoint", "output", "dtype") if getattr(args, k)}
    # A source given on the command line replaces the config file's, whichever kind that is.
    if args.run and not args.checkpoint:
        out["checkpoint"] = None
    if args.checkpoint and not args.run:
        out["run"] = None
    return out


def cli(argv: list[str] | None = None) -> dict:
    """`python -m jobs.export`: a config file and/or --run/--checkpoint/--output/--dtype flags."""
    return main(ExportConfig, run, argv, extra_args=_flags, flag_overrides=_flag_overrides)


if __name__ == "__main__":
    cli()
