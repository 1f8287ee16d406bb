"""GGUF export of a merged Llama checkpoint with the `gguf` package, quantization with
llama.cpp's own `llama_model_quantize`, and a gate that fails an export llama.cpp does not
compute like transformers.

Memory. `export_gguf` streams: it reads the safetensors headers (names, dtypes, shapes),
writes the GGUF header and tensor table, then converts each tensor in row blocks of at
most `CHUNK_BYTES` (whole heads for the permuted q/k projections) read straight from the
shard file and appends them to the GGUF. Nothing is memory-mapped and no tensor is held
whole, so the peak resident set is the same for a 1 B and a 70 B model
(`benchmarks/export_memory.py` measures it; tests/training/test_export_memory.py checks it).

Chat template. The GGUF carries `tokenizer.chat_template`, a Jinja template of the bot's
Alpaca format built from `bot.core.prompt`'s header constants, so llama-server, Ollama and LM
Studio prompt the model the way it was trained (see `chat_template`).

Checks. `verify_exports` loads the reference (transformers, the merged checkpoint) once,
computes its next-token logits for every probe, frees it, then loads each GGUF in turn and
fails (`ExportError`) when llama.cpp tokenizes the template differently, when an
unquantized file's top token differs, or when the largest logit gap exceeds the file type's
tolerance (`LOGIT_TOLERANCES`).
"""

from __future__ import annotations

import gc
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.core.prompt import INPUT, INSTRUCTION, RESPONSE, alpaca_prompt

log = logging.getLogger(__name__)

QUANT_TYPES = {  # name → llama_ftype (llama.h)
    "F16": 1, "Q4_0": 2, "Q8_0": 7, "Q5_0": 8, "Q2_K": 10, "Q3_K_M": 12, "Q4_K_S": 14,
    "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "BF16": 32,
}
FILE_TYPES = {0: "F32", **{ftype: name for name, ftype in QUANT_TYPES.items()}}  # general.file_type → name
UNQUANTIZED = frozenset({"F32", "F16", "BF16"})

# The largest |logit(llama.cpp) − logit(transformers)| allowed for a probe's next token, per
# file type, for a model whose next-token logits have a standard deviation (over the
# vocabulary) of up to `CALIBRATION_SPREAD`; a model whose logits spread wider gets limits
# wider in proportion (a weight's rounding error reaches the logits scaled like them), e.g.
# ×7.5 for logits with a standard deviation of 3.
# Measured on the trained tiny test model (tests/training: logits' std ≈ 0.37), the largest
# gap over five probes: F16 0.0014 (f16 weights, f32 compute), Q8_0 0.056, Q6_K 0.077,
# Q5_K_M 0.19, Q5_K_S 0.20, Q5_0 0.21, Q4_K_S 0.59, Q4_K_M 0.62, Q2_K 1.07, Q3_K_M 1.46.
# The limits are 2.5× to 14× those (F16's wide margin leaves room for llama.cpp's GPU
# kernels, which may accumulate in f16); an export that skips the q/k permutation, or one tensor scaled by 5 %, exceeds
# them (tests/training/test_export_memory.py). Pass `tolerances=` to override per type.
LOGIT_TOLERANCES: dict[str, float] = {
    "F32": 0.02, "F16": 0.02, "BF16": 0.05,
    "Q8_0": 0.15, "Q6_K": 0.3, "Q5_K_M": 0.5, "Q5_K_S": 0.6, "Q5_0": 0.6,
    "Q4_K_M": 1.5, "Q4_K_S": 1.5, "Q4_0": 2.0, "Q3_K_M": 3.5, "Q2_K": 4.0,
}
CALIBRATION_SPREAD = 0.4  # std of the tiny model's next-token logits, where the limits hold as written

CHUNK_BYTES = 16 << 20  # float32 bytes converted at a time (a block's temporaries: ~2× this)


class ExportError(ValueError):
    """The checkpoint cannot be exported or quantized, or an export fails its check; the
    message says why."""


# --- chat template ----------------------------------------------------------------------


def _jinja_str(text: str) -> str:
    return json.dumps(text)  # a double-quoted literal Jinja (and minja) read the same way


