"""Splitting replies for Discord (hypothesis) and the edit throttle."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.core.replies import DISCORD_LIMIT, MIN_LIMIT, EditThrottle, queue_notice, split_message

FENCE = re.compile(r"^[ \t]*```", re.M)
REOPEN_LINE = re.compile(r"```[A-Za-z0-9_+#.-]*")
HARD_TIMEOUT = 2.0  # seconds for one split_message call; the worst inputs here take milliseconds


@contextmanager
def hard_timeout(seconds: float) -> Iterator[None]:
    """Fail with TimeoutError if the block runs longer than `seconds`. A hypothesis deadline
    only complains after a call returns; SIGALRM interrupts an endless loop."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"split_message ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def split(text: str, limit: int = DISCORD_LIMIT) -> list[str]:
    with hard_timeout(HARD_TIMEOUT):
        return split_message(text, limit=limit)


def nonblank(text: str) -> str:
    return re.sub(r"\s", "", text)


def added_fences_removed_matches(text: str, parts: list[str]) -> bool:
    """Whether `parts` are exactly `text` (ignoring whitespace) once the fences the split
    adds are taken out: a closing ``` as a part's last line, always followed by a reopening
    ```lang as the first line of the next part. The text may end with an added close (an
    unclosed block). Several readings can fit where the text has fences of its own at a
    cut, so every consistent one is followed; a lost, repeated, reordered or invented
    character leaves none."""
    target = nonblank(text)
    states = {(0, False)}  # (characters of target matched, the previous part ended with an added close)
    for part in parts:
        lines = part.split("\n")
        following = set()
        for matched, reopened in states:
            first = 1 if reopened else 0
            if reopened and not REOPEN_LINE.fullmatch(lines[0]):
                continue
            for closed in (False, True):
                last = len(lines) - 1 if closed else len(lines)
                if last < first or (closed and lines[-1] != "```"):
                    continue
                body = nonblank("\n".join(lines[first:last]))
                if target.startswith(body, matched):
                    following.add((matched + len(body), closed))
        states = following
    return any(matched == len(target) for matched, _ in states)


def assert_valid_split(text: str, parts: list[str], limit: int) -> None:
    for part in parts:
        assert 1 <= len(part) <= limit, (len(part), limit)
        assert part.strip(), repr(part)
        assert len(FENCE.findall(part)) % 2 == 0, part
    assert added_fences_removed_matches(text, parts), (text, parts)


def test_short_text_is_one_message() -> None:
    assert split_message("  hello  ") == ["hello"]
    assert split_message("") == [] and split_message(" \n ") == []


def test_prefers_paragraph_then_sentence_boundaries() -> None:
    text = "A" * 1500 + "\n\n" + "B" * 1000
    assert split_message(text) == ["A" * 1500, "B" * 1000]
    sentences = " ".join(["This is a sentence."] * 200)
    parts = split_message(sentences)
    assert all(p.endswith(".") for p in parts)


def test_code_block_is_closed_and_reopened_with_its_language() -> None:
    code = "\n".join(f"x_{i} = {i}  # a comment to make the line longer" for i in range(100))
    text = f"Intro\n```python\n{code}\n```\nOutro"
    parts = split_message(text)
    assert len(parts) >= 3
    assert parts[0].endswith("```") and parts[1].startswith("```python\n")
    for part in parts:
        assert len(FENCE.findall(part)) % 2 == 0
    joined = "\n".join(parts)
    assert all(f"x_{i} = {i}  # a comment to make the line longer" in joined for i in range(100))
    assert_valid_split(text, parts, DISCORD_LIMIT)


EMPTY_BLOCK = re.compile(r"^[ \t]*```\S*\n[ \t]*```[ \t]*$", re.M)


@pytest.mark.parametrize("width", [5, 13])
def test_no_part_holds_an_empty_code_block(width: int) -> None:
    # Without care a cut lands just after the opening fence ("Intro\n```python\n```") or
    # just before the closing one (the next part starts "```python\n```").
    code = "\n".join(f"{i:>{width}}" for i in range(12))
    text = f"Intro text.\n```python\n{code}\n```\nOutro."
    for limit in range(40, 200):
        parts = split(text, limit=limit)
        assert_valid_split(text, parts, limit)
        assert not any(EMPTY_BLOCK.search(p) for p in parts), (limit, parts)


def test_unclosed_fence_from_the_model_is_closed() -> None:
    (part,) = split_message("```js\nconsole.log(1)")
    assert part == "```js\nconsole.log(1)\n```"


def test_no_spaces_at_all_is_cut_hard() -> None:
    parts = split_message("x" * 4500)
    assert [len(p) for p in parts] == [2000, 2000, 500]


def test_regression_a_long_fence_line_gave_a_2015_character_part() -> None:
    # The old split sent a 2015-character part here, which Discord rejects (error 50035).
    text = "```" + "a" * 2005 + "\ny\n```"
    parts = split(text)
    assert max(len(p) for p in parts) <= DISCORD_LIMIT
    assert_valid_split(text, parts, DISCORD_LIMIT)


