"""Demo post-training data from the Shakespeare corpus: instruction conversations, preference
pairs and held-out eval items (jobs.tasks is the command line; docs/posttrain.md).

Nothing can be downloaded at run time, so the post-training demo makes its data from the plays.
Documents are split exactly as jobs.prepare split them (same Markdown level, hash seed and
val_fraction, read from the prepare manifest), so every eval item and held-out pair comes from
text the base model never trained on, and SFT/DPO/reward training uses only the rest.

Item kinds, each made from a speech boundary or a line of a scene:

    speaker      multiple choice: who speaks next, given the last speeches (4 names from the scene)
    next_line    multiple choice: which line comes next (true line + 3 lines from the same play)
    speaker_gen  generative, exact match: name who speaks next
    count_words  generative, numeric answer: how many words a line has

With a `verifiable` section it also writes the verifiable tasks of jobs.data.verifiable (RL
prompts with answers, their held-out items, SFT warm-start conversations); they need no corpus.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

from cluster import storage
from jobs.data import verifiable
from jobs.data.config import TasksConfig, VerifiableConfig


SPEAKER_Q = "Who speaks next?"


NEXT_LINE_Q = "Which line comes next?"


COUNT_Q = "How many words are in this line?"


@dataclass
class Speech:
    speaker: str
    lines: list[str]


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


_DIRECTION = re.compile(r"^_.*_$")


def parse_speeches(md: str) -> list[Speech]:
    """Speeches of a Markdown play fragment: a `**NAME**` line, then its verse up to a blank line."""
    speeches: list[Speech] = []
    current: Speech | None = None
    for raw in md.splitlines():
        line = raw.strip()
        if m := _SPEAKER.match(line):
            current = Speech(m.group(1).strip(), [])
            speeches.append(current)
        elif not line or line.startswith("#"):
            current = None
        elif current is not None and not _DIRECTION.match(line):
            current.lines.append(re.sub(r"(\*\*|__|\*|_)(\S(?:.*?\S)?)\1", r"\2", line))
    return [s for s in speeches if s.lines]


def held_out_documents(manifest: dict) -> tuple[list[list[Speech]], list[list[Speech]]]:
    """(train, held-out) documents as lists of speeches, split the way jobs.prepare split them."""
    from jobs.data.clean import normalize
    from jobs.data.inputs import default_corpus, expand_inputs
    from jobs.data.prepare import doc_hash
    from jobs.data.read import file_format, markdown_to_text, split_markdown

    pcfg = manifest["config"]
    files = expand_inputs(pcfg["inputs"]) if pcfg["inputs"] else default_corpus()
    level = pcfg["markdown_split_level"]
    train, held = [], []
    for f in files:
        if file_format(f, pcfg["format"]) != "markdown":
            continue
        text = storage.read_text(f)
        for part in (split_markdown(text, level) if level else [text]):
            doc = normalize(markdown_to_text(part))  # prepare hashes the normalised text
            if not doc.strip():
                continue
            unit = (doc_hash(doc, pcfg["seed"]) >> 11) / float(1 << 53)
            speeches = parse_speeches(part)
            if speeches:
                (held if unit < pcfg["val_fraction"] else train).append(speeches)
    if not held:
        raise ValueError(f"data: no held-out Markdown play documents (val_fraction is {pcfg['val_fraction']})")
    return train, held


def script(speeches: list[Speech], lines_per_speech: int) -> str:
    """Speeches in the play-script form of the pretraining text: NAME:, then the lines."""
    return "\n\n".join(f"{s.speaker}:\n" + "\n".join(s.lines[-lines_per_speech:]) for s in speeches)


def make_items(docs: list[list[Speech]], cfg: TasksConfig, rng: random.Random) -> dict[str, list[dict]]:
    """All candidate items of each kind from some documents (sampled down by the caller)."""
    items: dict[str, list[dict]] = {"speaker": [], "next_line": [], "count_words": []}
    for speeches in docs:
        names = sorted({s.speaker for s in speeches})
        unique_lines = sorted({ln for s in speeches for ln in s.lines})
        for i in range(1, len(speeches)):
            target = speeches[i].speaker
            context = speeches[max(0, i - cfg.context_speeches): i]
            prompt = f"{SPEAKER_Q}\n\n{script(context, cfg.lines_per_speech)}\n\n"
            others = [n for n in names if n != target]
            if len(others) >= 3 and len(prompt) <= cfg.max_prompt_chars:
                wrong = rng.sample(others, 3)
                choices = [target, *wrong]
                rng.shuffle(choices)
                items["speaker"].append({"prompt": prompt, "choices": choices, "answer": choices.index(target),
                                         "rejected": wrong[0]})
        for s in speeches:
            for j in range(1, len(s.lines)):
                prompt = f"{NEXT_LINE_Q}\n\n{s.speaker}:\n" + "\n".join(s.lines[max(0, j - 2): j]) + "\n"
                target = s.lines[j]
                wrong = _distinct_others(unique_lines, {target, *s.lines[max(0, j - 2): j]}, 3, rng)
                if wrong and len(prompt) + len(target) <= cfg.max_prompt_chars:
                    choices = [target, *wrong]
                    rng.shuffle(choices)
                    items["next_line"].append({"prompt": prompt, "choices": choices, "answer": choices.index(target),
                                               "rejected": wrong[0]})
            for line in s.lines:
                n = len(line.split())
                if 2 <= n <= 12:
                    wrong = rng.choice([k for k in range(max(1, n - 3), n + 4) if k != n])
                    items["count_words"].append({"prompt": f"{COUNT_Q}\n{line}", "answer": str(n),
                                                 "reply": f"{n} words", "rejected": f"{wrong} words"})
    return items


def _distinct_others(pool: list[str], exclude: set[str], k: int, rng: random.Random) -> list[str]:
    """k distinct members of pool outside `exclude` ([] when there are too few)."""
    if len(pool) - len(exclude) < k:  # pool holds distinct lines
        return []
    out: list[str] = []
    while len(out) < k:  # rejection sampling: a scene has far more lines than k
        x = pool[rng.randrange(len(pool))]
        if x not in exclude and x not in out:
            out.append(x)
    return out


def _sample(rows: list[dict], k: int, rng: random.Random) -> list[dict]:
    return rng.sample(rows, k) if len(rows) > k else list(rows)


def to_conversation(kind: str, item: dict) -> dict:
    reply = item["reply"] if kind == "count_words" else item["choices"][item["answer"]]
    return {"messages": [{"role": "user", "content": item["prompt"]}, {"role": "assistant", "content": reply}]}


def to_pair(kind: str, item: dict) -> dict:
    chosen = item["reply"] if kind == "count_words" else item["choices"][item["answer"]]
    return {"prompt": item["prompt"], "chosen": chosen, "rejected": item["rejected"]}


def to_eval(kind: str, item: dict, i: int) -> dict:
    if kind == "count_words":
        return {"id": f"{kind}-{i}", "prompt": item["prompt"], "answer": item["answer"]}
    return {"id": f"{kind}-{i}", "prompt": item["prompt"], "choices": item["choices"], "answer": item["answer"]}


def write_jsonl(uri: str, rows: list[dict]) -> None:
    storage.write_text(uri, "".join(json.dumps(r) + "\n" for r in rows))


def build_tasks(cfg: TasksConfig) -> dict:
    """Write every task file of `cfg.output` (see jobs.tasks); returns the counts."""
    out = storage.absolute(cfg.output)
    summary: dict = {"config": cfg.resolved(), "files": {}}
    if cfg.data is not None:
        summary["documents"], summary["files"] = build_play_tasks(cfg, out)
        print(json.dumps(summary["documents"]))
    if cfg.verifiable is not None:
        summary["files"].update(build_verifiable_tasks(cfg.verifiable, out))
    storage.write_json(storage.join(out, "manifest.json"), summary)
    print(json.dumps(summary["files"], indent=2))
    return summary


def build_play_tasks(cfg: TasksConfig, out: str) -> tuple[dict, dict]:
    """The Shakespeare tasks: (document counts, file -> rows)."""
    from jobs.data.shards import load_manifest

    manifest = load_manifest(storage.absolute(cfg.data))
    train_docs, held_docs = held_out_documents(manifest)
    rng = random.Random(cfg.seed)
    train_items = make_items(train_docs, cfg, rng)
    held_items = make_items(held_docs, cfg, rng)
    train_items = {k: _sample(v, cfg.train_items_per_kind, rng) for k, v in train_items.items()}
    held_items = {k: _sample(v, cfg.eval_items_per_kind, rng) for k, v in held_items.items()}

    sft_train = [to_conversation(k, it) for k, rows in train_items.items() for it in rows]
    sft_val = [to_conversation(k, it) for k, rows in held_items.items() for it in rows]
    pairs_train = [to_pair(k, it) for k, rows in train_items.items() for it in rows]
    pairs_val = [to_pair(k, it) for k, rows in held_items.items() for it in rows]
    for rows in (sft_train, sft_val, pairs_train, pairs_val):
        rng.shuffle(rows)
    write_jsonl(storage.join(out, "sft_train.jsonl"), sft_train)
    write_jsonl(storage.join(out, "sft_val.jsonl"), sft_val)
    write_jsonl(storage.join(out, "pairs_train.jsonl"), pairs_train)
    write_jsonl(storage.join(out, "pairs_val.jsonl"), pairs_val)
    evals = {k: [to_eval(k, it, i) for i, it in enumerate(rows)] for k, rows in held_items.items()}
    # speaker_gen asks the speaker question generatively: same items, answer is the name itself.
    evals["speaker_gen"] = [{"id": f"speaker_gen-{i}", "prompt": it["prompt"], "answer": it["choices"][it["answer"]]}
                            for i, it in enumerate(held_items["speaker"])]
    for kind, rows in evals.items():
        write_jsonl(storage.join(out, "eval", f"{kind}.jsonl"), rows)
    # a few held-out questions as chat prompts, for jobs.generate's prompts_file
    prompts = [{"messages": [{"role": "user", "content": it["prompt"]}]} for rows in held_items.values() for it in rows[:3]]
    write_jsonl(storage.join(out, "prompts.jsonl"), prompts)
    documents = {"train": len(train_docs), "held_out": len(held_docs)}
    files = {
        "sft_train.jsonl": len(sft_train), "sft_val.jsonl": len(sft_val),
        "pairs_train.jsonl": len(pairs_train), "pairs_val.jsonl": len(pairs_val),
        **{f"eval/{k}.jsonl": len(v) for k, v in evals.items()}, "prompts.jsonl": len(prompts),
    }
    return documents, files


def build_verifiable_tasks(cfg: VerifiableConfig, out: str) -> dict:
    """The verifiable tasks (jobs.data.verifiable): file -> rows."""
    items = {t: verifiable.make_task(t, cfg.seed, cfg.eval_items, cfg.sft_items, cfg.rl_items, cfg.addition_digits)
             for t in cfg.tasks}
    rng = random.Random(f"{cfg.seed}:files")
    rl_train = [it for t in cfg.tasks for it in items[t]["rl"]]
    sft_train = [verifiable.to_conversation(it) for t in cfg.tasks for it in items[t]["sft"]]
    for rows in (rl_train, sft_train):
        rng.shuffle(rows)
    files = {
        "rl_train.jsonl": rl_train,
        "rl_eval.jsonl": [it for t in cfg.tasks for it in items[t]["eval"]],
        "verifiable_sft_train.jsonl": sft_train,
        "verifiable_sft_val.jsonl": [verifiable.to_conversation(it) for t in cfg.tasks for it in items[t]["eval"]],
        **{f"eval/{t}.jsonl": [verifiable.to_eval(it, i) for i, it in enumerate(items[t]["eval"])] for t in cfg.tasks},
    }
    for name, rows in files.items():
        write_jsonl(storage.join(out, name), rows)
    return {name: len(rows) for name, rows in files.items()}
