"""SFT: supervised fine-tuning of a base model on chat conversations, on Ray Train with DeepSpeed.

    python -m jobs.sft --config configs/posttrain-demo.yaml

Data is JSONL in the messages format, one conversation per line:

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

Each conversation is rendered with the chat template of jobs.chat; only assistant tokens carry
loss. Batches are padded (not packed): every row is one conversation, so no example ever attends
to another. Checkpoints have pretraining's format, so generate/evaluate/export/serve load them.
"""

from __future__ import annotations

from typing import Literal

from jobs.chat import PostTrainConfig
from jobs.config import main


class SFTConfig(PostTrainConfig):
    """Supervised fine-tuning on chat conversations (loss on assistant tokens only)."""

    kind: Literal["sft"] = "sft"


def load_examples(uri: str, tok, max_len: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Tokenized (inputs, targets) of every conversation in a JSONL file, and how many were truncated."""
    from jobs.chat import Conversation, read_records, sft_example

    rows, truncated = [], 0
    for conv in read_records(uri, Conversation):
        x, y, cut = sft_example(tok, conv, max_len)
        rows.append((x, y))
        truncated += cut
    return rows, truncated


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import torch

    from jobs import chat
    from model.tokenizer import load_tokenizer

    cfg = SFTConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.cpus_per_worker)
    device = ray.train.torch.get_device()

    model, _, _ = chat.load_model(config["init_from"])
    tok = load_tokenizer(config["tokenizer_json"])
    pad_id = chat.special_ids(tok)["pad"]
    max_len = cfg.max_seq_len or model.cfg.max_seq_len
    train, _ = load_examples(cfg.data, tok, max_len)
    evals = load_examples(cfg.eval_file, tok, max_len)[0] if cfg.eval_file else []
    engine = chat.make_engine(cfg, model, model.optim_groups(cfg.weight_decay))
    step, history = chat.restore(engine)

    def evaluate() -> float:
        """Mean loss per assistant token over the held-out conversations."""
        engine.eval()
        total_nll, total_tokens = 0.0, 0.0
        with torch.no_grad():
            mine = evals[rank::world]
            for i in range(0, len(mine), cfg.micro_batch_size):
                x, y = chat.pad_batch(mine[i : i + cfg.micro_batch_size], pad_id)
                _, loss = engine(x.to(device), y.to(device))
                n = int((y != chat.IGNORE).sum())
                total_nll += float(loss) * n
                total_tokens += n
        engine.train()
        nll, n = chat.all_reduce_sum([total_nll, total_tokens])
        return nll / max(n, 1)

    engine.train()
    while step < cfg.max_steps:
        loss_sum = 0.0
        for m in range(cfg.grad_accum):
            rows = [train[i] for i in chat.batch_indices(len(train), step, cfg, rank, world, m)]
            x, y = chat.pad_batch(rows, pad_id)
            _, loss = engine(x.to(device), y.to(device))
            engine.backward(loss)
            engine.step()
            loss_sum += float(loss.detach())
        loss_mean = chat.all_reduce_sum([loss_sum])[0] / (world * cfg.grad_accum)
        chat.check_finite(loss_mean, step + 1)
        step += 1
        rec = {"step": step, "loss": loss_mean, "lr": engine.get_lr()[0],
               "grad_norm": float(engine.get_global_grad_norm() or 0.0)}
        if evals and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            rec["eval_loss"] = evaluate()
        chat.finish_step(cfg, engine, config, rank, history, rec)


def run(cfg: SFTConfig) -> dict:
    from jobs import chat
    from model.tokenizer import load_tokenizer

    cfg = chat.absolute_paths(cfg)
    init_dir = chat.resolve_init(cfg.init_from)
    config = chat.loop_config(cfg, init_dir)
    tok = load_tokenizer(config["tokenizer_json"])
    max_len = cfg.max_seq_len or config["model"]["max_seq_len"]
    # Validate and count on the driver, so a bad line fails before any worker starts.
    rows, truncated = load_examples(cfg.data, tok, max_len)
    n_eval = len(load_examples(cfg.eval_file, tok, max_len)[0]) if cfg.eval_file else 0
    print(f"sft: {len(rows)} conversations ({truncated} truncated to {max_len} tokens), {n_eval} held out; "
          f"{sum(sum(t != chat.IGNORE for t in y) for _, y in rows)} assistant tokens; from {init_dir}")
    return chat.fit(cfg, train_loop_per_worker, config)


if __name__ == "__main__":
    main(SFTConfig, run)
