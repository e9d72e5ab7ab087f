"""Shared fixtures: the partner stand-in over real loopback HTTP, configs, daemons in-process and
as subprocesses, and polling with a deadline (never a bare sleep) for synchronisation."""

import asyncio
import contextlib
import dataclasses
import inspect
import os
import types
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import aioresponses.core
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import standin  # noqa: E402
import tracker  # noqa: E402
from pgcluster import PostgresCluster, free_port, throwaway_cluster  # noqa: E402,F401

TOKEN = "test-token-5f3a9c"


class _MockedResponse(aiohttp.ClientResponse):
    """aioresponses 0.7.9 builds responses without the `stream_writer` that aiohttp 3.14 (a security
    release we keep) requires; with writer=None aiohttp only reads its output_size. Drop this shim
    once aioresponses ships the fix (pnuckowski/aioresponses#289)."""

    def __init__(self, *args: Any, stream_writer: Any = None, **kwargs: Any) -> None:
        writer: Any = stream_writer or types.SimpleNamespace(output_size=0)  # duck-typed: output_size only
        super().__init__(*args, stream_writer=writer, **kwargs)


aioresponses.core.ClientResponse = _MockedResponse  # type: ignore[misc]
ASYNC_TEST_TIMEOUT_S = 90


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run `async def` tests on a fresh event loop, bounded in time (what pytest-asyncio would do)."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    asyncio.run(asyncio.wait_for(pyfuncitem.obj(**kwargs), ASYNC_TEST_TIMEOUT_S))
    return True


LOG_LINES_ON_FAILURE = 40


def pytest_runtest_setup(item: pytest.Item) -> None:
    DaemonProcess.started.clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call" and report.failed:
        for daemon in DaemonProcess.started:
            tail = daemon.log().splitlines()[-LOG_LINES_ON_FAILURE:]
            report.sections.append((f"last lines of {daemon.log_path.name} (pid {daemon.pid})", "\n".join(tail)))


# ── scenarios and configs ───────────────────────────────────────────────────────────────────


def scenario(**overrides: Any) -> standin.Scenario:
    """A small burst on a fast clock with no faults; tests switch on what they exercise."""
    base = standin.Scenario(
        returns=300, arrive_over_s=1.0, step_s=(0.1, 0.3), cancel_share=0.1, unregistered_share=0.0,
        relist_share=0.0, broken_share=0.0, unknown_status_share=0.0, token=TOKEN,
    )
    return dataclasses.replace(base, **overrides)


FAST_SCHEDULE = tracker.ScheduleConfig(
    returns_every_s=0.1, track_every_s=0.2, detect_within_s=0.2, stale_after_s=3.0, retry_base_s=0.05, retry_max_s=0.5,
    shutdown_grace_s=1.0,
)


def make_config(db_path: Path, partner_url: str, **sections: Any) -> tracker.Config:
    config = tracker.Config(
        partner=tracker.PartnerConfig(base_url=partner_url, token=TOKEN, timeout_s=1.0, page_size=100),
        storage=tracker.StorageConfig(path=str(db_path)),
        http=tracker.HttpConfig(listen="127.0.0.1:0"),
        schedule=FAST_SCHEDULE,
        limits=tracker.LimitsConfig(concurrency=32, rate_per_s=2000),
    )
    return dataclasses.replace(config, **sections)


def config_toml(partner_url: str, db_path: Path, *, timeout_s: float = 1.0) -> str:
    """make_config's settings as a file, for daemons run as subprocesses (the token comes from the
    environment, as in production)."""
    sections = dataclasses.asdict(make_config(db_path, partner_url))
    del sections["partner"]["token"]
    sections["partner"]["timeout_s"] = timeout_s
    return standin.daemon_config_toml(sections)


@pytest.fixture
def start_partner() -> Iterator[Callable[..., standin.ThreadedStandIn]]:
    """Start a stand-in (real HTTP on loopback, its own thread and loop); stopped after the test."""
    started: list[standin.ThreadedStandIn] = []

    def start(s: standin.Scenario | None = None) -> standin.ThreadedStandIn:
        handle = standin.ThreadedStandIn(s or scenario())
        handle.start()
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "tracker.db"


