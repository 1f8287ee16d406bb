"""The batching engine's text decoding (`TextStream`): pure, no model needed."""

from __future__ import annotations

from bot.engine.base import EngineHealth
from bot.engine.text_stream import TextStream


def feed_all(stream: TextStream, pieces: list[bytes]) -> str:
    return "".join(stream.feed(piece) for piece in pieces)


def test_an_invalid_byte_becomes_a_replacement_character_and_stops_still_work() -> None:
    stream = TextStream(("\nAnn:",))
    shown = feed_all(stream, [b"Hello", b" \xff", b"world", b"\nAn", b"n:", b" more"])
    assert stream.stopped
    assert shown == "Hello \ufffdworld"
    assert stream.rest() == ""


def test_a_character_split_over_tokens_waits_for_its_last_byte() -> None:
    stream = TextStream(())
    euro = "€".encode()  # three bytes
    assert stream.feed(b"5 " + euro[:1]) == "5 "
    assert stream.feed(euro[1:2]) == ""
    assert stream.feed(euro[2:]) == "€"
    assert stream.rest() == ""


def test_a_stop_string_split_over_tokens_is_held_back_then_cut() -> None:
    stream = TextStream(("STOP",))
    assert stream.feed(b"abc ST") == "abc"  # the last three characters could start "STOP"
    assert stream.feed(b"O") == " "
    assert stream.feed(b"P and on") == ""
    assert stream.stopped and stream.text == "abc "


def test_held_text_and_a_dangling_partial_character_come_out_at_the_end() -> None:
    stream = TextStream(("STOP",))
    assert stream.feed(b"it is ST") == "it is"
    assert stream.feed("é".encode()[:1]) == ""
    assert stream.rest() == " ST\ufffd"


def test_an_invalid_byte_inside_a_stop_string_does_not_match_it() -> None:
    stream = TextStream(("END",))
    assert feed_all(stream, [b"E\xffND", b" END"]) == "E\ufffdND "
    assert stream.stopped


def test_health_in_words() -> None:
    assert EngineHealth().describe() == "healthy"
    assert EngineHealth(restarts=2, last_error="MemoryError").describe() == (
        "healthy, restarted 2 times, last: MemoryError"
    )
    assert EngineHealth(stuck_seconds=75.2).describe().startswith("stuck for 75 s")
    assert EngineHealth(alive=False, last_error="Killed").describe().startswith("down (Killed)")
    assert not EngineHealth(stuck_seconds=61).healthy and EngineHealth().healthy
