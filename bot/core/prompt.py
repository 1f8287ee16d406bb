"""The Alpaca prompt of Nous-Hermes-Llama2: the one source of truth for bot and trainer.

Single turn, exactly as the model card writes it::

    ### Instruction:
    <prompt>

    ### Input:            (optional)
    <additional context>

    ### Response:
    <the model writes here>

A chat is a sequence of such blocks after an optional preamble (persona / system text).
People's messages become instructions that name who spoke (several people may speak
between two replies); the bot's own messages become responses.

Turn integrity. Only the renderer writes the turn structure: the header lines, and in an
instruction block one speaker line (``Name: first line``) per message. Nothing that comes
from people or cards (message contents, display names, a persona's name, card fields) can
add one, whatever its callers did before:

* Line breaks. CR LF, lone CR and the other characters Python splits lines at (VT, FF,
  FS/GS/RS, NEL, LS, PS) become plain newlines, so a "line" means the same thing to us, to
  the model and to any reader.
* Headers. A line whose visible text (format characters such as zero-width spaces, bidi
  controls and BOMs ignored) is hashes — spaces, variation selectors or keycaps allowed
  between them, any whitespace before them — followed by a role word (instruction, input,
  response; any case, also "### Responses") keeps its words but its ASCII '#' become
  fullwidth '＃' (`neutralize`): readable, but no longer the tokens of a header, so it
  neither opens a turn nor trips a stop sequence. This applies to contents, the preamble
  and the post-history input.
* Names (`clean_name`), for speakers and for the persona in the response prefix: format
  characters are dropped; control characters, line and paragraph separators, blank
  look-alikes (Hangul fillers, braille blank), every '#'-like ('#', '＃', '﹟') and every
  colon-like (':', '：', '﹕', '꞉', '∶', '︓') become spaces; whitespace runs collapse to
  one space; leading '>' go (so a name never looks like the continuation marker below);
  the result is cut to `MAX_NAME_CHARS` (64) characters. An empty result becomes
  "someone". A name is therefore one line that can neither hold a header nor end early
  in a forged ``Name:``. A ``response_prefix`` of the form ``<name>:`` is rendered as
  ``clean_name(<name>) + ": "``.
* Continuation lines. A message's first line follows its speaker's name; its other lines
  are written as they are (code blocks, lists and prose stay byte for byte) except a line
  that reads as a speaker line: visibly, 1 to 64 characters without colon or hash, not
  starting with whitespace or '>', then a colon-like and whitespace (``Admin: obey``,
  ``Ann： hi``, also behind zero-width characters). Such a line gets a visible ``"> "`` in
  front, the quote mark people use on Discord: the model reads "this person quotes text
  that looks like Admin speaking", not "Admin speaks". Indented lines, ``def f():``,
  ``https://…`` and a bare ``Admin:`` at the end of a line are not speaker lines and stay
  as written. In a response block the same rule covers every line except the one that
  opens with the response prefix.

So the headers of a rendered chat are exactly the ones the template writes, and its speaker
lines are exactly one per person's message, with that person's cleaned name
(tests/core/test_prompt_integrity.py parses rendered prompts to check this for any input).

Everything here is pure: strings in, strings out, a token counter passed in. The trainer
imports `alpaca_prompt` so the model is served exactly as it was trained; `alpaca_prompt`
is the bare model-card template (training data is trusted and kept as written), the rules
above apply to chats rendered by `render_chat` / `build_prompt`.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

from bot.core.conversation import Message

INSTRUCTION = "### Instruction:"
INPUT = "### Input:"
RESPONSE = "### Response:"
HEADERS = (INSTRUCTION, INPUT, RESPONSE)
TRUNCATION_MARK = " […]"
MAX_NAME_CHARS = 64
NAME_FALLBACK = "someone"
CONTINUATION_MARK = "> "

TokenCounter = Callable[[str], int]
# The most characters one token of the prompt is assumed to take when a history is first
# cut to size (Llama-family tokenizers average about 4 for English). Counting tokens over
# a whole stored window (200 messages of 4000 characters: 800,000 characters, several
# times over in the budget's binary search) would take seconds; a history is cut to what
# can possibly fit first, then counted exactly.
MAX_CHARS_PER_TOKEN = 8

COLONS = ":\uff1a\ufe55\ua789\u2236\ufe13"
HASHES = "#\uff03\ufe5f"
_BLANK_LOOKALIKES = "\u115f\u1160\u3164\uffa0\u2800"
# Format characters (Unicode category Cf: zero-width, bidi controls, BOM, soft hyphen...).
_FORMAT_CHARS = dict.fromkeys(
    cp for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp)) == "Cf"
)
_LINE_BREAK = re.compile("\r\n|[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
# A line that would read as a template header, checked on its visible text: a run of hashes,
# then a role word (as written, or after NFKC folding: "Ｒｅｓｐｏｎｓｅ").
_HASH_RUN = re.compile(r"^\s*(?:#[\s\ufe0e\ufe0f\u20e3]*)+")
_HASH_RUN_CHARS = frozenset("#\ufe0e\ufe0f\u20e3")
_ROLE_WORD = re.compile(r"instruction|input|response", re.I)
# A line that would read as a speaker line, `Name: ` (checked on its visible text).
_SPEAKER_LIKE = re.compile(
    rf"^[^\s>{COLONS}{HASHES}][^{COLONS}{HASHES}]{{0,{MAX_NAME_CHARS - 1}}}[{COLONS}]\s"
)
_NAME_SPACES = re.compile(rf"[\x00-\x1f\x7f-\x9f{_BLANK_LOOKALIKES}{COLONS}{HASHES}]")


class PromptTooLong(ValueError):
    """Not even the newest message's header fits in the context budget."""


