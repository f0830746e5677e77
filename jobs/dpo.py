"""DPO: direct preference optimisation against a frozen reference, on Ray Train with DeepSpeed.

    python -m jobs.dpo --config configs/posttrain-demo.yaml

Data is JSONL of preference pairs, one per line:

    {"prompt": "Who speaks next? ...", "chosen": "HERMIA", "rejected": "THESEUS"}

(`prompt` may also be a list of chat messages.) The policy starts from `init_from` (usually the
SFT checkpoint); the reference is the same weights, or `reference` when given, held frozen as a
plain module on every worker. Logged per step: loss, chosen/rejected rewards (beta times the
policy/reference log-ratio of each reply), their margin, and preference accuracy (the fraction of
pairs whose chosen reward exceeds the rejected one).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from jobs.chat import PostTrainConfig
from jobs.config import main


class DPOConfig(PostTrainConfig):
    """Direct preference optimisation on (prompt, chosen, rejected) pairs."""

    kind: Literal["dpo"] = "dpo"
    reference_path: str | None = None
    """Frozen reference model (same forms as init_from); default: init_from itself."""
    beta: float = Field(0.1, gt=0)
    """Strength of the implicit KL penalty: rewards are beta * log(pi / pi_ref)."""
    lr: float = Field(1e-5, gt=0)
    """Peak learning rate (DPO wants a smaller one than SFT)."""


def load_pairs(uri: str, tok, max_len: int) -> list[tuple[tuple, tuple]]:
    """Tokenized (chosen, rejected) examples, each (inputs, targets), of a pairs JSONL file."""
    from jobs.chat import PreferencePair, pair_example, read_records

    return [pair_example(tok, p, max_len) for p in read_records(uri, PreferencePair)]


def pair_batch(pairs: list, pad_id: int):
    """Chosen rows then rejected rows in one padded batch, so one forward pass scores both."""
    from jobs.chat import pad_batch

    return pad_batch([c for c, _ in pairs] + [r for _, r in pairs], pad_id)


def dpo_step(policy, reference, pairs: list, pad_id: int, beta: float, device):
    """(loss, chosen rewards, rejected rewards) of a list of tokenized pairs."""
    import torch

    from jobs.posttrain.losses import dpo_loss, sequence_logprobs

    x, y = pair_batch(pairs, pad_id)
    x, y = x.to(device), y.to(device)
    n = len(pairs)
    pi = sequence_logprobs(policy, x, y)
    with torch.no_grad():
        ref = sequence_logprobs(reference, x, y)
    return dpo_loss(pi[:n], pi[n:], ref[:n], ref[n:], beta)


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import torch

    from jobs import chat
    from model.tokenizer import load_tokenizer

    cfg = DPOConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.cpus_per_worker)
    device = ray.train.torch.get_device()

    model, _, _ = chat.load_model(config["init_from"])
    reference, _, _ = chat.load_model(config["reference"], str(device))
    reference.eval().requires_grad_(False)
    tok = load_tokenizer(config["tokenizer_json"])
    pad_id = chat.special_ids(tok)["pad"]
    max_len = cfg.max_seq_len or model.cfg.max_seq_len
    train = load_pairs(cfg.data, tok, max_len)
    evals = load_pairs(cfg.eval_file, tok, max_len) if cfg.eval_file else []
    engine = chat.make_engine(cfg, model, model.optim_groups(cfg.weight_decay))
    step, history = chat.restore(engine)

    def evaluate() -> dict:
        engine.eval()
        sums = [0.0, 0.0, 0.0, 0.0]  # loss * n, margin sum, correct, n
        with torch.no_grad():
            mine = evals[rank::world]
            for i in range(0, len(mine), cfg.micro_batch_size):
                batch = mine[i : i + cfg.micro_batch_size]
                loss, c, r = dpo_step(engine, reference, batch, pad_id, cfg.beta, device)
                sums = [sums[0] + float(loss) * len(batch), sums[1] + float((c - r).sum()),
                        sums[2] + float((c > r).sum()), sums[3] + len(batch)]
        engine.train()
        loss, margin, correct, n = chat.all_reduce_sum(sums)
        return {"eval_loss": loss / n, "eval_reward_margin": margin / n, "eval_accuracy": correct / n}

    engine.train()
    while step < cfg.max_steps:
        sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss, chosen reward, rejected reward, correct, pairs
        for m in range(cfg.grad_accum):
            batch = [train[i] for i in chat.batch_indices(len(train), step, cfg, rank, world, m)]
            loss, c, r = dpo_step(engine, reference, batch, pad_id, cfg.beta, device)
            engine.backward(loss)
            engine.step()
            sums = [sums[0] + float(loss.detach()), sums[1] + float(c.sum()), sums[2] + float(r.sum()),
                    sums[3] + float((c > r).sum()), sums[4] + len(batch)]
        loss, chosen, rejected, correct, n = chat.all_reduce_sum(sums)
        loss /= world * cfg.grad_accum
        chat.check_finite(loss, step + 1)
        step += 1
        rec = {"step": step, "loss": loss, "reward_chosen": chosen / n, "reward_rejected": rejected / n,
               "reward_margin": (chosen - rejected) / n, "accuracy": correct / n, "lr": engine.get_lr()[0]}
        if evals and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            rec.update(evaluate())
        chat.finish_step(cfg, engine, config, rank, history, rec)


def run(cfg: DPOConfig) -> dict:
    from jobs import chat
    from model.tokenizer import load_tokenizer

    cfg = chat.absolute_paths(cfg)
    init_dir = chat.resolve_init(cfg.init_from)
    ref_dir = chat.resolve_init(cfg.reference_path) if cfg.reference_path else init_dir
    config = chat.loop_config(cfg, init_dir)
    _, ref_tok, _ = chat.load_model(ref_dir)
    if ref_tok.to_str() != config["tokenizer_json"]:
        raise ValueError(f"reference_path: {ref_dir} has a different tokenizer than init_from {init_dir}")
    tok = load_tokenizer(config["tokenizer_json"])
    max_len = cfg.max_seq_len or config["model"]["max_seq_len"]
    n_train = len(load_pairs(cfg.data, tok, max_len))
    n_eval = len(load_pairs(cfg.eval_file, tok, max_len)) if cfg.eval_file else 0
    print(f"dpo: {n_train} pairs, {n_eval} held out, beta {cfg.beta}; policy {init_dir}, reference {ref_dir}")
    return chat.fit(cfg, train_loop_per_worker, {**config, "reference": ref_dir})


if __name__ == "__main__":
    main(DPOConfig, run)
