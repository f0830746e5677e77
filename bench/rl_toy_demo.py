"""The RL learning figures of docs/posttrain.md on the test suite's toy task, longer than the tests:
GRPO (split placement, 2 rollout actors) and PPO (a jobs.reward model, critic from it), both from
the same warm start, then the curves (bench/rl_curves.py).

The task (tests/test_rl.py): "first of: w1 w2 w3" -> "w1" over ten words; the warm start was
fine-tuned to answer with any word of the prompt, so it is right about a third of the time.

    python bench/rl_toy_demo.py --out runs/rl-toy --iterations 30
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/rl-toy")
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--eval-items", type=int, default=500)
    p.add_argument("--figures", default="docs", help="where rl-grpo.png and rl-ppo.png go")
    args = p.parse_args()
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray

    from jobs.posttrain.config import RewardConfig, RLConfig
    from jobs.reward import run as reward
    from jobs.rl import run as rl
    from test_rl import build_toy

    out = Path(args.out).resolve()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    toy = build_toy(out / "toy", n_eval=args.eval_items)
    common = dict(init_from=toy["init"], data=toy["train"], eval_file=toy["eval"], prompts_per_iteration=16,
                  samples_per_prompt=8, global_batch_size=64, micro_batch_size=32, max_new_tokens=4,
                  max_steps=args.iterations, eval_every=10, checkpoint_every=args.iterations)
    rl(RLConfig(algorithm="grpo", output=str(out / "grpo"), num_workers=2, zero_stage=2, rollout_workers=2,
                rollout_cpus=0.5, lr=1e-3, kl_coef=0.0, **common))
    reward(RewardConfig(init_from=toy["init"], data=toy["pairs"], output=str(out / "reward"), num_workers=1,
                        zero_stage=0, global_batch_size=32, micro_batch_size=32, max_steps=150, lr=1e-3,
                        warmup_steps=5, checkpoint_every=150))
    rl(RLConfig(algorithm="ppo", reward_path=str(out / "reward"), output=str(out / "ppo"), num_workers=1,
                zero_stage=1, lr=5e-4, critic_lr=1e-2, kl_coef=0.05, ppo_epochs=2, **common))
    ray.shutdown()
    subprocess.run([sys.executable, str(ROOT / "bench" / "rl_curves.py"), "--grpo", str(out / "grpo"),
                    "--ppo", str(out / "ppo"), "--out", args.figures], check=True)


if __name__ == "__main__":
    main()
