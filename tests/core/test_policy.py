"""Who the bot answers and what it stores: pure decisions."""

from __future__ import annotations

import itertools

import pytest

from bot.core.policy import Incoming, is_admin, may_manage, should_reply, should_store


def incoming(**kw: bool) -> Incoming:
    base = dict(from_self=False, from_bot=False, is_dm=False, mentions_bot=False,
                replies_to_bot=False, channel_enabled=False)
    return Incoming(**(base | kw))


@pytest.mark.parametrize("reason", ["is_dm", "mentions_bot", "replies_to_bot", "channel_enabled"])
def test_each_reason_to_reply(reason: str) -> None:
    assert should_reply(incoming(**{reason: True}))


def test_plain_channel_chatter_is_neither_answered_nor_stored() -> None:
    """Privacy: in a channel that is not enabled, only what addresses the bot is kept."""
    assert not should_reply(incoming())
    assert not should_store(incoming())
    assert should_store(incoming(mentions_bot=True)) and should_store(incoming(replies_to_bot=True))


def test_dms_and_enabled_channels_keep_everything_even_other_bots() -> None:
    assert should_store(incoming(from_bot=True, is_dm=True))
    assert should_store(incoming(from_bot=True, channel_enabled=True))
    assert not should_reply(incoming(from_bot=True, channel_enabled=True))


def test_never_itself_and_bots_only_when_asked() -> None:
    for flags in itertools.product([True, False], repeat=4):
        reasons = dict(zip(["is_dm", "mentions_bot", "replies_to_bot", "channel_enabled"], flags, strict=True))
        assert not should_reply(incoming(from_self=True, **reasons), reply_to_bots=True)
        assert not should_store(incoming(from_self=True, **reasons))
    assert not should_reply(incoming(from_bot=True, is_dm=True))
    assert should_reply(incoming(from_bot=True, is_dm=True), reply_to_bots=True)


def test_admins() -> None:
    assert is_admin(5, frozenset({5}), False)
    assert is_admin(6, frozenset({5}), True)
    assert not is_admin(6, frozenset({5}), False)
    assert may_manage(6, frozenset(), False, True)
    assert not may_manage(6, frozenset(), False, False)


# ---- when to speak (/channel speak): messages that do not address the bot --------------

from bot.core.policy import FollowUps, Speaking, names, speaks_unaddressed  # noqa: E402


class Draws:
    """An injected random source that records how often it was asked."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)
        self.asked = 0

    def __call__(self) -> float:
        self.asked += 1
        return self.values.pop(0)


def test_reply_chance_answers_that_share_of_messages() -> None:
    rules = Speaking(reply_chance=30)
    assert speaks_unaddressed(incoming(), "hello all", rules, ["Vex"], False, Draws(0.29)) == "chance"
    assert speaks_unaddressed(incoming(), "hello all", rules, ["Vex"], False, Draws(0.30)) is None
    always, never = Speaking(reply_chance=100), Speaking(reply_chance=0)
    assert speaks_unaddressed(incoming(), "x", always, ["Vex"], False, Draws(0.999)) == "chance"
    quiet = Draws(0.0)
    assert speaks_unaddressed(incoming(), "x", never, ["Vex"], False, quiet) is None
    assert quiet.asked == 0, "no chance set: the random source is not even asked"


def test_name_trigger_is_a_whole_word_in_any_case() -> None:
    rules = Speaking(name_trigger=True)
    assert speaks_unaddressed(incoming(), "what do you think, VEX?", rules, ["Vex"], False, Draws()) == "name"
    assert speaks_unaddressed(incoming(), "that is vexing", rules, ["Vex"], False, Draws()) is None
    assert speaks_unaddressed(incoming(), "hi vex", Speaking(), ["Vex"], False, Draws()) is None, "trigger off"
    scene = ["Vex", "Marlowe"]
    assert speaks_unaddressed(incoming(), "marlowe, your turn", rules, scene, False, Draws()) == "name", "a scene's"
    assert names("ask captain   vex now", "Captain Vex") and not names("captainvex", "Captain Vex")
    assert names("(Hermes)", "Hermes") and not names("Hermes2", "Hermes") and not names("x", "")


def test_follow_up_window_answers_the_same_persons_next_message() -> None:
    follow = FollowUps()
    ann, bob, channel = 1, 2, 10
    follow.answered(channel, ann, now=100.0)
    assert follow.within(channel, ann, now=159.0, seconds=60)
    assert not follow.within(channel, ann, now=161.0, seconds=60), "the window closed"
    assert not follow.within(channel, bob, now=101.0, seconds=60), "only the person answered"
    assert not follow.within(11, ann, now=101.0, seconds=60), "only in that channel"
    rules = Speaking(follow_up_seconds=60)
    assert speaks_unaddressed(incoming(), "and then?", rules, ["Vex"], True, Draws()) == "follow-up"
    assert speaks_unaddressed(incoming(), "and then?", rules, ["Vex"], False, Draws()) is None
    assert speaks_unaddressed(incoming(), "and then?", Speaking(), ["Vex"], True, Draws()) is None, "no window set"


def test_follow_ups_are_bounded() -> None:
    follow = FollowUps(capacity=3)
    for channel in range(10):
        follow.answered(channel, 1, now=0.0)
    assert not follow.within(0, 1, now=1.0, seconds=60) and follow.within(9, 1, now=1.0, seconds=60)
    assert len(follow._last) == 3


def test_unaddressed_rules_never_answer_self_or_bots_and_leave_dms_and_enabled_channels_alone() -> None:
    rules = Speaking(reply_chance=100, follow_up_seconds=60, name_trigger=True)
    assert speaks_unaddressed(incoming(from_self=True), "Vex", rules, ["Vex"], True, Draws(0.0)) is None
    assert speaks_unaddressed(incoming(from_bot=True), "Vex", rules, ["Vex"], True, Draws(0.0)) is None
    assert speaks_unaddressed(incoming(from_bot=True), "Vex", rules, ["Vex"], False, Draws(0.0),
                              reply_to_bots=True) == "name"
    # DMs and enabled channels are answered by should_reply already.
    assert speaks_unaddressed(incoming(is_dm=True), "Vex", rules, ["Vex"], True, Draws(0.0)) is None
    assert speaks_unaddressed(incoming(channel_enabled=True), "Vex", rules, ["Vex"], True, Draws(0.0)) is None
