"""CPU weight repacking: off unless asked for, in every place the project loads llama.cpp.

llama.cpp can repack weights kept on the CPU into layouts of its own ("extra buffer types")
that route matrix products to special kernels, AMX among them. On Intel CPUs with AMX
(Sapphire, Emerald and Granite Rapids Xeons: the CPUs of most H100 servers) the pinned
llama.cpp dies with SIGILL there: ggml asks the kernel for AMX tile permission on the main
thread only, and the worker threads that run the kernels then fault (llama.cpp PR 26954).
Any layer left on the CPU takes that path: a CPU-only bot, partial offload, the export's
parity gate. So repacking is off unless `LLAMA_REPACK=true` turns it on; measured cost of
having it off on a CPU without the problem: docs/engine.md ("CPU weight repacking").

One mechanism for every entry point:
- `model_params(lib, enabled)` for the low-level loaders (the batched engine, vocabularies);
- `open_llama(path, **kwargs)` for llama-cpp-python's `Llama` (the simple engine, the
  export gate, benchmarks, tests): `Llama` has no keyword for it, so the model parameters
  it builds are given `use_extra_bufts` while it is constructed (checked afterwards);
- `server_args`/`bench_args` for llama.cpp's own `llama-server` and `llama-bench`.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV = "LLAMA_REPACK"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}
_constructing = threading.Lock()  # one `Llama` built at a time while its defaults are ours


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not readable)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def has_amx(flags: frozenset[str] | None = None) -> bool:
    return "amx_tile" in (cpu_flags() if flags is None else flags)


def from_environment(environ: dict[str, str] | None = None) -> bool:
    """`LLAMA_REPACK` as a boolean (unset or empty: False). A value that is not a boolean
    raises ValueError naming the variable."""
    raw = (os.environ if environ is None else environ).get(ENV, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"{ENV}={raw!r}: expected true or false")


@dataclass(frozen=True)
class RepackChoice:
    """Whether CPU weight repacking is on, and why (for the start-up log)."""

    enabled: bool
    reason: str

    def server_args(self) -> list[str]:
        """`llama-server` / `llama-batched-bench` flags (llama.cpp's common arguments)."""
        return ["--repack"] if self.enabled else ["--no-repack"]

    def bench_args(self) -> list[str]:
        """`llama-bench` flags."""
        return ["--repack", "1" if self.enabled else "0"]


def choose(enabled: bool | None = None, flags: frozenset[str] | None = None) -> RepackChoice:
    """The choice for `enabled` (None: `LLAMA_REPACK` from the environment), with its reason."""
    if enabled is None:
        enabled = from_environment()
    amx = has_amx(flags)
    if enabled:
        why = (f"{ENV}=true; this CPU has AMX: llama.cpp's repacked AMX kernels may crash with SIGILL here"
               if amx else f"{ENV}=true")
    else:
        why = (f"{ENV} is off (the default); this CPU has AMX, where llama.cpp's repacked kernels crash with SIGILL"
               if amx else f"{ENV} is off (the default: llama.cpp's repacked AMX kernels crash with SIGILL "
                           "on Intel CPUs with AMX)")
    return RepackChoice(enabled, why)


def log_choice(choice: RepackChoice) -> None:
    """One line at start: which was chosen and why (a warning when on over AMX)."""
    level = logging.WARNING if choice.enabled and "AMX" in choice.reason else logging.INFO
    log.log(level, "CPU weight repacking %s: %s", "on" if choice.enabled else "off", choice.reason)


def model_params(lib: Any, enabled: bool) -> Any:
    """llama.cpp's default model parameters with repacking as chosen (the low-level path)."""
    params = lib.llama_model_default_params()
    params.use_extra_bufts = enabled
    return params


def open_llama(model_path: str | Path, *, repack: bool | None = None, **kwargs: Any) -> Any:
    """llama-cpp-python's `Llama(model_path, **kwargs)` with CPU weight repacking as chosen
    (`repack` None: `LLAMA_REPACK`). The only way to build a `Llama` in this project."""
    import llama_cpp.llama as high  # the module whose `llama_cpp` builds Llama's model parameters

    enabled = from_environment() if repack is None else repack
    lib = high.llama_cpp
    with _constructing:
        defaults = lib.llama_model_default_params

        def ours() -> Any:
            params = defaults()
            params.use_extra_bufts = enabled
            return params

        lib.llama_model_default_params = ours
        try:
            llm = high.Llama(str(model_path), **kwargs)
        finally:
            lib.llama_model_default_params = defaults
    if bool(llm.model_params.use_extra_bufts) != enabled:  # a llama-cpp-python that builds them otherwise
        llm.close()
        raise RuntimeError(f"could not set CPU weight repacking {'on' if enabled else 'off'} for {model_path}")
    return llm
