"""Small HTTP helpers the engines over model servers share: a blocking JSON POST for worker
threads, and the readable reason of a failed answer."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import aiohttp


def post_json_blocking(url: str, body: dict[str, Any], timeout: float, api_key: str | None = None) -> Any:
    """POST `body` as JSON and return the answer's JSON, blocking (for worker threads)."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - the configured server
        return json.loads(response.read())


async def error_text(response: aiohttp.ClientResponse) -> str:
    """A failed answer's reason: the JSON `error.message` servers send, else the body's start."""
    try:
        text = await response.text()
    except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
        return ""
    try:
        error = json.loads(text).get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:300]
    except (ValueError, AttributeError):
        pass
    return text[:300]
