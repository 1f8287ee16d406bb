"""One lane per conversation: its jobs run one at a time, in order, and questions that
arrive while the lane is busy are coalesced into one answer to the latest of them.

A busy channel therefore never falls behind by more than one reply: whatever people said
while the bot was writing is in the history the next prompt reads, and one reply answers
it all. Other jobs (Regenerate) queue behind, at most `max_jobs` per lane.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)
Job = Callable[[], Awaitable[None]]
MAX_JOBS = 4  # waiting jobs per conversation (one of them at most a coalesced answer)


@dataclass
class _Lane:
    jobs: deque[tuple[int | None, Job]] = field(default_factory=deque)  # (answer's order or None, job)
    worker: asyncio.Task[None] | None = None
    answering: int | None = None  # the order of the answer running now


class ChannelQueue:
    def __init__(self, max_jobs: int = MAX_JOBS) -> None:
        self.max_jobs = max_jobs
        self._lanes: dict[str, _Lane] = {}
        self._closed = False

    def answer(self, key: str, job: Job, order: int) -> None:
        """Queue an answer to the question numbered `order` (its message id): an answer
        already waiting in this lane answers the newer of the two questions (coalesced)."""
        lane = self._lanes.setdefault(key, _Lane())
        if lane.answering is not None and order <= lane.answering:
            return  # the answer being written already covers it (e.g. found again by recovery)
        for index, (waiting, _) in enumerate(lane.jobs):
            if waiting is not None:
                if order > waiting:
                    lane.jobs[index] = (order, job)
                log.info("%s: one answer for the messages that came while the bot was busy", key)
                break
        else:
            lane.jobs.append((order, job))
        self._run(key, lane)

    def other(self, key: str, job: Job) -> bool:
        """Queue another job (Regenerate); False when the lane is full."""
        lane = self._lanes.setdefault(key, _Lane())
        if len(lane.jobs) >= self.max_jobs:
            return False
        lane.jobs.append((None, job))
        self._run(key, lane)
        return True

    def _run(self, key: str, lane: _Lane) -> None:
        if lane.worker is None and not self._closed:
            lane.worker = asyncio.create_task(self._drain(key, lane), name=f"lane {key}")

    async def _drain(self, key: str, lane: _Lane) -> None:
        try:
            while lane.jobs and not self._closed:
                lane.answering, job = lane.jobs.popleft()
                try:
                    await job()
                except Exception:
                    log.exception("%s: a job failed", key)
        finally:
            lane.worker, lane.answering = None, None
            if not lane.jobs and self._lanes.get(key) is lane:
                del self._lanes[key]

    def workers(self) -> list[asyncio.Task[None]]:
        return [lane.worker for lane in self._lanes.values() if lane.worker is not None]

    def close(self) -> int:
        """Take no more jobs and drop the waiting ones (their questions are stored, and
        answered after the restart); the running ones go on. How many were dropped."""
        self._closed = True
        dropped = sum(len(lane.jobs) for lane in self._lanes.values())
        for lane in self._lanes.values():
            lane.jobs.clear()
        return dropped
