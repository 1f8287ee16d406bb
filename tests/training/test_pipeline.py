"""Train → merge → export → quantize → serve, for real, on the tiny Llama."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bot.core.conversation import Message
from bot.core.prompt import build_prompt
from bot.engine.base import GenerationRequest, SamplingParams
from bot.engine.llama import LlamaConfig, LlamaEngine
from tests.training.conftest import alpaca_records, tiny_config
from training.data import prepare_dataset
from training.model import load_tokenizer

REPO = Path(__file__).resolve().parents[2]


def eval_loss(model: Any, config: Any) -> float:
    """Mean loss over the fixture set (prompt masked), with the model in eval mode."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    tokenizer = load_tokenizer(config.base_model)
    dataset, _ = prepare_dataset(config, tokenizer)
    batch = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)(list(dataset))
    model.eval()
    with torch.no_grad():
        return float(model(**{k: v for k, v in batch.items()}).loss)


def qlora_model(config: Any, adapter: Path | None) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from training.model import dtype, quantization_config

    base = AutoModelForCausalLM.from_pretrained(
        config.base_model, quantization_config=quantization_config(config), dtype=dtype(config.quant.quant_storage)
    )
    return PeftModel.from_pretrained(base, adapter) if adapter else base


def test_qlora_with_the_card_settings_lowers_the_loss(trained: Any) -> None:
    import bitsandbytes as bnb

    model = qlora_model(trained, trained.output_dir / "adapter")
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    state = q_proj.weight.quant_state
    assert state.quant_type == "nf4" and state.nested, "nf4 with double quantization"
    assert q_proj.compute_dtype == __import__("torch").bfloat16
    before = eval_loss(qlora_model(trained, None), trained)
    after = eval_loss(model, trained)
    logging.getLogger(__name__).info("fixture loss %.3f → %.3f", before, after)
    assert after < before - 1.0


