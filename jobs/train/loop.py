"""Pretraining: the loop every Ray Train worker runs, and what its driver hands it.

`train_loop_per_worker` reads top to bottom: `setup` (model, engine, resume, data), then
`train_step`, `evaluate`, `step_record` and `save` until max_steps. Ray initialises
torch.distributed (gloo on CPU, NCCL on GPU); the engine factory wraps the model with the
configured ZeRO stage and tensor parallelism, or `jobs.train.pipeline` cuts it into pipeline
stages.

Ranks, tensor parallelism innermost (DeepSpeed's layout; Ray Train numbers the workers of a node
consecutively): rank r is tensor-parallel rank r % tp of data-parallel replica r // tp, or with
pipeline stages, replica (r // tp) % replicas of stage r // (tp * replicas). The tp workers of a
replica read the same micro-batches.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import torch

from cluster import storage
from jobs.checkpoint.layout import WEIGHTS, latest_checkpoint, prune_checkpoints
from jobs.checkpoint.load import load_into, load_state_dict, read_history, read_train_state, resolve_source
from jobs.checkpoint.save import gather_weights
from jobs.data.shards import ShardLoader, load_manifest
from jobs.train import pipeline
from jobs.train.config import PretrainConfig
from jobs.train.engine import build_engine, use_bf16
from jobs.train.metrics import RunLog, memory_gib, peak_flops, plot_losses
from jobs.train.schedule import lr_at
from jobs.train.worker import (Worker, all_reduce_sum, check_finite, finish_worker, is_due, record_start, resume,
                               save_and_report, start_worker)
from model import GPT, ModelConfig
from model.config import same_architecture

# ----------------------------------------------------------------------------- driver side


def prepare_run(cfg: PretrainConfig) -> tuple[PretrainConfig, dict, ModelConfig]:
    """Absolute paths (workers run elsewhere), the data manifest and the resolved model config.

    `init_from` becomes the verified checkpoint or HF directory it names, so that a bad one fails
    here, before any worker starts."""
    cfg = cfg.model_copy(update={"data": storage.absolute(cfg.data), "output": storage.absolute(cfg.output),
                                 "init_from": resolve_source(cfg.init_from)[2] if cfg.init_from else None})
    manifest = load_manifest(cfg.data)
    mcfg = cfg.model.model_copy(update={"vocab_size": manifest["vocab_size"]})
    if manifest["seq_len"] > mcfg.max_seq_len:
        raise ValueError(f"model.max_seq_len ({mcfg.max_seq_len}) is shorter than the data's seq_len ({manifest['seq_len']})")
    return cfg, manifest, mcfg


def loop_config(cfg: PretrainConfig, manifest: dict, mcfg: ModelConfig) -> dict:
    """What every worker needs: the resolved configs, the data manifest and the tokenizer."""
    return {
        "cfg": cfg.resolved(), "model": mcfg.model_dump(mode="json"), "manifest": manifest,
        "manifest_sha256": storage.sha256_bytes(storage.read_bytes(storage.join(cfg.data, "manifest.json"))),
        "tokenizer_json": storage.read_text(storage.join(cfg.data, manifest["tokenizer"])),
    }


def summarize(cfg: PretrainConfig, manifest: dict, error: Exception | None) -> dict:
    """After fit(): keep-K enforced, the run's metrics.jsonl and loss.png from its newest complete
    checkpoint."""
    for gone in prune_checkpoints(cfg.output, cfg.keep_checkpoints):
        print(f"deleted {gone}: beyond the newest keep_checkpoints={cfg.keep_checkpoints}", flush=True)
    ck = latest_checkpoint(cfg.output)
    history = read_history(ck)
    storage.write_text(storage.join(cfg.output, "metrics.jsonl"), "".join(json.dumps(h) + "\n" for h in history))
    plot_losses(history, manifest.get("unigram_val_loss"), storage.join(cfg.output, "loss.png"))
    final = next(h for h in reversed(history) if "val_loss" in h)
    print(f"final val loss {final['val_loss']:.3f} (unigram baseline {manifest.get('unigram_val_loss', float('nan')):.3f}) "
          f"after {final['step']} steps; checkpoint {ck}")
    return {"run": cfg.output, "checkpoint": ck, "steps": final["step"], "val_loss": final["val_loss"],
            "unigram_val_loss": manifest.get("unigram_val_loss"), "error": str(error) if error else None}


# ----------------------------------------------------------------------------- worker


@dataclass
class Run:
    """One worker's pretraining run."""

    cfg: PretrainConfig
    mcfg: ModelConfig
    config: dict
    w: Worker
    engine: object
    train: ShardLoader
    val: ShardLoader
    log: RunLog | None

    @property
    def pipelined(self) -> bool:
        return self.cfg.pipeline_stages > 1

    @property
    def data_parallel(self) -> tuple[int, int]:
        """(this worker's data-parallel replica, replicas): the rows of the global batch it reads."""
        if self.pipelined:
            return self.engine.grid.data_parallel_id, self.engine.grid.data_parallel_size
        t = self.cfg.tensor_parallel
        return self.w.rank // t, self.w.world // t


