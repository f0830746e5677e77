"""Pretrain: packed token shards -> a decoder-only transformer, on Ray Train with DeepSpeed.

    python -m jobs.pretrain --config configs/demo.yaml

The driver validates the config, builds a `ScalingConfig` and runs `TorchTrainer(...).fit()`;
`train_loop_per_worker` is what every worker runs. Ray initialises torch.distributed (gloo on
CPU, NCCL on GPU); DeepSpeed wraps the model with the configured ZeRO stage.
"""

from __future__ import annotations

import json
import math
import os
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
    num_workers: int | tuple[int, int] = 2
    """Ray Train workers (one per GPU on GPU clusters), or [min, max] for elastic training: after
    losing workers the run continues with fewer (at least min), resharding ZeRO state."""
    pipeline_stages: int = Field(1, ge=1)
    """Pipeline-parallel stages (DeepSpeed PipelineModule); data parallelism runs across pipelines."""
    use_gpu: bool = False
    """Train on GPUs (bf16, NCCL); otherwise CPU (fp32, gloo)."""
    cpus_per_worker: int = Field(1, ge=1)
    """CPUs reserved per worker (also its torch thread count)."""
    zero_stage: Literal[0, 1, 2, 3] = 3
    """DeepSpeed ZeRO stage: 0 plain data parallel, 1 optimizer state, 2 + gradients, 3 + parameters."""
    offload_optimizer: bool = False
    """ZeRO-3 only: keep optimizer state in CPU memory (frees GPU memory, costs PCIe traffic)."""
    init_from: str | None = None
    """Initial weights: a raylm checkpoint directory or a Hugging Face export (fresh optimizer)."""
    worker_memory_gib: float | None = Field(None, gt=0)
    """Memory per worker that the planner checks its estimate against. Default: the GPU's memory
    (80 GiB, an H100) with use_gpu, else the Ray nodes' memory shared among the workers."""
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
    def _check(self):
        lo, hi = self.worker_range
        if not 1 <= lo <= hi:
            raise ValueError(f"num_workers: need 1 <= min <= max, got {self.num_workers}")
        from jobs.pipeline import validate

        for w in range(lo, hi + 1):  # every world size an elastic run may shrink to
            validate(self.pipeline_stages, self.zero_stage, self.model.n_layers, w,
                     self.global_batch_size, self.micro_batch_size)
        if self.pipeline_stages > 1 and lo != hi:
            raise ValueError("num_workers: elastic ranges are supported with data parallelism only "
                             "(pipeline_stages = 1)")
        if self.pipeline_stages > 1 and self.init_from:
            raise ValueError("init_from: not supported with pipeline_stages > 1; start the pipeline run "
                             "from a checkpoint of its own or train data-parallel")
        if self.offload_optimizer and self.zero_stage != 3:
            raise ValueError("offload_optimizer needs zero_stage 3")
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        return self

    @property
    def worker_range(self) -> tuple[int, int]:
        w = self.num_workers
        return (w, w) if isinstance(w, int) else (w[0], w[1])

    def grad_accum_for(self, world: int) -> int:
        """Accumulation steps that keep the global batch fixed whatever the world size."""
        return self.global_batch_size // (self.micro_batch_size * (world // self.pipeline_stages))

    @property
    def grad_accum(self) -> int:
        return self.grad_accum_for(self.worker_range[1])


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


def deepspeed_config(cfg: PretrainConfig, bf16: bool, world: int | None = None, load_universal: bool = False) -> dict:
    zero: dict = {"stage": cfg.zero_stage, "stage3_gather_16bit_weights_on_model_save": True}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_for(world or cfg.worker_range[1]),
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # plain torch AdamW: DeepSpeed's fused Adam needs CUDA
        "zero_force_ds_cpu_optimizer": False,
        "checkpoint": {"load_universal": load_universal},
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


# ----------------------------------------------------------------------------- checkpoints
#
# A checkpoint directory holds every rank's DeepSpeed shards plus, from rank 0, the consolidated
# weights, the train state and the metrics. Each rank writes MANIFEST.rank<r>.json last, with the
# sha256 of each file it wrote. A checkpoint counts only when all world_size manifests are there
# and every checksum matches: a torn upload or a corrupted file makes it fall back to the previous.


