"""Generation from a checkpoint: prompts (raw text or chat messages) -> completions."""

from __future__ import annotations

import torch

from jobs.checkpoint.load import load_model
from jobs.data.chat import Message, chat_prompt_ids, read_jsonl, special_ids
from jobs.infer.config import GenerateConfig
from model.gpt import generate_batch
from model.tokenizer import EOT, decode, encode


def complete_batch(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int],
                   temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                   generator: torch.Generator | None = None) -> list[list[int]]:
    """Each prompt's new tokens, cut before the first stop id: the text a caller shows. Prompts of
    any lengths share one left-padded batch (model.gpt.generate_batch)."""
    new = generate_batch(model, prompts, max_new_tokens, stop_ids, temperature, top_k, top_p, generator)
    return [ids[:-1] if ids and ids[-1] in stop_ids else ids for ids in new]


def generate_file(cfg: GenerateConfig, ckpt: str) -> list[dict]:
    """Completions of every record of `prompts_file`, batch_size prompts at a time."""

    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    model, tok, state = load_model(ckpt, device)
    model.eval()
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    records, prompts = [], []
    for n, rec in read_jsonl(cfg.prompts_file):
        if "messages" in rec:
            try:
                msgs = [Message.model_validate(m) for m in rec["messages"]]
            except Exception as e:
                raise ValueError(f"{cfg.prompts_file}:{n}: messages: {e}") from None
            prompts.append(chat_prompt_ids(tok, msgs))
        elif isinstance(rec.get("prompt"), str):
            prompts.append(encode(tok, rec["prompt"]) or [tok.token_to_id(EOT)])
        else:
            raise ValueError(f"{cfg.prompts_file}:{n}: expected a \"prompt\" string or a \"messages\" list")
        records.append(rec)
    stop = [tok.token_to_id(EOT)] if cfg.stop_at_eot else []
    if any("messages" in r for r in records):
        stop = [special_ids(tok)["end"], *stop]
    out = []
    for i in range(0, len(prompts), cfg.batch_size):
        new = complete_batch(model, prompts[i : i + cfg.batch_size], cfg.max_new_tokens, stop,
                             cfg.temperature, cfg.top_k, cfg.top_p, gen)
        for rec, ids in zip(records[i : i + cfg.batch_size], new):
            out.append({**rec, "completion": decode(tok, ids), "checkpoint": ckpt, "step": state.get("step")})
    return out


def sample_texts(cfg: GenerateConfig, ckpt: str) -> list[dict]:

    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    model, tok, state = load_model(ckpt, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    eot = tok.token_to_id(EOT)
    out = []
    for prompt in cfg.prompts:
        ids = encode(tok, prompt) or [eot]
        idx = torch.tensor([ids], device=device)
        y = model.generate(idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                           top_p=cfg.top_p, stop_token=eot if cfg.stop_at_eot else None, generator=gen)
        new = [t for t in y[0, len(ids):].tolist()]
        if cfg.stop_at_eot and eot in new:
            new = new[: new.index(eot)]
        out.append({"prompt": prompt, "completion": decode(tok, new), "checkpoint": ckpt, "step": state["step"]})
    return out
