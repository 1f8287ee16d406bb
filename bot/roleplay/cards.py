"""Character cards (SillyTavern / TavernAI) from bytes: JSON or PNG, V1, V2 and V3.

PNG cards carry the card as base64 JSON in a text chunk (`tEXt`, or compressed `zTXt` /
`iTXt`) keyed `chara` (V1/V2) or `ccv3` (V3, preferred when both are present).

Hostile files cost little, because of what is never done:

* pixels are never decoded (an image bomb costs nothing); only chunk headers are read;
* a text chunk's keyword is read *before* anything else: every text chunk that is not
  `chara` / `ccv3` is skipped without being inflated or copied;
* only the one card chunk that is used is inflated, incrementally
  (`zlib.decompressobj().decompress(data, max_length)`, fed 64 KiB at a time), so it never
  produces more than `MAX_CARD_TEXT_BYTES` (the base64 of a `MAX_CARD_JSON_BYTES` card): a
  compression bomb allocates at most that, whatever it would inflate to;
* at most `MAX_PNG_CHUNKS` chunks are walked, so a file of tiny chunks is refused quickly;
* the JSON may hold at most `MAX_JSON_OBJECTS` objects and `MAX_JSON_LISTS` lists, so
  2 MiB of `[{},{},…]` cannot become 50 MB of Python objects.

Every limit breach or malformed input raises `CardError` with a clear message, before
anything is stored.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import zlib
from collections.abc import Iterable
from typing import Any

MAX_CARD_BYTES = 8 * 1024 * 1024  # whole file
MAX_CARD_JSON_BYTES = 2 * 1024 * 1024  # the decoded card
MAX_CARD_TEXT_BYTES = 4 * -(-MAX_CARD_JSON_BYTES // 3)  # its base64: what a PNG may inflate to
MAX_JSON_OBJECTS = 50_000  # {} in the card; a real card with a full lorebook has a few thousand
MAX_JSON_LISTS = 100_000  # '[' characters in the card, in strings too: an upper bound on lists
MAX_IMAGE_SIDE = 8192
MAX_PNG_CHUNKS = 20_000  # 8 MB of 8 KiB IDAT chunks is ~1000; 700k empty chunks take ~1 s to walk
_INFLATE_STEP = 64 * 1024
MAX_FIELD_CHARS = 32_000
MAX_LORE_ENTRIES = 500
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CARD_KEYWORDS = ("ccv3", "chara")  # the PNG text chunks that carry a card, preferred first
_TEXT_KINDS = (b"tEXt", b"zTXt", b"iTXt")
_TEXT_FIELDS = (
    "name", "description", "personality", "scenario", "first_mes", "mes_example",
    "system_prompt", "post_history_instructions", "creator_notes",
    # Pygmalion / early TavernAI spellings
    "char_name", "char_persona", "world_scenario", "char_greeting", "example_dialogue",
)


class CardError(ValueError):
    """The card is malformed, hostile or too large; nothing was changed."""


def _chunks(view: memoryview) -> Iterable[tuple[bytes, memoryview]]:
    """(type, body) of each chunk up to IEND, CRC checked, bodies not copied."""
    offset = len(PNG_SIGNATURE)
    size = len(view)
    count = 0
    while offset + 12 <= size:
        count += 1
        if count > MAX_PNG_CHUNKS:
            raise CardError(f"the PNG has more than {MAX_PNG_CHUNKS} chunks")
        length, kind = struct.unpack_from(">I4s", view, offset)
        end = offset + 12 + length
        if end > size:
            raise CardError("the PNG is truncated")
        (crc,) = struct.unpack_from(">I", view, end - 4)
        if zlib.crc32(view[offset + 4 : end - 4]) != crc:  # type + body, contiguous
            raise CardError(f"the PNG's {kind.decode('latin-1')} chunk is corrupt (bad CRC)")
        if kind == b"IEND":
            return
        yield kind, view[offset + 8 : end - 4]
        offset = end


def _keyword(body: memoryview) -> str:
    """A text chunk's keyword (1-79 Latin-1 bytes before a NUL), read without copying the body."""
    head = bytes(body[:80])
    keyword, nul, _ = head.partition(b"\0")
    if not nul:
        return ""  # malformed: no keyword at all
    return keyword.decode("latin-1")


