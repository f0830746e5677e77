"""The Ray Train `TorchTrainer`: one factory for pretraining, sweep trials and post-training."""

from __future__ import annotations

import json
import posixpath
from typing import Callable

from cluster import storage
from jobs.train.config import TrainConfig


def make_trainer(cfg: TrainConfig, loop: Callable[[dict], None], loop_config: dict, callbacks: list | None = None):
    """`cfg.num_workers` Ray Train workers running `loop(loop_config)`, checkpointing into
    `cfg.output` (local or s3://), keeping the newest `keep_checkpoints`, restarting the worker
    group up to `max_failures` times (the loop resumes from the newest complete checkpoint)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.ray_utils import storage_env

    out_fs, out_path = storage.resolve(cfg.output)
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=posixpath.basename(out_path),
            storage_path=posixpath.dirname(out_path),
            storage_filesystem=out_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks,
            # S3 settings of the driver (credentials, endpoint) must reach the workers that write checkpoints
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(cfg.cpus_per_worker), "PYTHONWARNINGS": "ignore",
                                             **storage_env()}},
        ),
    )


def start_run(cfg: TrainConfig) -> None:
    """Ray, the run directory and its resolved config.json: what every training driver does first."""
    from cluster.ray_utils import init_ray

    init_ray()
    storage.makedirs(cfg.output)
    storage.write_text(storage.join(cfg.output, "config.json"), json.dumps(cfg.resolved(), indent=2))
