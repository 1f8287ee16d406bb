"""`hermes-train eval`: lm-evaluation-harness, zero-shot, on the GGUFs the project made (the
files the bot serves, through training.eval_backend) and optionally the merged Hugging Face
model (the harness's own `hf` backend), written as one side-by-side table (Markdown and
JSON) next to the figures Nous-Hermes-Llama2-70b's model card publishes.

Suites name the card's task lists (`gpt4all`, `bigbench`, `agieval`) and this project's
offline task (`local`, training/eval_tasks); any harness task name works too. The hub
tasks download their datasets; where the hub is unreachable the run stops with a message
that names the task, not a traceback.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
LOCAL_TASKS = Path(__file__).parent / "eval_tasks"
SUITES: dict[str, list[str]] = {
    "gpt4all": ["arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande"],
    # The card's 18 BigBench rows as this harness names them: "causal_judgment", and the three
    # object counts of logical_deduction and of tracking_shuffled_objects as one task each.
    "bigbench": [f"bigbench_{name}_multiple_choice" for name in (
        "causal_judgment", "date_understanding", "disambiguation_qa", "geometric_shapes", "logical_deduction",
        "movie_recommendation", "navigate", "reasoning_about_colored_objects", "ruin_names",
        "salient_translation_error_detection", "snarks", "sports_understanding", "temporal_sequences",
        "tracking_shuffled_objects")],
    "agieval": [f"agieval_{name}" for name in (
        "aqua_rat", "logiqa_en", "lsat_ar", "lsat_lr", "lsat_rc", "sat_en", "sat_en_without_passage", "sat_math")],
    "local": ["hermes_local_mc", "hermes_local_gen"],
}
# Nous-Hermes-Llama2-70b's model card, as quoted in this project's issue 22 (the figures of
# the card's other BigBench and AGIEval rows are not copied here: they show as "—").
CARD: dict[tuple[str, str], float] = {
    ("arc_challenge", "acc"): 0.5734, ("arc_challenge", "acc_norm"): 0.6015,
    ("arc_easy", "acc"): 0.8422, ("arc_easy", "acc_norm"): 0.8253,
    ("boolq", "acc"): 0.8422,
    ("hellaswag", "acc"): 0.6519, ("hellaswag", "acc_norm"): 0.8363,
    ("openbookqa", "acc"): 0.3880, ("openbookqa", "acc_norm"): 0.5000,
    ("piqa", "acc"): 0.8313, ("piqa", "acc_norm"): 0.8351,
    ("winogrande", "acc"): 0.7751,
    ("bigbench_causal_judgment_multiple_choice", "acc"): 0.6579,
    ("bigbench_date_understanding_multiple_choice", "acc"): 0.7344,
}


class EvalError(RuntimeError):
    """An evaluation that cannot run (the message says why and what to do)."""


def expand(tasks: Sequence[str]) -> list[str]:
    """Suite names to their task lists; task names as they are; each once, in order."""
    out: list[str] = []
    for name in tasks:
        for task in SUITES.get(name, [name]):
            if task not in out:
                out.append(task)
    return out


@dataclass
class Column:
    """One evaluated model: its label and, per (task, metric), (value, stderr)."""

    label: str
    scores: dict[tuple[str, str], tuple[float, float | None]] = field(default_factory=dict)
    seconds: float = 0.0
    items: dict[str, int] = field(default_factory=dict)


def evaluate_model(model: str, tasks: list[str], limit: int | None, n_ctx: int = 2048,
                   n_gpu_layers: int = 0) -> Column:
    """Run the harness on one model: a .gguf through hermes-gguf, a folder through `hf`."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import training.eval_backend  # registers hermes-gguf

    path = Path(model)
    manager = TaskManager(include_path=str(LOCAL_TASKS))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise EvalError(f"unknown task(s) {', '.join(unknown)}: expected harness task names or the suites "
                        f"{', '.join(SUITES)}")
    if path.suffix == ".gguf":
        lm: Any = training.eval_backend.HermesGGUF(str(path), n_ctx=n_ctx, n_gpu_layers=n_gpu_layers)
        args: dict[str, Any] = {"model": lm}
    elif path.is_dir():
        lm, args = None, {"model": "hf", "model_args": {"pretrained": str(path), "dtype": "auto"}}
    else:
        raise EvalError(f"{model}: expected a .gguf file or a merged Hugging Face model folder")
    began = time.perf_counter()
    column = Column(_label(path))
    try:
        for task in tasks:  # one task at a time: a dataset that cannot load is named
            try:
                results = lm_eval.simple_evaluate(tasks=[task], num_fewshot=0, limit=limit, task_manager=manager,
                                                  log_samples=False, bootstrap_iters=1000, **args)
            except (ConnectionError, OSError) as error:
                raise EvalError(unreachable(task, error)) from None
            except Exception as error:
                if "hub" in str(error).lower() or "offline" in str(error).lower() or "connect" in str(error).lower():
                    raise EvalError(unreachable(task, error)) from None
                raise
            if results is not None:
                _collect(results, column)
    finally:
        if isinstance(lm, training.eval_backend.HermesGGUF):
            lm.close()
    column.seconds = time.perf_counter() - began
    return column