def check_tensor_parallel_placement(nodes: list, tensor_parallel: int) -> None:
    """Refuse a layout whose tensor-parallel groups span nodes. `nodes[r]` is the node of rank r;
    a group is `tensor_parallel` consecutive ranks. TP all-reduces twice per block, forward and
    backward, sized like the activations: meant for NVLink, not the network between nodes."""
    for start in range(0, len(nodes), tensor_parallel):
        group = nodes[start:start + tensor_parallel]
        if len(set(group)) > 1:
            raise ValueError(
                f"tensor_parallel ({tensor_parallel}): workers {start}..{start + tensor_parallel - 1} form one "
                f"tensor-parallel group but run on {len(set(group))} nodes; give every node a multiple of "
                f"tensor_parallel workers (tensor_parallel must divide the GPUs per node)")


def placed_tensor_parallel(cfg: PretrainConfig) -> None:
    """Every worker's node, gathered (collective); `check_tensor_parallel_placement` on them."""
    import ray
    import torch.distributed as dist

    if cfg.tensor_parallel == 1:
        return
    nodes = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    check_tensor_parallel_placement(nodes, cfg.tensor_parallel)


def build_engine_for(cfg: PretrainConfig, mcfg: ModelConfig, w: Worker):
    """The DeepSpeed engine of this worker: pipeline stages, or the whole GPT under ZeRO.

    Every rank seeds the same initial weights; `init_from` replaces them unless the run resumes.
    """
    if cfg.pipeline_stages > 1:
        return pipeline.pipeline_engine(cfg, mcfg)
    torch.manual_seed(cfg.seed)
    model = GPT(mcfg)
    if cfg.init_from and w.resume_dir is None:
        init_cfg, sd = load_state_dict(cfg.init_from)
        if not same_architecture(init_cfg, mcfg, ignore=("max_seq_len", "activation_checkpointing")):
            raise ValueError(f"init_from: {cfg.init_from} has a different architecture than `model`")
        load_into(model, sd, source=cfg.init_from)
    return build_engine(cfg, model, model.optim_groups(cfg.weight_decay), w.world, load_universal=w.resharded)


def check_resume_layout(cfg: PretrainConfig, w: Worker) -> None:
    """Refuse, naming the field, a resume at another tensor-parallel degree that DeepSpeed's
    universal checkpoint cannot do: from ZeRO-0 shards (the converter reads the optimizer
    partitions of ZeRO 1-3) or through pipeline stages (raylm attaches no universal-checkpoint
    map to a sharded pipeline)."""
    if w.resume_dir is None or w.resume_tensor_parallel == cfg.tensor_parallel:
        return
    wrote = read_train_state(w.resume_dir)["config"]
    change = (f"tensor_parallel: {w.resumed_from} was written at tensor_parallel={w.resume_tensor_parallel}, "
              f"this run has {cfg.tensor_parallel}")
    if cfg.pipeline_stages > 1 or wrote.get("pipeline_stages", 1) > 1:
        raise ValueError(f"{change}; with pipeline_stages a run resumes only at the tensor_parallel it was "
                         "written at (start a new run with init_from the checkpoint instead)")
    if wrote.get("zero_stage") == 0:
        raise ValueError(f"{change}; changing it goes through DeepSpeed's universal checkpoint, which needs "
                         "ZeRO stage 1-3 shards, and this checkpoint has ZeRO-0's (start a new run with init_from "
                         "the checkpoint instead)")


