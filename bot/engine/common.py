"""What both engines (`llama.LlamaEngine`, `scheduler.BatchedEngine`) share: checking a model
file before llama.cpp sees it, sizing the engine to the machine (free memory, KV bytes per
token, decode threads), deciding how a hot swap fits, finishing it on the event loop,
turning any failure into an `EngineError` a person can read, and the watchdog that keeps
the worker thread owning the llama.cpp context alive.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.engine.base import EngineError, EngineHealth, ModelLoadError, ModelUnavailable, ReloadPlan

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


GiB = 2**30
MiB = 2**20
MAX_PARALLEL = 16  # most slots `N_PARALLEL=0` picks: beyond it a step's Python loop dominates
RAM_CACHE_CONVERSATIONS = 8  # full conversations the RAM cache holds by default...
RAM_CACHE_SHARE = 0.25  # ...at most this share of the RAM left after the model and its slots
FULL_OFFLOAD_THREADS = 4  # decode threads when every layer is on the GPU (they only feed it)
GPU_INSTALL = (
    'CMAKE_ARGS="-DGGML_CUDA=on" .venv/bin/pip install --force-reinstall --no-cache-dir '
    "llama-cpp-python==0.3.36"
)


def reserve(free: int) -> int:
    """Memory left alone on a device: llama.cpp's compute buffers, the CUDA context, other
    processes' growth. 10% of what is free, at least 1 GiB."""
    return max(GiB, free // 10)


# ---- what the machine has -------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    """Free and total bytes of GPU memory (summed over GPUs; 0 without one) and of RAM."""

    gpu_free: int
    gpu_total: int
    ram_free: int
    ram_total: int
    gpu_source: str = "none"  # "llama.cpp", "nvidia-smi", "none" (no GPU, or not offloading)

    def describe(self) -> str:
        ram = f"{self.ram_free / GiB:.1f} of {self.ram_total / GiB:.1f} GiB RAM free"
        if self.gpu_source == "none":
            return ram
        return f"{self.gpu_free / GiB:.1f} of {self.gpu_total / GiB:.1f} GiB GPU memory free ({self.gpu_source}), {ram}"


def probe_memory(offloading: bool) -> Memory:
    """What is free now. GPU memory (only when `offloading`) from llama.cpp's own device
    list (`ggml_backend_dev_memory`), else `nvidia-smi`; RAM from psutil, else os.sysconf.

    Tests replace this function (`monkeypatch.setattr(common, "probe_memory", ...)`): every
    sizing and swap decision reads memory through it."""
    ram_free, ram_total = _ram()
    gpu_free = gpu_total = 0
    source = "none"
    if offloading:
        reading = _gpu_memory_llama_cpp()
        source = "llama.cpp"
        if reading is None:
            reading, source = _gpu_memory_nvidia_smi(), "nvidia-smi"
        if reading is None:
            source = "unknown"
        else:
            gpu_free, gpu_total = reading
    return Memory(gpu_free, gpu_total, ram_free, ram_total, source)


def _ram() -> tuple[int, int]:
    try:
        import psutil
    except ImportError:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_AVPHYS_PAGES"), page * os.sysconf("SC_PHYS_PAGES")
    memory = psutil.virtual_memory()
    return int(memory.available), int(memory.total)


_GGML_DEVICE_GPU = 1  # enum ggml_backend_dev_type: CPU, GPU, IGPU (host memory), ACCEL


def _gpu_memory_llama_cpp() -> tuple[int, int] | None:
    """Free and total memory of llama.cpp's GPU devices, or None (no GPU device, or the
    functions are not reachable in this build)."""
    try:
        import llama_cpp

        lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml.so"))
        lib.ggml_backend_dev_count.restype = ctypes.c_size_t
        lib.ggml_backend_dev_get.restype = ctypes.c_void_p
        lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        lib.ggml_backend_dev_type.restype = ctypes.c_int
        lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
        size_p = ctypes.POINTER(ctypes.c_size_t)
        lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, size_p, size_p]
        lib.ggml_backend_dev_memory.restype = None
        llama_cpp.llama_backend_init()
        free_sum = total_sum = 0
        found = False
        for index in range(lib.ggml_backend_dev_count()):
            device = lib.ggml_backend_dev_get(index)
            if lib.ggml_backend_dev_type(device) != _GGML_DEVICE_GPU:
                continue
            free, total = ctypes.c_size_t(), ctypes.c_size_t()
            lib.ggml_backend_dev_memory(device, ctypes.byref(free), ctypes.byref(total))
            free_sum, total_sum, found = free_sum + free.value, total_sum + total.value, True
        return (free_sum, total_sum) if found else None
    except (OSError, AttributeError, ImportError):
        return None


