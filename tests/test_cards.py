"""Character cards: every format the bot accepts, and hostile files it must refuse."""

from __future__ import annotations

import base64
import json
import random
import zlib
from pathlib import Path

import pytest

from bot.cards import MAX_CARD_BYTES, MAX_LORE_ENTRIES, CardError, card_from_bytes
from bot.personas import PersonaError, load_personas, persona_from_card, persona_from_dict
from tests.card_files import PYGMALION_CARD, V1_CARD, b64, chunk, png, png_card, v2_card, v3_card


def test_v2_json_card() -> None:
    persona = persona_from_card(json.dumps(v2_card()).encode(), "vex.json")
    assert persona.name == "Vex" and persona.roleplay
    assert persona.greetings == ("Welcome aboard, {{user}}.", "Strap in, {{user}}!", "Who let <USER> in?")
    assert persona.lorebook is not None and len(persona.lorebook.entries) == 5
    # Unknown fields and extensions are kept.
    assert persona.extra["data"]["extensions"] == {"depth_prompt": {"prompt": "x", "depth": 4}}
    assert persona.extra["data"]["character_book"]["extensions"] == {"custom_tool": {"kept": True}}
    assert persona.extra["spec"] == "chara_card_v2"


def test_v1_and_pygmalion_cards() -> None:
    v1 = persona_from_card(json.dumps(V1_CARD).encode(), "old.json")
    pyg = persona_from_dict(PYGMALION_CARD)
    assert v1.name == "Old Vex" and v1.greeting("Ann") == "What do you want, Ann?"
    assert pyg.name == "Pyg" and pyg.description == "A pygmalion-era bot." and pyg.scenario == "A lab."
    assert pyg.greeting("Ann") == "Hello Ann." and "You: hi" in pyg.mes_example


def test_png_card_v2_and_v3_preferred() -> None:
    v2 = png_card(v2_card(name="Vex Two"))
    assert persona_from_card(v2, "vex.png").name == "Vex Two"
    both = png({"chara": b64(v2_card(name="Old Spec")), "ccv3": b64(v3_card(name="New Spec"))})
    persona = persona_from_card(both, "both.png")
    assert persona.name == "New Spec"
    assert persona.extra["data"]["nickname"] == "Cap"
    assert persona.extra["data"]["assets"][0]["type"] == "icon"


def test_compressed_text_chunk() -> None:
    data = png(compressed={"chara": b64(v2_card(name="Zipped"))})
    assert persona_from_card(data, "z.png").name == "Zipped"


def test_png_cards_load_from_the_personas_folder(tmp_path: Path) -> None:
    (tmp_path / "vex.png").write_bytes(png_card(v2_card()))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnonsense")
    personas = load_personas(tmp_path)
    assert personas["vex"].name == "Vex"
    assert "broken" not in personas


def hostile_cards() -> list[tuple[str, bytes, str]]:
    huge_book = v2_card(character_book={"entries": [{"keys": ["k"], "content": "c"}] * (MAX_LORE_ENTRIES + 1)})
    bad_crc = bytearray(png_card(v2_card()))
    bad_crc[40] ^= 0xFF
    bomb_text = zlib.compress(b"A" * (50 * 1024 * 1024))
    return [
        ("bad base64", png({"chara": b"!!!not base64!!!"}), "base64 is invalid"),
        ("bad json", png({"chara": base64.b64encode(b"{not json")}), "not valid JSON"),
        ("json array", json.dumps([1, 2]).encode(), "must be a JSON object"),
        ("no card", png({"Comment": b"hello"}), "no character card"),
        ("pixel bomb", png({"chara": b64(v2_card())}, width=100_000, height=100_000), "at most 8192 per side"),
        ("text bomb", png() [:-12] + chunk(b"zTXt", b"chara\0\0" + bomb_text) + chunk(b"IEND", b""), "past the size limit"),
        ("huge lorebook", json.dumps(huge_book).encode(), "lorebook has 501 entries"),
        ("long field", json.dumps(v2_card(description="x" * 40_000)).encode(), "description is 40000 characters"),
        ("bad crc", bytes(bad_crc), "bad CRC"),
        ("truncated", png_card(v2_card())[:60], "truncated"),
        ("too big", b"{" + b" " * MAX_CARD_BYTES + b"}", "cards may be at most"),
        ("not utf8", b"\xff\xfe{}", "not valid JSON"),
    ]


@pytest.mark.parametrize(("name", "data", "message"), hostile_cards(), ids=[c[0] for c in hostile_cards()])
def test_hostile_cards_are_refused_clearly(name: str, data: bytes, message: str) -> None:
    with pytest.raises(CardError, match=message):
        card_from_bytes(data)


def test_missing_name_and_wrong_types() -> None:
    with pytest.raises(PersonaError, match="non-empty 'name'"):
        persona_from_dict(v2_card(name=""))
    with pytest.raises(PersonaError, match="'description' must be text"):
        persona_from_dict(v2_card(description=["a list"]))


def test_preamble_honours_system_prompt_and_hides_creator_notes() -> None:
    persona = persona_from_dict(v2_card())
    preamble = persona.preamble("Ann")
    assert preamble.startswith("Write Vex's next reply in a fictional chat")  # {{original}}
    assert "Keep replies under 100 words." in preamble
    assert "Vex captains the Gilded Comet." in preamble and "Ann boards the ship." in preamble
    assert "NOTES FOR HUMANS ONLY" not in preamble
    assert persona.post_history("Ann") == "Stay in character as Vex."
    assert persona.response_prefix() == "Vex: "


def test_greetings_chosen_or_random() -> None:
    persona = persona_from_dict(v2_card())
    assert persona.greeting("Ann") == "Welcome aboard, Ann."
    assert persona.greeting("Ann", 2) == "Who let Ann in?"
    assert persona.greeting("Ann", 99) == "Who let Ann in?"
    picks = {persona.greeting("Ann", rng=random.Random(seed)) for seed in range(30)}
    assert len(picks) == 3

