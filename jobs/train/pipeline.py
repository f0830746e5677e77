"""Pipeline parallelism for pretraining: model.GPT cut into DeepSpeed `PipelineModule` stages.

The layers are, in order: token embedding, input layer (learned positions for gpt2, dropout),
one layer per transformer block, final norm, output head. Stages split the blocks as evenly as
they divide (DeepSpeed's balanced partition: 3 blocks on 2 stages are 2 + 1); the embedding sits
on the first stage and norm and head on the last. With tied embeddings the head
is a `TiedLayerSpec` of the embedding, so the first and last stages each hold a copy of the one
matrix and DeepSpeed all-reduces its gradient between them before every optimizer step.

Each layer wraps the very submodule of a `model.GPT(mcfg)` built after `torch.manual_seed(seed)`,
so a pipeline run starts from exactly the weights of a single-process or ZeRO run with the same
seed, and `stage_state_dict` gives back a state dict in `model.GPT`'s key names.

With tensor parallelism the grid is DeepSpeed's (pipe, data, model) topology: rank =
stage * (data * tp) + replica * tp + tp_rank, so a tensor-parallel group is `tp` consecutive
ranks of one stage and one replica, and AutoTP splits each stage's blocks over it
(`shard_tensor_parallel`).

The pretraining loop calls, in order (PretrainConfig has refused invalid layouts before any
worker started): `pipeline_engine` (instead of the engine factory on a GPT),
`pipeline_train_step(engine, micro_batches(...))` once per optimizer step, `pipeline_eval_loss`,
and `stage_state_dict` (instead of `full_state_dict`) when writing model.safetensors.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model import GPT, ModelConfig
from model.gpt import Block

if TYPE_CHECKING:
    from deepspeed.pipe import PipelineModule

    from jobs.data.shards import ShardLoader
    from jobs.train.config import PretrainConfig

TIED_KEY = "embed"


# ----------------------------------------------------------------------------- layers


class TokenEmbedding(nn.Module):
    """Token ids (B, T) -> embeddings (B, T, d). Also the tied output head (see `tied_head`)."""

    gpt_prefix = "tok_emb."

    def __init__(self, tok_emb: nn.Embedding):
        super().__init__()
        self.inner = tok_emb

    def forward(self, idx):
        return self.inner(idx)


def tied_head(embedding: TokenEmbedding, x: torch.Tensor) -> torch.Tensor:
    """The output projection through the embedding matrix, as GPT's tied lm_head does."""
    return F.linear(x, embedding.inner.weight)


class InputLayer(nn.Module):
    """Adds learned positions (gpt2) and applies GPT's embedding dropout."""

    gpt_prefix = "pos_emb."

    def __init__(self, pos_emb: nn.Embedding | None, drop: nn.Dropout):
        super().__init__()
        self.inner = pos_emb
        self.drop = drop

    def forward(self, x):
        if self.inner is not None:
            x = x + self.inner(torch.arange(x.size(1), device=x.device))
        return self.drop(x)


class PipeBlock(nn.Module):
    """One transformer block. Pipeline layers pass only the activation tensor, so the block
    slices its RoPE tables itself (whole sequences from position 0: no KV cache in training)."""

    def __init__(self, block: Block, index: int, rope_cos: torch.Tensor | None, rope_sin: torch.Tensor | None):
        super().__init__()
        self.inner = block
        self.gpt_prefix = f"blocks.{index}."
        self.register_buffer("rope_cos", rope_cos, persistent=False)
        self.register_buffer("rope_sin", rope_sin, persistent=False)

    def forward(self, x):
        T = x.size(1)
        rope = (self.rope_cos[:T], self.rope_sin[:T]) if self.rope_cos is not None else None
        return self.inner(x, rope)


class FinalNorm(nn.Module):
    gpt_prefix = "norm."

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.inner = norm

    def forward(self, x):
        return self.inner(x)