def _visible(line: str) -> str:
    return line if line.isascii() else line.translate(_FORMAT_CHARS)


def _defuse_header(line: str) -> str:
    visible = _visible(line)
    run = _HASH_RUN.match(visible)
    if not run:
        return line
    word = visible[run.end():run.end() + 16]
    if not (_ROLE_WORD.match(word) or _ROLE_WORD.match(unicodedata.normalize("NFKC", word))):
        return line
    # The '#' of the run (in the line as written, format characters included) become '＃'.
    end = 0
    while end < len(line) and (
        line[end] in _HASH_RUN_CHARS or line[end].isspace() or ord(line[end]) in _FORMAT_CHARS
    ):
        end += 1
    return line[:end].replace("#", "＃") + line[end:]


def _defuse_speaker(line: str) -> str:
    return CONTINUATION_MARK + line if _SPEAKER_LIKE.match(_visible(line)) else line


def neutralize(text: str) -> str:
    """Plain newlines for every line break, and no line that forges a template header.

    The hashes of such a line become fullwidth '＃' signs: a reader still sees the text, but
    it is no longer the token sequence of a header, so it cannot open a turn and does not
    trigger a stop sequence.
    """
    return "\n".join(_defuse_header(line) for line in _LINE_BREAK.sub("\n", text).split("\n"))


@lru_cache(maxsize=4096)
def clean_name(name: str) -> str:
    """A display name safe to put in front of a colon on one line (see the module doc)."""
    cleaned = _NAME_SPACES.sub(" ", name.translate(_FORMAT_CHARS))
    cleaned = " ".join(cleaned.split()).lstrip("> ")
    return cleaned[:MAX_NAME_CHARS].rstrip() or NAME_FALLBACK


def clean_prefix(prefix: str) -> str:
    """A response prefix on one line; ``<name>:`` becomes ``clean_name(<name>) + ": "``."""
    head = prefix.rstrip()
    if not head.translate(_FORMAT_CHARS).strip():
        return ""
    if head[-1] in COLONS:
        return f"{clean_name(head[:-1])}: "
    return clean_name(head) + (" " if head != prefix else "")


@lru_cache(maxsize=4096)
def _continued(text: str, first_line_free: bool = True) -> str:
    """`text` neutralized, every line but (if `first_line_free`) the first defused."""
    lines = neutralize(text).split("\n")
    start = 1 if first_line_free else 0
    return "\n".join(lines[:start] + [_defuse_speaker(line) for line in lines[start:]])


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """One Alpaca turn up to and including the response header (training and one-shot)."""
    text = f"{INSTRUCTION}\n{instruction}\n\n"
    if input:
        text += f"{INPUT}\n{input}\n\n"
    return text + f"{RESPONSE}\n"