def find_card_chunks(data: bytes | memoryview) -> dict[str, tuple[bytes, memoryview]]:
    """The `chara` / `ccv3` text chunks of a PNG, keyword → (chunk type, body), checking the
    header and every chunk's CRC. Other text chunks are skipped unread; a repeated keyword
    keeps its last chunk."""
    view = memoryview(data)
    if bytes(view[: len(PNG_SIGNATURE)]) != PNG_SIGNATURE:
        raise CardError("not a PNG file")
    found: dict[str, tuple[bytes, memoryview]] = {}
    seen_header = False
    for kind, body in _chunks(view):
        if kind == b"IHDR":
            if len(body) < 8:
                raise CardError("the PNG's IHDR header is malformed")
            width, height = struct.unpack_from(">II", body)
            if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
                raise CardError(f"the image is {width}×{height}; at most {MAX_IMAGE_SIDE} per side")
            seen_header = True
        elif kind in _TEXT_KINDS:
            keyword = _keyword(body)
            if keyword in CARD_KEYWORDS:
                found[keyword] = (kind, body)
    if not seen_header:
        raise CardError("the PNG has no IHDR header")
    return found


def _inflate(compressed: memoryview, limit: int, keyword: str) -> bytes:
    """Inflate at most `limit` bytes. The input is fed in `_INFLATE_STEP` slices, each with
    `max_length` set to what is left of the limit, so a bomb produces at most limit + 1
    bytes and never copies more than one slice of its input: memory stays within
    limit + `_INFLATE_STEP`, whatever the stream would inflate to."""
    inflater = zlib.decompressobj()
    parts: list[bytes] = []
    produced = 0
    try:
        for start in range(0, len(compressed), _INFLATE_STEP):
            part = inflater.decompress(compressed[start : start + _INFLATE_STEP], limit - produced + 1)
            produced += len(part)
            parts.append(part)
            if produced > limit or inflater.unconsumed_tail:
                raise CardError(
                    f"the PNG's compressed {keyword!r} text chunk inflates past the size limit ({limit} bytes)"
                )
            if inflater.eof:
                break
    except zlib.error as error:
        raise CardError(f"the PNG's compressed {keyword!r} text chunk is corrupt: {error}") from error
    if not inflater.eof:
        raise CardError(f"the PNG's compressed {keyword!r} text chunk is truncated")
    return b"".join(parts)


def _chunk_text(kind: bytes, body: memoryview, keyword: str, limit: int = MAX_CARD_TEXT_BYTES) -> bytes:
    """The text of a tEXt / zTXt / iTXt chunk, at most `limit` bytes."""
    rest = body[len(keyword.encode("latin-1")) + 1 :]
    if kind == b"tEXt":
        text: memoryview | bytes = rest
    elif kind == b"zTXt":
        if len(rest) < 1 or rest[0] != 0:
            raise CardError(f"the PNG's {keyword!r} zTXt chunk uses an unknown compression method")
        return _inflate(rest[1:], limit, keyword)
    else:  # iTXt: flag, method, language\0, translated keyword\0, UTF-8 text
        if len(rest) < 2 or rest[0] not in (0, 1) or rest[1] != 0:
            raise CardError(f"the PNG's {keyword!r} iTXt chunk is malformed")
        compressed = rest[0] == 1
        rest = rest[2:]
        for _ in range(2):  # skip the language tag and the translated keyword
            head = bytes(rest[:MAX_FIELD_CHARS])  # both are short in any real file
            nul = head.find(b"\0")
            if nul < 0:
                raise CardError(f"the PNG's {keyword!r} iTXt chunk is malformed")
            rest = rest[nul + 1 :]
        if compressed:
            return _inflate(rest, limit, keyword)
        text = rest
    if len(text) > limit:
        raise CardError(f"the PNG's {keyword!r} text is {len(text)} bytes; at most {limit}")
    return bytes(text)


