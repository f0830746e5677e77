"""A checkpoint behind OpenAI-compatible HTTP endpoints: the Ray Serve deployment that
`python -m jobs.serve` runs.

Endpoints (FastAPI ingress):

    POST /v1/completions        {"prompt": "ROMEO:\\n", "max_tokens": 32, "stream": false, ...}
    POST /v1/chat/completions   {"messages": [{"role": "user", "content": "..."}], "stream": true, ...}
    GET  /v1/models, GET /health

Non-streaming requests go through `@serve.batch`: requests that arrive together are decoded in
one left-padded batch with the KV cache, whatever their prompts' lengths (see
jobs.infer.generate.complete_batch). Streaming requests (`"stream": true`, served as server-sent
events `data: {...}` ending with `data: [DONE]`) are decoded one request at a time with their
own KV cache, yielding each token as soon as it is sampled; the model runs in a
thread so the replica keeps accepting requests meanwhile. Chat requests use the chat template of
jobs.data.chat and stop at <|end|>; completions stop at <|endoftext|>.
"""

import asyncio
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass

from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from jobs.data.chat import Message
from jobs.infer.config import ServeConfig


# ----------------------------------------------------------------------------- request schemas
# (no `from __future__ import annotations` in this module: FastAPI must see the request models as
# classes on the ingress methods, not as strings, or it reads them as query parameters)


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send OpenAI fields this server does not use
    model: str | None = None
    prompt: str
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False


@dataclass
class GenJob:
    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop_ids: tuple[int, ...]


