"""Prompt-lookup speculative decoding in the batching engine, against no speculation and
against llama.cpp's own `llama-lookup`, on the small GGUF, side by side in one run.

    python -m benchmarks.speculative [--draft 4] [--tokens 96] [--repeat 3]
    python -m benchmarks.speculative --model X.gguf --n-gpu-layers -1 --no-lookup   # on a GPU

Workloads (each cell the best of `--repeat`; tokens/s is generated tokens over the time
from the first token to the last, as llama-lookup's "decoded ... t/s"):
1. a reply that quotes its context (a scene recap, a code review that repeats the code),
   greedy: the engine with `draft_tokens=--draft` / without, and `llama-lookup` with
   `--spec-draft-n-max --draft` on the same prompt text (it tokenizes the prompt itself, with BOS);
2. ordinary chat turns (varied questions, the bot's default sampling with a fixed seed):
   with / without, and the share of drafted tokens the model accepted;
3. 8 conversations at once (the workload-1 and -2 prompts, 4 each): aggregate tokens/s
   with / without;
4. a draft model (`--draft-model`, default the small GGUF as its own draft, which checks
   the machinery: every greedy draft should be accepted), greedy on the workload-1 and -2
   prompts: drafting at every step (`draft_always`) and as the engine decides (a draft
   that costs a full step never pays): acceptance, greedy identity with no speculation,
   tokens/s.

Needs `llama-lookup`: built into ~/.cache/hermes-llama-tools on first use (the vendored
llama.cpp with its examples on), a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import time
from pathlib import Path

from bot.engine import repack
from bot.engine.base import Generation, GenerationRequest, SamplingParams
from bot.engine.scheduler import BatchConfig, BatchedEngine
from tests.llama_server import small_model, tool_binary

GREEDY = SamplingParams(temperature=0.0, repeat_penalty=1.0, seed=1)
CHAT = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, repeat_penalty=1.1, seed=7)
SCENE = ("The old lighthouse keeper, Mara Vell, climbed the ninety-nine steps of the tower on Gull Island "
         "every evening at dusk, lit the great lamp, and wrote the weather in her logbook. One night a "
         "fishing boat, the Silver Heron, ran aground on the rocks below, and Mara rowed out alone through "
         "the storm to bring its three sailors ashore.")
CODE = '''def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal = subtotal + item.price * item.quantity
    tax = subtotal * tax_rate
    return subtotal + tax
'''
QUOTING = [
    f"### Instruction:\nAnn: Here is the scene so far:\n\n{SCENE}\n\nRecap the scene above, word for word.\n\n"
    "### Response:\n",
    f"### Instruction:\nAnn: Review this Python function and repeat it with a docstring added:\n\n{CODE}\n\n"
    "### Response:\n",
]
QUESTIONS = ["What should I cook tonight?", "Why do cats purr?", "Tell me about the moon landing.",
             "How do I learn to juggle?", "What is a good name for a dragon?", "Explain rain to a child."]
CHATTING = [f"### Instruction:\nAnn: {q}\n\n### Response:\n" for q in QUESTIONS]


def speed(generations: list[Generation]) -> float:
    return sum(g.stats.completion_tokens for g in generations) / max(1e-9, sum(g.stats.generation_seconds
                                                                                for g in generations))


async def one(engine: BatchedEngine, prompt: str, tokens: int, sampling: SamplingParams) -> Generation:
    generation = engine.submit(GenerationRequest(prompt, tokens, (), sampling))
    await generation.text()
    return generation


async def engine_runs(model: Path, draft: int, args: argparse.Namespace) -> dict[str, object]:
    engine = await BatchedEngine.start(BatchConfig(model, n_ctx=2048, n_gpu_layers=args.n_gpu_layers, n_parallel=8,
                                                   draft_tokens=draft, n_threads=args.threads))
    try:
        quoting = [max([await one(engine, p, args.tokens, GREEDY) for _ in range(args.repeat)],
                       key=lambda g: speed([g])) for p in QUOTING]
        chatting = [max([await one(engine, p, args.tokens, CHAT) for _ in range(args.repeat)],
                        key=lambda g: speed([g])) for p in CHATTING]
        best_wall, together = 0.0, []
        for _ in range(args.repeat):
            prompts = (QUOTING * 2 + CHATTING)[:8]
            began = time.perf_counter()
            generations = [engine.submit(GenerationRequest(p, args.tokens, (), GREEDY if p in QUOTING else CHAT,
                                                           f"c{i}")) for i, p in enumerate(prompts)]
            await asyncio.gather(*(g.text() for g in generations))
            rate = sum(g.stats.completion_tokens for g in generations) / (time.perf_counter() - began)
            if rate > best_wall:
                best_wall, together = rate, generations
    finally:
        await engine.close()
    return {"quoting": quoting, "chatting": chatting, "together": best_wall, "together_gens": together}


async def greedy_replies(model: Path, args: argparse.Namespace, draft_model: Path | None = None,
                         always: bool = False) -> list[tuple[Generation, str]]:
    """The fastest of `--repeat` greedy replies to every workload-1 and -2 prompt, with its
    text; with `draft_model`, drafting from it at every step (`always`) or as decided. Every
    try evaluates its prompt afresh: a prompt evaluated in other chunks gives logits a hair
    apart, and greedy text can differ for that alone."""
    engine = await BatchedEngine.start(BatchConfig(
        model, n_ctx=2048, n_gpu_layers=args.n_gpu_layers, n_parallel=1, n_threads=args.threads, reuse_prefix=False,
        draft_tokens=args.draft if draft_model else 0, draft_model_path=draft_model, draft_always=always))
    try:
        replies = []
        for prompt in QUOTING + CHATTING:
            tries = []
            for _ in range(args.repeat):
                generation = engine.submit(GenerationRequest(prompt, args.tokens, (), GREEDY))
                tries.append((generation, await generation.text()))
            replies.append(max(tries, key=lambda reply: speed([reply[0]])))
        return replies
    finally:
        await engine.close()


def lookup_run(binary: Path, model: Path, prompt: str, args: argparse.Namespace) -> tuple[float, float]:
    """llama-lookup's decode speed (t/s) and acceptance on `prompt`, best of `--repeat`."""
    best = (0.0, 0.0)
    command = [str(binary), "-m", str(model), "-p", prompt, "-n", str(args.tokens), "--spec-draft-n-max", str(args.draft),
               "-t", str(args.threads), "-c", "2048", "--temp", "0",
               *repack.choose(None).server_args()]
    for _ in range(args.repeat):
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        log = done.stdout + done.stderr
        found = re.search(r"decoded\s+\d+ tokens in\s+[\d.]+ seconds, speed:\s+([\d.]+) t/s", log)
        accept = re.search(r"accept\s+=\s+([\d.]+)%", log)
        if done.returncode != 0 or not found:
            raise RuntimeError(f"llama-lookup failed ({done.returncode}):\n{log[-2000:]}")
        best = max(best, (float(found[1]), float(accept[1]) if accept else 0.0))
    return best


