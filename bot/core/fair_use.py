"""Fair use, as pure bookkeeping (the clock is passed in, so tests need no sleeping):
per-person rate limits and cooldowns, and the guard that stops two bots answering each
other forever. Memory stays bounded: idle people are forgotten."""

from __future__ import annotations

from collections import OrderedDict, deque

MAX_TRACKED = 10_000  # people remembered per limit (the least recently seen are dropped)


class RateLimit:
    """At most `count` events per `window` seconds per person (a sliding window)."""

    def __init__(self, count: int, window: float) -> None:
        if count < 1 or window <= 0:
            raise ValueError("a rate limit needs count >= 1 and window > 0")
        self.count = count
        self.window = window
        self._events: OrderedDict[int, deque[float]] = OrderedDict()

    def take(self, who: int, now: float) -> float:
        """Record an event and return 0, or return how many seconds until one is allowed
        (nothing recorded)."""
        events = self._events.get(who)
        if events is None:
            events = self._events[who] = deque()
            while len(self._events) > MAX_TRACKED:
                self._events.popitem(last=False)
        self._events.move_to_end(who)
        while events and now - events[0] >= self.window:
            events.popleft()
        if len(events) >= self.count:
            return self.window - (now - events[0])
        events.append(now)
        return 0.0


    def refund(self, who: int, at: float) -> None:
        """Forget the event `take` recorded at `at`: what it allowed was refused or failed,
        and a refused request does not count."""
        events = self._events.get(who)
        if events is not None and at in events:
            events.remove(at)


class Cooldown(RateLimit):
    """Once per `seconds` per person."""

    def __init__(self, seconds: float) -> None:
        super().__init__(1, seconds)


class BotLoopGuard:
    """Never answer other bots more than `limit` times in a row in a conversation without a
    person speaking there in between (two bots would otherwise answer each other forever)."""

    def __init__(self, limit: int = 3) -> None:
        self.limit = limit
        self._in_a_row: OrderedDict[str, int] = OrderedDict()

    def person_spoke(self, conversation: str) -> None:
        self._in_a_row.pop(conversation, None)

    def may_answer_bot(self, conversation: str) -> bool:
        """Count an answer to a bot; False once the limit is reached."""
        count = self._in_a_row.get(conversation, 0)
        if count >= self.limit:
            return False
        self._in_a_row[conversation] = count + 1
        self._in_a_row.move_to_end(conversation)
        while len(self._in_a_row) > MAX_TRACKED:
            self._in_a_row.popitem(last=False)
        return True


class ChatGate:
    """Whether to answer a message now. A person gets at most `per_minute` answers a minute
    and `share` answers under way at once; another bot gets at most `bot_limit` answers in
    a row in a conversation. `check` returns None (answer), or the notice to show the
    person (their message is stored either way), or "" (stay silent: told already, or a bot)."""

    def __init__(self, per_minute: int, share: int, bot_limit: int) -> None:
        self.rate = RateLimit(per_minute, 60.0) if per_minute > 0 else None
        self.share = share
        self.loops = BotLoopGuard(bot_limit)
        self._told = Cooldown(60.0)  # one notice a minute per person, not one per message

    def check(self, conversation: str, person: int, from_bot: bool, under_way: int, now: float) -> str | None:
        if from_bot:
            return None if self.loops.may_answer_bot(conversation) else ""
        self.loops.person_spoke(conversation)
        if under_way >= self.share:
            notice = (f"*(you already have {under_way} answers under way; your message is saved and "
                      "I read it with your next one)*")
        elif self.rate is not None and (wait := self.rate.take(person, now)):
            notice = f"*(slow down: I can answer you again in {wait:.0f} s; your message is saved)*"
        else:
            return None
        return "" if self._told.take(person, now) else notice