def unreachable(task: str, error: BaseException) -> str:
    return (f"task {task}: its dataset could not be loaded ({type(error).__name__}: {str(error)[:200]}). It comes "
            "from the Hugging Face hub, which is unreachable from here: run where the hub is reachable, or "
            "with HF_DATASETS_CACHE pointing at a cache that holds it; `--tasks local` runs offline")


def _label(path: Path) -> str:
    return path.name if path.suffix == ".gguf" else f"{path.name} (hf)"


def _collect(results: Any, column: Column) -> Column:
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr") or not isinstance(value, int | float) or metric in ("alias", "sample_len"):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            column.scores[(task, metric)] = (float(value), float(stderr) if isinstance(stderr, int | float) else None)
        column.items[task] = int(results.get("n-samples", {}).get(task, {}).get("effective", 0))
    return column


def table(columns: list[Column], limit: int | None) -> tuple[str, dict[str, Any]]:
    """The side-by-side table: a row per task and metric, a column per model (the
    difference to the first after each other), the card's figure last."""
    rows = sorted({key for c in columns for key in c.scores})
    head = ["task", "metric"]
    for i, c in enumerate(columns):
        head.append(c.label + (" (partial)" if limit else ""))
        if i:
            head.append(f"Δ vs {columns[0].label}")
    head.append("Nous-Hermes-Llama2-70b card")
    lines = []
    if limit:
        lines.append(f"**Partial: at most {limit} items per task (`--limit`); not comparable with the card.**\n")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    data: dict[str, Any] = {"limit": limit, "models": [c.label for c in columns], "rows": []}
    for task, metric in rows:
        cells, row = [task, metric], {"task": task, "metric": metric, "values": {}, "card": CARD.get((task, metric))}
        first = columns[0].scores.get((task, metric))
        for i, c in enumerate(columns):
            value = c.scores.get((task, metric))
            cells.append(_cell(value))
            row["values"][c.label] = {"value": value[0], "stderr": value[1]} if value else None
            if i:
                cells.append(f"{value[0] - first[0]:+.4f}" if value and first else "—")
        card = CARD.get((task, metric))
        cells.append(f"{card:.4f}" if card is not None else "—")
        lines.append("| " + " | ".join(cells) + " |")
        data["rows"].append(row)
    times = ", ".join(f"{c.label} {c.seconds:.1f} s" for c in columns)
    lines.append(f"\nZero-shot, lm-evaluation-harness; ± is the harness's stderr. Time: {times}.")
    return "\n".join(lines) + "\n", data


def _cell(value: tuple[float, float | None] | None) -> str:
    if value is None:
        return "—"
    score, stderr = value
    return f"{score:.4f} ± {stderr:.4f}" if stderr is not None and not math.isnan(stderr) else f"{score:.4f}"


def run(models: Sequence[str], tasks: Sequence[str], out_dir: Path, limit: int | None = None, n_ctx: int = 2048,
        n_gpu_layers: int = 0) -> Path:
    """Evaluate every model on the tasks; write eval.md and eval.json in `out_dir`."""
    names = expand(tasks)
    columns = [evaluate_model(m, names, limit, n_ctx, n_gpu_layers) for m in models]
    markdown, data = table(columns, limit)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.md").write_text(markdown)
    (out_dir / "eval.json").write_text(json.dumps(data, indent=2))
    print(markdown, flush=True)
    return out_dir / "eval.md"
