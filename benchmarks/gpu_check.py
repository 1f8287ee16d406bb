"""GPU evidence in one run: engine, llama-bench and QLoRA figures on an H100/H200 (issue #11 item 6).

    python -m benchmarks.gpu_check [--out DIR] [--budget-s 570] [--also-70b]
    python -m benchmarks.gpu_check --tiny        # every step on tiny shapes, on this CPU machine

Never in CI: nothing here is collected by pytest (tests/engine/test_gpu_check.py checks only the pure
helpers). Nothing is downloaded: every input is written by the script or found on the machine.

Steps (each with its own time budget, inside the whole run's `--budget-s`; a step that cannot
run says why in the table and the others go on):

1. Device: the GPU's name, memory and driver (nvidia-smi, else torch), else the CPU's model;
   which Python modules the steps need are missing.
2. llama.cpp sources: the llama-cpp-python 0.3.36 sdist (its vendored llama.cpp and its
   `llama_cpp` package), from `LLAMA_CPP_SDIST` (a .tar.gz, or an unpacked folder), else from
   pip's cache. `--pack-sources FILE` writes a trimmed copy (about 15 MB: no models, docs or
   tests) small enough to carry to a device machine. If the Python packages `llama_cpp` or
   `gguf` are not installed, the ones in the sources are used (`diskcache`, which `llama_cpp`
   imports and never uses here, is shimmed if missing).
3. Build, in the background while step 4 runs: with `nvcc`, llama.cpp with CUDA for this GPU's
   architecture (shared libraries the `llama_cpp` bindings load through `LLAMA_CPP_LIB_PATH`, plus
   `llama-bench` and `llama-batched-bench`, one build); without `nvcc` the CUDA build is skipped
   and said so, and a CPU `llama-bench` is built only when none is found (`LLAMA_BIN_DIR`, PATH).
   `LLAMA_CPP_LIB_PATH` already set: that build is used and none is made. `--tiny` only
   configures (the compile would take far longer than the tiny run).
4. Model: a Llama-2-7B-shaped checkpoint (32 layers, hidden 4096, 32000-token vocabulary) with
   random bf16 weights, written tensor by tensor into safetensors shards with Hugging Face's names
   and shapes (never built in transformers), a SentencePiece tokenizer.model of 32000 pieces made
   directly (byte fallback, identity normalization); then the project's exporter
   (`training.export.export_gguf`, F16) and quantizer (`training.export.quantize`, Q4_K_M,
   through llama.cpp's `llama_model_quantize` of the library step 3 built). `--also-70b` does
   the same for the 70B shape when the disk and the time left allow it (a 70B needs about
   138 GB for its safetensors and as much for the F16 GGUF: not on a 64 GB disk).
5. QLoRA throughput: `benchmarks/qlora_throughput.py` (the trainer's own `load_qlora_model`:
   NF4, double quantization, bf16, LoRA r=64, gradient checkpointing) on 4096-token rows, by
   default 8 layers of Llama-2-70B's shape (`--qlora-shape 7b`: all of Llama-2-7B). On a GPU it
   runs while step 3-4 keep the CPU busy (`--serial` to run it alone, if time allows).
6. Engine: `benchmarks/engine.py` on the Q4_K_M file, all layers on the GPU (single stream,
   1/2/4/8 conversations at once, turn-10 time to first token, event-loop delay), run as a
   subprocess through its command line.
   Then `benchmarks/speculative.py` on the same file (prompt lookup with and without; random
   weights, so the figure is the cost of verifying drafts on the GPU).
7. llama.cpp's own tools on the same file: `llama-bench` (pp512, tg128) and
   `llama-batched-bench` (1 and 8 sequences).
8. One markdown table with every figure and the device, printed and written to
   `OUT/gpu_check.md`, with every step's output in `OUT/gpu_check.log`.

On a lent device machine (no network; its python3 has torch, transformers, peft, safetensors,
sentencepiece, protobuf, cmake, ninja, but not bitsandbytes, pydantic, gguf, llama-cpp-python):
write the trimmed sources here with `--pack-sources .gpu/llama-src.tar.gz`, put cp312 wheels of
pydantic, pydantic-core, annotated-types, typing-inspection, pyyaml (if missing) and bitsandbytes
in `.whl` (see the device notes), carry both, and run
`LLAMA_CPP_SDIST=.gpu/llama-src.tar.gz python3 -m benchmarks.gpu_check --out $OUT`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# CPU weight repacking off for llama.cpp's tools, as everywhere (bot.engine.repack): its AMX
# kernels crash with SIGILL on the Xeons of most H100 servers. This script runs on bare
# machines before the project is installed, so the flags are spelled out here.
REPACK_OFF = {"llama-bench": ["--repack", "0"], "common": ["--no-repack"]}

REPO = Path(__file__).resolve().parents[1]
SDIST_PREFIX = "llama_cpp_python-0.3.36"
VOCAB = 32000
SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"hidden": 256, "intermediate": 512, "layers": 2, "heads": 4, "kv_heads": 2, "ctx": 2048},
    "7b": {"hidden": 4096, "intermediate": 11008, "layers": 32, "heads": 32, "kv_heads": 32, "ctx": 4096},
    "70b": {"hidden": 8192, "intermediate": 28672, "layers": 80, "heads": 64, "kv_heads": 8, "ctx": 4096},
}
# Left out of the packed sources: what a build with tests, examples and the server off never reads.
TRIM = ("models", "docs", "tests", "examples", "pocs", "benches", "media", ".github", ".devops", "ci",
        "skills", "tools/ui", "tools/server/public", "tools/server/webui", "gguf-py/tests")
# Python modules each step needs (top-level names).
NEEDS = {
    "model": ("torch", "safetensors", "sentencepiece", "google.protobuf", "numpy", "gguf", "tqdm", "pydantic", "yaml"),
    "quantize": ("llama_cpp", "pydantic", "yaml"),
    "engine": ("llama_cpp", "numpy"),
    "qlora": ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "pydantic", "yaml"),
}


# --- Pure helpers (tests/engine/test_gpu_check.py) -----------------------------------------------------

def llama_tensors(shape: dict[str, int], vocab: int = VOCAB) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors of a Hugging Face Llama checkpoint of this shape: names and shapes, in order."""
    h, inter, heads, kv = shape["hidden"], shape["intermediate"], shape["heads"], shape["kv_heads"]
    kv_dim = h // heads * kv
    tensors: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(shape["layers"]):
        p = f"model.layers.{i}."
        tensors += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv_dim, h)),
            (p + "self_attn.v_proj.weight", (kv_dim, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
        ]
    tensors += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    return tensors


def n_elements(dims: Sequence[int]) -> int:
    total = 1
    for d in dims:
        total *= d
    return total


def checkpoint_bytes(shape: dict[str, int], bytes_per_weight: int = 2, vocab: int = VOCAB) -> int:
    return sum(n_elements(s) for _, s in llama_tensors(shape, vocab)) * bytes_per_weight


def shard_plan(tensors: Sequence[tuple[str, tuple[int, ...]]], max_bytes: int,
               bytes_per_weight: int = 2) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors split into shards of at most `max_bytes` (a bigger tensor gets a shard alone)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in tensors:
        nbytes = n_elements(dims) * bytes_per_weight
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    return shards


def hf_config(shape: dict[str, int], vocab: int = VOCAB) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": shape["hidden"], "intermediate_size": shape["intermediate"],
        "num_hidden_layers": shape["layers"], "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv_heads"], "max_position_embeddings": shape["ctx"],
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "bos_token_id": 1,
        "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "dtype": "bfloat16",
    }