def stop_strings(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stops if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


class Decoder:
    """One request's incremental decoding with its own KV cache: `step()` returns the next token."""

    def __init__(self, model, ids: list[int], max_new: int, temperature: float, top_p: float):
        import torch

        from model.gpt import KVCache

        self.model, self.temperature, self.top_p = model, temperature, top_p
        device = next(model.parameters()).device
        self.cache = KVCache(model.cfg, 1, len(ids) + max_new, device, model.tok_emb.weight.dtype)
        with torch.no_grad():
            self.logits = model(torch.tensor([ids], device=device), cache=self.cache)[:, -1, :]

    def step(self) -> int:
        import torch

        from model.gpt import sample

        with torch.no_grad():
            nxt = sample(self.logits, self.temperature, None, self.top_p if self.top_p < 1 else None)
            if self.cache.pos < self.cache.k.size(3):
                self.logits = self.model(nxt, cache=self.cache)[:, -1, :]
        return int(nxt)


# ----------------------------------------------------------------------------- deployment

app = FastAPI(title="raylm")


@serve.deployment
@serve.ingress(app)
class LLMServer:
    def __init__(self, checkpoint: str, model_name: str, max_batch_size: int, batch_wait_timeout_s: float,
                 max_tokens_limit: int, use_gpu: bool):
        import torch

        from jobs.checkpoint.load import load_model
        from jobs.data.chat import is_chat_model, special_ids
        from model.tokenizer import EOT

        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model, self.tok, state = load_model(checkpoint, device)
        self.model.eval()
        self.checkpoint, self.model_name, self.step = checkpoint, model_name, state.get("step")
        self.chat_tuned = is_chat_model(state)
        self.eot, self.end = self.tok.token_to_id(EOT), special_ids(self.tok)["end"]
        self.max_tokens_limit = max_tokens_limit
        self.batch_sizes: Counter[int] = Counter()
        self.generate_batched.set_max_batch_size(max_batch_size)
        self.generate_batched.set_batch_wait_timeout_s(batch_wait_timeout_s)

    # -- shared

    def _budget(self, ids: list[int], max_tokens: int) -> int:
        room = self.model.cfg.max_seq_len - len(ids)
        if room <= 0:
            raise HTTPException(400, f"prompt of {len(ids)} tokens fills the context of {self.model.cfg.max_seq_len}")
        return min(max_tokens, self.max_tokens_limit, room)

    def _decode(self, ids: list[int]) -> str:
        from model.tokenizer import decode

        return decode(self.tok, ids)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def generate_batched(self, jobs: list[GenJob]) -> list[tuple[list[int], str]]:
        self.batch_sizes[len(jobs)] += 1
        return await asyncio.to_thread(self._run_batch, jobs)

    def _run_batch(self, jobs: list[GenJob]) -> list[tuple[list[int], str]]:
        """(new tokens, finish reason) per job; jobs with equal sampling settings share a batch."""
        from jobs.infer.generate import complete_batch

        out: list = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, j in enumerate(jobs):
            groups.setdefault((j.temperature, j.top_p, j.stop_ids), []).append(i)
        for (temperature, top_p, stop_ids), members in groups.items():
            longest = max(jobs[i].max_tokens for i in members)
            new = complete_batch(self.model, [jobs[i].ids for i in members], longest, list(stop_ids),
                                 temperature, None, top_p if top_p < 1 else None)
            for i, ids in zip(members, new):
                ids = ids[: jobs[i].max_tokens]
                out[i] = (ids, "length" if len(ids) == jobs[i].max_tokens else "stop")
        return out

    async def _stream(self, job: GenJob, stops: list[str], chunk):
        """SSE events: one per piece of new text, then the finish reason, then [DONE]."""
        decoder = await asyncio.to_thread(Decoder, self.model, job.ids, job.max_tokens, job.temperature, job.top_p)
        ids: list[int] = []
        sent = ""
        hold = max((len(s) for s in stops), default=1) - 1  # text that may still become a stop string
        finish = "length"
        for _ in range(job.max_tokens):
            t = await asyncio.to_thread(decoder.step)
            if t in job.stop_ids:
                finish = "stop"
                break
            ids.append(t)
            text, stopped = cut_at_stop(self._decode(ids), stops)
            if stopped:
                finish = "stop"
                break
            if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
                continue
            ready = text[: len(text) - hold] if hold else text
            if len(ready) > len(sent):
                yield f"data: {json.dumps(chunk(ready[len(sent):], None))}\n\n"
                sent = ready
        final = cut_at_stop(self._decode(ids), stops)[0]
        if len(final) > len(sent):
            yield f"data: {json.dumps(chunk(final[len(sent):], None))}\n\n"
        yield f"data: {json.dumps(chunk(None, finish))}\n\n"
        yield "data: [DONE]\n\n"

    async def _complete(self, job: GenJob, stops: list[str]) -> tuple[str, str, int]:
        ids, finish = await self.generate_batched(job)
        text, stopped = cut_at_stop(self._decode(ids), stops)
        return text, "stop" if stopped else finish, len(ids)

    # -- routes

    @app.get("/health")
    def health(self) -> dict:
        return {"status": "ok", "checkpoint": self.checkpoint, "step": self.step}

    @app.get("/v1/models")
    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "raylm",
                                            "checkpoint": self.checkpoint, "chat_tuned": self.chat_tuned}]}

    @app.post("/v1/completions")
    async def completions(self, req: CompletionRequest):
        from model.tokenizer import encode

        ids = encode(self.tok, req.prompt) or [self.eot]
        job = GenJob(ids, self._budget(ids, req.max_tokens), req.temperature, req.top_p, (self.eot,))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text, finish):
            return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                    "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}

        if req.stream:
            return StreamingResponse(self._stream(job, stop_strings(req.stop), chunk), media_type="text/event-stream")
        text, finish, n = await self._complete(job, stop_strings(req.stop))
        body = chunk(text, finish)
        body["usage"] = {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}
        return body

    @app.post("/v1/chat/completions")
    async def chat_completions(self, req: ChatRequest):
        from jobs.data.chat import chat_prompt_ids

        ids = chat_prompt_ids(self.tok, req.messages)
        job = GenJob(ids, self._budget(ids, req.max_tokens), req.temperature, req.top_p, (self.end, self.eot))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text, finish):
            delta = {} if text is None else {"content": text}
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        if req.stream:
            async def events():
                first = chunk(None, None)
                first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                yield f"data: {json.dumps(first)}\n\n"
                async for e in self._stream(job, stop_strings(req.stop), chunk):
                    yield e

            return StreamingResponse(events(), media_type="text/event-stream")
        text, finish, n = await self._complete(job, stop_strings(req.stop))
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}}

    @app.get("/v1/stats")
    def stats(self) -> dict:
        """How many batches of each size `@serve.batch` has formed on this replica."""
        return {"batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}}


def build_app(cfg: ServeConfig):
    """The bound Serve application for a config (the checkpoint path already resolved)."""
    from jobs.checkpoint.load import resolve_source

    ckpt = resolve_source(cfg.checkpoint)[2]  # verified here, so a bad checkpoint fails before any replica starts
    name = cfg.model_name or ckpt.rstrip("/").split("/")[-2 if "/checkpoint_" in ckpt else -1]
    return LLMServer.options(
        num_replicas=cfg.num_replicas,
        ray_actor_options={"num_cpus": 1, "num_gpus": 1 if cfg.use_gpu else 0},
    ).bind(ckpt, name, cfg.max_batch_size, cfg.batch_wait_timeout_s, cfg.max_tokens_limit, cfg.use_gpu)
