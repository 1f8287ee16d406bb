"""A local stand-in for an OpenAI-compatible completions server, for what a real llama-server
cannot be made to show: a wrong API key, 429 with Retry-After, 5xx, a server that refuses
`seed`, a stream cut mid-reply, servers with vLLM's or no `/tokenize`.

    async with OpenAIStandIn(faults=["429", "ok"]) as server:
        engine = await OpenAIEngine.start(OpenAIConfig(server.url, ...))

Each completion request takes the next entry of `faults` (then "ok" for ever); what was
asked is kept in `requests` (body and headers), and `disconnects` counts streams the client
closed before the end.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from aiohttp import web

SPECIAL_RUN = re.compile(r"(?:</s>|<eos>|<\|[a-z_]+\|>|<(?:start|end)_of_turn>)+")
REPLY = "The sky is blue because air scatters blue light more than red light, friend."


class OpenAIStandIn:
    def __init__(self, faults: list[str] | None = None, api_key: str | None = None, tokenize: str | None = "llama",
                 models: list[dict[str, Any]] | None = None, refuse: tuple[str, ...] = (),
                 piece_seconds: float = 0.0, refuse_token_prompts: bool = False,
                 honours_parse_special: bool = True, retry_after: str = "0.2") -> None:
        self.faults = list(faults or [])
        self.api_key = api_key
        self.tokenize = tokenize  # "llama" (content, parse_special), "vllm" (prompt), None
        self.models = models if models is not None else [{"id": "standin-model", "max_model_len": 2048}]
        self.refuse = refuse  # fields answered with a 400 naming them, as strict servers do
        self.piece_seconds = piece_seconds
        self.refuse_token_prompts = refuse_token_prompts
        self.honours_parse_special = honours_parse_special  # False: as old llama-servers, always parses
        self.retry_after = retry_after
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.disconnects = 0
        self.finished = 0
        self.port = 0
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/v1/completions", self._completions)
        self._runner = web.AppRunner(app, access_log=None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> OpenAIStandIn:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()

    def _authorized(self, request: web.Request) -> bool:
        return self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}"

    @staticmethod
    def _error(status: int, message: str, **headers: str) -> web.Response:
        return web.json_response({"error": {"message": message, "type": "invalid_request_error"}},
                                 status=status, headers=headers)

    async def _models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "Incorrect API key provided")
        return web.json_response({"object": "list", "data": self.models})

    async def _tokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.tokenize == "llama" and "content" in body:
            parse = body.get("parse_special", True) or not self.honours_parse_special
            return web.json_response({"tokens": self.ids(body["content"], parse)})
        if self.tokenize == "vllm" and "prompt" in body:
            tokens = self.ids(body["prompt"])
            return web.json_response({"tokens": tokens, "count": len(tokens), "max_model_len": 2048})
        return web.Response(status=404, text="Not Found")

    @staticmethod
    def ids(text: str, parse_special: bool = False) -> list[int]:
        """A toy tokenizer: BOS, then one id per whitespace-separated word (deterministic);
        a word of control-token text is three tokens, or with `parse_special` one control
        token (id 2), as a real tokenizer makes fewer tokens of it when parsing."""
        ids = [1]
        for word in text.split():
            if SPECIAL_RUN.fullmatch(word):
                ids += [2] if parse_special else [3, sum(word.encode()) % 30000 + 4, 3]
            else:
                ids.append(sum(word.encode()) % 30000 + 4)
        return ids

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return self._error(401, "Incorrect API key provided")
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        for field in self.refuse:
            if field in body:
                return self._error(400, f"Unrecognized request argument supplied: {field}")
        if self.refuse_token_prompts and isinstance(body.get("prompt"), list):
            return self._error(400, "prompt must be a string")
        fault = self.faults.pop(0) if self.faults else "ok"
        if fault == "429":
            return self._error(429, "Rate limit reached", **{"Retry-After": self.retry_after})
        if fault == "400-context":
            return self._error(400, "the request exceeds the available context size, try increasing it")
        if fault == "400-temperature":
            return self._error(400, "Unsupported value: temperature must be at most 2")
        if fault == "json":  # a server that ignores stream: true
            words = REPLY.split(" ")[: int(body.get("max_tokens") or 16)]
            return web.json_response({"choices": [{"index": 0, "text": " ".join(words), "finish_reason": "length"}],
                                      "usage": {"prompt_tokens": 5, "completion_tokens": len(words)}})
        if fault in ("500", "502", "503"):
            return self._error(int(fault), "upstream is loading")
        if fault == "404":
            return self._error(404, f"The model `{body.get('model')}` does not exist.")
        if fault == "refused-before-text":  # the connection drops before any byte
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=200)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        words = REPLY.split(" ")[: int(body.get("max_tokens") or 16)]
        try:
            for i, word in enumerate(words):
                if fault == "cut" and i == 3:
                    assert request.transport is not None
                    request.transport.close()  # mid-reply: no finish_reason, no [DONE]
                    return response
                piece = word if i == 0 else " " + word
                await response.write(_event({"choices": [{"index": 0, "text": piece, "finish_reason": None}]}))
                if self.piece_seconds:
                    await asyncio.sleep(self.piece_seconds)
            finish = "length" if len(words) == int(body.get("max_tokens") or 16) else "stop"
            if fault != "done-without-finish":
                await response.write(_event({"choices": [{"index": 0, "text": "", "finish_reason": finish}]}))
            if (body.get("stream_options") or {}).get("include_usage"):
                prompt = body["prompt"]
                n_prompt = len(prompt) if isinstance(prompt, list) else len(self.ids(prompt))
                await response.write(_event({"choices": [], "usage": {
                    "prompt_tokens": n_prompt, "completion_tokens": len(words), "total_tokens": n_prompt + len(words)}}))
            await response.write(b"data: [DONE]\n\n")
            self.finished += 1
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            raise
        return response


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"