class Head(nn.Module):
    """The untied output projection."""

    gpt_prefix = "lm_head."

    def __init__(self, lm_head: nn.Linear):
        super().__init__()
        self.inner = lm_head

    def forward(self, x):
        return self.inner(x)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """GPT.forward's loss: mean cross-entropy in fp32, targets of -100 ignored."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


def pipeline_module(mcfg: ModelConfig, num_stages: int, activation_checkpointing: bool, seed: int,
                    tensor_parallel: int = 1) -> "PipelineModule":
    """model.GPT(mcfg) as a DeepSpeed PipelineModule of `num_stages` stages, each split over
    `tensor_parallel` workers.

    Needs deepspeed.comm initialised (see `pipeline_engine`). Every rank builds the full GPT
    after torch.manual_seed(seed), so each stage's weights are exactly those of the
    single-process model; the layers of other stages are freed when this returns.
    """
    import torch.distributed as dist
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    torch.manual_seed(seed)
    gpt = GPT(mcfg)
    cos, sin = (gpt.rope_cos, gpt.rope_sin) if mcfg.arch == "llama" else (None, None)
    if mcfg.tie_embeddings:
        embed = TiedLayerSpec(TIED_KEY, TokenEmbedding, gpt.tok_emb, tied_weight_attr=["inner.weight"])
        head = TiedLayerSpec(TIED_KEY, TokenEmbedding, gpt.tok_emb, forward_fn=tied_head,
                             tied_weight_attr=["inner.weight"])
    else:
        embed = LayerSpec(TokenEmbedding, gpt.tok_emb)
        head = LayerSpec(Head, gpt.lm_head)
    layers = [
        embed,
        LayerSpec(InputLayer, gpt.pos_emb, gpt.drop),
        *(LayerSpec(PipeBlock, block, i, cos, sin) for i, block in enumerate(gpt.blocks)),
        LayerSpec(FinalNorm, gpt.norm),
        head,
    ]
    if tensor_parallel > 1:
        stages = {"topology": PipeModelDataParallelTopology(
            num_pp=num_stages, num_mp=tensor_parallel, num_dp=dist.get_world_size() // (num_stages * tensor_parallel))}
    else:
        stages = {"num_stages": num_stages}
    module = PipelineModule(
        layers=layers,
        **stages,
        loss_fn=loss_fn,
        # Balance the blocks (n_layers / stages each, the first stages one more when uneven);
        # embedding and head have no weight here so they stay at the ends.
        partition_method=f"type:{PipeBlock.__name__}",
        activation_checkpoint_interval=1 if activation_checkpointing else 0,
        # torch's non-reentrant checkpoint, as model.GPT uses, and only around blocks: the
        # embedding's integer input cannot go through a checkpoint that needs grad inputs.
        activation_checkpoint_func=partial(checkpoint, use_reentrant=False),
        checkpointable_layers=[PipeBlock.__name__],
    )
    if tensor_parallel > 1:
        shard_tensor_parallel(module, tensor_parallel)
    # DeepSpeed's fp32 gradient clipping sums the squared norm over the grid's model-parallel
    # group (the stages times the TP ranks of one replica) but counts a parameter of any rank
    # other than that group's first only when it is marked model-parallel; without the mark each
    # stage would clip by the first stage's norm alone. A TP shard counts on every rank; a whole
    # tensor once per TP group (on TP rank 0), and the second copy of a tied weight
    # (ds_pipe_replicated) not at all.
    tp_rank = module.mpu().get_slice_parallel_rank()
    for p in module.parameters():
        sharded = getattr(p, "tensor_model_parallel", False)
        p.model_parallel = sharded or (tp_rank == 0 and not getattr(p, "ds_pipe_replicated", False))
    return module


def shard_tensor_parallel(module: "PipelineModule", tensor_parallel: int) -> None:
    """Split this rank's blocks with DeepSpeed's AutoTP (jobs.train.engine.TP_LAYER_SPECS) over the
    pipeline grid's tensor-parallel group.

    Not through the engine's `tensor_parallel.autotp_size` key, as build_engine shards a whole
    GPT: with that key DeepSpeedEngine.__init__ builds its own (data, tensor) DeviceMesh over all
    workers, a mesh that knows nothing of the stages. It makes the two stages each other's
    data-parallel peers, and start-up deadlocks (the first stage waits in PipelineEngine's first
    all-reduce, the second in the engine's weight broadcast over that wrong group). Here the
    PipelineModule's grid owns every process group and AutoTP's partitioner runs directly, on
    the grid's 'model' axis. These are DeepSpeed internals (pinned in pyproject.toml;
    tests/test_tp.py trains through them).
    """
    import torch.nn as nn
    from deepspeed.module_inject.auto_tp import AutoTP
    from deepspeed.module_inject.autotp_config import AutoTPConfig
    from deepspeed.module_inject.layers import set_autotp_mode
    from deepspeed.utils import groups

    from jobs.train.engine import TP_LAYER_SPECS

    group = module.mpu().get_slice_parallel_group()
    set_autotp_mode(training=True)  # what deepspeed.initialize sets when it sees autotp_size
    # AutoTP's training layers read their group from deepspeed.utils.groups, whatever the
    # partitioner is given ("intra_layer_model parallel group is not initialized" otherwise).
    groups._TENSOR_MODEL_PARALLEL_GROUP = group
    config = AutoTPConfig.from_dict({"use_default_specs": False, "layer_specs": TP_LAYER_SPECS})
    config.tp_size = tensor_parallel
    autotp = AutoTP(module=module, all_reduce_linears=(), prefix="", state_dict=None,
                    linear_layer_setting=(nn.Linear, nn.Embedding), orig_layer_impl=None, keep_module_on_host=False,
                    partition_config=config, model_config=None, training_mode=True)
    autotp.set_tensor_parallel_config(tensor_parallel, group)
    autotp.update_linear_policies()
    autotp._replace_module(module)


# ----------------------------------------------------------------------------- engine


def optim_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """GPT.optim_groups' rule on a stage: decay matmul weights, never norms, biases or embeddings."""
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in module.parameters():
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def pipeline_engine(cfg: "PretrainConfig", mcfg: ModelConfig):
    """The DeepSpeed PipelineEngine of one worker: what the engine factory gives pretrain for a GPT.

    Must be called on every worker of the Ray Train group (torch.distributed is initialised).
    The pipeline runs world // (cfg.pipeline_stages * cfg.tensor_parallel) data-parallel replicas.
    """
    import deepspeed
    import torch.distributed as dist

    from jobs.train.engine import build_engine

    world = dist.get_world_size()
    cfg.check_world(world)
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    module = pipeline_module(mcfg, cfg.pipeline_stages, mcfg.activation_checkpointing, cfg.seed, cfg.tensor_parallel)
    return build_engine(cfg, module, optim_groups(module, cfg.weight_decay), world)


