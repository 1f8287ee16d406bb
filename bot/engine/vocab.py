"""A GGUF's vocabulary alone (`vocab_only`: the tokenizer, no weights, no context), through
llama.cpp: exact, local token counts for engines whose model runs elsewhere (`remote`,
`openai`). Tokenizes with BOS and without parsing special tokens, so text a person types
(`<eos>`, `<start_of_turn>`) never becomes a control token."""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

from bot.engine import llama_tokens, repack
from bot.engine.base import ModelLoadError


class VocabTokenizer:
    """A GGUF's vocabulary alone (`vocab_only`: no weights, no context), via llama.cpp."""

    def __init__(self, path: Path) -> None:
        import llama_cpp

        if not path.is_file():
            raise ModelLoadError(f"tokenizer file not found: {path}")
        self.lib = llama_cpp
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's own chatter
        llama_cpp.llama_backend_init()
        params = repack.model_params(llama_cpp, False)  # the vocabulary only: no weights to repack
        params.vocab_only = True
        params.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise ModelLoadError(f"llama.cpp could not read the vocabulary of {path.name}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.path = path

    def tokenize(self, text: str) -> list[int]:
        return llama_tokens.tokenize(self.lib, self.vocab, text, add_bos=True)

    def close(self) -> None:
        if self.model:
            self.lib.llama_model_free(self.model)
            self.model = ctypes.c_void_p()
