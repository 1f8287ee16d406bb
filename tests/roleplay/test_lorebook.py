"""Lorebooks: which entries a conversation activates, and what reaches the model."""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

import pytest

from bot.core.conversation import Message
from bot.roleplay.lorebook import DEFAULT_SCAN_DEPTH, DEFAULT_TOKEN_BUDGET, LoreEntry, Lorebook, lorebook_from_dict
from bot.roleplay.personas import persona_from_dict
from bot.lifecycle.responder import Responder
from bot.core.settings import load_settings
from bot.storage.store import Store
from tests.card_files import LOREBOOK, v2_card
from tests.conftest import word_tokens
from tests.e2e.scripted_engine import ScriptedEngine

BOOK = lorebook_from_dict(LOREBOOK)


def active(*texts: str, book: Lorebook = BOOK) -> tuple[list[str], list[str]]:
    return book.activate(list(texts), word_tokens)


def test_constant_entry_always_and_keys_case_insensitive_by_default() -> None:
    before, after = active("How is the REACTOR doing?")
    assert before == ["The year is 3021."]
    assert after == ["The Comet's reactor is unstable above 90% power."]  # position after_char


def test_case_sensitive_entry() -> None:
    assert "Governor Hale hunts smugglers personally." not in active("the governor is here")[0]
    assert "Governor Hale hunts smugglers personally." in active("the Governor is here")[0]


def test_selective_entry_needs_a_secondary_key() -> None:
    assert "The star map hides a treasure route." not in active("show me the map")[0]
    assert "The star map hides a treasure route." in active("the map to the treasure")[0]


def test_disabled_entry_never_and_scan_depth_limits_the_window() -> None:
    assert all("DISABLED" not in c for c in active("reactor")[0] + active("reactor")[1])
    old = active("reactor trouble", "hi", "hello", "how are you")  # scan_depth 3: too old
    assert old[1] == []


def test_insertion_order_and_budget_drop_low_priority_first() -> None:
    before, _ = active("Governor, the map, the treasure")
    assert before == ["The year is 3021.", "Governor Hale hunts smugglers personally.",
                      "The star map hides a treasure route."]
    tight = Lorebook(entries=BOOK.entries, scan_depth=3, token_budget=25)
    before, after = active("Governor, the map, the treasure, the reactor", book=tight)
    # By priority: 3021 (100) and the Governor (9) fit; the reactor (5) and the map (no
    # priority: 0) are the first to go.
    assert "The year is 3021." in before and "Governor Hale hunts smugglers personally." in before
    assert "The star map hides a treasure route." not in before
    used = sum(word_tokens(t) for t in before + after)
    assert used <= 25


def test_entry_matching_rules() -> None:
    entry = LoreEntry(keys=("Dragon",), content="x", case_sensitive=True)
    assert entry.matches("a Dragon") and not entry.matches("a dragon")
    assert not LoreEntry(keys=("x",), content="c", enabled=False, constant=True).matches("x")


async def test_what_reaches_the_model_for_a_persona_with_a_lorebook(store: Store) -> None:
    """The prompt-level view: preamble order, lore, post-history input, name prefix."""
    engine = ScriptedEngine(n_ctx=2048)
    persona = persona_from_dict(v2_card())
    settings = load_settings({"MAX_NEW_TOKENS": "64"}, dotenv_path=None)
    responder = Responder(settings, store, engine, {"hermes": persona_from_dict({"name": "Hermes", "roleplay": False}), "vex": persona})
    key = "terminal:lore"
    await store.set_persona(key, "vex")
    await store.add_message(key, Message("1", "Ann", "Is the reactor safe? The Governor is coming."))
    reply = await responder.start_reply(key, speaker="Ann")
    await reply.generation.text()
    prompt = engine.prompts[0]
    expected_order = [
        "Write Vex's next reply",  # system prompt with {{original}}
        "Keep replies under 100 words.",
        "The year is 3021.",  # constant lore, before the description
        "Governor Hale hunts smugglers personally.",
        "Vex captains the Gilded Comet.",
        "Vex's personality: bold",
        "Scenario: Ann boards the ship.",
        "The Comet's reactor is unstable above 90% power.",  # after_char lore
        "Example dialogue:\n<START>\nAnn: Hi\nVex: Ahoy.",
        "### Instruction:\nAnn: Is the reactor safe? The Governor is coming.",
        "### Input:\nStay in character as Vex.",
        "### Response:\nVex: ",
    ]
    positions = [prompt.index(part) for part in expected_order]
    assert positions == sorted(positions)
    assert prompt.endswith("### Response:\nVex: ")
    assert "NOTES FOR HUMANS ONLY" not in prompt and "star map" not in prompt
    assert "\nAnn:" in reply.prompt.stop


