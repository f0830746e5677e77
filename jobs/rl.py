"""RL: GRPO with verifiable rewards, or PPO (RLHF) against a jobs.reward model, on Ray.

    python -m jobs.rl --config configs/rl-demo.yaml

Prompts are JSONL, one per line: {"prompt": "..."} or {"messages": [...]}, with "answer" and
"match" ("exact" or "number", the checks jobs.evaluate scores with) for rule-based rewards. The
loop (jobs.posttrain.rl) runs on Ray Train workers with DeepSpeed; rollouts run in the workers
(`rollout_workers: 0`, colocated) or in a pool of Ray actors that receive the new weights after
every update (split). Checkpoints have pretraining's layout (the actor in model.safetensors, a
PPO critic in critic.safetensors), so generate/evaluate/export/serve load them.
"""

from __future__ import annotations

from jobs.config import main
from jobs.data.chat import read_records
from jobs.posttrain.config import RLConfig
from jobs.posttrain.rl import PromptItem, train_loop_per_worker
from jobs.posttrain.worker import absolute_paths, fit, loop_config, resolve_init
from jobs.report import write_report

__all__ = ["RLConfig", "run"]


def check_prompts(cfg: RLConfig) -> tuple[int, int]:
    """Read the prompt files on the driver, so a bad line fails before any worker starts."""
    train = read_records(cfg.data, PromptItem)
    if cfg.algorithm == "grpo" and (missing := next((i for i, x in enumerate(train) if x.answer is None), None)) \
            is not None:
        raise ValueError(f"data: {cfg.data}:{missing + 1}: GRPO's reward checks an \"answer\"; this prompt has none")
    evals = read_records(cfg.eval_file, PromptItem) if cfg.eval_file else []
    if (missing := next((i for i, x in enumerate(evals) if x.answer is None), None)) is not None:
        raise ValueError(f"eval_file: {cfg.eval_file}:{missing + 1}: held-out prompts need an \"answer\"")
    return len(train), len(evals)


def run(cfg: RLConfig) -> dict:
    from jobs.checkpoint.load import load_tokenizer_of
    from model.tokenizer import tokenizer_sha256

    cfg = absolute_paths(cfg)
    init_dir = resolve_init(cfg.init_from)
    config = loop_config(cfg, init_dir)
    max_len = cfg.max_seq_len or config["model"]["max_seq_len"]
    if cfg.max_new_tokens >= max_len:
        raise ValueError(f"max_new_tokens ({cfg.max_new_tokens}) leaves no room for a prompt in {max_len} tokens")
    config["reference"] = resolve_init(cfg.reference_path) if cfg.reference_path else init_dir
    if cfg.algorithm == "ppo":
        config["reward"] = resolve_init(cfg.reward_path)
        if tokenizer_sha256(load_tokenizer_of(config["reward"])) != config["tokenizer_sha256"]:
            raise ValueError(f"reward_path: {cfg.reward_path} was trained with another tokenizer than init_from")
    n_train, n_eval = check_prompts(cfg)
    placement = f"split, {cfg.rollout_workers} rollout actors" if cfg.rollout_workers else "colocated"
    print(f"rl ({cfg.algorithm}): {n_train} prompts, {n_eval} held out; {cfg.max_steps} iterations of "
          f"{cfg.prompts_per_iteration} prompts x {cfg.samples_per_prompt} samples; {cfg.num_workers} workers, "
          f"rollouts {placement}; from {init_dir}")
    summary = fit(cfg, train_loop_per_worker, config)
    print(f"report: {write_report(cfg.output)}")
    return summary


if __name__ == "__main__":
    main(RLConfig, run)
