"""Pretrain: packed token shards -> a decoder-only transformer, on Ray Train with DeepSpeed.

    python -m jobs.pretrain --config configs/demo.yaml

The driver validates the config, builds a `ScalingConfig` and runs `TorchTrainer(...).fit()`;
`train_loop_per_worker` is what every worker runs. Ray initialises torch.distributed (gloo on
CPU, NCCL on GPU); DeepSpeed wraps the model with the configured ZeRO stage.
"""

from __future__ import annotations

import json
import math
import posixpath
import random
import tempfile
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from cluster import storage
from jobs.config import JobConfig, main
from jobs.prepare import load_manifest
from model import GPT, ModelConfig

TRAIN_STATE = "train_state.json"
WEIGHTS = "model.safetensors"


class PretrainConfig(JobConfig):
    """Pretrain a decoder-only transformer on the shards written by jobs.prepare."""

    kind: Literal["pretrain"] = "pretrain"
    data: str
    """Output of jobs.prepare: a directory or s3:// prefix holding manifest.json."""
    output: str
    """Run directory (local or s3://): checkpoints, metrics.jsonl, loss.png."""
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(preset="tiny"))
    """Architecture, e.g. `{preset: tiny}` plus overrides. vocab_size always comes from the tokenizer."""
    num_workers: int = Field(2, ge=1)
    """Ray Train workers (one per GPU on GPU clusters)."""
    use_gpu: bool = False
    """Train on GPUs (bf16, NCCL); otherwise CPU (fp32, gloo)."""
    cpus_per_worker: int = Field(1, ge=1)
    """CPUs reserved per worker (also its torch thread count)."""
    zero_stage: Literal[0, 1, 2, 3] = 3
    """DeepSpeed ZeRO stage: 0 plain data parallel, 1 optimizer state, 2 + gradients, 3 + parameters."""
    global_batch_size: int = Field(32, ge=1)
    """Sequences per optimizer step, across all workers and accumulation steps."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per forward/backward on one worker; accumulation makes up the rest."""
    max_steps: int = Field(1000, ge=1)
    """Optimizer steps to train."""
    lr: float = Field(3e-4, gt=0)
    """Peak learning rate."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = Field(100, ge=0)
    """Linear warm-up steps from 0 to lr."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay on matmul weights (never on norms, biases or embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this (0 disables)."""
    eval_every: int = Field(100, ge=1)
    """Evaluate val loss every this many steps (and at the end)."""
    eval_batches: int = Field(4, ge=1)
    """Global batches of validation data per evaluation."""
    checkpoint_every: int = Field(200, ge=1)
    """Save a checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Newest checkpoints kept in storage."""
    max_failures: int = Field(0, ge=-1)
    """Worker-group restarts Ray Train may do after a failure (-1: unlimited)."""
    seed: int = 0
    """Seeds initialisation and the data order."""

    @model_validator(mode="after")
    def _check_batch(self):
        per_step = self.micro_batch_size * self.num_workers
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"micro_batch_size * num_workers ({self.micro_batch_size} * {self.num_workers})")
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        return self

    @property
    def grad_accum(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.num_workers)


