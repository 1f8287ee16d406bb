"""Real character cards for tests, written to the specs: V1 (flat JSON), V2
(`chara_card_v2`, fields under `data`), V3 (`chara_card_v3`), and PNG files whose `tEXt`
chunks carry the card as base64 JSON under `chara` / `ccv3`, with real CRCs."""

from __future__ import annotations

import base64
import functools
import json
import struct
import zlib
from typing import Any

from bot.roleplay.cards import MAX_CARD_JSON_BYTES, MAX_JSON_LISTS, MAX_JSON_OBJECTS

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(text_chunks: dict[str, bytes] | None = None, width: int = 2, height: int = 2,
        compressed: dict[str, bytes] | None = None) -> bytes:
    """A valid RGBA PNG with the given tEXt (and zTXt) chunks."""
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    rows = b"".join(b"\0" + b"\x80\x40\x20\xff" * width for _ in range(min(height, 4)))
    parts = [SIGNATURE, chunk(b"IHDR", header)]
    for key, value in (text_chunks or {}).items():
        parts.append(chunk(b"tEXt", key.encode("latin-1") + b"\0" + value))
    for key, value in (compressed or {}).items():
        parts.append(chunk(b"zTXt", key.encode("latin-1") + b"\0\0" + zlib.compress(value)))
    parts += [chunk(b"IDAT", zlib.compress(rows)), chunk(b"IEND", b"")]
    return b"".join(parts)


def b64(card: dict[str, Any]) -> bytes:
    return base64.b64encode(json.dumps(card).encode())


def png_card(card: dict[str, Any], key: str = "chara") -> bytes:
    return png({key: b64(card)})


LOREBOOK = {
    "name": "Comet lore",
    "scan_depth": 3,
    "token_budget": 60,
    "extensions": {"custom_tool": {"kept": True}},
    "entries": [
        {"keys": ["reactor"], "content": "The Comet's reactor is unstable above 90% power.",
         "enabled": True, "insertion_order": 20, "priority": 5, "id": 1, "position": "after_char",
         "extensions": {}, "case_sensitive": False, "selective": False, "constant": False},
        {"keys": ["Governor"], "content": "Governor Hale hunts smugglers personally.",
         "enabled": True, "insertion_order": 10, "priority": 9, "case_sensitive": True, "extensions": {}},
        {"keys": ["map"], "secondary_keys": ["treasure"], "selective": True,
         "content": "The star map hides a treasure route.", "enabled": True, "insertion_order": 30,
         "extensions": {}},
        {"keys": [], "constant": True, "content": "The year is 3021.", "enabled": True,
         "insertion_order": 0, "priority": 100, "extensions": {}},
        {"keys": ["reactor"], "content": "DISABLED ENTRY", "enabled": False, "insertion_order": 1, "extensions": {}},
    ],
}


def v2_card(**data: Any) -> dict[str, Any]:
    base = {
        "name": "Vex", "description": "{{char}} captains the Gilded Comet.", "personality": "bold",
        "scenario": "{{user}} boards the ship.", "first_mes": "Welcome aboard, {{user}}.",
        "mes_example": "<START>\n{{user}}: Hi\n{{char}}: Ahoy.", "creator_notes": "NOTES FOR HUMANS ONLY",
        "system_prompt": "{{original}} Keep replies under 100 words.",
        "post_history_instructions": "Stay in character as {{char}}.",
        "alternate_greetings": ["Strap in, {{user}}!", "Who let <USER> in?"],
        "character_book": LOREBOOK, "tags": ["space"], "creator": "tests", "character_version": "2",
        "extensions": {"depth_prompt": {"prompt": "x", "depth": 4}},
    }
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": base | data}


def v3_card(**data: Any) -> dict[str, Any]:
    card = v2_card(**data)
    card["spec"], card["spec_version"] = "chara_card_v3", "3.0"
    card["data"] |= {"nickname": "Cap", "group_only_greetings": [], "assets": [
        {"type": "icon", "uri": "ccdefault:", "name": "main", "ext": "png"}], "creation_date": 1700000000}
    return card


V1_CARD = {"name": "Old Vex", "description": "An old card.", "personality": "grumpy",
           "scenario": "A bar.", "first_mes": "What do you want, {{user}}?", "mes_example": ""}
PYGMALION_CARD = {"char_name": "Pyg", "char_persona": "A pygmalion-era bot.", "world_scenario": "A lab.",
                  "char_greeting": "Hello <USER>.", "example_dialogue": "You: hi\nPyg: hello"}


# --- Hostile PNGs: compression bombs within the 8 MB file limit ------------------------------

MiB = 1024 * 1024
_BOMB_SEGMENT_CACHE: dict[int, tuple[bytes, bytes]] = {}
_COMPLETE_CACHE: dict[int, bytes] = {}


def _deflate_segments(unit: int) -> tuple[bytes, bytes]:
    """(zlib header + first segment, a repeatable segment): deflate blocks for `unit` zero
    bytes each, cut by a full flush so every later segment is byte-identical and can be
    repeated without compressing anything again (~1000:1)."""
    if unit not in _BOMB_SEGMENT_CACHE:
        co = zlib.compressobj(9)
        first = co.compress(b"\0" * unit) + co.flush(zlib.Z_FULL_FLUSH)
        again = co.compress(b"\0" * unit) + co.flush(zlib.Z_FULL_FLUSH)
        _BOMB_SEGMENT_CACHE[unit] = (first, again)
    return _BOMB_SEGMENT_CACHE[unit]