def setup(config: dict) -> Run:
    cfg = PretrainConfig.model_validate(config["cfg"])
    mcfg = ModelConfig.model_validate(config["model"])
    w = start_worker(cfg, cfg.tensor_parallel)
    placed_tensor_parallel(cfg)
    check_resume_layout(cfg, w)
    engine = build_engine_for(cfg, mcfg, w)
    resume(engine, w, cfg.seed)
    record_start(cfg.output, w, engine)
    data_dir = storage.stage_local(cfg.data)
    manifest = config["manifest"]
    return Run(cfg=cfg, mcfg=mcfg, config=config, w=w, engine=engine,
               train=ShardLoader(data_dir, manifest, "train", cfg.seed),
               val=ShardLoader(data_dir, manifest, "val", cfg.seed),
               log=RunLog(cfg.output, w.history) if w.rank == 0 else None)


def train_step(run: Run) -> tuple[float, float]:
    """One optimizer step over the global batch of step `run.w.step`: (mean loss, gradient norm)."""
    cfg, engine, w = run.cfg, run.engine, run.w
    if run.pipelined:  # the schedule runs all micro-batches; its loss is the global-batch mean on every rank
        loss = pipeline.pipeline_train_step(
            engine, pipeline.micro_batches(engine, run.train, w.step, cfg.global_batch_size, cfg.micro_batch_size))
        return loss, float(engine.get_global_grad_norm() or 0.0)
    # DeepSpeed records the gradient norm for its ZeRO and mixed-precision optimizers, not for a
    # plain fp32 one (ZeRO-0 on CPU), whose gradients are whole on every rank: measure it here.
    own_grad_norm = cfg.zero_stage == 0 and not use_bf16(cfg)
    grad_accum = cfg.grad_accum_for(w.world)
    dp_rank, dp = run.data_parallel
    loss_sum, grad_norm = 0.0, 0.0
    for m in range(grad_accum):
        x, y = run.train.micro_batch(w.step, cfg.global_batch_size, dp_rank, dp, m, cfg.micro_batch_size)
        _, loss = engine(x.to(w.device), y.to(w.device))
        engine.backward(loss)
        if own_grad_norm and m == grad_accum - 1:  # the boundary: gradients are all-reduced, not yet clipped
            grad_norm = whole_grad_norm(engine, cfg.tensor_parallel)
        engine.step()
        loss_sum += float(loss.detach())
    # the tp workers of a replica computed the same losses: the mean over all workers is the same
    total = all_reduce_sum([loss_sum])[0] / (w.world * grad_accum)
    return total, grad_norm if own_grad_norm else float(engine.get_global_grad_norm() or 0.0)


def whole_grad_norm(engine, tensor_parallel: int) -> float:
    """The global gradient norm of a ZeRO-0 engine's whole gradients. Under tensor parallelism a
    rank holds a slice of each split weight's gradient (their squares add up over the TP group)
    and a whole copy of every other one (counted on TP rank 0 only)."""
    grads = [p for p in engine.module.parameters() if p.grad is not None]
    if tensor_parallel == 1:
        return float(torch.nn.utils.get_total_norm([p.grad for p in grads]))
    import torch.distributed as dist
    from deepspeed.utils import groups

    first = groups.get_tensor_model_parallel_rank() == 0
    counted = [p.grad for p in grads if first or getattr(p, "tensor_model_parallel", False)]
    square = torch.zeros((), dtype=torch.float64)
    for g in counted:
        square += g.detach().double().pow(2).sum()
    dist.all_reduce(square, group=groups.get_tensor_model_parallel_group())
    return float(square.sqrt())