def spm_pieces(vocab: int = VOCAB) -> list[tuple[str, float, int]]:
    """(piece, score, type) of a Llama-like SentencePiece vocabulary of exactly `vocab` pieces:
    <unk>, <s>, </s>, the 256 byte pieces, then normal pieces (characters, '▁'-words, pairs,
    triples) with falling scores. Types are SentencePiece's: 1 normal, 2 unknown, 3 control, 6 byte."""
    import string

    pieces: list[tuple[str, float, int]] = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    pieces += [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    lower = string.ascii_lowercase

    def normal() -> Iterable[str]:
        yield "▁"
        yield from chars
        yield from ("▁" + c for c in chars)
        yield from (a + b for a in lower for b in lower)
        yield from ("▁" + a + b for a in lower for b in lower)
        yield from (a + b + c for a in lower for b in lower for c in lower)
        yield from ("▁" + a + b + c for a in lower for b in lower for c in lower)
        yield from (a + b for a in chars for b in chars if not (a in lower and b in lower))

    seen = {p for p, _, _ in pieces}
    for piece in normal():
        if len(pieces) >= vocab:
            break
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, -float(len(pieces)), 1))
    if len(pieces) < vocab:
        raise ValueError(f"cannot make {vocab} distinct pieces")
    return pieces


def cuda_arch(compute_cap: str) -> str:
    """nvidia-smi's compute capability ("9.0") as CMake's CUDA architecture ("90")."""
    major, _, minor = compute_cap.strip().partition(".")
    return f"{int(major)}{int(minor or 0)}" if major.strip().isdigit() else "native"


def parse_llama_bench(text: str) -> list[tuple[str, float, float]]:
    """(test, tokens/s, stddev) from `llama-bench -o json`: "pp512", "tg128"."""
    start = text.find("[")
    rows = json.loads(text[start:]) if start >= 0 else []
    out = []
    for row in rows:
        n_prompt, n_gen = int(row.get("n_prompt", 0)), int(row.get("n_gen", 0))
        test = f"pp{n_prompt}" if n_gen == 0 else f"tg{n_gen}" if n_prompt == 0 else f"pp{n_prompt}+tg{n_gen}"
        out.append((test, float(row["avg_ts"]), float(row.get("stddev_ts", 0.0))))
    return out


def markdown_rows(text: str, is_header: Callable[[list[str]], bool]) -> list[dict[str, str]]:
    """The rows of the first markdown table in `text` whose header `is_header` accepts, as
    {column: value} (the separator line skipped)."""
    header: list[str] | None = None
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and "] |" in line:  # a line of gpu_check's own log
            line = line.split("] ", 1)[1]
        if not line.startswith("|"):
            if header is not None and rows:
                break
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            if is_header(cells):
                header = cells
            continue
        if all(set(c) <= set("-: ") for c in cells):
            continue
        if len(cells) == len(header):
            rows.append(dict(zip(header, cells, strict=True)))
    return rows


def parse_batched_bench(text: str) -> list[dict[str, str]]:
    """The rows of `llama-batched-bench`'s markdown table as {column: value}."""
    return markdown_rows(text, lambda cells: "B" in cells and any("S_TG" in c for c in cells))


ENGINE_ROWS = (
    ("single stream: plain Llama tokens/s", r"single stream: plain Llama tokens/s\s+(.+)"),
    ("single stream: our engine tokens/s", r"single stream: our engine tokens/s\s+(.+)"),
    ("1 conversation: aggregate tokens/s", r"\b1 conversations?: aggregate tokens/s\s+(.+)"),
    ("8 conversations: aggregate tokens/s", r"\b8 conversations?: aggregate tokens/s\s+(.+)"),
    ("turn-10 TTFT, affinity", r"turn-10 time to first token, affinity\s+(.+)"),
    ("turn-10 TTFT, no affinity", r"turn-10 time to first token, none\s+(.+)"),
    ("worst event-loop delay, 8 generating", r"worst event-loop delay, \d+ generating\s+(.+)"),
)


