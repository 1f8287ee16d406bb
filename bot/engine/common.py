"""What both engines (`llama.LlamaEngine`, `scheduler.BatchedEngine`) share: checking a model
file before llama.cpp sees it, finishing a hot swap on the event loop, turning any failure
into an `EngineError` a person can read, and the watchdog that keeps the worker thread
owning the llama.cpp context alive.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bot.engine.base import EngineError, EngineHealth, ModelLoadError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


def check_model_file(path: Path, n_gpu_layers: int = 0) -> None:
    """Fail early, with a helpful message, on a file llama.cpp could not load."""
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path} (check MODEL_PATH or MODELS_DIR)")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(
            f"{path.name} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
            "convert it with `hermes-train export` or download a .gguf build"
        )
    size = path.stat().st_size
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    offloading = n_gpu_layers != 0 and _supports_gpu_offload()
    if not offloading and size > ram:
        raise ModelLoadError(
            f"{path.name} is {size / 2**30:.1f} GiB but this machine has {ram / 2**30:.1f} GiB "
            "of RAM and llama.cpp has no GPU offload here: pick a smaller quantization "
            "or install llama-cpp-python with CUDA (see README)"
        )


def _supports_gpu_offload() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def finish_swap(old_model: Any, done: asyncio.Future[None]) -> None:
    """On the loop thread, after a hot swap: free the old model (count_tokens, which runs
    on the loop, may have been reading its vocabulary) and wake the reload."""
    old_model.close()
    done.set_result(None)


def describe_error(error: BaseException) -> str:
    """`MemoryError: ` is all str() gives for some errors: name the type too."""
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def as_engine_error(error: BaseException) -> EngineError:
    """What a caller is told when its generation failed for an unexpected reason."""
    if isinstance(error, EngineError):
        return error
    return EngineError(f"generation failed ({describe_error(error)})")


class Watchdog:
    """Runs an engine's worker thread, reports its health, and replaces it when it dies.

    The worker (`run(crash)`) calls `beat()` every time round its loop and `note(error)`
    for every unexpected error it survives. Nothing derived from `Exception` should end
    it; anything that still does (a `BaseException`, a bug in the error handling) is
    logged, and the watchdog task on the event loop notices within `interval` seconds
    and starts a fresh thread with `run(crash)`: that thread first fails what the dead
    one held with `crash` (an `EngineError` for people) and resets its sequence state,
    then serves on. Only one thread ever owns the context: the fresh one starts after
    the old one has ended.

    A worker that is alive and has work (`busy()`) but has not beaten for `stuck_after`
    seconds is reported as stuck (and a warning logged once). It is left alone: a thread
    stuck inside llama_decode (C code) cannot be interrupted or killed from Python, and
    a second thread on the same context would corrupt it; only a restart of the bot helps.
    """

    def __init__(
        self,
        name: str,
        run: Callable[[EngineError | None], None],
        busy: Callable[[], bool],
        stuck_after: float = 60.0,
        interval: float = 1.0,
    ) -> None:
        self.name = name
        self._run = run
        self._busy = busy
        self.stuck_after = stuck_after
        self.interval = interval
        self.heartbeat = time.monotonic()
        self.restarts = 0
        self.last_error = ""
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None
        self._warned = False

    # ---- the worker thread ------------------------------------------------------------

    def start_thread(self, crash: EngineError | None = None) -> None:
        self.beat()
        self._thread = threading.Thread(target=self._guard, args=(crash,), name=self.name, daemon=True)
        self._thread.start()

    def _guard(self, crash: EngineError | None) -> None:
        try:
            self._run(crash)
        except BaseException as error:  # noqa: BLE001 - recorded; the watchdog starts a new worker
            self.note(error)
            log.critical("%s died; the watchdog will restart it", self.name, exc_info=True)

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def beat(self) -> None:
        self.heartbeat = time.monotonic()

    def note(self, error: BaseException) -> None:
        self.last_error = describe_error(error)

    # ---- the event loop ---------------------------------------------------------------

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        self._task = loop.create_task(self._watch(), name=f"{self.name}-watchdog")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.check()
            except Exception:
                log.exception("%s watchdog check failed", self.name)

    def check(self) -> None:
        """Restart a dead worker; warn (once) about a stuck one."""
        if self._thread is not None and not self._thread.is_alive():
            self.restarts += 1
            reason = self.last_error or "no error recorded"
            log.error("%s had stopped (%s): starting a fresh one (restart %d)", self.name, reason, self.restarts)
            self.start_thread(EngineError(
                f"the model's worker crashed ({reason}) and was restarted; this reply was lost, please ask again"
            ))
            return
        stuck = self.stuck_seconds()
        if stuck and not self._warned:
            log.warning(
                "%s has had work but no progress for %.0f s: probably stuck inside llama.cpp, "
                "which cannot be interrupted; restart the bot if it does not recover", self.name, stuck
            )
        self._warned = bool(stuck)

    def stuck_seconds(self) -> float:
        age = time.monotonic() - self.heartbeat
        return age if age >= self.stuck_after and self._busy() else 0.0

    @property
    def health(self) -> EngineHealth:
        return EngineHealth(
            alive=self._thread is not None and self._thread.is_alive(),
            heartbeat_age=time.monotonic() - self.heartbeat,
            stuck_seconds=self.stuck_seconds(),
            restarts=self.restarts,
            last_error=self.last_error,
        )
