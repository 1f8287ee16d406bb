"""Two real processes on the CPU (torchrun, gloo): the pipeline is rank-correct.

`accelerate launch --cpu --num_processes 2` would start ONE process; `torchrun --nproc_per_node 2`
with ACCELERATE_USE_CPU=true starts two, which the Trainer's Accelerator joins over gloo.

FSDP: accelerate 1.15 does not shard on the CPU — it sets `DistributedType.FSDP` only for GPU-like
multi-device types, never MULTI_CPU (accelerate/state.py), so the Trainer runs plain DDP there and
`training.model.uses_fsdp()` is False on the CPU. What FSDP depends on in our code is tested here
with torch's FSDP directly (FSDP1 runs on the CPU over gloo): the FSDP preparation of
`training.model` is flattened, sharded and trained across two processes with the wrap policy and
mixed precision that transformers installs for a peft model, the adapter is gathered whole, and
the old preparation (`prepare_model_for_kbit_training`) is refused by FSDP. Two CPU-only limits:
`sync_module_states` (used with cpu_ram_efficient_loading) needs GPU tensors, and the full state
dict is gathered here with `offload_to_cpu=False, rank0_only=False` (with accelerate's defaults,
offload and rank 0 only, torch fails on CPU tensors: "setStorage: … storage of size 0"). The
Trainer + accelerate FSDP path itself (FULL_STATE_DICT before `save_model`) needs GPUs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.training.conftest import alpaca_records

pytestmark = pytest.mark.training
REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 300


def recipe(base: Path, data: Path, out: Path, micro_batch_size: int) -> dict[str, Any]:
    return {
        "base_model": str(base), "datasets": [{"path": str(data), "weight": 3.0}],
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"output_dir": str(out), "seq_len": 128, "max_steps": 4, "micro_batch_size": micro_batch_size,
                  "gradient_accumulation_steps": 1, "optimizer": "adamw_torch", "packing": True,
                  "learning_rate": "1e-3", "lr_scheduler": "constant", "warmup_ratio": 0.0,
                  "gradient_checkpointing": True, "logging_steps": 1, "save_steps": 100},
        "export": {"quantizations": ["Q4_K_M"], "probe_prompts": ["Hi.\nThere."]},
    }


def write_recipe(path: Path, raw: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return path


def cpu_env() -> dict[str, str]:
    # One thread per process (torchrun's default for several workers): the two processes and
    # the one-process reference then compute alike, and 2 cores are not oversubscribed.
    return {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=TIMEOUT, env=cpu_env())


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mp-data") / "alpaca.json"
    path.write_text(json.dumps(alpaca_records()))
    return path


@pytest.fixture(scope="module")
def two_processes(tiny_base: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`all` under torchrun with 2 processes × micro-batch 2 (global batch 4)."""
    root = tmp_path_factory.mktemp("mp-two")
    config = write_recipe(root / "two.yaml", recipe(tiny_base, data, root / "run", micro_batch_size=2))
    started = time.perf_counter()
    result = torchrun("-m", "training.cli", "all", str(config))
    seconds = time.perf_counter() - started
    log = result.stdout + result.stderr
    (root / "torchrun.log").write_text(log)
    assert result.returncode == 0, log[-4000:]
    return {"out": root / "run", "log": log, "stdout": result.stdout, "seconds": seconds}


def lines(log: str, pattern: str) -> list[str]:
    return [line for line in log.splitlines() if re.search(pattern, line)]


def test_two_processes_run_the_whole_chain(two_processes: dict[str, Any]) -> None:
    out = two_processes["out"]
    paths = [line.split("=", 1)[1] for line in two_processes["stdout"].splitlines() if line.startswith("MODEL_PATH=")]
    assert [Path(p).name for p in paths] == ["run.f16.gguf", "run.Q4_K_M.gguf"]  # printed once, not per rank
    assert all(Path(p).is_file() for p in paths)
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "merged" / "model.safetensors").is_file()
    assert sorted(p.name for p in (out / "data").iterdir()) == [next((out / "data").iterdir()).name]  # one entry
    print(f"torchrun --nproc_per_node 2 … all: {two_processes['seconds']:.0f} s")


