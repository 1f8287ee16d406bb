"""Personas: who the bot plays, loaded from `personas/` — our YAML/JSON files and
SillyTavern / TavernAI character cards (V1, V2, V3; JSON or PNG, parsed by `bot.cards`).

A persona becomes the prompt's preamble (system prompt, lorebook entries, description,
personality, scenario, example dialogue), optional post-history instructions, and for
roleplay characters a response prefix (`Name: `), with `{{char}}` / `{{user}}` rendered.
`creator_notes` are kept for people and never reach the prompt.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from bot.cards import CardError, card_from_bytes, check_card
from bot.lorebook import Lorebook, lorebook_from_dict

log = logging.getLogger(__name__)

DEFAULT_PERSONA = "hermes"
MAX_PERSONA_BYTES = 1_000_000
PERSONA_SUFFIXES = {".yaml", ".yml", ".json", ".png"}
# What a card's system_prompt "{{original}}" stands for: the default roleplay instruction.
ROLEPLAY_SYSTEM_PROMPT = (
    "Write {{char}}'s next reply in a fictional chat between {{char}} and the people in this "
    "conversation. Stay in character, write only {{char}}'s reply, and never write lines for "
    "anyone else."
)
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
    lorebook: Lorebook | None = None
    source: str = "file"  # "file" (PERSONAS_DIR), "imported" (/persona import) or "builtin"
    extra: Mapping[str, Any] = field(default_factory=dict)  # unknown fields, kept as they were

    def preamble(self, user: str, lore_before: Sequence[str] = (), lore_after: Sequence[str] = ()) -> str:
        """The text that goes before the conversation, macros rendered."""
        system = self.system_prompt
        if self.roleplay:
            system = system.replace("{{original}}", ROLEPLAY_SYSTEM_PROMPT) if system else ROLEPLAY_SYSTEM_PROMPT
        parts = [system, *lore_before, self.description]
        if self.personality:
            parts.append(f"{self.name}'s personality: {self.personality}")
        if self.scenario:
            parts.append(f"Scenario: {self.scenario}")
        parts.extend(lore_after)
        if self.mes_example:
            parts.append(f"Example dialogue:\n{self.mes_example}")
        return render_macros("\n\n".join(p.strip() for p in parts if p.strip()), self.name, user)

    def post_history(self, user: str) -> str:
        """Instructions placed after the conversation, right before the reply."""
        text = self.post_history_instructions.replace("{{original}}", "")
        return render_macros(text.strip(), self.name, user)

    @property
    def greetings(self) -> tuple[str, ...]:
        """`first_mes`, then the alternates: what /persona set can post."""
        return tuple(g for g in (self.first_mes, *self.alternate_greetings) if g.strip())

    def greeting(self, user: str, index: int = 0, rng: random.Random | None = None) -> str:
        """A greeting to post when this persona is chosen ("" if it has none): `index` 0 is
        `first_mes`, 1.. the alternates; with `rng`, one at random."""
        options = self.greetings
        if not options:
            return ""
        chosen = rng.choice(options) if rng is not None else options[min(max(index, 0), len(options) - 1)]
        return render_macros(chosen.strip(), self.name, user)

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
    "creator_notes", "roleplay", "character_book",
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
    try:
        check_card(dict(raw))
    except CardError as error:
        raise PersonaError(str(error)) from error
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
        lorebook=lorebook_from_dict(book) if isinstance(book := data.get("character_book"), Mapping) else None,
        extra={k: v for k, v in raw.items() if k not in _KNOWN and k != "data"}
        | ({"data": dict(data)} if data is not raw else {}),
    )


def load_persona_file(path: Path) -> Persona:
    """A persona from a .yaml/.yml/.json file or a .png character card."""
    if path.stat().st_size > MAX_PERSONA_BYTES and path.suffix.lower() != ".png":
        raise PersonaError(f"{path.name} is larger than {MAX_PERSONA_BYTES} bytes")
    data = path.read_bytes()
    if path.suffix.lower() in {".yaml", ".yml"}:
        try:
            raw = yaml.safe_load(data.decode("utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise PersonaError(f"{path.name} is not valid YAML: {error}") from error
        return persona_from_dict(raw)
    return persona_from_card(data, path.name)


def persona_from_card(data: bytes, filename: str) -> Persona:
    """A persona from a character card's bytes (JSON or PNG)."""
    try:
        return persona_from_dict(card_from_bytes(data))
    except (CardError, PersonaError) as error:
        raise PersonaError(f"{filename}: {error}") from error


def load_personas(folder: Path) -> dict[str, Persona]:
    """Every persona in `folder`, keyed by its file name without extension (lower case);
    malformed files are logged and skipped so one bad file does not take the others down."""
    personas: dict[str, Persona] = {}
    if not folder.is_dir():
        log.warning("PERSONAS_DIR %s does not exist: only the default assistant is available", folder)
    else:
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in PERSONA_SUFFIXES:
                continue
            try:
                persona = load_persona_file(path)
            except (PersonaError, OSError) as error:
                log.error("skipping persona file %s: %s", path.name, error)
                continue
            personas[path.stem.lower()] = persona
    personas.setdefault(DEFAULT_PERSONA, Persona(name="Hermes", roleplay=False, source="builtin"))
    return personas


def persona_key(name: str) -> str:
    """The key a persona is chosen by: its name in lower case, runs of other characters as '-'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:100] or "persona"


def merge_imported(personas: dict[str, Persona], cards: Mapping[str, Mapping[str, Any]]) -> dict[str, Persona]:
    """Add the cards imported through Discord; a file persona of the same key wins."""
    for key, card in cards.items():
        if key in personas:
            log.warning("imported persona %r is shadowed by a file of the same name", key)
            continue
        try:
            personas[key] = replace(persona_from_dict(card), source="imported")
        except PersonaError as error:
            log.error("skipping imported persona %r: %s", key, error)
    return personas