async def test_budget_drops_history_before_the_persona(store: Store) -> None:
    engine = ScriptedEngine(n_ctx=700)
    persona = persona_from_dict(v2_card())
    settings = load_settings({"MAX_NEW_TOKENS": "64", "N_CTX": "700"}, dotenv_path=None)
    responder = Responder(settings, store, engine, {"hermes": persona, "vex": persona})
    key = "terminal:budget"
    await store.set_persona(key, "vex")
    for i in range(60):
        await store.add_message(key, Message("1", "Ann", f"message {i} about the reactor " + "blah " * 10))
    reply = await responder.start_reply(key, speaker="Ann")
    await reply.generation.text()
    assert reply.prompt.n_tokens + 64 <= 700
    assert len(reply.prompt.messages) < 60
    assert "Vex captains the Gilded Comet." in reply.prompt.text
    assert "message 59 about the reactor" in reply.prompt.text


# --- Every field typed: a bad entry is skipped and named, never a crash -----------------------


def book_with(index: int, **fields: Any) -> dict[str, Any]:
    book = copy.deepcopy(LOREBOOK)
    book["entries"][index].update(fields)
    return book


def test_a_non_integer_insertion_order_skips_that_entry_only(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="bot.roleplay.lorebook"):
        book = lorebook_from_dict(book_with(1, insertion_order="abc", comment="Hale"), "vex.json")
    contents = [e.content for e in book.entries]
    assert "Governor Hale hunts smugglers personally." not in contents
    assert len(book.entries) == len(LOREBOOK["entries"]) - 1
    assert "The Comet's reactor is unstable above 90% power." in contents
    assert len(book.skipped) == 1 and "insertion_order must be a number" in book.skipped[0]
    # The log line names the file and the entry.
    assert "vex.json" in caplog.text and "entry 1" in caplog.text and "'Hale'" in caplog.text
    assert "insertion_order must be a number, not str 'abc'" in caplog.text


BAD_FIELDS = [
    {"insertion_order": "10"},  # the spec says number: a numeric string is not one
    {"insertion_order": 1.5},
    {"insertion_order": float("nan")},
    {"insertion_order": True},
    {"priority": "high"},
    {"priority": [1]},
    {"priority": 10**20},
    {"enabled": "yes"},
    {"constant": 1},
    {"selective": "false"},
    {"case_sensitive": None, "keys": 5},
    {"keys": [{"nested": True}]},
    {"secondary_keys": {"a": 1}},
    {"content": ["a", "list"]},
    {"position": "middle"},
    {"position": 1},
]


@pytest.mark.parametrize("fields", BAD_FIELDS, ids=[json.dumps(f, default=str) for f in BAD_FIELDS])
def test_each_wrongly_typed_field_skips_its_entry(fields: dict[str, Any]) -> None:
    book = lorebook_from_dict(book_with(0, **fields), "card.png")
    assert len(book.entries) == len(LOREBOOK["entries"]) - 1
    assert book.skipped and book.skipped[0].startswith("entry 0 (id 1)")


def test_lenient_where_the_spec_allows() -> None:
    """null means the default, a single string is one key, numbers in key lists are text,
    whole floats are whole numbers, an empty position is before_char."""
    book = lorebook_from_dict(book_with(0, enabled=None, keys="reactor", secondary_keys=[7, "x"],
                                        insertion_order=20.0, position="", priority=None))
    entry = next(e for e in book.entries if e.content.startswith("The Comet's reactor"))
    assert entry.enabled and entry.keys == ("reactor",) and entry.secondary_keys == ("7", "x")
    assert entry.insertion_order == 20 and entry.priority == 0 and entry.position == "before_char"
    assert book.skipped == ()


