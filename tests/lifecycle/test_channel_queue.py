"""The per-conversation lanes: one answer at a time, newer questions coalesced, an answer
already being written never queued again."""

from __future__ import annotations

import asyncio

from bot.lifecycle.channel_queue import ChannelQueue


async def test_questions_that_arrive_meanwhile_get_one_answer_to_the_newest() -> None:
    lanes = ChannelQueue()
    answered: list[int] = []
    release = asyncio.Event()

    def job(order: int):  # type: ignore[no-untyped-def]
        async def run() -> None:
            if order == 1:
                await release.wait()
            answered.append(order)
        return run

    lanes.answer("c", job(1), 1)
    await asyncio.sleep(0)
    for order in (3, 2, 4):
        lanes.answer("c", job(order), order)
    lanes.answer("c", job(1), 1)  # found again (recovery) while it is being answered: ignored
    release.set()
    for _ in range(20):
        await asyncio.sleep(0)
    assert answered == [1, 4]
    assert lanes.workers() == []


async def test_other_jobs_queue_behind_up_to_a_bound() -> None:
    lanes = ChannelQueue(max_jobs=2)
    gate = asyncio.Event()

    async def slow() -> None:
        await gate.wait()

    lanes.answer("c", slow, 1)
    await asyncio.sleep(0)
    assert lanes.other("c", slow) and lanes.other("c", slow)
    assert not lanes.other("c", slow), "the lane is full"
    assert lanes.close() == 2
    gate.set()