def chat_template() -> str:
    """The bot's Alpaca format as a Jinja chat template (`tokenizer.chat_template`).

    Built from `bot.core.prompt`'s header strings. Roles: ``system`` is the preamble (stripped,
    then a blank line); ``user`` messages (and any unknown role) are the instruction block,
    one line per message, ``name: content`` when the message has a ``name``; ``assistant``
    messages the response block (each stripped); ``input`` an ``### Input:`` block.
    Consecutive messages of one role share a block, joined by a newline, and blocks end with
    a blank line, as `bot.core.prompt.render_chat` writes them; ``add_generation_prompt`` opens the
    response. So for contents that `bot.core.prompt.neutralize` leaves as they are, the template
    renders exactly `render_chat(messages)` (no response prefix), and for one ``user`` turn
    (and an optional ``input``) exactly `alpaca_prompt(instruction, input)`, the training
    format. It writes no BOS: llama.cpp's tokenizer adds it.
    """
    headers = {name: _jinja_str(header + "\n") for name, header in
               (("INSTRUCTION", INSTRUCTION), ("INPUT", INPUT), ("RESPONSE", RESPONSE))}
    template = _CHAT_TEMPLATE
    for name, literal in headers.items():
        template = template.replace(f"@{name}@", literal)
    return template


# Every tag trims the whitespace around it, so the layout below is not part of the output
# (the same with or without trim_blocks / lstrip_blocks, as transformers and llama.cpp set).
_CHAT_TEMPLATE = """\
{%- set ns = namespace(role='') -%}
{%- for message in messages -%}
    {%- set content = message['content'] if message['content'] is string else '' -%}
    {%- if message['role'] == 'system' -%}
        {%- if ns.role -%}{{- '\\n\\n' -}}{%- endif -%}
        {%- set ns.role = '' -%}
        {%- if content | trim -%}{{- content | trim + '\\n\\n' -}}{%- endif -%}
    {%- else -%}
        {%- set role = message['role'] if message['role'] in ['assistant', 'input'] else 'user' -%}
        {%- if role == ns.role -%}
            {{- '\\n' -}}
        {%- else -%}
            {%- if ns.role -%}{{- '\\n\\n' -}}{%- endif -%}
            {%- if role == 'user' -%}{{- @INSTRUCTION@ -}}
            {%- elif role == 'input' -%}{{- @INPUT@ -}}
            {%- else -%}{{- @RESPONSE@ -}}
            {%- endif -%}
        {%- endif -%}
        {%- if role == 'user' -%}
            {%- if message['name'] is defined and message['name'] -%}{{- message['name'] + ': ' -}}{%- endif -%}
            {{- content -}}
        {%- else -%}
            {{- content | trim -}}
        {%- endif -%}
        {%- set ns.role = role -%}
    {%- endif -%}
{%- endfor -%}
{%- if ns.role -%}{{- '\\n\\n' -}}{%- endif -%}
{%- if add_generation_prompt -%}{{- @RESPONSE@ -}}{%- endif -%}
"""


# --- streaming export -------------------------------------------------------------------


@dataclass(frozen=True)
class _Stored:
    """One tensor of a safetensors shard, located but not read."""

    path: Path
    name: str
    dtype: str  # safetensors dtype: BF16, F16, F32
    shape: tuple[int, ...]
    offset: int  # absolute offset of the data in the file
    nbytes: int


_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4}


def _stored_tensors(folder: Path) -> list[_Stored]:
    """Every tensor of the checkpoint's shards, from their headers only."""
    from training.merge import _shards

    stored = []
    for shard in _shards(folder):
        path = folder / shard
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _ITEMSIZE:
                raise ExportError(f"{path.name}: tensor {name} is {info['dtype']}; expected BF16, F16 or F32")
            start, end = info["data_offsets"]
            stored.append(_Stored(path, name, info["dtype"], tuple(info["shape"]), 8 + size + start, end - start))
    return sorted(stored, key=lambda t: (str(t.path), t.offset))  # read each file front to back


