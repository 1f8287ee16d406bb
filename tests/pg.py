"""A throwaway PostgreSQL cluster for the store's tests (a pytest plugin).

Use it from a test module with `pytest_plugins = ["tests.pg"]`, then ask for `postgres_url`:
a fresh, empty database on a cluster that the whole test session shares. The cluster is
made with the server's own `initdb` and `pg_ctl` in a temporary folder, listens on a free
port of 127.0.0.1 only (and a Unix socket inside that folder), and is stopped and removed
when the session ends, or by a watcher process once pytest is gone, however it died.
Durability is switched off (fsync, synchronous commit): nothing
here has to survive a crash of the machine.

The binaries are found through `$PG_BINDIR`, then `PATH`, then Debian's
`/usr/lib/postgresql/<version>/bin` (newest first). PostgreSQL refuses to run as root: as
root the server runs as the user `postgres` (through `runuser`), and its folder belongs to
that user. Without the binaries (or the `asyncpg` driver) the tests that need PostgreSQL
are skipped, saying why.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}


_started: list[PostgresCluster] = []  # for the terminal summary


def find_bindir() -> Path | None:
    """The folder holding initdb, pg_ctl and psql, or None."""
    candidates = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(Path(os.environ["PG_BINDIR"]))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", Path(path).parent.name))

    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)]
    for folder in candidates:
        if all((folder / tool).is_file() for tool in ("initdb", "pg_ctl", "psql")):
            return folder
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresCluster:
    """A running throwaway cluster: `url(name)` for SQLAlchemy, `psql(sql)` for set-up."""

    bindir: Path
    folder: Path
    port: int
    run_as: str | None  # the OS user the server runs as, when we are root
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL through psql over TCP (trust authentication); its unaligned output."""
        done = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
             "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database, "-c", sql],
            capture_output=True, text=True, timeout=60,
        )
        if done.returncode:
            raise RuntimeError(f"psql failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout.strip()

    def create_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:16]}"
        self.psql(f'CREATE DATABASE "{name}"')
        return name

    def server_log(self) -> str:
        try:
            return (self.folder / "server.log").read_text(errors="replace")
        except OSError:
            return ""

    def _as_server_user(self, args: list[str]) -> list[str]:
        return ["runuser", "-u", self.run_as, "--", *args] if self.run_as else args

    def _run(self, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self._as_server_user(args), capture_output=True, text=True, timeout=timeout)

    def init(self) -> None:
        started = time.monotonic()
        done = self._run([str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                          "-E", "UTF8", "--locale=C", "--no-sync"])
        if done.returncode:
            raise RuntimeError(f"initdb failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        self.timings["initdb"] = time.monotonic() - started

    def start(self) -> None:
        options = " ".join(f"-c {name}={value}" for name, value in SERVER_SETTINGS.items())
        started = time.monotonic()
        done = self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60",
                          "-o", f"-p {self.port} -k {self.folder} {options}",
                          "-l", str(self.folder / "server.log"), "start"])
        if done.returncode:
            raise RuntimeError(f"pg_ctl start failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n"
                               f"{self.server_log()[-3000:]}")
        self.timings["start"] = time.monotonic() - started

    def stop(self, mode: str = "immediate") -> None:
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"], timeout=60)

    def restart(self, mode: str = "fast") -> None:
        """`pg_ctl restart`: what a minor upgrade, a maintenance window or a failover does."""
        self.stop(mode)
        self.start()

    def reap_when_gone(self, pid: int) -> None:
        """Stop the server and remove its folder once process `pid` is gone, however it
        ends: a pytest that dies (SIGILL, SIGKILL) never leaves a cluster running."""
        stop = " ".join(self._as_server_user([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"]))
        script = f"while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop}; rm -rf '{self.folder}'"
        subprocess.Popen(["sh", "-c", script], start_new_session=True, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_cluster() -> PostgresCluster:
    """initdb and start a cluster in a new temporary folder; skip if that is not possible here."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl, psql) not found: install postgresql-15 "
                    "or set PG_BINDIR")
    pytest.importorskip("asyncpg", reason="the asyncpg driver is not installed (pip install -e '.[test]')")
    run_as = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user for the server to run as")
        if shutil.which("runuser") is None:
            pytest.skip("running as root and runuser is missing: cannot start PostgreSQL as 'postgres'")
        run_as = "postgres"
    # Not under pytest's tmp_path: that is private to us (0700), and the server user must
    # reach its folder. mkdtemp's own folder is 0700 too, but handed over to that user.
    folder = Path(tempfile.mkdtemp(prefix="hermes-pg-"))
    if run_as:
        shutil.chown(folder, user=run_as, group=run_as)
    cluster = PostgresCluster(bindir, folder, 0, run_as)
    started = time.monotonic()
    try:
        cluster.init()
        for attempt in range(3):  # the free port may be taken between choosing and binding
            cluster.port = free_port()
            try:
                cluster.start()
                break
            except RuntimeError:
                if attempt == 2:
                    raise
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    cluster.timings["total"] = time.monotonic() - started
    cluster.reap_when_gone(os.getpid())
    return cluster


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One PostgreSQL cluster for the whole test session."""
    cluster = start_cluster()
    _started.append(cluster)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> str:
    """A fresh empty database on the session's cluster (a postgresql+asyncpg URL)."""
    return postgres_cluster.url(postgres_cluster.create_database())


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    """Say how long the session's cluster took to come up (initdb, start)."""
    if _started:
        times = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in _started[0].timings.items())
        terminalreporter.write_line(f"PostgreSQL test cluster ({_started[0].bindir}): {times}")
