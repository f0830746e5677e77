"""Request limits of the control API: body size, the shape of a spec before it is validated, and
error bodies that never echo more than a short prefix of what was sent.

A request is refused as cheaply as possible: the body size at the door (413, before it is read),
then JSON shape limits (nesting, list lengths, number ranges) on the parsed body, and only then
the spec's validation. Everything a tenant sends may be hostile; nothing here does work
proportional to anything but the (capped) body size.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

MAX_DEPTH = 32
MAX_KEY_CHARS = 128
MAX_ABS_NUMBER = 2**53  # integers above it lose precision as JSON numbers; no field needs more
ECHO_CHARS = 80
_LONG_WORD = re.compile(rf"\S{{{ECHO_CHARS + 1},}}")


class BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, by its Content-Length before reading it, or
    while it streams in (chunked uploads) as soon as it passes the limit."""

    def __init__(self, app, max_bytes: int | None = None):
        self.app = app
        self.max_bytes = max_bytes

    def _limit(self) -> int:
        if self.max_bytes is not None:
            return self.max_bytes
        from service.settings import get_settings

        return get_settings().max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self._limit()
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await _too_large(send, limit, "invalid Content-Length")
                if declared > limit:
                    return await _too_large(send, limit)
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _too_large(send, limit)


async def _too_large(send, limit: int, why: str | None = None) -> None:
    body = json.dumps({"detail": why or f"request body over {limit} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def short(value: Any, n: int = ECHO_CHARS) -> str:
    """A repr of `value` cut to about n characters: what an error message may quote of the input."""
    text = repr(value[: n + 1] if isinstance(value, str) else value)
    return text if len(text) <= n else text[:n] + "…"


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(body: bytes) -> Any:
    """The body as JSON, or ValueError. NaN/Infinity (which Python's json accepts) are refused, and
    a nesting too deep for the parser is an error, not a crash."""
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None


def shape_errors(raw: Any, max_items: int) -> list[tuple[tuple, str, str]]:
    """(loc, message, type) of every part of a parsed body over a limit: nesting depth, items in a
    list or mapping, key length, integers beyond +-2**53, non-finite or huge floats. Iterative, and
    stops at the first few errors, so its cost is bounded by the body size."""
    errors: list[tuple[tuple, str, str]] = []
    stack: list[tuple[Any, tuple]] = [(raw, ())]
    while stack and len(errors) < 10:
        node, loc = stack.pop()
        if len(loc) > MAX_DEPTH:
            errors.append((loc[:MAX_DEPTH], f"nested deeper than {MAX_DEPTH} levels", "too_deep"))
            continue
        if isinstance(node, dict):
            if len(node) > max_items:
                errors.append((loc, f"{len(node)} keys; at most {max_items}", "too_many_items"))
                continue
            for k, v in node.items():
                if len(k) > MAX_KEY_CHARS:
                    errors.append(((*loc, k[:40] + "…"), f"a key of {len(k)} characters; at most {MAX_KEY_CHARS}",
                                   "key_too_long"))
                else:
                    stack.append((v, (*loc, k)))
        elif isinstance(node, list):
            if len(node) > max_items:
                errors.append((loc, f"{len(node)} items; at most {max_items}", "too_many_items"))
                continue
            stack.extend((v, (*loc, i)) for i, v in enumerate(node))
        elif isinstance(node, bool) or node is None or isinstance(node, str):
            pass
        elif isinstance(node, int) and abs(node) > MAX_ABS_NUMBER or \
                isinstance(node, float) and not (math.isfinite(node) and abs(node) <= MAX_ABS_NUMBER):
            errors.append((loc, "a number beyond 2**53 in magnitude", "number_too_large"))
    return errors


# ----------------------------------------------------------------------------- error bodies


def _clean_error(e: dict) -> dict:
    out: dict[str, Any] = {"type": e.get("type", "value_error")}
    loc = list(e.get("loc", ()))[: MAX_DEPTH + 2]
    out["loc"] = [x if isinstance(x, int) or len(str(x)) <= 40 else str(x)[:40] + "…" for x in loc]
    # pydantic quotes some inputs in its messages (a union's unknown tag, a validator's value)
    msg = _LONG_WORD.sub(lambda m: m.group()[:ECHO_CHARS] + "…", str(e.get("msg", "")))
    out["msg"] = msg if len(msg) <= 500 else msg[:500] + "…"
    value = e.get("input")
    # Echo only what is short: a scalar input is useful to see, a large one is the attacker's payload.
    if value is None or isinstance(value, (bool, int, float)) and len(repr(value)) <= 40:
        out["input"] = value
    elif isinstance(value, str):
        out["input"] = value if len(value) <= ECHO_CHARS else value[:ECHO_CHARS] + "…"
    ctx = e.get("ctx")
    if isinstance(ctx, dict):
        small = {k: v for k, v in ctx.items() if isinstance(v, (int, float, bool)) or isinstance(v, str) and len(v) <= 100}
        if small:
            out["ctx"] = small
    return out


def clean_errors(errors) -> list[dict]:
    return [_clean_error(e) for e in list(errors)[:50]]


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, minus echoes of large inputs (FastAPI's default repeats the whole input)."""
    return JSONResponse(status_code=422, content=jsonable_encoder({"detail": clean_errors(exc.errors())}))
