"""Helper processes a test started (llama-server, the bot process) that die unasked.

A test waiting for a reply from a process that crashed used to wait out its timeout and say
only "timed out". Each helper registers itself with `watch` while it should be running and
says when it is stopped on purpose (`expect_exit`); `check()`, called by the e2e waits,
fails at once when one of them ended unasked, naming the signal that killed it (SIGILL,
SIGSEGV, …) and quoting the last lines of its log.
"""

from __future__ import annotations

import signal
from typing import Protocol


class Helper(Protocol):
    name: str

    def exit_code(self) -> int | None: ...  # None while it runs

    def log_tail(self, lines: int = 20) -> str: ...


_watched: dict[int, Helper] = {}


def describe_exit(returncode: int | None) -> str:
    """How a child process ended, naming the signal that killed it."""
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "an unknown signal"
        return f"was killed by {name} (signal {-returncode})"
    if returncode > 128:  # a shell's (or Python's faulthandler's) way of reporting a signal
        try:
            return f"exited with {returncode} ({signal.Signals(returncode - 128).name})"
        except ValueError:
            pass
    return f"exited with {returncode}"


def watch(helper: Helper) -> None:
    _watched[id(helper)] = helper


def expect_exit(helper: Helper) -> None:
    """The test is stopping or killing `helper` itself: its exit is no crash."""
    _watched.pop(id(helper), None)


def check() -> None:
    """AssertionError for the first watched helper that ended unasked (forgotten after)."""
    for key, helper in list(_watched.items()):
        code = helper.exit_code()
        if code is not None:
            del _watched[key]
            raise AssertionError(
                f"{helper.name} {describe_exit(code)} while the test waited; the last lines of its log:\n"
                f"{helper.log_tail(30)}"
            )
