"""Who answers in a scene, and how the characters see each other (pure)."""

from __future__ import annotations

import random

from bot.core.conversation import Message
from bot.core.prompt import render_chat, stop_sequences
from bot.roleplay.scenes import MAX_ADDRESSED, Member, as_seen_by, choose_speakers, named_in

VEX = Member("captain-vex", "Captain Vex")
MARLOWE = Member("marlowe", "Marlowe")
NYX = Member("g1:nyx", "Nyx")
CAST = [VEX, MARLOWE, NYX]


def speakers(text: str, strategy: str | None = "natural", recent: list[str] | None = None,
             replied_to: str | None = None, seed: int = 0) -> list[str]:
    return [m.name for m in choose_speakers(text, CAST, strategy, recent or [], random.Random(seed), replied_to)]


def test_a_named_character_answers_whatever_the_strategy() -> None:
    for strategy in ("natural", "list", "random"):
        assert speakers("marlowe, who did it?", strategy, recent=["marlowe"]) == ["Marlowe"]
        assert speakers("What do you think, NYX?", strategy) == ["Nyx"]


def test_names_match_whole_words_in_any_case_only() -> None:
    assert named_in("nyxes everywhere, and marlowesque prose", CAST) == []
    assert named_in("Captain Vex!", CAST) == [VEX]
    assert named_in("(nyx) and *marlowe*", CAST) == [NYX, MARLOWE]


def test_several_named_characters_answer_in_the_order_named_at_most_three() -> None:
    assert speakers("Nyx and Captain Vex, then Marlowe") == ["Nyx", "Captain Vex", "Marlowe"]
    many = [Member(f"k{i}", f"Name{i}") for i in range(6)]
    text = " ".join(m.name for m in many)
    assert len(choose_speakers(text, many, "natural", [], random.Random(0))) == MAX_ADDRESSED


def test_a_reply_to_a_character_addresses_it_first() -> None:
    assert speakers("go on", replied_to="marlowe") == ["Marlowe"]
    assert speakers("and you, Nyx?", replied_to="marlowe") == ["Marlowe", "Nyx"]
    assert speakers("Marlowe, go on", replied_to="marlowe") == ["Marlowe"], "each once"


def test_natural_picks_whoever_spoke_least_recently() -> None:
    assert speakers("hello all") == ["Captain Vex"], "nobody spoke: the first listed"
    assert speakers("hello", recent=["captain-vex"]) == ["Marlowe"]
    assert speakers("hello", recent=["captain-vex", "marlowe"]) == ["Nyx"]
    assert speakers("hello", recent=["g1:nyx", "captain-vex", "marlowe", "g1:nyx"]) == ["Captain Vex"]
    assert speakers("hello", recent=["removed-one", "marlowe", "captain-vex"]) == ["Nyx"]


def test_list_goes_round_in_listed_order() -> None:
    order = []
    recent: list[str] = []
    for _ in range(5):
        (chosen,) = choose_speakers("next", CAST, "list", recent, random.Random(0))
        order.append(chosen.name)
        recent.append(chosen.key)
    assert order == ["Captain Vex", "Marlowe", "Nyx", "Captain Vex", "Marlowe"]


def test_random_follows_the_seeded_generator() -> None:
    picks = [speakers("anyone?", "random", seed=seed)[0] for seed in range(30)]
    assert set(picks) == {"Captain Vex", "Marlowe", "Nyx"}
    assert picks == [speakers("anyone?", "random", seed=seed)[0] for seed in range(30)], "reproducible"


def test_no_members_no_speakers_and_unknown_strategy_is_natural() -> None:
    assert choose_speakers("Marlowe", [], "natural", [], random.Random(0)) == []
    assert speakers("hi", strategy=None, recent=["captain-vex"]) == ["Marlowe"]
    assert speakers("hi", strategy="bogus", recent=["captain-vex"]) == ["Marlowe"]


def test_each_character_sees_the_others_as_speakers() -> None:
    history = [
        Message("1", "Ann", "We need a ship."),
        Message("9", "Captain Vex", "Mine's the fastest.", is_bot=True),
        Message("9", "Marlowe", "And the least legal.", is_bot=True),
        Message("1", "Ann", "Marlowe, is that true?"),
    ]
    seen = as_seen_by(history, "Marlowe")
    prompt = render_chat(seen, response_prefix="Marlowe:")
    assert "### Instruction:\nAnn: We need a ship.\nCaptain Vex: Mine's the fastest.\n\n" in prompt
    assert "### Response:\nMarlowe: And the least legal.\n\n" in prompt
    assert prompt.endswith("### Instruction:\nAnn: Marlowe, is that true?\n\n### Response:\nMarlowe: ")
    assert "\nCaptain Vex:" in stop_sequences(seen), "the model never writes another character's lines"
    assert as_seen_by(history, "Captain Vex")[1].is_bot and not as_seen_by(history, "Captain Vex")[2].is_bot


def test_webhook_names_are_ones_discord_accepts() -> None:
    from bot.edge.webhooks import MAX_NAME_CHARS, webhook_name

    assert webhook_name("Captain Vex") == "Captain Vex"
    assert "discord" not in webhook_name("Discord Dan").lower() and "clyde" not in webhook_name("clyde").lower()
    assert webhook_name("Discord Dan").replace("\u200b", "") == "Discord Dan", "still reads the same"
    assert len(webhook_name("x" * 200)) == MAX_NAME_CHARS and webhook_name("  \n ") == "character"
