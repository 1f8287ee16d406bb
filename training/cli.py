"""`hermes-train`: each stage of the pipeline, or all of them, from one YAML config.

    hermes-train data     CONFIG   tokenize and cache the data; print the counts
    hermes-train train    CONFIG   QLoRA (resumes from the last checkpoint; --fresh to restart)
    hermes-train merge    CONFIG   adapter + base → merged safetensors (shard by shard)
    hermes-train export   CONFIG   merged → GGUF (f16/bf16) → quantized GGUFs, then check them
    hermes-train all      CONFIG   every stage above, in order
    hermes-train upload   CONFIG   push the adapter and GGUFs to `hub_repo`

Multi-GPU: `accelerate launch --config_file training/configs/accelerate/ddp-8xh100.yaml
-m training.cli all CONFIG` (or `torchrun --nproc_per_node N -m training.cli …`). Under several
processes each stage runs where it belongs: `data` on the main process (the others wait);
`train` on every process (data tokenized once by the main process, the adapter saved once and
complete before anyone goes on); then every process meets at a barrier, leaves the process
group, and all but the main process exit with 0 — `merge`, `export` and `upload` run on the main
process alone. (They are not held in a collective: a 70B merge and export take longer than any
collective timeout.) Each log line names its rank, and each stage logs `stage NAME` where it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from training.config import ConfigError, TrainConfig, load_config

log = logging.getLogger("training")
STAGES = ("data", "train", "merge", "export", "all", "upload")


def paths(config: TrainConfig) -> dict[str, Path]:
    out = config.output_dir
    return {"adapter": out / "adapter", "merged": out / "merged", "gguf": out / "gguf"}


def launched_ranks() -> tuple[int, int]:
    """(rank, world size) as set by torchrun / accelerate launch; (0, 1) for a plain run."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def run_data(config: TrainConfig) -> None:
    from training.data import prepare_dataset
    from training.model import load_tokenizer

    _, stats = prepare_dataset(config, load_tokenizer(config.base_model))
    print(json.dumps(dataclasses.asdict(stats)), flush=True)


def leave_process_group(state: object) -> None:
    """Every process meets here (the adapter is complete), then leaves the process group."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState

    state.wait_for_everyone()  # type: ignore[attr-defined]
    if dist.is_initialized():
        dist.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)


def run_merge(config: TrainConfig) -> Path:
    from training.merge import merge_adapter

    base = resolve_base(config.base_model)
    p = paths(config)
    return merge_adapter(base, p["adapter"], p["merged"], config.export.merge_into, config.quant)


def run_export(config: TrainConfig) -> list[Path]:
    from training.export import ExportError, export_gguf, quantize, verify_exports

    p = paths(config)
    p["gguf"].mkdir(parents=True, exist_ok=True)
    stem = config.output_dir.name
    full = export_gguf(p["merged"], p["gguf"] / f"{stem}.{config.export.outtype}.gguf", config.export.outtype)
    outputs = [full]
    for qtype in config.export.quantizations:
        outputs.append(quantize(full, p["gguf"] / f"{stem}.{qtype}.gguf", qtype))
    if config.export.check:
        # The reference model is loaded once for every file; each must give the same token
        # ids, the same top token (F16) and logits within its quantization's tolerance.
        try:
            verify_exports(p["merged"], outputs, config.export.probe_prompts)
        except ExportError as error:
            raise SystemExit(f"error: {error}") from None
    print("\n".join(f"MODEL_PATH={path}" for path in outputs), flush=True)
    return outputs


def resolve_base(base_model: str) -> Path:
    """A local folder as is; a hub id downloaded (safetensors, config, tokenizer) once."""
    if Path(base_model).is_dir():
        return Path(base_model)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(base_model, allow_patterns=["*.safetensors", "*.json", "tokenizer.model"]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hermes-train", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("config", type=Path, help="YAML recipe, e.g. training/configs/hermes-llama2-70b.yaml")
    parser.add_argument("--fresh", action="store_true", help="train from scratch even if checkpoints exist")
    args = parser.parse_args(argv)
    rank, world = launched_ranks()
    where = f"[rank {rank}/{world}] " if world > 1 else ""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s")
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    state = None
    if world > 1:
        from training.train import distributed_state

        state = distributed_state(config)
    main_process = state is None or state.is_main_process
    if args.stage == "data" and main_process:
        log.info("stage data")
        run_data(config)
    if args.stage in ("train", "all"):
        from training.train import train

        log.info("stage train")
        train(config, resume=not args.fresh)
    if state is not None:
        leave_process_group(state)
        if not main_process:
            log.info("done; the main process runs any stage that follows")
            return 0
    if args.stage in ("merge", "all"):
        log.info("stage merge")
        run_merge(config)
    if args.stage in ("export", "all"):
        log.info("stage export")
        run_export(config)
    if args.stage == "upload":
        log.info("stage upload")
        if not config.hub_repo:
            print("error: set hub_repo in the config to upload", file=sys.stderr)
            return 2
        from training.hub import upload

        p = paths(config)
        print(upload([p["adapter"], *sorted(p["gguf"].glob("*.gguf"))], config.hub_repo))
    return 0


if __name__ == "__main__":
    sys.exit(main())
