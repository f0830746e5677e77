"""Verifiable tasks (jobs.data.verifiable) and the files jobs.tasks writes for them: no Ray, no model."""

from __future__ import annotations

import json
import re

import pytest
from pydantic import ValidationError

from jobs.data import verifiable
from jobs.data.chat import Conversation, encode_chat, read_records
from jobs.data.config import TasksConfig, VerifiableConfig
from jobs.tasks import run as build_tasks


def _key(item: dict) -> tuple:
    """The task's notion of 'the same question': unordered operands, or the letters in order."""
    if item["task"] == "addition":
        a, b = map(int, re.fullmatch(r"What is (\d+)\+(\d+)\?", item["prompt"]).groups())
        return ("addition", min(a, b), max(a, b))
    return (item["task"], item["prompt"].split(": ", 1)[1])


@pytest.mark.parametrize("task", ["addition", "reverse", "first_word"])
def test_items_are_deterministic_correct_and_disjoint(task):
    a = verifiable.make_task(task, seed=3, n_eval=200, n_sft=300, n_rl=400)
    assert a == verifiable.make_task(task, seed=3, n_eval=200, n_sft=300, n_rl=400)
    assert a["eval"] != verifiable.make_task(task, seed=4, n_eval=200, n_sft=1, n_rl=1)["eval"]
    assert [len(a[s]) for s in ("eval", "sft", "rl")] == [200, 300, 400]
    keys = {s: {_key(it) for it in a[s]} for s in a}
    assert all(len(keys[s]) == len(a[s]) for s in a)  # no repeats inside a split either
    assert not keys["eval"] & keys["sft"] and not keys["eval"] & keys["rl"] and not keys["sft"] & keys["rl"]
    for it in a["eval"] + a["sft"] + a["rl"]:  # every reference answer is right, and well formed
        if task == "addition":
            x, y = _key(it)[1:]
            assert int(it["answer"]) == x + y and it["match"] == "number"
        elif task == "first_word":
            words = it["prompt"].removeprefix("First word of: ").split()
            assert len(set(words)) == 3 and set(words) <= set(verifiable.FIRST_WORDS)
            assert it["answer"] == words[0] and it["match"] == "exact"
        else:
            letters = it["prompt"].split(": ", 1)[1].split()
            assert it["answer"].split() == letters[::-1] and 3 <= len(letters) <= 5 and it["match"] == "exact"
        assert verifiable.reward(it["answer"], it) == 1.0 and verifiable.well_formed(it["answer"], it)


def test_a_space_too_small_for_the_items_asked_is_refused():
    # 1-digit operands: 55 unordered pairs
    with pytest.raises(ValueError, match="addition: cannot draw 50 distinct SFT items.*raise addition_digits"):
        verifiable.make_task("addition", seed=0, n_eval=10, n_sft=50, n_rl=1, digits=1)
    with pytest.raises(ValueError, match="unknown task 'sum'"):
        verifiable.make_task("sum", seed=0, n_eval=1, n_sft=1, n_rl=1)


ADD = {"task": "addition", "prompt": "What is 37+58?", "answer": "95", "match": "number"}
REV = {"task": "reverse", "prompt": "Reverse the letters: k m q z", "answer": "z q m k", "match": "exact"}


@pytest.mark.parametrize("completion, reward, formed", [
    ("95", 1.0, True), (" 95\n", 1.0, True), ("95.", 1.0, False), ("The answer is 95", 1.0, False),
    ("#### 95", 1.0, False), ("95.0", 1.0, False),  # jobs.evaluate's number rule: the answer is still 95
    ("96", 0.0, True), ("-95", 0.0, True), ("9 5", 0.0, False), ("95 96", 0.0, False), ("9500", 0.0, True),
    ("", 0.0, False), ("ninety-five", 0.0, False), ("<|end|>", 0.0, False),
])
def test_addition_checker(completion, reward, formed):
    assert verifiable.reward(completion, ADD) == reward
    assert verifiable.well_formed(completion, ADD) is formed


@pytest.mark.parametrize("completion, reward, formed", [
    ("z q m k", 1.0, True), ("z  q m k ", 1.0, False), ("z q m k.", 1.0, False), ("Z Q M K", 1.0, False),
    ("k m q z", 0.0, True), ("z q m", 0.0, True), ("zqmk", 0.0, False), ("z q m k z", 0.0, True),
    ("", 0.0, False), ("95", 0.0, False),
])
def test_reverse_checker(completion, reward, formed):
    assert verifiable.reward(completion, REV) == reward
    assert verifiable.well_formed(completion, REV) is formed


FIRST = {"task": "first_word", "prompt": "First word of: king moon sword", "answer": "king", "match": "exact"}


