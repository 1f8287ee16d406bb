"""The real bot process with ENGINE=remote answers through two real llama-servers; /status
shows the fleet and /reload-model says the model is managed on the servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.bot_process import BotProcess, bot_env
from tests.e2e.fake_discord import FakeDiscord, wait_for
from tests.llama_server import LlamaServer, llama_server_bin, small_model  # noqa: F401 - fixture

pytestmark = pytest.mark.llama


@pytest.fixture(scope="module")
def fleet(llama_server_bin: Path) -> Iterator[list[LlamaServer]]:  # noqa: F811 - the fixture above
    servers = [LlamaServer(small_model(), binary=llama_server_bin, parallel=2, ctx_per_slot=2048) for _ in range(2)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


async def test_the_bot_answers_through_a_llama_server_fleet(
    fake_discord: FakeDiscord, database_url: str, tmp_path: Path, fleet: list[LlamaServer]
) -> None:
    d = fake_discord
    env = bot_env(d, database_url, small_model(), ENGINE="remote", N_CTX="2048",
                  LLAMA_SERVER_URLS=",".join(s.url for s in fleet))
    bot = BotProcess(env, tmp_path, tmp_path / "bot.log")
    try:
        await bot.start_and_wait(d, timeout=120)
        question = await d.user_says(d.ann, d.dm, "Hello! Name a colour.")
        reply = (await wait_for(lambda: d.replies_to(question), timeout=60))[0]
        await wait_for(lambda: [c["label"] for row in d.messages[int(reply["id"])]["components"]
                                for c in row["components"]] == ["Regenerate", "Continue"], timeout=60)
        status = await d.slash(d.ann, d.dm, "status")
        await wait_for(lambda: status.response_type == 4)
        text = d.original(status)["content"]
        assert all(f"`{s.url}` up" in text for s in fleet), text
        reload = await d.slash(d.owner, d.general, "reload-model", options={"model": "x.gguf"})
        await wait_for(lambda: reload.response_type == 4)
        assert "llama-server fleet" in d.original(reload)["content"]
    except BaseException:
        print(bot.log_tail(60))
        raise
    finally:
        await bot.stop()