def write_rank_manifest(d: Path, rank: int, step: int, world: int) -> None:
    files = {str(f.relative_to(d)): storage.sha256_file(f) for f in sorted(d.rglob("*"))
             if f.is_file() and not f.name.startswith("MANIFEST.")}
    (d / f"MANIFEST.rank{rank}.json").write_text(json.dumps({"step": step, "world_size": world, "files": files}))


def verify_checkpoint(ckpt: str) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not."""
    try:
        state = storage.read_json(storage.join(ckpt, TRAIN_STATE))
        for r in range(state["world_size"]):
            manifest = storage.read_json(storage.join(ckpt, f"MANIFEST.rank{r}.json"))
            for rel, sha in manifest["files"].items():
                if storage.sha256_file(storage.join(ckpt, rel)) != sha:
                    return f"checksum mismatch in {rel}"
    except (OSError, ValueError, KeyError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def checkpoint_dirs(run_dir: str) -> list[str]:
    """Checkpoint directories of a run, newest first."""
    names = set()
    for f in storage.list_files(run_dir):
        rest = f.split("/checkpoint_", 1)[1] if "/checkpoint_" in f else ""
        if "/" in rest:  # a file inside checkpoint_<step>/, not Ray's checkpoint_manager_snapshot.json
            names.add(rest.split("/")[0])
    return [storage.join(run_dir, f"checkpoint_{n}") for n in sorted(names, reverse=True)]


def latest_checkpoint(run_dir: str, verify: bool = True) -> str:
    """Newest complete checkpoint of a run (local or s3://), skipping torn or corrupt ones."""
    reasons = []
    for ck in checkpoint_dirs(run_dir):
        why = verify_checkpoint(ck) if verify else None
        if why is None:
            return ck
        reasons.append(f"{ck}: {why}")
        print(f"skipping checkpoint {ck}: {why}", flush=True)
    raise FileNotFoundError(f"run: no complete checkpoint under {run_dir!r}" + (f" ({'; '.join(reasons)})" if reasons else ""))


def find_resume_checkpoint(run_dir: str) -> str | None:
    try:
        return latest_checkpoint(run_dir)
    except FileNotFoundError:
        return None


def to_universal(ds_dir: Path, out: Path) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format, loadable at any world size."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                    str(ds_dir / "state"), "--output_folder", str(out / "state"), "--inject_missing_state",
                    "--num_extract_workers", "1", "--num_merge_workers", "1"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return out


# ----------------------------------------------------------------------------- metrics

# Dense bf16 peak FLOP/s (NVIDIA datasheets, SXM parts, no sparsity), for MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def memory_gib(device: torch.device) -> float:
    """Peak memory of this worker: GPU allocations on GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class RunLog:
    """Rank 0's metrics: metrics.jsonl and TensorBoard events in the run directory."""

    def __init__(self, output: str, history: list[dict]):
        from tensorboardX import SummaryWriter

        self.output, self.history = output, history
        self.tb_local = Path(output) / "tensorboard" if not storage.is_s3(output) else Path(tempfile.mkdtemp()) / "tb"
        self.tb = SummaryWriter(str(self.tb_local))

    def add(self, rec: dict) -> None:
        self.history.append(rec)
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, rec["step"])

    def flush(self) -> None:
        self.tb.flush()
        storage.write_text(storage.join(self.output, "metrics.jsonl"), "".join(json.dumps(h) + "\n" for h in self.history))
        if storage.is_s3(self.output):
            storage.copy_dir(self.tb_local, storage.join(self.output, "tensorboard"))


# ----------------------------------------------------------------------------- worker