def parse_engine(text: str) -> list[tuple[str, str]]:
    """The figures of `benchmarks/engine.py`'s output: every row of its markdown table (a
    `measure` column first), else the lines of its older plain-text report."""
    table = markdown_rows(text, lambda cells: bool(cells) and cells[0].lower() == "measure")
    if table:
        setup = next((line.strip() for line in text.splitlines() if line.startswith("model ")), None)
        found = [("setup", setup)] if setup else []
        for row in table:
            cells = list(row.items())
            label = cells[0][1]
            rest = cells[1:]
            if rest and rest[0][0].lower() == "threads":
                label += f" ({rest[0][1]} threads)" if rest[0][1] else ""
                rest = rest[1:]
            found.append((label, "; ".join(f"{k}: {v}" for k, v in rest if v)))
        return found
    found = []
    for label, pattern in ENGINE_ROWS:
        match = re.search(pattern, text)
        if match:
            found.append((label, match.group(1).strip()))
    return found


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    def cell(value: str) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def trimmed(member: str, prefix: str = "") -> bool:
    """Whether a path of the sdist (relative to its root) is left out of the packed sources."""
    path = member[len(prefix):] if prefix and member.startswith(prefix) else member
    if not path.startswith("vendor/llama.cpp/"):
        return not (path.startswith("llama_cpp/") or path in {"pyproject.toml", "LICENSE.md", "CMakeLists.txt"}
                    or path.startswith("vendor/"))
    inner = path[len("vendor/llama.cpp/"):]
    return any(inner == t or inner.startswith(t + "/") for t in TRIM)


# --- The run --------------------------------------------------------------------------------

@dataclass
class Report:
    device: str = "unknown"
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (step, figure, value)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, step: str, figure: str, value: str) -> None:
        with self.lock:
            self.rows.append((step, figure, value))
        say(f"[{step}] {figure}: {value}")


STARTED = time.monotonic()
_PATH_LOCK = threading.Lock()
_LOG_LOCK = threading.Lock()


