"""The real bot process with ENGINE=openai answers through a real llama-server's OpenAI
endpoint (`/v1/completions`), and an operator sees it from outside: `/readyz` turns ready
only once the gateway is connected, and `/metrics`, scraped and parsed with
prometheus_client's own parser around a real exchange, moved by exactly what happened."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.bot_process import BotProcess, bot_env
from tests.e2e.fake_discord import FakeDiscord, wait_for
from tests.llama_server import LlamaServer, free_port, llama_server_bin, small_model  # noqa: F401 - fixture

pytestmark = pytest.mark.llama


@pytest.fixture(scope="module")
def server(llama_server_bin: Path) -> Iterator[LlamaServer]:  # noqa: F811 - the fixture above
    with LlamaServer(small_model(), binary=llama_server_bin, parallel=2, ctx_per_slot=2048) as started:
        yield started


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - the test's own port
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of `/metrics`, parsed by prometheus_client: (name, labels) → value."""
    status, text = get(base + "/metrics")
    assert status == 200, text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def moved(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def test_the_bot_answers_through_the_openai_endpoint_and_operators_see_it(
    fake_discord: FakeDiscord, database_url: str, tmp_path: Path, server: LlamaServer
) -> None:
    d = fake_discord
    base = f"http://127.0.0.1:{free_port()}"
    env = bot_env(d, database_url, small_model(), ENGINE="openai", N_CTX="2048",
                  OPENAI_BASE_URL=server.url + "/v1", METRICS_ADDR=base.removeprefix("http://"))
    bot = BotProcess(env, tmp_path, tmp_path / "bot.log")
    d.ready_gate.clear()  # Discord takes the IDENTIFY but holds READY back
    d.identified.clear()
    try:
        await bot.start()
        assert await wait_for(lambda: get(base + "/healthz")[0] == 200, timeout=120)
        await wait_for(lambda: d.identifies >= 1, timeout=120)
        status, body = get(base + "/readyz")
        assert status == 503, body
        assert json.loads(body)["checks"] == {"discord": False, "engine": True, "database": True}
        d.ready_gate.set()
        await bot.wait_ready(d)
        assert await wait_for(lambda: get(base + "/readyz")[0] == 200, timeout=30)

        before = scrape(base)
        question = await d.user_says(d.ann, d.dm, "Hello! Name a colour.")
        reply = (await wait_for(lambda: d.replies_to(question), timeout=60))[0]
        await wait_for(lambda: [c["label"] for row in d.messages[int(reply["id"])]["components"]
                                for c in row["components"]] == ["Regenerate", "Continue"], timeout=60)
        after = await wait_for(lambda: (s := scrape(base)) and
                               moved(before, s, "hermes_replies_total", outcome="done") == 1 and s, timeout=10)
        assert moved(before, after, "hermes_messages_received_total") == 1
        assert moved(before, after, "hermes_time_to_first_token_seconds_count") == 1
        assert moved(before, after, "hermes_reply_duration_seconds_count") == 1
        assert moved(before, after, "hermes_generated_tokens_total") >= 1
        assert moved(before, after, "hermes_prompt_tokens_total", kind="evaluated") >= 1
        for outcome in ("stopped", "failed", "interrupted"):
            assert moved(before, after, "hermes_replies_total", outcome=outcome) == 0
        assert after[("hermes_engine_up", ())] == 1 and after[("hermes_discord_connected", ())] == 1
        assert after[("hermes_engine_slots", ())] == 2  # N_PARALLEL and after[("hermes_active_generations", ())] == 0

        answered = await d.slash(d.ann, d.dm, "status")
        await wait_for(lambda: answered.response_type == 4)
        text = d.original(answered)["content"]
        assert "1 done" in text and "**Slots:** 0/2 busy" in text, text
    except BaseException:
        print(bot.log_tail(60))
        raise
    finally:
        d.ready_gate.set()
        await bot.stop()
    log = (tmp_path / "bot.log").read_text()
    assert "ENGINE=openai" in log and "prompts sent as token ids" in log  # MODEL_PATH's vocabulary matched
