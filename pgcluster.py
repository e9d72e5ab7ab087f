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
import time
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

    def __init__(self, directory: Path, *, durable: bool = False, loses_last_commits: bool = False) -> None:
        self.directory = directory
        self.data = directory / "data"
        self.port = free_port()
        self.durable = durable  # commits wait for the disk (and a synchronous standby): for failover tests
        self.loses_last_commits = loses_last_commits
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
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c max_connections=200"
        if not self.durable:
            # A crash of the machine could lose commits; a crash of the server (stop("immediate"),
            # which the restart tests do) loses none: a commit is in the kernel before it is answered.
            options += " -c fsync=off -c full_page_writes=off"
        if self.loses_last_commits:
            # Commits are answered before their WAL is written, and it is written every 10 s: a
            # crash loses the last seconds of acknowledged commits, as a failover to an
            # asynchronous standby does.
            options += " -c synchronous_commit=off -c wal_writer_delay=10000 -c wal_writer_flush_after=1GB"
        subprocess.run(self._as_owner(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options,
                                      "-l", str(self.log), "-w", "start"), check=True, capture_output=True)

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(self._as_owner(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"),
                       check=False, capture_output=True)

    def start_standby_of(self, primary: "PostgresCluster") -> None:
        """A streaming replica of `primary` (pg_basebackup -R), started; `primary` then commits only
        once this standby has the commit too (synchronous replication), so a failover loses none."""
        self._chown_to_owner()
        subprocess.run(self._as_owner(str(self.bin / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port),
                                      "-U", "tracker", "-D", str(self.data), "-R", "-X", "stream", "--checkpoint=fast"),
                       check=True, capture_output=True)
        self.start()
        import psycopg
        with psycopg.connect(primary.url(), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            conn.execute("SELECT pg_reload_conf()")
            deadline = time.monotonic() + 30
            while conn.execute("SELECT 1 FROM pg_stat_replication WHERE sync_state = 'sync'").fetchone() is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the standby on port {self.port} never became synchronous")
                time.sleep(0.05)  # polling the server's view, with a deadline

    def promote(self) -> None:
        subprocess.run(self._as_owner(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "promote"),
                       check=True, capture_output=True)

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
def throwaway_cluster(*, durable: bool = False, loses_last_commits: bool = False,
                      standby_of: PostgresCluster | None = None) -> Iterator[PostgresCluster]:
    """A started cluster in its own directory under /tmp (pytest's temporary directories are
    private to the user running the tests; the cluster's owner must reach its own) — or, given
    `standby_of`, a synchronous streaming replica of that one."""
    directory = Path(tempfile.mkdtemp(prefix="tracker-postgres-"))
    cluster = PostgresCluster(directory, durable=durable, loses_last_commits=loses_last_commits)
    try:
        if standby_of is not None:
            cluster.start_standby_of(standby_of)
        else:
            cluster.start()
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(directory, ignore_errors=True)