def say(text: str) -> None:
    print(f"{time.monotonic() - STARTED:6.0f}s  {text}", flush=True)


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tiny: bool = args.tiny
        self.deadline = STARTED + args.budget_s
        self.work = Path(args.workdir).resolve()
        self.out = Path(args.out).resolve() if args.out else self.work
        self.log_path = self.out / "gpu_check.log"
        self.report = Report()
        self.env = dict(os.environ)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.pythonpath: list[str] = [str(REPO)]
        self.sources: Path | None = None
        self.lib_dir: Path | None = Path(os.environ["LLAMA_CPP_LIB_PATH"]) if os.environ.get("LLAMA_CPP_LIB_PATH") else None
        self.bin_dir: Path | None = None
        self.gpu = False
        self.cores = os.cpu_count() or 2

    # ---- plumbing

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def child_env(self) -> dict[str, str]:
        env = dict(self.env)
        env["PYTHONPATH"] = os.pathsep.join(self.pythonpath + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        if self.lib_dir is not None:
            env["LLAMA_CPP_LIB_PATH"] = str(self.lib_dir)
        return env

    def sh(self, step: str, command: Sequence[str], timeout: float, cwd: Path | None = None) -> tuple[int, str]:
        """Run a command with a timeout; its output goes to OUT/gpu_check.log, each line marked
        with the step (one file: a device machine returns few). (status, output); status 124
        when it ran past the timeout."""
        say(f"[{step}] $ {' '.join(map(str, command))}  (timeout {timeout:.0f}s)")
        with open(self.log_path, "a") as log:
            with _LOG_LOCK:
                log.write(f"[{step}] $ {' '.join(map(str, command))}\n")
                log.flush()
            process = subprocess.Popen([str(c) for c in command], cwd=cwd or REPO, env=self.child_env(),
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       errors="replace", start_new_session=True)
            chunks: list[str] = []

            def pump() -> None:
                assert process.stdout is not None
                for line in process.stdout:
                    chunks.append(line)
                    with _LOG_LOCK:
                        log.write(f"[{step}] {line}")

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            try:
                status = process.wait(timeout=max(timeout, 1))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()
                status = 124
            reader.join(5)
        return status, "".join(chunks)

    def python(self, step: str, args: Sequence[str], timeout: float) -> tuple[int, str]:
        return self.sh(step, [sys.executable, *args], timeout)

    def missing(self, step: str) -> list[str]:
        """The modules `step` needs that its subprocess would not find."""
        with _PATH_LOCK:  # steps run in threads; sys.path is shared
            sys_path = list(sys.path)
            try:
                sys.path[:0] = self.pythonpath
                importlib.invalidate_caches()
                return [m for m in NEEDS[step] if not _has_module(m)]
            finally:
                sys.path[:] = sys_path

    @staticmethod
    def tail(output: str, lines: int = 1) -> str:
        kept = [line for line in output.strip().splitlines() if line.strip()]
        return " / ".join(kept[-lines:])[-300:] if kept else "(no output)"

    # ---- step 1: the device

    def device(self) -> None:
        smi = shutil.which("nvidia-smi")
        if smi:
            try:
                text = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version,compute_cap",
                                       "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout
                first = text.strip().splitlines()[0]
                name, memory, driver, cap = (p.strip() for p in first.split(","))
                self.report.device = f"{name}, {memory}, driver {driver}"
                self.gpu = True
                self.arch = cuda_arch(cap)
            except (OSError, subprocess.SubprocessError, IndexError, ValueError):
                pass
        if not self.gpu:
            self.arch = "90"  # H100/H200 (only configured without a GPU: "native" would need one)
            cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                        if line.startswith("model name")), "unknown CPU")
            self.report.device = f"no GPU (nvidia-smi {'failed' if smi else 'absent'}); CPU {cpu}, {self.cores} cores"
        self.report.add("device", "device", self.report.device)
        self.report.add("device", "time budget", f"{self.args.budget_s:.0f} s" + (" (--tiny)" if self.tiny else ""))
        free = shutil.disk_usage(self.work).free
        self.report.add("device", "free disk in workdir", f"{free / 1e9:.0f} GB ({self.work})")

    # ---- step 2: sources

    def find_sdist(self) -> Path | None:
        given = os.environ.get("LLAMA_CPP_SDIST")
        if given:
            path = Path(given)
            return path if path.exists() else None
        status, cache = 1, ""
        try:
            result = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True,
                                    text=True, timeout=60)
            status, cache = result.returncode, result.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
        root = Path(cache) if status == 0 and cache else Path.home() / ".cache" / "pip"
        return find_sdist_in(root)

    def prepare_sources(self) -> None:
        sdist = self.find_sdist()
        if sdist is None:
            where = os.environ.get("LLAMA_CPP_SDIST") or "pip's cache"
            self.report.add("sources", "llama-cpp-python 0.3.36 sources",
                            f"skipped: not found ({where}); set LLAMA_CPP_SDIST to the sdist or a --pack-sources file")
        else:
            self.sources = unpack_sdist(sdist, self.work / "src")
            self.report.add("sources", "llama-cpp-python 0.3.36 sources", f"{sdist}")
        shims = self.work / "shims"
        if self.sources is not None:
            if not _has_module("llama_cpp"):
                self.pythonpath.append(str(self.sources))  # its `llama_cpp` package
                self.report.add("sources", "llama_cpp bindings", "from the sources (not installed)")
            if not _has_module("gguf") and (self.sources / "vendor/llama.cpp/gguf-py").is_dir():
                self.pythonpath.append(str(self.sources / "vendor/llama.cpp/gguf-py"))
                self.report.add("sources", "gguf package", "from the sources' gguf-py (not installed)")
        if not _has_module("diskcache"):
            shims.mkdir(parents=True, exist_ok=True)
            (shims / "diskcache.py").write_text(
                "class Cache:  # gpu_check shim: llama_cpp imports diskcache; the engine never uses it\n"
                "    def __init__(self, *args, **kwargs):\n"
                "        raise RuntimeError('diskcache is not installed (gpu_check shim)')\n")
            self.pythonpath.append(str(shims))

    # ---- step 3: the build

    def find_tools(self) -> Path | None:
        for candidate in (os.environ.get("LLAMA_BIN_DIR"), self.bin_dir):
            if candidate and (Path(candidate) / "llama-bench").is_file():
                return Path(candidate)
        found = shutil.which("llama-bench")
        return Path(found).parent if found else None

    def build(self) -> None:
        nvcc = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if Path(p).is_file()), None)
        existing_tools = self.find_tools()
        want_lib = self.lib_dir is None
        cuda = nvcc is not None
        if not want_lib:
            self.report.add("build", "llama.cpp library", f"not built: LLAMA_CPP_LIB_PATH={self.lib_dir} is used")
            if existing_tools is not None:
                self.report.add("build", "llama-bench", f"found in {existing_tools}; not built")
                return
        if nvcc is None:
            self.report.add("build", "llama.cpp with CUDA", "skipped: no nvcc on PATH (nor /usr/local/cuda/bin)")
            if existing_tools is not None:
                self.report.add("build", "llama-bench", f"found in {existing_tools}; not built")
                return
        if self.sources is None:
            self.report.add("build", "llama.cpp build", "skipped: no llama-cpp-python sources (see 'sources')")
            return
        if self.left() < (60 if self.tiny else 240):
            self.report.add("build", "llama.cpp build", f"skipped: {self.left():.0f} s left of the budget")
            return
        build = self.work / ("build-cuda" if cuda else "build-cpu")
        flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                 "-DBUILD_SHARED_LIBS=ON"]
        if shutil.which("ninja"):
            flags.append("-GNinja")
        if cuda:
            flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={self.arch}", f"-DCMAKE_CUDA_COMPILER={nvcc}"]
            libs, where = cuda_lib_flags(nvcc)
            flags += libs
            self.report.add("build", "CUDA libraries", where)
        started = time.monotonic()
        status, output = self.sh("build", ["cmake", "-S", self.sources / "vendor/llama.cpp", "-B", build, *flags],
                                 min(self.left() - 30, 300))
        kind = f"CUDA (sm_{self.arch})" if cuda else "CPU"
        if status != 0:
            self.report.add("build", f"llama.cpp configure, {kind}", f"failed ({status}): {self.tail(output)}")
            return
        self.report.add("build", f"llama.cpp configure, {kind}", f"ok in {time.monotonic() - started:.0f} s")
        if self.tiny and not self.args.build:
            self.report.add("build", "llama.cpp compile", "skipped in --tiny (configure only; --build compiles)")
            return
        targets = ["llama-bench", "llama-batched-bench"] + (["llama"] if cuda and want_lib else [])
        jobs = max(1, self.cores - (4 if self.gpu else 0))  # leave a few cores to step 4 and QLoRA
        started = time.monotonic()
        status, output = self.sh("build", ["cmake", "--build", build, "-j", str(jobs), "--target", *targets],
                                 self.left() - (150 if not self.tiny else 20))
        took = time.monotonic() - started
        if status != 0:
            why = "ran past its budget" if status == 124 else self.tail(output)
            self.report.add("build", f"llama.cpp compile, {kind}", f"failed after {took:.0f} s: {why}")
            return
        self.report.add("build", f"llama.cpp compile, {kind}", f"ok in {took:.0f} s ({', '.join(targets)}, -j{jobs})")
        libs = sorted(build.rglob("libllama.so"))
        bins = sorted(build.rglob("llama-bench"))
        if bins:
            self.bin_dir = bins[0].parent
        if cuda and want_lib and libs:
            self.lib_dir = libs[0].parent

    # ---- step 4: the model

    def model(self, shape_name: str) -> Path | None:
        shape = SHAPES[shape_name]
        step = f"model {shape_name}"
        size = checkpoint_bytes(shape)
        need_disk = size * 2 + size // 3 + (2 << 30)  # safetensors + F16 GGUF + Q4_K_M, some slack
        free = shutil.disk_usage(self.work).free
        if need_disk > free:
            self.report.add(step, "random-weight checkpoint",
                            f"skipped: needs about {need_disk / 1e9:.0f} GB of disk, {free / 1e9:.0f} GB free")
            return None
        need_time = 20 if self.tiny else size / 1e9 * 12  # about 12 s per GB on 16 cores
        if self.left() < need_time:
            self.report.add(step, "random-weight checkpoint", f"skipped: needs about {need_time:.0f} s, {self.left():.0f} s left")
            return None
        missing = self.missing("model")
        if missing:
            self.report.add(step, "random-weight checkpoint", f"skipped: Python modules missing: {', '.join(missing)}")
            return None
        folder = self.work / f"llama-{shape_name}"
        f16 = self.work / f"llama-{shape_name}.f16.gguf"
        q4 = self.work / f"llama-{shape_name}.Q4_K_M.gguf"
        for stale in (f16, q4):
            stale.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        started = time.monotonic()
        status, output = self.python(step, ["-m", "benchmarks.gpu_check", "_synth", shape_name, str(folder)], self.left() - 30)
        if status != 0:
            self.report.add(step, "random-weight safetensors", f"failed: {self.tail(output)}")
            return None
        self.report.add(step, "random-weight safetensors",
                        f"{size / 1e9:.1f} GB, {shape['layers']} layers × hidden {shape['hidden']} in {time.monotonic() - started:.0f} s")
        started = time.monotonic()
        status, output = self.python(step, ["-m", "benchmarks.gpu_check", "_export", str(folder), str(f16)], self.left() - 30)
        if status != 0 or not f16.is_file():
            self.report.add(step, "export_gguf (F16)", f"failed: {self.tail(output)}")
            return None
        self.report.add(step, "export_gguf (F16)", f"{f16.stat().st_size / 1e9:.1f} GB in {time.monotonic() - started:.0f} s")
        if not self.args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        self.wait_build()
        missing = self.missing("quantize")
        if missing:
            self.report.add(step, "quantize Q4_K_M", f"skipped: Python modules missing: {', '.join(missing)}")
            return None
        started = time.monotonic()
        status, output = self.python(step, ["-m", "benchmarks.gpu_check", "_quantize", str(f16), str(q4)], self.left() - 20)
        if status != 0 or not q4.is_file():
            self.report.add(step, "quantize Q4_K_M", f"failed: {self.tail(output)}")
            return None
        self.report.add(step, "quantize Q4_K_M", f"{q4.stat().st_size / 1e9:.2f} GB in {time.monotonic() - started:.0f} s"
                        + (f" (llama.cpp from {self.lib_dir})" if self.lib_dir else ""))
        if not self.args.keep:
            f16.unlink(missing_ok=True)
        return q4

    _build_thread: threading.Thread | None = None

    def wait_build(self) -> None:
        if self._build_thread is not None:
            say("[build] waiting for the build to finish")
            self._build_thread.join()
            self._build_thread = None

    # ---- step 5: QLoRA

    def qlora(self) -> None:
        step = "qlora"
        missing = self.missing("qlora")
        if missing:
            self.report.add(step, "QLoRA throughput", f"skipped: Python modules missing: {', '.join(missing)}")
            return
        if self.tiny:
            args = ["--tiny"]
            label = "tiny (2 layers, hidden 256, 256-token rows)"
        elif self.args.qlora_shape == "7b":
            s = SHAPES["7b"]
            args = ["--layers", str(s["layers"]), "--hidden", str(s["hidden"]), "--intermediate", str(s["intermediate"]),
                    "--heads", str(s["heads"]), "--kv-heads", str(s["kv_heads"]), "--seq-len", "4096", "--steps", "5"]
            label = "Llama-2-7B, 32 layers, 4096-token rows"
        else:
            args = ["--layers", "8", "--seq-len", "4096", "--steps", "6"]
            label = "8 layers of Llama-2-70B's shape, 4096-token rows"
        need = 30 if self.tiny else 150
        if self.left() < need:
            self.report.add(step, "QLoRA throughput", f"skipped: needs about {need} s, {self.left():.0f} s left")
            return
        status, output = self.python(step, ["-m", "benchmarks.qlora_throughput", *args], min(self.left() - 10, 420))
        if status != 0:
            why = "ran past its budget" if status == 124 else self.tail(output)
            self.report.add(step, f"QLoRA throughput, {label}", f"failed: {why}")
            return
        tps = re.search(r"tokens/s per device: (\S+)", output)
        full = re.search(r"full 80-layer 70B at this per-layer speed: ≈ (\S+)", output)
        peak = re.search(r"peak GPU memory: (.+)", output)
        dev = re.search(r"^device: (.+)$", output, re.M)
        self.report.add(step, f"QLoRA tokens/s, {label}", (tps.group(1) if tps else "?") + (f" on {dev.group(1)}" if dev else ""))
        if full:
            self.report.add(step, "QLoRA, a full 80-layer 70B at that per-layer speed", f"≈ {full.group(1)} tokens/s per GPU (published FSDP-QLoRA: ≈ 790 per H100)")
        if peak:
            self.report.add(step, "QLoRA peak GPU memory", peak.group(1).strip())

    # ---- step 6: the engine

    def engine(self, gguf: Path, shape_name: str) -> None:
        step = f"engine {shape_name}"
        missing = self.missing("engine")
        if missing:
            self.report.add(step, "benchmarks/engine.py", f"skipped: Python modules missing: {', '.join(missing)}")
            return
        need = 30 if self.tiny else 90
        if self.left() < need:
            self.report.add(step, "benchmarks/engine.py", f"skipped: needs about {need} s, {self.left():.0f} s left")
            return
        layers = "-1" if self.gpu else "0"
        options = ["--n-gpu-layers", layers, "--tokens", "16" if self.tiny else "64"]
        _, usage = self.python(step, ["-m", "benchmarks.engine", "--help"], 60)
        tools = self.find_tools()
        if "--llama-tools" in usage and tools is not None:  # newer versions run llama.cpp's tools beside
            options += ["--llama-tools", str(tools)]
        status, output = self.python(step, ["-m", "benchmarks.engine", str(gguf), *options], min(self.left() - 10, 300))
        if status != 0:
            why = "ran past its budget" if status == 124 else self.tail(output)
            self.report.add(step, "benchmarks/engine.py", f"failed: {why}")
            return
        figures = parse_engine(output)
        if not figures:
            self.report.add(step, "benchmarks/engine.py", f"ran, output not recognised: {self.tail(output, 3)}")
        for label, value in figures:
            self.report.add(step, label, value)
        if not self.gpu:
            return
        offload = re.search(r"offloaded (\d+/\d+) layers to GPU", output)
        if offload:
            self.report.add(step, "layers on the GPU", offload.group(1))

    # ---- step 7: llama.cpp's tools

    def speculative(self, gguf: Path, shape_name: str) -> None:
        """`benchmarks/speculative.py` on the same file (random weights: its acceptance means
        little, its cost of verifying drafts on this GPU is the figure)."""
        step = f"speculative {shape_name}"
        if self.missing("engine"):
            self.report.add(step, "benchmarks/speculative.py", "skipped: Python modules missing")
            return
        if self.left() < 120:
            self.report.add(step, "benchmarks/speculative.py", f"skipped: {self.left():.0f} s left")
            return
        options = ["--model", str(gguf), "--n-gpu-layers", "-1" if self.gpu else "0", "--no-lookup",
                   "--tokens", "16" if self.tiny else "64", "--repeat", "1" if self.tiny else "2"]
        status, output = self.python(step, ["-m", "benchmarks.speculative", *options], min(self.left() - 10, 240))
        if status != 0:
            self.report.add(step, "benchmarks/speculative.py", f"failed: {self.tail(output)}")
            return
        for line in output.splitlines():
            if line.startswith(("without", "scene recap", "code review")):
                self.report.add(step, "speculation (draft 4)", line.strip())

    def tools(self, gguf: Path, shape_name: str) -> None:
        step = f"llama.cpp {shape_name}"
        tools = self.find_tools()
        if tools is None:
            self.report.add(step, "llama-bench", "skipped: no llama-bench (not built, LLAMA_BIN_DIR unset, not on PATH)")
            return
        ngl = "99" if self.gpu else "0"
        threads = "1" if self.tiny else str(min(self.cores, 16))  # a busy 2-core box: 2 threads stall
        if self.left() < 20:
            self.report.add(step, "llama-bench", f"skipped: {self.left():.0f} s left")
            return
        pp, tg, reps = ("64", "16", "1") if self.tiny else ("512", "128", "3")
        status, output = self.sh(step, [tools / "llama-bench", "-m", gguf, "-ngl", ngl, "-t", threads, "-p", pp, "-n", tg,
                                        "-r", reps, "-o", "json", *REPACK_OFF["llama-bench"]], min(self.left() - 10, 180))
        try:
            results = parse_llama_bench(output) if status == 0 else []
        except (ValueError, KeyError):
            results = []
        if not results:
            self.report.add(step, "llama-bench", f"failed ({status}): {self.tail(output)}")
        for test, tps, sd in results:
            self.report.add(step, f"llama-bench {test} tokens/s", f"{tps:.1f} ± {sd:.1f}")
        batched = tools / "llama-batched-bench"
        if not batched.is_file():
            self.report.add(step, "llama-batched-bench", f"skipped: not in {tools}")
            return
        if self.left() < 20:
            self.report.add(step, "llama-batched-bench", f"skipped: {self.left():.0f} s left")
            return
        npp, ntg = ("32", "16") if self.tiny else ("128", "64")
        status, output = self.sh(step, [batched, "-m", gguf, "-ngl", ngl, "-t", threads, "-c", "4096", "-b", "2048",
                                        "-ub", "512", "-npp", npp, "-ntg", ntg, "-npl", "1,8", *REPACK_OFF["common"]],
                                 min(self.left() - 10, 180))
        rows = parse_batched_bench(output) if status == 0 else []
        if not rows:
            self.report.add(step, "llama-batched-bench", f"failed ({status}): {self.tail(output)}")
        for row in rows:
            column = next((c for c in row if c.startswith("S_TG")), None)
            if column:
                self.report.add(step, f"llama-batched-bench {row.get('B', '?')} sequences: decode tokens/s",
                                f"{row[column]} (prompt {row.get('PP', '?')}, {row.get('TG', '?')} new each)")

    # ---- all of it

    def run(self) -> int:
        self.work.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text("")
        self.device()
        self.prepare_sources()
        shape = "tiny" if self.tiny else "7b"
        self._build_thread = threading.Thread(target=self._guard, args=("build", self.build), daemon=True)
        self._build_thread.start()
        qlora_thread = None
        if self.gpu and not self.args.serial:  # the GPU is idle while the CPU builds and exports
            qlora_thread = threading.Thread(target=self._guard, args=("qlora", self.qlora), daemon=True)
            qlora_thread.start()
        gguf = self._guard(f"model {shape}", lambda: self.model(shape))
        self.wait_build()
        if qlora_thread is not None:
            say("[qlora] waiting for the QLoRA run to finish before the engine uses the GPU")
            qlora_thread.join()
        if gguf is not None:
            self._guard(f"engine {shape}", lambda: self.engine(gguf, shape))
            self._guard(f"llama.cpp {shape}", lambda: self.tools(gguf, shape))
            self._guard(f"speculative {shape}", lambda: self.speculative(gguf, shape))
        if qlora_thread is None:
            self._guard("qlora", self.qlora)
        if self.args.also_70b and not self.tiny:
            big = self._guard("model 70b", lambda: self.model("70b"))
            if big is not None:
                self._guard("engine 70b", lambda: self.engine(big, "70b"))
                self._guard("llama.cpp 70b", lambda: self.tools(big, "70b"))
        self.report.add("total", "wall time", f"{time.monotonic() - STARTED:.0f} s")
        table = f"GPU check — {self.report.device}\n\n" + markdown_table(
            ("step", "figure", "value"), self.report.rows)
        print("\n" + table)
        (self.out / "gpu_check.md").write_text(table + "\n")
        return 0

    def _guard(self, step: str, work):  # type: ignore[no-untyped-def]
        try:
            return work()
        except Exception as error:  # one step's bug must not lose the other figures
            self.report.add(step, "error", f"{type(error).__name__}: {error}")
            return None


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