def _read_rows(handle: Any, tensor: _Stored, start: int, stop: int) -> Any:
    """Rows [start, stop) of `tensor` as stored (BF16 as its uint16 bits)."""
    import numpy as np

    row = int(np.prod(tensor.shape[1:], dtype=np.int64))
    handle.seek(tensor.offset + start * row * _ITEMSIZE[tensor.dtype])
    dtype = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}[tensor.dtype]
    data = np.fromfile(handle, dtype=dtype, count=(stop - start) * row)
    if data.size != (stop - start) * row:
        raise ExportError(f"{tensor.path.name}: tensor {tensor.name} is truncated")
    return data.reshape(stop - start, *tensor.shape[1:])


def _to_f32(data: Any, dtype: str) -> Any:
    import numpy as np

    if dtype == "BF16":
        wide = data.astype(np.uint32)
        wide <<= 16  # in place: one float32-sized buffer per block
        return wide.view(np.float32)
    return data.astype(np.float32, copy=False)


def _permute(weight: Any, n_head: int) -> Any:
    """HF's q/k rows are in rotate-half order; llama.cpp expects interleaved pairs."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _gguf_dtype(tensor: _Stored, outtype: str) -> tuple[Any, Any]:
    """(numpy dtype of the written bytes, GGML type) of a tensor in the GGUF."""
    import gguf
    import numpy as np

    if len(tensor.shape) == 1:  # norms stay float32
        return np.dtype(np.float32), gguf.GGMLQuantizationType.F32
    if outtype == "bf16":
        return np.dtype(np.uint16), gguf.GGMLQuantizationType.BF16
    return np.dtype(np.float16), gguf.GGMLQuantizationType.F16


def _converted_blocks(handle: Any, tensor: _Stored, outtype: str, head_dim: int | None) -> Iterator[Any]:
    """The tensor as the GGUF stores it, in row blocks of at most ~`CHUNK_BYTES` (float32):
    q/k permuted (whole heads per block), cast to F32 (norms), F16 or BF16 bits."""
    import gguf
    import numpy as np

    rows, row = tensor.shape[0], int(np.prod(tensor.shape[1:], dtype=np.int64))
    unit = head_dim or 1
    step = max(unit, (CHUNK_BYTES // max(4 * row, 1)) // unit * unit)
    out_dtype, ggml_type = _gguf_dtype(tensor, outtype)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block = _read_rows(handle, tensor, start, stop)
        if head_dim:
            block = _permute(block, block.shape[0] // head_dim)
        same = (tensor.dtype == "BF16" and ggml_type == gguf.GGMLQuantizationType.BF16) or (
            tensor.dtype == "F16" and ggml_type == gguf.GGMLQuantizationType.F16
        ) or (tensor.dtype == "F32" and ggml_type == gguf.GGMLQuantizationType.F32)
        if same:  # the stored bits as they are
            yield np.ascontiguousarray(block)
        elif ggml_type == gguf.GGMLQuantizationType.BF16:
            yield gguf.quants.quantize(_to_f32(block, tensor.dtype), ggml_type).view(np.uint16)
        else:
            yield _to_f32(block, tensor.dtype).astype(out_dtype)
        del block


def _rope_theta(config: Mapping[str, Any]) -> float:
    return float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))


def export_gguf(model_dir: Path, out: Path, outtype: str = "f16") -> Path:
    """Write `model_dir` (a merged Llama in Hugging Face format) as an F16 or BF16 GGUF,
    one block of one tensor in memory at a time (see the module doc)."""
    import gguf
    import numpy as np
    from tqdm import tqdm

    if outtype not in ("f16", "bf16"):
        raise ExportError(f"outtype {outtype!r}: expected f16 or bf16")
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise ExportError(f"{model_dir}: model_type {config.get('model_type')!r}; only Llama is exported")
    if not (model_dir / "tokenizer.model").is_file():
        raise ExportError(f"{model_dir} has no tokenizer.model (the SentencePiece file Llama ships)")
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    n_layers = config["num_hidden_layers"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    file_type = gguf.LlamaFileType.MOSTLY_BF16 if outtype == "bf16" else gguf.LlamaFileType.MOSTLY_F16

    partial = out.with_name(out.name + ".part")  # renamed once complete
    writer = gguf.GGUFWriter(partial, "llama")
    writer.add_name(model_dir.name)
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-5))
    writer.add_rope_freq_base(_rope_theta(config))
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
    special.chat_template = chat_template()  # the format the model was trained on, not the base's
    special.add_to_gguf(writer)

    # Pass 1, headers only: the tensor table.
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    plan: list[tuple[_Stored, int | None]] = []
    for tensor in _stored_tensors(model_dir):
        if tensor.name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(tensor.name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"no GGUF name for tensor {tensor.name}")
        if not tensor.shape:
            raise ExportError(f"{tensor.name} is a scalar; a Llama has none")
        permuted = tensor.name.endswith(("q_proj.weight", "k_proj.weight")) and len(tensor.shape) == 2
        if permuted and tensor.shape[0] % (2 * head_dim):
            raise ExportError(f"{tensor.name}: {tensor.shape[0]} rows are not whole heads of {head_dim}")
        out_dtype, ggml_type = _gguf_dtype(tensor, outtype)
        count = int(np.prod(tensor.shape, dtype=np.int64))
        writer.add_tensor_info(name, tensor.shape, out_dtype, count * out_dtype.itemsize, raw_dtype=ggml_type)
        plan.append((tensor, head_dim if permuted else None))

    # Pass 2: the data, converted block by block and appended.
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None and len(writer.fout) == 1
        fout = writer.fout[0]
        total = sum(t.nbytes for t, _ in plan)
        with tqdm(total=total, desc="writing GGUF", unit="B", unit_scale=True, disable=None) as bar:
            open_path, handle = None, None
            for tensor, permute_heads in plan:
                if tensor.path != open_path:
                    if handle is not None:
                        handle.close()
                    open_path, handle = tensor.path, open(tensor.path, "rb")  # noqa: SIM115
                writer.write_padding(fout, fout.tell())
                written = 0
                for block in _converted_blocks(handle, tensor, outtype, permute_heads):
                    block.tofile(fout)
                    written += block.nbytes
                writer.write_padding(fout, written)
                bar.update(tensor.nbytes)
            if handle is not None:
                handle.close()
        writer.close()
        os.replace(partial, out)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
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


# --- checks -----------------------------------------------------------------------------


@dataclass
class ExportCheck:
    """One probe against one GGUF: llama.cpp's next-token logits against transformers'."""

    prompt: str
    same_token_ids: bool
    max_abs_logit_diff: float
    same_top_token: bool
    # Reference logit of the reference's top token minus that of llama.cpp's top token
    # (0 when they agree): how far apart two differing top tokens really are.
    top_token_margin: float = 0.0
    logit_spread: float = 0.0  # std of the reference's next-token logits over the vocabulary

    def limit(self, tolerance: float) -> float:
        """The largest gap allowed for this probe (see `LOGIT_TOLERANCES`)."""
        return tolerance * max(1.0, self.logit_spread / CALIBRATION_SPREAD)


@dataclass
class FileCheck:
    """All probes against one GGUF, and the verdict."""

    path: Path
    file_type: str  # F16, Q8_0, … (the GGUF's general.file_type)
    tolerance: float | None  # from LOGIT_TOLERANCES (None: none known for this type)
    checks: list[ExportCheck] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        problems = []
        if self.tolerance is None:
            problems.append(f"no logit tolerance for {self.file_type} (pass tolerances=)")
        for c in self.checks:
            limit = float("inf") if self.tolerance is None else c.limit(self.tolerance)
            if not c.same_token_ids:
                problems.append(f"{c.prompt!r}: llama.cpp tokenizes the template differently from transformers")
            if c.max_abs_logit_diff > limit:
                problems.append(f"{c.prompt!r}: max |Δlogit| {c.max_abs_logit_diff:.4f} exceeds the "
                                f"{limit:.4g} allowed for {self.file_type}")
            # An unquantized file must pick the same next token, unless the two are tied
            # within rounding (their reference logits closer than the limit).
            if self.file_type in UNQUANTIZED and not c.same_top_token and c.top_token_margin > limit:
                problems.append(f"{c.prompt!r}: the top token differs (reference margin {c.top_token_margin:.4f})")
        return problems

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class _Reference:
    prompt: str
    text: str
    ids: list[int]
    logits: Any  # numpy float32, the next-token logits


def _references(model_dir: Path, prompts: Sequence[str]) -> list[_Reference]:
    """transformers' token ids and next-token logits for every probe; the model is loaded
    once and freed before returning (so it never shares the memory with a GGUF).

    In float32 everywhere, so the reference is the checkpoint's exact arithmetic and the
    tolerances measure the GGUF alone: on a GPU box spread over the GPUs (a 70B takes
    ~280 GB, 8×H100 hold it; what does not fit is offloaded to the CPU by accelerate)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, device_map="auto" if cuda else None
    ).eval()
    references = []
    try:
        for probe in prompts:
            text = alpaca_prompt(probe)
            ids = list(tokenizer(text).input_ids)
            with torch.no_grad():
                logits = model(torch.tensor([ids], device=model.device)).logits[0, -1].float().cpu().numpy()
            references.append(_Reference(probe, text, ids, logits))
    finally:
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return references