@pytest.mark.parametrize("completion, reward, formed", [
    ("king", 1.0, True), (" king\n", 1.0, True), ("king.", 1.0, False), ("King", 1.0, False),
    ("moon", 0.0, True), ("sword", 0.0, True), ("king moon", 0.0, False), ("kingmoon", 0.0, True),
    ("", 0.0, False), ("1", 0.0, False),
])
def test_first_word_checker(completion, reward, formed):
    assert verifiable.reward(completion, FIRST) == reward
    assert verifiable.well_formed(completion, FIRST) is formed


def test_first_word_warm_start_teaches_the_format_not_the_rule():
    """The SFT replies are words of their own prompt, spread over the three places (so the warm start
    is right ~1/3 of the time and RL has headroom); held-out and RL items carry no reply."""
    a = verifiable.make_task("first_word", seed=0, n_eval=100, n_sft=900, n_rl=100)
    places = [it["prompt"].split(": ", 1)[1].split().index(it["reply"]) for it in a["sft"]]
    assert all(it["reply"] in it["prompt"].split()[3:] for it in a["sft"])
    assert all(abs(places.count(k) / len(places) - 1 / 3) < 0.06 for k in range(3))
    assert not any("reply" in it for it in a["eval"] + a["rl"])
    conv = verifiable.to_conversation(a["sft"][0])
    assert conv["messages"][1]["content"] == a["sft"][0]["reply"]
    assert verifiable.to_conversation(a["eval"][0])["messages"][1]["content"] == a["eval"][0]["answer"]
    assert a == verifiable.make_task("first_word", seed=0, n_eval=100, n_sft=900, n_rl=100)  # replies too


def test_config_needs_something_to_build_and_distinct_tasks():
    with pytest.raises(ValidationError, match="nothing to build"):
        TasksConfig(output="x")
    with pytest.raises(ValidationError, match="listed twice"):
        VerifiableConfig(tasks=["addition", "addition"])
    with pytest.raises(ValidationError, match="tasks"):
        VerifiableConfig(tasks=["multiplication"])


def test_jobs_tasks_writes_the_verifiable_files(tmp_path):
    out = tmp_path / "tasks"
    summary = build_tasks(TasksConfig(output=str(out), verifiable=VerifiableConfig(
        tasks=["addition", "reverse", "first_word"], eval_items=40, sft_items=60, rl_items=80, seed=7)))
    files = {"rl_train.jsonl": 240, "rl_eval.jsonl": 120, "verifiable_sft_train.jsonl": 180,
             "verifiable_sft_val.jsonl": 120, "eval/addition.jsonl": 40, "eval/reverse.jsonl": 40,
             "eval/first_word.jsonl": 40}
    assert summary["files"] == files
    assert json.loads((out / "manifest.json").read_text())["files"] == files
    read = lambda name: [json.loads(x) for x in (out / name).read_text().splitlines()]  # noqa: E731
    assert all(len(read(n)) == k for n, k in files.items())
    assert sorted(p.name for p in out.iterdir()) == sorted([*{f.split("/")[0] for f in files}, "manifest.json"])

    rl, held = read("rl_train.jsonl"), read("rl_eval.jsonl")
    assert {it["task"] for it in rl} == {"addition", "reverse", "first_word"}
    assert not {_key(it) for it in rl} & {_key(it) for it in held}
    sft = read_records(str(out / "verifiable_sft_train.jsonl"), Conversation)
    assert not {s.messages[0].content for s in sft} & {it["prompt"] for it in rl + held}
    # eval/<task>.jsonl: jobs.evaluate's generative items, the held-out items of rl_eval.jsonl in order
    for task in ("addition", "reverse", "first_word"):
        rows = read(f"eval/{task}.jsonl")
        assert rows == [{"id": f"{task}-{i}", "prompt": it["prompt"], "answer": it["answer"]}
                        for i, it in enumerate(x for x in held if x["task"] == task)]
    # the same seed writes the same bytes
    again = tmp_path / "again"
    build_tasks(TasksConfig(output=str(again), verifiable=VerifiableConfig(
        tasks=["addition", "reverse", "first_word"], eval_items=40, sft_items=60, rl_items=80, seed=7)))
    assert all((out / n).read_bytes() == (again / n).read_bytes() for n in files)


def test_sft_conversations_train_on_the_bare_answer():
    """The chat template SFT uses: only the answer and <|end|> carry labels."""
    from model.tokenizer import decode, train_tokenizer

    tok = train_tokenizer(["What is 12+30? 42 Reverse the letters: a b c"] * 20, vocab_size=300)
    conv = Conversation.model_validate(verifiable.to_conversation(ADD))
    ids, labels = encode_chat(tok, conv.messages)
    assert decode(tok, [x for x in labels if x != -100]) == "95<|end|>"
    assert decode(tok, ids).startswith("<|user|>What is 37+58?<|end|><|assistant|>")