CUDA_LIBS = {"cublas": "libcublas.so*", "cublasLt": "libcublasLt.so*", "cuda_driver": "libcuda.so*"}


def cuda_lib_flags(nvcc: str) -> tuple[list[str], str]:
    """CMake flags for the CUDA libraries ggml-cuda links (cuBLAS, cuBLASLt, the driver's
    libcuda) that CMake would not find by itself: a toolkit assembled from pip wheels keeps
    cuBLAS in site-packages/nvidia/..., and the driver's library may sit in /usr/local/nvidia.
    `GPU_CHECK_CUDA_LIBS` (a folder) is searched first. Returns (flags, what was found where)."""
    import glob
    import site

    toolkits = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                str(Path(nvcc).resolve().parent.parent), *sorted(glob.glob("/usr/local/cuda-*"))]
    toolkit_dirs = [d for t in filter(None, toolkits) for d in (f"{t}/lib64", f"{t}/lib64/stubs", f"{t}/lib",
                                                                 f"{t}/targets/x86_64-linux/lib",
                                                                 f"{t}/targets/x86_64-linux/lib/stubs")]
    extra = [os.environ["GPU_CHECK_CUDA_LIBS"]] if os.environ.get("GPU_CHECK_CUDA_LIBS") else []
    elsewhere = [f"{b}/nvidia" for b in [*site.getsitepackages(), site.getusersitepackages()]]
    elsewhere += ["/usr/local/nvidia/lib64", "/usr/local/nvidia/lib", "/usr/lib/x86_64-linux-gnu", "/usr/lib64"]
    flags: list[str] = []
    notes: list[str] = []
    rpath: list[str] = []
    for name, pattern in CUDA_LIBS.items():
        if not extra and any(glob.glob(f"{d}/{pattern}") for d in toolkit_dirs):
            continue  # CMake's FindCUDAToolkit finds it
        found = next((sorted(glob.glob(f"{d}/**/{pattern}", recursive=True)) for d in extra + elsewhere
                      if Path(d).is_dir() and glob.glob(f"{d}/**/{pattern}", recursive=True)), [])
        if not found:
            notes.append(f"{name}: not found, the CUDA configure will fail")
            continue
        lib = Path(found[0])
        flags.append(f"-DCUDA_{name}_LIBRARY={lib}")
        rpath.append(str(lib.parent))
        notes.append(f"{name}: {lib}")
        if name == "cublas":
            include = next((h.parent for h in lib.parent.parent.rglob("cublas_v2.h")), None)
            if include is not None:
                flags += [f"-DCMAKE_CUDA_FLAGS=-I{include}", f"-DCMAKE_CXX_FLAGS=-I{include}"]
    if rpath:
        flags.append(f"-DCMAKE_BUILD_RPATH={';'.join(dict.fromkeys(rpath))}")
    return flags, "; ".join(notes) or "all in the CUDA toolkit"


