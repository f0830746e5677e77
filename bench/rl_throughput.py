"""RL throughput (jobs.rl): rollout tokens/s, training tokens/s and weight-sync seconds per
iteration, with rollouts colocated in the training workers and split into a Ray actor pool.

Both placements run the same GRPO config (the same prompts, samples, batch and iterations) one
after the other on one local Ray; each reads its run's metrics.jsonl and reports the median over
the iterations after the first (which pays for start-up). The model and prompts are the test
suite's toy task (tests/test_rl.py: a 2-layer d_model 64 chat model, "first of: w1 w2 w3"), or
any checkpoint and prompt file given with --init / --data.

    python bench/rl_throughput.py                                   # toy, 2 workers, 8 iterations
    python bench/rl_throughput.py --init runs/rl/sft --data runs/rl/tasks/rl_train.jsonl --max-new-tokens 8
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the toy task of tests/test_rl.py

KEYS = ("rollout_tokens_per_s", "train_tokens_per_s", "sync_s", "rollout_s", "update_s", "iteration_s")


def run_placement(name: str, base: dict, rollout_workers: int, out: Path) -> dict:
    from jobs.posttrain.config import RLConfig
    from jobs.rl import run

    cfg = RLConfig.model_validate({**base, "output": str(out / name), "rollout_workers": rollout_workers})
    t0 = time.perf_counter()
    run(cfg)
    wall = time.perf_counter() - t0
    recs = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines() if x]
    recs = [r for r in recs if r["step"] > 1]
    return {"placement": name, "rollout_workers": rollout_workers, "iterations": len(recs) + 1, "wall_s": round(wall, 1),
            **{k: round(statistics.median(r[k] for r in recs), 4) for k in KEYS}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", help="checkpoint to start from (default: the toy model of tests/test_rl.py)")
    p.add_argument("--data", help="RL prompt file (default: the toy prompts)")
    p.add_argument("--workers", type=int, default=2, help="training workers")
    p.add_argument("--rollout-workers", type=int, default=2, help="rollout actors in the split placement")
    p.add_argument("--rollout-cpus", type=float, default=1.0)
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--prompts", type=int, default=16, help="prompts per iteration")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="rl-bench-"))
    if args.init is None:
        from test_rl import build_toy

        toy = build_toy(tmp / "toy")
        init, data = toy["init"], toy["train"]
    else:
        init, data = args.init, args.data
    rollout = args.prompts * args.samples
    base = {"algorithm": "grpo", "init_from": init, "data": data, "num_workers": args.workers, "zero_stage": 2,
            "rollout_cpus": args.rollout_cpus, "prompts_per_iteration": args.prompts, "samples_per_prompt": args.samples,
            "global_batch_size": rollout // 2, "micro_batch_size": rollout // (2 * args.workers),
            "max_new_tokens": args.max_new_tokens, "max_steps": args.iterations, "lr": 1e-4, "kl_coef": 0.0,
            "checkpoint_every": args.iterations}
    results = [run_placement("colocated", base, 0, tmp), run_placement("split", base, args.rollout_workers, tmp)]
    info = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "command": " ".join(sys.argv), "config": base, "results": results}
    print(json.dumps(info, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2) + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()
