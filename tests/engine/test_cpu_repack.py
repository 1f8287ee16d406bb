"""CPU weight repacking is off unless asked for, in every place the project loads llama.cpp
(`bot.engine.repack`): on Intel CPUs with AMX, llama.cpp's repacked kernels die of SIGILL.

Each entry point loads the small real GGUF in a process of its own and completes a few
tokens after a prompt of a few hundred (`tests/repack_probe.py`), so a SIGILL fails the test
that met it, with the signal and the process's last lines, instead of killing pytest. On an
AMX host, `LLAMA_REPACK=true pytest tests/engine/test_cpu_repack.py` turns the mechanism off and
these tests fail; on other hosts they pass either way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.engine import repack
from tests import crashes
from tests.llama_server import LlamaServer, llama_server_bin, post_json, tool_binary  # noqa: F401 - fixture
from tests.repack_probe import ENTRIES, PROMPT

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.llama


def run_isolated(command: list[str], timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    """Run `command`; a crash fails the test naming its signal and its last output lines."""
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        pytest.fail(f"{' '.join(command[:4])} {crashes.describe_exit(done.returncode)} "
                    f"(CPU weight repacking {'on' if repack.from_environment() else 'off'}; "
                    f"this CPU has AMX: {repack.has_amx()}):\n{tail}")
    return done


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_each_entry_point_completes_on_this_cpu(entry: str, gguf_path: Path) -> None:
    done = run_isolated([sys.executable, "-m", "tests.repack_probe", entry, str(gguf_path)])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["entry"] == entry
    assert result["repack"] is repack.from_environment(), "the entry point follows LLAMA_REPACK"
    assert result["text"], "it completed some tokens"


def test_llama_server_as_started_by_the_tests_and_the_readme_answers(gguf_path: Path, llama_server_bin: Path) -> None:
    server = LlamaServer(gguf_path, binary=llama_server_bin, parallel=1, ctx_per_slot=1024, threads=2)
    assert ("--no-repack" in server.command()) is not repack.from_environment()
    with server:
        body = post_json(f"{server.url}/completion", {"prompt": PROMPT, "n_predict": 4, "temperature": 0})
        crashes.check()
    assert isinstance(body, dict) and body["content"], body


def test_llama_bench_prompt_processing_with_the_readmes_flags(gguf_path: Path) -> None:
    """llama-bench with repacking died of SIGILL on prompt processing (-p 64) on the AMX host."""
    binary = tool_binary("llama-bench", build=os.environ.get("HERMES_LLAMA_NO_BUILD") != "1")
    if binary is None:
        pytest.skip("llama-bench is not built and HERMES_LLAMA_NO_BUILD=1")
    done = run_isolated([str(binary), "-m", str(gguf_path), "-p", "64", "-n", "4", "-r", "1", "-t", "2",
                         "-o", "json", *repack.choose().bench_args()], timeout=600)
    rows = json.loads(done.stdout)
    assert {row["n_prompt"] for row in rows} == {0, 64} and all(row["avg_ts"] > 0 for row in rows)
    assert all(bool(row["repack"]) is repack.from_environment() for row in rows)


def test_repacking_is_off_unless_the_setting_turns_it_on(gguf_path: Path) -> None:
    """The loader really builds llama.cpp's model with repacking as chosen, both ways."""
    for enabled in (False, True):
        llm = repack.open_llama(gguf_path, repack=enabled, n_ctx=64, vocab_only=True, verbose=False)
        try:
            assert bool(llm.model_params.use_extra_bufts) is enabled
        finally:
            llm.close()
    lib = pytest.importorskip("llama_cpp")
    assert repack.model_params(lib, False).use_extra_bufts is False
    assert lib.llama_model_default_params().use_extra_bufts is True, "llama.cpp's own default is left alone"


@pytest.mark.parametrize("enabled", [False, True])
def test_llama_cpp_repacks_weights_only_when_asked(enabled: bool, gguf_path: Path) -> None:
    """What llama.cpp itself reports while loading: a CPU_REPACK buffer only when asked for
    (on this CPU the small model's Q4_K tensors repack as q4_K_8x8; where none would, skip)."""
    code = ("import sys; from bot.engine.repack import open_llama; "
            f"open_llama(sys.argv[1], repack={enabled}, n_ctx=128, n_gpu_layers=0, verbose=True).close()")
    done = run_isolated([sys.executable, "-c", code, str(gguf_path)])
    repacked = "CPU_REPACK model buffer" in done.stderr
    if enabled and not repacked:
        pytest.skip("llama.cpp repacks none of this model's tensors on this CPU")
    assert repacked is enabled, done.stderr[-2000:]


def test_the_setting_and_its_reason(tmp_path: Path) -> None:
    assert repack.from_environment({}) is False
    assert repack.from_environment({"LLAMA_REPACK": " True "}) is True
    assert repack.from_environment({"LLAMA_REPACK": "0"}) is False
    with pytest.raises(ValueError, match="LLAMA_REPACK='maybe'"):
        repack.from_environment({"LLAMA_REPACK": "maybe"})
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile amx_int8\n")
    amx = repack.cpu_flags(cpuinfo)
    assert repack.has_amx(amx) and not repack.has_amx(frozenset({"avx2"}))
    assert repack.cpu_flags(tmp_path / "missing") == frozenset()
    off = repack.choose(False, amx)
    assert not off.enabled and "this CPU has AMX" in off.reason
    assert off.server_args() == ["--no-repack"] and off.bench_args() == ["--repack", "0"]
    on = repack.choose(True, frozenset())
    assert on.enabled and on.server_args() == ["--repack"] and on.bench_args() == ["--repack", "1"]