async def run(args: argparse.Namespace) -> None:
    model = Path(args.model) if args.model else small_model()
    plain = await engine_runs(model, 0, args)
    spec = await engine_runs(model, args.draft, args)
    if args.no_lookup:
        theirs = [(float("nan"), float("nan"))] * len(QUOTING)
    else:
        lookup = tool_binary("llama-lookup", examples=True)
        assert lookup is not None
        theirs = [lookup_run(lookup, model, p, args) for p in QUOTING]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nmodel {model.name}; {os.cpu_count()} cores, {args.threads} threads; load average now {load}; "
          f"{args.tokens} tokens per reply; draft {args.draft}; best of {args.repeat}")
    print(f"\n1. replies that quote their context (greedy)\n{'prompt':<14}{'without':>10}{'with':>10}{'ratio':>8}"
          f"{'accepted':>10}{'llama-lookup':>14}{'its accept':>12}{'vs lookup':>11}")
    for name, a, b, (theirs_tps, theirs_acc) in zip(("scene recap", "code review"), plain["quoting"],
                                                    spec["quoting"], theirs, strict=True):
        ours_a, ours_b = speed([a]), speed([b])
        accepted = b.stats.accepted_tokens / max(1, b.stats.drafted_tokens)
        print(f"{name:<14}{ours_a:>10.1f}{ours_b:>10.1f}{ours_b / ours_a:>7.2f}x{accepted:>10.0%}"
              f"{theirs_tps:>14.1f}{theirs_acc / 100:>12.0%}{ours_b / theirs_tps:>10.2f}x")
        same = "same" if a.stats.completion_tokens == b.stats.completion_tokens else "differs"
        print(f"{'':<14}(greedy text with and without: {same} length)")
    a, b = speed(plain["chatting"]), speed(spec["chatting"])
    drafted = sum(g.stats.drafted_tokens for g in spec["chatting"])
    accepted = sum(g.stats.accepted_tokens for g in spec["chatting"])
    print(f"\n2. ordinary chat turns ({len(CHATTING)} questions, temperature 0.7, fixed seed)\n"
          f"without {a:.1f} tokens/s, with {b:.1f} ({b / a:.2f}x); drafted {drafted} tokens, "
          f"accepted {accepted / max(1, drafted):.0%}")
    a, b = plain["together"], spec["together"]
    print(f"\n3. 8 conversations at once\nwithout {a:.1f} tokens/s aggregate, with {b:.1f} ({b / a:.2f}x)")
    draft_model = Path(args.draft_model) if args.draft_model else model
    reference = await greedy_replies(model, args)
    plain_speed = speed([g for g, _ in reference])
    print(f"\n4. draft model {draft_model.name} for {model.name} (greedy, {len(reference)} prompts)\n"
          f"{'drafting':<14}{'tokens/s':>10}{'vs none':>9}{'drafted':>9}{'accepted':>10}{'identical':>11}")
    for always in (True, False):
        replies = await greedy_replies(model, args, draft_model, always)
        generations = [g for g, _ in replies]
        drafted = sum(g.stats.drafted_tokens for g in generations)
        accepted = sum(g.stats.accepted_tokens for g in generations)
        same = sum(text == expected for (_, text), (_, expected) in zip(replies, reference, strict=True))
        rate = speed(generations)
        print(f"{'every step' if always else 'as decided':<14}{rate:>10.1f}{rate / plain_speed:>8.2f}x{drafted:>9}"
              f"{accepted / max(1, drafted):>10.0%}{same:>8}/{len(reference)}")
    print("(no speculation: %.1f tokens/s.) Shared preambles: python -m benchmarks.shared_prefix." % plain_speed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draft", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--model", help="a GGUF (default: the small test model)")
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--draft-model", help="a draft GGUF with the model's vocabulary (default: the model itself)")
    parser.add_argument("--no-lookup", action="store_true", help="skip llama-lookup (not built on the GPU box)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