def zlib_bomb(inflated: int, unit: int = MiB) -> bytes:
    """A zlib stream that inflates to `inflated` zero bytes (rounded up to `unit`), built in
    O(compressed size). Its Adler-32 trailer is left out: every sane inflater stops at its
    size cap long before it would read it."""
    first, again = _deflate_segments(unit)
    return first + again * max(0, -(-inflated // unit) - 1)


def _complete_bomb(size: int) -> bytes:
    """A complete zlib stream of `size` zero bytes (what the old parser inflated and kept)."""
    if size not in _COMPLETE_CACHE:
        _COMPLETE_CACHE[size] = zlib.compress(bytes(size), 9)
    return _COMPLETE_CACHE[size]


def text_chunk(kind: bytes, keyword: bytes, payload: bytes) -> bytes:
    """A tEXt (payload as is), zTXt or iTXt (payload already zlib-compressed) chunk."""
    if kind == b"tEXt":
        return chunk(kind, keyword + b"\0" + payload)
    if kind == b"zTXt":
        return chunk(kind, keyword + b"\0\0" + payload)
    return chunk(kind, keyword + b"\0\1\0en\0\0" + payload)  # iTXt, compressed, language 'en'


def bomb_png(text_chunks: list[bytes], size_limit: int = 8 * MiB) -> bytes:
    """A 2×2 PNG with the given text chunks before its pixels; at most `size_limit` bytes."""
    head = png()[: len(SIGNATURE) + 25]  # signature + IHDR
    tail = png()[len(head) :]  # IDAT + IEND
    data = head + b"".join(text_chunks) + tail
    assert len(data) <= size_limit, len(data)
    return data


def many_chunk_bomb(kind: bytes, keyword: bytes = b"Comment", budget: int = 8 * MiB - 4096,
                    per_chunk: int = 4 * MiB) -> tuple[bytes, int]:
    """As many `kind` chunks as fit in `budget` bytes, each a complete zlib stream of just
    under `per_chunk` zero bytes (the old per-chunk cap), keyed `keyword` + a number so the
    old parser inflated and kept every one (or all `chara` when `keyword` is b"chara"):
    (png, chunk count)."""
    payload = _complete_bomb(per_chunk - 64)
    count = budget // len(text_chunk(kind, keyword + b"0000", payload))
    numbered = keyword != b"chara"
    chunks = [text_chunk(kind, keyword + (b"%04d" % i if numbered else b""), payload) for i in range(count)]
    return bomb_png(chunks), count


def dense_card_json(json_limit: int = MAX_CARD_JSON_BYTES, objects: int = MAX_JSON_OBJECTS,
                    lists: int = MAX_JSON_LISTS) -> bytes:
    """The costliest card JSON the parser accepts: just under the size, object and list
    limits, the rest one-character non-Latin-1 strings (CPython caches none of them, and
    each costs ~80 bytes for 5 bytes of JSON)."""
    card = v2_card(name="Dense")
    extensions: dict[str, Any] = {"lists": [[]] * (lists - 100), "objects": [{}] * (objects - 100)}
    card["data"]["extensions"] = extensions
    compact = {"ensure_ascii": False, "separators": (",", ":")}
    room = json_limit - len(json.dumps(card, **compact).encode()) - 64  # type: ignore[arg-type]
    extensions["strings"] = ["\u0100"] * (room // 5)
    data = json.dumps(card, **compact).encode()  # type: ignore[arg-type]
    assert len(data) <= json_limit, len(data)
    return data


@functools.cache
def worst_cards() -> dict[str, bytes]:
    """The worst PNG cards we could build within the 8 MB limit, by name: thousands of
    compressed chunks (the old parser inflated and kept every one, 4 MiB each: ~8 GiB),
    one card chunk that inflates to ~8 GiB, a card of 700k empty chunks, and the costliest
    card that is accepted."""
    real = text_chunk(b"tEXt", b"chara", b64(v2_card(name="Bombed")))
    comments = [text_chunk(b"zTXt", b"Comment%04d" % i, _complete_bomb(4 * MiB - 64)) for i in range(1500)]
    huge = 8 * 1024 * MiB  # what one 8 MB chunk of deflate inflates to, about
    return {
        "zTXt x many, non-card keyword": many_chunk_bomb(b"zTXt")[0],
        "iTXt x many, non-card keyword": many_chunk_bomb(b"iTXt")[0],
        "zTXt x1500, then a real card": bomb_png(comments + [real]),
        "zTXt x many, all keyed chara": many_chunk_bomb(b"zTXt", b"chara")[0],
        "one chara zTXt inflating to ~8 GiB": bomb_png([text_chunk(b"zTXt", b"chara", zlib_bomb(huge, 16 * MiB))]),
        "one ccv3 iTXt inflating to ~8 GiB": bomb_png([text_chunk(b"iTXt", b"ccv3", zlib_bomb(huge, 16 * MiB))]),
        "largest accepted card: dense JSON in a chara zTXt": png(compressed={"chara": base64.b64encode(dense_card_json())}),
        "empty tEXt chunks x 700k": bomb_png([chunk(b"tEXt", b"")] * ((8 * MiB - 4096) // 12)),
        "empty tEXt chunks x 19,990, then a real card": bomb_png([chunk(b"tEXt", b"")] * 19_990 + [real]),
    }
