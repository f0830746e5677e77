"""Serving: a real Ray Serve deployment answering OpenAI-style HTTP requests on a loopback port."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_chat_base):
    from ray import serve

    from jobs.infer.serve import build_app
    from jobs.serve import ServeConfig

    root, _, _ = tiny_chat_base
    port = free_port()
    # a long batch window, so that two concurrent requests surely meet in one batch
    cfg = ServeConfig(checkpoint=str(root / "base"), port=port, max_batch_size=4, batch_wait_timeout_s=0.5)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="raylm-test", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def test_streaming_completion_matches_non_streaming(server):
    body = {"prompt": "HAMLET:\n", "max_tokens": 12, "temperature": 0}
    with httpx.Client(timeout=120) as client:
        plain = client.post(f"{server}/v1/completions", json=body)
        assert plain.status_code == 200, plain.text
        full = plain.json()
        assert full["object"] == "text_completion" and full["usage"]["prompt_tokens"] > 0
        with client.stream("POST", f"{server}/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r)
    assert events[-1] == "[DONE]" and len(events) >= 3
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    # greedy decoding: the token-by-token stream and the batched path produce the same text
    assert streamed == full["choices"][0]["text"] and streamed


def test_streaming_chat_completion(server):
    body = {"messages": [{"role": "user", "content": "Who speaks next?\n\nHAMLET:\nTo be.\n\n"}], "max_tokens": 8,
            "temperature": 0.7, "stream": True}
    with httpx.Client(timeout=120) as client, client.stream("POST", f"{server}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_two_concurrent_requests_are_batched(server):
    async def both():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                client.post(f"{server}/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "How many words are in this line?\nTo be, or not"}],
                    "max_tokens": 6, "temperature": 0}),
                client.post(f"{server}/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "How many words are in this line?\nTo be, or yes"}],
                    "max_tokens": 6, "temperature": 0}))

    with httpx.Client(timeout=30) as client:
        before = client.get(f"{server}/v1/stats").json()["batch_sizes"]
    first, second = asyncio.run(both())
    for r in (first, second):
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
        assert isinstance(out["choices"][0]["message"]["content"], str)
    with httpx.Client(timeout=30) as client:
        after = client.get(f"{server}/v1/stats").json()["batch_sizes"]
        bad = client.post(f"{server}/v1/chat/completions", json={"messages": []})
    assert after.get("2", 0) == before.get("2", 0) + 1  # both arrived in one @serve.batch call
    assert bad.status_code == 422
