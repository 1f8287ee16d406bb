"""The export streams (its peak memory does not grow with the model), writes the bot's
chat template, and its check fails an export that does not compute what the checkpoint
computes (issue #11, item 2)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from benchmarks.export_memory import build_llama, make_tokenizer, measure_export
from bot.core.conversation import Message
from bot.core.prompt import alpaca_prompt, render_chat

PROBES = ["What colour is the sky?", "Add the numbers.\n\nTwo lines, then:\nthree", "  spaces  and\ttabs "]


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("spm"))


def test_export_peak_memory_is_flat_across_model_sizes(tokenizer_model: Path, tmp_path: Path) -> None:
    """~20 MB and ~200 MB of weights: the export subprocess's peak RSS grows by far less
    than the model (it held every tensor before: +263 MB for the larger one)."""
    small = measure_export(build_llama(tmp_path / "small", 20, tokenizer_model), tmp_path / "small.gguf")
    large = measure_export(build_llama(tmp_path / "large", 200, tokenizer_model), tmp_path / "large.gguf")
    size_diff = large["weights"] - small["weights"]
    assert size_diff > 150 << 20
    assert large["gguf"] > large["weights"]  # everything was written
    assert large["peak"] - small["peak"] < size_diff / 2, (small, large)
    assert large["added"] < large["weights"] / 4, large  # about one tensor's conversion, not the model


@pytest.mark.parametrize("outtype", ["f16", "bf16"])
def test_streamed_export_writes_every_tensor_exactly(tokenizer_model: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, outtype: str) -> None:
    """Several shards, and blocks so small that a q/k projection is written one head at a
    time: each GGUF tensor equals the whole-tensor conversion (permuted, cast)."""
    import gguf
    import numpy as np
    import torch
    from safetensors.torch import load_file

    import training.export as export

    model = build_llama(tmp_path / "model", 20, tokenizer_model, shard="6MB")
    assert len(list(model.glob("*.safetensors"))) > 2
    monkeypatch.setattr(export, "CHUNK_BYTES", 64 << 10)  # q_proj: 256 rows × 1 KiB → one 64-row head per block
    path = export.export_gguf(model, tmp_path / "model.gguf", outtype)
    assert not list(tmp_path.glob("*.part"))
    written = {t.name: t for t in gguf.GGUFReader(path).tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 14)
    expected: dict[str, Any] = {}
    for shard in sorted(model.glob("*.safetensors")):
        for name, tensor in load_file(shard).items():
            if name.endswith("q_proj.weight"):
                tensor = export._permute(tensor, 4)
            elif name.endswith("k_proj.weight"):
                tensor = export._permute(tensor, 2)
            if tensor.ndim == 1:
                want = tensor.float().numpy()
            elif outtype == "bf16":
                want = tensor.to(torch.bfloat16).view(torch.uint16).numpy()
            else:
                want = tensor.float().numpy().astype(np.float16)
            expected[names.get_name(name, try_suffixes=(".weight",))] = want
    assert set(written) == set(expected)
    for name, want in expected.items():
        got = np.asarray(written[name].data)
        assert got.view(want.dtype).reshape(want.shape).tobytes() == want.tobytes(), name


# --- the chat template ------------------------------------------------------------------


def _chat(messages: list[Message], preamble: str = "", final_input: str = "") -> list[dict[str, str]]:
    """The same turns as OpenAI-style chat messages (what llama-server & co. receive)."""
    chat = [{"role": "system", "content": preamble}] if preamble else []
    for m in messages:
        chat.append({"role": "assistant", "content": m.content} if m.is_bot
                    else {"role": "user", "name": m.author_name, "content": m.content})
    if final_input:
        chat.append({"role": "input", "content": final_input})
    return chat


ANN, BOB, BOT = ("1", "Ann"), ("2", "Bob"), ("9", "Hermes")
CONVERSATIONS = {
    "one person": ([Message(*ANN, "What colour is the sky?")], "", ""),
    "group chat": ([Message(*ANN, "Hi all"), Message(*BOB, "Hello!\nTwo lines,\n\nand a gap."),
                    Message(*BOT, "  Hello Ann and Bob.  ", is_bot=True), Message(*BOT, "How can I help?", is_bot=True),
                    Message(*ANN, "Write a haiku about the sea.")], "You are Hermes, a helpful assistant.\n", ""),
    "ends with the bot": ([Message(*BOT, "Welcome! Ask me anything.", is_bot=True)], "Be brief.", ""),
    "post-history input": ([Message(*ANN, "And now?"), Message(*BOT, "Now what?", is_bot=True),
                            Message(*BOB, "def f():\n    return 1")], " Persona text ", "Stay in character."),
}


@pytest.fixture(scope="module")
def template_gguf(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.export import export_gguf

    return export_gguf(tiny_base, tmp_path_factory.mktemp("template") / "tiny.f16.gguf")


def test_gguf_carries_the_alpaca_chat_template(template_gguf: Path) -> None:
    import gguf
    from bot.engine.repack import open_llama

    from bot.core.prompt import INSTRUCTION, RESPONSE
    from training.export import chat_template

    field = gguf.GGUFReader(template_gguf).get_field("tokenizer.chat_template")
    assert field is not None and field.contents() == chat_template()
    assert INSTRUCTION in chat_template() and RESPONSE in chat_template()
    llm = open_llama(template_gguf, n_ctx=64, verbose=False)  # what llama-cpp-python's server uses
    try:
        assert llm.metadata["tokenizer.chat_template"] == chat_template()
        assert llm.chat_format == "chat_template.default"
    finally:
        llm.close()


def _renderers(tiny_base: Path) -> dict[str, Any]:
    """The template as plain jinja2, as transformers and as llama-cpp-python render it."""
    import jinja2
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    from training.export import chat_template

    template = chat_template()
    plain = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).from_string(template)
    formatter = Jinja2ChatFormatter(template, eos_token="</s>", bos_token="<s>")
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    return {
        "jinja2": lambda chat: plain.render(messages=chat, add_generation_prompt=True),
        "transformers": lambda chat: tokenizer.apply_chat_template(
            chat, chat_template=template, tokenize=False, add_generation_prompt=True),
        "llama-cpp-python": lambda chat: formatter(messages=chat).prompt,
    }


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_chat_template_renders_what_the_bot_renders(tiny_base: Path, conversation: str) -> None:
    messages, preamble, final_input = CONVERSATIONS[conversation]
    want = render_chat(messages, preamble, final_input=final_input)
    for renderer, render in _renderers(tiny_base).items():
        assert render(_chat(messages, preamble, final_input)) == want, renderer


def test_chat_template_renders_the_training_format(tiny_base: Path) -> None:
    """One turn without a speaker name is `alpaca_prompt`, the text the model was trained on."""
    for render in _renderers(tiny_base).values():
        assert render([{"role": "user", "content": "Name a fruit.\n\nOne line."}]) == alpaca_prompt("Name a fruit.\n\nOne line.")
        assert render([{"role": "user", "content": "Add the numbers."}, {"role": "input", "content": "2 and 3"}]) \
            == alpaca_prompt("Add the numbers.", "2 and 3")


# --- the logit gate ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def exports(trained: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from training.export import export_gguf, quantize
    from training.merge import merge_adapter

    root = tmp_path_factory.mktemp("gate")
    merged = merge_adapter(Path(trained.base_model), trained.output_dir / "adapter", root / "merged")
    f16 = export_gguf(merged, root / "tiny.f16.gguf")
    return {"merged": merged, "F16": f16, **{q: quantize(f16, root / f"tiny.{q}.gguf", q) for q in ("Q8_0", "Q4_K_M")}}


def test_verify_exports_loads_the_reference_once_and_passes_a_good_export(
        exports: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    from training.export import LOGIT_TOLERANCES, verify_exports

    loads = []
    original = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: loads.append(a) or original(*a, **k))
    results = verify_exports(exports["merged"], [exports[q] for q in ("F16", "Q8_0", "Q4_K_M")], PROBES)
    assert len(loads) == 1, "one reference model for all files"
    assert [r.file_type for r in results] == ["F16", "Q8_0", "Q4_K_M"]
    for r in results:
        assert r.ok and len(r.checks) == len(PROBES)
        assert r.tolerance == LOGIT_TOLERANCES[r.file_type]
        assert all(c.same_token_ids and c.logit_spread < 0.4 for c in r.checks)
    assert max(c.max_abs_logit_diff for c in results[0].checks) < 0.005  # F16: far inside its 0.02


def _scaled_copy(source: Path, out: Path, tensor: str, factor: float) -> Path:
    import gguf
    import numpy as np

    shutil.copy(source, out)
    reader = gguf.GGUFReader(out, "r+")
    data = next(t for t in reader.tensors if t.name == tensor).data
    data[...] = (data.astype(np.float32) * factor).astype(data.dtype)
    reader.data.flush()
    return out


def test_a_perturbed_tensor_fails_the_logit_gate(exports: dict[str, Path], tmp_path: Path) -> None:
    """One projection scaled by 5 %: same token ids, same top tokens, so the old gate (token
    ids only) passed it; the logits give it away."""
    from training.export import ExportError, check_exports, verify_exports

    bad = _scaled_copy(exports["F16"], tmp_path / "bad.f16.gguf", "blk.0.attn_v.weight", 1.05)
    (result,) = check_exports(exports["merged"], [bad], PROBES)
    assert all(c.same_token_ids and c.same_top_token for c in result.checks)
    assert not result.ok and max(c.max_abs_logit_diff for c in result.checks) > 0.05
    with pytest.raises(ExportError, match=r"bad\.f16\.gguf \(F16\).*max \|Δlogit\|"):
        verify_exports(exports["merged"], [exports["F16"], bad], PROBES)


def test_an_export_without_the_qk_permutation_fails(exports: dict[str, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The classic conversion bug (q/k left in HF's rotary layout) fails the F16 file and the
    files quantized from it, although llama.cpp tokenizes everything the same."""
    import training.export as export

    monkeypatch.setattr(export, "_permute", lambda weight, n_head: weight)
    f16 = export.export_gguf(exports["merged"], tmp_path / "noperm.f16.gguf")
    files = [f16, export.quantize(f16, tmp_path / "noperm.Q8_0.gguf", "Q8_0"),
             export.quantize(f16, tmp_path / "noperm.Q4_K_M.gguf", "Q4_K_M")]
    with pytest.raises(export.ExportError) as failure:
        export.verify_exports(exports["merged"], files, PROBES)
    for name in ("noperm.f16.gguf (F16)", "noperm.Q8_0.gguf (Q8_0)", "noperm.Q4_K_M.gguf (Q4_K_M)"):
        assert name in str(failure.value)
    assert "tokenizes" not in str(failure.value)


