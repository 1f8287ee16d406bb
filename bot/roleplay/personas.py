"""Personas: who the bot plays, loaded from `personas/` — our YAML/JSON files and
SillyTavern / TavernAI character cards (V1, V2, V3; JSON or PNG, parsed by `bot.roleplay.cards`).

A persona becomes the prompt's preamble (system prompt, lorebook entries, description,
personality, scenario, example dialogue), optional post-history instructions, and for
roleplay characters a response prefix (`Name: `), with `{{char}}` / `{{user}}` rendered.
`creator_notes` are kept for people and never reach the prompt.

Who `{{user}}` is. The preamble is the start of every prompt of a conversation, so it must
not change with the person being answered: if it did, each time another person spoke in a
group roleplay the engine would find no common prefix and evaluate the whole prompt again.
In the preamble `{{user}}` is therefore `preamble_user(speaker, people)`: the person's name
while they are the only person in the conversation's history (a DM, the terminal, a
channel where one person talks with the bot), else the stable label `GROUP_USER` ("the
user"; "The user" at the start of a sentence or line). The current speaker is named only
near the end of the prompt: in the post-history instructions (`post_history(speaker)`)
and in the speaker lines of the history itself. A greeting is posted once, to the person
who chose the persona, and keeps their name.

Every field is checked for its type (text is text, flags are true/false, lorebook numbers
are numbers); a persona's name is made safe to print as a speaker (`safe_name`). Loading
`PERSONAS_DIR` never stops on one bad file or entry: it is skipped with a log line naming it.
Cards imported through Discord are parsed off the event loop, within a time limit
(`parse_card_off_loop`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from bot.roleplay.cards import MAX_CARD_BYTES, CardError, card_from_bytes, check_card
from bot.roleplay.lorebook import Lorebook, lorebook_from_dict

log = logging.getLogger(__name__)

DEFAULT_PERSONA = "hermes"
MAX_PERSONA_BYTES = 1_000_000
MAX_NAME_CHARS = 64
CARD_PARSE_TIMEOUT_S = 5.0
CARD_PARSE_WORKERS = 2  # imports parsed at once; more wait their turn (within the timeout)
PERSONA_SUFFIXES = {".yaml", ".yml", ".json", ".png"}
# What a card's system_prompt "{{original}}" stands for: the default roleplay instruction.
ROLEPLAY_SYSTEM_PROMPT = (
    "Write {{char}}'s next reply in a fictional chat between {{char}} and the people in this "
    "conversation. Stay in character, write only {{char}}'s reply, and never write lines for "
    "anyone else."
)
_MACROS = re.compile(r"\{\{(char|user)\}\}|<(BOT|USER)>", re.I)
# What `{{user}}` becomes in the preamble once several people are in the conversation.
GROUP_USER = "the user"
# Looking back from a macro: these may stand between it and the end of the previous sentence
# ("*{{user}} waves*", "(\"{{user}}\"").
_OPENERS = " \t*_\"'(\u201c\u2018"


class PersonaError(ValueError):
    """A persona file or card is malformed; the message says which and why."""


# Removed from names: invisible format characters (zero-width spaces, bidi overrides) and
# lone surrogates. Turned into spaces: control characters (newlines, tabs), every kind of
# space and line/paragraph separator, and the '#' and ':' of a template header or speaker.
_DROP = {"Cf", "Cs"}
_SPACE = {"Cc", "Zs", "Zl", "Zp"}


def safe_name(name: str) -> str:
    """A persona name safe to print as `Name: ` at the start of a prompt line.

    The rule, applied in this order (and idempotent):

    1. NFKC normalization, so look-alikes such as the fullwidth '＃' and '：' become '#' and ':';
    2. invisible format characters (category Cf: zero-width spaces, bidi overrides) and lone
       surrogates are removed;
    3. control characters (newlines, tabs, ...), every space or separator character, and
       every '#' and ':' become a space;
    4. runs of spaces collapse to one, and the ends are stripped;
    5. the name is cut to `MAX_NAME_CHARS` (64) characters.

    So a name is one line, cannot contain a `### Instruction:` header, and cannot end a
    speaker label early (`Vex: SYSTEM:` becomes `Vex SYSTEM`): the same rule the prompt
    applies to people's display names (`bot.core.prompt.clean_name`). The result may be empty;
    `persona_from_dict` refuses a persona whose name is.
    """
    text = unicodedata.normalize("NFKC", name)
    chars = []
    for char in text:
        category = unicodedata.category(char)
        if category in _DROP:
            continue
        chars.append(" " if category in _SPACE or char in "#:" or char.isspace() else char)
    return " ".join("".join(chars).split())[:MAX_NAME_CHARS].strip()


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

    def __post_init__(self) -> None:
        # Whoever builds a Persona, its name is one safe line (see `safe_name`).
        object.__setattr__(self, "name", safe_name(self.name))

    def preamble(self, user: str, lore_before: Sequence[str] = (), lore_after: Sequence[str] = ()) -> str:
        """The text that goes before the conversation, macros rendered; `{{user}}` becomes
        `user`, which the bot chooses with `preamble_user` so that it does not depend on who
        is being answered (see the module doc). `GROUP_USER` is capitalized where a
        sentence or line starts with it."""
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
        text = "\n\n".join(p.strip() for p in parts if p.strip())
        return render_macros(text, self.name, user, sentence_case=user == GROUP_USER)

    def post_history(self, user: str) -> str:
        """Instructions placed after the conversation, right before the reply; `{{user}}`
        is the person being answered (this is near the end of the prompt, after the part
        every turn shares)."""
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


def render_macros(text: str, char: str, user: str, sentence_case: bool = False) -> str:
    """Replace {{char}}/<BOT> with the persona's name and {{user}}/<USER> with `user`.

    With `sentence_case`, a `user` that starts in lower case (the `GROUP_USER` label) gets a
    capital where it starts the text, a line or a sentence (after '.', '!' or '?'), also
    behind roleplay markup such as '*' or an opening quote."""

    def substitute(match: re.Match[str]) -> str:
        word = (match.group(1) or match.group(2)).lower()
        if word in {"char", "bot"}:
            return char
        if sentence_case and _starts_sentence(text, match.start()):
            return user[:1].upper() + user[1:]
        return user

    return _MACROS.sub(substitute, text)


def _starts_sentence(text: str, position: int) -> bool:
    before = text[:position].rstrip(_OPENERS)
    return not before or before[-1] in ".!?\n"


def _same_person(a: str, b: str) -> bool:
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


def preamble_user(speaker: str, people: Iterable[str]) -> str:
    """What `{{user}}` stands for in the preamble: `speaker` while the people who spoke in
    the conversation's history (`people`: their display names, the bot's own messages left
    out) are only them, else `GROUP_USER`.

    So a DM or the terminal keeps the person's name, and a group's preamble is the same
    whoever is answered: the engine reuses it (and everything after it) from turn to turn.
    It changes once, when a second person joins, and back only if one person alone fills
    the whole history window again."""
    return speaker if all(_same_person(name, speaker) for name in people) else GROUP_USER


def _text(value: Any, key: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise PersonaError(f"field {key!r} must be text, not {type(value).__name__}")
    return value


def _flag(value: Any, key: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise PersonaError(f"field {key!r} must be true or false, not {type(value).__name__}")
    return value


_KNOWN = {
    "name", "description", "personality", "scenario", "system_prompt",
    "post_history_instructions", "first_mes", "mes_example", "alternate_greetings",
    "creator_notes", "roleplay", "character_book",
}


def persona_from_dict(raw: Mapping[str, Any], origin: str = "") -> Persona:
    """A persona from our own format, a V2/V3 card (`data`), a V1 card or Pygmalion keys.

    Text fields must be text, `roleplay` true/false, `alternate_greetings` a list of text,
    `character_book` an object: otherwise `PersonaError`. The name is made safe
    (`safe_name`); one that is empty after that is an error. Lorebook entries of the wrong
    type are skipped (logged with `origin`, the file or card they came from)."""
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
    name = safe_name(_text(data.get("name"), "name"))
    if not name:
        raise PersonaError("a persona needs a non-empty 'name' (after removing control characters, '#' and ':')")
    greetings = data.get("alternate_greetings") or ()
    if not isinstance(greetings, (list, tuple)) or not all(isinstance(g, str) for g in greetings):
        raise PersonaError("'alternate_greetings' must be a list of text")
    book = data.get("character_book")
    if book is not None and not isinstance(book, Mapping):
        raise PersonaError(f"'character_book' must be an object, not {type(book).__name__}")
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
        roleplay=_flag(data.get("roleplay"), "roleplay", True),
        lorebook=lorebook_from_dict(book, origin or f"persona {name!r}") if book is not None else None,
        extra={k: v for k, v in raw.items() if k not in _KNOWN and k != "data"}
        | ({"data": dict(data)} if data is not raw else {}),
    )


def load_persona_file(path: Path) -> Persona:
    """A persona from a .yaml/.yml/.json file or a .png character card."""
    limit = MAX_CARD_BYTES if path.suffix.lower() == ".png" else MAX_PERSONA_BYTES
    if path.stat().st_size > limit:
        raise PersonaError(f"{path.name} is larger than {limit} bytes")
    data = path.read_bytes()
    if path.suffix.lower() in {".yaml", ".yml"}:
        try:
            raw = yaml.safe_load(data.decode("utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as error:
            raise PersonaError(f"{path.name} is not valid YAML: {error}") from error
        return persona_from_dict(raw, path.name)
    return persona_from_card(data, path.name)


def card_and_persona(data: bytes, filename: str) -> tuple[dict[str, Any], Persona]:
    """A character card's JSON object and its persona, from the file's bytes (JSON or PNG);
    `PersonaError` names the file and says what is wrong."""
    try:
        card = card_from_bytes(data)
        return card, persona_from_dict(card, filename)
    except (CardError, PersonaError) as error:
        raise PersonaError(f"{filename}: {error}") from error


def persona_from_card(data: bytes, filename: str) -> Persona:
    """A persona from a character card's bytes (JSON or PNG)."""
    return card_and_persona(data, filename)[1]


