"""Evaluate: perplexity, bits-per-byte and task scores of one or more checkpoints, side by side.

    python -m jobs.evaluate --config configs/posttrain-demo.yaml

* Language modelling: mean loss, perplexity and bits-per-byte on the held-out (`val`) shards of a
  jobs.prepare output. Bits-per-byte divides the summed loss by the UTF-8 bytes the targets
  decode to, so models with different tokenizers compare fairly.
* Multiple-choice tasks, JSONL `{"prompt", "choices": [...], "answer": <index>}`: each choice is
  scored by its log-likelihood after the prompt; `accuracy` picks the highest sum, `accuracy_norm`
  the highest per byte of the choice.
* Generative tasks, JSONL `{"prompt", "answer"}`: greedy decoding, then `exact` match (after
  trimming whitespace and surrounding punctuation) or `number` match (GSM8K-style extraction: the
  number after `####` if present, else the last number in the output).

Chat checkpoints (SFT/DPO, train_state says `chat_template`) see each prompt as a user turn and
answer as the assistant (choices are scored as the reply plus <|end|>); base checkpoints see the
raw prompt and continue it (a generated answer is its first non-empty line). Results go to
`output/results.json` (with the resolved config) and `output/results.md`, and print as a table.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cluster import storage
from jobs.config import JobConfig, main
from jobs.data.answers import is_correct


class TaskSpec(BaseModel):
    """One task file and how to score it."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str
    """Name in the results table."""
    task_file: str
    """JSONL items (local or s3://)."""
    type: Literal["multiple_choice", "generative"]
    """`multiple_choice`: items have choices and an answer index; `generative`: an answer string."""
    match: Literal["exact", "number"] = "exact"
    """Generative scoring: exact string match, or GSM8K-style numeric answer extraction."""
    max_new_tokens: int = Field(16, ge=1)
    """Generative tasks: the longest answer generated."""
    limit: int | None = Field(None, ge=1)
    """Score only the first this many items."""


class EvaluateConfig(JobConfig):
    """Score checkpoints on held-out shards and on multiple-choice and generative tasks."""

    kind: Literal["evaluate"] = "evaluate"
    checkpoints: list[str] = Field(min_length=1)
    """Checkpoint or run directories (a run's newest checkpoint), compared side by side in this order."""
    data: str | None = None
    """A jobs.prepare output whose `val` shards give loss, perplexity and bits-per-byte (skipped if unset)."""
    max_sequences: int | None = Field(256, ge=1)
    """Score at most this many validation sequences (None: all)."""
    tasks: list[TaskSpec] = Field(default_factory=list)
    """Task files to score."""
    batch_size: int = Field(16, ge=1)
    """Sequences per forward pass."""
    use_gpu: bool = False
    """Run each checkpoint's evaluation on a GPU worker."""
    output: str
    """Directory (local or s3://) for results.json and results.md."""

    @field_validator("tasks")
    @classmethod
    def _unique_names(cls, v):
        names = [t.name for t in v]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        return v


class MultipleChoiceItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str
    choices: list[str] = Field(min_length=2)
    answer: int

    def model_post_init(self, _):
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"answer {self.answer} is not an index into {len(self.choices)} choices")


class GenerativeItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str
    answer: str


def read_task(spec: TaskSpec) -> list:
    from jobs.chat import read_records

    items = read_records(spec.task_file, MultipleChoiceItem if spec.type == "multiple_choice" else GenerativeItem)
    return items[: spec.limit] if spec.limit else items


# ----------------------------------------------------------------------------- scoring

def prompt_ids(tok, prompt: str, chat: bool) -> list[int]:
    from jobs.chat import Message, chat_prompt_ids
    from model.tokenizer import encode

    return chat_prompt_ids(tok, [Message(role="user", content=prompt)]) if chat else encode(tok, prompt)


