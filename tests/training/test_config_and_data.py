"""The recipe file, and the data pipeline: template, masking, over-length, packing, cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bot.core.prompt import alpaca_prompt
from tests.training.conftest import alpaca_records, tiny_config
from training.config import ConfigError, config_from_dict, load_config
from training.data import IGNORE, DataStats, load_records, mix, pack, prepare_dataset, tokenize_example
from training.model import load_tokenizer

REPO = Path(__file__).resolve().parents[2]


def test_shipped_hermes_config() -> None:
    config = load_config(REPO / "training/configs/hermes-llama2-70b.yaml")
    assert (config.quant.quant_type, config.quant.double_quant, config.quant.compute_dtype) == ("nf4", True, "bfloat16")
    assert config.quant.quant_storage == "bfloat16" and config.train.seq_len == 4096
    assert set(config.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"base_model": "x", "datasets": []}, "non-empty list"),
        ({"base_model": "x", "datasets": ["a.json"], "train": {"sequence": 5}}, "unknown key"),
        ({"base_model": "x", "datasets": ["a.json"], "quant": {"quant_type": "int3"}}, "expected 'nf4' or 'fp4'"),
        ({"datasets": ["a.json"]}, "base_model"),
    ],
)
def test_bad_configs(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_yaml_float_written_without_a_dot_is_a_float(tmp_path: Path) -> None:
    """PyYAML (YAML 1.1) reads `2e-4` as the string '2e-4': the recipe converts such plain
    decimal strings of float keys explicitly (documented in training/config.py)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base_model: x\ndatasets: [a.json]\ntrain:\n  learning_rate: 2e-4\n  epochs: 3\nlora:\n  dropout: 1e-1\n")
    import yaml

    assert yaml.safe_load(recipe.read_text())["train"]["learning_rate"] == "2e-4"  # the trap
    config = load_config(recipe)
    assert config.train.learning_rate == 2e-4 and isinstance(config.train.learning_rate, float)
    assert config.train.epochs == 3.0 and config.lora.dropout == 0.1


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("lora", {"r": "abc"}, r"lora\.r: expected an integer, got 'abc'"),
        ("lora", {"r": "64"}, r"lora\.r: expected an integer, got '64'"),  # no silent str → int
        ("lora", {"r": 8.5}, r"lora\.r: expected an integer"),
        ("train", {"learning_rate": "abc"}, r"train\.learning_rate: expected a number, got 'abc'"),
        ("train", {"learning_rate": "nan"}, r"train\.learning_rate: expected a number"),
        ("train", {"learning_rate": 1e999}, r"train\.learning_rate: .*finite"),
        ("train", {"learning_rate": True}, r"train\.learning_rate: expected a number"),
        ("train", {"bf16": "yes"}, r"train\.bf16: expected true or false"),
        ("train", {"max_steps": "1e3"}, r"train\.max_steps: expected an integer"),
        ("train", {"lerning_rate": 1e-4}, r"train\.lerning_rate: unknown key \(did you mean learning_rate\?\)"),
        ("export", {"quantizations": "Q4_K_M"}, r"export\.quantizations: expected a list"),
        ("quant", {"double_quant": 1}, r"quant\.double_quant: expected true or false"),
    ],
)
def test_wrong_types_refused_at_load_naming_the_key(tmp_path: Path, section: str, values: dict, message: str) -> None:
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base_model": "x", "datasets": ["a.json"], section: values}))
    with pytest.raises(ConfigError, match=message):
        load_config(recipe)


def test_every_error_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as error:
        config_from_dict({"base_model": 3, "datasets": [{"path": "a", "weight": "x"}], "lora": {"r": "abc"}, "qant": {}})
    text = str(error.value)
    for part in ("base_model: expected a string", "datasets[0].weight: expected a number", "lora.r:",
                 "qant: unknown key (did you mean quant?)"):
        assert part in text


def test_records_json_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in alpaca_records()))
    from training.config import DatasetSpec

    assert len(load_records(DatasetSpec(str(tmp_path / "a.jsonl")))) == 8
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(ValueError, match="record 0 needs text 'instruction' and 'output'"):
        load_records(DatasetSpec(str(tmp_path / "bad.json")))
    mixed = mix([(alpaca_records(), 2.0), (alpaca_records()[:4], 0.5)], seed=1)
    assert len(mixed) == 16 + 2


