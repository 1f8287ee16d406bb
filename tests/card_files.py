"""Real character cards for tests, written to the specs: V1 (flat JSON), V2
(`chara_card_v2`, fields under `data`), V3 (`chara_card_v3`), and PNG files whose `tEXt`
chunks carry the card as base64 JSON under `chara` / `ccv3`, with real CRCs."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from typing import Any

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
