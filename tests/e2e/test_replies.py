"""Streaming, splitting past 2000 characters, Stop and Regenerate — through real discord.py."""

from __future__ import annotations

import re

from tests.e2e.conftest import StartBot
from tests.e2e.fake_discord import wait_for
from tests.e2e.store_waits import delivered_reply, stored

LONG_STORY = " ".join(f"Word{i}." for i in range(120))


async def test_streamed_edits_respect_rate_limits(start_bot: StartBot) -> None:
    h = await start_bot()
    h.engine.delay = 0.03  # 120 pieces: about 4 seconds of streaming
    h.engine.say(LONG_STORY)
    d = h.discord
    question = await d.user_says(d.ann, d.dm, "tell me a story")
    reply = (await wait_for(lambda: d.replies_to(question)))[0]
    reply_id = int(reply["id"])
    await wait_for(lambda: d.messages[reply_id]["content"] == LONG_STORY, timeout=30)
    versions = d.history[reply_id]
    assert len(versions) >= 3, "the reply streamed in several edits"
    assert len(versions[0]) < len(LONG_STORY) / 2, "the first text appeared early"
    assert all(LONG_STORY.startswith(v) for v in versions), "every edit shows a prefix of the reply"
    edits = [r for r in d.requests if r[0] == "PATCH" and r[1].endswith(f"/messages/{reply_id}")]
    assert len(edits) <= 4 / 1.0 + 3, "about one edit per second"
    assert d.rate_limited == []
    assert all(status < 400 for _, _, status in d.requests)


async def test_long_reply_is_split_and_code_fences_stay_valid(start_bot: StartBot) -> None:
    h = await start_bot()
    h.engine.delay = 0.0
    code = "\n".join(f"    print('line {i}')  # explain the step in some detail" for i in range(60))
    text = "Here is the script:\n\n```python\ndef main():\n" + code + "\n```\n\nThat is all." + "\n\nMore. " * 5
    h.engine.say(text)
    d = h.discord
    question = await d.user_says(d.ann, d.dm, "write code")
    await wait_for(lambda: d.replies_to(question))
    await wait_for(lambda: any("That is all." in m["content"] for m in d.bot_messages(d.dm)), timeout=30)
    parts = [m["content"] for m in sorted(d.bot_messages(d.dm), key=lambda m: int(m["id"]))]
    assert len(parts) == 2
    assert all(0 < len(p) <= 2000 for p in parts)
    for part in parts:
        assert len(re.findall(r"^```", part, re.M)) % 2 == 0, "every part has balanced fences"
    assert parts[0].rstrip().endswith("```") and parts[1].startswith("```python\n")
    assert d.rate_limited == []
    assert "".join(parts).count("print(") == 60, "no line of code lost"
    history = await stored(h, d.dm, 2)
    assert [m.is_bot for m in history] == [False, True]
    assert history[1].content == text.strip(), "history keeps the reply once, unsplit, without fence repairs"


async def test_stop_keeps_what_was_written(start_bot: StartBot) -> None:
    h = await start_bot()
    h.engine.delay = 0.05
    h.engine.say(LONG_STORY)
    d = h.discord
    question = await d.user_says(d.ann, d.dm, "tell me a story")
    reply_id = int((await wait_for(lambda: d.replies_to(question)))[0]["id"])
    stop_id = f"hermes:stop:{d.ann.id}"
    await wait_for(lambda: any(c["custom_id"] == stop_id for row in d.messages[reply_id]["components"] for c in row["components"]))
    intruder = await d.click(d.bob.__class__(999, "Eve"), reply_id, stop_id)
    await wait_for(lambda: intruder.response_type == 4)
    assert "Only the person who asked" in d.original(intruder)["content"]
    click = await d.click(d.ann, reply_id, stop_id)
    await wait_for(lambda: click.response_type is not None)
    assert click.response_type == 6, (click.response_type, d.original(click) if click.response_type == 4 else None)
    # The final edit drops Stop and keeps Regenerate (and Continue); the text is cut short, not lost.
    await wait_for(lambda: [c["label"] for row in d.messages[reply_id]["components"] for c in row["components"]]
                   == ["Regenerate", "Continue"])
    final = d.messages[reply_id]["content"]
    assert final.endswith("\n\n*(stopped)*"), "people see that the reply was stopped"
    written = final.removesuffix("\n\n*(stopped)*")
    assert 0 < len(written) < len(LONG_STORY) and LONG_STORY.startswith(written)
    history = await stored(h, d.dm, 2)
    assert history[-1].content == written, "history has the model's words, not the notice"


async def test_stop_works_before_discord_answered_the_first_post(start_bot: StartBot) -> None:
    """People see a part (and its Stop) before Discord's answer, with the part's id, reaches
    the bot: Stop still stops it, not "already finished" (found with FAKE_DISCORD_LATENCY)."""
    h = await start_bot()
    h.engine.delay = 0.05
    h.engine.say(LONG_STORY)
    d = h.discord
    d.answer_late("POST", "/channels/{id}/messages", 1.0)
    question = await d.user_says(d.ann, d.dm, "tell me a story")
    reply_id = int((await wait_for(lambda: d.replies_to(question)))[0]["id"])
    click = await d.click(d.ann, reply_id, f"hermes:stop:{d.ann.id}")
    await wait_for(lambda: click.response_type is not None)
    assert click.response_type == 6, d.original(click)
    await wait_for(lambda: d.messages[reply_id]["content"].endswith("\n\n*(stopped)*"))
    assert len(d.messages[reply_id]["content"]) < len(LONG_STORY)


async def test_regenerate_replaces_the_reply(start_bot: StartBot) -> None:
    h = await start_bot()
    h.engine.delay = 0.0
    h.engine.say("A first try.", "A better answer.")
    d = h.discord
    question = await d.user_says(d.ann, d.general, "explain", mention_bot=True)
    reply_id = int((await wait_for(lambda: d.replies_to(question)))[0]["id"])
    await wait_for(lambda: d.messages[reply_id]["content"] == "A first try.")
    await stored(h, d.general, 2)
    await delivered_reply(h, d.general)  # until then a click is told "still being written"
    click = await d.click(d.ann, reply_id, f"hermes:regen:{d.ann.id}")
    await wait_for(lambda: d.messages[reply_id]["content"] == "A better answer.")
    assert click.response_type == 6
    assert "A first try." not in h.engine.prompts[1], "the old reply is not in the new prompt"
    history = await wait_for_history(h, d.general, "A better answer.")
    assert [m.content for m in history][-1] == "A better answer."
    assert sum(m.is_bot for m in history) == 1


async def wait_for_history(h, channel_id: int, last: str):  # type: ignore[no-untyped-def]
    for _ in range(200):
        history = await h.store.recent_messages(f"discord:{channel_id}", 100)
        if history and history[-1].content == last:
            return history
        import asyncio

        await asyncio.sleep(0.05)
    raise AssertionError(f"the stored history never ended with {last!r}")
