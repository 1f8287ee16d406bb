"""/persona set with a greeting longer than one Discord message: every part is posted, in
order, within Discord's limit, and stored once, unsplit, as the conversation's first message."""

from __future__ import annotations

import re

from bot.core.replies import DISCORD_LIMIT, split_message
from tests.card_files import png_card, v3_card
from tests.e2e.conftest import StartBot
from tests.e2e.fake_discord import GUILD_ID, wait_for
from tests.e2e.store_waits import stored

# About 7000 characters: pings that must not ping anyone, prose, a code block with a
# 2500-character line (which once made the split hang), and more prose.
LONG_GREETING = (
    "*{{char}} unrolls a very long scroll for {{user}}.* Hey @everyone, <@100000000000000002>!\n\n"
    + " ".join(f"Line {i} of the old ballad." for i in range(60))
    + "\n\n```text\n"
    + "ᚠ" * 2500
    + "\n"
    + "\n".join(f"verse {i}: the comet burns" for i in range(40))
    + "\n```\n\n"
    + " ".join(f"Stanza {i} ends here." for i in range(60))
    + "\n\nThe end."
)


def nonblank(text: str) -> str:
    return re.sub(r"\s", "", text)


async def test_a_long_greeting_is_posted_whole_in_parts(start_bot: StartBot) -> None:
    h = await start_bot()
    d = h.discord
    card = png_card(v3_card(name="Long Greeter", first_mes=LONG_GREETING))
    await d.slash(d.mod, d.general, "persona", sub="import", files={"card": ("long.png", card)})
    await wait_for(lambda: any("as `long-greeter`" in m["content"] for m in d.followups))
    imported = len(d.followups)

    chosen = await d.slash(d.mod, d.general, "persona", sub="set", options={"name": "long-greeter"})
    greeting = h.bot.responder.personas[f"g{GUILD_ID}/long-greeter"].greeting("Mod", 0)
    expected = split_message(greeting)
    assert len(greeting) > 3 * DISCORD_LIMIT and len(expected) >= 4
    await wait_for(lambda: chosen.response_type == 4 and len(d.followups) - imported == len(expected) - 1)

    first = d.original(chosen)
    rest = d.followups[imported:]
    posted = [first["content"], *(m["content"] for m in rest)]
    assert posted == expected
    assert all(0 < len(part) <= DISCORD_LIMIT for part in posted)
    assert nonblank(posted[0]).startswith(nonblank("*Long Greeter unrolls a very long scroll for Mod.*"))
    assert posted[-1].endswith("The end.")
    assert "ᚠ" * 1000 in "".join(posted)
    assert not first["mention_everyone"] and first["mentions"] == []
    assert not [r for r in d.requests if r[2] >= 400], "Discord accepted every part"

    history = await stored(h, d.general, 1)
    assert [m.content for m in history] == [greeting.strip()], "the model reads the greeting once, unsplit"
    assert history[0].is_bot and history[0].author_name == "Long Greeter"
    assert history[0].platform_id == str(first["id"])
