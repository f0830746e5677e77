"""Reward model: the base model with a scalar head, trained on preference pairs (Bradley-Terry).

    python -m jobs.reward --config configs/posttrain-demo.yaml

Same pairs JSONL as jobs.dpo. The score of a (prompt, reply) is a linear head on the final
hidden state of the reply's last token (its <|end|>); the loss is -log sigmoid(r_chosen -
r_rejected). Pairwise accuracy on `eval_file` is logged every `eval_every` steps and reported at
the end. Checkpoints hold the transformer in model.safetensors (so generate/export still load it)
and the head in value_head.safetensors.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from jobs.chat import PostTrainConfig
from jobs.config import main


class RewardConfig(PostTrainConfig):
    """Train a reward model (base model + scalar head) on (prompt, chosen, rejected) pairs."""

    kind: Literal["reward"] = "reward"
    lr: float = Field(5e-5, gt=0)
    """Peak learning rate."""


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


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    from jobs import chat
    from jobs.dpo import load_pairs
    from model.tokenizer import load_tokenizer

    cfg = RewardConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.cpus_per_worker)
    device = ray.train.torch.get_device()

    body, _, _ = chat.load_model(config["init_from"])
    torch.manual_seed(cfg.seed)  # the same head on every rank
    model = RewardModel(body)
    tok = load_tokenizer(config["tokenizer_json"])
    pad_id = chat.special_ids(tok)["pad"]
    max_len = (cfg.max_seq_len or body.cfg.max_seq_len) - 1  # pairs are (inputs, targets): the score reads one more token
    train = load_pairs(cfg.data, tok, max_len)
    evals = load_pairs(cfg.eval_file, tok, max_len) if cfg.eval_file else []
    groups = body.optim_groups(cfg.weight_decay)
    groups[1]["params"] = groups[1]["params"] + list(model.value_head.parameters())
    engine = chat.make_engine(cfg, model, groups)
    step, history = chat.restore(engine)

    def evaluate() -> dict:
        engine.eval()
        sums = [0.0, 0.0, 0.0]  # loss * n, correct, n
        with torch.no_grad():
            mine = evals[rank::world]
            for i in range(0, len(mine), cfg.micro_batch_size):
                batch = mine[i : i + cfg.micro_batch_size]
                loss, c, r = pairwise_loss(engine, batch, pad_id, device)
                sums = [sums[0] + float(loss) * len(batch), sums[1] + float((c > r).sum()), sums[2] + len(batch)]
        engine.train()
        loss, correct, n = chat.all_reduce_sum(sums)
        return {"eval_loss": loss / n, "eval_accuracy": correct / n, "eval_pairs": int(n)}

    engine.train()
    while step < cfg.max_steps:
        sums = [0.0, 0.0, 0.0, 0.0]  # loss, margin sum, correct, pairs
        for m in range(cfg.grad_accum):
            batch = [train[i] for i in chat.batch_indices(len(train), step, cfg, rank, world, m)]
            loss, c, r = pairwise_loss(engine, batch, pad_id, device)
            engine.backward(loss)
            engine.step()
            sums = [sums[0] + float(loss.detach()), sums[1] + float((c - r).sum()),
                    sums[2] + float((c > r).sum()), sums[3] + len(batch)]
        loss, margin, correct, n = chat.all_reduce_sum(sums)
        loss /= world * cfg.grad_accum
        chat.check_finite(loss, step + 1)
        step += 1
        rec = {"step": step, "loss": loss, "score_margin": margin / n, "accuracy": correct / n,
               "lr": engine.get_lr()[0]}
        if evals and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            rec.update(evaluate())
        chat.finish_step(cfg, engine, config, rank, history, rec, prefix="body.")


def load_reward_model(ckpt: str, device: str = "cpu") -> tuple[RewardModel, object]:
    """(RewardModel, tokenizer) from a jobs.reward checkpoint."""
    from pathlib import Path

    from safetensors.torch import load_file

    from cluster import storage
    from jobs import chat

    body, tok, _ = chat.load_model(ckpt)
    model = RewardModel(body)
    head = Path(storage.stage_local(ckpt)) / chat.VALUE_HEAD
    if not head.is_file():
        raise FileNotFoundError(f"{ckpt}: no {chat.VALUE_HEAD} (not a jobs.reward checkpoint)")
    model.load_state_dict({**{f"body.{k}": v for k, v in body.state_dict().items()}, **load_file(str(head))})
    return model.to(device).eval(), tok


def run(cfg: RewardConfig) -> dict:
    from jobs import chat
    from jobs.dpo import load_pairs
    from model.tokenizer import load_tokenizer

    cfg = chat.absolute_paths(cfg)
    init_dir = chat.resolve_init(cfg.init_from)
    config = chat.loop_config(cfg, init_dir)
    tok = load_tokenizer(config["tokenizer_json"])
    max_len = (cfg.max_seq_len or config["model"]["max_seq_len"]) - 1
    n_train = len(load_pairs(cfg.data, tok, max_len))
    n_eval = len(load_pairs(cfg.eval_file, tok, max_len)) if cfg.eval_file else 0
    print(f"reward: {n_train} pairs, {n_eval} held out; from {init_dir}")
    summary = chat.fit(cfg, train_loop_per_worker, config)
    if "eval_accuracy" in summary["metrics"]:
        m = summary["metrics"]
        print(f"held-out pairwise accuracy: {m['eval_accuracy']:.3f} on {m['eval_pairs']} pairs")
    return summary


if __name__ == "__main__":
    main(RewardConfig, run)