def _gpu_memory_nvidia_smi() -> tuple[int, int] | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.free,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
        rows = [[int(v) * MiB for v in line.split(",")] for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return (sum(r[0] for r in rows), sum(r[1] for r in rows)) if rows else None


def physical_cores() -> int:
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except ImportError:
        cores = None
    return cores or os.cpu_count() or 1


def supports_gpu_offload() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def offloading(n_gpu_layers: int) -> bool:
    """Whether any layer will really be on a GPU (llama.cpp ignores N_GPU_LAYERS without one)."""
    return n_gpu_layers != 0 and supports_gpu_offload()


def gpu_offload_warning(n_gpu_layers: int) -> str | None:
    """The start-up warning when GPU offload is asked for but llama.cpp cannot do it."""
    if n_gpu_layers == 0 or supports_gpu_offload():
        return None
    return (
        f"N_GPU_LAYERS={n_gpu_layers} asks for GPU offload, but this llama-cpp-python was built "
        "without GPU support: every layer runs on the CPU. For an NVIDIA GPU reinstall it with "
        f"CUDA: {GPU_INSTALL} (or set N_GPU_LAYERS=0 to silence this)"
    )


# ---- how the engine is sized ----------------------------------------------------------


def kv_bytes_per_token(lib: Any, model: Any) -> int:
    """KV cache bytes one token takes in every layer of a loaded model (f16 K and V).

    The head sizes are the GGUF's `{arch}.attention.key_length` / `value_length` when
    given (Gemma 3: 256, not n_embd / n_head = 160), else n_embd / n_head. Sliding-window
    layers count in full: the engines create their contexts with `swa_full`."""
    buffer = ctypes.create_string_buffer(256)

    def meta(key: str) -> str | None:
        n = lib.llama_model_meta_val_str(model, key.encode(), buffer, len(buffer))
        return buffer.value.decode(errors="replace") if n >= 0 else None

    arch = meta("general.architecture") or ""
    head = lib.llama_model_n_embd(model) // max(1, lib.llama_model_n_head(model))

    def length(key: str) -> int:
        value = meta(f"{arch}.attention.{key}")
        return int(value) if value and value.isdigit() else head

    n_head_kv = lib.llama_model_n_head_kv(model)
    return lib.llama_model_n_layer(model) * n_head_kv * (length("key_length") + length("value_length")) * 2


def decode_threads(n_threads: int | None, gpu_share: float, cores: int | None = None) -> tuple[int, int, str]:
    """Threads for one-token steps and for prompt batches, and why: N_THREADS when set;
    with every layer on the GPU a few (they only feed it); otherwise the physical cores,
    for both (measured on 2 cores: 1 thread decodes at 0.70-0.94x the speed of 2; see docs/engine.md)."""
    cores = cores or physical_cores()
    if n_threads:
        return n_threads, n_threads, "N_THREADS"
    if gpu_share >= 1:
        small = min(FULL_OFFLOAD_THREADS, cores)
        return small, small, "every layer on the GPU"
    return cores, cores, "physical cores"


def gpu_share(gpu: bool, n_gpu_layers: int, n_layer: int | None) -> float:
    """The share of the layers (so of the weights and the KV cache) on the GPU. `n_layer`
    None (not loaded yet): a positive N_GPU_LAYERS counts as partial."""
    if not gpu or n_gpu_layers == 0:
        return 0.0
    if n_gpu_layers < 0 or (n_layer is not None and n_gpu_layers >= n_layer):
        return 1.0
    return n_gpu_layers / n_layer if n_layer else 0.5


@dataclass(frozen=True)
class Sizing:
    n_parallel: int
    ram_cache_mb: int
    n_threads: int  # one-token decode steps
    n_threads_batch: int  # prompt chunks
    note: str  # the decision, in words, for the log


def size_engine(
    *,
    n_ctx: int,
    kv_per_token: int,
    model_bytes: int,
    n_layer: int,
    n_gpu_layers: int,
    gpu: bool,
    memory: Memory,
    n_parallel: int = 0,
    ram_cache_mb: int | None = None,
    n_threads: int | None = None,
    cores: int | None = None,
    cap: int = MAX_PARALLEL,
) -> Sizing:
    """Slots, RAM cache and threads for a model on this machine (pure: tests call it).

    `gpu`: llama.cpp can offload here. The share `f` of the layers on the GPU puts that share
    of the weights and of every slot's KV cache in GPU memory, the rest in RAM; the slots
    are as many as fit both, after the model and a reserve (10%, at least 1 GiB) on each,
    between 1 and `cap`. An explicit `n_parallel` / `ram_cache_mb` / `n_threads` is kept.
    Without a GPU reading while offloading, the old fixed 2 GiB KV budget is used.
    """
    slot = max(1, kv_per_token * n_ctx)
    share = gpu_share(gpu, n_gpu_layers, n_layer)
    reasons = []
    if n_parallel:
        slots, why = n_parallel, "N_PARALLEL"
    else:
        fits = []
        if share > 0:
            if memory.gpu_source == "unknown":
                fits.append(2 * GiB // slot)
                reasons.append("GPU memory unreadable: 2 GiB of KV assumed")
            else:
                room = memory.gpu_free - int(model_bytes * share) - reserve(memory.gpu_free)
                fits.append(int(room // (slot * share)))
                reasons.append(f"GPU {memory.gpu_free / GiB:.1f} GiB free")
        if share < 1:
            room = memory.ram_free - int(model_bytes * (1 - share)) - reserve(memory.ram_free)
            fits.append(int(room // (slot * (1 - share))))
            reasons.append(f"RAM {memory.ram_free / GiB:.1f} GiB free")
        slots = max(1, min(cap, *fits))
        why = (
            f"{', '.join(reasons)}, model {model_bytes / GiB:.2f} GiB ({share:.0%} on the GPU), "
            f"reserve 10% (>= 1 GiB): {min(fits)} would fit, at most {cap}"
        )
    kv_ram = int(slots * slot * (1 - share))
    if ram_cache_mb is None:
        left = memory.ram_free - int(model_bytes * (1 - share)) - kv_ram
        cache = max(0, min(RAM_CACHE_CONVERSATIONS * slot, int(left * RAM_CACHE_SHARE)))
        ram_cache_mb = cache // MiB
        cache_why = f"{RAM_CACHE_CONVERSATIONS} conversations of {slot / MiB:.0f} MiB, at most {RAM_CACHE_SHARE:.0%} of the RAM left"
    else:
        cache_why = "KV_RAM_CACHE_MB"
    threads, threads_batch, thread_why = decode_threads(n_threads, share, cores)
    note = (
        f"{slots} slot(s) of {n_ctx} tokens ({why}; KV {kv_per_token / 1024:.0f} KiB/token, "
        f"{slot / MiB:.0f} MiB/slot, {slots * slot / GiB:.2f} GiB in all); RAM cache {ram_cache_mb} MiB "
        f"({cache_why}); {threads} decode thread(s) ({thread_why})"
    )
    return Sizing(slots, ram_cache_mb, threads, threads_batch, note)


def check_model_file(path: Path, n_gpu_layers: int = 0) -> None:
    """Fail early, with a helpful message, on a file llama.cpp could not load: missing, not
    a GGUF, or larger than the machine's GPU memory and RAM together."""
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path} (check MODEL_PATH or MODELS_DIR)")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(
            f"{path.name} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
            "convert it with `hermes-train export` or download a .gguf build"
        )
    size = path.stat().st_size
    gpu = offloading(n_gpu_layers)
    memory = probe_memory(gpu)
    total = memory.ram_total + (memory.gpu_total if gpu else 0)
    if size > total:
        where = (
            f"{memory.gpu_total / GiB:.1f} GiB of GPU memory and {memory.ram_total / GiB:.1f} GiB of RAM together"
            if gpu else
            f"{memory.ram_total / GiB:.1f} GiB of RAM and llama.cpp has no GPU offload here"
        )
        raise ModelLoadError(
            f"{path.name} is {size / GiB:.1f} GiB but this machine has {where}: it cannot be loaded here; "
            "pick a smaller quantization" + ("" if gpu else " or install llama-cpp-python with CUDA (see docs/engine.md)")
        )


def plan_swap(path: Path, n_gpu_layers: int, current_kv_bytes: int) -> ReloadPlan:
    """How a hot swap to `path` fits, from its file size and what is free now (the current
    model loaded): "beside" when it fits next to the current one with as much KV cache
    as the current one has (`current_kv_bytes`), else "unload" (a short outage). Raises
    `ModelLoadError` at once for a file that could never load here."""
    check_model_file(path, n_gpu_layers)
    size = path.stat().st_size
    gpu = offloading(n_gpu_layers)
    memory = probe_memory(gpu)
    if gpu and memory.gpu_source != "unknown":
        free, where = memory.gpu_free, "GPU memory"
    else:
        free, where = memory.ram_free, "RAM"
    need = size + current_kv_bytes + reserve(free)
    detail = (
        f"{path.name} ({size / GiB:.1f} GiB) and its KV cache ({current_kv_bytes / GiB:.1f} GiB) "
        f"need {need / GiB:.1f} GiB with the reserve; {free / GiB:.1f} GiB of {where} is free beside the current model"
    )
    mode = "beside" if need <= free else "unload"
    log.info("hot swap %s: %s", mode, detail)
    return ReloadPlan(mode, detail)


async def unload_then_load(old_model: Any, old_config: Any, new_config: Any, load: Callable[[Any], Any]) -> tuple[Any, Any, BaseException | None]:
    """The outage half of a swap, with the engine's worker parked: free the old model, load
    the new one, and when that fails load the old one back. Returns (config, model, the new
    model's load error or None). Raises `ModelUnavailable` when even the old one fails."""
    await asyncio.to_thread(old_model.close)
    try:
        return new_config, await asyncio.to_thread(load, new_config), None
    except Exception as error:
        log.error("loading %s failed (%s): loading %s back", new_config.model_path.name, describe_error(error), old_config.model_path.name)
        try:
            model = await asyncio.to_thread(load, old_config)
        except Exception as again:
            raise ModelUnavailable(
                f"{explain(error)}; loading {old_config.model_path.name} back failed too "
                f"({explain(again)}): no model is loaded, requests fail until a /reload-model succeeds"
            ) from again
        return old_config, model, error


def token_upper_bound(text: str) -> int:
    """Tokens `text` can take at most, with no tokenizer at hand (during an unload-then-load
    swap): every token covers at least one byte; plus BOS and a leading-space marker."""
    return len(text.encode("utf-8")) + 2


def finish_swap(old_model: Any, done: asyncio.Future[None]) -> None:
    """On the loop thread, after a hot swap: free the old model (count_tokens, which runs
    on the loop, may have been reading its vocabulary) and wake the reload."""
    old_model.close()
    done.set_result(None)


def describe_error(error: BaseException) -> str:
    """`MemoryError: ` is all str() gives for some errors: name the type too."""
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def explain(error: BaseException) -> str:
    """An error for people: our own errors' messages as they are, others with their type."""
    return str(error) if isinstance(error, EngineError) and str(error) else describe_error(error)


def as_engine_error(error: BaseException) -> EngineError:
    """What a caller is told when its generation failed for an unexpected reason."""
    if isinstance(error, EngineError):
        return error
    return EngineError(f"generation failed ({describe_error(error)})")


class Watchdog:
    """Runs an engine's worker thread, reports its health, and replaces it when it dies.

    The worker (`run(crash)`) calls `beat()` every time round its loop and `note(error)`
    for every unexpected error it survives. Nothing derived from `Exception` should end
    it; anything that still does (a `BaseException`, a bug in the error handling) is
    logged, and the watchdog task on the event loop notices within `interval` seconds
    and starts a fresh thread with `run(crash)`: that thread first fails what the dead
    one held with `crash` (an `EngineError` for people) and resets its sequence state,
    then serves on. Only one thread ever owns the context: the fresh one starts after
    the old one has ended.

    A worker that is alive and has work (`busy()`) but has not beaten for `stuck_after`
    seconds is reported as stuck (and a warning logged once). It is left alone: a thread
    stuck inside llama_decode (C code) cannot be interrupted or killed from Python, and
    a second thread on the same context would corrupt it; only a restart of the bot helps.
    """

    def __init__(
        self,
        name: str,
        run: Callable[[EngineError | None], None],
        busy: Callable[[], bool],
        stuck_after: float = 60.0,
        interval: float = 1.0,
    ) -> None:
        self.name = name
        self._run = run
        self._busy = busy
        self.stuck_after = stuck_after
        self.interval = interval
        self.heartbeat = time.monotonic()
        self.restarts = 0
        self.last_error = ""
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None
        self._warned = False

    # ---- the worker thread ------------------------------------------------------------

    def start_thread(self, crash: EngineError | None = None) -> None:
        self.beat()
        self._thread = threading.Thread(target=self._guard, args=(crash,), name=self.name, daemon=True)
        self._thread.start()

    def _guard(self, crash: EngineError | None) -> None:
        try:
            self._run(crash)
        except BaseException as error:  # noqa: BLE001 - recorded; the watchdog starts a new worker
            self.note(error)
            log.critical("%s died; the watchdog will restart it", self.name, exc_info=True)

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def beat(self) -> None:
        self.heartbeat = time.monotonic()

    def note(self, error: BaseException) -> None:
        self.last_error = describe_error(error)

    # ---- the event loop ---------------------------------------------------------------

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        self._task = loop.create_task(self._watch(), name=f"{self.name}-watchdog")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.check()
            except Exception:
                log.exception("%s watchdog check failed", self.name)

    def check(self) -> None:
        """Restart a dead worker; warn (once) about a stuck one."""
        if self._thread is not None and not self._thread.is_alive():
            self.restarts += 1
            reason = self.last_error or "no error recorded"
            log.error("%s had stopped (%s): starting a fresh one (restart %d)", self.name, reason, self.restarts)
            self.start_thread(EngineError(
                f"the model's worker crashed ({reason}) and was restarted; this reply was lost, please ask again"
            ))
            return
        stuck = self.stuck_seconds()
        if stuck and not self._warned:
            log.warning(
                "%s has had work but no progress for %.0f s: probably stuck inside llama.cpp, "
                "which cannot be interrupted; restart the bot if it does not recover", self.name, stuck
            )
        self._warned = bool(stuck)

    def stuck_seconds(self) -> float:
        age = time.monotonic() - self.heartbeat
        return age if age >= self.stuck_after and self._busy() else 0.0

    @property
    def health(self) -> EngineHealth:
        return EngineHealth(
            alive=self._thread is not None and self._thread.is_alive(),
            heartbeat_age=time.monotonic() - self.heartbeat,
            stuck_seconds=self.stuck_seconds(),
            restarts=self.restarts,
            last_error=self.last_error,
        )