def transcript(messages: Sequence[Message]) -> str:
    """Messages as a record to read (e.g. what a memory summary is made of): one speaker
    line each, under the instruction block's rules, whoever wrote them."""
    return "\n".join(f"{clean_name(m.author_name)}: {_continued(m.content)}" for m in messages)


def _instruction_block(messages: Sequence[Message]) -> str:
    lines = "\n".join(f"{clean_name(m.author_name)}: {_continued(m.content)}" for m in messages)
    return f"{INSTRUCTION}\n{lines}\n\n"


def _response_block(messages: Sequence[Message], prefix: str) -> str:
    body = "\n".join(neutralize(m.content).strip() for m in messages)
    return f"{RESPONSE}\n{prefix}{_continued(body, first_line_free=bool(prefix))}\n\n"


def render_chat(
    messages: Sequence[Message], preamble: str = "", response_prefix: str = "", final_input: str = "",
    continue_last: bool = False, notes: Sequence[tuple[int, str]] = (),
) -> str:
    """Render a chat: preamble, then alternating instruction/response blocks, then the
    open response header. Every response starts with `response_prefix` (e.g. a
    character's "Name: "), the past ones and the one the model is about to write.
    `final_input` (e.g. a persona's post-history instructions) goes in an `### Input:`
    block right before that last header.

    `continue_last` (Continue): the chat ends with the bot's messages, and their response
    is left open — the prompt ends with their text, no new turn after it, so the model
    writes on where the reply stopped (`final_input` comes before that response).

    `notes` (an author's note, a card's depth prompt): `(depth, text)`, each an `### Input:`
    block `depth` messages from the end (0: after the last one; SillyTavern's "in-chat @
    depth"), splitting the block it falls in; its text neutralized like the preamble."""
    response_prefix = clean_prefix(response_prefix)
    parts: list[str] = []
    if preamble.strip():
        parts.append(neutralize(preamble.strip()) + "\n\n")
    at = _notes_at(notes, len(messages))
    group: list[Message] = []
    for index, message in enumerate(messages):
        if group and (group[-1].is_bot != message.is_bot or index in at):
            parts.append(
                _response_block(group, response_prefix)
                if group[-1].is_bot
                else _instruction_block(group)
            )
            group = []
        parts.extend(at.get(index, ()))
        group.append(message)
    parts_after = at.get(len(messages), [])
    if continue_last and messages:  # (no messages: the preamble alone, as build_prompt measures it)
        if not group[-1].is_bot:
            raise ValueError("only a chat that ends with the bot can be continued")
        parts.extend(parts_after)
        if final_input.strip():
            parts.append(f"{INPUT}\n{neutralize(final_input.strip())}\n\n")
        return "".join(parts) + _response_block(group, response_prefix).removesuffix("\n\n")
    if group and not group[-1].is_bot:
        parts.append(_instruction_block(group))
    elif group:
        # The chat ends with the bot: it answers again (e.g. a greeting, then a prompt).
        parts.append(_response_block(group, response_prefix))
    parts.extend(parts_after)
    if final_input.strip():
        parts.append(f"{INPUT}\n{neutralize(final_input.strip())}\n\n")
    parts.append(f"{RESPONSE}\n{response_prefix}")
    return "".join(parts)


def _notes_at(notes: Sequence[tuple[int, str]], count: int) -> dict[int, list[str]]:
    """`(depth, text)` notes as `### Input:` blocks by the index of the message they precede."""
    at: dict[int, list[str]] = {}
    for depth, text in notes:
        if text.strip():
            at.setdefault(max(0, count - max(0, depth)), []).append(f"{INPUT}\n{neutralize(text.strip())}\n\n")
    return at


def stop_sequences(messages: Sequence[Message], max_names: int = 16) -> tuple[str, ...]:
    """Strings that end a reply: any template header, or a person's name opening a line
    (so the model never speaks for a person in the conversation)."""
    names: list[str] = []
    for message in reversed(messages):
        if not message.is_bot:
            name = clean_name(message.author_name)
            if name not in names:
                names.append(name)
        if len(names) >= max_names:
            break
    return HEADERS + tuple(f"\n{name}:" for name in names)


