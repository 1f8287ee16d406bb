"""The pure helpers of benchmarks/gpu_check.py (the script itself is never run by the tests)."""

from __future__ import annotations

import json

from benchmarks.gpu_check import (
    SHAPES,
    checkpoint_bytes,
    cuda_arch,
    llama_tensors,
    markdown_table,
    parse_batched_bench,
    parse_engine,
    parse_llama_bench,
    shard_plan,
    spm_pieces,
    trimmed,
)


def test_llama_shapes_match_the_published_parameter_counts() -> None:
    assert checkpoint_bytes(SHAPES["7b"], 1) == 6_738_415_616  # Llama-2-7B
    assert checkpoint_bytes(SHAPES["70b"], 1) == 68_976_648_192  # Llama-2-70B (grouped-query attention)
    tensors = dict(llama_tensors(SHAPES["70b"]))
    assert len(tensors) == 2 + 80 * 9 + 1
    assert tensors["model.layers.79.self_attn.k_proj.weight"] == (1024, 8192)
    assert tensors["model.layers.0.mlp.down_proj.weight"] == (8192, 28672)
    assert tensors["lm_head.weight"] == (32000, 8192)


def test_shards_hold_every_tensor_once_in_order_within_the_limit() -> None:
    tensors = llama_tensors(SHAPES["7b"])
    limit = 2 << 30
    plan = shard_plan(tensors, limit)
    assert [t for shard in plan for t in shard] == tensors
    for shard in plan:
        size = sum(2 * d0 * (d1[0] if d1 else 1) for _, (d0, *d1) in shard)
        assert size <= limit or len(shard) == 1


def test_tokenizer_pieces_are_llama_like_and_distinct() -> None:
    pieces = spm_pieces()
    assert len(pieces) == 32000 == len({p for p, _, _ in pieces})
    assert pieces[:3] == [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    assert [p for p, _, kind in pieces if kind == 6] == [f"<0x{b:02X}>" for b in range(256)]
    scores = [score for _, score, kind in pieces if kind == 1]
    assert scores == sorted(scores, reverse=True)


def test_cuda_arch() -> None:
    assert (cuda_arch("9.0"), cuda_arch("8.6"), cuda_arch("10.0"), cuda_arch("[N/A]")) == ("90", "86", "100", "native")


def test_parsers_read_the_tools_outputs() -> None:
    bench = "log line\n" + json.dumps([
        {"n_prompt": 512, "n_gen": 0, "avg_ts": 9876.5, "stddev_ts": 12.0},
        {"n_prompt": 0, "n_gen": 128, "avg_ts": 151.25, "stddev_ts": 0.5},
    ])
    assert parse_llama_bench(bench) == [("pp512", 9876.5, 12.0), ("tg128", 151.25, 0.5)]
    batched = """main: n_kv_max = 4096
|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|   128 |     64 |    1 |    192 |    0.030 |  4266.67 |    0.512 |   125.00 |    0.542 |   354.24 |
|   128 |     64 |    8 |   1536 |    0.120 |  8533.33 |    0.800 |   640.00 |    0.920 |  1669.57 |
"""
    rows = parse_batched_bench(batched)
    assert [(r["B"], r["S_TG t/s"]) for r in rows] == [("1", "125.00"), ("8", "640.00")]
    engine = """model x.gguf, 64 new tokens per generation, slots 8, best of 3 runs
1. single stream: plain Llama tokens/s     150.2
   single stream: our engine tokens/s      148.0 (0.99x)
2. 1 conversations: aggregate tokens/s     148.0 vs 148.0 one after another (1.00x)
2. 8 conversations: aggregate tokens/s     900.1 vs 148.0 one after another (6.08x)
3. turn-10 time to first token, affinity   21 ms
   turn-10 time to first token, none       95 ms (0.22x)
4. worst event-loop delay, 8 generating    3.1 ms
"""
    figures = dict(parse_engine(engine))
    assert figures["8 conversations: aggregate tokens/s"].startswith("900.1 vs 148.0")
    assert figures["1 conversation: aggregate tokens/s"].startswith("148.0")
    assert figures["turn-10 TTFT, no affinity"] == "95 ms (0.22x)"
    assert figures["worst event-loop delay, 8 generating"] == "3.1 ms"


def test_packed_sources_keep_what_the_build_reads() -> None:
    assert not trimmed("vendor/llama.cpp/ggml/src/ggml-cuda/mmq.cu")
    assert not trimmed("vendor/llama.cpp/tools/llama-bench/llama-bench.cpp")
    assert not trimmed("llama_cpp/llama_cpp.py")
    assert trimmed("vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf")
    assert trimmed("vendor/llama.cpp/tools/ui/index.html") and trimmed("docs/index.md")


def test_markdown_table_escapes_cells() -> None:
    assert markdown_table(("a", "b"), [("x|y", "1\n2")]) == "| a | b |\n|---|---|\n| x\\|y | 1 2 |"


def test_engine_parser_reads_the_markdown_report_too() -> None:
    report = """model x.Q4_K_M.gguf, 64 new tokens per generation, 8 slots, n_gpu_layers -1
| measure                         | threads | our engine | llama.cpp                   | engine / llama.cpp |
|---------------------------------|---------|------------|-----------------------------|--------------------|
| 1 stream, tg64                  | 16      | 150.1      | llama-bench -d 0: 160.0     | 0.94x              |
| 8 conversations, aggregate tg64 | 16      | 900.0      | llama-batched-bench: 950.0  | 0.95x              |
| worst event-loop delay          | 16      | 3.0 ms     |                             |                    |
"""
    figures = parse_engine(report)
    assert figures[0] == ("setup", "model x.Q4_K_M.gguf, 64 new tokens per generation, 8 slots, n_gpu_layers -1")
    assert figures[2] == ("8 conversations, aggregate tg64 (16 threads)",
                          "our engine: 900.0; llama.cpp: llama-batched-bench: 950.0; engine / llama.cpp: 0.95x")
    assert figures[3] == ("worst event-loop delay (16 threads)", "our engine: 3.0 ms")
