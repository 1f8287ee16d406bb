"""Who the bot answers and what it stores: pure decisions."""

from __future__ import annotations

import itertools

import pytest

from bot.policy import Incoming, is_admin, may_manage, should_reply, should_store


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
