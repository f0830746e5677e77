"""Chat records and the chat template: how conversations and preference pairs become tokens.

Chat template (`raylm-chat/1`), one turn per message, all markers are single special tokens:

    <|system|>You are ...<|end|><|user|>Who speaks next?<|end|><|assistant|>HERMIA<|end|>

Only assistant content and its closing <|end|> carry loss; a prompt for generation ends with
<|assistant|> and generation stops at <|end|>. SFT, DPO, reward models, RL, evaluation,
generation and serving all encode through this module.
"""

from __future__ import annotations

import json
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cluster import storage

CHAT_TEMPLATE = "raylm-chat/1"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END = "<|end|>"
PAD = "<|pad|>"
IGNORE = -100


# ----------------------------------------------------------------------------- records


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class Conversation(BaseModel):
    """One SFT example: `{"messages": [{"role": ..., "content": ...}, ...]}`."""

    model_config = ConfigDict(extra="ignore")
    messages: list[Message] = Field(min_length=1)

    @field_validator("messages")
    @classmethod
    def _has_assistant(cls, v):
        if not any(m.role == "assistant" for m in v):
            raise ValueError("needs at least one assistant message (nothing to learn otherwise)")
        return v


class PreferencePair(BaseModel):
    """One preference: a prompt (text of a user turn, or messages) and two assistant replies."""

    model_config = ConfigDict(extra="ignore")
    prompt: str | list[Message]
    chosen: str
    rejected: str

    @model_validator(mode="after")
    def _differ(self):
        if self.chosen == self.rejected:
            raise ValueError("chosen and rejected are identical")
        return self

    def prompt_messages(self) -> list[Message]:
        return [Message(role="user", content=self.prompt)] if isinstance(self.prompt, str) else self.prompt


def read_jsonl(uri: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a local or s3:// JSONL file."""
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri}: file not found")
    out = []
    for n, line in enumerate(storage.read_text(uri).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{uri}:{n}: not valid JSON: {e.msg}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{uri}:{n}: expected a JSON object, got {type(obj).__name__}")
        out.append((n, obj))
    if not out:
        raise ValueError(f"{uri}: no records")
    return out


def read_records(uri: str, cls: type[BaseModel]) -> list:
    """Validate every line of a JSONL file as `cls`; errors name the file, line and field."""
    out = []
    for n, obj in read_jsonl(uri):
        try:
            out.append(cls.model_validate(obj))
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "<record>"
            raise ValueError(f"{uri}:{n}: {field}: {first['msg']}") from None
    return out


# ----------------------------------------------------------------------------- template


def special_ids(tok) -> dict[str, int]:
    ids = {name: tok.token_to_id(t) for name, t in {**ROLE_TOKENS, "end": END, "pad": PAD}.items()}
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"tokenizer lacks the chat special tokens {missing} (train it with model.tokenizer)")
    return ids


def encode_chat(tok, messages: list[Message], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and per-token labels: the id itself on assistant tokens, IGNORE elsewhere.

    Labels are aligned with ids (label i is the target *at* position i); shift by one for
    next-token prediction.
    """
    from model.tokenizer import encode

    sp = special_ids(tok)
    ids: list[int] = []
    labels: list[int] = []
    for m in messages:
        body = [*encode(tok, m.content), sp["end"]]
        ids += [sp[m.role], *body]
        labels += [IGNORE] + (body if m.role == "assistant" else [IGNORE] * len(body))
    if add_generation_prompt:
        ids.append(sp["assistant"])
        labels.append(IGNORE)
    return ids, labels


def chat_prompt_ids(tok, messages: list[Message]) -> list[int]:
    return encode_chat(tok, messages, add_generation_prompt=True)[0]


def reply_ids(tok, text: str) -> list[int]:
    """An assistant reply as it is trained: content then <|end|>."""
    from model.tokenizer import encode

    return [*encode(tok, text), special_ids(tok)["end"]]


def sft_example(tok, conv: Conversation, max_len: int) -> tuple[list[int], list[int], bool]:
    """(inputs, targets, truncated): next-token pairs, right-truncated to max_len inputs."""
    ids, labels = encode_chat(tok, conv.messages)
    truncated = len(ids) - 1 > max_len
    ids, labels = ids[: max_len + 1], labels[: max_len + 1]
    return ids[:-1], labels[1:], truncated


def pair_example(tok, pair: PreferencePair, max_len: int) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]:
    """(chosen, rejected) as (inputs, targets). Long prompts lose their oldest tokens so that both
    replies fit; replies longer than the context are cut at the end."""
    prompt = chat_prompt_ids(tok, pair.prompt_messages())
    out = []
    for text in (pair.chosen, pair.rejected):
        reply = reply_ids(tok, text)[:max_len]
        p = prompt[max(0, len(prompt) + len(reply) - max_len - 1):]
        ids = p + reply
        labels = [IGNORE] * len(p) + reply
        out.append((ids[:-1], labels[1:]))
    return out[0], out[1]


def pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (inputs, targets) rows to the longest: pads get IGNORE targets, and causal
    attention keeps them from influencing the real tokens before them."""
    T = max(len(x) for x, _ in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    tgt = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        idx[i, : len(x)] = torch.tensor(x)
        tgt[i, : len(y)] = torch.tensor(y)
    return idx, tgt


def is_chat_model(state: dict) -> bool:
    return state.get("chat_template") == CHAT_TEMPLATE
