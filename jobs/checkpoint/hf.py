"""Hugging Face model directories: writing an export of a checkpoint, and reading one back.

The output loads with `transformers.AutoModelForCausalLM.from_pretrained(dir)` (as
`LlamaForCausalLM` or `GPT2LMHeadModel`) and `AutoTokenizer.from_pretrained(dir)`, offline:

    model.safetensors        consolidated weights, HF key names, fp32 or bf16
    config.json              HF model config
    generation_config.json   eos/pad ids of the tokenizer's special tokens
    tokenizer.json           the run's byte-level BPE, unchanged
    tokenizer_config.json    tells transformers to use tokenizer.json as is
    special_tokens_map.json
    raylm_export.json        source checkpoint, step, model config, the export config and the
                             sha256 of every other file (checked when the directory is read)

`from_hf` reads our exports and any compatible Llama/GPT-2 directory (safetensors only: no
pickled weights are ever read). The key mapping itself is model/hf.py.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from cluster import storage
from jobs.checkpoint.config import ExportConfig
from jobs.checkpoint.layout import TOKENIZER, latest_checkpoint
from jobs.checkpoint.load import EXPORT_INFO, load_state_dict, read_train_state, resolve_source
from model import ModelConfig
from model.hf import HF_CONFIG, HF_WEIGHTS, to_hf

EXPORT_FORMAT = "raylm.hf_export/1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}






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
    for name, obj in files.items():
        (out / name).write_text(json.dumps(obj, indent=2) + "\n")
    (out / TOKENIZER).write_text(tokenizer_json)
    sums = {f.name: storage.sha256_file(f) for f in sorted(out.iterdir()) if f.is_file()}
    (out / EXPORT_INFO).write_text(json.dumps({"format": EXPORT_FORMAT, "dtype": dtype, "model": mcfg.model_dump(mode="json"),
                                               **(info or {}), "files": sums}, indent=2) + "\n")


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
    output = storage.absolute(cfg.output)
    if storage.list_files(output) and not cfg.overwrite:
        raise FileExistsError(f"output: {output} is not empty (set overwrite: true to replace it)")
    source = storage.absolute(cfg.checkpoint) if cfg.checkpoint else latest_checkpoint(storage.absolute(cfg.run))
    local, kind, ckpt = resolve_source(source)  # verified: a torn or corrupt checkpoint is refused here
    if kind != "raylm":
        raise ValueError(f"checkpoint: {source} is a Hugging Face directory already, not a raylm checkpoint")
    state = read_train_state(local)
    mcfg, sd = load_state_dict(str(local))
    info = {"source_checkpoint": ckpt, "step": state.get("step"), "tokenizer_sha256": state.get("tokenizer_sha256"),
            "export_config": cfg.resolved()}
    tok_json = (local / TOKENIZER).read_text()
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
