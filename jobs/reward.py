"""Reward model: the base model with a scalar head, trained on preference pairs (Bradley-Terry).

    python -m jobs.reward --config configs/posttrain-demo.yaml

Same pairs JSONL as jobs.dpo. Pairwise accuracy on `eval_file` is logged every `eval_every`
steps and reported at the end. The model and loop are jobs.posttrain.reward.
"""

from __future__ import annotations

from jobs.config import main
from jobs.posttrain.config import RewardConfig
from jobs.posttrain.dpo import load_pairs
from jobs.posttrain.reward import train_loop_per_worker
from jobs.posttrain.worker import absolute_paths, fit, loop_config, resolve_init
from jobs.report import write_report

__all__ = ["RewardConfig", "run"]


def run(cfg: RewardConfig) -> dict:
    from model.tokenizer import load_tokenizer

    cfg = absolute_paths(cfg)
    init_dir = resolve_init(cfg.init_from)
    config = loop_config(cfg, init_dir)
    tok = load_tokenizer(config["tokenizer_json"])
    max_len = (cfg.max_seq_len or config["model"]["max_seq_len"]) - 1
    n_train = len(load_pairs(cfg.data, tok, max_len))
    n_eval = len(load_pairs(cfg.eval_file, tok, max_len)) if cfg.eval_file else 0
    print(f"reward: {n_train} pairs, {n_eval} held out; from {init_dir}")
    summary = fit(cfg, train_loop_per_worker, config)
    print(f"report: {write_report(cfg.output)}")
    if "eval_accuracy" in summary["metrics"]:
        m = summary["metrics"]
        print(f"held-out pairwise accuracy: {m['eval_accuracy']:.3f} on {m['eval_pairs']} pairs")
    return summary


if __name__ == "__main__":
    main(RewardConfig, run)