def test_entries_that_are_not_objects_are_skipped() -> None:
    raw = copy.deepcopy(LOREBOOK)
    raw["entries"] += ["oops", None, 3]
    book = lorebook_from_dict(raw, "card.json")
    assert len(book.entries) == len(LOREBOOK["entries"]) and len(book.skipped) == 3
    assert "entry 5: an entry must be an object, not str" in book.skipped[0]


@pytest.mark.parametrize(("settings", "expected"), [
    ({"scan_depth": "deep", "token_budget": -5}, (DEFAULT_SCAN_DEPTH, DEFAULT_TOKEN_BUDGET)),
    ({"scan_depth": 10**9, "token_budget": "lots"}, (DEFAULT_SCAN_DEPTH, DEFAULT_TOKEN_BUDGET)),
    ({"scan_depth": 0, "token_budget": 0}, (DEFAULT_SCAN_DEPTH, DEFAULT_TOKEN_BUDGET)),  # 0: default, as before
    ({"scan_depth": 4, "token_budget": 100.0}, (4, 100)),
])
def test_bad_book_settings_fall_back_to_their_defaults(settings: dict[str, Any], expected: tuple[int, int]) -> None:
    book = lorebook_from_dict(LOREBOOK | settings, "card.json")
    assert (book.scan_depth, book.token_budget) == expected
    assert len(book.entries) == len(LOREBOOK["entries"])


# ---- recursion (SillyTavern's recursive scanning) -------------------------------------------

def _entry(keys: list[str], content: str, order: int, **extensions: Any) -> dict[str, Any]:
    return {"keys": keys, "content": content, "enabled": True, "insertion_order": order,
            "extensions": extensions}


def _book(*entries: dict[str, Any], recursive: bool = True, steps: int | None = None,
          budget: int = 500) -> Lorebook:
    raw: dict[str, Any] = {"entries": list(entries), "scan_depth": 5, "token_budget": budget,
                           "recursive_scanning": recursive}
    if steps is not None:
        raw["extensions"] = {"max_recursion_steps": steps}
    return lorebook_from_dict(raw)


CHAIN = (_entry(["castle"], "The castle belongs to the duke.", 1),
         _entry(["duke"], "The duke keeps a dragon.", 2),
         _entry(["dragon"], "The dragon sleeps under the lake.", 3),
         _entry(["lake"], "The lake is frozen.", 4))


def test_recursion_follows_a_chain_of_entries_only_when_the_book_recurses() -> None:
    assert active("tell me about the castle", book=_book(*CHAIN))[0] == [
        "The castle belongs to the duke.", "The duke keeps a dragon.",
        "The dragon sleeps under the lake.", "The lake is frozen."]
    assert active("tell me about the castle", book=_book(*CHAIN, recursive=False))[0] == [
        "The castle belongs to the duke."]
    assert BOOK.recursive is False  # a book without recursive_scanning keeps the old behaviour


def test_max_recursion_steps_counts_the_first_scan() -> None:
    # SillyTavern: the loop stops once `steps` scans ran; 1 = the conversation only.
    assert active("castle", book=_book(*CHAIN, steps=1))[0] == ["The castle belongs to the duke."]
    assert active("castle", book=_book(*CHAIN, steps=2))[0] == [
        "The castle belongs to the duke.", "The duke keeps a dragon."]
    assert len(active("castle", book=_book(*CHAIN, steps=3))[0]) == 3


def test_a_cycle_terminates_and_each_entry_is_inserted_once() -> None:
    cycle = (_entry(["alpha"], "alpha mentions beta", 1), _entry(["beta"], "beta mentions gamma", 2),
             _entry(["gamma"], "gamma mentions alpha and beta", 3))
    before, _ = active("alpha", book=_book(*cycle))
    assert before == ["alpha mentions beta", "beta mentions gamma", "gamma mentions alpha and beta"]
    tokens = 0

    def counting(text: str) -> int:
        nonlocal tokens
        tokens += 1
        return word_tokens(text)

    _book(*cycle).activate(["alpha"], counting)
    assert tokens == 3  # each entry weighed once: no pass re-activates one


