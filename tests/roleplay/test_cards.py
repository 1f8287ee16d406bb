"""Character cards: every format the bot accepts, and hostile files it must refuse."""

from __future__ import annotations

import base64
import gc
import json
import random
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest

import bot.roleplay.cards
from bot.roleplay.cards import (
    MAX_CARD_BYTES,
    MAX_CARD_TEXT_BYTES,
    MAX_JSON_LISTS,
    MAX_JSON_OBJECTS,
    MAX_LORE_ENTRIES,
    MAX_PNG_CHUNKS,
    CardError,
    card_from_bytes,
)
from bot.roleplay.personas import PersonaError, load_personas, persona_from_card, persona_from_dict
from tests.card_files import (
    MiB,
    PYGMALION_CARD,
    V1_CARD,
    b64,
    bomb_png,
    chunk,
    many_chunk_bomb,
    png,
    png_card,
    text_chunk,
    v2_card,
    v3_card,
    worst_cards,
    zlib_bomb,
)

MEMORY_BUDGET = 64 * MiB  # what importing any card may add to the peak, at most


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



# --- Compression bombs and other costly files: bounded memory and time ------------------------


def traced_import(data: bytes) -> tuple[int, float, object]:
    """(peak bytes added under tracemalloc, seconds, the persona or the error)."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        start = time.perf_counter()
        try:
            outcome: object = persona_from_dict(card_from_bytes(data))  # what /persona import does
        except (CardError, PersonaError) as error:
            outcome = error
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return peak, seconds, outcome


EXPECTED = {  # card name → the persona's name, or part of the error
    "zTXt x many, non-card keyword": "no character card",
    "iTXt x many, non-card keyword": "no character card",
    "zTXt x1500, then a real card": "Bombed",
    "zTXt x many, all keyed chara": "inflates past the size limit",
    "one chara zTXt inflating to ~8 GiB": "inflates past the size limit",
    "one ccv3 iTXt inflating to ~8 GiB": "inflates past the size limit",
    "largest accepted card: dense JSON in a chara zTXt": "Dense",
    "empty tEXt chunks x 700k": f"more than {MAX_PNG_CHUNKS} chunks",
    "empty tEXt chunks x 19,990, then a real card": "Bombed",
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_worst_cards_add_at_most_64_mib(name: str, record_property: pytest.RecordProperty) -> None:
    """Each of the worst cards we could build in 8 MB (the old parser held ~8 GiB for the
    many-chunk ones) adds at most 64 MiB to the traced peak, and is read in well under the
    import time limit. Measured: ≤ 5.5 MiB for every bomb, ~42 MiB for the costliest card
    that is accepted (see benchmarks/card_memory.py)."""
    data = worst_cards()[name]
    assert len(data) <= MAX_CARD_BYTES
    peak, seconds, outcome = traced_import(data)
    record_property("peak_mib", round(peak / MiB, 2))
    print(f"{name}: +{peak / MiB:.2f} MiB traced, {seconds * 1000:.0f} ms")
    assert peak <= MEMORY_BUDGET, f"{name} added {peak / MiB:.1f} MiB"
    assert seconds < 5
    expected = EXPECTED[name]
    if isinstance(outcome, ValueError):
        assert expected in str(outcome)
    else:
        assert getattr(outcome, "name", None) == expected


def test_bombs_are_built_as_the_issue_describes() -> None:
    _, ztxt = many_chunk_bomb(b"zTXt")
    _, itxt = many_chunk_bomb(b"iTXt")
    assert ztxt >= 1500 and itxt >= 1500
    assert zlib.decompressobj().decompress(zlib_bomb(64 * MiB), 64 * MiB) == bytes(64 * MiB)


def test_only_the_card_chunk_is_ever_inflated(monkeypatch: pytest.MonkeyPatch) -> None:
    """The keyword is read before anything is inflated: thousands of zTXt / iTXt chunks
    with other keywords cost no decompression at all, and of many `chara` chunks only the
    one that is used (the last) is inflated."""
    calls = []
    real = zlib.decompressobj

    def counting() -> object:
        calls.append(1)
        return real()

    monkeypatch.setattr(bot.roleplay.cards.zlib, "decompressobj", counting)
    for kind in (b"zTXt", b"iTXt"):
        with pytest.raises(CardError, match="no character card"):
            card_from_bytes(many_chunk_bomb(kind)[0])
    assert calls == []
    with pytest.raises(CardError, match="past the size limit"):
        card_from_bytes(many_chunk_bomb(b"zTXt", b"chara")[0])
    assert calls == [1]


def test_compressed_cards_within_the_cap_import() -> None:
    """zTXt and iTXt cards still work, ccv3 wins over chara, an empty ccv3 falls back to chara."""
    card = b64(v3_card(name="Compressed"))
    for kind in (b"zTXt", b"iTXt"):
        data = bomb_png([text_chunk(kind, b"ccv3", zlib.compress(card))])
        assert persona_from_card(data, "c.png").name == "Compressed"
    data = bomb_png([text_chunk(b"zTXt", b"ccv3", zlib.compress(b"")),
                     text_chunk(b"iTXt", b"chara", zlib.compress(b64(v2_card(name="Fallback"))))])
    assert persona_from_card(data, "c.png").name == "Fallback"
    plain_itxt = bomb_png([chunk(b"iTXt", b"chara\0\0\0en\0Chara\0" + b64(v2_card(name="Plain")))])
    assert persona_from_card(plain_itxt, "c.png").name == "Plain"


def test_inflate_cap_is_exact() -> None:
    """A card chunk may inflate to MAX_CARD_TEXT_BYTES, not one byte more."""
    at_cap = bomb_png([text_chunk(b"zTXt", b"chara", zlib.compress(b"A" * MAX_CARD_TEXT_BYTES))])
    past_cap = bomb_png([text_chunk(b"zTXt", b"chara", zlib.compress(b"A" * (MAX_CARD_TEXT_BYTES + 1)))])
    with pytest.raises(CardError, match="base64 is invalid|not valid JSON|at most"):
        card_from_bytes(at_cap)  # inflated fine; it just is not a card
    with pytest.raises(CardError, match="past the size limit"):
        card_from_bytes(past_cap)


def malformed_text_chunks() -> list[tuple[str, bytes, str]]:
    good = zlib.compress(b64(v2_card()))
    return [
        ("zTXt bad method", bomb_png([chunk(b"zTXt", b"chara\0\x07" + good)]), "unknown compression method"),
        ("zTXt corrupt", bomb_png([chunk(b"zTXt", b"chara\0\0" + b"\x78\x9c garbage")]), "is corrupt"),
        ("zTXt truncated", bomb_png([chunk(b"zTXt", b"chara\0\0" + good[: len(good) // 2])]), "truncated"),
        ("iTXt no flags", bomb_png([chunk(b"iTXt", b"chara\0")]), "iTXt chunk is malformed"),
        ("iTXt bad flag", bomb_png([chunk(b"iTXt", b"chara\0\x05\0en\0\0" + good)]), "iTXt chunk is malformed"),
        ("iTXt no language end", bomb_png([chunk(b"iTXt", b"chara\0\1\0en")]), "iTXt chunk is malformed"),
        ("IHDR too short", SIGNATURE_ONLY + chunk(b"IHDR", b"\0\0") + chunk(b"IEND", b""), "IHDR header is malformed"),
        ("no IHDR", SIGNATURE_ONLY + chunk(b"IEND", b""), "no IHDR"),
        ("too many chunks", bomb_png([chunk(b"tEXt", b"")] * (MAX_PNG_CHUNKS + 1)), f"more than {MAX_PNG_CHUNKS} chunks"),
        ("tEXt card too long", bomb_png([chunk(b"tEXt", b"chara\0" + b"A" * (MAX_CARD_TEXT_BYTES + 4))]), "at most"),
    ]


SIGNATURE_ONLY = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("name", "data", "message"), malformed_text_chunks(), ids=[c[0] for c in malformed_text_chunks()])
def test_malformed_text_chunks_are_refused_clearly(name: str, data: bytes, message: str) -> None:
    with pytest.raises(CardError, match=message):
        card_from_bytes(data)


def test_json_that_would_blow_up_into_objects_is_refused() -> None:
    """2 MiB of `[{},{},…]` would be ~50 MB of Python objects: counted and refused."""
    objects = b"[" + b"{}," * (MAX_JSON_OBJECTS + 1) + b"{}]"
    lists = b"[" + b"[]," * (MAX_JSON_LISTS + 1) + b"[]]"
    with pytest.raises(CardError, match="JSON objects"):
        card_from_bytes(objects)
    with pytest.raises(CardError, match="JSON lists"):
        card_from_bytes(lists)
    with pytest.raises(CardError, match="nested too deeply"):
        card_from_bytes(b'{"a":' + b"[" * 5_000 + b"]" * 5_000 + b"}")
