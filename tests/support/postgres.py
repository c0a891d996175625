"""A throwaway PostgreSQL cluster for the tests: Debian's server binaries, ``initdb`` into a
temporary directory, ``postgres`` listening only on a unix socket in that directory, run as
a non-root user (PostgreSQL refuses root), with fsync off: nothing here has to survive the
machine. One cluster serves a whole test session; each test gets a schema of its own.
"""

from __future__ import annotations

import atexit
import ctypes
import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

SUPERUSER = "era"
DATABASE = "era"


def find_bin_dir() -> Path | None:
    """The newest installed server's bin directory (Debian keeps them under /usr/lib/postgresql)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parent.parent.name.split(".")])
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: the forked child only calls it
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the postmaster, before exec: a fast shutdown when the test process dies, even by
    SIGKILL, so no cluster outlives its tests. (Python calls this after the switch to the
    non-root user, which would clear it.)"""
    _LIBC.prctl(PR_SET_PDEATHSIG, int(signal.SIGINT), 0, 0, 0)


def _run_as() -> pwd.struct_passwd | None:
    """Who the server runs as: the postgres system user when we are root (else nobody), or us."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("no non-root user to run PostgreSQL as (neither postgres nor nobody exists)")


class PostgresCluster:
    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="era-pg-", dir="/tmp"))  # short: the socket path
        self.data = self.dir / "data"
        self.user = _run_as()
        self.proc: subprocess.Popen | None = None
        self._names = itertools.count(1)
        self.start_s = 0.0

    def _popen_args(self) -> dict:
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": [],
                "env": dict(os.environ, HOME=str(self.dir), USER=self.user.pw_name, LC_ALL="C")}

    def start(self, timeout: float = 30) -> "PostgresCluster":
        started = time.perf_counter()
        try:
            self._start(timeout)
        except BaseException:
            self.stop()  # the directory too
            raise
        self.start_s = time.perf_counter() - started
        return self

    def _start(self, timeout: float) -> None:
        import psycopg

        if self.user is not None:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        initdb = subprocess.run([str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                                 "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"],
                                capture_output=True, text=True, cwd=self.dir, **self._popen_args())
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed: {initdb.stderr[-2000:]}")
        with open(self.dir / "server.log", "wb") as log:
            self.proc = subprocess.Popen(
                [str(self.bin_dir / "postgres"), "-D", str(self.data), "-k", str(self.dir), "-c", "listen_addresses=",
                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", "max_connections=200"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.dir, preexec_fn=_die_with_parent, **self._popen_args())
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
                    conn.execute(f"CREATE DATABASE {DATABASE}")
                return
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("PostgreSQL did not start: " + self.log_tail()) from None
                time.sleep(0.05)

    def log_tail(self) -> str:
        try:
            return (self.dir / "server.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def url(self, database: str = DATABASE, schema: str | None = None) -> str:
        """A libpq URL over the unix socket; with ``schema``, one whose tables live there."""
        url = f"postgresql://{SUPERUSER}@/{database}?host={quote(str(self.dir), safe='/')}"
        if schema:
            url += "&options=" + quote(f"-c search_path={schema}", safe="")
        return url

    def new_schema(self) -> tuple[str, str]:
        """A fresh, empty schema: its name and a store URL selecting it."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {name}")
        return name, self.url(schema=name)

    def drop_schema(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # "fast" shutdown: clients are cut off
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