def train_loop_per_worker(config: dict) -> None:
    import deepspeed
    import ray.train
    import torch.distributed as dist
    from safetensors.torch import save_file

    from jobs import pipeline

    cfg = PretrainConfig.model_validate(config["cfg"])
    mcfg = ModelConfig.model_validate(config["model"])
    manifest = config["manifest"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.cpus_per_worker)
    device = ray.train.torch.get_device()
    bf16 = cfg.use_gpu and torch.cuda.is_available()

    # Resume: the newest verified checkpoint of this run, whoever wrote it (a restarted worker
    # group after a failure, or a new job on the same output directory).
    resume = find_resume_checkpoint(cfg.output)
    state, ckpt_local, scratch = None, None, Path(tempfile.mkdtemp(prefix=f"raylm-rank{rank}-"))
    if resume:
        ckpt_local = storage.stage_local(resume, scratch / "stage") if storage.is_s3(resume) else Path(resume)
        state = json.loads((ckpt_local / TRAIN_STATE).read_text())
    resharded = state is not None and state["world_size"] != world

    pp = cfg.pipeline_stages > 1
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = GPT(mcfg) if not pp else None
    if cfg.init_from and state is None:
        from jobs.export import load_pretrained, load_state, same_architecture

        init_cfg, sd = load_pretrained(cfg.init_from)
        if not same_architecture(init_cfg, mcfg, ignore=("max_seq_len", "activation_checkpointing")):
            raise ValueError(f"init_from: {cfg.init_from} has a different architecture than `model`")
        load_state(model, sd, source=cfg.init_from)
    if pp:
        engine = pipeline.pipeline_engine(cfg, mcfg, cfg.pipeline_stages, bf16)
    else:
        optimizer = torch.optim.AdamW(model.optim_groups(cfg.weight_decay), lr=cfg.lr,
                                      betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=False)
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, bf16, world, load_universal=resharded),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg) / cfg.lr),
            dist_init_required=False,
        )

    history: list[dict] = []
    step = 0
    if state is not None:
        ds_dir = ckpt_local / "deepspeed"
        if resharded:  # ZeRO partitions were cut for another world size: go through the universal format
            print(f"rank {rank}: resharding checkpoint step {state['step']} from {state['world_size']} to {world} workers", flush=True)
            ds_dir = to_universal(ds_dir, scratch / "universal")
        engine.load_checkpoint(str(ds_dir), tag="state")
        step = state["step"]
        rng_file = ckpt_local / f"rng-rank{rank}.pt"
        if rng_file.exists() and not resharded:
            set_rng_state(torch.load(rng_file, weights_only=False))
        history = [json.loads(x) for x in (ckpt_local / "metrics.jsonl").read_text().splitlines() if x]
        if rank == 0:
            print(f"resumed from {resume} at step {step}", flush=True)
    else:
        random.seed(cfg.seed + rank)
        np.random.seed(cfg.seed + rank)
    log = RunLog(cfg.output, history) if rank == 0 else None

    data_dir = storage.stage_local(cfg.data)
    train = ShardLoader(data_dir, manifest, "train", cfg.seed)
    val = ShardLoader(data_dir, manifest, "val", cfg.seed)
    grad_accum = cfg.grad_accum_for(world)
    peak = peak_flops(device)
    flops_per_token = mcfg.flops_per_token(manifest["seq_len"])

    def evaluate() -> float:
        if pp:
            return pipeline.pipeline_eval_loss(engine, val, cfg.eval_batches, cfg.global_batch_size, cfg.micro_batch_size)
        engine.eval()
        total = torch.zeros(2, dtype=torch.float64)
        per_rank = cfg.global_batch_size // world
        with torch.no_grad():
            for b in range(cfg.eval_batches):
                for m in range(0, per_rank, cfg.micro_batch_size):
                    rows = val.rows(b * cfg.global_batch_size + rank * per_rank + m, cfg.micro_batch_size, shuffle=False)
                    _, loss = engine(rows[:, :-1].to(device), rows[:, 1:].to(device))
                    total += torch.tensor([loss.item() * rows.size(0), rows.size(0)], dtype=torch.float64)
        dist.all_reduce(total)
        engine.train()
        return float(total[0] / total[1])

    def save(metrics: dict) -> None:
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            d = Path(tmp)
            engine.save_checkpoint(str(d / "deepspeed"), tag="state")
            torch.save(rng_state(), d / f"rng-rank{rank}.pt")
            sd = pipeline.stage_state_dict(engine) if pp else full_state_dict(engine, mcfg.tie_embeddings)
            if rank == 0:
                save_file(sd, str(d / WEIGHTS))
                (d / TRAIN_STATE).write_text(json.dumps({
                    "step": step, "data_cursor": step * cfg.global_batch_size, "world_size": world,
                    "config": cfg.resolved(), "model": mcfg.model_dump(mode="json"),
                    "tokenizer_sha256": manifest["tokenizer_sha256"],
                    "data_manifest_sha256": config["manifest_sha256"],
                }, indent=2))
                (d / "tokenizer.json").write_text(config["tokenizer_json"])
                (d / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
            write_rank_manifest(d, rank, step, world)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(d)),
                             checkpoint_dir_name=f"checkpoint_{step:07d}")
        if log:
            log.flush()

    tokens_per_step = cfg.global_batch_size * manifest["seq_len"]
    # DeepSpeed records the gradient norm for its ZeRO and mixed-precision optimizers, not for a
    # plain fp32 one (ZeRO-0 on CPU), whose gradients are whole on every rank: measure it here.
    own_grad_norm = cfg.zero_stage == 0 and not bf16 and not pp
    grad_norm = 0.0
    engine.train()
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        if pp:  # the pipeline schedule runs all micro-batches; its loss is the global-batch mean on every rank
            step_loss = pipeline.pipeline_train_step(
                engine, pipeline.micro_batches(engine, train, step, cfg.global_batch_size, cfg.micro_batch_size))
        else:
            loss_sum = torch.zeros(1, dtype=torch.float64)
            for m in range(grad_accum):
                x, y = train.micro_batch(step, cfg.global_batch_size, rank, world, m, cfg.micro_batch_size)
                _, loss = engine(x.to(device), y.to(device))
                engine.backward(loss)
                if own_grad_norm and m == grad_accum - 1:  # the boundary: gradients are all-reduced, not yet clipped
                    grad_norm = float(torch.nn.utils.get_total_norm(
                        [p.grad for p in engine.module.parameters() if p.grad is not None]))
                engine.step()
                loss_sum += loss.detach().double().cpu()
            dist.all_reduce(loss_sum)
            step_loss = float(loss_sum) / (world * grad_accum)
        if not math.isfinite(step_loss):
            ray.train.report({"step": step + 1, "loss": step_loss, "diverged": True})
            raise FloatingPointError(f"training diverged: loss is {step_loss} at step {step + 1}")
        step += 1
        dt = time.perf_counter() - t0
        tps = tokens_per_step / dt
        rec = {
            "step": step,
            "loss": step_loss,
            "lr": lr_at(step - 1, cfg),
            "grad_norm": grad_norm if own_grad_norm else float(engine.get_global_grad_norm() or 0.0),
            "tokens_per_s": tps,
            "tokens": step * tokens_per_step,
            "world_size": world,
            "memory_gib": memory_gib(device),
        }
        if peak:
            rec["mfu"] = flops_per_token * tps / (world * peak)
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            rec["val_loss"] = evaluate()
            rec["val_ppl"] = math.exp(min(rec["val_loss"], 50))
        if log:
            log.add(rec)
            if step % 10 == 0 or "val_loss" in rec or step == 1:
                bar = "#" * int(30 * step / cfg.max_steps)
                shown = f" val {rec['val_loss']:.4f}" if "val_loss" in rec else ""
                print(f"[{bar:<30}] step {step}/{cfg.max_steps} loss {rec['loss']:.4f}{shown} "
                      f"{rec['tokens_per_s']:.0f} tok/s", flush=True)
        else:
            history.append(rec)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            save(rec)
        elif "val_loss" in rec:
            ray.train.report(rec)
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)