def test_resume_continues_from_the_checkpoint(tiny_base: Path, data_file: Path, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Stopped after 10 steps and resumed to 20, the adapter equals a straight 20-step run."""
    from safetensors.torch import load_file

    from training.train import train

    straight = train(tiny_config(tiny_base, data_file, tmp_path / "straight", max_steps=20, save_steps=10), resume=False)
    interrupted = tiny_config(tiny_base, data_file, tmp_path / "resumed", max_steps=10, save_steps=10)
    train(interrupted, resume=False)
    with caplog.at_level(logging.INFO, logger="training.train"):
        resumed = train(replace(interrupted, train=replace(interrupted.train, max_steps=20)))
    assert "resuming from" in caplog.text and "checkpoint-10" in caplog.text
    state = json.loads((tmp_path / "resumed" / "checkpoint-20" / "trainer_state.json").read_text())
    assert state["global_step"] == 20
    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key].float() - b[key].float()).abs().max() < 1e-3, key


def test_merge_equals_peft_merge(trained: Any, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from training.merge import merge_adapter

    out = merge_adapter(Path(trained.base_model), trained.output_dir / "adapter", tmp_path / "merged", "bf16")
    ours = load_file(out / "model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(trained.base_model, dtype=torch.bfloat16)
    reference = PeftModel.from_pretrained(base, trained.output_dir / "adapter").merge_and_unload().state_dict()
    assert set(ours) == set(reference)
    changed = 0
    for name, tensor in reference.items():
        assert ours[name].dtype == tensor.dtype
        diff = (ours[name].float() - tensor.float()).abs().max()
        assert diff <= 2 ** -7 * tensor.float().abs().max() + 1e-6, name  # bf16 rounding
        changed += not torch.equal(ours[name], load_file(Path(trained.base_model) / "model.safetensors")[name])
    assert changed == 14  # 7 projections × 2 layers
    assert (out / "tokenizer.model").is_file() and (out / "config.json").is_file()


def test_nf4_merge_tracks_the_qlora_model_more_closely(trained: Any, tmp_path: Path) -> None:
    """The measurement behind the default `merge_into: nf4`."""
    import torch
    from transformers import AutoModelForCausalLM

    from training.config import ExportSpec
    from training.merge import merge_adapter

    target = eval_loss(qlora_model(trained, trained.output_dir / "adapter"), trained)
    gaps = {}
    for variant in ("bf16", "nf4"):
        merged = merge_adapter(Path(trained.base_model), trained.output_dir / "adapter", tmp_path / variant, variant)
        model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16)
        gaps[variant] = abs(eval_loss(model, trained) - target)
    logging.getLogger(__name__).info("loss gap to the QLoRA model: %s", gaps)
    assert gaps["nf4"] < gaps["bf16"]
    assert ExportSpec().merge_into == "nf4"


@pytest.fixture(scope="module")
def exported(trained: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from training.export import export_gguf, quantize
    from training.merge import merge_adapter

    root = tmp_path_factory.mktemp("export")
    merged = merge_adapter(Path(trained.base_model), trained.output_dir / "adapter", root / "merged")
    f16 = export_gguf(merged, root / "tiny.f16.gguf")
    return {"merged": merged, "F16": f16, **{q: quantize(f16, root / f"tiny.{q}.gguf", q) for q in ("Q8_0", "Q4_K_M")}}


PROBES = ["What colour is the sky?", "Add the numbers.\n\nTwo lines, then:\nthree", "  spaces  and\ttabs "]


def test_gguf_logits_and_token_ids_match_transformers(exported: dict[str, Path]) -> None:
    from training.export import check_export

    checks = check_export(exported["merged"], exported["F16"], PROBES)
    assert all(c.same_token_ids for c in checks), "llama.cpp tokenizes the Alpaca template like transformers"
    assert max(c.max_abs_logit_diff for c in checks) < 0.01  # f16 weights, f32 compute
    assert all(c.same_top_token for c in checks)


@pytest.mark.parametrize(("qtype", "tolerance"), [("Q8_0", 0.1), ("Q4_K_M", 0.5)])
def test_quantized_files_load_and_stay_close(exported: dict[str, Path], qtype: str, tolerance: float) -> None:
    from training.export import check_export

    path = exported[qtype]
    assert path.stat().st_size < exported["F16"].stat().st_size * (0.6 if qtype == "Q8_0" else 0.4)
    checks = check_export(exported["merged"], path, PROBES[:1])
    assert checks[0].same_token_ids and checks[0].max_abs_logit_diff < tolerance


async def test_the_bot_engine_answers_with_the_exported_model(exported: dict[str, Path]) -> None:
    engine = await LlamaEngine.start(LlamaConfig(exported["Q8_0"], n_ctx=512, n_gpu_layers=0))
    try:
        history = [Message("1", "Ann", record["instruction"]) for record in alpaca_records()[:1]]
        built = build_prompt(history, engine.count_tokens, n_ctx=512, max_new_tokens=16)
        generation = engine.submit(GenerationRequest(built.text, 16, built.stop, SamplingParams(temperature=0)))
        text = await generation.text()
        assert generation.stats.prompt_tokens == built.n_tokens and generation.stats.completion_tokens > 0
        assert isinstance(text, str)
    finally:
        await engine.close()


def test_one_command_runs_the_whole_chain(tiny_base: Path, tmp_path: Path) -> None:
    import yaml

    data = tmp_path / "alpaca.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in alpaca_records()))
    config = {
        "base_model": str(tiny_base), "datasets": [{"path": str(data)}],
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"output_dir": str(tmp_path / "run"), "seq_len": 128, "max_steps": 4, "micro_batch_size": 4,
                  "gradient_accumulation_steps": 1, "optimizer": "adamw_torch", "packing": True,
                  "learning_rate": 1e-3, "gradient_checkpointing": True},
        "export": {"quantizations": ["Q4_K_M"], "probe_prompts": ["Hi.\nThere."]},
        # The eval stage finds the run's GGUFs itself, unquantized first.
        "eval": {"enabled": True, "tasks": ["local"], "limit": 5, "n_gpu_layers": 0, "n_ctx": 256},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "training.cli", "all", str(tmp_path / "tiny.yaml")],
                            capture_output=True, text=True, cwd=REPO, timeout=600, env=os.environ)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("MODEL_PATH=")]
    assert [Path(line.split("=", 1)[1]).name for line in lines] == ["run.f16.gguf", "run.Q4_K_M.gguf"]
    assert all(Path(line.split("=", 1)[1]).is_file() for line in lines)
    table = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert table["models"] == ["run.f16.gguf", "run.Q4_K_M.gguf"]
    assert {(r["task"], r["metric"]) for r in table["rows"]} >= {("hermes_local_mc", "acc"), ("hermes_local_gen", "exact_match")}


def test_eval_on_the_tiny_trained_model_writes_the_table(exported: dict[str, Path], tmp_path: Path) -> None:
    from training.cli import main

    files = [str(exported[q]) for q in ("F16", "Q8_0", "Q4_K_M")]
    assert main(["eval", "--compare", *files, "--tasks", "local", "--limit", "20", "--out", str(tmp_path),
                 "--n-gpu-layers", "0"]) == 0
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["models"] == ["tiny.f16.gguf", "tiny.Q8_0.gguf", "tiny.Q4_K_M.gguf"]
    accs = [r["values"] for r in data["rows"] if (r["task"], r["metric"]) == ("hermes_local_mc", "acc")][0]
    assert all(0 <= v["value"] <= 1 for v in accs.values())
    assert "Δ vs tiny.f16.gguf" in (tmp_path / "eval.md").read_text()