def find_sdist_in(root: Path) -> Path | None:
    """The llama-cpp-python 0.3.36 sdist in pip's cache: a .tar.gz by name, or a cached HTTP
    body (pip names those by hash) that is that archive."""
    if not root.is_dir():
        return None
    named = sorted(root.rglob(f"{SDIST_PREFIX}.tar.gz"))
    if named:
        return named[0]
    for path in root.rglob("*"):
        try:
            if not path.is_file() or path.stat().st_size < 10_000_000:
                continue
            with open(path, "rb") as handle:
                if handle.read(2) != b"\x1f\x8b":
                    continue
            with tarfile.open(path, "r:gz") as archive:
                first = archive.next()
                if first is not None and first.name.split("/")[0] == SDIST_PREFIX:
                    return path
        except (OSError, tarfile.TarError, EOFError):
            continue
    return None


def unpack_sdist(sdist: Path, dest: Path) -> Path:
    """The sdist's root folder: `sdist` itself if it is a folder, else unpacked into `dest`."""
    if sdist.is_dir():
        return sdist
    marker = dest / ".unpacked-from"
    if marker.is_file() and marker.read_text() == f"{sdist.resolve()} {sdist.stat().st_mtime}":
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    with tarfile.open(sdist, "r:*") as archive:
        for member in archive.getmembers():
            parts = member.name.split("/", 1)
            if len(parts) < 2 or not parts[1] or member.islnk():
                continue
            member.name = parts[1]
            archive.extract(member, dest, filter="data")
    marker.write_text(f"{sdist.resolve()} {sdist.stat().st_mtime}")
    return dest


