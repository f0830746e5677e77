"""SFT: supervised fine-tuning on chat conversations, the loop of every Ray Train worker.

Each conversation is rendered with the chat template (jobs.data.chat); only assistant tokens
carry loss. Batches are padded (not packed): every row is one conversation, so no example ever
attends to another.
"""

from __future__ import annotations

import torch

from jobs.checkpoint.load import load_model
from jobs.data.chat import IGNORE, Conversation, pad_batch, read_records, sft_example, special_ids
from jobs.posttrain.config import SFTConfig
from jobs.posttrain.worker import PostTrainRun, batch_indices, finish_step, start
from jobs.train.worker import all_reduce_sum, check_finite, finish_worker, is_due


def load_examples(uri: str, tok, max_len: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Tokenized (inputs, targets) of every conversation in a JSONL file, and how many were truncated."""
    rows, truncated = [], 0
    for conv in read_records(uri, Conversation):
        x, y, cut = sft_example(tok, conv, max_len)
        rows.append((x, y))
        truncated += cut
    return rows, truncated


def evaluate(run: PostTrainRun, evals: list, pad_id: int) -> float:
    """Mean loss per assistant token over the held-out conversations."""
    w, engine = run.w, run.engine
    engine.eval()
    total_nll, total_tokens = 0.0, 0.0
    with torch.no_grad():
        mine = evals[w.rank::w.world]
        for i in range(0, len(mine), run.cfg.micro_batch_size):
            x, y = pad_batch(mine[i : i + run.cfg.micro_batch_size], pad_id)
            _, loss = engine(x.to(w.device), y.to(w.device))
            n = int((y != IGNORE).sum())
            total_nll += float(loss) * n
            total_tokens += n
    engine.train()
    nll, n = all_reduce_sum([total_nll, total_tokens])
    return nll / max(n, 1)


def train_step(run: PostTrainRun, train: list, pad_id: int) -> float:
    cfg, w, engine = run.cfg, run.w, run.engine
    loss_sum = 0.0
    grad_accum = cfg.grad_accum_for(w.world)
    for m in range(grad_accum):
        rows = [train[i] for i in batch_indices(len(train), w.step, cfg, w.rank, w.world, m)]
        x, y = pad_batch(rows, pad_id)
        _, loss = engine(x.to(w.device), y.to(w.device))
        engine.backward(loss)
        engine.step()
        loss_sum += float(loss.detach())
    return all_reduce_sum([loss_sum])[0] / (w.world * grad_accum)


def train_loop_per_worker(config: dict) -> None:
    from model.tokenizer import load_tokenizer

    cfg = SFTConfig.model_validate(config["cfg"])
    model, _, _ = load_model(config["init_from"])
    tok = load_tokenizer(config["tokenizer_json"])
    pad_id = special_ids(tok)["pad"]
    max_len = cfg.max_seq_len or model.cfg.max_seq_len
    train, _ = load_examples(cfg.data, tok, max_len)
    evals = load_examples(cfg.eval_file, tok, max_len)[0] if cfg.eval_file else []
    run = start(cfg, config, model)
    run.engine.train()
    while run.w.step < cfg.max_steps:
        loss = train_step(run, train, pad_id)
        check_finite(loss, run.w.step + 1)
        run.w.step += 1
        rec = {"step": run.w.step, "loss": loss, "lr": run.engine.get_lr()[0],
               "grad_norm": float(run.engine.get_global_grad_norm() or 0.0)}
        if evals and is_due(run.w.step, cfg.eval_every, cfg.max_steps):
            rec["eval_loss"] = evaluate(run, evals, pad_id)
        finish_step(run, rec)
    finish_worker(run.w)