@pytest.mark.parametrize("length", [1993, 1994, 1997, 2000, 2015, 5000])
def test_regression_an_unclosed_long_fence_line_hung_the_bot(length: int) -> None:
    # The old split never returned for an unclosed fence line of 1997+ characters.
    text = "```" + "a" * length
    parts = split(text)
    assert_valid_split(text, parts, DISCORD_LIMIT)


def test_a_long_info_string_is_not_reopened() -> None:
    text = "```" + "i" * 3000 + "\n" + "\n".join(f"line {n}" for n in range(400)) + "\n```"
    parts = split(text)
    assert_valid_split(text, parts, DISCORD_LIMIT)
    assert all(p.startswith("```\n") for p in parts[2:]), [p[:20] for p in parts]


def test_odd_languages_are_reopened_plain() -> None:
    code = "\n".join(f"line {n}" for n in range(20))
    for info, reopened in (("c++", "```c++\n"), ("py{attr=1}", "```\n"), ("``````", "```\n")):
        parts = split(f"```{info}\n{code}", limit=60)
        assert parts[1].startswith(reopened), (info, parts[1])


def test_crlf_and_unicode() -> None:
    text = "héllo wörld 🙂\r\n```py\r\n" + "print('ü')\r\n" * 300 + "```\r\nbye"
    parts = split(text)
    assert all("\r" not in p for p in parts) and parts[1].startswith("```py\n")
    assert_valid_split(text, parts, DISCORD_LIMIT)


def test_small_limits_and_the_minimum() -> None:
    text = "```python\n" + "def f():\n    return 1\n" * 5 + "```\nok"
    for limit in range(MIN_LIMIT, 41):
        assert_valid_split(text, split(text, limit=limit), limit)
    with pytest.raises(ValueError):
        split_message("hello", limit=MIN_LIMIT - 1)


def test_worst_inputs_are_fast() -> None:
    """A megabyte of the nastiest shapes splits in well under a second each."""
    nasty = [
        "```" + "x" * 1_000_000,
        "```py\n" + "x" * 1_000_000,
        "```\n" * 250_000,
        ("```" + "a" * 1990 + "\n") * 500,
        " " * 500_000 + "x" + "\n" * 500_000,
    ]
    for text in nasty:
        started = time.perf_counter()
        parts = split(text)
        assert time.perf_counter() - started < 1.0
        assert all(1 <= len(p) <= DISCORD_LIMIT and p.strip() for p in parts)


def run(char: str, longest: int) -> st.SearchStrategy[str]:
    return st.integers(min_value=0, max_value=longest).map(lambda n: char * n)


nasty_pieces = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300),
    st.text(alphabet="`ab \n\t.", max_size=60),
    st.sampled_from(["```", "```py", "```python\n", "\n```\n", "``````", "\n", "\n\n", ". ", "\r\n", " ", "~~~"]),
    run("x", 5000),  # a huge line without spaces
    run(" ", 3000),
    run("\n", 50),
    st.builds(lambda info: "\n```" + info, run("i", 4000)),  # a fence with a long info string
    st.builds(lambda info, n: f"```{info}\n" + "code\n" * n, st.sampled_from(["", "py", "c++", "a" * 40]),
              st.integers(min_value=0, max_value=500)),  # an unclosed block of many lines
)
limits = st.one_of(st.just(DISCORD_LIMIT), st.integers(min_value=MIN_LIMIT, max_value=60),
                   st.integers(min_value=MIN_LIMIT, max_value=DISCORD_LIMIT))


@settings(max_examples=400, deadline=timedelta(seconds=HARD_TIMEOUT))
@given(pieces=st.lists(nasty_pieces, max_size=30), limit=limits)
def test_any_text_splits_into_valid_messages(pieces: list[str], limit: int) -> None:
    text = "".join(pieces)
    assert_valid_split(text, split(text, limit=limit), limit)


@settings(max_examples=200, deadline=timedelta(seconds=HARD_TIMEOUT))
@given(text=st.text(alphabet="`x \n.", max_size=400), limit=st.integers(min_value=MIN_LIMIT, max_value=30))
def test_dense_fences_and_tiny_limits(text: str, limit: int) -> None:
    assert_valid_split(text, split(text, limit=limit), limit)


def test_the_content_check_can_fail() -> None:
    text = "```py\nprint(1)\nprint(2)\n```\nend"
    parts = split(text, limit=20)
    assert added_fences_removed_matches(text, parts)
    assert not added_fences_removed_matches(text, parts[:-1])  # a part lost
    assert not added_fences_removed_matches(text, [parts[1], parts[0], *parts[2:]])  # reordered
    assert not added_fences_removed_matches(text, [p.replace("print(2)", "print(3)") for p in parts])
    assert not added_fences_removed_matches(text, [parts[0] + "\n```", "```py\n" + parts[1], *parts[2:]])  # stray fences


def test_throttle() -> None:
    throttle = EditThrottle(1.0)
    assert throttle.ready(0.0)
    throttle.mark(0.0)
    assert not throttle.ready(0.5) and throttle.wait_time(0.5) == 0.5
    assert throttle.ready(1.0)


def test_queue_notice() -> None:
    assert queue_notice(1) == "*(queued: 1 request ahead of you)*"
    assert "3 requests" in queue_notice(3)
