"""Training throughput of the pretraining paths on Ray Train: single process, ZeRO-0, ZeRO-3, pipeline,
tensor parallelism.

Every mode trains the same model on the same global batch of random tokens (data loading is not
what is measured) with the engines pretraining builds (jobs.train.engine, jobs.train.pipeline):

  single   plain torch on one process (rank 0, one worker's CPUs), AdamW, grad accumulation
  zero0    DeepSpeed ZeRO-0 (plain data parallel) on every worker, jobs.train.engine.build_engine
  zero3    the same with ZeRO-3 (parameters, gradients and optimizer state partitioned)
  pp       jobs.train.pipeline.pipeline_engine: 2 pipeline stages, ZeRO-0
  tp       jobs.train.engine.build_engine with tensor_parallel 2 (DeepSpeed AutoTP): both workers split
           every block and read the same micro-batches, ZeRO-0

One TorchTrainer runs them all: each worker builds every engine once, then the modes take turns,
round by round, so that load from other jobs on a shared machine lands on all of them alike.
Reports the median step time and tokens/s; on CUDA (one GPU, bf16, DeepSpeed's engine as
pretraining runs it) also MFU = flops_per_token * tokens/s / peak bf16 FLOP/s.

    python bench/train_throughput.py                                   # tiny llama, 2 CPU workers
    python bench/train_throughput.py --preset gpt2-124m llama-1b --json out.json   # on a GPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))

from jobs.train.config import PretrainConfig  # noqa: E402
from model import ModelConfig  # noqa: E402
from train_step import peak_flops  # noqa: E402

CPU_MODES = ("single", "zero0", "zero3", "pp", "tp")


def synthetic_batch(step: int, dp_rank: int, micro: int, micro_size: int, seq: int, vocab: int):
    """Random rows, a function of (step, data-parallel rank, micro-batch) only."""
    g = torch.Generator().manual_seed(((step * 1009) + dp_rank) * 1009 + micro)
    rows = torch.randint(0, vocab, (micro_size, seq + 1), generator=g)
    return rows[:, :-1], rows[:, 1:]


def worker(config: dict) -> None:
    import ray.train
    import torch.distributed as dist

    from jobs.train.engine import build_engine
    from jobs.train.pipeline import pipeline_engine, pipeline_train_step
    from model import GPT

    cfg = PretrainConfig.model_validate(config["cfg"])
    mcfg = ModelConfig.model_validate(config["model"])
    seq, modes, rounds, warmup, steps = config["seq"], config["modes"], config["rounds"], config["warmup"], config["steps"]
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    torch.set_num_threads(cfg.cpus_per_worker)
    G, mb = cfg.global_batch_size, cfg.micro_batch_size

    def zero_engine(stage: int, tensor_parallel: int = 1):
        torch.manual_seed(cfg.seed)
        model = GPT(mcfg)
        run_cfg = cfg.model_copy(update={"zero_stage": stage, "tensor_parallel": tensor_parallel})
        engine = build_engine(run_cfg, model, model.optim_groups(cfg.weight_decay), dist.get_world_size())
        replica = rank // tensor_parallel  # the tensor-parallel ranks of a replica read the same rows

        def step(s: int) -> None:
            for m in range(run_cfg.grad_accum_for(dist.get_world_size())):
                x, y = synthetic_batch(s, replica, m, mb, seq, mcfg.vocab_size)
                _, loss = engine(x.to(device), y.to(device))
                engine.backward(loss)
                engine.step()
        return step

    def single_engine():
        torch.manual_seed(cfg.seed)
        model = GPT(mcfg).to(device).train()
        opt = torch.optim.AdamW(model.optim_groups(cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                eps=1e-8, fused=False)
        n_micro = G // mb

        def step(s: int) -> None:
            if rank == 0:  # one process with one worker's CPUs; the others wait at the barrier
                opt.zero_grad(set_to_none=True)
                for m in range(n_micro):
                    x, y = synthetic_batch(s, 0, m, mb, seq, mcfg.vocab_size)
                    _, loss = model(x.to(device), y.to(device))
                    (loss / n_micro).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
            dist.barrier()
        return step

    def pp_engine():
        engine = pipeline_engine(cfg.model_copy(update={"pipeline_stages": 2, "zero_stage": 0}), mcfg)

        def step(s: int) -> None:
            d = engine.grid.data_parallel_id
            batches = (synthetic_batch(s, d, m, mb, seq, mcfg.vocab_size) for m in range(engine.gradient_accumulation_steps()))
            pipeline_train_step(engine, batches)
        return step

    build = {"single": single_engine, "zero0": lambda: zero_engine(0), "zero3": lambda: zero_engine(3), "pp": pp_engine,
             "tp": lambda: zero_engine(0, tensor_parallel=2)}
    # tp last: its engine points DeepSpeed's process-global groups at its (data, tensor) mesh, which
    # the engines built before it have already captured theirs from
    runners = {mode: build[mode]() for mode in sorted(modes, key=lambda mode: mode == "tp")}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    times = {mode: [] for mode in modes}
    s = 0
    for mode in modes:
        for _ in range(warmup):
            runners[mode](s)
            s += 1
    for _ in range(rounds):
        for mode in modes:
            for _ in range(steps):
                sync()
                t0 = time.perf_counter()
                runners[mode](s)
                sync()
                times[mode].append(time.perf_counter() - t0)
                s += 1
    if rank == 0:
        Path(config["out"]).write_text(json.dumps(times))


def run_preset(name: str, args) -> list[dict]:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    gpu = torch.cuda.is_available()
    seq = args.seq or (1024 if gpu else 256)
    mcfg = ModelConfig.preset(name)
    workers = 1 if gpu else 2
    modes = ["zero0"] if gpu else list(args.modes)
    cfg = PretrainConfig(
        data="synthetic", output="unused", num_workers=workers, use_gpu=gpu, cpus_per_worker=args.cpus_per_worker,
        zero_stage=0, global_batch_size=args.global_batch, micro_batch_size=args.micro_batch, max_steps=10_000,
        warmup_steps=10, seed=0)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "times.json"
        TorchTrainer(
            worker,
            train_loop_config={"cfg": cfg.model_dump(mode="json"), "model": mcfg.model_dump(mode="json"), "seq": seq,
                               "modes": modes, "rounds": args.rounds, "warmup": args.warmup, "steps": args.steps,
                               "out": str(out)},
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpu,
                                                   resources_per_worker={"CPU": args.cpus_per_worker}),
            run_config=ray.train.RunConfig(name="throughput", storage_path=str(Path(d) / "ray"), worker_runtime_env={
                "env_vars": {"OMP_NUM_THREADS": str(args.cpus_per_worker), "PYTHONWARNINGS": "ignore"}}),
        ).fit()
        times = json.loads(out.read_text())
    peak = peak_flops(torch.cuda.get_device_name()) if gpu else None
    flops_tok = mcfg.flops_per_token(seq)
    results = []
    for mode in modes:
        med = statistics.median(times[mode])
        tok_s = args.global_batch * seq / med
        results.append({
            "preset": name, "mode": mode, "workers": 1 if mode == "single" else workers, "global_batch": args.global_batch,
            "micro_batch": args.micro_batch, "seq": seq, "dtype": "bf16" if gpu else "fp32",
            "params": mcfg.num_params(), "step_s_median": med, "step_s_min": min(times[mode]),
            "step_s_max": max(times[mode]), "n_steps": len(times[mode]), "tokens_per_s": tok_s,
            "mfu": flops_tok * tok_s / peak if peak else None,
        })
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", nargs="+", default=None,
                   help="model presets (default: tiny on CPU, gpt2-124m and llama-1b on a GPU)")
    p.add_argument("--modes", nargs="+", default=list(CPU_MODES), choices=CPU_MODES, help="CPU modes to time")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 256 on CPU, 1024 on a GPU)")
    p.add_argument("--global-batch", type=int, default=16, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per forward/backward on one worker")
    p.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs (and torch threads) per Ray worker")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds over the modes")
    p.add_argument("--steps", type=int, default=2, help="timed optimizer steps per mode per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps per mode first")
    p.add_argument("--json", type=Path, help="write results and machine details here")
    args = p.parse_args(argv)

    import ray

    gpu = torch.cuda.is_available()
    presets = args.preset or (["gpt2-124m", "llama-1b"] if gpu else ["tiny"])
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if not ray.is_initialized():
        # A fresh local instance, never a cluster someone else started on this machine.
        # 4 logical CPUs at least, as cluster.ray_utils.init_ray gives: 2 workers plus the Train controller.
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    meta = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", "bench/train_throughput.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name() if gpu else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version(),
    }
    results = []
    for name in presets:
        results += run_preset(name, args)
    for r in results:
        mfu = f"  MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
        print(f"{r['preset']:>10} {r['mode']:>6}  {r['workers']} worker(s)  step {r['step_s_median'] * 1e3:8.1f} ms "
              f"(min {r['step_s_min'] * 1e3:.0f}, max {r['step_s_max'] * 1e3:.0f}, n={r['n_steps']})  "
              f"{r['tokens_per_s']:10,.0f} tokens/s{mfu}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
