"""The bot's Prometheus metrics, named by Prometheus conventions (`hermes_` prefix, units
in the name, `_total` for counters), in the process-wide registry, which also carries
prometheus-client's process metrics (CPU, memory, open files).

Counters and histograms are recorded where things happen, once per message or reply,
never per token: a reply's tokens are counted from its final statistics. Gauges that
mirror a part's state (queue depth, slots, fleet servers) are read when scraped, through
the functions `watch_engine` and `watch_discord` bind, so a dashboard sees the same
numbers as `/status`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()  # no `*_created` series beside every counter

# A reply's outcomes, as the reply lifecycle names its final states.
OUTCOMES = ("done", "stopped", "failed", "interrupted")

MESSAGES = Counter("hermes_messages_received_total", "Messages from people the bot handled (stored or answered).")
REPLIES = Counter("hermes_replies_total", "Replies that reached a final state, by outcome.", ["outcome"])
TTFT = Histogram(
    "hermes_time_to_first_token_seconds", "From a reply's generation being queued to its first text.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120),
)
DURATION = Histogram(
    "hermes_reply_duration_seconds", "From a reply's generation being queued to its last text.",
    buckets=(0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600),
)
GENERATED = Counter("hermes_generated_tokens_total", "Tokens the model generated for replies.")
PROMPT_TOKENS = Counter(
    "hermes_prompt_tokens_total",
    "Prompt tokens of replies: `evaluated` by the model, or `reused` from its KV cache.", ["kind"],
)
ACTIVE = Gauge("hermes_active_generations", "Replies being generated now.")
QUEUE = Gauge("hermes_generation_queue_depth", "Generations waiting for the engine.")
SLOTS_BUSY = Gauge("hermes_engine_slots_busy", "Engine sequence slots (or server slots) in use.")
SLOTS = Gauge("hermes_engine_slots", "Engine sequence slots (or server slots) in all.")
ENGINE_UP = Gauge("hermes_engine_up", "1 while the engine can generate (its worker runs, a server answers).")
FLEET_UP = Gauge("hermes_fleet_servers_up", "Model servers answering their health check.")
FLEET = Gauge("hermes_fleet_servers", "Model servers configured.")
DISCORD_CONNECTED = Gauge("hermes_discord_connected", "1 while the gateway connection is up and ready.")
DISCORD_ERRORS = Counter(
    "hermes_discord_http_errors_total", "Failed Discord API requests, by HTTP status (0: no answer).", ["status"],
)
DISCORD_RETRIES = Counter(
    "hermes_discord_retries_total", "Discord API requests tried again after a transient error, by status.", ["status"],
)
DATABASE_RETRIES = Counter(
    "hermes_database_retries_total", "Database operations tried again, by reason (lock, disconnect).", ["reason"],
)

for _outcome in OUTCOMES:  # every outcome shows from the first scrape, at 0
    REPLIES.labels(_outcome)
for _kind in ("evaluated", "reused"):
    PROMPT_TOKENS.labels(_kind)
for _reason in ("lock", "disconnect"):
    DATABASE_RETRIES.labels(_reason)
for _status in ("0", "429", "500", "502", "503", "504"):  # so that rate() sees the first one
    DISCORD_ERRORS.labels(_status)
    DISCORD_RETRIES.labels(_status)


def _safe(read: Callable[[], float]) -> Callable[[], float]:
    """A gauge's reading that never breaks the scrape (a part closing meanwhile: NaN)."""

    def reading() -> float:
        try:
            return float(read())
        except Exception:  # noqa: BLE001 - one gauge unknown, the rest of /metrics still served
            return math.nan

    return reading


def replies_so_far() -> dict[str, int]:
    """Replies per outcome since the process started (what /status shows)."""
    return {outcome: int(REGISTRY.get_sample_value("hermes_replies_total", {"outcome": outcome}) or 0)
            for outcome in OUTCOMES}


def reply_finished(outcome: str) -> None:
    REPLIES.labels(outcome if outcome in OUTCOMES else "failed").inc()


def generation_ended(queued_for: float | None, lasted: float, generated: int, prompt: int, reused: int) -> None:
    """One reply's generation, from its statistics: seconds to its first text (None: there
    was none), seconds in all, tokens generated, prompt tokens and how many were reused."""
    if queued_for is not None:
        TTFT.observe(queued_for)
        DURATION.observe(lasted)
    GENERATED.inc(max(0, generated))
    PROMPT_TOKENS.labels("reused").inc(max(0, reused))
    PROMPT_TOKENS.labels("evaluated").inc(max(0, prompt - reused))


def discord_failed(status: int, retrying: bool) -> None:
    DISCORD_ERRORS.labels(str(status)).inc()
    if retrying:
        DISCORD_RETRIES.labels(str(status)).inc()


def watch_engine(
    queue_depth: Callable[[], float],
    up: Callable[[], float],
    slots: Callable[[], tuple[int, int]],
    fleet: Callable[[], tuple[int, int]] | None = None,
) -> None:
    """Read the engine's state at each scrape: its queue, whether it can generate, its
    (busy, total) slots, and for a fleet its (up, configured) servers."""
    QUEUE.set_function(_safe(queue_depth))
    ENGINE_UP.set_function(_safe(up))
    SLOTS_BUSY.set_function(_safe(lambda: slots()[0]))
    SLOTS.set_function(_safe(lambda: slots()[1]))
    if fleet is not None:
        FLEET_UP.set_function(_safe(lambda: fleet()[0]))
        FLEET.set_function(_safe(lambda: fleet()[1]))


def watch_discord(connected: Callable[[], bool]) -> None:
    DISCORD_CONNECTED.set_function(_safe(lambda: 1.0 if connected() else 0.0))