def evaluate(run: Run) -> float:
    """Mean loss over the first eval_batches global batches of the val split, in file order."""
    cfg, engine, w = run.cfg, run.engine, run.w
    if run.pipelined:
        return pipeline.pipeline_eval_loss(engine, run.val, cfg.eval_batches, cfg.global_batch_size,
                                           cfg.micro_batch_size)
    engine.eval()
    total = [0.0, 0.0]
    dp_rank, dp = run.data_parallel
    per_rank = cfg.global_batch_size // dp
    with torch.no_grad():
        for b in range(cfg.eval_batches):
            for m in range(0, per_rank, cfg.micro_batch_size):
                rows = run.val.rows(b * cfg.global_batch_size + dp_rank * per_rank + m, cfg.micro_batch_size,
                                    shuffle=False)
                _, loss = engine(rows[:, :-1].to(w.device), rows[:, 1:].to(w.device))
                total = [total[0] + loss.item() * rows.size(0), total[1] + rows.size(0)]
    engine.train()
    loss_sum, n = all_reduce_sum(total)  # tp copies of each replica's rows: numerator and count alike
    return loss_sum / n


def step_record(run: Run, loss: float, grad_norm: float, seconds: float) -> dict:
    cfg, w = run.cfg, run.w
    tokens_per_step = cfg.global_batch_size * run.config["manifest"]["seq_len"]
    tps = tokens_per_step / seconds
    rec = {"step": w.step, "loss": loss, "lr": lr_at(w.step - 1, cfg), "grad_norm": grad_norm,
           "tokens_per_s": tps, "tokens": w.step * tokens_per_step, "world_size": w.world,
           "memory_gib": memory_gib(w.device)}
    peak = peak_flops(w.device)
    if peak:
        rec["mfu"] = run.mcfg.flops_per_token(run.config["manifest"]["seq_len"]) * tps / (w.world * peak)
    return rec


def save(run: Run, rec: dict) -> None:
    """A checkpoint of this step (collective), reported to Ray Train with the step's metrics."""
    cfg, w = run.cfg, run.w
    weights = pipeline.stage_state_dict(run.engine) if run.pipelined else gather_weights(run.engine, run.mcfg.tie_embeddings)
    state = {"kind": "pretrain", "data_cursor": w.step * cfg.global_batch_size, "config": cfg.resolved(),
             "model": run.mcfg.model_dump(mode="json"), "tokenizer_sha256": run.config["manifest"]["tokenizer_sha256"],
             "data_manifest_sha256": run.config["manifest_sha256"], "metrics": rec}
    save_and_report(run.engine, w, rec, {WEIGHTS: weights} if w.rank == 0 else None, state,
                    run.config["tokenizer_json"])
    if run.log:
        run.log.flush()


def log_progress(run: Run, rec: dict) -> None:
    if run.log is None:
        return
    if rec["step"] % 10 == 0 or "val_loss" in rec or rec["step"] == 1:
        bar = "#" * int(30 * rec["step"] / run.cfg.max_steps)
        shown = f" val {rec['val_loss']:.4f}" if "val_loss" in rec else ""
        print(f"[{bar:<30}] step {rec['step']}/{run.cfg.max_steps} loss {rec['loss']:.4f}{shown} "
              f"{rec['tokens_per_s']:.0f} tok/s", flush=True)


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    run = setup(config)
    cfg, w = run.cfg, run.w
    run.engine.train()
    while w.step < cfg.max_steps:
        t0 = time.perf_counter()
        loss, grad_norm = train_step(run)
        if not math.isfinite(loss):
            ray.train.report({"step": w.step + 1, "loss": loss, "diverged": True})
        check_finite(loss, w.step + 1)
        w.step += 1
        rec = step_record(run, loss, grad_norm, time.perf_counter() - t0)
        if is_due(w.step, cfg.eval_every, cfg.max_steps):
            rec["val_loss"] = evaluate(run)
            rec["val_ppl"] = math.exp(min(rec["val_loss"], 50))
        if run.log:
            run.log.add(rec)
        else:
            w.history.append(rec)
        log_progress(run, rec)
        if is_due(w.step, cfg.checkpoint_every, cfg.max_steps):
            save(run, rec)
        elif "val_loss" in rec:
            ray.train.report(rec)
    finish_worker(w)
