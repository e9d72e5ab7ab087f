"""A throwaway PostgreSQL cluster for the tests and benchmarks: `initdb` in a temporary directory,
started on a free loopback port, stopped and removed after. Debian's `postgresql` package provides
the binaries (./install puts it there); no system cluster or service is used. PostgreSQL refuses
to run as root: as root, the cluster belongs to the `postgres` user (or `nobody`)."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresCluster:
    """A PostgreSQL cluster in a temporary directory on a loopback port, started by the tests and
    stopped after them (Debian's `postgresql` package: ./install puts it there). PostgreSQL
    refuses to run as root: as root, the cluster belongs to the `postgres` user (or `nobody`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.data = directory / "data"
        self.port = free_port()
        self.bin = self._bindir()
        self.log = directory / "postgres.log"
        self._databases = 0

    @staticmethod
    def _bindir() -> Path:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not found:
            raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql: run ./install")
        return found[-1].parent

    def _as_owner(self, *argv: str) -> list[str]:
        if os.getuid() != 0:
            return list(argv)
        owner = "postgres" if _user_exists("postgres") else "nobody"
        return ["runuser", "-u", owner, "--", *argv]

    def _chown_to_owner(self) -> None:
        if os.getuid() == 0:
            owner = pwd.getpwnam("postgres" if _user_exists("postgres") else "nobody")
            os.chown(self.directory, owner.pw_uid, owner.pw_gid)

    def start(self) -> None:
        self._chown_to_owner()
        if not self.data.exists():
            subprocess.run(self._as_owner(str(self.bin / "initdb"), "-D", str(self.data), "-U", "tracker",
                                          "--auth=trust", "-E", "UTF8", "--no-sync"),
                           check=True, capture_output=True)
        options = (f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
                   " -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        subprocess.run(self._as_owner(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options,
                                      "-l", str(self.log), "-w", "start"), check=True, capture_output=True)

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(self._as_owner(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"),
                       check=False, capture_output=True)

    def reload(self) -> None:
        subprocess.run(self._as_owner(str(self.bin / "pg_ctl"), "-D", str(self.data), "reload"),
                       check=True, capture_output=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://tracker@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A new, empty database; its URL."""
        import psycopg  # the tracker's driver (requirements.txt)
        self._databases += 1
        name = f"test_{self._databases}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")  # our own name: no quoting needed
        return self.url(name)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True




@contextmanager
def throwaway_cluster() -> Iterator[PostgresCluster]:
    """A started cluster in its own directory under /tmp (pytest's temporary directories are
    private to the user running the tests; the cluster's owner must reach its own)."""
    directory = Path(tempfile.mkdtemp(prefix="tracker-postgres-"))
    cluster = PostgresCluster(directory)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(directory, ignore_errors=True)
