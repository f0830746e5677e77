"""Reward model: learns a separable toy preference in-process, and a Ray Train fit with held-out accuracy."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from conftest import scrambled
from jobs.data.chat import PreferencePair, pair_example, special_ids
from jobs.posttrain.reward import RewardModel, load_reward_model, pairwise_loss
from model import GPT, ModelConfig
from model.tokenizer import train_tokenizer

WORDS = "sun moon star cloud rain wind tree stone river hill".split()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def toy_pairs(n: int, seed: int) -> list[PreferencePair]:
    """Prompts of random words; the preferred reply always says `gentle`, the other `cruel`."""
    rng = random.Random(seed)
    return [PreferencePair(prompt=" ".join(rng.choices(WORDS, k=4)),
                           chosen=f"{rng.choice(WORDS)} gentle {rng.choice(WORDS)}",
                           rejected=f"{rng.choice(WORDS)} cruel {rng.choice(WORDS)}") for _ in range(n)]


def test_reward_model_learns_separable_preference():
    tok = train_tokenizer([" ".join(WORDS + ["gentle", "cruel"])] * 10, vocab_size=300)
    torch.manual_seed(0)
    body = GPT(ModelConfig(preset="tiny", vocab_size=tok.get_vocab_size(), n_layers=1, d_model=32, n_heads=2,
                           n_kv_heads=1, d_ff=64, max_seq_len=64))
    model = RewardModel(body)
    pad = special_ids(tok)["pad"]
    train = [pair_example(tok, p, 64) for p in toy_pairs(64, seed=1)]
    held = [pair_example(tok, p, 64) for p in toy_pairs(32, seed=2)]
    _, c0, r0 = pairwise_loss(model, held, pad, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(40):
        batch = train[(step * 16) % 64:][:16]
        loss, _, _ = pairwise_loss(model, batch, pad, "cpu")
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        _, c, r = pairwise_loss(model, held, pad, "cpu")
    assert (c > r).float().mean().item() == 1.0
    assert (c - r).mean() > (c0 - r0).mean() + 1.0


@pytest.mark.slow
def test_reward_fit_reports_held_out_accuracy(tiny_chat_base, tmp_path):
    from jobs.checkpoint.load import load_model
    from jobs.reward import RewardConfig
    from jobs.reward import run as reward

    root, base_ckpt, _ = tiny_chat_base
    # a preference a reward model can learn in a few steps: the true next line over a scramble of it
    for split, src in (("train", "pairs_train.jsonl"), ("val", "pairs_val.jsonl")):
        pairs = [json.loads(x) for x in (root / "tasks" / src).read_text().splitlines()][:200]
        (tmp_path / f"{split}.jsonl").write_text("".join(
            json.dumps({**p, "rejected": scrambled(p["chosen"], i)}) + "\n" for i, p in enumerate(pairs)))
    summary = reward(RewardConfig(
        init_from=str(root / "base"), data=str(tmp_path / "train.jsonl"),
        eval_file=str(tmp_path / "val.jsonl"), output=str(tmp_path / "rm"), num_workers=1,
        global_batch_size=16, micro_batch_size=16, max_steps=8, lr=1e-3, warmup_steps=1, eval_every=4,
        checkpoint_every=8))
    assert summary["error"] is None
    m = summary["metrics"]
    assert m["eval_pairs"] > 0 and m["step"] == 8
    assert m["eval_accuracy"] >= 0.8, m  # held out; chance is 0.5
    ckpt = Path(summary["checkpoint"])
    assert (ckpt / "value_head.safetensors").is_file()
    # generation-side loaders read the transformer and ignore the head; the reward loader uses both
    gpt, _, state = load_model(str(ckpt))
    assert state["kind"] == "reward"
    rm, tok = load_reward_model(str(ckpt))
    held = [pair_example(tok, PreferencePair.model_validate(json.loads(x)), 127)
            for x in (tmp_path / "val.jsonl").read_text().splitlines()[:16]]
    with torch.no_grad():
        _, c, r = pairwise_loss(rm, held, special_ids(tok)["pad"], "cpu")
    assert (c > r).float().mean().item() >= 0.8  # the loaded model scores as the trained one did
    assert torch.equal(rm.body.tok_emb.weight, gpt.tok_emb.weight)
    history = [json.loads(x) for x in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "eval_accuracy" in h] == [4, 8]