def test_prompt_is_masked_and_response_trained(tiny_base: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_base))
    record = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 plus 3 is 5."}
    example = tokenize_example(tokenizer, record, 512, "truncate", DataStats())
    assert example is not None
    ids, labels = example["input_ids"], example["labels"]
    prompt = alpaca_prompt("Add the numbers.", "2 and 3")
    # Tokenized as the model sees it when serving: the whole text at once, then EOS.
    assert ids == tokenizer(prompt + record["output"]).input_ids + [tokenizer.eos_token_id]
    trained = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE]
    assert tokenizer.decode(trained[:-1]) == "2 plus 3 is 5." and trained[-1] == tokenizer.eos_token_id
    masked = [t for t, label in zip(ids, labels, strict=True) if label == IGNORE]
    assert tokenizer.decode(masked, skip_special_tokens=True) == prompt


def test_overlength_cut_or_dropped_and_counted(tiny_base: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_base))
    long = {"instruction": "Say it.", "input": "", "output": "blah " * 200}
    huge_prompt = {"instruction": "word " * 200, "input": "", "output": "ok"}
    stats = DataStats()
    cut = tokenize_example(tokenizer, long, 64, "truncate", stats)
    assert cut is not None and len(cut["input_ids"]) == 64 and stats.truncated == 1
    assert tokenize_example(tokenizer, huge_prompt, 64, "truncate", stats) is None  # nothing left to learn
    assert tokenize_example(tokenizer, long, 64, "drop", stats) is None
    assert (stats.examples, stats.dropped) == (3, 2)


def test_packing_keeps_examples_apart(tiny_base: Path, data_file: Path, tmp_path: Path) -> None:
    """Through the QLoRA model as training loads it and the packed collator: every example
    in a packed row gets the logits it gets alone (attention does not leak across)."""
    import torch

    from training.model import load_qlora_model
    from training.train import packed_collator

    tokenizer = load_tokenizer(str(tiny_base))
    examples = [tokenize_example(tokenizer, r, 512, "truncate", DataStats()) for r in alpaca_records()[:3]]
    rows = pack(examples, 512, tokenizer.pad_token_id)
    assert len(rows) == 1 and len(rows[0]["input_ids"]) == 512
    positions = rows[0]["position_ids"]
    assert positions[0] == 0 and positions.count(0) == 4  # three examples and the pad tail
    model = load_qlora_model(tiny_config(tiny_base, data_file, tmp_path)).eval()
    batch = packed_collator(rows)
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0].float()
        offset = 0
        for example in examples:
            n = len(example["input_ids"])
            alone = model(input_ids=torch.tensor([example["input_ids"]])).logits[0].float()
            assert (packed[offset: offset + n] - alone).abs().max() < 0.02
            offset += n
        # The same row with one causal mask over everything would differ: the check can fail.
        leaky = model(input_ids=batch["input_ids"], attention_mask=torch.ones_like(batch["input_ids"])).logits[0].float()
        second = slice(len(examples[0]["input_ids"]), len(examples[0]["input_ids"]) + len(examples[1]["input_ids"]))
        assert (leaky[second] - packed[second]).abs().max() > 0.05


def test_tokenized_once_and_cached(tiny_base: Path, data_file: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_base, data_file, tmp_path / "out", packing=True)
    tokenizer = load_tokenizer(str(tiny_base))
    first, stats = prepare_dataset(config, tokenizer)
    cached = list((tmp_path / "out" / "data").iterdir())
    second, stats2 = prepare_dataset(config, tokenizer)
    assert list((tmp_path / "out" / "data").iterdir()) == cached
    assert stats == stats2 and stats.examples == 8 and stats.rows == len(first) == len(second)
    data_file.write_text(json.dumps(alpaca_records()[:4]))  # new data: a new cache entry
    _, stats3 = prepare_dataset(config, tokenizer)
    assert stats3.examples == 4
