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

Everything here is pure: strings in, strings out, a token counter passed in. The trainer
imports `alpaca_prompt` so the model is served exactly as it was trained.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from bot.conversation import Message

INSTRUCTION = "### Instruction:"
INPUT = "### Input:"
RESPONSE = "### Response:"
HEADERS = (INSTRUCTION, INPUT, RESPONSE)
TRUNCATION_MARK = " […]"
MAX_NAME_CHARS = 64

TokenCounter = Callable[[str], int]

# A line that would read as a template header: a run of '#' followed by a role word.
_HEADER_LINE = re.compile(r"^([ \t]*)(#+)(?=[ \t]*(?:instruction|input|response)\b)", re.I | re.M)
_NAME_JUNK = re.compile(r"[\s:#]+")


class PromptTooLong(ValueError):
    """Not even the newest message's header fits in the context budget."""


def neutralize(text: str) -> str:
    """Defuse lines that would forge a template header.

    The hashes of such a line become fullwidth '＃' signs: a reader still sees the text, but
    it is no longer the token sequence of a header, so it cannot open a turn and does not
    trigger a stop sequence.
    """
    return _HEADER_LINE.sub(lambda m: m.group(1) + "＃" * len(m.group(2)), text)


def clean_name(name: str) -> str:
    """A display name safe to put in front of a colon on one line."""
    cleaned = _NAME_JUNK.sub(" ", name).strip()[:MAX_NAME_CHARS].strip()
    return cleaned or "someone"


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """One Alpaca turn up to and including the response header (training and one-shot)."""
    text = f"{INSTRUCTION}\n{instruction}\n\n"
    if input:
        text += f"{INPUT}\n{input}\n\n"
    return text + f"{RESPONSE}\n"


def _instruction_block(messages: Sequence[Message]) -> str:
    lines = "\n".join(f"{clean_name(m.author_name)}: {neutralize(m.content)}" for m in messages)
    return f"{INSTRUCTION}\n{lines}\n\n"


def _response_block(messages: Sequence[Message], prefix: str) -> str:
    body = "\n".join(neutralize(m.content).strip() for m in messages)
    return f"{RESPONSE}\n{prefix}{body}\n\n"


def render_chat(
    messages: Sequence[Message], preamble: str = "", response_prefix: str = "", final_input: str = ""
) -> str:
    """Render a chat: preamble, then alternating instruction/response blocks, then the
    open response header. Every response starts with `response_prefix` (e.g. a
    character's "Name: "), the past ones and the one the model is about to write.
    `final_input` (e.g. a persona's post-history instructions) goes in an `### Input:`
    block right before that last header."""
    parts: list[str] = []
    if preamble.strip():
        parts.append(neutralize(preamble.strip()) + "\n\n")
    group: list[Message] = []
    for message in messages:
        if group and group[-1].is_bot != message.is_bot:
            parts.append(
                _response_block(group, response_prefix)
                if group[-1].is_bot
                else _instruction_block(group)
            )
            group = []
        group.append(message)
    if group and not group[-1].is_bot:
        parts.append(_instruction_block(group))
    elif group:
        # The chat ends with the bot: it answers again (e.g. a greeting, then a prompt).
        parts.append(_response_block(group, response_prefix))
    if final_input.strip():
        parts.append(f"{INPUT}\n{neutralize(final_input.strip())}\n\n")
    parts.append(f"{RESPONSE}\n{response_prefix}")
    return "".join(parts)


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
) -> BuiltPrompt:
    """The prompt for answering the newest message of `history`, within the context.

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
        return render_chat(messages, pre, response_prefix, final_input)

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

