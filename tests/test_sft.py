"""SFT: the chat template's loss mask, JSONL errors, and SFT -> evaluate -> generate end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import fluent_or_scrambled
from jobs.data.chat import IGNORE, Conversation, Message, encode_chat, pad_batch, read_records, sft_example, special_ids
from model import GPT, ModelConfig
from model.tokenizer import decode, train_tokenizer

TEXT = ["Now, fair Hippolyta, our nuptial hour draws on apace; four happy days bring in another moon."] * 20


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXT, vocab_size=300)


def test_chat_template_labels_only_assistant_tokens(tok):
    conv = Conversation(messages=[
        Message(role="system", content="Answer briefly."), Message(role="user", content="Who speaks?"),
        Message(role="assistant", content="HIPPOLYTA"), Message(role="user", content="And then?"),
        Message(role="assistant", content="THESEUS")])
    ids, labels = encode_chat(tok, conv.messages)
    sp = special_ids(tok)
    assert len(ids) == len(labels)
    assert [ids[0], ids[-1]] == [sp["system"], sp["end"]]
    learned = [t for t, lab in zip(ids, labels) if lab != IGNORE]
    assert decode(tok, learned) == "HIPPOLYTA<|end|>THESEUS<|end|>"
    assert all(lab in (IGNORE, t) for t, lab in zip(ids, labels))
    # a generation prompt ends with the assistant marker and adds nothing to learn
    gen_ids, gen_labels = encode_chat(tok, conv.messages[:2], add_generation_prompt=True)
    assert gen_ids[-1] == sp["assistant"] and set(gen_labels) == {IGNORE}


def test_prompt_tokens_contribute_no_loss(tok):
    torch.manual_seed(0)
    model = GPT(ModelConfig(preset="tiny", vocab_size=tok.get_vocab_size(), n_layers=2, d_model=32, n_heads=2,
                            n_kv_heads=1, d_ff=64, max_seq_len=128))
    convs = [Conversation(messages=[Message(role="user", content="Now, fair Hippolyta, our nuptial hour"),
                                    Message(role="assistant", content="draws on apace")]),
             Conversation(messages=[Message(role="user", content="four happy days"),
                                    Message(role="assistant", content="bring in another moon.")])]
    rows = [sft_example(tok, c, 128)[:2] for c in convs]
    x, y = pad_batch(rows, special_ids(tok)["pad"])
    logits = model(x)
    logits.retain_grad()
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=IGNORE)
    loss.backward()
    per_position = logits.grad.abs().sum(-1)  # (B, T): how much each position's prediction moves the loss
    masked = y == IGNORE
    assert masked.any() and (~masked).any()
    assert torch.all(per_position[masked] == 0)
    assert torch.all(per_position[~masked] > 0)
    # the model's own loss is the mean over assistant tokens only
    _, model_loss = model(x, y)
    manual = -logits.log_softmax(-1).gather(-1, y.clamp(min=0)[..., None])[..., 0][~masked].mean()
    assert torch.allclose(model_loss, manual, atol=1e-5)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "sft.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    f.write_text(good + "\n\n" + "{not json\n")
    with pytest.raises(ValueError, match=rf"{f}:3: not valid JSON"):
        read_records(str(f), Conversation)
    f.write_text(good + "\n" + json.dumps({"messages": [{"role": "user", "content": "a"}]}) + "\n")
    with pytest.raises(ValueError, match=rf"{f}:2: messages: .*assistant"):
        read_records(str(f), Conversation)
    f.write_text(json.dumps({"messages": [{"role": "robot", "content": "a"}]}) + "\n")
    with pytest.raises(ValueError, match=rf"{f}:1: messages.0.role"):
        read_records(str(f), Conversation)


@pytest.mark.slow
def test_sft_then_evaluate_end_to_end(tiny_chat_base, tmp_path):
    from jobs.evaluate import EvaluateConfig
    from jobs.infer.config import TaskSpec
    from jobs.evaluate import run as evaluate
    from jobs.generate import GenerateConfig
    from jobs.infer.generate import generate_file
    from jobs.sft import SFTConfig
    from jobs.sft import run as sft

    root, base_ckpt, manifest = tiny_chat_base
    tasks = root / "tasks"
    summary = sft(SFTConfig(
        init_from=str(root / "base"), data=str(tasks / "sft_train.jsonl"), eval_file=str(tasks / "sft_val.jsonl"),
        output=str(tmp_path / "sft"), num_workers=2, zero_stage=2, global_batch_size=16, micro_batch_size=8,
        max_steps=16, lr=2e-3, warmup_steps=2, eval_every=8, checkpoint_every=16))
    assert summary["error"] is None and summary["steps"] == 16
    ckpt = Path(summary["checkpoint"])
    state = json.loads((ckpt / "train_state.json").read_text())
    assert state["kind"] == "sft" and state["chat_template"] == "raylm-chat/1" and state["step"] == 16
    assert state["config"]["init_from"] == str(root / "base") and state["init_from"] == base_ckpt
    assert state["tokenizer_sha256"] == manifest["tokenizer_sha256"] and state["world_size"] == 2
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "tokenizer.json").is_file()
    history = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert len(evals) == 2 and evals[-1] < evals[0]
    assert history[-1]["loss"] < history[0]["loss"]

    fluent = tmp_path / "fluent.jsonl"
    fluent.write_text("".join(json.dumps(it) + "\n" for it in fluent_or_scrambled(tasks / "eval" / "next_line.jsonl", 24)))
    report = evaluate(EvaluateConfig(
        checkpoints=[str(root / "base"), str(tmp_path / "sft")], data=str(root / "data"), max_sequences=32,
        output=str(tmp_path / "eval"), tasks=[
            TaskSpec(name="speaker", task_file=str(tasks / "eval" / "speaker.jsonl"), type="multiple_choice"),
            TaskSpec(name="fluent", task_file=str(fluent), type="multiple_choice"),
            TaskSpec(name="count_words", task_file=str(tasks / "eval" / "count_words.jsonl"), type="generative",
                     match="number", max_new_tokens=6, limit=8)]))
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["config"]["checkpoints"] == [str(root / "base"), str(tmp_path / "sft")]
    base, tuned = saved["results"]
    assert (base["chat"], tuned["chat"]) == (False, True) and tuned["kind"] == "sft"
    for r in (base, tuned):
        assert 0 < r["lm"]["bits_per_byte"] < 8 and r["lm"]["sequences"] == 32
        assert r["tasks"]["speaker"]["items"] > 0 and r["tasks"]["speaker"]["chance"] == 0.25
        # the true line against scrambles of it: both models know English from letter soup
        assert r["tasks"]["fluent"]["items"] == 24 and r["tasks"]["fluent"]["accuracy"] >= 0.9, r["tasks"]["fluent"]
        assert r["tasks"]["count_words"]["items"] == 8
    assert report["table"]["rows"][0][0] == "val loss"
    assert "| speaker accuracy" in (tmp_path / "eval" / "results.md").read_text()

    # batch generation from a JSONL of prompts, chat and raw, on the SFT checkpoint
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "How many words are in this line?\nTo be"}]})
                       + "\n" + json.dumps({"prompt": "HAMLET:\n"}) + "\n")
    out = generate_file(GenerateConfig(checkpoint=str(ckpt), prompts_file=str(prompts), max_new_tokens=8,
                                       temperature=0), str(ckpt))
    assert [("messages" in o, "prompt" in o) for o in out] == [(True, False), (False, True)]
    assert all(isinstance(o["completion"], str) and "<|end|>" not in o["completion"] for o in out)