_card_pool: ThreadPoolExecutor | None = None


async def parse_card_off_loop(
    data: bytes, filename: str, timeout: float = CARD_PARSE_TIMEOUT_S
) -> tuple[dict[str, Any], Persona]:
    """`card_and_persona` in a worker thread, so a big card never blocks the event loop,
    within `timeout` seconds (`PersonaError` past it). At most `CARD_PARSE_WORKERS` cards
    are parsed at once, so simultaneous imports cannot multiply the memory a parse takes.
    A parse past its time keeps its worker until it ends (threads cannot be killed); every
    limit in `bot.roleplay.cards` keeps that short."""
    global _card_pool
    if _card_pool is None:
        _card_pool = ThreadPoolExecutor(CARD_PARSE_WORKERS, thread_name_prefix="card-parse")
    future = asyncio.get_running_loop().run_in_executor(_card_pool, card_and_persona, data, filename)
    try:
        return await asyncio.wait_for(future, timeout)
    except asyncio.TimeoutError:
        raise PersonaError(f"{filename}: reading the card took longer than {timeout:g} s; it is too complex") from None


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
            except Exception:  # a bug must not take the bot down at start-up either
                log.exception("skipping persona file %s: unexpected error", path.name)
                continue
            personas[path.stem.lower()] = persona
    personas.setdefault(DEFAULT_PERSONA, Persona(name="Hermes", roleplay=False, source="builtin"))
    return personas


