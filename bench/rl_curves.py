"""Learning curves of jobs.rl runs as PNGs, and held-out accuracy before/after with a Wilson 95%
interval: the figures of docs/posttrain.md ("Reinforcement learning").

    python bench/rl_curves.py --grpo runs/rl/grpo --ppo runs/rl/ppo --out docs

Writes rl-grpo.png (training reward and held-out accuracy per iteration) and rl-ppo.png (mean
reward, held-out reward, the rule-checked accuracy of the same samples, and KL to the reference), and prints the before/after table in Markdown.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def records(run: str) -> list[dict]:
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines() if x]


def series(recs: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in recs if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def before_after(name: str, recs: list[dict]) -> str:
    evals = [r for r in recs if "eval_correct" in r]
    rows = []
    for label, r in (("before (iteration 0)", evals[0]), (f"after (iteration {evals[-1]['step']})", evals[-1])):
        lo, hi = wilson(r["eval_correct"], r["eval_items"])
        rows.append(f"| {name} {label} | {r['eval_correct']}/{r['eval_items']} | {r['eval_accuracy']:.3f} | "
                    f"[{lo:.3f}, {hi:.3f}] |")
    return "\n".join(rows)


def plot_grpo(recs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.plot(*series(recs, "reward_mean"), label="training reward (mean of samples)", lw=1)
    x, y = series(recs, "eval_accuracy")
    ax.plot(x, y, "o-", label="held-out accuracy (greedy)")
    for xi, r in zip(x, [r for r in recs if "eval_correct" in r]):
        lo, hi = wilson(r["eval_correct"], r["eval_items"])
        ax.plot([xi, xi], [lo, hi], color="C1", lw=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward / accuracy")
    ax.set_title("GRPO")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_ppo(recs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(8.4, 3.2))
    a.plot(*series(recs, "reward_mean"), label="training reward (reward model)", lw=1)
    a.plot(*series(recs, "eval_reward"), "o-", label="held-out reward (greedy)")
    a.set_xlabel("iteration")
    a.set_title("PPO: reward")
    a.legend(fontsize=8, loc="upper left")
    acc = a.twinx()  # what the reward model is meant to stand for: is the answer right?
    acc.plot(*series(recs, "accuracy"), color="C2", lw=1, ls="--", label="answer accuracy (rule check)")
    acc.set_ylim(0, 1)
    acc.legend(fontsize=8, loc="lower right")
    b.plot(*series(recs, "kl"), label="KL to reference (nats/sequence)")
    b.set_xlabel("iteration")
    b.set_title("PPO: KL")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grpo")
    p.add_argument("--ppo")
    p.add_argument("--out", default="docs")
    args = p.parse_args()
    out = Path(args.out)
    print("| run | correct | accuracy | Wilson 95% |\n|---|---:|---:|---|")
    if args.grpo:
        recs = records(args.grpo)
        plot_grpo(recs, out / "rl-grpo.png")
        print(before_after("GRPO", recs))
    if args.ppo:
        recs = records(args.ppo)
        plot_ppo(recs, out / "rl-ppo.png")
        print(before_after("PPO", recs))


if __name__ == "__main__":
    main()
