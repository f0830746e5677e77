"""Writing a checkpoint (the layout is jobs.checkpoint.layout). Every training job writes through
`write_checkpoint`, on every rank, into a fresh local directory that Ray Train then uploads.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from jobs.checkpoint.layout import (DEEPSPEED, DEEPSPEED_TAG, METRICS, TOKENIZER, TRAIN_STATE, rng_file,
                                    write_rank_manifest)


def gather_weights(engine, tied: bool) -> dict[str, torch.Tensor] | None:
    """Consolidated fp32 weights of a DeepSpeed engine on rank 0 (None elsewhere), in the key
    names and shapes of the unsplit model whatever the engine's layout. Collective under ZeRO-3
    and tensor parallelism (DeepSpeed gathers the ZeRO partitions and the AutoTP shards, one
    layer at a time). With tied embeddings lm_head.weight is left out (it is tok_emb.weight)."""
    import torch.distributed as dist

    if engine.zero_optimization_stage() == 3 or engine.autotp_size() > 1:
        sd = engine._consolidated_16bit_state_dict()  # fp32 in fp32 runs, despite the name
    else:
        sd = engine.module.state_dict()
    if dist.get_rank() != 0:
        return None
    sd = {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}
    if tied:
        sd = {k: v for k, v in sd.items() if not k.endswith("lm_head.weight")}
    return sd


def rng_state() -> dict:
    """This process's Python, NumPy and torch RNG state as plain JSON values."""
    version, internal, gauss_next = random.getstate()
    kind, keys, npos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, keys.tolist(), int(npos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }


def write_checkpoint(d: Path, *, engine, rank: int, world: int, step: int, tensors: dict[str, dict] | None,
                     train_state: dict | None, tokenizer_json: str | None, history: list[dict] | None,
                     tensor_parallel: int = 1) -> None:
    """Write one checkpoint into the local directory `d`, on every rank of the group (collective).

    Each rank writes its DeepSpeed shards and its RNG state; rank 0 also writes `tensors` (file
    name -> state dict, e.g. {"model.safetensors": weights}), the train state (with the world
    size and tensor-parallel degree the shards were cut for), the tokenizer and the metric
    history. Each rank's manifest comes last.
    """
    from safetensors.torch import save_file

    engine.save_checkpoint(str(d / DEEPSPEED), tag=DEEPSPEED_TAG)
    (d / rng_file(rank)).write_text(json.dumps(rng_state()))
    if rank == 0:
        for name, sd in (tensors or {}).items():
            save_file(sd, str(d / name))
        (d / TRAIN_STATE).write_text(json.dumps({"step": step, "world_size": world, "tensor_parallel": tensor_parallel,
                                                    **(train_state or {})}, indent=2))
        if tokenizer_json is not None:
            (d / TOKENIZER).write_text(tokenizer_json)
        (d / METRICS).write_text("".join(json.dumps(h) + "\n" for h in history or []))
    write_rank_manifest(d, rank, step, world)
