"""The DeepSpeed engine: one factory for pretraining, pipeline stages and post-training.

Every trainer gets the same optimizer (torch AdamW with the model's decay groups), the same
schedule (jobs.train.schedule.lr_at) and the ZeRO stage, batch and clipping of its config.
"""

from __future__ import annotations

import torch

from jobs.train.config import TrainConfig
from jobs.train.schedule import lr_at


def use_bf16(cfg: TrainConfig) -> bool:
    """bf16 on GPUs; fp32 on CPU, where bf16 matmuls are slow and the tests compare exactly."""
    return cfg.use_gpu and torch.cuda.is_available()


def deepspeed_config(cfg: TrainConfig, world: int, load_universal: bool = False) -> dict:
    zero: dict = {"stage": cfg.zero_stage, "stage3_gather_16bit_weights_on_model_save": True}
    if getattr(cfg, "offload_optimizer", False):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_for(world),
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16(cfg)},
        "zero_allow_untested_optimizer": True,  # plain torch AdamW: DeepSpeed's fused Adam needs CUDA
        "zero_force_ds_cpu_optimizer": False,
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_engine(cfg: TrainConfig, module: torch.nn.Module, param_groups: list[dict], world: int,
                 load_universal: bool = False):
    """`deepspeed.initialize` on `module` (a GPT, a pipeline stage, a reward model).

    torch.distributed is already initialised (Ray Train does it); `load_universal` prepares the
    engine to load a checkpoint written by another number of workers.
    """
    import deepspeed

    optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=False)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=deepspeed_config(cfg, world, load_universal),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg) / cfg.lr),
        dist_init_required=False,
    )
    return engine
