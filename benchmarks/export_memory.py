"""Peak memory of the GGUF export for two model sizes: it must not grow with the model.

    python -m benchmarks.export_memory [--sizes 20,200] [--keep DIR]

Builds random Llamas with transformers (bf16 safetensors, several shards for the larger
one) and a tiny SentencePiece tokenizer, then exports each to an F16 GGUF
(`training.export.export_gguf`) in a fresh subprocess, which reports its peak resident set
(`VmHWM`, or `ru_maxrss` where there is no /proc) after its imports and after the export.
Prints one row per model: weights, GGUF size, peak RSS, what the export added to the peak
after the imports, and the time. Before the streaming export, the writer held every
converted tensor until the end, so the added peak grew with the model (≈ its F16 size).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# name → (hidden, intermediate, layers, heads, kv heads): ~20 MB and ~200 MB of bf16 weights.
SHAPES: dict[int, tuple[int, int, int, int, int]] = {
    20: (256, 688, 14, 4, 2),
    200: (1024, 2752, 9, 8, 4),
}

_CHILD = r"""
import json, resource, sys, time
from pathlib import Path


def peak_kib():
    # VmHWM is this address space's peak RSS, reset at exec; ru_maxrss is the fallback.
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


import gguf, numpy, sentencepiece, tqdm  # noqa: F401  (the export's imports, counted apart)
from training.export import export_gguf

before = peak_kib()
start = time.perf_counter()
export_gguf(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
print(json.dumps({"before_kib": before, "peak_kib": peak_kib(), "seconds": time.perf_counter() - start}))
"""


def make_tokenizer(folder: Path) -> Path:
    """A toy Llama-like SentencePiece model (byte fallback, identity normalization)."""
    import sentencepiece as spm

    from bot.core.prompt import alpaca_prompt

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    lines = [alpaca_prompt(f"Question number {n}: what is {n} plus {n}?") + f"It is {2 * n}." for n in range(100)]
    lines += ["The quick brown fox jumps over the lazy dog. Hello world, says Alice to Bob."] * 50
    corpus.write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=320, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, minloglevel=2,
    )
    return folder / "tokenizer.model"


def build_llama(folder: Path, size_mb: int, tokenizer_model: Path, shard: str = "50MB", seed: int = 0) -> Path:
    """A random Llama of about `size_mb` MB of bf16 weights (one of `SHAPES`), saved as
    safetensors shards with config and tokenizer.model."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, layers, heads, kv = SHAPES[size_mb]
    config = LlamaConfig(
        vocab_size=320, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=1024, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size=shard)
    del model
    shutil.copy(tokenizer_model, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": False,
    }))
    return folder


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def measure_export(model_dir: Path, out: Path, outtype: str = "f16") -> dict[str, Any]:
    """Export in a fresh subprocess; its peak RSS before and after the export, in bytes."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", _CHILD, str(model_dir), str(out), outtype],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"export subprocess failed:\n{result.stderr[-3000:]}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    return {
        "weights": weights_bytes(model_dir),
        "gguf": out.stat().st_size,
        "before": figures["before_kib"] * 1024,
        "peak": figures["peak_kib"] * 1024,
        "added": (figures["peak_kib"] - figures["before_kib"]) * 1024,
        "seconds": figures["seconds"],
    }


def run(sizes: list[int], root: Path) -> list[dict[str, Any]]:
    tokenizer = make_tokenizer(root / "tokenizer")
    rows = []
    for size in sizes:
        model = build_llama(root / f"llama-{size}mb", size, tokenizer)
        rows.append({"model": f"~{size} MB", **measure_export(model, root / f"llama-{size}mb.f16.gguf")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20,200", help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--keep", type=Path, help="build and keep the models here (default: a temp folder)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        rows = run(sizes, args.keep)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows = run(sizes, Path(tmp))
    mb = 1 << 20
    print(f"{'model':>8} {'weights':>10} {'GGUF':>10} {'peak RSS':>10} {'after imports':>14} {'export adds':>12} {'time':>7}")
    for r in rows:
        print(f"{r['model']:>8} {r['weights'] / mb:>8.1f}MB {r['gguf'] / mb:>8.1f}MB {r['peak'] / mb:>8.1f}MB "
              f"{r['before'] / mb:>12.1f}MB {r['added'] / mb:>10.1f}MB {r['seconds']:>6.2f}s")
    if len(rows) >= 2:
        grow, size = rows[-1]["peak"] - rows[0]["peak"], rows[-1]["weights"] - rows[0]["weights"]
        print(f"peak RSS grew by {grow / mb:.1f} MB for {size / mb:.1f} MB more weights ({grow / size:.1%})")


if __name__ == "__main__":
    main()
