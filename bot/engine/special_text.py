"""Special-token text typed by a person, made harmless for a server that tokenizes the prompt
itself: every sequence shaped like an added control token of the vocabularies people serve
is broken by a zero-width space, which no tokenizer's added-token matcher joins back.

Covered: Llama-2 and SentencePiece (`<s>`, `</s>`, `<unk>`, `<pad>`, `<mask>`, `<bos>`,
`<eos>`), ChatML and Llama-3 (`<|im_start|>`, `<|begin_of_text|>`, ...), DeepSeek's
full-width bars (`<｜User｜>`), Gemma (`<start_of_turn>`, `<end_of_turn>`, `<start_of_image>`),
Mistral and GLM brackets (`[INST]`, `[/INST]`, `[TOOL_CALLS]`, `[gMASK]`), Llama-2 chat's
`<<SYS>>`. Ordinary text (`a < b`, `<br>`, `Vec<String>`, `<3`, `[1, 2]`) is left alone.
"""

from __future__ import annotations

import re

ZERO_WIDTH_SPACE = "\u200b"
_SPECIAL_LOOKING = re.compile(
    r"<(?=[|｜])"  # <|...|>, <｜...｜>
    r"|<(?=/?(?:s|unk|pad|mask|bos|eos|sep|cls|eot|eom)>)"  # SentencePiece-style names
    r"|<(?=(?:start|end)_of_[a-z_]+>)"  # Gemma
    r"|<(?=<SYS>>|/SYS>>)"  # Llama-2 chat
    r"|\[(?=/?(?:[A-Z][A-Z_]{1,30}|[a-z][A-Z][A-Za-z]{1,20})\])"  # [INST], [TOOL_CALLS], [gMASK]
)


def defang(text: str) -> str:
    """`text` with every special-token-looking sequence broken by a zero-width space."""
    return _SPECIAL_LOOKING.sub(lambda m: m.group(0) + ZERO_WIDTH_SPACE, text)