def test_gate_rules() -> None:
    """Top token: required for unquantized files unless tied within the limit; limits widen
    with the logits' spread; an unknown file type fails."""
    from training.export import CALIBRATION_SPREAD, ExportCheck, FileCheck

    def verdict(file_type: str, tolerance: float | None, **check: Any) -> list[str]:
        values = {"prompt": "p", "same_token_ids": True, "max_abs_logit_diff": 0.0, "same_top_token": True,
                  "logit_spread": CALIBRATION_SPREAD, **check}
        return FileCheck(Path("x.gguf"), file_type, tolerance, [ExportCheck(**values)]).problems

    assert verdict("F16", 0.02) == []
    assert "top token differs" in verdict("F16", 0.02, same_top_token=False, top_token_margin=0.05)[0]
    assert verdict("F16", 0.02, same_top_token=False, top_token_margin=0.01) == []  # a tie, broken by rounding
    assert verdict("Q4_K_M", 1.5, same_top_token=False, top_token_margin=0.5, max_abs_logit_diff=0.9) == []
    assert verdict("Q4_K_M", 1.5, max_abs_logit_diff=1.6)
    assert verdict("Q4_K_M", 1.5, max_abs_logit_diff=1.6, logit_spread=4 * CALIBRATION_SPREAD) == []  # limit 6
    assert verdict("F16", 0.02, max_abs_logit_diff=0.03, logit_spread=CALIBRATION_SPREAD / 4)  # never narrower
    assert "tokenizes the template differently" in verdict("Q8_0", 0.15, same_token_ids=False)[0]
    assert "no logit tolerance" in verdict("file type 99", None)[0]
