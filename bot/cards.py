"""Character cards (SillyTavern / TavernAI) from bytes: JSON or PNG, V1, V2 and V3.

PNG cards carry the card as base64 JSON in a `tEXt` chunk keyed `chara` (V1/V2) or `ccv3`
(V3, preferred when both are present). Only the chunk headers and text chunks are read:
pixels are never decoded, so an image bomb costs nothing, and compressed text chunks are
inflated with a hard cap. Every limit breach or malformed input raises `CardError`
with a clear message, before anything is stored.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import zlib
from typing import Any

MAX_CARD_BYTES = 8 * 1024 * 1024  # whole file
MAX_CARD_JSON_BYTES = 2 * 1024 * 1024  # the decoded card
MAX_IMAGE_SIDE = 8192
MAX_FIELD_CHARS = 32_000
MAX_LORE_ENTRIES = 500
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TEXT_FIELDS = (
    "name", "description", "personality", "scenario", "first_mes", "mes_example",
    "system_prompt", "post_history_instructions", "creator_notes",
)


class CardError(ValueError):
    """The card is malformed, hostile or too large; nothing was changed."""


def read_png_text_chunks(data: bytes) -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG, keyword → text, checking limits."""
    if not data.startswith(PNG_SIGNATURE):
        raise CardError("not a PNG file")
    chunks: dict[str, str] = {}
    offset = len(PNG_SIGNATURE)
    seen_header = False
    while offset + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        body = data[offset + 8 : offset + 8 + length]
        if len(body) != length or offset + 12 + length > len(data):
            raise CardError("the PNG is truncated")
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        if zlib.crc32(kind + body) != crc:
            raise CardError(f"the PNG's {kind.decode('latin-1')} chunk is corrupt (bad CRC)")
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
            if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
                raise CardError(f"the image is {width}×{height}; at most {MAX_IMAGE_SIDE} per side")
            seen_header = True
        elif kind in (b"tEXt", b"zTXt", b"iTXt"):
            keyword, text = _text_chunk(kind, body)
            chunks[keyword] = text
        elif kind == b"IEND":
            break
        offset += 12 + length
    if not seen_header:
        raise CardError("the PNG has no IHDR header")
    return chunks


def _inflate(data: bytes) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_CARD_JSON_BYTES * 2)
    except zlib.error as error:
        raise CardError(f"a compressed PNG text chunk is corrupt: {error}") from error
    if inflater.unconsumed_tail:
        raise CardError("a compressed PNG text chunk inflates past the size limit")
    return out


def _text_chunk(kind: bytes, body: bytes) -> tuple[str, str]:
    keyword, _, rest = body.partition(b"\0")
    name = keyword.decode("latin-1")
    if kind == b"tEXt":
        return name, rest.decode("latin-1")
    if kind == b"zTXt":
        return name, _inflate(rest[1:]).decode("latin-1")
    compressed, _method, rest = rest[0], rest[1], rest[2:]
    _language, _, rest = rest.partition(b"\0")
    _translated, _, text = rest.partition(b"\0")
    return name, (_inflate(text) if compressed else text).decode("utf-8", errors="replace")


def card_json_from_png(data: bytes) -> dict[str, Any]:
    chunks = read_png_text_chunks(data)
    raw = chunks.get("ccv3") or chunks.get("chara")
    if raw is None:
        raise CardError("the PNG has no character card (no 'chara' or 'ccv3' text chunk)")
    try:
        decoded = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as error:
        raise CardError(f"the card's base64 is invalid: {error}") from error
    return _load_json(decoded)


def _load_json(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_CARD_JSON_BYTES:
        raise CardError(f"the card is {len(data)} bytes; at most {MAX_CARD_JSON_BYTES}")
    try:
        card = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CardError(f"the card is not valid JSON: {error}") from error
    if not isinstance(card, dict):
        raise CardError("the card must be a JSON object")
    return card


def check_card(card: dict[str, Any]) -> None:
    """Limits on text length and lorebook size, for every card format."""
    data = card["data"] if isinstance(card.get("data"), dict) else card
    for key in _TEXT_FIELDS:
        value = data.get(key)
        if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
            raise CardError(f"the card's {key} is {len(value)} characters; at most {MAX_FIELD_CHARS}")
    book = data.get("character_book")
    if book is not None:
        entries = book.get("entries") if isinstance(book, dict) else None
        if not isinstance(entries, list):
            raise CardError("the card's character_book needs a list of entries")
        if len(entries) > MAX_LORE_ENTRIES:
            raise CardError(f"the lorebook has {len(entries)} entries; at most {MAX_LORE_ENTRIES}")
        for entry in entries:
            if not isinstance(entry, dict) or len(str(entry.get("content", ""))) > MAX_FIELD_CHARS:
                raise CardError("a lorebook entry is malformed or too long")


def card_from_bytes(data: bytes) -> dict[str, Any]:
    """The card's JSON object from a .png or .json file's bytes, within every limit."""
    if len(data) > MAX_CARD_BYTES:
        raise CardError(f"the file is {len(data)} bytes; cards may be at most {MAX_CARD_BYTES}")
    card = card_json_from_png(data) if data.startswith(PNG_SIGNATURE) else _load_json(data)
    check_card(card)
    return card
