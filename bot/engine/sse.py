"""Server-sent events as model servers stream them (llama-server's `/completion`, the OpenAI
`/v1/completions`): each `data:` line's JSON object, until `data: [DONE]` (yielded as `DONE`) or
the end of the stream. Comments (keep-alive pings) and blank separators are skipped; an event carrying
`error` and one that is not JSON raise `EngineError` with the server's own words."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from bot.engine.base import EngineError

DONE: dict[str, Any] = {}  # yielded (this very object) for `data: [DONE]`, the stream's clean end


async def data_events(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    async for raw in response.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            yield DONE
            return
        try:
            event = json.loads(data)
        except json.JSONDecodeError as error:
            raise EngineError(f"the model server sent something that is not JSON ({error})") from error
        if not isinstance(event, dict):
            raise EngineError(f"the model server sent an event that is not an object: {data[:200]!r}")
        if "error" in event:
            error = event["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            raise EngineError(f"the model server failed: {message}")
        yield event
