"""Reward model: the base model with a scalar head, trained on preference pairs (Bradley-Terry).

The score of a (prompt, reply) is a linear head on the final hidden state of the reply's last
token (its <|end|>); the loss is -log sigmoid(r_chosen - r_rejected). Checkpoints hold the
transformer in model.safetensors (so generate/export still load it) and the head in
value_head.safetensors.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from jobs.checkpoint.load import load_model, load_value_head
from jobs.data.chat import special_ids
from jobs.posttrain.config import RewardConfig
from jobs.posttrain.dpo import load_pairs
from jobs.posttrain.worker import PostTrainRun, batch_indices, finish_step, start
from jobs.train.worker import all_reduce_sum, check_finite, finish_worker, is_due


class RewardModel(nn.Module):
    """A GPT body whose final hidden state at the last real token feeds a scalar head."""

    def __init__(self, body):
        super().__init__()
        self.body = body
        self.value_head = nn.Linear(body.cfg.d_model, 1)
        nn.init.normal_(self.value_head.weight, std=1.0 / (body.cfg.d_model + 1) ** 0.5)
        nn.init.zeros_(self.value_head.bias)

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states (B, T, d): GPT.forward without the output projection."""
        g = self.body
        T = idx.size(1)
        x = g.tok_emb(idx)
        rope = None
        if g.pos_emb is not None:
            x = x + g.pos_emb(torch.arange(T, device=idx.device))
        else:
            rope = (g.rope_cos[:T], g.rope_sin[:T])
        x = g.drop(x)
        for block in g.blocks:
            x = block(x, rope)
        return g.norm(x)

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """The body's AdamW groups; the head is not decayed."""
        groups = self.body.optim_groups(weight_decay)
        groups[1]["params"] = groups[1]["params"] + list(self.value_head.parameters())
        return groups

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Scores (B,) of right-padded rows whose real lengths are `lengths`."""
        h = self.hidden(idx)
        last = h[torch.arange(idx.size(0), device=idx.device), lengths - 1]  # (B, d)
        return self.value_head(last).squeeze(-1)


def score_batch(model, rows: list[list[int]], pad_id: int, device) -> torch.Tensor:
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, : len(r)] = torch.tensor(r)
    lengths = torch.tensor([len(r) for r in rows])
    return model(idx.to(device), lengths.to(device))


def full_ids(example: tuple[list[int], list[int]]) -> list[int]:
    """The whole token sequence (prompt + reply + <|end|>) of an (inputs, targets) example."""
    x, y = example
    return [*x, y[-1]]


def pairwise_loss(model, pairs: list, pad_id: int, device):
    """(Bradley-Terry loss, chosen scores, rejected scores) of tokenized pairs."""
    n = len(pairs)
    scores = score_batch(model, [full_ids(c) for c, _ in pairs] + [full_ids(r) for _, r in pairs], pad_id, device)
    chosen, rejected = scores[:n], scores[n:]
    return -F.logsigmoid(chosen - rejected).mean(), chosen.detach(), rejected.detach()


def evaluate(run: PostTrainRun, evals: list, pad_id: int) -> dict:
    w, engine, cfg = run.w, run.engine, run.cfg
    engine.eval()
    sums = [0.0, 0.0, 0.0]  # loss * n, correct, n
    with torch.no_grad():
        mine = evals[w.rank::w.world]
        for i in range(0, len(mine), cfg.micro_batch_size):
            batch = mine[i : i + cfg.micro_batch_size]
            loss, c, r = pairwise_loss(engine, batch, pad_id, w.device)
            sums = [sums[0] + float(loss) * len(batch), sums[1] + float((c > r).sum()), sums[2] + len(batch)]
    engine.train()
    loss, correct, n = all_reduce_sum(sums)
    return {"eval_loss": loss / n, "eval_accuracy": correct / n, "eval_pairs": int(n)}


def train_step(run: PostTrainRun, train: list, pad_id: int) -> dict:
    cfg, w, engine = run.cfg, run.w, run.engine
    grad_accum = cfg.grad_accum_for(w.world)
    sums = [0.0, 0.0, 0.0, 0.0]  # loss, margin sum, correct, pairs
    for m in range(grad_accum):
        batch = [train[i] for i in batch_indices(len(train), w.step, cfg, w.rank, w.world, m)]
        loss, c, r = pairwise_loss(engine, batch, pad_id, w.device)
        engine.backward(loss)
        engine.step()
        sums = [sums[0] + float(loss.detach()), sums[1] + float((c - r).sum()),
                sums[2] + float((c > r).sum()), sums[3] + len(batch)]
    loss, margin, correct, n = all_reduce_sum(sums)
    return {"loss": loss / (w.world * grad_accum), "score_margin": margin / n, "accuracy": correct / n}


def train_loop_per_worker(config: dict) -> None:
    from model.tokenizer import load_tokenizer

    cfg = RewardConfig.model_validate(config["cfg"])
    body, _, _ = load_model(config["init_from"])
    torch.manual_seed(cfg.seed)  # the same head on every rank
    model = RewardModel(body)
    tok = load_tokenizer(config["tokenizer_json"])
    pad_id = special_ids(tok)["pad"]
    max_len = (cfg.max_seq_len or body.cfg.max_seq_len) - 1  # pairs are (inputs, targets): the score reads one more token
    train = load_pairs(cfg.data, tok, max_len)
    evals = load_pairs(cfg.eval_file, tok, max_len) if cfg.eval_file else []
    run = start(cfg, config, model, prefix="body.")
    run.engine.train()
    while run.w.step < cfg.max_steps:
        stats = train_step(run, train, pad_id)
        check_finite(stats["loss"], run.w.step + 1)
        run.w.step += 1
        rec = {"step": run.w.step, **stats, "lr": run.engine.get_lr()[0]}
        if evals and is_due(run.w.step, cfg.eval_every, cfg.max_steps):
            rec.update(evaluate(run, evals, pad_id))
        finish_step(run, rec)
    finish_worker(run.w)


def load_reward_model(ckpt: str, device: str = "cpu") -> tuple[RewardModel, object]:
    """(RewardModel, tokenizer) from a jobs.reward checkpoint, verified first."""
    body, tok, _ = load_model(ckpt)
    model = RewardModel(body)
    model.load_state_dict({**{f"body.{k}": v for k, v in body.state_dict().items()}, **load_value_head(ckpt)})
    return model.to(device).eval(), tok
