"""The real bot as its own process (`python -m bot`, exactly what a user runs) against the
fake Discord server of the test, with the real small GGUF model.

    env = bot_env(fake, database_url, gguf_path)
    bot = BotProcess(env, tmp_path, tmp_path / "bot.log")
    await bot.start()
    await bot.wait_ready(fake)        # IDENTIFY reached the fake; fails with the log tail
    ...
    bot.kill(); await bot.wait(10)    # SIGKILL: a crash, nothing cleaned up
    await bot.stop()                  # at the end: SIGTERM, then SIGKILL if it lingers
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import IO

from tests import crashes
from tests.e2e.fake_discord import FakeDiscord

REPO = Path(__file__).resolve().parents[2]


def bot_env(fake: FakeDiscord, database_url: str, model_path: Path | str, **extra: str) -> dict[str, str]:
    """The environment of a bot process talking to `fake`: nothing inherited but PATH and
    HOME (and the hub cache location), so a developer's own settings cannot leak in.
    `extra` adds or overrides settings, e.g. MAX_NEW_TOKENS="8" or ENGINE="simple"."""
    env = {
        "DISCORD_TOKEN": "fake-token",
        "DATABASE_URL": database_url,
        "DISCORD_API_BASE": fake.api_base,
        "DISCORD_GATEWAY_URL": fake.gateway_url,
        "MODEL_PATH": str(model_path),
        "N_CTX": "1024",
        "MAX_NEW_TOKENS": "16",
        "N_THREADS": "2",
        "N_GPU_LAYERS": "0",
        "N_PARALLEL": "2",
        "KV_RAM_CACHE_MB": "64",
        "SEED": "1",
        "PERSONAS_DIR": str(REPO / "personas"),
        "LOG_LEVEL": "INFO",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "METRICS_ADDR": "off",  # several bots run at once in the tests; a test asks for a port
    }
    for name in ("PATH", "HOME", "HF_HOME", "XDG_CACHE_HOME", "TMPDIR", "LANG"):
        if name in os.environ:
            env[name] = os.environ[name]
    env.update(extra)
    return env


class BotProcess:
    """One `python -m bot` process; `start` again after it exited to restart it (same log)."""

    def __init__(self, env: dict[str, str], workdir: Path, log_path: Path) -> None:
        self.env = dict(env)
        self.workdir = Path(workdir)
        self.log_path = Path(log_path)
        self.env.setdefault("MODELS_DIR", str(self.workdir / "models"))
        self._process: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None
        self.starts = 0

    @property
    def returncode(self) -> int | None:
        """None while it runs (or before it started); negative: killed by that signal."""
        return self._process.returncode if self._process is not None else None

    name = "the bot process"

    def exit_code(self) -> int | None:
        return self.returncode

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        assert not self.running, "the bot process is already running"
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "models").mkdir(exist_ok=True)
        env_file = self.workdir / "empty.env"  # never the developer's .env
        env_file.write_text("")
        self._close_log()
        self._log = self.log_path.open("ab")
        self.starts += 1
        self._log.write(f"----- start {self.starts} -----\n".encode())
        self._log.flush()
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "--env-file", str(env_file),
            env=self.env, cwd=REPO, stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log, stderr=asyncio.subprocess.STDOUT,
        )
        crashes.watch(self)

    async def wait_ready(self, fake: FakeDiscord, timeout: float = 120.0) -> None:
        """Until the process IDENTIFYs to `fake` (clear `fake.identified` before `start`);
        fails at once, with the log tail, if it exits, and after `timeout` otherwise."""
        waiter = asyncio.ensure_future(fake.identified.wait())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while not waiter.done():
                if not self.running:
                    raise AssertionError(
                        f"the bot process {crashes.describe_exit(self.returncode)} before it connected;"
                        f" log tail:\n{self.log_tail()}"
                    )
                if loop.time() > deadline:
                    raise AssertionError(
                        f"the bot process did not connect within {timeout}s; log tail:\n{self.log_tail()}"
                    )
                await asyncio.wait([waiter], timeout=0.1)
        finally:
            waiter.cancel()

    async def start_and_wait(self, fake: FakeDiscord, timeout: float = 120.0) -> None:
        """`start`, then `wait_ready`: the process is connected to `fake` when this returns."""
        fake.identified.clear()
        await self.start()
        await self.wait_ready(fake, timeout)

    def terminate(self) -> None:
        """SIGTERM: what systemd or Ctrl-C-like shutdowns send."""
        crashes.expect_exit(self)
        if self.running:
            self._process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]

    def kill(self) -> None:
        """SIGKILL: a crash or the OOM killer; the process cleans nothing up."""
        crashes.expect_exit(self)
        if self.running:
            self._process.kill()  # type: ignore[union-attr]

    async def wait(self, timeout: float = 30.0) -> int:
        """The exit code once it exited; AssertionError (with the log tail) after `timeout`."""
        assert self._process is not None, "the bot process was never started"
        crashes.expect_exit(self)  # the test waits for the exit: it is expected
        try:
            code = await asyncio.wait_for(self._process.wait(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"the bot process did not exit within {timeout}s; log tail:\n{self.log_tail()}"
            ) from None
        self._close_log()
        return code

    async def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL if it is still running after `timeout`; safe to call twice."""
        crashes.expect_exit(self)
        if self._process is None:
            return None
        if self.running:
            self.terminate()
            try:
                await asyncio.wait_for(self._process.wait(), timeout)
            except TimeoutError:
                self.kill()
                await self._process.wait()
        self._close_log()
        return self.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
