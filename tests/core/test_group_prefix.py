"""Group roleplay keeps its prompt prefix: whoever is answered, the prompt starts with the same
preamble and the conversation so far, so the engine evaluates only the new turn (issue #11,
item 5; the cost is measured by benchmarks/group_prefix.py with the real model)."""

from __future__ import annotations

from os.path import commonprefix

from bot.core.conversation import Message
from bot.roleplay.personas import GROUP_USER, Persona, persona_from_dict
from bot.core.prompt import INPUT, INSTRUCTION
from bot.lifecycle.responder import Responder
from bot.core.settings import load_settings
from bot.storage.store import Store
from tests.card_files import v2_card
from tests.e2e.scripted_engine import ScriptedEngine

PEOPLE = ("Ann", "Bob", "Cid")


def vex() -> Persona:
    # No lorebook: which entries the last messages activate is a separate matter. No depth
    # prompt: it moves with the chat by design (SillyTavern's character's note).
    return persona_from_dict(v2_card(character_book=None, extensions={},
                                     post_history_instructions="Answer {{user}} as {{char}}."))


def responder(store: Store, engine: ScriptedEngine) -> Responder:
    settings = load_settings({"MAX_NEW_TOKENS": "64"}, dotenv_path=None)
    hermes = persona_from_dict({"name": "Hermes", "roleplay": False})
    return Responder(settings, store, engine, {"hermes": hermes, "vex": vex()})


def preamble_of(prompt: str) -> str:
    return prompt[: prompt.index(INSTRUCTION)]


async def test_three_people_share_one_preamble_and_every_earlier_turn(store: Store) -> None:
    engine = ScriptedEngine(n_ctx=4096, delay=0)
    bot = responder(store, engine)
    key = "discord:42"
    await store.set_persona(key, "vex")
    prompts: list[str] = []
    for turn in range(6):
        speaker = PEOPLE[turn % 3]
        await store.add_message(key, Message(speaker.lower(), speaker, f"turn {turn}: what now, captain?",
                                             platform_id=str(100 + 2 * turn)))
        engine.say(f"Reply {turn}.")
        reply = await bot.start_reply(key, speaker=speaker)
        text = await reply.generation.text()
        await store.add_message(key, Message("bot", "Vex", text, is_bot=True, platform_id=str(101 + 2 * turn)))
        prompts.append(engine.prompts[-1])
        # The speaker is named after the conversation, in the post-history input.
        assert prompts[-1].endswith(f"{INPUT}\nAnswer {speaker} as Vex.\n\n### Response:\nVex: ")

    group = [preamble_of(p) for p in prompts[1:]]  # from turn 1, two or more people
    assert len(set(group)) == 1
    assert f"Scenario: {GROUP_USER} boards the ship." in group[0]
    assert not any(name in group[0] for name in PEOPLE)
    # Turn 0: Ann alone, her name (as in a DM).
    assert "Scenario: Ann boards the ship." in preamble_of(prompts[0])
    # Each group turn starts with everything the previous one had before its input block:
    # only the new messages (and the final input) are new to the engine.
    for before, after in zip(prompts[1:], prompts[2:], strict=False):
        shared = before[: before.rindex(INPUT)]
        assert after.startswith(shared)
        assert len(commonprefix([before, after])) >= len(shared)


async def test_answering_anyone_in_the_group_gives_the_same_preamble(store: Store) -> None:
    engine = ScriptedEngine(n_ctx=4096, delay=0)
    bot = responder(store, engine)
    key = "discord:43"
    await store.set_persona(key, "vex")
    for i, name in enumerate(PEOPLE):
        await store.add_message(key, Message(name.lower(), name, f"hello from {name}", platform_id=str(i + 1)))
    for name in PEOPLE:
        reply = await bot.start_reply(key, speaker=name)
        await reply.generation.text()
    assert len({preamble_of(p) for p in engine.prompts}) == 1
    assert len({p[: p.rindex(INPUT)] for p in engine.prompts}) == 1  # the whole history part, too


async def test_a_dm_keeps_the_persons_name(store: Store) -> None:
    engine = ScriptedEngine(n_ctx=4096, delay=0)
    bot = responder(store, engine)
    key = "discord:44"
    await store.set_persona(key, "vex")
    for i in range(3):
        await store.add_message(key, Message("ann", "Ann", f"message {i}", platform_id=str(2 * i + 1)))
        await store.add_message(key, Message("bot", "Vex", f"reply {i}", is_bot=True, platform_id=str(2 * i + 2)))
    reply = await bot.start_reply(key, speaker="Ann")
    await reply.generation.text()
    assert "Scenario: Ann boards the ship." in engine.prompts[0]
    assert "<START>\nAnn: Hi\nVex: Ahoy." in engine.prompts[0]
