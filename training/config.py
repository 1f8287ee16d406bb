"""The training recipe: one YAML file describes a run completely; this module reads it,
validates it and fills documented defaults (the Hermes / QLoRA-paper values).

Every key is typed and checked when the file is loaded, before any model is touched: a wrong
type, an unknown key (a typo) or a missing required key raises `ConfigError` naming the key,
e.g. `lora.r: expected an integer, got 'abc' (str)`. Types are strict — no silent conversion
of "64" to 64 or of "yes" to True — with one documented exception:

* A float key (learning_rate, warmup_ratio, weight, …) also takes a string that is a plain
  decimal number, and converts it with `float()`. YAML 1.1, which PyYAML follows, reads
  `2e-4` (no dot) as the *string* "2e-4"; writing `learning_rate: 2e-4` is so common that it
  is accepted as the number it obviously is. Only `[+-]digits[.digits][e[+-]digits]` is
  converted: "abc", "nan", "inf", "1_000" or "0x10" stay strings and are refused.
  Integer keys never take strings (`lora.r: "64"` is refused).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import field, fields
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AllowInfNan,
    BeforeValidator,
    ConfigDict,
    Strict,
    StrictBool,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
)
from pydantic.dataclasses import dataclass


class ConfigError(ValueError):
    """The config names a bad value; the message says which key and what it expects."""


_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def _yaml_float(value: Any) -> Any:
    """'2e-4' (how YAML 1.1 reads 2e-4) → 2e-4; anything else is left for the strict check."""
    if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        return float(value)
    return value


# A float: a YAML number (int or float), or a string holding a plain decimal number (see above).
Float = Annotated[float, Strict(), AllowInfNan(False), BeforeValidator(_yaml_float)]
STRICT_KEYS = ConfigDict(extra="forbid")  # unknown keys (typos) are errors


@dataclass(config=STRICT_KEYS)
class DatasetSpec:
    path: StrictStr  # a .json/.jsonl file of Alpaca records, or a Hugging Face dataset id
    weight: Float = 1.0  # relative share in the mix (1.0 = every example once)
    split: StrictStr = "train"


@dataclass(config=STRICT_KEYS)
class QuantConfig:
    load_in_4bit: StrictBool = True
    quant_type: StrictStr = "nf4"  # QLoRA's NormalFloat4
    double_quant: StrictBool = True  # quantize the quantization constants too (~0.4 bit/param saved)
    compute_dtype: StrictStr = "bfloat16"
    # The dtype the packed 4-bit weights are stored in, and the dtype every other (non-LoRA)
    # parameter is loaded in: FSDP flattens and shards only float tensors of one dtype.
    quant_storage: StrictStr = "bfloat16"


@dataclass(config=STRICT_KEYS)
class LoraSpec:
    r: StrictInt = 64  # QLoRA paper: r=64 on all linear layers
    alpha: StrictInt = 16
    dropout: Float = 0.05  # 0.05 up to 13B, 0.1 for 33B/65B in the paper
    target_modules: list[StrictStr] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass(config=STRICT_KEYS)
class TrainSpec:
    output_dir: StrictStr = "runs/hermes"
    seq_len: StrictInt = 4096
    packing: StrictBool = False  # several examples per row, attention kept within each example
    overlength: StrictStr = "truncate"  # or "drop": what to do with examples longer than seq_len
    learning_rate: Float = 1e-4  # QLoRA paper for 33B/65B (2e-4 for 7B/13B)
    lr_scheduler: StrictStr = "constant_with_warmup"
    warmup_ratio: Float = 0.03
    optimizer: StrictStr = "paged_adamw_32bit"  # paged: survives memory spikes of long sequences
    weight_decay: Float = 0.0
    max_grad_norm: Float = 0.3
    micro_batch_size: StrictInt = 1
    gradient_accumulation_steps: StrictInt = 16
    epochs: Float = 3.0
    max_steps: StrictInt = -1  # > 0 overrides epochs
    gradient_checkpointing: StrictBool = True
    logging_steps: StrictInt = 10
    save_steps: StrictInt = 200
    save_total_limit: StrictInt = 3
    seed: StrictInt = 42
    bf16: StrictBool = True
    # How long a process waits for the others at a collective (e.g. while the main process
    # tokenizes the data, or gathers the adapter), in seconds.
    ddp_timeout: StrictInt = 1800


@dataclass(config=STRICT_KEYS)
class ExportSpec:
    outtype: StrictStr = "f16"  # f16 or bf16: the unquantized GGUF
    quantizations: list[StrictStr] = field(default_factory=lambda: ["Q4_K_M"])
    merge_into: StrictStr = "nf4"  # "nf4": the dequantized NF4 base the adapter trained against; or "bf16"
    probe_prompts: list[StrictStr] = field(default_factory=lambda: ["Write a haiku about the sea."])
    check: StrictBool = True  # compare each GGUF with transformers (needs the merged model in memory)


@dataclass(config=STRICT_KEYS)
class EvalSpec:
    enabled: StrictBool = False  # `hermes-train all` runs the eval stage too
    tasks: list[StrictStr] = field(default_factory=lambda: ["gpt4all"])  # suites or harness task names
    limit: StrictInt | None = None  # items per task (a quick look: the table says partial)
    n_gpu_layers: StrictInt = -1  # as the bot's N_GPU_LAYERS
    n_ctx: StrictInt = 2048
    hf: StrictBool = False  # also the merged Hugging Face model (the harness's hf backend)


def _datasets(value: Any) -> Any:
    """`datasets: [a.json, …]` is short for `[{path: a.json}, …]`."""
    if isinstance(value, list):
        return [{"path": v} if isinstance(v, str) else v for v in value]
    return value


@dataclass(config=STRICT_KEYS)
class TrainConfig:
    base_model: StrictStr  # a local folder in Hugging Face format, or a hub id
    datasets: Annotated[list[DatasetSpec], BeforeValidator(_datasets)]
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    export: ExportSpec = field(default_factory=ExportSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    hub_repo: StrictStr | None = None  # optional: upload the adapter / GGUF here

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir)


_EXPECTED = {
    "int_type": "an integer", "float_type": "a number", "bool_type": "true or false", "string_type": "a string",
    "list_type": "a list", "dict_type": "a mapping", "dataclass_type": "a mapping",
}


def _key(loc: tuple[Any, ...]) -> str:
    """('datasets', 0, 'weight') → 'datasets[0].weight'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "config"


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed in the mapping at `loc`: the top level or one section."""
    names = [part for part in loc if not isinstance(part, int)]
    sections = {"datasets": DatasetSpec, "quant": QuantConfig, "lora": LoraSpec, "train": TrainSpec, "export": ExportSpec}
    cls = TrainConfig if not names else sections.get(names[0]) if len(names) == 1 else None
    return [f.name for f in fields(cls)] if cls is not None else []


def _describe(error: Any) -> str:
    loc = tuple(error["loc"])
    key = _key(loc)
    kind = error["type"]
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        known = _known_keys(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else f"; expected some of {known}" if known else ""
        return f"{key}: unknown key{hint}"
    if kind in ("missing", "missing_argument"):
        return f"{key}: required key missing"
    value = error.get("input")
    if kind in _EXPECTED:
        return f"{key}: expected {_EXPECTED[kind]}, got {value!r} ({type(value).__name__})"
    return f"{key}: {error['msg']} (got {value!r})"


def _check(config: TrainConfig) -> None:
    t, q, e, lora = config.train, config.quant, config.export, config.lora
    if not config.datasets:
        raise ConfigError("datasets: expected a non-empty list")
    if t.seq_len < 64:
        raise ConfigError(f"train.seq_len={t.seq_len}: expected at least 64")
    if t.overlength not in {"truncate", "drop"}:
        raise ConfigError(f"train.overlength={t.overlength!r}: expected 'truncate' or 'drop'")
    for key in ("micro_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps", "ddp_timeout"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key}={getattr(t, key)}: expected at least 1")
    if not t.learning_rate > 0:
        raise ConfigError(f"train.learning_rate={t.learning_rate}: expected a number > 0")
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"train.warmup_ratio={t.warmup_ratio}: expected a ratio in [0, 1)")
    if lora.r < 1 or lora.alpha < 1:
        raise ConfigError(f"lora.r={lora.r}, lora.alpha={lora.alpha}: expected at least 1")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"lora.dropout={lora.dropout}: expected a probability in [0, 1)")
    if q.quant_type not in {"nf4", "fp4"}:
        raise ConfigError(f"quant.quant_type={q.quant_type!r}: expected 'nf4' or 'fp4'")
    for key in ("compute_dtype", "quant_storage"):
        if getattr(q, key) not in {"bfloat16", "float16", "float32"}:
            raise ConfigError(f"quant.{key}={getattr(q, key)!r}: expected bfloat16, float16 or float32")
    if e.outtype not in {"f16", "bf16"}:
        raise ConfigError(f"export.outtype={e.outtype!r}: expected 'f16' or 'bf16'")
    if e.merge_into not in {"nf4", "bf16"}:
        raise ConfigError(f"export.merge_into={e.merge_into!r}: expected 'nf4' or 'bf16'")
    if config.eval.limit is not None and config.eval.limit < 1:
        raise ConfigError(f"eval.limit={config.eval.limit}: expected at least 1 (or null for every item)")
    if not config.eval.tasks:
        raise ConfigError("eval.tasks: expected a non-empty list of suites or task names")
    if any(not d.weight > 0 for d in config.datasets):
        raise ConfigError("datasets: every weight must be > 0")


_ADAPTER = TypeAdapter(TrainConfig)


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of keys, got {type(raw).__name__}")
    try:
        config = _ADAPTER.validate_python(raw)
    except ValidationError as error:
        raise ConfigError("; ".join(_describe(e) for e in error.errors())) from None
    _check(config)
    return config


def load_config(path: str | Path) -> TrainConfig:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read {path}: {error}") from error
    try:
        return config_from_dict(raw or {})
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