def micro_batches(engine, loader: "ShardLoader", step: int, global_batch: int, micro_size: int) -> Iterator:
    """The micro-batches of optimizer step `step` for this worker's pipeline, as train_batch reads them.

    Pipeline d of D (the data-parallel rank) gets exactly the rows ShardLoader.micro_batch gives
    data-parallel rank d of D, so the global batch is the one a ZeRO or single-process run sees.
    Only the first and last stages draw from it (inputs and targets of the same rows).
    """
    dp_rank, dp_world = engine.grid.data_parallel_id, engine.grid.data_parallel_size
    for m in range(engine.gradient_accumulation_steps()):
        yield loader.micro_batch(step, global_batch, dp_rank, dp_world, m, micro_size)


def pipeline_train_step(engine, data_iter: Iterator) -> float:
    """One optimizer step over the global batch; the mean loss of its micro-batches, same on every rank."""
    return float(engine.train_batch(data_iter=data_iter))


def pipeline_eval_loss(engine, loader: "ShardLoader", batches: int, global_batch: int, micro_size: int) -> float:
    """Mean loss over the first `batches` global batches of `loader` in file order, as pretrain evaluates."""
    dp_rank, dp_world = engine.grid.data_parallel_id, engine.grid.data_parallel_size
    per_rank = global_batch // dp_world
    total = 0.0
    for b in range(batches):
        rows = _eval_rows(loader, b * global_batch + dp_rank * per_rank, per_rank, micro_size)
        total += float(engine.eval_batch(rows, num_micro_batches=per_rank // micro_size))
    return total / batches


def _eval_rows(loader: "ShardLoader", start: int, count: int, micro_size: int) -> Iterator:
    for m in range(0, count, micro_size):
        r = loader.rows(start + m, micro_size, shuffle=False)
        yield r[:, :-1], r[:, 1:]


# ----------------------------------------------------------------------------- weights


def stage_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """Consolidated fp32 weights in model.GPT's key names on rank 0, None elsewhere. Collective.

    The first pipeline (data-parallel rank 0) sends each stage's layers to rank 0; under tensor
    parallelism each split layer is gathered whole within its TP group first (DeepSpeed's
    GatherReplacedLayerParams) and TP rank 0 sends it. With tied embeddings lm_head.weight is
    left out, as jobs.checkpoint.save.gather_weights does.
    """
    import torch.distributed as dist

    local = {}
    if engine.grid.data_parallel_id == 0:
        with contextlib.ExitStack() as whole:
            if engine.grid.get_slice_parallel_world_size() > 1:
                from deepspeed.module_inject.layers import GatherReplacedLayerParams

                for m in engine.module.modules():
                    own = list(m.parameters(recurse=False))
                    if own:  # a no-op for modules AutoTP did not replace
                        whole.enter_context(GatherReplacedLayerParams(own, m))
            if engine.grid.get_slice_parallel_rank() == 0:
                for m in engine.module.modules():
                    prefix = getattr(m, "gpt_prefix", None)
                    if prefix is not None and m.inner is not None:
                        for k, v in m.inner.state_dict().items():  # a copy: split layers are cut again on exit
                            local[prefix + k] = v.detach().float().cpu().clone(memory_format=torch.contiguous_format)
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    sd = {}
    for part in gathered:
        sd.update(part)  # the tied embedding comes from the first and the last stage, identical
    return sd