def persona_key(name: str) -> str:
    """The key a persona is chosen by: its name in lower case, runs of other characters as '-'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:100] or "persona"


def scoped_key(scope: str, name: str) -> str:
    """The key of a card imported in `scope` ("g<server id>", or "u<user id>" for a DM):
    imported cards belong to where they were imported, so names only clash within a scope."""
    return f"{scope}/{persona_key(name)[:60]}"


def visible_in(key: str, scope: str | None) -> bool:
    """Shipped personas are seen everywhere; an imported one only in its own scope."""
    owner, slash, _ = key.partition("/")
    return not slash or owner == scope


def short_key(key: str) -> str:
    """What people type and see: the key without its scope."""
    return key.rpartition("/")[2]


def merge_imported(personas: dict[str, Persona], cards: Mapping[str, Mapping[str, Any]]) -> dict[str, Persona]:
    """Add the cards imported through Discord; a file persona of the same key wins."""
    for key, card in cards.items():
        if key in personas:
            log.warning("imported persona %r is shadowed by a file of the same name", key)
            continue
        try:
            personas[key] = replace(persona_from_dict(card, f"imported persona {key!r}"), source="imported")
        except PersonaError as error:
            log.error("skipping imported persona %r: %s", key, error)
        except Exception:
            log.exception("skipping imported persona %r: unexpected error", key)
    return personas
