"""Merge a LoRA adapter into its base, one safetensors shard at a time.

Never into re-quantized 4-bit weights: each base weight is read in its own dtype, the LoRA
delta (alpha / r · B·A) is added in float32, and the result is written back in the base
dtype. Only one shard is in memory at a time, so a 70B merge needs a shard's worth of RAM,
not 140 GB.

Two variants: `bf16` adds the delta to the original weights; `nf4` first rounds every
quantized projection through NF4 (with the training run's block size and double
quantization) — the weights the adapter was actually trained against. The tests measure
which tracks the QLoRA model's loss more closely; that one is the default (`nf4`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from training.config import QuantConfig

log = logging.getLogger(__name__)
QUANTIZED = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class MergeError(ValueError):
    """The adapter does not fit the base model; the message says which tensor."""


def _shards(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise MergeError(f"{folder} has no safetensors weights (model.safetensors or an index)")


def _lora_deltas(adapter: Path) -> tuple[dict[str, tuple[Any, Any]], float]:
    """LoRA (A, B) per base weight name, and the scale alpha / r."""
    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    if config.get("use_dora") or config.get("use_rslora"):
        raise MergeError("DoRA / rsLoRA adapters are not supported by the shard-wise merge")
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(adapter / "adapter_model.safetensors")
    pairs: dict[str, tuple[Any, Any]] = {}
    for name, a in tensors.items():
        if ".lora_A." not in name:
            continue
        base_name = name.replace("base_model.model.", "", 1).replace(".lora_A.weight", ".weight")
        pairs[base_name] = (a, tensors[name.replace(".lora_A.", ".lora_B.")])
    return pairs, scale


def nf4_roundtrip(weight: Any, quant: QuantConfig, blocksize: int = 64) -> Any:
    """The weight as the QLoRA model saw it: quantized to NF4 and dequantized again."""
    import bitsandbytes.functional as bnbf
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU does a 70B in minutes
    packed, state = bnbf.quantize_4bit(
        weight.to(device).contiguous(), blocksize=blocksize, compress_statistics=quant.double_quant,
        quant_type=quant.quant_type,
    )
    return bnbf.dequantize_4bit(packed, state).to("cpu", weight.dtype)


def merge_adapter(
    base: Path, adapter: Path, out: Path, merge_into: str = "nf4", quant: QuantConfig | None = None
) -> Path:
    """Write base + adapter to `out` (safetensors shards, config, tokenizer)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm import tqdm

    quant = quant or QuantConfig()
    pairs, scale = _lora_deltas(adapter)
    out.mkdir(parents=True, exist_ok=True)
    merged = 0
    for shard in tqdm(_shards(base), desc="merging shards", unit="shard"):
        tensors: dict[str, Any] = {}
        with safe_open(base / shard, framework="pt") as handle:
            metadata = handle.metadata()
            for name in handle.keys():
                weight = handle.get_tensor(name)
                if merge_into == "nf4" and QUANTIZED.search(name):
                    weight = nf4_roundtrip(weight, quant)
                if name in pairs:
                    a, b = pairs.pop(name)
                    if (b.shape[0], a.shape[1]) != tuple(weight.shape):
                        raise MergeError(f"{name}: adapter shape {(b.shape[0], a.shape[1])} ≠ base {tuple(weight.shape)}")
                    weight = (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype)
                    merged += 1
                tensors[name] = weight.contiguous()
        save_file(tensors, out / shard, metadata=metadata or {"format": "pt"})
        del tensors
    if pairs:
        raise MergeError(f"the adapter has weights for tensors the base lacks: {sorted(pairs)[:3]}")
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json"):
        if (base / name).is_file():
            shutil.copy(base / name, out / name)
    tokenizer_source = adapter if (adapter / "tokenizer_config.json").is_file() else base
    for name in TOKENIZER_FILES:
        for source in (tokenizer_source, base):
            if (source / name).is_file():
                shutil.copy(source / name, out / name)
                break
    log.info("merged %d LoRA weights (%s base) into %s", merged, merge_into, out)
    return out
