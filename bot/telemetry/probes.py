"""The operators' HTTP endpoint (`METRICS_ADDR`, default `127.0.0.1:9464`; `off`: none), on
the bot's event loop through aiohttp's web server:

- `/metrics`: the Prometheus exposition of `bot.telemetry.metrics` (and the process's own);
- `/healthz`: 200 while the process and its event loop live (an answer at all proves the
  loop is not blocked): for a liveness probe or systemd's watchdog;
- `/readyz`: 200 when every readiness check passes (connected to Discord, the model or a
  server ready, the database answering), else 503 with each check's result as JSON: for a
  readiness probe or a load balancer. Each check has `CHECK_SECONDS` to answer.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

log = logging.getLogger(__name__)
CHECK_SECONDS = 2.0
Check = Callable[[], bool | Awaitable[bool]]


def parse_address(address: str) -> tuple[str, int] | None:
    """`host:port` (`[v6]:port`, `:port` for every interface); None for an empty value."""
    address = address.strip()
    if not address:
        return None
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif "[" in host or "]" in host or ":" in host:
        sep = ""  # a v6 address without its brackets, or brackets that do not pair
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port) or not 0 < int(port) < 65536:
        raise ValueError(f"METRICS_ADDR must be host:port (e.g. 127.0.0.1:9464, [::1]:9464) or off, not {address!r}")
    return host or "0.0.0.0", int(port)  # noqa: S104 - ":port" asks for every interface


class Probes:
    """`/metrics`, `/healthz` and `/readyz` on one address; `checks` name what ready means."""

    def __init__(self, host: str, port: int, checks: Mapping[str, Check]) -> None:
        self.host, self.port = host, port
        self.checks = dict(checks)
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as error:
            await self._runner.cleanup()
            raise OSError(f"cannot serve metrics on {self.host}:{self.port} ({error}): "
                          "set METRICS_ADDR to a free address, or empty to switch it off") from error
        if self.port == 0 and self._runner.addresses:  # port 0: the system chose one
            self.port = int(self._runner.addresses[0][1])
        log.info("metrics and health probes on http://%s:%d (/metrics, /healthz, /readyz)", self.host, self.port)

    async def close(self) -> None:
        await self._runner.cleanup()

    async def ready(self) -> dict[str, bool]:
        """Each check's result now (a check that raises or takes too long: False)."""
        names = list(self.checks)
        results = await asyncio.gather(*(self._run(self.checks[name]) for name in names))
        return dict(zip(names, results, strict=True))

    @staticmethod
    async def _run(check: Check) -> bool:
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await asyncio.wait_for(result, CHECK_SECONDS)
            return bool(result)
        except Exception:  # noqa: BLE001 - a failing check means not ready, never a 500
            log.debug("a readiness check failed", exc_info=True)
            return False

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    async def _readyz(self, request: web.Request) -> web.Response:
        results = await self.ready()
        return web.json_response({"ready": all(results.values()), "checks": results},
                                 status=200 if all(results.values()) else 503)
