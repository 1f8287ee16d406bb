"""GGUF export of a merged Llama checkpoint with the `gguf` package, quantization with
llama.cpp's own `llama_model_quantize`, and a check that llama.cpp computes what
transformers computes (next-token logits, and the token ids of the Alpaca template).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.prompt import alpaca_prompt

log = logging.getLogger(__name__)

QUANT_TYPES = {  # name → llama_ftype (llama.h)
    "F16": 1, "Q4_0": 2, "Q8_0": 7, "Q5_0": 8, "Q2_K": 10, "Q3_K_M": 12, "Q4_K_S": 14,
    "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "BF16": 32,
}


class ExportError(ValueError):
    """The checkpoint cannot be exported or quantized; the message says why."""


def _permute(weight: Any, n_head: int) -> Any:
    """HF's q/k rows are in rotate-half order; llama.cpp expects interleaved pairs."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _iter_tensors(folder: Path) -> Any:
    from safetensors import safe_open

    from training.merge import _shards

    for shard in _shards(folder):
        with safe_open(folder / shard, framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def export_gguf(model_dir: Path, out: Path, outtype: str = "f16") -> Path:
    """Write `model_dir` (a merged Llama in Hugging Face format) as an F16 or BF16 GGUF."""
    import gguf
    import numpy as np
    import torch

    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise ExportError(f"{model_dir}: model_type {config.get('model_type')!r}; only Llama is exported")
    if not (model_dir / "tokenizer.model").is_file():
        raise ExportError(f"{model_dir} has no tokenizer.model (the SentencePiece file Llama ships)")
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    n_layers = config["num_hidden_layers"]
    file_type = gguf.LlamaFileType.MOSTLY_BF16 if outtype == "bf16" else gguf.LlamaFileType.MOSTLY_F16

    writer = gguf.GGUFWriter(out, "llama")
    writer.add_name(model_dir.name)
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(config["hidden_size"] // n_head)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-5))
    writer.add_rope_freq_base(float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    writer.add_file_type(file_type)

    vocab = gguf.SentencePieceVocab(model_dir)
    tokens, scores, types = zip(*vocab.all_tokens(), strict=True)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types(list(types))
    special = gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=len(tokens))
    special.add_special_token.setdefault("bos", True)  # Llama prompts start with BOS
    special.add_to_gguf(writer)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    for hf_name, tensor in _iter_tensors(model_dir):
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"no GGUF name for tensor {hf_name}")
        if hf_name.endswith("q_proj.weight"):
            tensor = _permute(tensor, n_head)
        elif hf_name.endswith("k_proj.weight"):
            tensor = _permute(tensor, n_kv)
        data = tensor.to(torch.float32).numpy()
        if data.ndim == 1:  # norms stay float32
            writer.add_tensor(name, data)
        elif outtype == "bf16":
            writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16),
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(name, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    log.info("wrote %s (%.1f MB)", out, out.stat().st_size / 1e6)
    return out


def quantize(source: Path, out: Path, qtype: str = "Q4_K_M", threads: int | None = None) -> Path:
    """Quantize a GGUF with llama.cpp (`llama_model_quantize`), no separate binary needed."""
    import llama_cpp

    if qtype not in QUANT_TYPES:
        raise ExportError(f"quantization {qtype!r}: expected one of {', '.join(QUANT_TYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[qtype]
    params.nthread = threads or os.cpu_count() or 1
    log.info("quantizing %s → %s (%s)", source.name, out.name, qtype)
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    if status != 0 or not out.is_file():
        raise ExportError(f"llama.cpp failed to quantize {source.name} to {qtype} (status {status})")
    log.info("wrote %s (%.1f MB)", out, out.stat().st_size / 1e6)
    return out


@dataclass
class ExportCheck:
    prompt: str
    same_token_ids: bool
    max_abs_logit_diff: float
    same_top_token: bool


def check_export(model_dir: Path, gguf_path: Path, prompts: list[str]) -> list[ExportCheck]:
    """Compare llama.cpp on the GGUF with transformers on the checkpoint: token ids of each
    probe in the Alpaca template (newlines included) and the next-token logits."""
    import numpy as np
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # float32 on a CPU (small models, tests); bf16 spread over the GPUs for a 70B.
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16 if cuda else torch.float32, device_map="auto" if cuda else None
    ).eval()
    llm = Llama(str(gguf_path), n_ctx=512, n_gpu_layers=-1, logits_all=True, verbose=False)
    checks = []
    try:
        for probe in prompts:
            text = alpaca_prompt(probe)
            hf_ids = tokenizer(text).input_ids
            cpp_ids = llm.tokenize(text.encode(), add_bos=True, special=False)
            with torch.no_grad():
                hf_logits = model(torch.tensor([hf_ids], device=model.device)).logits[0, -1].float().cpu().numpy()
            llm.reset()
            llm.eval(hf_ids)
            cpp_logits = np.array(llm.scores[len(hf_ids) - 1])
            checks.append(ExportCheck(
                prompt=probe,
                same_token_ids=list(hf_ids) == list(cpp_ids),
                max_abs_logit_diff=float(np.abs(hf_logits - cpp_logits).max()),
                same_top_token=int(hf_logits.argmax()) == int(cpp_logits.argmax()),
            ))
    finally:
        llm.close()
    for check in checks:
        log.info("check %r: token ids %s, max |Δlogit| %.4f, same top token %s", check.prompt,
                 "match" if check.same_token_ids else "DIFFER", check.max_abs_logit_diff, check.same_top_token)
    return checks