def test_exclude_prevent_and_delay_until_recursion() -> None:
    book = _book(
        _entry(["castle"], "The castle belongs to the duke.", 1),
        _entry(["duke"], "The duke keeps a dragon.", 2, exclude_recursion=True),
        _entry(["castle"], "Guards say the castle hides a ghost.", 3, prevent_recursion=True),
        _entry(["ghost"], "The ghost is the old king.", 4),
        _entry(["castle"], "Rumour: the castle is cursed.", 5, delay_until_recursion=True),
    )
    before, _ = active("the castle", book=book)
    # exclude_recursion: the duke comes only from the conversation, not from the castle entry.
    assert "The duke keeps a dragon." not in before
    assert "The duke keeps a dragon." in active("the castle and the duke", book=book)[0]
    # prevent_recursion: the guards' text mentions the ghost but activates nothing.
    assert "Guards say the castle hides a ghost." in before and "The ghost is the old king." not in before
    # delay_until_recursion: "castle" is in the chat, yet the entry waits for a recursion step,
    # where the castle entry's content (castle… duke) mentions it again.
    assert "Rumour: the castle is cursed." in before
    assert "Rumour: the castle is cursed." not in active("castle", book=_book(
        _entry(["castle"], "Rumour: the castle is cursed.", 5, delay_until_recursion=True)))[0]


def test_delay_levels_open_one_after_another() -> None:
    book = _book(
        _entry(["castle"], "The castle has a tower.", 1),
        _entry(["tower"], "Level two: the tower is haunted.", 2, delay_until_recursion=2),
        _entry(["tower"], "Level one: the tower is tall.", 3, delay_until_recursion=1),
    )
    assert active("castle", book=book)[0] == [
        "The castle has a tower.", "Level two: the tower is haunted.", "Level one: the tower is tall."]
    # With 2 steps only level 1 is reached.
    limited = _book(*[_entry(["castle"], "The castle has a tower.", 1),
                      _entry(["tower"], "Level two: the tower is haunted.", 2, delay_until_recursion=2),
                      _entry(["tower"], "Level one: the tower is tall.", 3, delay_until_recursion=1)], steps=2)
    assert "Level two: the tower is haunted." not in active("castle", book=limited)[0]


def test_direct_matches_win_the_budget_and_overflow_stops_recursion() -> None:
    book = _book(_entry(["castle"], "The castle belongs to the duke.", 2),
                 _entry(["duke"], "The duke keeps a dragon in the dungeon below.", 1),
                 _entry(["moat"], "The moat.", 3),
                 budget=word_tokens("The castle belongs to the duke.") + word_tokens("The moat.") + 1)
    before, _ = active("castle and moat", book=book)
    assert before == ["The castle belongs to the duke.", "The moat."]


def test_recursion_settings_of_the_wrong_type_are_ignored_with_a_note() -> None:
    book = lorebook_from_dict({"entries": list(CHAIN), "recursive_scanning": "yes",
                               "extensions": {"max_recursion_steps": "many"}})
    assert book.recursive is False and book.max_recursion_steps == 0
    assert any("recursive_scanning" in s for s in book.skipped)
    assert any("max_recursion_steps" in s for s in book.skipped)


def test_recursion_is_bounded_for_any_card() -> None:
    """A stranger's card: 500 entries chained (each names the next), a huge budget. Before the
    bounds it scanned 500 steps of a growing 2 MB text (47 s per reply); now 8 steps at most."""
    from bot.roleplay.lorebook import MAX_RECURSION_STEPS

    entries = [{"keys": [f"zq{i:04d}x"], "content": f"zq{i + 1:04d}x " + "a" * 3900, "insertion_order": i}
               for i in range(500)]
    book = lorebook_from_dict({"recursive_scanning": True, "token_budget": 1_000_000, "entries": entries})
    kept = book.activated(["hello zq0000x"], lambda text: len(text) // 4)
    assert len(kept) == MAX_RECURSION_STEPS
    assert [e.keys[0] for e in kept] == [f"zq{i:04d}x" for i in range(MAX_RECURSION_STEPS)]


def test_a_book_with_too_many_keys_keeps_the_entries_before_the_limit() -> None:
    from bot.roleplay.lorebook import MAX_KEYS

    entries = [{"keys": [f"k{i}-{j}" for j in range(100)], "content": f"entry {i}"} for i in range(MAX_KEYS // 100 + 5)]
    book = lorebook_from_dict({"entries": entries})
    assert len(book.entries) == MAX_KEYS // 100
    assert any("more than" in s for s in book.skipped)
