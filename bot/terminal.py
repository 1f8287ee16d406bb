"""Terminal chat: talk to the model through the same store, prompt and engine as Discord.

Lines starting with `/` are commands: /reset, /persona NAME, /personas, /quit.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

from bot.core.conversation import Message
from bot.lifecycle.responder import Responder

HELP = "commands: /reset  /persona NAME  /personas  /quit"


async def chat(
    responder: Responder,
    session: str = "default",
    user: str = "you",
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
) -> None:
    """Read lines from `stdin` and stream the bot's answers to `stdout` until EOF or /quit."""
    key = f"terminal:{session}"
    persona = await responder.conversation_persona(key)
    stdout.write(f"Chatting with {persona.name} ({responder.engine.info.name}). {HELP}\n")
    while True:
        stdout.write(f"{user}> ")
        stdout.flush()
        line = await asyncio.to_thread(stdin.readline)
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            if not await _command(responder, key, line, stdout, user):
                break
            continue
        await responder.store.add_message(key, Message(author_id=f"terminal:{user}", author_name=user, content=line))
        reply = await responder.start_reply(key, speaker=user)
        stdout.write(f"{reply.persona.name}> ")
        pieces = []
        async for piece in reply.generation:
            pieces.append(piece)
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        text = "".join(pieces).strip()
        if text:
            await responder.save_reply(key, reply.persona, text, bot_id="bot")


async def _command(responder: Responder, key: str, line: str, stdout: TextIO, user: str) -> bool:
    """Run a /command; False means quit."""
    command, _, argument = line[1:].partition(" ")
    if command in {"quit", "exit"}:
        return False
    if command == "reset":
        await responder.store.reset(key)
        stdout.write("(the conversation so far is forgotten)\n")
    elif command == "personas":
        stdout.write(", ".join(p.name for p in responder.personas.values()) + "\n")
    elif command == "persona":
        name = argument.strip()
        found = responder.find_persona(name)
        if found is None:
            stdout.write(f"(no persona named {name!r}; /personas lists them)\n")
        else:
            await responder.store.set_persona(key, found)
            persona = responder.personas[found]
            stdout.write(f"(now talking to {persona.name})\n")
            greeting = persona.greeting(user)
            if greeting:
                await responder.save_reply(key, persona, greeting, bot_id="bot")
                stdout.write(f"{persona.name}> {greeting}\n")
    else:
        stdout.write(f"({HELP})\n")
    return True
