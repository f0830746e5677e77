"""The DeepSpeed engine: one factory for pretraining, pipeline stages and post-training.

Every trainer gets the same optimizer (torch AdamW with the model's decay groups), the same
schedule (jobs.train.schedule.lr_at) and the ZeRO stage, batch and clipping of its config.
With `tensor_parallel` > 1 DeepSpeed's AutoTP splits the blocks' linear layers (TP_LAYER_SPECS)
over groups of consecutive ranks; pipeline stages are split by jobs.train.pipeline before they
get here.
"""

from __future__ import annotations

import torch

from jobs.train.config import TrainConfig
from jobs.train.schedule import lr_at


# The Megatron split of model.GPT's blocks, as AutoTP partition specs (parameter-name patterns):
# column-parallel wq/wk/wv and the MLP's gate/up (a rank holds a contiguous share of the heads and
# hidden units, with their biases), row-parallel wo/down (their outputs are all-reduced, the bias
# added once after it). One all-reduce forward and one backward per attention and per MLP. Nothing
# else matches: embedding, norms, learned positions and the output head stay whole on every rank.
TP_LAYER_SPECS = [
    {"patterns": [r".*\.attn\.w[qkv]\.weight$", r".*\.mlp\.(gate|up)\.weight$"], "partition_type": "column"},
    {"patterns": [r".*\.attn\.wo\.weight$", r".*\.mlp\.down\.weight$"], "partition_type": "row"},
]


def use_bf16(cfg: TrainConfig) -> bool:
    """bf16 on GPUs; fp32 on CPU, where bf16 matmuls are slow and the tests compare exactly."""
    return cfg.use_gpu and torch.cuda.is_available()


def deepspeed_config(cfg: TrainConfig, world: int, load_universal: bool = False, tensor_parallel: int = 1) -> dict:
    zero: dict = {"stage": cfg.zero_stage, "stage3_gather_16bit_weights_on_model_save": True}
    if getattr(cfg, "offload_optimizer", False):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    conf = {
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
    if tensor_parallel > 1:
        conf["tensor_parallel"] = {"autotp_size": tensor_parallel,
                                   "partition_config": {"use_default_specs": False, "layer_specs": TP_LAYER_SPECS}}
    return conf


def build_engine(cfg: TrainConfig, module: torch.nn.Module, param_groups: list[dict], world: int,
                 load_universal: bool = False):
    """`deepspeed.initialize` on `module` (a GPT, a pipeline stage, a reward model).

    torch.distributed is already initialised (Ray Train does it); `load_universal` prepares the
    engine to load a checkpoint written by another number of workers or tensor-parallel degree.
    A GPT under `cfg.tensor_parallel` > 1 is sharded here by AutoTP; a PipelineModule arrives
    sharded already (jobs.train.pipeline) and owns its process groups.
    """
    import deepspeed
    from deepspeed.pipe import PipelineModule

    tp = getattr(cfg, "tensor_parallel", 1)
    mpu = None
    if tp > 1 and not isinstance(module, PipelineModule):
        import torch.distributed as dist
        from deepspeed.utils import groups

        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)  # the mesh needs it

        # DeepSpeed's (data, tensor) DeviceMesh, tensor innermost: rank r is TP rank r % tp of
        # data-parallel replica r // tp. Passing it as `mpu` makes the batch arithmetic count
        # replicas, not workers (without it DeepSpeed refuses the config: "train_batch_size is
        # not equal to micro_batch_per_gpu * gradient_acc_step * world_size"), and makes
        # gradient clipping sum the shards' norms over the TP group.
        groups._init_tp_mesh_device(tensor_model_parallel_size=tp)
        mpu = groups
    else:
        tp = 1  # the pipeline's stages are sharded on its own grid: no `tensor_parallel` key (see pipeline.py)
    optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=False)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=deepspeed_config(cfg, world, load_universal, tp), mpu=mpu,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg) / cfg.lr),
        dist_init_required=False,
    )
    return engine