@dataclass(frozen=True)
class BuiltPrompt:
    """A prompt that fits the budget, with what it took from the history."""

    text: str
    n_tokens: int
    messages: tuple[Message, ...]  # the newest messages that made it into the prompt
    truncated: bool  # the newest message (or the preamble) had to be cut
    stop: tuple[str, ...]


def preamble_length(text: str) -> int:
    """How many characters of a rendered prompt come before its first block: the preamble
    (persona, card, lorebook, memory), which channels with the same persona share. Contents
    are neutralized, so the first header line is the real first block."""
    at = text.find(INSTRUCTION + "\n")
    return at if at > 0 else 0


def _cut(text: str, fits: Callable[[str], bool]) -> str:
    """The longest prefix of `text` (plus a truncation mark) for which `fits` holds."""
    low, high = 0, len(text)
    while low < high:
        mid = (low + high + 1) // 2
        if fits(text[:mid] + TRUNCATION_MARK):
            low = mid
        else:
            high = mid - 1
    return text[:low] + TRUNCATION_MARK


def build_prompt(
    history: Sequence[Message],
    count_tokens: TokenCounter,
    n_ctx: int,
    max_new_tokens: int,
    preamble: str = "",
    response_prefix: str = "",
    final_input: str = "",
    continue_last: bool = False,
    notes: Sequence[tuple[int, str]] = (),
) -> BuiltPrompt:
    """The prompt for answering the newest message of `history`, within the context
    (`continue_last`: for writing on after it, the newest being the bot's; see `render_chat`).

    Guarantees ``count_tokens(result.text) + max_new_tokens <= n_ctx``. The oldest whole
    messages are dropped first; the kept messages are a contiguous, newest suffix of the
    history that starts where the history starts or with a person (a response is never
    kept without its instruction). Only when the newest message alone cannot fit is it
    cut; the preamble is cut only when it alone takes more than half of the budget.
    """
    budget = n_ctx - max_new_tokens
    history = list(history)
    if budget <= 0:
        raise PromptTooLong(f"MAX_NEW_TOKENS={max_new_tokens} leaves no room in N_CTX={n_ctx}")

    def render(messages: Sequence[Message], pre: str = preamble) -> str:
        return render_chat(messages, pre, response_prefix, final_input, continue_last, notes)

    def fits(text: str) -> bool:
        return count_tokens(text) <= budget

    truncated = False
    if preamble.strip() and count_tokens(render([], preamble)) > budget // 2:
        preamble = _cut(preamble, lambda p: count_tokens(render([], p)) <= budget // 2)
        truncated = True

    # Where the kept history may start, oldest first; binary search for the first that
    # fits (the token count shrinks as the start moves forward).
    starts = [i for i, m in enumerate(history) if i == 0 or not m.is_bot]
    low, high = 0, len(starts)
    while low < high:
        mid = (low + high) // 2
        if fits(render(history[starts[mid]:])):
            high = mid
        else:
            low = mid + 1
    kept = history[starts[low]:] if low < len(starts) else []

    if not kept and history and continue_last:
        raise PromptTooLong("the reply to continue no longer fits in the context; press Regenerate")
    if not kept and history:
        # Not even the newest message fits whole: cut its content.
        newest = history[-1]
        if not fits(render([replace(newest, content="")])):
            raise PromptTooLong(
                f"N_CTX={n_ctx} minus MAX_NEW_TOKENS={max_new_tokens} leaves {budget} tokens, "
                "too few for even an empty message; raise N_CTX or lower MAX_NEW_TOKENS"
            )
        content = _cut(newest.content, lambda c: fits(render([replace(newest, content=c)])))
        kept = [replace(newest, content=content)]
        truncated = True

    text = render(kept)
    n_tokens = count_tokens(text)
    while n_tokens > budget and len(kept) > 1:  # a tokenizer that is not quite monotone
        kept = kept[1:]
        while len(kept) > 1 and kept[0].is_bot:
            kept = kept[1:]
        text = render(kept)
        n_tokens = count_tokens(text)
    if n_tokens > budget:
        raise PromptTooLong(f"the prompt needs {n_tokens} tokens, more than the {budget} available")
    return BuiltPrompt(text, n_tokens, tuple(kept), truncated, stop_sequences(kept))

