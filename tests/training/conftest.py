"""A tiny Llama and a tiny SentencePiece tokenizer, built in the test session, so every
training stage runs for real on the CPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch", reason="the training extra is not installed (pip install -e '.[train]')")

from bot.core.prompt import alpaca_prompt  # noqa: E402

pytestmark = pytest.mark.training

FACTS = [
    ("What colour is the sky?", "", "The sky is blue."),
    ("Add the numbers.", "2 and 3", "2 plus 3 is 5."),
    ("Name a fruit.", "", "An apple is a fruit."),
    ("Translate to French.", "hello", "Bonjour."),
    ("What do cows drink?", "", "Cows drink water."),
    ("Say something kind.", "", "You are doing great."),
    ("Give the opposite.", "hot", "The opposite of hot is cold."),
    ("Count to three.", "", "One, two, three."),
]


def alpaca_records() -> list[dict[str, str]]:
    return [{"instruction": i, "input": x, "output": o} for i, x, o in FACTS]


def _corpus() -> str:
    lines = []
    for i, x, o in FACTS * 4:
        lines.append(alpaca_prompt(i, x or None) + o)
    lines += [f"Alice: message number {n}, Bob! The quick brown fox jumps over the lazy dog." for n in range(200)]
    lines += ["def main():\n    print('hello world')  # code", "Write a haiku about the sea, the stars and the ships."]
    return "\n".join(lines)


def build_tiny_base(root: Path) -> Path:
    """A randomly initialised Llama (hidden 256: K-quants apply) with a Llama-like
    SentencePiece tokenizer (byte fallback, identity normalization), written under `root`."""
    import sentencepiece as spm
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok_dir = root / "tokenizer"
    tok_dir.mkdir()
    (root / "corpus.txt").write_text(_corpus())
    spm.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"), model_prefix=str(tok_dir / "tokenizer"), vocab_size=320,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2,
    )
    (tok_dir / "tokenizer.vocab").unlink()
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": False,
    }))
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, rope_theta=10000.0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    base = root / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    shutil.copy(tok_dir / "tokenizer.model", base / "tokenizer.model")
    return base


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(alpaca_records()))
    return path


def tiny_config(base: Path, data: Path, out: Path, **train: Any) -> Any:
    from training.config import config_from_dict

    return config_from_dict({
        "base_model": str(base),
        "datasets": [{"path": str(data)}],
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"output_dir": str(out), "seq_len": 128, "learning_rate": 3e-3, "micro_batch_size": 4,
                  "gradient_accumulation_steps": 1, "max_steps": 30, "logging_steps": 5, "save_steps": 10,
                  "optimizer": "adamw_torch", "lr_scheduler": "constant", "warmup_ratio": 0.0,
                  "gradient_checkpointing": False, **train},
        "export": {"quantizations": ["Q8_0", "Q4_K_M"]},
    })


@pytest.fixture(scope="session")
def trained(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A QLoRA run on the tiny model with the card's bitsandbytes settings (trained once)."""
    from training.train import train

    root = tmp_path_factory.mktemp("run")
    data = root / "alpaca.json"
    data.write_text(json.dumps(alpaca_records()))
    config = tiny_config(tiny_base, data, root / "out")
    train(config, resume=False)
    return config