# ----------------------------------------------------------------------------- schedule


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """LR of optimizer step `step` (0-based): linear warm-up, then cosine to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- data


class ShardLoader:
    """Deterministic batches from memory-mapped shards.

    The global batch of step s is rows perm_e[(s*G + j) % n] for j < G, where perm_e is the
    permutation of epoch e = (s*G + j) // n seeded by (seed, e). It depends only on (seed, step),
    never on the worker count; worker r of W reads only its contiguous G/W slice.
    """

    def __init__(self, data_dir: str | Path, manifest: dict, split: str, seed: int):
        shards = manifest["splits"][split]["shards"]
        self.arrays = [np.load(Path(data_dir) / s["file"], mmap_mode="r") for s in shards if s["sequences"]]
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])
        self.n = int(self.offsets[-1])
        if self.n == 0:
            raise ValueError(f"data: the {split!r} split has no sequences (more data, or a smaller seq_len)")
        self.seed = seed
        self._perm: tuple[int, np.ndarray] | None = None

    def _row(self, i: int) -> np.ndarray:
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.arrays[s][i - self.offsets[s]]

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._perm[1]

    def rows(self, start: int, count: int, shuffle: bool = True) -> torch.Tensor:
        out = []
        for g in range(start, start + count):
            epoch, pos = divmod(g, self.n)
            out.append(self._row(int(self._order(epoch)[pos]) if shuffle else pos))
        return torch.from_numpy(np.stack(out).astype(np.int64))

    def micro_batch(self, step: int, global_batch: int, rank: int, world: int, micro: int, micro_size: int):
        start = step * global_batch + rank * (global_batch // world) + micro * micro_size
        rows = self.rows(start, micro_size)
        return rows[:, :-1], rows[:, 1:]  # inputs, targets: (B, T)


# ----------------------------------------------------------------------------- worker


def deepspeed_config(cfg: PretrainConfig, bf16: bool) -> dict:
    return {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # plain torch AdamW: DeepSpeed's fused Adam needs CUDA
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def full_state_dict(engine, tied: bool) -> dict[str, torch.Tensor] | None:
    """Consolidated weights on rank 0 (None elsewhere). Collective under ZeRO-3."""
    import torch.distributed as dist

    if engine.zero_optimization_stage() == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()
    else:
        sd = engine.module.state_dict()
    if dist.get_rank() != 0:
        return None
    sd = {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}
    if tied:
        sd.pop("lm_head.weight", None)  # the same tensor as tok_emb.weight
    return sd


def load_weights(model: GPT, path: str | Path) -> GPT:
    from safetensors.torch import load_file

    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    allowed = {"lm_head.weight"} if model.cfg.tie_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise ValueError(f"{path}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    return model


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def train_loop_per_worker(config: dict) -> None:
    import deepspeed
    import ray.train
    import torch.distributed as dist
    from safetensors.torch import save_file

    cfg = PretrainConfig.model_validate(config["cfg"])
    mcfg = ModelConfig.model_validate(config["model"])
    manifest = config["manifest"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.cpus_per_worker)
    device = ray.train.torch.get_device()
    bf16 = cfg.use_gpu and torch.cuda.is_available()

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    model = GPT(mcfg)
    optimizer = torch.optim.AdamW(model.optim_groups(cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=False)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, bf16),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg) / cfg.lr),
        dist_init_required=False,
    )

    data_dir = storage.stage_local(cfg.data)
    train = ShardLoader(data_dir, manifest, "train", cfg.seed)
    val = ShardLoader(data_dir, manifest, "val", cfg.seed)
    history: list[dict] = []
    step = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(str(Path(d) / "deepspeed"), tag="state")
            state = json.loads((Path(d) / TRAIN_STATE).read_text())
            step = state["step"]
            rng_file = Path(d) / f"rng-rank{rank}.pt"
            if rng_file.exists() and state["world_size"] == world:
                set_rng_state(torch.load(rng_file, weights_only=False))
            history = [json.loads(line) for line in (Path(d) / "metrics.jsonl").read_text().splitlines() if line]

    def evaluate() -> float:
        engine.eval()
        total = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for b in range(cfg.eval_batches):
                start = b * cfg.global_batch_size
                per_rank = cfg.global_batch_size // world
                for m in range(0, per_rank, cfg.micro_batch_size):
                    rows = val.rows(start + rank * per_rank + m, cfg.micro_batch_size, shuffle=False)
                    _, loss = engine(rows[:, :-1].to(device), rows[:, 1:].to(device))
                    total += torch.tensor([loss.item() * rows.size(0), rows.size(0)], dtype=torch.float64)
        dist.all_reduce(total)
        engine.train()
        return float(total[0] / total[1])

    def save(metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(str(Path(d) / "deepspeed"), tag="state")
            torch.save(rng_state(), Path(d) / f"rng-rank{rank}.pt")
            sd = full_state_dict(engine, mcfg.tie_embeddings)
            if rank == 0:
                save_file(sd, str(Path(d) / WEIGHTS))
                state = {
                    "step": step, "data_cursor": step * cfg.global_batch_size, "world_size": world,
                    "config": cfg.resolved(), "model": mcfg.model_dump(mode="json"),
                    "tokenizer_sha256": manifest["tokenizer_sha256"], "data_manifest_sha256": config["manifest_sha256"],
                }
                (Path(d) / TRAIN_STATE).write_text(json.dumps(state, indent=2))
                (Path(d) / "tokenizer.json").write_text(config["tokenizer_json"])
                (Path(d) / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=f"checkpoint_{step:07d}")
        if rank == 0:
            storage.write_text(storage.join(cfg.output, "metrics.jsonl"), "".join(json.dumps(h) + "\n" for h in history))

    tokens_per_step = cfg.global_batch_size * manifest["seq_len"]
    engine.train()
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        loss_sum = torch.zeros(1)
        for m in range(cfg.grad_accum):
            x, y = train.micro_batch(step, cfg.global_batch_size, rank, world, m, cfg.micro_batch_size)
            _, loss = engine(x.to(device), y.to(device))
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float().cpu()
        dist.all_reduce(loss_sum)
        if not torch.isfinite(loss_sum).all():
            ray.train.report({"step": step + 1, "loss": float(loss_sum), "diverged": True})
            raise FloatingPointError(f"training diverged: loss is {float(loss_sum)} at step {step + 1}")
        step += 1
        dt = time.perf_counter() - t0
        rec = {
            "step": step,
            "loss": float(loss_sum) / (world * cfg.grad_accum),
            "lr": lr_at(step - 1, cfg),
            "grad_norm": float(engine.get_global_grad_norm() or 0.0),
            "tokens_per_s": tokens_per_step / dt,
            "tokens": step * tokens_per_step,
        }
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            rec["val_loss"] = evaluate()
            rec["val_ppl"] = math.exp(min(rec["val_loss"], 50))
        history.append(rec)
        if rank == 0 and (step % 10 == 0 or step == 1 or "val_loss" in rec):
            print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in rec.items()}), flush=True)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            save(rec)
        elif "val_loss" in rec:
            ray.train.report(rec)


# ----------------------------------------------------------------------------- driver


def resolve_model(cfg: PretrainConfig, manifest: dict) -> ModelConfig:
    mcfg = cfg.model.model_copy(update={"vocab_size": manifest["vocab_size"]})
    if manifest["seq_len"] > mcfg.max_seq_len:
        raise ValueError(f"model.max_seq_len ({mcfg.max_seq_len}) is shorter than the data's seq_len ({manifest['seq_len']})")
    return mcfg


def plot_losses(history: list[dict], unigram: float | None, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train", lw=1)
    ev = [h for h in history if "val_loss" in h]
    ax.plot([h["step"] for h in ev], [h["val_loss"] for h in ev], "o-", label="val")
    if unigram and math.isfinite(unigram):
        ax.axhline(unigram, ls="--", c="gray", label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(path, buf.getvalue())


def latest_checkpoint(run_dir: str) -> str:
    """Newest checkpoint directory of a run (local or s3://) that has weights and a train state."""
    names = sorted({Path(f).parent.name for f in storage.list_files(run_dir) if "/checkpoint_" in f})
    for name in reversed(names):
        ck = storage.join(run_dir, name)
        if storage.exists(storage.join(ck, TRAIN_STATE)) and storage.exists(storage.join(ck, WEIGHTS)):
            return ck
    raise FileNotFoundError(f"run: no complete checkpoint under {run_dir!r}")


def prepare_run(cfg: PretrainConfig) -> tuple[PretrainConfig, dict, ModelConfig]:
    """Absolute paths (workers run elsewhere), the data manifest and the resolved model config."""
    cfg = cfg.model_copy(update={"data": storage.absolute(cfg.data), "output": storage.absolute(cfg.output)})
    manifest = load_manifest(cfg.data)
    return cfg, manifest, resolve_model(cfg, manifest)


def make_trainer(cfg: PretrainConfig, manifest: dict, mcfg: ModelConfig, callbacks: list | None = None,
                 loop=None, extra_config: dict | None = None):
    """The TorchTrainer of one run. Tune trials and post-training jobs build theirs here too."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    out_fs, out_path = storage.resolve(cfg.output)
    return TorchTrainer(
        loop or train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.resolved(), "model": mcfg.model_dump(mode="json"), "manifest": manifest,
            "manifest_sha256": storage.sha256_bytes(storage.read_bytes(storage.join(cfg.data, "manifest.json"))),
            "tokenizer_json": storage.read_text(storage.join(cfg.data, manifest["tokenizer"])),
            **(extra_config or {}),
        },
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
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(cfg.cpus_per_worker), "PYTHONWARNINGS": "ignore"}},
        ),
    )


def read_history(ckpt: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_text(storage.join(ckpt, "metrics.jsonl")).splitlines() if x]


def run(cfg: PretrainConfig) -> dict:
    from cluster.ray_utils import init_ray

    cfg, manifest, mcfg = prepare_run(cfg)
    init_ray()
    storage.makedirs(cfg.output)
    storage.write_text(storage.join(cfg.output, "config.json"), json.dumps(cfg.resolved(), indent=2))
    print(f"model: {mcfg.num_params() / 1e6:.2f} M parameters, {mcfg.flops_per_token(manifest['seq_len']) / 1e6:.1f} "
          f"MFLOP/token; {cfg.num_workers} workers, ZeRO-{cfg.zero_stage}, grad accum {cfg.grad_accum}")
    result = make_trainer(cfg, manifest, mcfg).fit()
    ck = latest_checkpoint(cfg.output)
    history = read_history(ck)
    storage.write_text(storage.join(cfg.output, "metrics.jsonl"), "".join(json.dumps(h) + "\n" for h in history))
    plot_losses(history, manifest.get("unigram_val_loss"), storage.join(cfg.output, "loss.png"))
    final = next(h for h in reversed(history) if "val_loss" in h)
    summary = {
        "run": cfg.output, "checkpoint": ck, "steps": final["step"], "val_loss": final["val_loss"],
        "unigram_val_loss": manifest.get("unigram_val_loss"), "error": str(result.error) if result.error else None,
    }
    print(f"final val loss {final['val_loss']:.3f} (unigram baseline {manifest.get('unigram_val_loss', float('nan')):.3f}) "
          f"after {final['step']} steps; checkpoint {ck}")
    return summary


if __name__ == "__main__":
    main(PretrainConfig, run)