def test_each_stage_runs_where_it_belongs(two_processes: dict[str, Any]) -> None:
    log = two_processes["log"]
    # Training on both ranks; the data tokenized once, by rank 0, and read from its cache by rank 1.
    assert len(lines(log, r"\[rank 0/2\] training: stage train$")) == 1
    assert len(lines(log, r"\[rank 1/2\] training: stage train$")) == 1
    assert len(lines(log, r"\[rank 0/2\] training\.data: \d+ examples → \d+ rows")) == 1
    assert len(lines(log, r"training\.data: \d+ examples → ")) == 1
    assert len(lines(log, r"\[rank 1/2\] training\.data: using tokenized data cached")) == 1
    # The adapter saved once; merge, export and quantization once, on rank 0; rank 1 leaves cleanly.
    assert len(lines(log, r"adapter saved in")) == 1 and lines(log, r"\[rank 0/2\] .*adapter saved in")
    for stage in ("merge", "export"):
        assert len(lines(log, rf"training: stage {stage}$")) == 1
        assert len(lines(log, rf"\[rank 0/2\] training: stage {stage}$")) == 1
    assert len(lines(log, r"training\.merge: merged \d+ LoRA weights")) == 1
    assert len(lines(log, r"quantizing run\.f16\.gguf")) == 1
    assert len(lines(log, r"\[rank 1/2\] training: done; the main process runs any stage that follows")) == 1
    order = [i for i, line in enumerate(log.splitlines()) if "adapter saved in" in line or "[rank 1/2] training: done" in line]
    assert len(order) == 2 and "adapter saved in" in log.splitlines()[order[0]]  # rank 1 waited for the adapter


