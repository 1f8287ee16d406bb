"""What the Prometheus metrics cost a reply: the recording a reply does (once, at its end),
what the per-token loop gained (one comparison), and a scrape of `/metrics`.

    python -m benchmarks.metrics_overhead [--tokens 512] [--repeat 5]

The per-token path is `bot/edge/answering.py`'s `_stream` loop: it records nothing per
token, only notes the time of the first piece. Measured here, best of `--repeat`:
- the per-reply recording (`ACTIVE.inc/dec`, `generation_ended`, `reply_finished`);
- a loop over `--tokens` pieces as `_stream` runs it, with and without the first-piece check,
  against the time one token takes at `--tokens-per-second` (llama-bench's tg speed here);
- one `generate_latest()` of the registry (what a scrape costs the event loop).
"""

from __future__ import annotations

import argparse
import time

from prometheus_client import REGISTRY, generate_latest

from bot.telemetry import metrics


def per_reply(n: int) -> float:
    began = time.perf_counter()
    for _ in range(n):
        metrics.ACTIVE.inc()
        metrics.ACTIVE.dec()
        metrics.generation_ended(0.3, 2.0, 64, 900, 850)
        metrics.reply_finished("done")
    return (time.perf_counter() - began) / n


def token_loop(pieces: list[str], checked: bool) -> float:
    began = time.perf_counter()
    text, first = "", None
    for piece in pieces:
        if checked and first is None:
            first = time.perf_counter()
        text += piece
    return time.perf_counter() - began


def scrape(n: int) -> float:
    began = time.perf_counter()
    for _ in range(n):
        generate_latest(REGISTRY)
    return (time.perf_counter() - began) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tokens-per-second", type=float, default=70.0)
    args = parser.parse_args()
    pieces = [" word"] * args.tokens
    reply = min(per_reply(2000) for _ in range(args.repeat))
    with_check = min(token_loop(pieces, True) for _ in range(args.repeat * 20))
    without = min(token_loop(pieces, False) for _ in range(args.repeat * 20))
    scraped = min(scrape(50) for _ in range(args.repeat))
    token_time = 1.0 / args.tokens_per_second
    added = max(0.0, with_check - without) / args.tokens
    print(f"per reply: {reply * 1e6:.1f} us of recording, {reply / (args.tokens * token_time):.5%} of a "
          f"{args.tokens}-token reply at {args.tokens_per_second:g} tokens/s")
    print(f"per token: {added * 1e9:.0f} ns added to the streaming loop ({with_check / args.tokens * 1e9:.0f} vs "
          f"{without / args.tokens * 1e9:.0f} ns a piece), {added / token_time:.6%} of one token's "
          f"{token_time * 1000:.1f} ms")
    print(f"a scrape of /metrics: {scraped * 1000:.2f} ms on the event loop")


if __name__ == "__main__":
    main()
