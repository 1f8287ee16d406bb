"""What the OpenAI-compatible engine learns of its server when it starts (`probe`): the
model (`GET /v1/models`, waiting while the server starts), its context (vLLM's
`max_model_len`, llama-server's `/props`), whether it has a `/tokenize` and in which shape
(llama-server's `{"content"}` or vLLM's and SGLang's `{"prompt"}`), and whether that
tokenizer keeps special-token text as text (llama-server with `parse_special: false` that
the server honours), which decides whether prompts may travel as token ids.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from bot.engine.base import ModelLoadError
from bot.engine.common import describe_error
from bot.engine.http_calls import error_text
from bot.engine.vocab import VocabTokenizer

log = logging.getLogger("bot.engine.openai_compat")
# Control-token text of the common vocabularies: a tokenizer that parses special tokens
# makes fewer tokens of it than one that keeps it as text.
SPECIALS = "</s><eos><|endoftext|><|im_end|><end_of_turn><|eot_id|>"
SAMPLE = "### Instruction:\nAnn: Héllo wörld, 12345 🙂 tokenizers!\n\n### Response:\n"


@dataclass(frozen=True)
class ServerFacts:
    model: str
    n_ctx: int
    tokenize: str | None  # "llama" or "vllm": the shape of its /tokenize; None: it has none
    keeps_special_text: bool  # its /tokenize leaves typed control-token text as text


def split_base_url(base_url: str) -> tuple[str, str]:
    """(server root, API root): `http://h:8000/v1` and `http://h:8000` both give
    (`http://h:8000`, `http://h:8000/v1`)."""
    url = base_url.strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", url):
        raise ModelLoadError(f"OPENAI_BASE_URL must be an http(s):// URL, not {base_url!r}")
    root = url[: -len("/v1")] if url.endswith("/v1") else url
    return root, root + "/v1"


def tokenize_body(shape: str, model: str, text: str, parse_special: bool = False) -> dict[str, Any]:
    if shape == "llama":
        return {"content": text, "add_special": True, "parse_special": parse_special}
    return {"model": model, "prompt": text, "add_special_tokens": True}


def token_ids(answer: Any) -> list[int]:
    """The ids of a /tokenize answer (plain ids, or llama-server's `{"id", "piece"}` objects)."""
    return [t if isinstance(t, int) else int(t["id"]) for t in answer["tokens"]]


async def probe(session: aiohttp.ClientSession, base_url: str, wanted_model: str | None, n_ctx: int,
                start_seconds: float) -> ServerFacts:
    root, api = split_base_url(base_url)
    listed = await _models(session, api, wanted_model, start_seconds)
    names = [str(m.get("id")) for m in listed if isinstance(m, dict) and m.get("id")]
    model = wanted_model or (names[0] if names else "")
    if not model:
        raise ModelLoadError(f"{api}/models lists no model: set OPENAI_MODEL to the model the server serves")
    if wanted_model and names and wanted_model not in names:
        log.warning("%s is not among the models %s lists (%s); asking for it anyway", wanted_model, api,
                    ", ".join(names[:10]))
    lengths = [int(m["max_model_len"]) for m in listed
               if isinstance(m, dict) and m.get("id") == model and isinstance(m.get("max_model_len"), int)]
    n_ctx = min([n_ctx, *lengths, await _slot_context(session, root) or n_ctx])
    shape = await _tokenize_shape(session, root, model)
    keeps = shape == "llama" and await _keeps_special_text(session, root, model)
    return ServerFacts(model, n_ctx, shape, keeps)


async def differs(session: aiohttp.ClientSession, base_url: str, facts: ServerFacts, vocab: VocabTokenizer) -> str:
    """"" when the local vocabulary tokenizes a sample as the server does, else why not."""
    root, _ = split_base_url(base_url)
    assert facts.tokenize is not None
    try:
        theirs = token_ids(await _post(session, f"{root}/tokenize", tokenize_body(facts.tokenize, facts.model, SAMPLE)))
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError, TypeError) as error:
        return f"the server's /tokenize failed ({describe_error(error)})"
    ours = vocab.tokenize(SAMPLE)
    return "" if ours == theirs else f"{len(ours)} local tokens vs {len(theirs)} from the server"


async def _post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=10)) as response:
        if response.status != 200:
            raise ValueError(f"HTTP {response.status}")
        return await response.json(content_type=None)


async def _models(session: aiohttp.ClientSession, api: str, wanted: str | None, start_seconds: float) -> list[Any]:
    deadline = time.monotonic() + start_seconds
    while True:
        try:
            async with session.get(f"{api}/models", timeout=aiohttp.ClientTimeout(total=10)) as response:
                if response.status in (401, 403):
                    raise ModelLoadError(f"{api}/models refused the API key (HTTP {response.status}): "
                                         "set OPENAI_API_KEY to a key the server accepts")
                if response.status == 200:
                    data = await response.json(content_type=None)
                    listed = data.get("data") if isinstance(data, dict) else None
                    return listed if isinstance(listed, list) else []
                problem = f"HTTP {response.status}: {await error_text(response)}"
                if response.status == 404:  # a server without the list (some proxies): ask with the name
                    if wanted:
                        return []
                    raise ModelLoadError(f"{api}/models is not there ({problem}): set OPENAI_MODEL")
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as error:
            problem = describe_error(error)
        if time.monotonic() >= deadline:
            raise ModelLoadError(f"the OpenAI-compatible server at {api} did not answer ({problem}): "
                                 "is it running, and is OPENAI_BASE_URL right?")
        await asyncio.sleep(1.0)


async def _slot_context(session: aiohttp.ClientSession, root: str) -> int | None:
    """llama-server's per-slot context from `/props` (other servers: None)."""
    try:
        props = await _post_get(session, f"{root}/props")
        n_ctx = (props.get("default_generation_settings") or {}).get("n_ctx")
        return int(n_ctx) if n_ctx else None
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError, AttributeError, TypeError):
        return None


async def _post_get(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as response:
        if response.status != 200:
            raise ValueError(f"HTTP {response.status}")
        return await response.json(content_type=None)


async def _tokenize_shape(session: aiohttp.ClientSession, root: str, model: str) -> str | None:
    for shape in ("llama", "vllm"):
        try:
            if token_ids(await _post(session, f"{root}/tokenize", tokenize_body(shape, model, "Hello"))):
                return shape
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError, TypeError):
            continue
    return None


async def _keeps_special_text(session: aiohttp.ClientSession, root: str, model: str) -> bool:
    """Whether `parse_special: false` is honoured: then control-token text makes more tokens
    than with parsing on. (Equal counts: ignored, or a vocabulary without those tokens;
    either way the prompt travels as defanged text, which is safe.)"""
    try:
        kept = token_ids(await _post(session, f"{root}/tokenize", tokenize_body("llama", model, SPECIALS, False)))
        parsed = token_ids(await _post(session, f"{root}/tokenize", tokenize_body("llama", model, SPECIALS, True)))
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError, TypeError):
        return False
    return len(kept) > len(parsed)
