"""Fair-use bookkeeping with an explicit clock."""

from __future__ import annotations

import pytest

from bot.core.fair_use import BotLoopGuard, Cooldown, RateLimit


def test_rate_limit_is_a_sliding_window_per_person() -> None:
    limit = RateLimit(3, 60.0)
    assert [limit.take(1, t) for t in (0.0, 1.0, 2.0)] == [0.0, 0.0, 0.0]
    assert limit.take(1, 3.0) == pytest.approx(57.0)
    assert limit.take(2, 3.0) == 0.0, "another person has their own window"
    assert limit.take(1, 60.0) == 0.0, "the oldest event left the window"
    assert limit.take(1, 60.5) == pytest.approx(0.5)


def test_cooldown_once_per_period() -> None:
    cooldown = Cooldown(30.0)
    assert cooldown.take(7, 100.0) == 0.0
    assert cooldown.take(7, 110.0) == pytest.approx(20.0)
    assert cooldown.take(7, 130.0) == 0.0


def test_memory_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bot.core.fair_use.MAX_TRACKED", 100)
    limit = RateLimit(1, 60.0)
    for who in range(1000):
        limit.take(who, 0.0)
    assert len(limit._events) == 100
    assert limit.take(999, 1.0) > 0 and limit.take(0, 1.0) == 0.0, "the oldest were forgotten"


def test_bot_loop_guard_resets_when_a_person_speaks() -> None:
    guard = BotLoopGuard(limit=3)
    assert [guard.may_answer_bot("c") for _ in range(4)] == [True, True, True, False]
    assert guard.may_answer_bot("other"), "per conversation"
    guard.person_spoke("c")
    assert guard.may_answer_bot("c")


def test_a_refunded_event_does_not_count() -> None:
    limit = RateLimit(2, 60.0)
    assert limit.take(1, 0.0) == 0.0
    limit.refund(1, 0.0)  # what it allowed was refused
    assert limit.take(1, 1.0) == 0.0 and limit.take(1, 2.0) == 0.0, "a burst of two"
    assert limit.take(1, 3.0) == 58.0, "the third waits until the first leaves the window"
    limit.refund(1, 99.0)  # nothing recorded then: nothing changes
    assert limit.take(1, 4.0) == 57.0
