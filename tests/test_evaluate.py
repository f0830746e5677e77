"""Evaluation: answer extraction, scoring of hand-made tasks, bits-per-byte, and task-file errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from jobs.data.answers import extract_number, is_correct
from jobs.infer.evaluate import (GenerativeItem, MultipleChoiceItem, TaskSpec, language_modelling, read_task,
                           score_generative, score_multiple_choice)
from model import GPT, ModelConfig
from model.tokenizer import encode, train_tokenizer

TEXT = "the cat sat on the mat\nthe dog ate 12 bones\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def memorized():
    """A one-layer model trained until it recites TEXT: its answers to the hand-made tasks are known."""
    tok = train_tokenizer([TEXT] * 50, vocab_size=280)
    torch.manual_seed(0)
    model = GPT(ModelConfig(preset="tiny", vocab_size=tok.get_vocab_size(), n_layers=1, d_model=48, n_heads=2,
                            n_kv_heads=1, d_ff=96, max_seq_len=64))
    ids = torch.tensor([encode(tok, TEXT * 4)[:64]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    return model.eval(), tok


def test_extract_number_gsm8k_style():
    assert extract_number("so the total is 18.\n#### 1,234") == 1234
    assert extract_number("first 3 then 5 apples") == 5
    assert extract_number("-2.5 degrees") == -2.5
    assert extract_number("no digits here") is None
    assert is_correct("There are 7 words", "7", "number") and not is_correct("7 or 8", "7", "number")
    assert is_correct("  Hamlet. ", "HAMLET", "exact") and not is_correct("Hamlet, Prince", "HAMLET", "exact")


def test_multiple_choice_scored_by_log_likelihood(memorized):
    model, tok = memorized
    items = [MultipleChoiceItem(prompt="the cat sat on the", choices=[" dog", " mat", " bones"], answer=1),
             MultipleChoiceItem(prompt="the dog ate 12", choices=[" bones", " mat"], answer=0),
             # the item's key names the unlikely choice: the model's correct belief scores it wrong
             MultipleChoiceItem(prompt="the dog ate", choices=[" 12", " cat"], answer=1)]
    r = score_multiple_choice(model, tok, items, chat=False, batch_size=2)
    assert r["accuracy"] == pytest.approx(2 / 3) and r["accuracy_norm"] == pytest.approx(2 / 3)
    assert r["items"] == 3 and r["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)


def test_generative_exact_and_numeric(memorized):
    model, tok = memorized
    exact = score_generative(model, tok, [GenerativeItem(prompt="the cat sat on the", answer="mat"),
                                          GenerativeItem(prompt="the cat sat on", answer="a sofa")], chat=False,
                             spec=TaskSpec(name="e", task_file="-", type="generative", max_new_tokens=6))
    assert exact["exact_match"] == 0.5 and exact["examples"][0]["output"].strip() == "mat"
    numeric = score_generative(model, tok, [GenerativeItem(prompt="the dog ate", answer="#### 12"),
                                            GenerativeItem(prompt="the dog ate", answer="13")], chat=False,
                               spec=TaskSpec(name="n", task_file="-", type="generative", match="number",
                                             max_new_tokens=6))
    assert numeric["exact_match"] == 0.5


def test_task_file_errors_name_file_and_line(tmp_path):
    f = tmp_path / "mc.jsonl"
    f.write_text(json.dumps({"prompt": "p", "choices": ["a", "b"], "answer": 1}) + "\n"
                 + json.dumps({"prompt": "p", "choices": ["a", "b"], "answer": 5}) + "\n")
    with pytest.raises(ValueError, match=rf"{f}:2: .*answer 5"):
        read_task(TaskSpec(name="mc", task_file=str(f), type="multiple_choice"))
    f.write_text(json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(ValueError, match=rf"{f}:1: answer"):
        read_task(TaskSpec(name="g", task_file=str(f), type="generative"))


@pytest.mark.slow
def test_bits_per_byte_matches_decoded_bytes(tiny_chat_base):
    from jobs.checkpoint.load import load_model
    from jobs.data.shards import ShardLoader, load_manifest
    from model.tokenizer import decode

    root, ckpt, _ = tiny_chat_base
    model, tok, _ = load_model(ckpt)
    lm = language_modelling(model.eval(), tok, str(root / "data"), max_sequences=16, batch_size=8)
    rows = ShardLoader(root / "data", load_manifest(str(root / "data")), "val", 0).rows(0, 16, shuffle=False)
    nbytes = sum(len(decode(tok, [t for t in r[1:].tolist() if t != 0]).encode()) for r in rows)
    assert lm["tokens"] == rows[:, 1:].numel() and lm["perplexity"] == pytest.approx(math.exp(lm["loss"]))
    # decoding a row may split a multi-byte character at its edges: allow a byte or two per row
    assert lm["bits_per_byte"] == pytest.approx(lm["loss"] * lm["tokens"] / math.log(2) / nbytes, rel=0.01)
