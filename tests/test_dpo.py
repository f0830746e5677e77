"""DPO: the loss at initialisation (policy == reference) and a real Ray Train fit."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from jobs.data.chat import PreferencePair, pair_example, special_ids
from jobs.posttrain.losses import dpo_loss
from jobs.posttrain.dpo import dpo_step
from model import GPT, ModelConfig
from model.tokenizer import train_tokenizer

TEXT = ["Who speaks next? HERMIA LYSANDER THESEUS: So is Lysander. In himself he is."] * 20


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_dpo_loss_is_log2_with_zero_margins_at_init():
    tok = train_tokenizer(TEXT, vocab_size=300)
    torch.manual_seed(0)
    policy = GPT(ModelConfig(preset="tiny", vocab_size=tok.get_vocab_size(), n_layers=2, d_model=32, n_heads=2,
                             n_kv_heads=1, d_ff=64, max_seq_len=64))
    reference = copy.deepcopy(policy).requires_grad_(False)
    pairs = [pair_example(tok, PreferencePair(prompt="Who speaks next?", chosen="HERMIA", rejected="THESEUS"), 64),
             pair_example(tok, PreferencePair(prompt="So is Lysander.", chosen="In himself he is.",
                                              rejected="LYSANDER"), 64)]
    loss, chosen, rejected = dpo_step(policy, reference, pairs, special_ids(tok)["pad"], beta=0.1, device="cpu")
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert torch.allclose(chosen, torch.zeros(2), atol=1e-6) and torch.allclose(rejected, torch.zeros(2), atol=1e-6)
    # the gradient is live: one step on the policy makes chosen more likely relative to rejected
    loss.backward()
    with torch.no_grad():
        for p in policy.parameters():
            p -= 0.5 * p.grad
    loss2, chosen2, rejected2 = dpo_step(policy, reference, pairs, special_ids(tok)["pad"], beta=0.1, device="cpu")
    assert loss2.item() < math.log(2) and bool(((chosen2 - rejected2) > 0).all())


def test_dpo_loss_formula():
    loss, c, r = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5)
    assert c.item() == pytest.approx(0.5) and r.item() == pytest.approx(-0.5)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))))


@pytest.mark.slow
def test_dpo_fit_logs_margins_and_accuracy(tiny_chat_base, tmp_path):
    from jobs.dpo import DPOConfig
    from jobs.dpo import run as dpo

    root, base_ckpt, _ = tiny_chat_base
    summary = dpo(DPOConfig(
        init_from=base_ckpt, data=str(root / "tasks" / "pairs_train.jsonl"),
        eval_file=str(root / "tasks" / "pairs_val.jsonl"), output=str(tmp_path / "dpo"), num_workers=1,
        global_batch_size=8, micro_batch_size=8, max_steps=6, lr=1e-3, warmup_steps=1, beta=0.1,
        eval_every=6, checkpoint_every=6))
    assert summary["error"] is None and summary["steps"] == 6
    history = [json.loads(x) for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    # step 1 is scored before any update: policy == reference
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert history[0]["reward_margin"] == pytest.approx(0, abs=1e-4)
    assert {"reward_chosen", "reward_rejected", "reward_margin", "accuracy"} <= set(history[-1])
    assert {"eval_loss", "eval_reward_margin", "eval_accuracy"} <= set(history[-1])
    assert history[-1]["reward_margin"] > 0
    state = json.loads((Path(summary["checkpoint"]) / "train_state.json").read_text())
    assert state["kind"] == "dpo" and state["config"]["beta"] == 0.1 and state["step"] == 6