def pack_sources(sdist: Path, out: Path) -> None:
    """A trimmed copy of the sdist (TRIM left out), to carry to a machine without network."""
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = 0
    with tarfile.open(out, "w:gz") as packed:
        if sdist.is_dir():
            for path in sorted(sdist.rglob("*")):
                rel = path.relative_to(sdist).as_posix()
                if path.is_file() and not path.is_symlink() and not trimmed(rel):
                    packed.add(path, f"{SDIST_PREFIX}/{rel}")
                    kept += 1
        else:
            with tarfile.open(sdist, "r:*") as archive:
                for member in archive:
                    name = member.name.split("/", 1)
                    if len(name) < 2 or not member.isfile() or trimmed(name[1]):
                        continue
                    member.name = f"{SDIST_PREFIX}/{name[1]}"
                    packed.addfile(member, archive.extractfile(member))
                    kept += 1
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {kept} files)")


# --- Internal subcommands (run in their own process: heavy imports, memory given back) --------

def synth(shape_name: str, folder: Path) -> None:
    """A random-weight Llama checkpoint: safetensors shards written tensor by tensor, config,
    index, and a SentencePiece tokenizer."""
    import torch
    from safetensors.torch import save_file
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    shape = SHAPES[shape_name]
    folder.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(0)
    plan = shard_plan(llama_tensors(shape), 4 << 30)
    weight_map: dict[str, str] = {}
    total = 0
    for index, shard in enumerate(plan):
        name = f"model-{index + 1:05d}-of-{len(plan):05d}.safetensors"
        tensors = {}
        for tensor_name, dims in shard:
            if len(dims) == 1:
                tensor = torch.ones(dims, dtype=torch.bfloat16)
            else:
                tensor = torch.empty(dims, dtype=torch.bfloat16, device=device).normal_(0.0, 0.02, generator=generator).cpu()
            tensors[tensor_name] = tensor
            weight_map[tensor_name] = name
            total += tensor.numel() * 2
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        print(f"wrote {name} ({sum(t.numel() for t in tensors.values()) * 2 / 1e9:.2f} GB)", flush=True)
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (folder / "config.json").write_text(json.dumps(hf_config(shape), indent=1))
    model = spm_pb2.ModelProto()
    for piece, score, kind in spm_pieces():
        entry = model.pieces.add()
        entry.piece, entry.score, entry.type = piece, score, kind
    spec = model.trainer_spec
    spec.model_type = spm_pb2.TrainerSpec.BPE
    spec.vocab_size = VOCAB
    spec.byte_fallback = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = True
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    data = model.SerializeToString()
    processor = SentencePieceProcessor(model_proto=data)
    assert processor.get_piece_size() == VOCAB, processor.get_piece_size()
    (folder / "tokenizer.model").write_bytes(data)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": False,
    }))
    print(f"checkpoint {folder}: {total / 1e9:.2f} GB in {len(plan)} shards, tokenizer of {VOCAB} pieces")


