"""Reading checkpoints: the one loader every stage uses (resume, export, generate, SFT/DPO/reward
initialisation, evaluation, serving, sweeps).

A source is a checkpoint directory, a run directory (its newest complete checkpoint), or a
Hugging Face model directory (ours or a compatible Llama/GPT-2 one), local or s3://. Every
function here verifies before it reads: a raylm checkpoint must pass
`jobs.checkpoint.layout.verify_checkpoint`, one of our HF exports must match the checksums its
raylm_export.json lists, and an error names the file at fault. Nothing read from storage is
unpickled with arbitrary globals: weights are safetensors, RNG and train state JSON, and
DeepSpeed's own state files load under `weights_only_loads`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from cluster import storage
from jobs.checkpoint.layout import (DEEPSPEED, DEEPSPEED_TAG, METRICS, TOKENIZER, TRAIN_STATE, VALUE_HEAD, WEIGHTS,
                                    latest_checkpoint, rng_file, verify_checkpoint)
from model import GPT, ModelConfig
from model.config import same_architecture
from model.hf import HF_CONFIG, HF_WEIGHTS, from_hf_state

HF_INDEX = "model.safetensors.index.json"
EXPORT_INFO = "raylm_export.json"


class CheckpointError(ValueError):
    """A checkpoint or model directory that must not be used; the message names the file."""


# ----------------------------------------------------------------------------- finding and verifying


def resolve_source(path: str) -> tuple[Path, str, str]:
    """(verified local directory, kind, the checkpoint's URI) for a checkpoint, run or HF directory.

    kind is "raylm" (one of our checkpoints) or "hf". An S3 source is copied to local disk first
    and the copy is what gets verified and read.
    """
    path = storage.absolute(path)
    if storage.exists(storage.join(path, TRAIN_STATE)):
        uri = path
    elif storage.exists(storage.join(path, HF_CONFIG)) and (storage.exists(storage.join(path, HF_WEIGHTS))
                                                             or storage.exists(storage.join(path, HF_INDEX))):
        local = storage.stage_local(path)
        verify_export(local, path)
        return local, "hf", path
    elif storage.exists(path):
        uri = latest_checkpoint(path)  # the newest that verifies; torn or corrupt ones are skipped
    else:
        raise FileNotFoundError(f"{path}: neither a checkpoint ({TRAIN_STATE}), a Hugging Face model ({HF_CONFIG}) "
                                "nor a run directory: nothing is there")
    local = storage.stage_local(uri)
    why = verify_checkpoint(str(local))
    if why is not None:
        raise CheckpointError(f"{uri}: incomplete or corrupt checkpoint: {why}")
    return local, "raylm", uri


def verify_export(local: Path, source: str) -> None:
    """No file of an HF directory may lead out of it (a link to another tenant's weights, say);
    our exports also list each file's sha256 in raylm_export.json. Other HF directories have no
    checksums to check (their safetensors weights carry no code)."""
    root = os.path.realpath(local)
    for f in sorted(local.iterdir()):
        if not os.path.realpath(f).startswith(root + os.sep):
            raise CheckpointError(f"{source}: {f.name} leads out of the directory (a symbolic link)")
    info = local / EXPORT_INFO
    if not info.is_file():
        return
    files = json.loads(info.read_text()).get("files", {})
    for name, sha in files.items():
        f = local / name
        if "/" in name or name.startswith(".") or not f.is_file():
            raise CheckpointError(f"{source}: {EXPORT_INFO} lists {name[:80]!r}, which is not a file of the export")
        if storage.sha256_file(f) != sha:
            raise CheckpointError(f"{source}: checksum mismatch in {name}")


# ----------------------------------------------------------------------------- weights


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
            if "/" in shard or shard.startswith("."):
                raise CheckpointError(f"{d / HF_INDEX}: shard name {shard[:80]!r} is not a file of the directory")
            sd.update(load_file(str(d / shard)))
        return sd
    raise FileNotFoundError(f"{d}: no {HF_WEIGHTS} or {HF_INDEX} (only safetensors weights are read)")


def from_hf_dir(local: Path, source: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, our state dict) of a verified local HF directory. For our own exports the
    ModelConfig is the exact one of the source checkpoint (raylm_export.json) as long as
    config.json still describes the same network."""
    mcfg, sd = from_hf_state(read_hf_weights(local), json.loads((local / HF_CONFIG).read_text()), source)
    if (local / EXPORT_INFO).is_file():
        ours = ModelConfig.model_validate(json.loads((local / EXPORT_INFO).read_text())["model"])
        if same_architecture(ours, mcfg):
            mcfg = ours
    return mcfg, sd


def load_state_dict(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, fp32 state dict) of a checkpoint, run or HF directory, verified first.

    The state dict is in checkpoint form (lm_head.weight absent when tied): build `GPT(mcfg)`
    and call `load_into(model, sd)`.
    """
    from safetensors.torch import load_file

    local, kind, uri = resolve_source(path)
    if kind == "hf":
        return from_hf_dir(local, uri)
    state = read_train_state(local)
    mcfg = ModelConfig.model_validate(state["model"])
    sd = {k: v.float() for k, v in load_file(str(local / WEIGHTS)).items()}
    if mcfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return mcfg, sd


def load_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str = "state dict"):
    """Load a checkpoint-form state dict into a GPT; only a tied lm_head.weight may be absent."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    allowed = {"lm_head.weight"} if model.cfg.tie_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise CheckpointError(f"{source}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    return model


def load_model(path: str, device: str = "cpu"):
    """(GPT, tokenizer, train_state) from a checkpoint, run or HF directory, verified first.

    train_state is {} for an HF directory. A reward checkpoint's value head is not read here
    (see `load_value_head`).
    """
    from model.tokenizer import load_tokenizer

    local, kind, uri = resolve_source(path)
    tok_file = local / TOKENIZER
    if not tok_file.is_file():
        raise FileNotFoundError(f"{uri}: no {TOKENIZER} next to the weights")
    tok = load_tokenizer(str(tok_file))
    if kind == "hf":
        mcfg, sd = from_hf_dir(local, uri)
        state: dict = {}
    else:
        from safetensors.torch import load_file

        state = read_train_state(local)
        mcfg = ModelConfig.model_validate(state["model"])
        sd = load_file(str(local / WEIGHTS))
    model = load_into(GPT(mcfg), sd, source=f"{uri}/{WEIGHTS}")
    return model.to(device), tok, {**state, "checkpoint": uri}


def load_value_head(path: str) -> dict[str, torch.Tensor]:
    """The value head tensors of a jobs.reward checkpoint (verified first)."""
    from safetensors.torch import load_file

    local, kind, uri = resolve_source(path)
    if kind != "raylm" or not (local / VALUE_HEAD).is_file():
        raise FileNotFoundError(f"{uri}: no {VALUE_HEAD} (not a jobs.reward checkpoint)")
    return load_file(str(local / VALUE_HEAD))


def load_tokenizer_of(path: str):
    """The `tokenizers.Tokenizer` saved with a checkpoint, run or HF export."""
    from model.tokenizer import load_tokenizer

    local, _, uri = resolve_source(path)
    if not (local / TOKENIZER).is_file():
        raise FileNotFoundError(f"{uri}: no {TOKENIZER}")
    return load_tokenizer(str(local / TOKENIZER))


# ----------------------------------------------------------------------------- train state


def read_train_state(ckpt: Path) -> dict:
    state = json.loads((ckpt / TRAIN_STATE).read_text())
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{ckpt / TRAIN_STATE}: no 'model' and 'step' entries (not written by raylm?)")
    return state


def read_history(ckpt: str | Path) -> list[dict]:
    """The metric history a checkpoint carries (one JSON object per line)."""
    text = storage.read_text(storage.join(str(ckpt), METRICS))
    return [json.loads(x) for x in text.splitlines() if x]


def set_rng_state(ckpt: Path, rank: int) -> bool:
    """Restore this rank's RNG state from a checkpoint; False if the checkpoint has none for it."""
    f = ckpt / rng_file(rank)
    if not f.is_file():
        return False
    s = json.loads(f.read_text())
    version, internal, gauss_next = s["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    return True


# Classes DeepSpeed pickles into its optimizer-state files besides tensors and plain containers
# (found by loading ZeRO 0-3, pipeline and universal checkpoints with weights_only=True). Each is
# rebuilt from data; none runs code of the file's choosing.
def _deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every `torch.load` inside runs torch's weights-only unpickler, whatever its caller asks.

    DeepSpeed reads its checkpoint files with `torch.load(..., weights_only=False)`, which would
    run any code a crafted file names; these files sit in the tenant's storage. Inside this block
    such a file fails to load (UnpicklingError) instead of executing.
    """
    original = torch.load

    def load(f, *args, weights_only=None, **kwargs):  # noqa: ARG001 (the caller's choice is overridden)
        return original(f, *args, weights_only=True, **kwargs)

    torch.load = load
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        torch.load = original


def restore_engine(engine, ckpt: Path, world: int, scratch: Path, tensor_parallel: int = 1) -> None:
    """Load a verified checkpoint's DeepSpeed state (weights, optimizer, schedule) into `engine`.

    A checkpoint written by another number of workers or at another tensor-parallel degree goes
    through DeepSpeed's universal format, which any layout can load (ZeRO partitions and AutoTP
    shards are cut per rank from whole tensors).
    """
    state = read_train_state(ckpt)
    ds_dir = ckpt / DEEPSPEED
    if state["world_size"] != world or state.get("tensor_parallel", 1) != tensor_parallel:
        ds_dir = to_universal(ds_dir, scratch / "universal")
    with weights_only_loads():
        engine.load_checkpoint(str(ds_dir), tag=DEEPSPEED_TAG)


def to_universal(ds_dir: Path, out: Path) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format, loadable at any world size.

    Runs DeepSpeed's converter in a child process under `weights_only_loads`, as the loading does.
    """
    code = ("import runpy, sys; from jobs.checkpoint.load import weights_only_loads\n"
            "with weights_only_loads(): runpy.run_module('deepspeed.checkpoint.ds_to_universal', run_name='__main__')")
    subprocess.run([sys.executable, "-c", code, "--input_folder", str(ds_dir / DEEPSPEED_TAG), "--output_folder",
                    str(out / DEEPSPEED_TAG), "--inject_missing_state", "--num_extract_workers", "1",
                    "--num_merge_workers", "1"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return out
