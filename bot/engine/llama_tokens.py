"""Text to tokens and back through llama.cpp's C API (`llama_cpp`'s ctypes bindings), for
the engines and tools that hold a raw vocabulary pointer: the batched engine's context,
the tokenizer-only vocabulary and the trainer's GGUF scorer. Special tokens are never
parsed from text, so what a person types (`<eos>`) stays text."""

from __future__ import annotations

import ctypes
from typing import Any


def tokenize(lib: Any, vocab: Any, text: str, add_bos: bool) -> list[int]:
    """The tokens of `text` (with the vocabulary's BOS first when `add_bos` and it has one)."""
    data = text.encode("utf-8")
    size = len(data) + 8
    buffer = (lib.llama_token * size)()
    n = lib.llama_tokenize(vocab, data, len(data), buffer, size, add_bos, False)
    if n < 0:  # more tokens than bytes + 8 (never for real vocabularies, but the API allows it)
        size = -n
        buffer = (lib.llama_token * size)()
        n = lib.llama_tokenize(vocab, data, len(data), buffer, size, add_bos, False)
    return list(buffer[:n])


def piece(lib: Any, vocab: Any, token: int) -> bytes:
    """The bytes one token stands for (a piece of UTF-8, possibly incomplete on its own)."""
    buffer = ctypes.create_string_buffer(64)
    n = lib.llama_token_to_piece(vocab, token, buffer, 64, 0, False)
    if n < 0:
        buffer = ctypes.create_string_buffer(-n)
        n = lib.llama_token_to_piece(vocab, token, buffer, -n, 0, False)
    return buffer.raw[:n]
