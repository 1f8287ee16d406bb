"""Persona files: the shipped ones load, malformed ones are skipped by name, macros render."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from bot.personas import DEFAULT_PERSONA, PersonaError, load_personas, persona_from_dict, render_macros

REPO = Path(__file__).resolve().parents[1]


def test_shipped_personas_load() -> None:
    personas = load_personas(REPO / "personas")
    assert {"hermes", "captain-vex", "marlowe"} <= set(personas)
    assert not personas[DEFAULT_PERSONA].roleplay
    assert personas["marlowe"].roleplay and personas["marlowe"].extra["data"]["tags"] == ["noir", "detective"]


def test_malformed_file_is_skipped_and_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "good.yaml").write_text("name: Good\n")
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    (tmp_path / "nameless.json").write_text(json.dumps({"description": "x"}))
    with caplog.at_level(logging.ERROR):
        personas = load_personas(tmp_path)
    assert set(personas) == {"good", DEFAULT_PERSONA}
    assert "broken.yaml" in caplog.text and "nameless.json" in caplog.text


def test_card_formats() -> None:
    v1 = persona_from_dict({"name": "A", "description": "d", "first_mes": "hi {{user}}"})
    pyg = persona_from_dict({"char_name": "B", "char_persona": "p", "char_greeting": "yo <USER>"})
    v2 = persona_from_dict({"spec": "chara_card_v2", "data": {"name": "C", "creator_notes": "secret"}})
    assert v1.greeting("Ann") == "hi Ann" and pyg.greeting("Ann") == "yo Ann"
    assert pyg.description == "p"
    assert "secret" not in v2.preamble("Ann")
    with pytest.raises(PersonaError, match="'alternate_greetings' must be a list"):
        persona_from_dict({"name": "D", "alternate_greetings": "oops"})


def test_macros_case_insensitive() -> None:
    assert render_macros("{{Char}} greets {{USER}}; <bot> and <User>", "Vex", "Ann") == (
        "Vex greets Ann; Vex and Ann"
    )
