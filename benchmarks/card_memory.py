"""What the worst character cards cost to read: peak memory added and parse time.

    python -m benchmarks.card_memory [--repeats 5] [--no-subprocess]

Builds the worst PNG cards we could make within the 8 MB file limit (`tests.card_files.
worst_cards`: thousands of zTXt/iTXt compression bombs, a card chunk that would inflate to
~8 GiB, 700k empty chunks, the costliest card that is accepted) and, for each, reads it
as `/persona import` does (`bot.roleplay.personas.card_and_persona`) and prints:

* the peak memory the parse adds under `tracemalloc` (Python allocations, zlib's included);
* the parse time without tracing (median of `--repeats`);
* the growth of the peak resident set (`VmHWM`, or `ru_maxrss` where there is no /proc)
  in a fresh subprocess that has read the file already, which also counts what
  tracemalloc cannot see.

Before the fix the many-chunk cards held every chunk inflated, ~4 MiB each: ~8 GiB.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from bot.roleplay.personas import PersonaError, card_and_persona
from tests.card_files import MiB, worst_cards

_CHILD = r"""
import json, resource, sys, time
from bot.roleplay.personas import PersonaError, card_and_persona


def peak_kib():
    # VmHWM is this address space's peak RSS, reset at exec; ru_maxrss is not (on Linux a
    # child starts with its parent's high-water mark), so it is only the fallback.
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


data = open(sys.argv[1], "rb").read()
try:  # warm up imports and caches on a small card first
    card_and_persona(b'{"name": "warm"}', "warm.json")
except PersonaError:
    pass
before = peak_kib()
start = time.perf_counter()
try:
    card_and_persona(data, "card.png")
except PersonaError:
    pass
seconds = time.perf_counter() - start
print(json.dumps({"rss_kib": peak_kib() - before, "seconds": seconds}))
"""


def outcome_of(data: bytes) -> str:
    try:
        return "accepted: " + card_and_persona(data, "card.png")[1].name
    except PersonaError as error:
        return "refused: " + str(error).removeprefix("card.png: ")[:60]


def traced_peak(data: bytes) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        try:
            card_and_persona(data, "card.png")
        except PersonaError:
            pass
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def parse_seconds(data: bytes, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        try:
            card_and_persona(data, "card.png")
        except PersonaError:
            pass
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def rss_growth(data: bytes) -> tuple[float, float]:
    """(MiB of peak-RSS growth, seconds) of one parse in a fresh interpreter."""
    with tempfile.NamedTemporaryFile(suffix=".png") as file:
        file.write(data)
        file.flush()
        out = subprocess.run([sys.executable, "-c", _CHILD, file.name], check=True, capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parents[1])
    result = json.loads(out.stdout)
    return result["rss_kib"] / 1024, result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-subprocess", action="store_true", help="skip the peak-RSS measurement")
    args = parser.parse_args()
    cards = worst_cards()
    print(f"{'card':52} {'file':>8} {'traced':>10} {'peak RSS':>10} {'parse':>9}  outcome")
    worst = (0, "")
    for name, data in cards.items():
        peak = traced_peak(data)
        seconds = parse_seconds(data, args.repeats)
        rss = "-" if args.no_subprocess else f"+{rss_growth(data)[0]:.1f} MiB"
        worst = max(worst, (peak, name))
        print(f"{name:52} {len(data) / MiB:6.2f}MB {'+%.2f MiB' % (peak / MiB):>10} {rss:>10} "
              f"{seconds * 1000:7.1f}ms  {outcome_of(data)}")
    print(f"\nworst peak added (tracemalloc): {worst[0] / MiB:.2f} MiB, by {worst[1]!r}")


if __name__ == "__main__":
    main()