# ----------------------------------------------------------------------------- planner


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

    from cluster.ray_utils import storage_env

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
            # S3 settings of the driver (credentials, endpoint) must reach the workers that write checkpoints
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(cfg.cpus_per_worker), "PYTHONWARNINGS": "ignore",
                                             **storage_env()}},
        ),
    )


def read_history(ckpt: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_text(storage.join(ckpt, "metrics.jsonl")).splitlines() if x]


def run(cfg: PretrainConfig, plan_only: bool = False, mfu: float = 0.4, gpu: str = "H100") -> dict:
    from cluster.ray_utils import init_ray

    if plan_only:
        seq_len = cfg.model.max_seq_len
        mcfg = cfg.model
        if storage.exists(storage.join(cfg.data, "manifest.json")):
            _, manifest, mcfg = prepare_run(cfg)
            seq_len = manifest["seq_len"]
        p = plan(cfg, mcfg, seq_len, mfu, gpu)
        print(format_plan(p))
        return p
    cfg, manifest, mcfg = prepare_run(cfg)
    check_fits(cfg, mcfg, manifest["seq_len"])
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


def _flags(parser):
    parser.add_argument("--plan", action="store_true", help="print size, memory and time estimates; train nothing")
    parser.add_argument("--mfu", type=float, default=0.4, help="MFU assumed by --plan's time estimate")
    parser.add_argument("--gpu", choices=sorted(PEAK_BF16_FLOPS), default="H100", help="GPU assumed by --plan")


if __name__ == "__main__":
    main(PretrainConfig, run, extra_args=_flags,
         run_kwargs=lambda a: {"plan_only": a.plan, "mfu": a.mfu, "gpu": a.gpu})
