"""Personas: who the bot plays, loaded from `personas/` (YAML or JSON, including
SillyTavern / TavernAI character cards in their V1 and V2 JSON forms).

A persona becomes the prompt's preamble (description, personality, scenario, example
dialogue, system prompt) and, for roleplay characters, a response prefix (`Name:`), with
the `{{char}}` / `{{user}}` macros rendered.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

DEFAULT_PERSONA = "hermes"
MAX_PERSONA_BYTES = 1_000_000
_MACROS = re.compile(r"\{\{(char|user)\}\}|<(BOT|USER)>", re.I)


class PersonaError(ValueError):
    """A persona file or card is malformed; the message says which and why."""


@dataclass(frozen=True)
class Persona:
    name: str
    description: str = ""
    personality: str = ""
    scenario: str = ""
    system_prompt: str = ""
    post_history_instructions: str = ""
    first_mes: str = ""
    mes_example: str = ""
    alternate_greetings: tuple[str, ...] = ()
    creator_notes: str = ""  # for people reading the card; never sent to the model
    roleplay: bool = True  # replies open with the character's name
    extra: Mapping[str, Any] = field(default_factory=dict)  # unknown fields, kept as they were

    def preamble(self, user: str) -> str:
        """The text that goes before the conversation, macros rendered."""
        parts = [self.system_prompt]
        if self.description:
            parts.append(self.description)
        if self.personality:
            parts.append(f"{self.name}'s personality: {self.personality}")
        if self.scenario:
            parts.append(f"Scenario: {self.scenario}")
        if self.mes_example:
            parts.append(f"Example dialogue:\n{self.mes_example}")
        return render_macros("\n\n".join(p.strip() for p in parts if p.strip()), self.name, user)

    def greeting(self, user: str) -> str:
        """The first message posted when this persona is chosen ("" if it has none)."""
        return render_macros(self.first_mes.strip(), self.name, user)

    def response_prefix(self) -> str:
        return f"{self.name}: " if self.roleplay else ""


def render_macros(text: str, char: str, user: str) -> str:
    """Replace {{char}}/<BOT> with the persona's name and {{user}}/<USER> with the person's."""

    def substitute(match: re.Match[str]) -> str:
        word = (match.group(1) or match.group(2)).lower()
        return char if word in {"char", "bot"} else user

    return _MACROS.sub(substitute, text)


def _text(value: Any, key: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise PersonaError(f"field {key!r} must be text, not {type(value).__name__}")
    return value


_KNOWN = {
    "name", "description", "personality", "scenario", "system_prompt",
    "post_history_instructions", "first_mes", "mes_example", "alternate_greetings",
    "creator_notes", "roleplay",
}


def persona_from_dict(raw: Mapping[str, Any]) -> Persona:
    """A persona from our own format, a V2/V3 card (`data`), a V1 card or Pygmalion keys."""
    if not isinstance(raw, Mapping):
        raise PersonaError("a persona must be a mapping of fields")
    data: Mapping[str, Any] = raw
    if isinstance(raw.get("data"), Mapping) and str(raw.get("spec", "")).startswith("chara_card"):
        data = raw["data"]
    elif "char_name" in raw:  # Pygmalion / early TavernAI
        data = {
            "name": raw.get("char_name"),
            "description": raw.get("char_persona"),
            "scenario": raw.get("world_scenario"),
            "first_mes": raw.get("char_greeting"),
            "mes_example": raw.get("example_dialogue"),
        }
    name = _text(data.get("name"), "name").strip()
    if not name:
        raise PersonaError("a persona needs a non-empty 'name'")
    greetings = data.get("alternate_greetings") or ()
    if not isinstance(greetings, (list, tuple)) or not all(isinstance(g, str) for g in greetings):
        raise PersonaError("'alternate_greetings' must be a list of text")
    return Persona(
        name=name,
        description=_text(data.get("description"), "description"),
        personality=_text(data.get("personality"), "personality"),
        scenario=_text(data.get("scenario"), "scenario"),
        system_prompt=_text(data.get("system_prompt"), "system_prompt"),
        post_history_instructions=_text(data.get("post_history_instructions"), "post_history_instructions"),
        first_mes=_text(data.get("first_mes"), "first_mes"),
        mes_example=_text(data.get("mes_example"), "mes_example"),
        alternate_greetings=tuple(greetings),
        creator_notes=_text(data.get("creator_notes"), "creator_notes"),
        roleplay=bool(data.get("roleplay", True)),
        extra={k: v for k, v in raw.items() if k not in _KNOWN and k != "data"}
        | ({"data": dict(data)} if data is not raw else {}),
    )


def load_persona_file(path: Path) -> Persona:
    if path.stat().st_size > MAX_PERSONA_BYTES:
        raise PersonaError(f"{path.name} is larger than {MAX_PERSONA_BYTES} bytes")
    text = path.read_text(encoding="utf-8")
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise PersonaError(f"{path.name} is not valid {path.suffix[1:].upper()}: {error}") from error
    return persona_from_dict(raw)


def load_personas(folder: Path) -> dict[str, Persona]:
    """Every persona in `folder`, keyed by its file name without extension (lower case);
    malformed files are logged and skipped so one bad file does not take the others down."""
    personas: dict[str, Persona] = {}
    if not folder.is_dir():
        log.warning("PERSONAS_DIR %s does not exist: only the default assistant is available", folder)
    else:
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in {".yaml", ".yml", ".json"}:
                continue
            try:
                persona = load_persona_file(path)
            except (PersonaError, OSError, UnicodeDecodeError) as error:
                log.error("skipping persona file %s: %s", path.name, error)
                continue
            personas[path.stem.lower()] = persona
    personas.setdefault(DEFAULT_PERSONA, Persona(name="Hermes", roleplay=False))
    return personas
