"""What every training worker does around its own steps: place itself, resume from the newest
complete checkpoint, record the start, save checkpoints and report them to Ray Train.

Pretraining (jobs.train.loop) and post-training (jobs.posttrain) loops are built from these, so
every trainer resumes, checkpoints and logs the same way.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from cluster import storage
from jobs.checkpoint.layout import checkpoint_name, find_resume_checkpoint, remove_torn_checkpoint
from jobs.checkpoint.load import read_history, read_train_state, resolve_source, restore_engine, set_rng_state
from jobs.checkpoint.save import write_checkpoint
from jobs.train.config import TrainConfig

EVENTS = "events.jsonl"


@dataclass
class Worker:
    """This worker's place in the group and the state of its run."""

    rank: int
    world: int
    device: torch.device
    scratch: Path
    output: str
    step: int = 0
    history: list[dict] = field(default_factory=list)
    resumed_from: str | None = None
    resume_dir: Path | None = None
    resume_world: int | None = None
    tensor_parallel: int = 1
    resume_tensor_parallel: int | None = None

    @property
    def resharded(self) -> bool:
        """The checkpoint being resumed was written by another number of workers or at another
        tensor-parallel degree."""
        return self.resume_world is not None and (self.resume_world != self.world
                                                  or self.resume_tensor_parallel != self.tensor_parallel)


def start_worker(cfg: TrainConfig, tensor_parallel: int = 1) -> Worker:
    """This worker's rank, world size, device and scratch directory, and the checkpoint it will
    resume from (the run's newest complete one, whoever wrote it: a restarted worker group after
    a failure, or a new job on the same output directory). Call before building the engine: a
    resharded resume needs `load_universal` in the engine's config."""
    import ray.train

    ctx = ray.train.get_context()
    torch.set_num_threads(cfg.cpus_per_worker)
    w = Worker(rank=ctx.get_world_rank(), world=ctx.get_world_size(), device=ray.train.torch.get_device(),
               scratch=Path(tempfile.mkdtemp(prefix="raylm-worker-")), output=cfg.output,
               tensor_parallel=tensor_parallel)
    ckpt = find_resume_checkpoint(cfg.output)
    if ckpt:
        w.resume_dir, _, w.resumed_from = resolve_source(ckpt)
        state = read_train_state(w.resume_dir)
        w.resume_world, w.resume_tensor_parallel = state["world_size"], state.get("tensor_parallel", 1)
    return w


def resume(engine, w: Worker, seed: int) -> None:
    """Load the resume checkpoint's engine state, RNG and metric history, or seed a fresh run."""
    import random

    import numpy as np

    if w.resume_dir is not None:
        if w.resharded:
            print(f"rank {w.rank}: resharding checkpoint {w.resumed_from} from {w.resume_world} workers at "
                  f"tensor_parallel={w.resume_tensor_parallel} to {w.world} at {w.tensor_parallel}", flush=True)
        restore_engine(engine, w.resume_dir, w.world, w.scratch, w.tensor_parallel)
        w.step = read_train_state(w.resume_dir)["step"]
        if not w.resharded:  # another world size draws other random numbers per rank anyway
            set_rng_state(w.resume_dir, w.rank)
        w.history = read_history(w.resume_dir)
        if w.rank == 0:
            print(f"resumed from {w.resumed_from} at step {w.step}", flush=True)
    else:
        random.seed(seed + w.rank)
        np.random.seed(seed + w.rank)


def record_start(output: str, w: Worker, engine) -> None:
    """Rank 0 appends this worker group's start to the run's events.jsonl: which attempt, at
    which step, from which checkpoint, and the layout the live engine runs (restarts, elastic
    resizes and the ZeRO stage are read from here, not inferred from the config)."""
    if w.rank != 0:
        return
    uri = storage.join(output, EVENTS)
    prior = storage.read_text(uri) if storage.exists(uri) else ""
    attempt = 1 + sum(1 for line in prior.splitlines() if '"event": "start"' in line)
    event = {"event": "start", "attempt": attempt, "time": datetime.now(timezone.utc).isoformat(),
             "world_size": w.world, "step": w.step, "resumed_from": w.resumed_from,
             "engine": {"zero_stage": int(engine.zero_optimization_stage()),
                        "data_parallel_size": int(engine.dp_world_size),
                        "tensor_parallel_size": tensor_parallel_size(engine),
                        "gradient_accumulation_steps": int(engine.gradient_accumulation_steps()),
                        "micro_batch_size": int(engine.train_micro_batch_size_per_gpu()),
                        "bf16": bool(engine.bfloat16_enabled())}}
    storage.write_text(uri, prior + json.dumps(event) + "\n")


def tensor_parallel_size(engine) -> int:
    """The tensor-parallel degree the live engine runs, from its process groups: DeepSpeed's
    (data, tensor) mesh under AutoTP, the pipeline grid's model axis, or none (1)."""
    mpu = engine.mpu
    return int(mpu.get_tensor_model_parallel_world_size()) if mpu is not None else 1


def read_events(output: str) -> list[dict]:
    uri = storage.join(output, EVENTS)
    return [json.loads(x) for x in storage.read_text(uri).splitlines() if x] if storage.exists(uri) else []


def save_and_report(engine, w: Worker, metrics: dict, tensors: dict | None, train_state: dict | None,
                    tokenizer_json: str | None) -> None:
    """Write a checkpoint of step `w.step` on every rank and report it to Ray Train (collective)."""
    import ray.train
    import torch.distributed as dist

    if w.rank == 0:
        # A torn checkpoint of this step from an earlier attempt (the one this run fell back from)
        # would stay in the directory Ray uploads into, unlisted, and fail the new one's verification.
        remove_torn_checkpoint(w.output, w.step)
    dist.barrier()
    with tempfile.TemporaryDirectory(dir=w.scratch) as tmp:
        write_checkpoint(Path(tmp), engine=engine, rank=w.rank, world=w.world, step=w.step, tensors=tensors,
                         train_state=train_state, tokenizer_json=tokenizer_json, history=w.history,
                         tensor_parallel=w.tensor_parallel)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=checkpoint_name(w.step))


def finish_worker(w: Worker) -> None:
    shutil.rmtree(w.scratch, ignore_errors=True)


def all_reduce_sum(values: list[float]) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def check_finite(loss: float, step: int) -> None:
    """Stop a run whose loss is NaN or infinite (jobs.train.sweep recognises this message)."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"training diverged: loss is {loss} at step {step}")


def is_due(step: int, every: int, max_steps: int) -> bool:
    return step % every == 0 or step == max_steps
