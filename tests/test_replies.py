"""Splitting replies for Discord (hypothesis) and the edit throttle."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from bot.replies import EditThrottle, queue_notice, split_message

FENCE = re.compile(r"^[ \t]*```", re.M)


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
    parts = split_message(f"Intro\n```python\n{code}\n```\nOutro")
    assert len(parts) >= 3
    assert parts[0].endswith("```") and parts[1].startswith("```python\n")
    for part in parts:
        assert len(FENCE.findall(part)) % 2 == 0
    joined = "\n".join(parts)
    assert all(f"x_{i} = {i}" in joined for i in range(100))


def test_unclosed_fence_from_the_model_is_closed() -> None:
    (part,) = split_message("```js\nconsole.log(1)")
    assert part == "```js\nconsole.log(1)\n```"


def test_no_spaces_at_all_is_cut_hard() -> None:
    parts = split_message("x" * 4500)
    assert [len(p) for p in parts] == [2000, 2000, 500]


text_pieces = st.lists(
    st.one_of(
        st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=400),
        st.sampled_from(["```", "```py", "\n", "\n\n", ". ", "```\n"]),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(pieces=text_pieces, limit=st.integers(min_value=60, max_value=2000))
def test_any_text_splits_into_valid_messages(pieces: list[str], limit: int) -> None:
    text = "".join(pieces)
    parts = split_message(text, limit=limit)
    for part in parts:
        assert 0 < len(part) <= limit
        assert part.strip()
        assert len(FENCE.findall(part)) % 2 == 0, part
    # Nothing is lost: every non-space character of the text (apart from fence markers we
    # add) appears in order.
    def letters(s: str) -> str:
        return re.sub(r"\s|`", "", s)

    joined = letters("".join(parts))
    assert letters(text) in joined or _subsequence(letters(text), joined)


def _subsequence(needle: str, haystack: str) -> bool:
    it = iter(haystack)
    return all(ch in it for ch in needle)


def test_throttle() -> None:
    throttle = EditThrottle(1.0)
    assert throttle.ready(0.0)
    throttle.mark(0.0)
    assert not throttle.ready(0.5) and throttle.wait_time(0.5) == 0.5
    assert throttle.ready(1.0)


def test_queue_notice() -> None:
    assert queue_notice(1) == "*(queued: 1 request ahead of you)*"
    assert "3 requests" in queue_notice(3)
