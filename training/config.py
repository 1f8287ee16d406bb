"""The training recipe: one YAML file describes a run completely; this module reads it,
validates it and fills documented defaults (the Hermes / QLoRA-paper values)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

import yaml


class ConfigError(ValueError):
    """The config names a bad value; the message says which key and what it expects."""


@dataclass
class DatasetSpec:
    path: str  # a .json/.jsonl file of Alpaca records, or a Hugging Face dataset id
    weight: float = 1.0  # relative share in the mix (1.0 = every example once)
    split: str = "train"


@dataclass
class QuantConfig:
    load_in_4bit: bool = True
    quant_type: str = "nf4"  # QLoRA's NormalFloat4
    double_quant: bool = True  # quantize the quantization constants too (~0.4 bit/param saved)
    compute_dtype: str = "bfloat16"
    quant_storage: str = "bfloat16"  # = model dtype, so FSDP can shard the 4-bit weights


@dataclass
class LoraSpec:
    r: int = 64  # QLoRA paper: r=64 on all linear layers
    alpha: int = 16
    dropout: float = 0.05  # 0.05 up to 13B, 0.1 for 33B/65B in the paper
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class TrainSpec:
    output_dir: str = "runs/hermes"
    seq_len: int = 4096
    packing: bool = False  # several examples per row, attention kept within each example
    overlength: str = "truncate"  # or "drop": what to do with examples longer than seq_len
    learning_rate: float = 1e-4  # QLoRA paper for 33B/65B (2e-4 for 7B/13B)
    lr_scheduler: str = "constant_with_warmup"
    warmup_ratio: float = 0.03
    optimizer: str = "paged_adamw_32bit"  # paged: survives memory spikes of long sequences
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 16
    epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides epochs
    gradient_checkpointing: bool = True
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int = 3
    seed: int = 42
    bf16: bool = True


@dataclass
class ExportSpec:
    outtype: str = "f16"  # f16 or bf16: the unquantized GGUF
    quantizations: list[str] = field(default_factory=lambda: ["Q4_K_M"])
    merge_into: str = "nf4"  # "nf4": the dequantized NF4 base the adapter trained against; or "bf16"
    probe_prompts: list[str] = field(default_factory=lambda: ["Write a haiku about the sea."])
    check: bool = True  # compare each GGUF with transformers (needs the merged model in memory)


@dataclass
class TrainConfig:
    base_model: str  # a local folder in Hugging Face format, or a hub id
    datasets: list[DatasetSpec]
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    export: ExportSpec = field(default_factory=ExportSpec)
    hub_repo: str | None = None  # optional: upload the adapter / GGUF here

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir)


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; expected some of {sorted(known)}")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if is_dataclass(hint):
            values[name] = _build(hint, value, f"{where}.{name}")
        elif name == "datasets":
            if not isinstance(value, list) or not value:
                raise ConfigError(f"{where}.datasets: expected a non-empty list")
            values[name] = [
                _build(DatasetSpec, {"path": v} if isinstance(v, str) else v, f"{where}.datasets[{i}]")
                for i, v in enumerate(value)
            ]
        else:
            values[name] = value
    try:
        return cls(**values)
    except TypeError as error:
        raise ConfigError(f"{where}: {error}") from None


def _check(config: TrainConfig) -> None:
    t, q, e = config.train, config.quant, config.export
    if t.seq_len < 64:
        raise ConfigError(f"train.seq_len={t.seq_len}: expected at least 64")
    if t.overlength not in {"truncate", "drop"}:
        raise ConfigError(f"train.overlength={t.overlength!r}: expected 'truncate' or 'drop'")
    if q.quant_type not in {"nf4", "fp4"}:
        raise ConfigError(f"quant.quant_type={q.quant_type!r}: expected 'nf4' or 'fp4'")
    for key in ("compute_dtype", "quant_storage"):
        if getattr(q, key) not in {"bfloat16", "float16", "float32"}:
            raise ConfigError(f"quant.{key}={getattr(q, key)!r}: expected bfloat16, float16 or float32")
    if e.outtype not in {"f16", "bf16"}:
        raise ConfigError(f"export.outtype={e.outtype!r}: expected 'f16' or 'bf16'")
    if e.merge_into not in {"nf4", "bf16"}:
        raise ConfigError(f"export.merge_into={e.merge_into!r}: expected 'nf4' or 'bf16'")
    if any(d.weight <= 0 for d in config.datasets):
        raise ConfigError("datasets: every weight must be > 0")


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    config = _build(TrainConfig, raw, "config")
    _check(config)
    return config


def load_config(path: str | Path) -> TrainConfig:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read {path}: {error}") from error
    return config_from_dict(raw or {})
