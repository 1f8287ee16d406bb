"""`hermes-train`: each stage of the pipeline, or all of them, from one YAML config.

    hermes-train data     CONFIG   tokenize and cache the data; print the counts
    hermes-train train    CONFIG   QLoRA (resumes from the last checkpoint; --fresh to restart)
    hermes-train merge    CONFIG   adapter + base → merged safetensors (shard by shard)
    hermes-train export   CONFIG   merged → GGUF (f16/bf16) → quantized GGUFs, then check them
    hermes-train all      CONFIG   every stage above, in order (and eval, when `eval.enabled`)
    hermes-train eval     CONFIG   lm-evaluation-harness on the run's GGUFs: a table beside the model card's
    hermes-train eval --compare f16.gguf q8_0.gguf q4_k_m.gguf [--tasks gpt4all]   any files, side by side
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
STAGES = ("data", "train", "merge", "export", "all", "eval", "upload")


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


def run_eval(config: TrainConfig | None, args: argparse.Namespace) -> int:
    """The eval stage: the run's GGUFs (unquantized first, so each quantization's column shows
    its loss), the merged model first with `--hf`; or the files of `--compare`."""
    from training.evaluate import EvalError, run

    spec = config.eval if config is not None else None
    tasks = args.tasks.split(",") if args.tasks else (spec.tasks if spec else ["gpt4all"])
    limit = args.limit if args.limit is not None else (spec.limit if spec else None)
    n_gpu_layers = args.n_gpu_layers if args.n_gpu_layers is not None else (spec.n_gpu_layers if spec else -1)
    if args.compare:
        models = [str(m) for m in args.compare]
        out = args.out or Path("eval")
    elif config is not None:
        p = paths(config)
        stem = config.output_dir.name
        order = [config.export.outtype, *config.export.quantizations]
        models = [str(p["gguf"] / f"{stem}.{q}.gguf") for q in order if (p["gguf"] / f"{stem}.{q}.gguf").is_file()]
        if not models:
            print(f"error: no GGUF in {p['gguf']}: run `hermes-train export` first", file=sys.stderr)
            return 2
        if args.hf or (spec is not None and spec.hf):
            models.insert(0, str(p["merged"]))
        out = args.out or config.output_dir / "eval"
    else:
        print("error: hermes-train eval needs a CONFIG or --compare FILE...", file=sys.stderr)
        return 2
    missing = [m for m in models if not Path(m).exists()]
    if missing:
        print(f"error: not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        print(f"table written to {run(models, tasks, out, limit, spec.n_ctx if spec else 2048, n_gpu_layers)}")
    except EvalError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def resolve_base(base_model: str) -> Path:
    """A local folder as is; a hub id downloaded (safetensors, config, tokenizer) once."""
    if Path(base_model).is_dir():
        return Path(base_model)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(base_model, allow_patterns=["*.safetensors", "*.json", "tokenizer.model"]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hermes-train", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("config", type=Path, nargs="?",
                        help="YAML recipe, e.g. training/configs/hermes-llama2-70b.yaml")
    parser.add_argument("--fresh", action="store_true", help="train from scratch even if checkpoints exist")
    evaluation = parser.add_argument_group("eval")
    evaluation.add_argument("--tasks", help="comma-separated suites (gpt4all, bigbench, agieval, local) or task names")
    evaluation.add_argument("--compare", nargs="+", type=Path, metavar="MODEL",
                            help="GGUF files (or merged model folders) side by side; the first is the reference")
    evaluation.add_argument("--limit", type=int, help="at most this many items per task (the table says partial)")
    evaluation.add_argument("--hf", action="store_true", help="also the merged model, with the harness's hf backend")
    evaluation.add_argument("--n-gpu-layers", type=int, help="as the bot's N_GPU_LAYERS (default: the config's, -1)")
    evaluation.add_argument("--out", type=Path, help="where eval.md and eval.json go (default: the run's eval/)")
    args = parser.parse_args(argv)
    rank, world = launched_ranks()
    where = f"[rank {rank}/{world}] " if world > 1 else ""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s")
    if args.stage == "eval" and args.config is None:
        return run_eval(None, args)
    if args.config is None:
        parser.error(f"hermes-train {args.stage} needs a CONFIG")
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
    if args.stage == "eval" or (args.stage == "all" and config.eval.enabled):
        log.info("stage eval")
        code = run_eval(config, args)
        if code:
            return code
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