def _compare(path: Path, references: Sequence[_Reference], tolerances: Mapping[str, float]) -> FileCheck:
    import numpy as np
    from bot.engine.repack import open_llama

    n_ctx = max(512, max((len(r.ids) for r in references), default=0) + 8)
    llm = open_llama(path, n_ctx=n_ctx, n_gpu_layers=-1, logits_all=True, verbose=False)
    try:
        ftype = int(llm.metadata.get("general.file_type", -1))
        file_type = FILE_TYPES.get(ftype, f"file type {ftype}")
        result = FileCheck(path, file_type, tolerances.get(file_type))
        for ref in references:
            cpp_ids = llm.tokenize(ref.text.encode(), add_bos=True, special=False)
            llm.reset()
            llm.eval(ref.ids)
            cpp_logits = np.array(llm.scores[len(ref.ids) - 1], dtype=np.float32)
            hf_top, cpp_top = int(ref.logits.argmax()), int(cpp_logits.argmax())
            result.checks.append(ExportCheck(
                prompt=ref.prompt,
                same_token_ids=list(ref.ids) == list(cpp_ids),
                max_abs_logit_diff=float(np.abs(ref.logits - cpp_logits).max()),
                same_top_token=hf_top == cpp_top,
                top_token_margin=float(ref.logits[hf_top] - ref.logits[cpp_top]),
                logit_spread=float(ref.logits.std()),
            ))
    finally:
        llm.close()
    for c in result.checks:
        log.info("check %s %r: token ids %s, max |Δlogit| %.4f (allowed %.4g), same top token %s", path.name,
                 c.prompt, "match" if c.same_token_ids else "DIFFER", c.max_abs_logit_diff,
                 c.limit(result.tolerance) if result.tolerance is not None else float("inf"), c.same_top_token)
    return result