def score_multiple_choice(model, tok, items: list[MultipleChoiceItem], chat: bool, batch_size: int) -> dict:
    """Log-likelihood of each choice after the prompt; accuracy by sum and by per-byte mean."""
    import torch

    from jobs.chat import IGNORE, pad_batch, reply_ids, special_ids
    from jobs.posttrain.losses import sequence_logprobs
    from model.tokenizer import encode

    pad = special_ids(tok)["pad"]
    T = model.cfg.max_seq_len
    rows, owners = [], []
    for n, it in enumerate(items):
        p = prompt_ids(tok, it.prompt, chat)
        for c in it.choices:
            cont = reply_ids(tok, c) if chat else encode(tok, c)
            ctx = p[max(0, len(p) + len(cont) - T - 1):]  # drop the oldest prompt tokens if too long
            ids = ctx + cont
            rows.append((ids[:-1], [IGNORE] * (len(ctx) - 1) + cont))
            owners.append(n)
    scores = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            x, y = pad_batch(rows[i : i + batch_size], pad)
            scores += sequence_logprobs(model, x, y).tolist()
    correct = correct_norm = 0
    k = 0
    for it in items:
        s = scores[k : k + len(it.choices)]
        k += len(it.choices)
        per_byte = [v / max(1, len(c.encode())) for v, c in zip(s, it.choices)]
        correct += int(max(range(len(s)), key=s.__getitem__) == it.answer)
        correct_norm += int(max(range(len(s)), key=per_byte.__getitem__) == it.answer)
    n = len(items)
    chance = sum(1 / len(it.choices) for it in items) / n
    return {"accuracy": correct / n, "accuracy_norm": correct_norm / n, "chance": chance, "items": n}


def score_generative(model, tok, items: list[GenerativeItem], chat: bool, spec: TaskSpec) -> dict:
    from jobs.chat import generate_batch, special_ids
    from model.tokenizer import EOT, decode

    stop = [special_ids(tok)["end"], tok.token_to_id(EOT)] if chat else [tok.token_to_id(EOT)]
    prompts = [prompt_ids(tok, it.prompt, chat) for it in items]
    outs = generate_batch(model, prompts, spec.max_new_tokens, stop)
    correct, examples = 0, []
    for it, ids in zip(items, outs):
        text = decode(tok, ids)
        if not chat:  # a base model keeps writing the play: its answer is the first line it writes
            text = next((ln for ln in text.split("\n") if ln.strip()), "")
        ok = is_correct(text, it.answer, spec.match)
        correct += ok
        if len(examples) < 3:
            examples.append({"prompt": it.prompt[-80:], "output": text, "answer": it.answer, "correct": ok})
    return {"exact_match": correct / len(items), "items": len(items), "examples": examples}


