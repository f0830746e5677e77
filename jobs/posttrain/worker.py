"""What the post-training loops (SFT, DPO, reward; jobs.posttrain.*) share: the driver side
(resolving the starting weights, what every worker is handed, the trainer, the summary) and the
worker side (model, engine, resume, batches, logging and checkpoints).

Checkpoints have pretraining's layout (jobs.checkpoint), so generate, evaluate, export, serve and
the next post-training stage load them through the same loader.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from cluster import storage
from jobs.checkpoint.layout import TRAIN_STATE, VALUE_HEAD, WEIGHTS, latest_checkpoint, prune_checkpoints
from jobs.checkpoint.load import load_model, read_history, resolve_source
from jobs.data.chat import CHAT_TEMPLATE, special_ids
from jobs.posttrain.config import PostTrainConfig
from jobs.train.engine import build_engine
from jobs.train.trainer import make_trainer, start_run
from jobs.train.worker import Worker, is_due, record_start, resume, save_and_report, start_worker

# ----------------------------------------------------------------------------- driver side


def absolute_paths(cfg):
    """The config with `data`, `eval_file` and `output` absolute (local or s3://), as the workers see them."""
    return cfg.model_copy(update={"data": storage.absolute(cfg.data), "output": storage.absolute(cfg.output),
                                  "eval_file": storage.absolute(cfg.eval_file) if cfg.eval_file else None})


def resolve_init(path: str) -> str:
    """The verified checkpoint or HF directory that `init_from` (or a reference) names."""
    return resolve_source(path)[2]


def loop_config(cfg: PostTrainConfig, init_dir: str) -> dict:
    """What every worker needs: the resolved config, the base model's config and its tokenizer."""
    from model.tokenizer import tokenizer_sha256

    model, tok, _ = load_model(init_dir)
    mcfg = model.cfg
    if cfg.max_seq_len and cfg.max_seq_len > mcfg.max_seq_len:
        raise ValueError(f"max_seq_len ({cfg.max_seq_len}) exceeds the model's max_seq_len ({mcfg.max_seq_len})")
    special_ids(tok)
    return {"cfg": cfg.resolved(), "model": mcfg.model_dump(mode="json"), "init_from": init_dir,
            "tokenizer_json": tok.to_str(), "tokenizer_sha256": tokenizer_sha256(tok)}


def fit(cfg: PostTrainConfig, loop: Callable[[dict], None], config: dict) -> dict:
    """Run `loop` on `cfg.num_workers` Ray Train workers; return a summary of the newest checkpoint."""
    start_run(cfg)
    result = make_trainer(cfg, loop, config).fit()
    prune_checkpoints(cfg.output, cfg.keep_checkpoints)
    ck = latest_checkpoint(cfg.output)
    state = storage.read_json(storage.join(ck, TRAIN_STATE))
    history = read_history(ck)
    storage.write_text(storage.join(cfg.output, "metrics.jsonl"), "".join(json.dumps(h) + "\n" for h in history))
    summary = {"run": cfg.output, "checkpoint": ck, "steps": state["step"], "metrics": state["metrics"],
               "error": str(result.error) if result.error else None}
    print(json.dumps(summary, indent=2))
    return summary


# ----------------------------------------------------------------------------- worker side


@dataclass
class PostTrainRun:
    """One worker's post-training run: its place, its engine and what its checkpoints record."""

    cfg: PostTrainConfig
    config: dict
    w: Worker
    engine: object
    prefix: str = ""  # the GPT's key prefix inside a wrapping module (a reward model's "body.")
    rest_file: str = VALUE_HEAD  # where a wrapping module's other tensors go
    extra_state: dict = field(default_factory=dict)  # more train_state.json entries (RL: the KL coefficient)


def start(cfg: PostTrainConfig, config: dict, module: torch.nn.Module, prefix: str = "",
          engine_cfg: PostTrainConfig | None = None) -> PostTrainRun:
    """Engine over `module` (a GPT, or a module with a GPT inside and `optim_groups`), resumed from
    the run's newest complete checkpoint if there is one. `engine_cfg` (default `cfg`) is what the
    engine's batch and schedule are built from (RL counts optimizer steps, not iterations)."""
    w = start_worker(cfg)
    engine = build_engine(engine_cfg or cfg, module, module.optim_groups(cfg.weight_decay), w.world,
                          load_universal=w.resharded)
    resume(engine, w, cfg.seed)
    record_start(cfg.output, w, engine)
    return PostTrainRun(cfg=cfg, config=config, w=w, engine=engine, prefix=prefix)


def batch_indices(n: int, step: int, cfg: PostTrainConfig, rank: int, world: int, micro: int) -> list[int]:
    """Example indices of one micro-batch. Like pretraining's ShardLoader, they depend only on
    (seed, step), so a resumed run sees exactly the batches it would have seen."""
    G = cfg.global_batch_size
    start_at = step * G + rank * (G // world) + micro * cfg.micro_batch_size
    out = []
    for g in range(start_at, start_at + cfg.micro_batch_size):
        epoch, pos = divmod(g, n)
        out.append(int(epoch_permutation(n, cfg.seed, epoch)[pos]))
    return out


@functools.lru_cache(maxsize=4)
def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of n examples in one pass over them: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def log_step(rank: int, rec: dict) -> None:
    if rank == 0 and (rec["step"] % 10 == 0 or rec["step"] == 1 or any(k.startswith("eval_") for k in rec)):
        print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in rec.items()}), flush=True)


def save(run: PostTrainRun, metrics: dict) -> None:
    """A checkpoint in pretraining's layout: the GPT in model.safetensors, a wrapping module's
    other tensors (a reward model's value head, a PPO critic) in `run.rest_file`."""
    from jobs.checkpoint.save import gather_weights
    from model import ModelConfig

    mcfg = ModelConfig.model_validate(run.config["model"])
    sd = gather_weights(run.engine, mcfg.tie_embeddings)
    tensors = None
    if sd is not None:
        body = {k[len(run.prefix):]: v for k, v in sd.items() if k.startswith(run.prefix)}
        rest = {k: v for k, v in sd.items() if not k.startswith(run.prefix)}
        tensors = {WEIGHTS: body, **({run.rest_file: rest} if rest else {})}
    state = {"kind": run.cfg.kind, "config": run.config["cfg"], "model": run.config["model"],
             "init_from": run.config["init_from"], "tokenizer_sha256": run.config["tokenizer_sha256"],
             "chat_template": CHAT_TEMPLATE, "metrics": metrics, **run.extra_state}
    save_and_report(run.engine, run.w, metrics, tensors, state, run.config["tokenizer_json"])


def finish_step(run: PostTrainRun, rec: dict) -> None:
    """Record a finished step: log it, and save a checkpoint every `checkpoint_every` steps and at
    the end; between checkpoints an eval is reported to Ray Train on its own."""
    import ray.train

    run.w.history.append(rec)
    log_step(run.w.rank, rec)
    if is_due(rec["step"], run.cfg.checkpoint_every, run.cfg.max_steps):
        save(run, rec)
    elif any(k.startswith("eval_") for k in rec):
        ray.train.report(rec)
