"""`bot.telemetry.probes` over real HTTP: a `Probes` server on a real port, asked with aiohttp."""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.telemetry import metrics, probes
from bot.telemetry.probes import Check, Probes, parse_address


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Mapping[str, Check]], Awaitable[Probes]]]:
    started: list[Probes] = []

    async def start(checks: Mapping[str, Check]) -> Probes:
        server = Probes("127.0.0.1", 0, checks)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.close()


def url(server: Probes, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


async def scrape(http: aiohttp.ClientSession, server: Probes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of `/metrics`: (name, sorted labels) -> value."""
    async with http.get(url(server, "/metrics")) as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


# --- /healthz -------------------------------------------------------------------------


async def test_healthz_answers_while_the_process_lives(serve, http) -> None:
    server = await serve({"never": lambda: False})  # liveness ignores readiness
    async with http.get(url(server, "/healthz")) as response:
        assert response.status == 200
        assert await response.json() == {"alive": True}


# --- /readyz --------------------------------------------------------------------------


def failing_until(flag: dict[str, bool], how: str) -> Check:
    """A readiness check that fails, in the way `how` names, until `flag["ok"]` is set."""
    if how == "sync":
        return lambda: flag["ok"]
    if how == "async":
        async def check() -> bool:
            await asyncio.sleep(0)
            return flag["ok"]
        return check
    if how == "raises":
        def check() -> bool:
            if not flag["ok"]:
                raise ConnectionError("database went away")
            return True
        return check
    if how == "async raises":
        async def check() -> bool:
            if not flag["ok"]:
                raise ConnectionError("database went away")
            return True
        return check
    if how == "slow":
        async def check() -> bool:
            if not flag["ok"]:
                await asyncio.sleep(30)  # far past CHECK_SECONDS
            return True
        return check
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["sync", "async", "raises", "async raises", "slow"])
async def test_readyz_names_the_failing_check_until_it_passes(serve, http, monkeypatch, how) -> None:
    monkeypatch.setattr(probes, "CHECK_SECONDS", 0.2)
    flag = {"ok": False}
    server = await serve({"discord": lambda: True, "database": failing_until(flag, how)})

    began = time.monotonic()
    async with http.get(url(server, "/readyz")) as response:
        assert response.status == 503
        assert await response.json() == {"ready": False, "checks": {"discord": True, "database": False}}
    assert time.monotonic() - began < 5, "a slow check must be cut off at CHECK_SECONDS"

    flag["ok"] = True
    async with http.get(url(server, "/readyz")) as response:
        assert response.status == 200
        assert await response.json() == {"ready": True, "checks": {"discord": True, "database": True}}


async def test_a_slow_check_is_cut_off_at_check_seconds(serve, http, monkeypatch) -> None:
    monkeypatch.setattr(probes, "CHECK_SECONDS", 0.3)

    async def slow() -> bool:
        await asyncio.sleep(30)
        return True

    server = await serve({"slow": slow, "also slow": slow})
    began = time.monotonic()
    async with http.get(url(server, "/readyz")) as response:
        assert response.status == 503
        assert (await response.json())["checks"] == {"slow": False, "also slow": False}
    elapsed = time.monotonic() - began
    assert 0.25 <= elapsed < 3, f"{elapsed:.2f} s: the checks run together, each for CHECK_SECONDS"


async def test_readyz_with_truthy_and_falsy_answers(serve, http) -> None:
    server = await serve({"one": lambda: 1, "none": lambda: None})
    async with http.get(url(server, "/readyz")) as response:
        assert response.status == 503
        assert (await response.json())["checks"] == {"one": True, "none": False}


# --- /metrics -------------------------------------------------------------------------


async def test_metrics_parse_and_a_reply_moves_its_counter_by_one(serve, http) -> None:
    server = await serve({})
    done = ("hermes_replies_total", (("outcome", "done"),))
    failed = ("hermes_replies_total", (("outcome", "failed"),))
    before = await scrape(http, server)
    assert ("process_resident_memory_bytes", ()) in before  # prometheus-client's own process metrics

    metrics.reply_finished("done")
    after = await scrape(http, server)
    assert after[done] == before[done] + 1
    assert after[failed] == before[failed]

    metrics.reply_finished("no such outcome")  # an unknown outcome counts as failed, not a new label
    last = await scrape(http, server)
    assert last[failed] == after[failed] + 1
    assert last[done] == after[done]
    outcomes = {dict(labels)["outcome"] for name, labels in last if name == "hermes_replies_total"}
    assert outcomes == set(metrics.OUTCOMES)


async def test_every_reply_outcome_and_prompt_kind_shows_from_the_first_scrape(serve, http) -> None:
    samples = await scrape(http, await serve({}))
    for outcome in metrics.OUTCOMES:
        assert ("hermes_replies_total", (("outcome", outcome),)) in samples
    for kind in ("evaluated", "reused"):
        assert ("hermes_prompt_tokens_total", (("kind", kind),)) in samples
    for reason in ("lock", "disconnect"):
        assert ("hermes_database_retries_total", (("reason", reason),)) in samples


async def test_a_generation_moves_latency_and_token_counters(serve, http) -> None:
    server = await serve({})
    ttft_count = ("hermes_time_to_first_token_seconds_count", ())
    ttft_le_1 = ("hermes_time_to_first_token_seconds_bucket", (("le", "1.0"),))
    duration_count = ("hermes_reply_duration_seconds_count", ())
    generated = ("hermes_generated_tokens_total", ())
    reused = ("hermes_prompt_tokens_total", (("kind", "reused"),))
    evaluated = ("hermes_prompt_tokens_total", (("kind", "evaluated"),))
    before = await scrape(http, server)

    metrics.generation_ended(queued_for=0.7, lasted=3.0, generated=42, prompt=500, reused=450)
    after = await scrape(http, server)
    assert after[ttft_count] == before[ttft_count] + 1
    assert after[ttft_le_1] == before[ttft_le_1] + 1
    assert after[duration_count] == before[duration_count] + 1
    assert after[generated] == before[generated] + 42
    assert after[reused] == before[reused] + 450
    assert after[evaluated] == before[evaluated] + 50

    metrics.generation_ended(queued_for=None, lasted=0.1, generated=0, prompt=10, reused=0)  # no text at all
    last = await scrape(http, server)
    assert last[ttft_count] == after[ttft_count]
    assert last[duration_count] == after[duration_count]
    assert last[evaluated] == after[evaluated] + 10


async def test_discord_errors_and_retries_by_status(serve, http) -> None:
    server = await serve({})
    errors = ("hermes_discord_http_errors_total", (("status", "503"),))
    retries = ("hermes_discord_retries_total", (("status", "503"),))
    before = await scrape(http, server)
    metrics.discord_failed(503, retrying=True)
    metrics.discord_failed(503, retrying=False)
    after = await scrape(http, server)
    assert after[errors] == before.get(errors, 0) + 2
    assert after[retries] == before.get(retries, 0) + 1


async def test_state_gauges_are_read_at_each_scrape(serve, http) -> None:
    server = await serve({})
    gauges = (metrics.QUEUE, metrics.ENGINE_UP, metrics.SLOTS_BUSY, metrics.SLOTS, metrics.FLEET_UP,
              metrics.FLEET, metrics.DISCORD_CONNECTED)
    state = {"queue": 3, "up": 1.0, "slots": (2, 8), "fleet": (1, 2), "connected": True}
    try:
        metrics.watch_engine(lambda: state["queue"], lambda: state["up"], lambda: state["slots"],
                             lambda: state["fleet"])
        metrics.watch_discord(lambda: state["connected"])
        first = await scrape(http, server)
        assert first[("hermes_generation_queue_depth", ())] == 3
        assert first[("hermes_engine_up", ())] == 1
        assert first[("hermes_engine_slots_busy", ())] == 2
        assert first[("hermes_engine_slots", ())] == 8
        assert first[("hermes_fleet_servers_up", ())] == 1
        assert first[("hermes_fleet_servers", ())] == 2
        assert first[("hermes_discord_connected", ())] == 1

        state.update(queue=0, up=0.0, slots=(0, 8), fleet=(0, 2), connected=False)
        second = await scrape(http, server)
        assert second[("hermes_generation_queue_depth", ())] == 0
        assert second[("hermes_engine_up", ())] == 0
        assert second[("hermes_engine_slots_busy", ())] == 0
        assert second[("hermes_fleet_servers_up", ())] == 0
        assert second[("hermes_discord_connected", ())] == 0
    finally:  # the registry is process-wide: leave the gauges reading nothing of this test
        for gauge in gauges:
            gauge.set_function(lambda: 0.0)


# --- the address ----------------------------------------------------------------------


async def test_port_zero_gets_a_real_port(serve, http) -> None:
    server = await serve({})
    assert 0 < server.port < 65536
    async with http.get(url(server, "/healthz")) as response:
        assert response.status == 200


async def test_a_port_in_use_names_metrics_addr(serve) -> None:
    first = await serve({})
    second = Probes("127.0.0.1", first.port, {})
    with pytest.raises(OSError, match="METRICS_ADDR") as caught:
        await second.start()
    assert f"127.0.0.1:{first.port}" in str(caught.value)
    assert isinstance(caught.value.__cause__, OSError)
    assert caught.value.__cause__.errno == errno.EADDRINUSE
    await second.close()  # closing after a failed start is harmless (the bot's shutdown does it)


@pytest.mark.parametrize(("address", "parsed"), [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)),
    ("  127.0.0.1:9464\n", ("127.0.0.1", 9464)),
    ("[::1]:9464", ("::1", 9464)),
    (":9464", ("0.0.0.0", 9464)),
    ("localhost:1", ("localhost", 1)),
    ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ("", None),
    ("   ", None),
])
def test_parse_address(address: str, parsed: tuple[str, int] | None) -> None:
    assert parse_address(address) == parsed


@pytest.mark.parametrize("address", [
    "nonsense", "host:99999", "host:0", "host:", "host:-1", "host:80a", "127.0.0.1", "[::1]",
])
def test_parse_address_refuses(address: str) -> None:
    with pytest.raises(ValueError, match="METRICS_ADDR"):
        parse_address(address)
