"""The whole prompt for one reply, from a history already read and cut to what can fit:
the persona's preamble (with its lorebook entries, the people's /me descriptions and the
rolling memory), attached files after their messages, the author's note, the chat.

Pure and blocking (it counts tokens many times): the bot runs it in a worker thread
(`bot.lifecycle.responder`), and the training export (`bot.lifecycle.dataset_export`) runs the same function,
so a dataset record is the prompt the bot sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bot.roleplay.attachments import with_attachments
from bot.core.conversation import Message
from bot.roleplay.memory import with_memory
from bot.roleplay.personas import Persona, preamble_user
from bot.core.prompt import BuiltPrompt, TokenCounter, build_prompt
from bot.roleplay.user_personas import user_persona_lines


def assemble_prompt(
    history: Sequence[Message], persona: Persona, speaker: str, count_tokens: TokenCounter, *,
    n_ctx: int, max_new_tokens: int, described: Mapping[str, str] | None = None, summary: str = "",
    notes: Sequence[tuple[int, str]] = (), continue_last: bool = False,
) -> BuiltPrompt:
    """`speaker`: the display name of the person answered; `described`: author id → /me
    description; `summary`: the conversation's rolling memory; `notes`: the author's note
    insertions (depth, text); `continue_last`: leave the last reply open (Continue)."""
    budget = n_ctx - max_new_tokens
    lore_before: list[str] = []
    lore_after: list[str] = []
    if persona.lorebook is not None:
        lore_before, lore_after = persona.lorebook.activate([m.content for m in history], count_tokens)
    # Who the people present play (/me), after the character's definitions as in
    # SillyTavern's story string; their attached files follow their messages.
    people = user_persona_lines(history, described or {}, persona.name, max_chars=budget)
    lore_after = [*lore_after, "\n".join(people)]
    history = with_attachments(history, count_tokens, budget // 2)
    return build_prompt(
        history,
        count_tokens,
        n_ctx=n_ctx,
        max_new_tokens=max_new_tokens,
        # {{user}} in the preamble never depends on who is answered (prefix reuse in groups).
        preamble=with_memory(persona.preamble(
            preamble_user(speaker, (m.author_name for m in history if not m.is_bot)), lore_before, lore_after
        ), summary),
        response_prefix=persona.response_prefix(),
        final_input=persona.post_history(speaker),
        continue_last=continue_last,
        notes=list(notes),
    )
