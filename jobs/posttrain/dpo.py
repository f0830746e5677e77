"""DPO: direct preference optimisation against a frozen reference, the loop of every worker.

The policy starts from `init_from` (usually the SFT checkpoint); the reference is the same
weights, or `reference_path` when given, held frozen as a plain module on every worker. Logged
per step: loss, chosen/rejected rewards (beta times the policy/reference log-ratio of each
reply), their margin, and preference accuracy (the fraction of pairs whose chosen reward
exceeds the rejected one).
"""

from __future__ import annotations

import torch

from jobs.checkpoint.load import load_model
from jobs.data.chat import PreferencePair, pad_batch, pair_example, read_records, special_ids
from jobs.posttrain.config import DPOConfig
from jobs.posttrain.losses import dpo_loss, sequence_logprobs
from jobs.posttrain.worker import PostTrainRun, batch_indices, finish_step, start
from jobs.train.worker import all_reduce_sum, check_finite, finish_worker, is_due


def load_pairs(uri: str, tok, max_len: int) -> list[tuple[tuple, tuple]]:
    """Tokenized (chosen, rejected) examples, each (inputs, targets), of a pairs JSONL file."""
    return [pair_example(tok, p, max_len) for p in read_records(uri, PreferencePair)]


def pair_batch(pairs: list, pad_id: int):
    """Chosen rows then rejected rows in one padded batch, so one forward pass scores both."""
    return pad_batch([c for c, _ in pairs] + [r for _, r in pairs], pad_id)


def dpo_step(policy, reference, pairs: list, pad_id: int, beta: float, device):
    """(loss, chosen rewards, rejected rewards) of a list of tokenized pairs."""
    x, y = pair_batch(pairs, pad_id)
    x, y = x.to(device), y.to(device)
    n = len(pairs)
    pi = sequence_logprobs(policy, x, y)
    with torch.no_grad():
        ref = sequence_logprobs(reference, x, y)
    return dpo_loss(pi[:n], pi[n:], ref[:n], ref[n:], beta)


def evaluate(run: PostTrainRun, reference, evals: list, pad_id: int) -> dict:
    w, engine, cfg = run.w, run.engine, run.cfg
    engine.eval()
    sums = [0.0, 0.0, 0.0, 0.0]  # loss * n, margin sum, correct, n
    with torch.no_grad():
        mine = evals[w.rank::w.world]
        for i in range(0, len(mine), cfg.micro_batch_size):
            batch = mine[i : i + cfg.micro_batch_size]
            loss, c, r = dpo_step(engine, reference, batch, pad_id, cfg.beta, w.device)
            sums = [sums[0] + float(loss) * len(batch), sums[1] + float((c - r).sum()),
                    sums[2] + float((c > r).sum()), sums[3] + len(batch)]
    engine.train()
    loss, margin, correct, n = all_reduce_sum(sums)
    return {"eval_loss": loss / n, "eval_reward_margin": margin / n, "eval_accuracy": correct / n}


def train_step(run: PostTrainRun, reference, train: list, pad_id: int) -> dict:
    cfg, w, engine = run.cfg, run.w, run.engine
    grad_accum = cfg.grad_accum_for(w.world)
    sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss, chosen reward, rejected reward, correct, pairs
    for m in range(grad_accum):
        batch = [train[i] for i in batch_indices(len(train), w.step, cfg, w.rank, w.world, m)]
        loss, c, r = dpo_step(engine, reference, batch, pad_id, cfg.beta, w.device)
        engine.backward(loss)
        engine.step()
        sums = [sums[0] + float(loss.detach()), sums[1] + float(c.sum()), sums[2] + float(r.sum()),
                sums[3] + float((c > r).sum()), sums[4] + len(batch)]
    loss, chosen, rejected, correct, n = all_reduce_sum(sums)
    return {"loss": loss / (w.world * grad_accum), "reward_chosen": chosen / n, "reward_rejected": rejected / n,
            "reward_margin": (chosen - rejected) / n, "accuracy": correct / n}


def train_loop_per_worker(config: dict) -> None:
    from model.tokenizer import load_tokenizer

    cfg = DPOConfig.model_validate(config["cfg"])
    model, _, _ = load_model(config["init_from"])
    tok = load_tokenizer(config["tokenizer_json"])
    pad_id = special_ids(tok)["pad"]
    max_len = cfg.max_seq_len or model.cfg.max_seq_len
    train = load_pairs(cfg.data, tok, max_len)
    evals = load_pairs(cfg.eval_file, tok, max_len) if cfg.eval_file else []
    run = start(cfg, config, model)
    reference, _, _ = load_model(config["reference"], str(run.w.device))
    reference.eval().requires_grad_(False)
    run.engine.train()
    while run.w.step < cfg.max_steps:
        stats = train_step(run, reference, train, pad_id)
        check_finite(stats["loss"], run.w.step + 1)
        run.w.step += 1
        rec = {"step": run.w.step, **stats, "lr": run.engine.get_lr()[0]}
        if evals and is_due(run.w.step, cfg.eval_every, cfg.max_steps):
            rec.update(evaluate(run, reference, evals, pad_id))
        finish_step(run, rec)
    finish_worker(run.w)
