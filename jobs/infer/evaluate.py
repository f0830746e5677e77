"""Evaluation of checkpoints: perplexity, bits-per-byte and task scores (jobs.evaluate is the
command line and says what is measured)."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from cluster import storage
from jobs.checkpoint.load import load_model
from jobs.data.answers import is_correct
from jobs.data.chat import (IGNORE, Message, chat_prompt_ids, is_chat_model, pad_batch, read_records, reply_ids,
                            special_ids)
from jobs.data.shards import ShardLoader, load_manifest
from jobs.infer.config import EvaluateConfig, TaskSpec
from jobs.infer.generate import complete_batch
from jobs.posttrain.losses import sequence_logprobs
from model.tokenizer import EOT, decode, encode, tokenizer_sha256


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
    items = read_records(spec.task_file, MultipleChoiceItem if spec.type == "multiple_choice" else GenerativeItem)
    return items[: spec.limit] if spec.limit else items


# ----------------------------------------------------------------------------- scoring


def prompt_ids(tok, prompt: str, chat: bool) -> list[int]:
    return chat_prompt_ids(tok, [Message(role="user", content=prompt)]) if chat else encode(tok, prompt)


def score_multiple_choice(model, tok, items: list[MultipleChoiceItem], chat: bool, batch_size: int) -> dict:
    """Log-likelihood of each choice after the prompt; accuracy by sum and by per-byte mean."""
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
    stop = [special_ids(tok)["end"], tok.token_to_id(EOT)] if chat else [tok.token_to_id(EOT)]
    prompts = [prompt_ids(tok, it.prompt, chat) for it in items]
    outs = complete_batch(model, prompts, spec.max_new_tokens, stop)
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
