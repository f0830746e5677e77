"""Pipeline parallelism for pretraining: model.GPT cut into DeepSpeed `PipelineModule` stages.

The layers are, in order: token embedding, input layer (learned positions for gpt2, dropout),
one layer per transformer block, final norm, output head. Stages split the blocks evenly; the
embedding sits on the first stage and norm and head on the last. With tied embeddings the head
is a `TiedLayerSpec` of the embedding, so the first and last stages each hold a copy of the one
matrix and DeepSpeed all-reduces its gradient between them before every optimizer step.

Each layer wraps the very submodule of a `model.GPT(mcfg)` built after `torch.manual_seed(seed)`,
so a pipeline run starts from exactly the weights of a single-process or ZeRO run with the same
seed, and `stage_state_dict` gives back a state dict in `model.GPT`'s key names.

The pretraining loop calls, in order (PretrainConfig has refused invalid layouts before any
worker started): `pipeline_engine` (instead of the engine factory on a GPT),
`pipeline_train_step(engine, micro_batches(...))` once per optimizer step, `pipeline_eval_loss`,
and `stage_state_dict` (instead of `full_state_dict`) when writing model.safetensors.
"""

from __future__ import annotations

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


def pipeline_module(mcfg: ModelConfig, num_stages: int, activation_checkpointing: bool, seed: int) -> "PipelineModule":
    """model.GPT(mcfg) as a DeepSpeed PipelineModule of `num_stages` stages.

    Needs deepspeed.comm initialised (see `pipeline_engine`). Every rank builds the full GPT
    after torch.manual_seed(seed), so each stage's weights are exactly those of the
    single-process model; the layers of other stages are freed when this returns.
    """
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

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
    module = PipelineModule(
        layers=layers,
        num_stages=num_stages,
        loss_fn=loss_fn,
        # Balance the blocks; embedding and head have no weight here so they stay at the ends.
        partition_method=f"type:{PipeBlock.__name__}",
        activation_checkpoint_interval=1 if activation_checkpointing else 0,
        # torch's non-reentrant checkpoint, as model.GPT uses, and only around blocks: the
        # embedding's integer input cannot go through a checkpoint that needs grad inputs.
        activation_checkpoint_func=partial(checkpoint, use_reentrant=False),
        checkpointable_layers=[PipeBlock.__name__],
    )
    # DeepSpeed's fp32 gradient clipping sums the squared norm over the pipeline but counts a
    # parameter of a stage other than the first only when it is marked model-parallel; without
    # the mark each stage would clip by the first stage's norm alone. The second copy of a tied
    # weight (ds_pipe_replicated) stays unmarked so that it is counted once.
    for p in module.parameters():
        p.model_parallel = not p.ds_pipe_replicated
    return module


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
    The pipeline runs world // cfg.pipeline_stages data-parallel replicas.
    """
    import deepspeed
    import torch.distributed as dist

    from jobs.train.engine import build_engine

    world = dist.get_world_size()
    cfg.check_world(world)
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    module = pipeline_module(mcfg, cfg.pipeline_stages, mcfg.activation_checkpointing, cfg.seed)
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

    The first pipeline (data-parallel rank 0) sends each stage's layers to rank 0. With tied
    embeddings lm_head.weight is left out, as jobs.pretrain.full_state_dict does.
    """
    import torch.distributed as dist

    local = {}
    if engine.grid.data_parallel_id == 0:
        for m in engine.module.modules():
            prefix = getattr(m, "gpt_prefix", None)
            if prefix is not None and m.inner is not None:
                for k, v in m.inner.state_dict().items():
                    local[prefix + k] = v.detach().float().cpu().contiguous()
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    sd = {}
    for part in gathered:
        sd.update(part)  # the tied embedding comes from the first and the last stage, identical
    return sd