def check_exports(model_dir: Path, gguf_paths: Sequence[Path], prompts: Sequence[str],
                  tolerances: Mapping[str, float] | None = None) -> list[FileCheck]:
    """Compare llama.cpp on each GGUF with transformers on the checkpoint (loaded once for
    all files): token ids of each probe in the Alpaca template (newlines included) and the
    next-token logits. Returns one `FileCheck` per file; raises nothing about the results."""
    from bot.engine import repack

    tolerances = {**LOGIT_TOLERANCES, **(tolerances or {})}
    repack.log_choice(repack.choose())  # llama.cpp loads each file with LLAMA_REPACK's choice
    references = _references(model_dir, prompts)
    return [_compare(Path(path), references, tolerances) for path in gguf_paths]


def verify_exports(model_dir: Path, gguf_paths: Sequence[Path], prompts: Sequence[str],
                   tolerances: Mapping[str, float] | None = None) -> list[FileCheck]:
    """`check_exports`, then `ExportError` naming every file and probe that fails: different
    token ids, a different top token (unquantized files), or a logit gap over the file type's
    tolerance (`LOGIT_TOLERANCES`, overridable per type)."""
    results = check_exports(model_dir, gguf_paths, prompts, tolerances)
    failed = [f"{r.path.name} ({r.file_type}): {problem}" for r in results for problem in r.problems]
    if failed:
        raise ExportError("the export does not compute what the checkpoint computes:\n  " + "\n  ".join(failed))
    return results


def check_export(model_dir: Path, gguf_path: Path, prompts: list[str]) -> list[ExportCheck]:
    """One file's checks (loads the reference for this file alone: for several files use
    `check_exports` / `verify_exports`, which load it once)."""
    return check_exports(model_dir, [gguf_path], prompts)[0].checks