def test_adapter_matches_one_process_with_the_same_global_batch(
    two_processes: dict[str, Any], tiny_base: Path, data: Path, tmp_path: Path
) -> None:
    """1 process × micro-batch 4 and 2 processes × micro-batch 2 see the same rows per step and
    average the loss over the same tokens (transformers' average_tokens_across_devices): the
    adapters agree up to bf16 rounding, which Adam's first steps (≈ lr·sign(g)) amplify for
    near-zero gradients. Measured: ≤ 1.5% (LoRA B, trained from zero) and ≤ 0.2% (A, random
    init); a 1-process run with global batch 2 instead differs by 40% and 5%."""
    from safetensors.torch import load_file

    config = write_recipe(tmp_path / "one.yaml", recipe(tiny_base, data, tmp_path / "run", micro_batch_size=4))
    result = subprocess.run([sys.executable, "-m", "training.cli", "train", str(config)], capture_output=True,
                            text=True, cwd=REPO, timeout=TIMEOUT, env=cpu_env())
    assert result.returncode == 0, result.stderr[-3000:]
    one = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    two = load_file(two_processes["out"] / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys() and len(one) == 28  # A and B × 7 projections × 2 layers
    worst = {"lora_A": 0.0, "lora_B": 0.0}
    for key, tensor in one.items():
        reference = tensor.float()
        relative = float((two[key].float() - reference).norm() / reference.norm())
        kind = "lora_A" if "lora_A" in key else "lora_B"
        worst[kind] = max(worst[kind], relative)
    print(f"adapter, 2 processes vs 1: worst relative difference {worst}")
    assert worst["lora_B"] < 0.05 and worst["lora_A"] < 0.01, worst


def test_fsdp_preparation_has_one_dtype(tiny_base: Path, data: Path, tmp_path: Path) -> None:
    """FSDP flattens only tensors of one dtype: the FSDP preparation keeps every parameter,
    LoRA included, in quant.quant_storage; the DDP one upcasts norms, embeddings and adapters."""
    import torch

    from training.config import config_from_dict
    from training.model import load_qlora_model

    config = config_from_dict(recipe(tiny_base, data, tmp_path, micro_batch_size=2))
    fsdp = load_qlora_model(config, fsdp=True)
    assert {p.dtype for p in fsdp.parameters()} == {torch.bfloat16}
    assert fsdp.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.quant_storage == torch.bfloat16
    ddp = load_qlora_model(config, fsdp=False)
    assert {p.dtype for p in ddp.parameters()} == {torch.bfloat16, torch.float32}


def test_fsdp_qlora_shards_trains_and_gathers_the_adapter_on_cpu(tiny_base: Path, data: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = write_recipe(tmp_path / "fsdp.yaml", recipe(tiny_base, data, tmp_path / "run", micro_batch_size=2))
    result = torchrun("-m", "tests.training.test_multiprocess", "fsdp-worker", str(config), str(tmp_path / "fsdp"))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    reports = [json.loads((tmp_path / "fsdp" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert "Must flatten tensors with uniform dtype" in report["kbit_prepared"]  # the old preset's failure
        assert report["dtypes"] == ["torch.bfloat16"]
        assert report["fsdp_units"] > 14  # the root, 2 decoder layers, every LoRA A and B on its own
        assert report["sharded_numel"] < report["full_numel"]  # each rank holds about half
        losses = report["losses"]
        assert all(loss == loss for loss in losses) and losses[-1] < losses[0]
        # Every LoRA tensor found, in the final adapter and in a checkpoint's (peft 0.21 alone finds
        # none under nested FSDP units: training.model.patch_peft_for_fsdp).
        assert report["expected_tensors"] == 28
        assert report["adapter_tensors"] == report["checkpoint_tensors"] == 28
    print(f"FSDP on CPU: {reports[0]}")
    assert reports[0]["adapter_digest"] == reports[1]["adapter_digest"]  # the same gathered adapter
    adapter = tmp_path / "fsdp" / "adapter"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), adapter)
    b = model.base_model.model.model.layers[1].mlp.down_proj.lora_B["default"].weight
    assert float(b.abs().max()) > 0  # trained, not the zero initialisation


def fsdp_worker(recipe_path: str, out: str) -> None:
    """One rank of the FSDP test (run under torchrun): writes out/rankN.json and, on rank 0, the
    gathered adapter in out/adapter, as Trainer.save_model does (PeftModel.save_pretrained with
    the full state dict)."""
    import hashlib

    import torch
    import torch.distributed as dist
    from peft import get_peft_model_state_dict
    from peft.tuners import tuners_utils
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullStateDictConfig, MixedPrecision, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers import DataCollatorForSeq2Seq

    from training.config import load_config
    from training.data import prepare_dataset
    from training.model import dtype, load_qlora_model, load_tokenizer, lora_tensor_count
    from training.train import check_adapter

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = load_config(recipe_path)
    storage = dtype(config.quant.quant_storage)
    cpu = torch.device("cpu")
    report: dict[str, Any] = {}

    legacy = load_qlora_model(config, fsdp=False)
    try:
        FSDP(legacy, auto_wrap_policy=fsdp_auto_wrap_policy(legacy), device_id=cpu, use_orig_params=False)
        report["kbit_prepared"] = "wrapped"
    except ValueError as error:
        report["kbit_prepared"] = str(error)
    del legacy

    unpatched = tuners_utils._get_tuner_state_dict_key_prefixes
    torch.manual_seed(config.train.seed)
    model = load_qlora_model(config, fsdp=True)  # also applies training.model.patch_peft_for_fsdp
    report["dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    report["full_numel"] = sum(p.numel() for p in model.parameters())
    report["expected_tensors"] = lora_tensor_count(model)
    # What transformers' update_fsdp_plugin_peft installs for a peft model in 4-bit.
    wrapped = FSDP(
        model, auto_wrap_policy=fsdp_auto_wrap_policy(model), device_id=cpu, use_orig_params=False,
        mixed_precision=MixedPrecision(param_dtype=storage, reduce_dtype=storage, buffer_dtype=storage),
    )
    report["fsdp_units"] = sum(isinstance(m, FSDP) for m in wrapped.modules())
    report["sharded_numel"] = sum(p.numel() for p in wrapped.parameters())
    tokenizer = load_tokenizer(config.base_model)
    if rank == 0:
        prepare_dataset(config, tokenizer)
    dist.barrier()
    dataset, _ = prepare_dataset(config, tokenizer)
    rows = [dataset[i] for i in range(rank, len(dataset), world)][: config.train.micro_batch_size]
    batch = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)(rows)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=config.train.learning_rate)
    losses = []
    for _ in range(3):
        loss = wrapped(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    report["losses"] = losses
    # A checkpoint's adapter (accelerate's save_fsdp_model, adapter_only, SHARDED_STATE_DICT).
    with FSDP.state_dict_type(wrapped, StateDictType.SHARDED_STATE_DICT):
        report["checkpoint_tensors"] = len(get_peft_model_state_dict(wrapped))
    # The final adapter: FULL_STATE_DICT. (On the CPU without offload_to_cpu / rank0_only, see above.)
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT,
                              FullStateDictConfig(offload_to_cpu=False, rank0_only=False)):
        full = wrapped.state_dict()
    adapter = get_peft_model_state_dict(model, state_dict=full)
    report["adapter_tensors"] = len(adapter)
    patched, tuners_utils._get_tuner_state_dict_key_prefixes = tuners_utils._get_tuner_state_dict_key_prefixes, unpatched
    report["adapter_tensors_unpatched_peft"] = len(get_peft_model_state_dict(model, state_dict=full))
    tuners_utils._get_tuner_state_dict_key_prefixes = patched
    digest = hashlib.sha256()
    for key in sorted(adapter):
        digest.update(key.encode() + adapter[key].float().numpy().tobytes())
    report["adapter_digest"] = digest.hexdigest()
    Path(out).mkdir(parents=True, exist_ok=True)
    if rank == 0:
        model.save_pretrained(Path(out) / "adapter", state_dict=full)
        check_adapter(Path(out) / "adapter", report["expected_tensors"])
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__" and sys.argv[1:2] == ["fsdp-worker"]:
    fsdp_worker(*sys.argv[2:4])