def card_json_from_png(data: bytes | memoryview) -> dict[str, Any]:
    """The card of a PNG: `ccv3` if present and not empty, else `chara`. Only that chunk is
    decoded; at most `MAX_CARD_TEXT_BYTES` are inflated for the whole file."""
    chunks = find_card_chunks(data)
    budget = MAX_CARD_TEXT_BYTES
    raw = b""
    for keyword in CARD_KEYWORDS:
        if keyword in chunks:
            kind, body = chunks[keyword]
            raw = _chunk_text(kind, body, keyword, budget)
            budget -= len(raw)
            if raw:
                break
    if not raw:
        raise CardError("the PNG has no character card (no 'chara' or 'ccv3' text chunk)")
    try:
        decoded = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as error:
        raise CardError(f"the card's base64 is invalid: {error}") from error
    del raw
    return _load_json(decoded)


def _counting_objects(limit: int) -> Any:
    count = 0

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal count
        count += 1
        if count > limit:
            raise CardError(f"the card has more than {limit} JSON objects")
        return dict(pairs)

    return hook


def _load_json(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    if len(data) > MAX_CARD_JSON_BYTES:
        raise CardError(f"the card is {len(data)} bytes; at most {MAX_CARD_JSON_BYTES}")
    data = bytes(data)
    if data.count(b"[") > MAX_JSON_LISTS:
        raise CardError(f"the card has more than {MAX_JSON_LISTS} '[' (JSON lists); at most {MAX_JSON_LISTS}")
    try:
        card = json.loads(data.decode("utf-8"), object_pairs_hook=_counting_objects(MAX_JSON_OBJECTS))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CardError(f"the card is not valid JSON: {error}") from error
    except RecursionError as error:
        raise CardError("the card's JSON is nested too deeply") from error
    if not isinstance(card, dict):
        raise CardError("the card must be a JSON object")
    return card


def _check_text(value: Any, what: str) -> None:
    if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
        raise CardError(f"the card's {what} is {len(value)} characters; at most {MAX_FIELD_CHARS}")


def check_card(card: dict[str, Any]) -> None:
    """Limits on text length and lorebook size, for every card format. Field *types* are
    checked where the card becomes a persona (`bot.roleplay.personas`, `bot.roleplay.lorebook`): a lorebook
    entry of the wrong shape is skipped there, with a log line, not refused here."""
    data = card["data"] if isinstance(card.get("data"), dict) else card
    for source in (card, data) if data is not card else (card,):
        for key in _TEXT_FIELDS:
            _check_text(source.get(key), key)
    greetings = data.get("alternate_greetings")
    if isinstance(greetings, list):
        for greeting in greetings:
            _check_text(greeting, "alternate greeting")
    book = data.get("character_book")
    if book is not None:
        entries = book.get("entries") if isinstance(book, dict) else None
        if not isinstance(entries, list):
            raise CardError("the card's character_book needs a list of entries")
        if len(entries) > MAX_LORE_ENTRIES:
            raise CardError(f"the lorebook has {len(entries)} entries; at most {MAX_LORE_ENTRIES}")
        for entry in entries:
            if isinstance(entry, dict):
                content = entry.get("content")
                if isinstance(content, str) and len(content) > MAX_FIELD_CHARS:
                    raise CardError(f"a lorebook entry is {len(content)} characters; at most {MAX_FIELD_CHARS}")


def card_from_bytes(data: bytes) -> dict[str, Any]:
    """The card's JSON object from a .png or .json file's bytes, within every limit."""
    if len(data) > MAX_CARD_BYTES:
        raise CardError(f"the file is {len(data)} bytes; cards may be at most {MAX_CARD_BYTES}")
    card = card_json_from_png(data) if bytes(data[:8]) == PNG_SIGNATURE else _load_json(data)
    check_card(card)
    return card
