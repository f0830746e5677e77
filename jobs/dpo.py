"""DPO: direct preference optimisation against a frozen reference, on Ray Train with DeepSpeed.

    python -m jobs.dpo --config configs/posttrain-demo.yaml

Data is JSONL of preference pairs, one per line:

    {"prompt": "Who speaks next? ...", "chosen": "HERMIA", "rejected": "THESEUS"}

(`prompt` may also be a list of chat messages.) The loop is jobs.posttrain.dpo.
"""

from __future__ import annotations

from jobs.checkpoint.load import load_tokenizer_of
from jobs.config import main
from jobs.posttrain.config import DPOConfig
from jobs.posttrain.dpo import load_pairs, train_loop_per_worker
from jobs.posttrain.worker import absolute_paths, fit, loop_config, resolve_init
from jobs.report import write_report

__all__ = ["DPOConfig", "run"]


def run(cfg: DPOConfig) -> dict:
    from model.tokenizer import load_tokenizer

    cfg = absolute_paths(cfg)
    init_dir = resolve_init(cfg.init_from)
    ref_dir = resolve_init(cfg.reference_path) if cfg.reference_path else init_dir
    config = loop_config(cfg, init_dir)
    if load_tokenizer_of(ref_dir).to_str() != config["tokenizer_json"]:
        raise ValueError(f"reference_path: {ref_dir} has a different tokenizer than init_from {init_dir}")
    tok = load_tokenizer(config["tokenizer_json"])
    max_len = cfg.max_seq_len or config["model"]["max_seq_len"]
    n_train = len(load_pairs(cfg.data, tok, max_len))
    n_eval = len(load_pairs(cfg.eval_file, tok, max_len)) if cfg.eval_file else 0
    print(f"dpo: {n_train} pairs, {n_eval} held out, beta {cfg.beta}; policy {init_dir}, reference {ref_dir}")
    summary = fit(cfg, train_loop_per_worker, {**config, "reference": ref_dir})
    print(f"report: {write_report(cfg.output)}")
    return summary


if __name__ == "__main__":
    main(DPOConfig, run)