def language_modelling(model, tok, data: str, max_sequences: int | None, batch_size: int) -> dict:
    """Loss (nats/token), perplexity and bits-per-byte on the val shards of a prepare output."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from jobs.prepare import load_manifest
    from jobs.pretrain import ShardLoader
    from model.tokenizer import tokenizer_sha256

    manifest = load_manifest(data)
    if manifest["tokenizer_sha256"] != tokenizer_sha256(tok):
        raise ValueError(f"data: {data} was tokenized with another tokenizer than the checkpoint's")
    if manifest["seq_len"] > model.cfg.max_seq_len:
        raise ValueError(f"data: sequences of {manifest['seq_len']} tokens exceed max_seq_len {model.cfg.max_seq_len}")
    val = ShardLoader(storage.stage_local(data), manifest, "val", seed=0)
    n = min(val.n, max_sequences or val.n)
    # Byte-level BPE: each character of a token's string is one byte; special tokens are none.
    specials = {t.content for t in tok.get_added_tokens_decoder().values()}
    nbytes = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    for s, i in tok.get_vocab().items():
        nbytes[i] = 0 if s in specials else len(s)
    nll = 0.0
    tokens = 0
    total_bytes = 0
    with torch.no_grad():
        for start in range(0, n, batch_size):
            rows = val.rows(start, min(batch_size, n - start), shuffle=False)
            logits = model(rows[:, :-1])
            nll += float(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1),
                                         reduction="sum"))
            tokens += rows[:, 1:].numel()
            total_bytes += int(nbytes[rows[:, 1:].numpy()].sum())
    loss = nll / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "bits_per_byte": nll / math.log(2) / total_bytes,
            "sequences": n, "tokens": tokens}


def evaluate_checkpoint(cfg: EvaluateConfig, ckpt: str) -> dict:
    """Everything configured, for one checkpoint (runs as a Ray task)."""
    import time

    import torch

    from jobs.chat import is_chat_model, load_model

    t0 = time.perf_counter()
    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    model, tok, state = load_model(ckpt, device)
    model.eval()
    chat = is_chat_model(state)
    out = {"checkpoint": ckpt, "kind": state.get("kind", state.get("config", {}).get("kind")),
           "step": state.get("step"), "chat": chat, "tasks": {}}
    if cfg.data:
        out["lm"] = language_modelling(model, tok, cfg.data, cfg.max_sequences, cfg.batch_size)
    for spec in cfg.tasks:
        items = read_task(spec)
        if spec.type == "multiple_choice":
            out["tasks"][spec.name] = score_multiple_choice(model, tok, items, chat, cfg.batch_size)
        else:
            out["tasks"][spec.name] = score_generative(model, tok, items, chat, spec)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


# ----------------------------------------------------------------------------- report


def table_rows(cfg: EvaluateConfig, results: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["metric"] + [f"{r['label']} ({r['kind'] or 'base'}, step {r['step']})" for r in results]
    rows = []
    if cfg.data:
        for key, fmt in (("loss", "{:.4f}"), ("perplexity", "{:.2f}"), ("bits_per_byte", "{:.4f}")):
            rows.append([f"val {key}"] + [fmt.format(r["lm"][key]) for r in results])
    for spec in cfg.tasks:
        keys = ("accuracy", "accuracy_norm") if spec.type == "multiple_choice" else ("exact_match",)
        for key in keys:
            n = results[0]["tasks"][spec.name]["items"]
            label = f"{spec.name} {key} (n={n}" + (f", chance {results[0]['tasks'][spec.name]['chance']:.2f})"
                                                     if spec.type == "multiple_choice" else ")")
            rows.append([label] + [f"{r['tasks'][spec.name][key]:.3f}" for r in results])
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def run(cfg: EvaluateConfig) -> dict:
    import ray
    from rich.console import Console
    from rich.table import Table

    from cluster.ray_utils import init_ray
    from jobs.chat import resolve_init

    cfg = cfg.model_copy(update={
        "checkpoints": [storage.absolute(c) for c in cfg.checkpoints],
        "data": storage.absolute(cfg.data) if cfg.data else None,
        "tasks": [t.model_copy(update={"task_file": storage.absolute(t.task_file)}) for t in cfg.tasks],
        "output": storage.absolute(cfg.output),
    })
    resolved = [resolve_init(c) for c in cfg.checkpoints]
    for spec in cfg.tasks:  # fail on a malformed task file before any model loads
        read_task(spec)
    init_ray()
    task = ray.remote(num_gpus=1 if cfg.use_gpu else 0)(evaluate_checkpoint)
    results = ray.get([task.remote(cfg, c) for c in resolved])
    for given, r in zip(cfg.checkpoints, results):
        r["label"] = given.rstrip("/").split("/")[-1] if "/checkpoint_" not in given else "/".join(given.split("/")[-2:])
    header, rows = table_rows(cfg, results)
    report = {"config": cfg.resolved(), "results": results, "table": {"header": header, "rows": rows}}
    storage.makedirs(cfg.output)
    storage.write_json(storage.join(cfg.output, "results.json"), report)
    storage.write_text(storage.join(cfg.output, "results.md"), markdown_table(header, rows))
    t = Table(title=f"evaluate -> {cfg.output}")
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*r)
    Console().print(t)
    return report


if __name__ == "__main__":
    main(EvaluateConfig, run)
