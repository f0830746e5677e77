"""The memory and time planner: what a run needs per worker, and whether it fits (`--plan`)."""

from __future__ import annotations

import os

from jobs.train.config import PretrainConfig
from jobs.train.metrics import PEAK_BF16_FLOPS
from model import ModelConfig


def estimate_memory(cfg: PretrainConfig, mcfg: ModelConfig, seq_len: int, world: int | None = None) -> dict[str, float]:
    """Bytes per worker for weights, gradients, optimizer state and activations.

    Weights/gradients/optimizer follow the ZeRO paper's accounting (Rajbhandari et al. 2020,
    section 3): mixed-precision Adam keeps 2 + 2 + 12 bytes per parameter (bf16 weights and
    gradients; fp32 master weights, momentum and variance), fp32 training 4 + 4 + 8. Stage 1
    shards the optimizer state over the data-parallel workers, stage 2 also the gradients, stage 3
    also the weights; pipeline stages split all three. Activations per layer follow Korthikanti
    et al. 2022 (table 2, no tensor parallelism): s*b*h*(34 + 5*a*s/h) bytes in 16-bit; flash
    attention (GPU) does not store the a*s*s score term; activation checkpointing keeps only each
    block's 2*s*b*h input plus one block's full activations. The fp32 logits and their gradient
    (2 * b*s*V*4 bytes) are added on the last stage.
    """
    world = world or cfg.worker_range[1]
    gpu = cfg.use_gpu
    n = mcfg.num_params()
    stages = cfg.pipeline_stages
    dp = world // stages
    wbytes, obytes = (2, 12) if gpu else (4, 8)
    per_stage = n / stages
    weights = per_stage * wbytes / (dp if cfg.zero_stage >= 3 else 1)
    grads = per_stage * wbytes / (dp if cfg.zero_stage >= 2 else 1)
    optim = 0.0 if cfg.offload_optimizer else per_stage * obytes / (dp if cfg.zero_stage >= 1 else 1)
    s, b, h, a = seq_len, cfg.micro_batch_size, mcfg.d_model, mcfg.n_heads
    layer = s * b * h * (34 + (0 if gpu else 5 * a * s / h)) * (1 if gpu else 2)
    layers = mcfg.n_layers / stages
    acts = (layers * 2 * s * b * h * (1 if gpu else 2) + layer) if mcfg.activation_checkpointing else layers * layer
    acts *= min(stages, cfg.grad_accum_for(world))  # 1F1B keeps up to `stages` micro-batches in flight
    acts += 2 * b * s * mcfg.vocab_size * 4
    return {"weights": weights, "gradients": grads, "optimizer": optim, "activations": acts,
            "total": weights + grads + optim + acts}


def worker_memory_bytes(cfg: PretrainConfig) -> float:
    if cfg.worker_memory_gib:
        return cfg.worker_memory_gib * 2**30
    if cfg.use_gpu:
        return 80 * 2**30
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total / cfg.worker_range[1]


def plan(cfg: PretrainConfig, mcfg: ModelConfig, seq_len: int, mfu: float = 0.4, gpu: str = "H100") -> dict:
    """The planner's numbers: size, FLOPs, memory per worker, compute-optimal tokens and time."""
    n = mcfg.num_params()
    world = cfg.worker_range[1]
    mem = estimate_memory(cfg, mcfg, seq_len)
    tokens = 20 * n  # Chinchilla (Hoffmann et al. 2022): about 20 tokens per parameter
    fpt = mcfg.flops_per_token(seq_len)
    peak = PEAK_BF16_FLOPS[gpu]
    return {
        "params": n, "flops_per_token": fpt, "memory_bytes": mem, "worker_memory_bytes": worker_memory_bytes(cfg),
        "compute_optimal_tokens": tokens, "gpu": gpu, "mfu": mfu, "workers": world,
        "hours_at_mfu": tokens * fpt / (world * peak * mfu) / 3600,
    }


def format_plan(p: dict) -> str:
    gib = 2**30
    m = p["memory_bytes"]
    lines = [
        f"parameters            {p['params'] / 1e9:10.3f} B",
        f"FLOPs per token       {p['flops_per_token'] / 1e9:10.3f} GFLOP (6N + 12*L*d*T)",
        "memory per worker:",
        *[f"  {k:<19} {m[k] / gib:10.2f} GiB" for k in ("weights", "gradients", "optimizer", "activations", "total")],
        f"  available           {p['worker_memory_bytes'] / gib:10.2f} GiB",
        f"compute-optimal data  {p['compute_optimal_tokens'] / 1e9:10.1f} B tokens (20 per parameter)",
        f"time at {p['mfu']:.0%} MFU      {p['hours_at_mfu']:10.1f} h on {p['workers']} x {p['gpu']}",
    ]
    return "\n".join(lines)


def check_fits(cfg: PretrainConfig, mcfg: ModelConfig, seq_len: int) -> None:
    p = plan(cfg, mcfg, seq_len)
    if p["memory_bytes"]["total"] > p["worker_memory_bytes"]:
        raise MemoryError("the run does not fit in the workers' memory (raise zero_stage, pipeline_stages or "
                          "num_workers, enable activation checkpointing or lower micro_batch_size):\n" + format_plan(p))