# ── waiting with a deadline ─────────────────────────────────────────────────────────────────


async def wait_until(check: Callable[[], Awaitable[Any]], timeout_s: float = 30.0,
                     interval_s: float = 0.05, what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy; fail with its last value at the deadline."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; last: {last!r}")


def wait_until_sync(check: Callable[[], Any], timeout_s: float = 30.0, interval_s: float = 0.05,
                    what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; last: {last!r}")


async def ledger_of(partner: standin.ThreadedStandIn) -> dict[str, Any]:
    return await asyncio.to_thread(partner.ledger)


def everything_reported(partner: standin.ThreadedStandIn,
                        db: Path | str | None = None) -> Callable[[], Awaitable[bool]]:
    """The scenario has played out, the daemon has stored the whole feed (a late correction too) and
    the partner recorded every reportable item — and, given the database, the daemon knows it too (a
    report whose answer was lost is still pending until resent)."""
    async def check() -> bool:
        ledger = await ledger_of(partner)
        whole_feed = ledger["feed_acknowledged"] == ledger["feed_entries"]
        if not (ledger["finished"] and ledger["missing"] == 0 and whole_feed):
            return False
        return db is None or (await counts_in(db)).get("reports.pending", 0) == 0
    return check


def assert_nothing_lost_nothing_early(ledger: dict[str, Any]) -> None:
    """The partner's verdict on a finished burst: every reportable item recorded, once, as it
    stands, and none before its box was collected."""
    assert ledger["finished"] and ledger["missing"] == 0, ledger["missing_sample"]
    assert ledger["recorded"] == ledger["expected"] > 0
    assert ledger["premature"] == ledger["unknown"] == ledger["mismatched"] == 0


def db_count_reaches(db: Path, key: str, expected: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return (await counts_in(db)).get(key, 0) >= expected if db.exists() else False
    return check


@contextlib.asynccontextmanager
async def running_daemon(config_or_daemon: tracker.Config | tracker.Daemon) -> AsyncIterator[tracker.Daemon]:
    """A daemon running in this loop, started (its HTTP server listening) when the block begins,
    stopped and waited for when it ends — however the block ends. A daemon that failed to start
    raises here; one that crashed meanwhile, at the end of the block."""
    daemon = config_or_daemon if isinstance(config_or_daemon, tracker.Daemon) else tracker.Daemon(config_or_daemon)
    task = asyncio.create_task(daemon.run())
    try:
        async def started() -> bool:
            if task.done():
                task.result()  # it could not start: say why
            return daemon.started.is_set()
        await wait_until(started, 30, what="the daemon to start")
        yield daemon
    finally:
        daemon.stop()
        await task


@contextlib.asynccontextmanager
async def running_daemons(config: tracker.Config, n: int) -> AsyncIterator[list[tracker.Daemon]]:
    """n instances of the daemon sharing one configuration (PostgreSQL), as running_daemon."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(running_daemon(config)) for _ in range(n)]


async def run_daemon_until(config: tracker.Config, until: Callable[[], Awaitable[Any]],
                           timeout_s: float = 30.0) -> tracker.Daemon:
    """Run a daemon in this loop until `until()` holds, then stop it and wait for it to exit."""
    async with running_daemon(config) as daemon:
        await wait_until(until, timeout_s, what=getattr(until, "__qualname__", "condition"))
    return daemon


async def scraped(daemon: tracker.Daemon, sample: str) -> float:
    """A sample's value as the daemon's /metrics shows it (`name{labels}` as written there), 0 if absent."""
    async with aiohttp.ClientSession() as http, http.get(f"http://{daemon.http_address}/metrics") as answer:
        text = await answer.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.rsplit(" ", 1)[0] == sample)


def helper_of(parent: int, command: str) -> int | None:
    """The pid of the `tracker.py <command>` (api-process, webhook-process) the process `parent`
    started, while one runs."""
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or command.encode() not in (entry / "cmdline").read_bytes():
                continue
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except OSError:  # it ended meanwhile
            continue
        if int(ppid) == parent and state != "Z":
            return int(entry.name)
    return None


def running(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def api_key_in(where: str | Path, name: str,
                     scopes: tuple[str, ...] = ("returns:read", "returns:write", "shipments:check"),
                     **options: Any) -> str:
    """A key of the shop's API in the state, as `tracker.py api-key create` makes one; its secret."""
    secret = tracker.new_api_key()
    store = await tracker.Store.open(str(where))
    try:
        await store.add_api_key(tracker.ApiKey(name=name, scopes=scopes, created_at=time.time(), **options),
                                tracker.api_key_hash(secret), tracker.api_key_lookup(secret))
    finally:
        await store.close()
    return secret


def create_schema(db: Path) -> None:
    """An empty state database at `db`, as the daemon creates it."""
    async def create() -> None:
        await (await tracker.Store.open(str(db))).close()
    asyncio.run(create())


async def counts_in(db: Path | str) -> dict[str, int]:
    """The counts `status` shows, of a SQLite file or (given its URL) a PostgreSQL database."""
    url = str(db) if str(db).startswith("postgresql://") else ""
    store = await tracker.open_store(tracker.StorageConfig(path=str(db), url=url), readonly=True)
    try:
        return await store.counts()
    finally:
        await store.close()


# ── the daemon as a subprocess ──────────────────────────────────────────────────────────────


class DaemonProcess:
    """`python tracker.py run` as a child process with its log in a file. A failing test's report
    ends with the last lines of each log it started (in CI nothing else of them survives)."""

    started: list["DaemonProcess"] = []  # by the test running now

    def __init__(self, config_path: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.env = {**os.environ, tracker.ENV_TOKEN: TOKEN, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, command: str = "run") -> "DaemonProcess":
        with open(self.log_path, "ab") as log:  # the child keeps its own handle
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "tracker.py"), command, "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.config_path.parent,
            )
        DaemonProcess.started.append(self)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def daemon_process(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    made: list[DaemonProcess] = []

    def make(config_text: str, env: dict[str, str] | None = None) -> DaemonProcess:
        config_path = tmp_path / "config.toml"
        config_path.write_text(config_text)
        process = DaemonProcess(config_path, tmp_path / "tracker.log", env)
        made.append(process)
        return process

    yield make
    for process in made:
        process.stop()


# ── a throwaway PostgreSQL ──────────────────────────────────────────────────────────────────


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    with throwaway_cluster() as cluster:
        yield cluster


@pytest.fixture
def pg_url(postgres: PostgresCluster) -> str:
    """An empty database of its own for one test."""
    return postgres.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a storage behaviour test keeps its state: a SQLite file, or a PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "tracker.db")
    return request.getfixturevalue("postgres").new_database()


async def open_backend(where: str | Path) -> tracker.StateStore:
    """The store the `backend` fixture names: a PostgreSQL URL, or a SQLite file."""
    return await tracker.Store.open(str(where))


def in_dialect(store: tracker.StateStore, sql: str) -> str:
    """A test's own query, written with SQLite's `?`, for the store at hand."""
    return sql.replace("?", "%s") if store.db.dialect is tracker.Dialect.POSTGRESQL else sql


# ── a systemd booted for the tests ──────────────────────────────────────────────────────────

import sysboot  # noqa: E402


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The systemd tests go first: one worker runs them, mostly waiting on systemd's timers, while
    the others take the rest. Work stealing takes tests from the end of a worker's queue, so the
    module's tests stay together on one worker and its booted systemd serves them all."""
    items.sort(key=lambda item: item.path.name != "test_systemd.py")  # a stable sort: the rest keep their order


@pytest.fixture(scope="module")
def booted_systemd() -> Iterator[sysboot.BootedSystemd]:
    """One systemd booted for a module's tests (sysboot.py: namespaces of its own, the machine's
    files untouched), shut down after them; nothing of it may be left on the machine."""
    with sysboot.booted_systemd(ROOT) as booted:
        yield booted
    assert booted.leftovers() == []


@pytest.fixture
def fresh_systemd() -> Iterator[sysboot.BootedSystemd]:
    """A systemd of its own for one test (booting takes about a second)."""
    with sysboot.booted_systemd(ROOT) as booted:
        yield booted
    assert booted.leftovers() == []
