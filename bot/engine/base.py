"""The engine interface: what the rest of the bot may ask of a language model.

Callers build a `GenerationRequest`, `async for` the text pieces of `Engine.stream`, and may
cancel by breaking out of the loop or by calling `Generation.cancel()`. Implementations:
`bot.engine.llama.LlamaEngine` (llama.cpp); tests add scripted ones.
"""

from __future__ import annotations

import abc
import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal


class EngineError(RuntimeError):
    """Generation failed; the message says why in words a person can act on."""


class ModelLoadError(EngineError):
    """A model could not be loaded (missing, corrupt, too large); the old one keeps serving."""


class ModelUnavailable(ModelLoadError):
    """A swap that had to unload the old model failed, and loading the old one back failed
    too: no model is loaded; requests fail until a `reload` succeeds."""


class EngineBusy(EngineError):
    """The queue is full; try again later."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    repeat_penalty: float = 1.1
    seed: int = -1


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    conversation: str | None = None  # a hint for engines that keep per-conversation state
    shared_prefix_chars: int = 0  # the prompt's first characters many conversations share (a preamble)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose evaluation was reused from the last turn
    completion_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    stopped_by: str = ""  # "stop", "length", "cancelled", or "error"
    drafted_tokens: int = 0  # speculative drafts verified (engines that draft)
    accepted_tokens: int = 0  # ...and how many of them the model agreed with

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.generation_seconds if self.generation_seconds else 0.0


class Generation:
    """One generation under way: an async iterator of text pieces, cancellable from any side.

    The worker thread pushes pieces with `push` (thread-safe, through the loop); the
    consumer iterates. `position` is how many requests will be served before this one
    starts (0: it starts now).

    `cancel()` may be called from any thread. It sets `cancelled`, which the worker
    checks between tokens, and calls the engine's `dequeue` hook (given at submit): a
    request still waiting in the queue is taken out and finished at once (under the
    engine's lock, delivering through `finish`), and the others' positions move up.
    """

    def __init__(
        self,
        request: GenerationRequest,
        loop: asyncio.AbstractEventLoop,
        dequeue: Callable[[Generation], object] | None = None,
    ) -> None:
        self.request = request
        self.stats = GenerationStats()
        self.cancelled = threading.Event()
        self._loop = loop
        self._queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
        self._dequeue = dequeue
        self.position = 0

    def cancel(self) -> None:
        """Stop generating; what was already produced stays produced. A request still
        queued ends now, with `stats.stopped_by == "cancelled"` and no text."""
        self.cancelled.set()
        dequeue, self._dequeue = self._dequeue, None  # once is enough
        if dequeue is not None:
            dequeue(self)

    # Called from the worker thread.
    def push(self, piece: str) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, piece)

    def finish(self, error: BaseException | None = None) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, error)

    # Called on the event loop (engines that batch their deliveries, see `deliver_all`).
    def put(self, item: str | BaseException | None) -> None:
        self._queue.put_nowait(item)

    # Called on the event loop (or under the engine's lock by a `dequeue` hook: one attribute).
    def set_position(self, position: int) -> None:
        self.position = position

    def __aiter__(self) -> AsyncIterator[str]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[str]:
        try:
            while True:
                item = await self._queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # The consumer stopped early (break, exception, task cancelled): stop the worker.
            self.cancel()

    async def text(self) -> str:
        return "".join([piece async for piece in self])


def deliver_all(items: list[tuple[Generation, str | BaseException | None]]) -> None:
    """On the event loop: hand over a whole step's pieces (one wake-up, not one per piece).

    A piece is text; None ends a generation; an exception ends it with that error."""
    for generation, item in items:
        generation.put(item)


@dataclass(frozen=True)
class EngineHealth:
    """How an engine's worker is doing, for /status (see `Engine.health`)."""

    alive: bool = True  # the worker thread is running
    heartbeat_age: float = 0.0  # seconds since the worker last went round its loop
    stuck_seconds: float = 0.0  # > 0: it has had work but no progress for this long
    restarts: int = 0  # dead workers the watchdog replaced
    last_error: str = ""  # the last unexpected error the worker met (or died of)

    @property
    def healthy(self) -> bool:
        return self.alive and not self.stuck_seconds

    def describe(self) -> str:
        if not self.alive:
            return f"down ({self.last_error or 'the worker stopped'}); restarting it"
        if self.stuck_seconds:
            return f"stuck for {self.stuck_seconds:.0f} s (inside llama.cpp; restart the bot if it stays stuck)"
        if self.restarts:
            return f"healthy, restarted {self.restarts} time{'s' if self.restarts != 1 else ''}, last: {self.last_error}"
        if self.last_error:
            return f"healthy (last error: {self.last_error})"
        return "healthy"


@dataclass(frozen=True)
class ReloadPlan:
    """How `Engine.reload` will swap models (see `Engine.plan_reload`).

    "beside": the new model loads next to the old one, which serves until the switch.
    "unload": both do not fit in memory together: the old model is unloaded first, so the
    bot is offline while the new one loads; requests wait in the queue meanwhile and are
    answered afterwards, and the old model is loaded back if the new one fails."""

    mode: Literal["beside", "unload"] = "beside"
    detail: str = ""  # the memory arithmetic behind the choice, in words


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    n_ctx: int


class Engine(abc.ABC):
    """A language model behind a queue; safe to use from the event loop."""

    @property
    @abc.abstractmethod
    def info(self) -> ModelInfo: ...

    @abc.abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens the loaded model's own tokenizer makes of `text` (with BOS)."""

    @abc.abstractmethod
    def submit(self, request: GenerationRequest) -> Generation:
        """Queue a generation (from the event loop); iterate the result for its text."""

    @abc.abstractmethod
    async def reload(self, path: str | None = None) -> ModelInfo:
        """Load a model beside the current one and switch when it is ready; or, when both do
        not fit (see `plan_reload`), unload the current one first, requests waiting meanwhile.

        On failure raise `ModelLoadError` and keep serving with the current model (loaded
        back if it had been unloaded; `ModelUnavailable` if even that failed).
        """

    async def plan_reload(self, path: str | None = None) -> ReloadPlan:
        """How `reload(path)` would swap, decided now (raises `ModelLoadError` at once for a
        file that cannot load here at all). Engines that never unload need not override it."""
        return ReloadPlan()

    @property
    def queue_depth(self) -> int:
        return 0

    @property
    def last_stats(self) -> GenerationStats | None:
        return None

    @property
    def health(self) -> EngineHealth:
        """The worker's health; engines without a worker thread are always healthy."""
        return EngineHealth()

    def slot_usage(self) -> tuple[int, int]:
        """(sequences generating now, how many can at once), for metrics and /status."""
        return (0, 1)

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish or cancel what is queued and free the model."""
