"""Verifiable tasks: questions whose answers a rule checks, for RL with verifiable rewards and for
showing that RL learns on a CPU in minutes (jobs.tasks writes them; docs/posttrain.md).

    addition   "What is 37+58?" -> "95"                    numeric answer (the rule jobs.evaluate's `number` uses)
    reverse    "Reverse the letters: k m q z" -> "z q m k"  exact match (jobs.evaluate's `exact`)
    first_word "First word of: king moon sword" -> "king"   exact match

`first_word` is the one a tiny model improves on by RL in minutes (configs/rl-demo.yaml): its SFT
conversations teach the answer's *format* only, the reply being a word of the prompt chosen at
random, so the warm start is right about a third of the time and RL has to find the rule.

Items come from a seeded generator, so the same seed gives the same files. The held-out items are
drawn first and no training item shares a held-out item's key (for addition the unordered pair
of operands, so "58+37" is not trained on when "37+58" is held out); SFT conversations and RL
prompts are drawn from the rest and are disjoint from each other too, so RL does not merely
recall what SFT showed. Letters are spaced in `reverse` so that every letter is a token of its
own whatever merges the corpus' BPE learned.

A reward is 1.0 for a correct answer and 0.0 otherwise, judged by jobs.data.answers.is_correct,
the check jobs.evaluate scores with: RL reward and evaluation accuracy are the same number.
`well_formed` is the format check (the answer alone, nothing around it).
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable

from jobs.data.answers import is_correct

ADDITION_Q = "What is {a}+{b}?"


REVERSE_Q = "Reverse the letters: {letters}"


FIRST_WORD_Q = "First word of: {words}"


FIRST_WORDS = ("king queen lord lady crown sword heart night day love "
               "death blood fool ghost storm moon sun star rose tears").split()
"""The words `first_word` draws from (three distinct ones a prompt): common in the plays, so the
demo tokenizer has them as whole tokens; 20*19*18 = 6840 distinct prompts."""


REVERSE_LENGTHS = (3, 5)
"""Shortest and longest string to reverse, in letters."""


MATCH = {"addition": "number", "reverse": "exact", "first_word": "exact"}
"""How each task's answers are checked (jobs.data.answers.is_correct's `match`)."""


_FORMAT = {"addition": re.compile(r"-?\d+"), "reverse": re.compile(r"[a-z]( [a-z])*"),
           "first_word": re.compile(r"[a-z]+")}


def addition(rng: random.Random, digits: int) -> tuple[str, str, tuple]:
    """(prompt, answer, key): two operands of 1 to `digits` digits."""
    a, b = rng.randrange(10**digits), rng.randrange(10**digits)
    return ADDITION_Q.format(a=a, b=b), str(a + b), ("addition", min(a, b), max(a, b))


def reverse(rng: random.Random) -> tuple[str, str, tuple]:
    """(prompt, answer, key): a few lowercase letters, spaced, and the same letters backwards."""
    letters = [rng.choice(string.ascii_lowercase) for _ in range(rng.randint(*REVERSE_LENGTHS))]
    return REVERSE_Q.format(letters=" ".join(letters)), " ".join(reversed(letters)), ("reverse", *letters)


def first_word(rng: random.Random) -> tuple[str, str, tuple]:
    """(prompt, answer, key): three distinct words of FIRST_WORDS in a random order, and the first."""
    words = rng.sample(FIRST_WORDS, 3)
    return FIRST_WORD_Q.format(words=" ".join(words)), words[0], ("first_word", *words)


def _draw(task: str, draw: Callable[[], tuple[str, str, tuple]], n: int, taken: set, what: str) -> list[dict]:
    """n items with keys not in `taken` (which grows by theirs); an error when the task's space is
    too small to hold that many distinct items."""
    out: list[dict] = []
    misses = 0
    while len(out) < n:
        prompt, answer, key = draw()
        if key in taken:
            misses += 1
            if misses > 20 * n + 1000:  # the space is (nearly) used up
                raise ValueError(f"{task}: cannot draw {n} distinct {what} items (got {len(out)}); "
                                 "lower eval_items, sft_items or rl_items, or raise addition_digits")
            continue
        taken.add(key)
        out.append({"task": task, "prompt": prompt, "answer": answer, "match": MATCH[task]})
    return out


def make_task(task: str, seed: int, n_eval: int, n_sft: int, n_rl: int, digits: int = 2) -> dict[str, list[dict]]:
    """{"eval", "sft", "rl"}: held-out items, then SFT and RL training items, pairwise disjoint by key.

    Each item is {"task", "prompt", "answer", "match"}; the same arguments give the same items.
    `first_word`'s SFT items also carry a "reply": a word of their prompt drawn at random, what
    the warm start is taught to say (the format without the rule).
    """
    rng = random.Random(f"{seed}:{task}")  # str seeds hash with sha512: the same in every process
    if task == "addition":
        draw = lambda: addition(rng, digits)  # noqa: E731
    elif task == "reverse":
        draw = lambda: reverse(rng)  # noqa: E731
    elif task == "first_word":
        draw = lambda: first_word(rng)  # noqa: E731
    else:
        raise ValueError(f"verifiable: unknown task {task!r} (expected one of {sorted(MATCH)})")
    taken: set = set()
    items = {"eval": _draw(task, draw, n_eval, taken, "held-out"),
             "sft": _draw(task, draw, n_sft, taken, "SFT"),
             "rl": _draw(task, draw, n_rl, taken, "RL")}
    if task == "first_word":
        for it in items["sft"]:
            it["reply"] = rng.choice(it["prompt"].split(": ", 1)[1].split())
    return items


def well_formed(completion: str, item: dict) -> bool:
    """The answer alone in the task's form (digits; spaced lowercase letters), nothing around it."""
    return bool(_FORMAT[item["task"]].fullmatch(completion.strip()))


def reward(completion: str, item: dict) -> float:
    """1.0 when the completion (decoded text, without <|end|>) answers the item correctly, by the
    rule jobs.evaluate applies to the item's `match`; else 0.0."""
    return 1.0 if is_correct(completion, item["answer"], item["match"]) else 0.0


def to_conversation(item: dict) -> dict:
    """An SFT example: the question as the user turn, the bare answer as the assistant's (an SFT
    item's "reply" instead where it has one: first_word's format-only warm start)."""
    return {"messages": [{"role": "user", "content": item["prompt"]},
                         {"role": "assistant", "content": item.get("reply", item["answer"])}]}


def to_eval(item: dict, i: int) -> dict:
    """A generative item for jobs.evaluate (score with the task's `match`)."""
    return {"id": f"{item['task']}-{i}", "prompt": item["prompt"], "answer": item["answer"]}