def export(folder: Path, out: Path) -> None:
    import logging

    from training.export import export_gguf

    logging.basicConfig(level=logging.INFO)
    export_gguf(folder, out, "f16")


def quantize_q4(source: Path, out: Path) -> None:
    import logging

    import llama_cpp

    from training.export import quantize

    logging.basicConfig(level=logging.INFO)
    print(f"llama_cpp from {Path(llama_cpp.__file__).parent}, GPU offload: {llama_cpp.llama_supports_gpu_offload()}")
    quantize(source, out, "Q4_K_M")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_synth":
        synth(argv[1], Path(argv[2]))
        return 0
    if argv and argv[0] == "_export":
        export(Path(argv[1]), Path(argv[2]))
        return 0
    if argv and argv[0] == "_quantize":
        quantize_q4(Path(argv[1]), Path(argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", "--dry-run", dest="tiny", action="store_true",
                        help="every step on tiny shapes (CPU-friendly, a few minutes)")
    parser.add_argument("--budget-s", type=float, default=None, help="the whole run's time (default 570 s; --tiny 240)")
    parser.add_argument("--workdir", default=os.environ.get("GPU_CHECK_WORKDIR", "/tmp/gpu_check"))
    parser.add_argument("--out", default=os.environ.get("OUT"), help="where the table and logs go (default: workdir)")
    parser.add_argument("--also-70b", action="store_true", help="also the 70B shape, if disk and time allow")
    parser.add_argument("--qlora-shape", choices=("70b-layers", "7b"), default="70b-layers")
    parser.add_argument("--serial", action="store_true", help="QLoRA after the engine, not beside the build")
    parser.add_argument("--build", action="store_true", help="with --tiny: compile llama.cpp, not only configure")
    parser.add_argument("--keep", action="store_true", help="keep the safetensors and the F16 GGUF")
    parser.add_argument("--pack-sources", type=Path, metavar="FILE",
                        help="write trimmed llama-cpp-python sources to FILE (.tar.gz) and exit")
    args = parser.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 240.0 if args.tiny else 570.0
    run = Run(args)
    if args.pack_sources:
        sdist = run.find_sdist()
        if sdist is None:
            print("no llama-cpp-python 0.3.36 sdist: set LLAMA_CPP_SDIST", file=sys.stderr)
            return 1
        pack_sources(sdist, args.pack_sources)
        return 0
    return run.run()


if __name__ == "__main__":
    raise SystemExit(main())
