#!/usr/bin/env python3
"""tracker — collects return orders from the partner's feed, tracks each pickup by its
waybill until the courier has collected it, and reports every collected order item to the
partner's results endpoint: exactly once in effect, never lost, never early.

The partner's contract is ../shared/partner-api.md. State lives in one SQLite file, or in
PostgreSQL (storage.url), where any number of instances share the work; every state transition
is committed before it is acted on, so kill -9 at any instant loses nothing.

    python tracker.py run    [--config PATH]   the daemon
    python tracker.py once   [--config PATH]   one pass over what is due now, then exit
    python tracker.py check-config             the config as the daemon would read it
    python tracker.py status [--config PATH]   what the state store holds, for a terminal
    python tracker.py show ID…                 one return's whole story
    python tracker.py export                   every return, streamed (CSV or JSON lines)
    python tracker.py requeue {dead|stale|quarantined} [ids…]   back into the pipeline
    python tracker.py replay TIMELINES.jsonl   the tracking schedule's what-if
    python tracker.py migrate --to URL         a SQLite state into an empty PostgreSQL database
    python tracker.py check SHP…               check these waybills now
    python tracker.py api-key create|list|revoke   the shop's API keys; `audit`, its write requests
    python tracker.py webhooks list|deliveries|replay|enable|test|secret   the shop's receivers
    python tracker.py demo                     the whole pipeline against the partner stand-in

Contents, in the order data flows (each section opens with a banner of its name):

    Configuration        Config and its sections; load_config: config.toml, then the environment
                         and systemd credentials; every wrong value a ConfigError naming its key
    Records and states   BoxState, ReportState; ReturnItem, Correction, QuarantinedItem,
                         FeedPage (read from a SentCursor), DueBox, DueReport, StatusChange,
                         DueDelivery; the transitions (BoxUpdate, ReportUpdate, WakeBoxes, Prune,
                         Heartbeat, CheckNow, Audit, Idempotent, DeliveryUpdate, WebhookEndpoints,
                         EnableEndpoint, AnnounceOverdue), CommitResult
    Storage              SQLite's tables; SQL, every statement written once; PostgreSQL's tables
                         and the fleet's statements; the dialects (DIALECT_RULES, STATEMENTS);
                         the adapters (Database: SqliteDatabase, PostgresDatabase); the fleet
                         (Fleet: SoloFleet, PgFleet — claims, the feed's lease, membership);
                         Store, every transition and read once (the StateStore Protocol)
    Partner client       Reply and its Outcome; AdaptiveRate, CircuitBreaker, TokenGate,
                         RetryBudget, PrioritySemaphore; PartnerClient; what the answers mean
                         (parse_returns_page, validate_return, parse_tracking, parse_history)
    Tracking schedule    TrackingSchedule: when to ask about a box again, learned from histories
    Stages               decide_box_update, decide_report_update; StopSignal; Committer, the only
                         writer; Dispatcher; Stages: collect, track (check_box), report (send_report)
    Alerts               what each alert says (*_alert → Alert); Alerter, the Slack sender
    Webhooks             webhook_body, decide_delivery, signed_headers; WebhookSender, one an
                         endpoint (its Dispatcher and breaker), delivering from the outbox
    The shop's API       keys (new_api_key, KeyRing), Problem (RFC 9457), api_return; ShopApi;
                         the API's own process (serve_api_process); HelperProcess, the daemon's
                         side of it and of the webhooks' process
    Observability, HTTP  Redactor, configure_logging, Metrics and ApiMetrics, start_http_server
    Daemon               SystemdNotifier; OverdueWatch, Housekeeping; Daemon: start, the stages'
                         task group, the one way to stop and the order of shutdown
    CLI                  build_parser, main; migrate, requeue, replay, show, export, status
"""

import argparse
import asyncio
import base64
import binascii
import bisect
import collections
import contextlib
import csv
import dataclasses
import datetime as dt
import enum
import errno
import fcntl
import functools
import gc
import hashlib
import hmac
import ipaddress
import heapq
import itertools
import json
import logging
import math
import os
import random
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import sys
import tempfile
import time
import tomllib
import typing
import urllib.parse
import zlib
import zoneinfo
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import aiosqlite
import prometheus_client
import standardwebhooks
import structlog
from aiohttp import web

if TYPE_CHECKING:
    import psycopg

VERSION = "0.1.0"
USER_AGENT = f"returns-tracker/{VERSION}"


class Logger(typing.Protocol):
    """What the daemon asks of a logger (structlog's bound loggers): an event name, then fields."""

    def debug(self, event: str, **fields: Any) -> Any: ...
    def info(self, event: str, **fields: Any) -> Any: ...
    def warning(self, event: str, **fields: Any) -> Any: ...
    def error(self, event: str, **fields: Any) -> Any: ...


# ════════════════════════════════════════════════════════════════════════════════════════════
# Configuration — config.toml, overridden by the environment and systemd credentials.
# A wrong value stops the start with one line naming the key; nothing is started.
# ════════════════════════════════════════════════════════════════════════════════════════════

ENV_TOKEN = "TRACKER_PARTNER_TOKEN"
ENV_WEBHOOK = "TRACKER_SLACK_WEBHOOK_URL"
ENV_DATABASE_URL = "TRACKER_DATABASE_URL"
CREDENTIAL_TOKEN_FILE = "partner_token"
CREDENTIAL_DATABASE_PASSWORD_FILE = "database_password"
ENV_WEBHOOK_SECRET = "TRACKER_WEBHOOK_SECRET_"  # + the endpoint's name in capitals, - as _
CREDENTIAL_WEBHOOK_SECRET = "webhook_"  # + the endpoint's name; + ".previous" during a rotation
SECRET_KEYS = frozenset({"partner.token", "slack.webhook_url", "storage.url", "webhook.secret",
                         "webhook.previous_secret"})


class ConfigError(Exception):
    """A config value that cannot be used. `key` is the dotted TOML key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclasses.dataclass(frozen=True, kw_only=True)
class PartnerConfig:
    base_url: str
    token: str = dataclasses.field(default="", repr=False)
    timeout_s: float = 10.0
    page_size: int = 200


@dataclasses.dataclass(frozen=True, kw_only=True)
class StorageConfig:
    path: str = "tracker.db"
    url: str = dataclasses.field(default="", repr=False)  # postgresql://…: the state lives there, not in `path`
    keep_days: int = 90  # finished rows older than this are deleted; 0 keeps everything
    lease_s: float = 30.0  # PostgreSQL: a dead instance's claims and feed lease pass on this long after

    @property
    def where(self) -> str:
        """Where the state lives, fit to print: the file, or the database URL without its password."""
        return redact_database_url(self.url) if self.url else self.path


class Listening:
    """A section with a `listen` of "host:port" (validated by _validate_listen)."""

    listen: str

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


@dataclasses.dataclass(frozen=True, kw_only=True)
class HttpConfig(Listening):
    listen: str = "127.0.0.1:9108"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SlackConfig:
    webhook_url: str = dataclasses.field(default="", repr=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    returns_every_s: float = 30.0
    track_every_s: float = 900.0
    detect_within_s: float = 900.0
    timezone: str = "Asia/Seoul"
    stale_after_s: float = 259200.0
    overdue_after_s: float = 259200.0
    retry_base_s: float = 1.0
    retry_max_s: float = 300.0
    shutdown_grace_s: float = 5.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class LimitsConfig:
    concurrency: int = 16
    rate_per_s: float = 20.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class LogConfig:
    level: str = "info"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ApiConfig(Listening):
    listen: str = ""  # "host:port" of the shop's API, a listener of its own; empty: no API
    trusted_proxies: tuple[str, ...] = ()  # CIDRs whose X-Forwarded-For is believed; nobody else's is
    max_body_bytes: int = 1_048_576  # a batch of 500 returns is about 100 KB
    # Served by a process of its own, on the other core: a lookup's HTTP, key check and reads
    # never take time from the pipeline's event loop (its writes are handed to the daemon).
    own_process: bool = True


WEBHOOK_EVENTS = ("return.collected", "return.cancelled", "return.corrected", "shipment.stale", "pickup.overdue",
                  "report.refused")
WEBHOOK_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
WEBHOOK_SECRET_PREFIX = "whsec_"  # Standard Webhooks: whsec_ + base64 of 24 to 64 random bytes


@dataclasses.dataclass(frozen=True, kw_only=True)
class WebhookConfig:
    """One of the shop's receivers ([[webhook]]): the events it is sent, signed as Standard
    Webhooks say; each delivery retried on `retry_schedule_s` (Svix's default)."""

    name: str
    url: str
    events: tuple[str, ...] = WEBHOOK_EVENTS
    timeout_s: float = 10.0
    retry_schedule_s: tuple[float, ...] = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
    disable_after_s: float = 5 * 86400.0  # failing this long without a success: disabled, and said on Slack
    # A return.cancelled is sent this long after the cancel was seen: the carrier ends a waybill it
    # reissues `cancelled` too, and the feed's correction moving the return to the new waybill,
    # seen meanwhile, takes it back (return.corrected says what happened instead).
    cancel_hold_s: float = 900.0
    secret: str = dataclasses.field(default="", repr=False)  # whsec_…: systemd credential webhook_<name>
    previous_secret: str = dataclasses.field(default="", repr=False)  # during a rotation both sign

    @property
    def environment_name(self) -> str:
        return ENV_WEBHOOK_SECRET + self.name.upper().replace("-", "_")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    partner: PartnerConfig
    storage: StorageConfig = StorageConfig()
    http: HttpConfig = HttpConfig()
    slack: SlackConfig = SlackConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    limits: LimitsConfig = LimitsConfig()
    log: LogConfig = LogConfig()
    api: ApiConfig = ApiConfig()
    webhook: tuple[WebhookConfig, ...] = ()  # [[webhook]], one table each

    @property
    def secrets(self) -> tuple[str, ...]:
        database = (self.storage.url, _database_password(self.storage.url)) if self.storage.url else ()
        webhooks = [secret for w in self.webhook for secret in (w.secret, w.previous_secret)]
        return tuple(s for s in (self.partner.token, self.slack.webhook_url, *database, *webhooks) if s)


LOG_LEVELS = ("debug", "info", "warning", "error")


def load_config(path: Path, env: Mapping[str, str] | None = None, *, secrets_needed: bool = True) -> Config:
    """Read, type-check, override from the environment and validate. Raises ConfigError."""
    env = os.environ if env is None else env
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("config", f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("config", f"cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"not valid TOML: {exc}") from None
    config = _typed_config(raw)
    config = _apply_overrides(config, env)
    _validate(config, secrets_needed)
    storage = Path(config.storage.path)
    if not storage.is_absolute():  # relative to the config file, not to wherever we were started
        storage = path.resolve().parent / storage
    return dataclasses.replace(config, storage=dataclasses.replace(config.storage, path=str(storage)))


def _typed_config(raw: dict[str, Any]) -> Config:
    sections: dict[str, Any] = {}
    known = {f.name: f for f in dataclasses.fields(Config)}
    for name in raw:
        if name not in known:
            raise ConfigError(name, "unknown section")
    for name in known:
        if name == "webhook":
            sections[name] = _typed_webhooks(raw.get(name, []))
            continue
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(name, "must be a table ([" + name + "])")
        section_cls = typing.get_type_hints(Config)[name]
        sections[name] = _typed_section(name, section_cls, table)
    return Config(**sections)


def _typed_webhooks(tables: Any) -> tuple[WebhookConfig, ...]:
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError("webhook", "must be an array of tables ([[webhook]], one per receiver)")
    return tuple(_typed_section("webhook", WebhookConfig, table) for table in tables)


def _typed_section(section: str, cls: type, table: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"{section}.{key}", "unknown key")
        values[key] = _typed_value(f"{section}.{key}", hints[key], value)
    for name, field in fields.items():
        no_default = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if name not in values and no_default:
            raise ConfigError(f"{section}.{name}", "missing required value")
    return cls(**values)


def _typed_value(key: str, kind: type, value: Any) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {_describe(value)}")
        return value
    if kind is float:  # seconds accept fractions and whole numbers alike
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise ConfigError(key, "must be a finite number")
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected a whole number, got {_describe(value)}")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {_describe(value, key)}")
        return value
    if kind == tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ConfigError(key, f"expected a list of strings, got {_describe(value, key)}")
        return tuple(value)
    if kind == tuple[float, ...]:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list of numbers, got {_describe(value, key)}")
        return tuple(_typed_value(key, float, item) for item in value)
    raise TypeError(f"unsupported config type {kind!r}")  # a programming error, not user input


def _describe(value: Any, key: str = "") -> str:
    if key in SECRET_KEYS:  # a mistyped secret is still a secret: name its type only
        return type(value).__name__
    return f"{type(value).__name__} {json.dumps(value, default=str)[:40]}"


def _apply_overrides(config: Config, env: Mapping[str, str]) -> Config:
    partner, slack = config.partner, config.slack
    if env.get(ENV_TOKEN):
        partner = dataclasses.replace(partner, token=env[ENV_TOKEN].strip())
    credentials = env.get("CREDENTIALS_DIRECTORY")
    if credentials:  # systemd LoadCredential= wins: it is the most specific source
        token_file = Path(credentials) / CREDENTIAL_TOKEN_FILE
        try:
            partner = dataclasses.replace(partner, token=token_file.read_text(encoding="utf-8").strip())
        except FileNotFoundError:
            pass
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("partner.token", f"cannot read credential {token_file}: {exc}") from None
    if env.get(ENV_WEBHOOK):
        slack = dataclasses.replace(slack, webhook_url=env[ENV_WEBHOOK].strip())
    webhooks = tuple(_webhook_secrets(w, env, credentials) for w in config.webhook)
    storage = config.storage
    if env.get(ENV_DATABASE_URL):
        storage = dataclasses.replace(storage, url=env[ENV_DATABASE_URL].strip())
    if credentials and storage.url:  # a password kept out of the URL and the config file
        password_file = Path(credentials) / CREDENTIAL_DATABASE_PASSWORD_FILE
        try:
            password = password_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            password = ""
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("storage.url", f"cannot read credential {password_file}: {exc}") from None
        if password:
            storage = dataclasses.replace(storage, url=_with_password(storage.url, password))
    return dataclasses.replace(config, partner=partner, slack=slack, storage=storage, webhook=webhooks)


def _webhook_secrets(webhook: WebhookConfig, env: Mapping[str, str], credentials: str | None) -> WebhookConfig:
    """The receiver's secret and, during a rotation, the previous one: a systemd credential
    (webhook_<name>, webhook_<name>.previous) over the environment (TRACKER_WEBHOOK_SECRET_<NAME>,
    …_PREVIOUS) over the config file."""
    found = {"secret": webhook.secret, "previous_secret": webhook.previous_secret}
    for field, suffix in (("secret", ""), ("previous_secret", "_PREVIOUS")):
        if env.get(webhook.environment_name + suffix):
            found[field] = env[webhook.environment_name + suffix].strip()
    if credentials:
        for field, suffix in (("secret", ""), ("previous_secret", ".previous")):
            path = Path(credentials) / f"{CREDENTIAL_WEBHOOK_SECRET}{webhook.name}{suffix}"
            try:
                found[field] = path.read_text(encoding="utf-8").strip()
            except FileNotFoundError:
                pass
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"webhook.{webhook.name}.secret", f"cannot read credential {path}: {exc}") from None
    return dataclasses.replace(webhook, secret=found["secret"], previous_secret=found["previous_secret"])


def _with_password(url: str, password: str) -> str:
    """The URL with this password in its user part (percent-encoded), replacing any there."""
    scheme, _, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:{urllib.parse.quote(password, safe='')}@{hosts}{slash}{tail}"


def _database_password(url: str) -> str:
    try:
        return str(pg().conninfo.conninfo_to_dict(url).get("password") or "")
    except pg().ProgrammingError:
        return ""


def _validate(config: Config, secrets_needed: bool = True) -> None:
    _require_http_url("partner.base_url", config.partner.base_url)
    if not config.partner.token:
        raise ConfigError(
            "partner.token",
            f"missing required value (set {ENV_TOKEN}, a systemd credential "
            f"'{CREDENTIAL_TOKEN_FILE}', or partner.token)",
        )
    if any(c.isspace() for c in config.partner.token):
        raise ConfigError("partner.token", "must not contain white space")
    _require_range("partner.timeout_s", config.partner.timeout_s, 0.05, 300)
    _require_range("partner.page_size", config.partner.page_size, 1, 500)
    if not config.storage.path:
        raise ConfigError("storage.path", "must not be empty")
    if config.storage.url:
        _require_database_url(config.storage.url)
    _require_range("storage.lease_s", config.storage.lease_s, 2, 600)
    if config.storage.url and config.storage.lease_s < 2 * config.partner.timeout_s:  # SQLite: no leases
        raise ConfigError("storage.lease_s", f"must be at least twice partner.timeout_s "
                                             f"({2 * config.partner.timeout_s:g}): a call must end within its claim")
    _require_range("storage.keep_days", config.storage.keep_days, 0, 36500)
    _validate_listen(config.http.listen)
    if config.slack.webhook_url:
        _require_http_url("slack.webhook_url", config.slack.webhook_url)
    schedule = config.schedule
    for name in ("returns_every_s", "track_every_s", "detect_within_s", "retry_base_s", "retry_max_s"):
        _require_range(f"schedule.{name}", getattr(schedule, name), 0.01, 7 * 86400)
    _require_range("schedule.stale_after_s", schedule.stale_after_s, 0.1, 365 * 86400)
    _require_range("schedule.overdue_after_s", schedule.overdue_after_s, 0.1, 365 * 86400)
    try:
        zoneinfo.ZoneInfo(schedule.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError("schedule.timezone", f'not a known IANA time zone: "{schedule.timezone}"') from None
    _require_range("schedule.shutdown_grace_s", schedule.shutdown_grace_s, 0.1, 60)
    if schedule.retry_max_s < schedule.retry_base_s:
        raise ConfigError("schedule.retry_max_s", "must not be below schedule.retry_base_s")
    _require_range("limits.concurrency", config.limits.concurrency, 1, 1000)
    _require_range("limits.rate_per_s", config.limits.rate_per_s, 0.01, 100000)
    if config.log.level not in LOG_LEVELS:
        raise ConfigError("log.level", f"must be one of {', '.join(LOG_LEVELS)}")
    _validate_api(config.api, config.http)
    _validate_webhooks(config.webhook, secrets_needed)


def _validate_webhooks(webhooks: Sequence[WebhookConfig], secrets_needed: bool) -> None:
    names = [w.name for w in webhooks]
    for webhook in webhooks:
        if not WEBHOOK_NAME.fullmatch(webhook.name):
            raise ConfigError("webhook.name", f"1 to 40 of a-z, 0-9, - and _, starting with a letter or digit: "
                                              f"{webhook.name[:40]!r}")
        key = f"webhook.{webhook.name}"
        if names.count(webhook.name) > 1:
            raise ConfigError(f"{key}.name", "two [[webhook]] tables have this name")
        _require_http_url(f"{key}.url", webhook.url)
        unknown = sorted(set(webhook.events) - set(WEBHOOK_EVENTS))
        if unknown or not webhook.events:
            raise ConfigError(f"{key}.events", f"a list of {', '.join(WEBHOOK_EVENTS)}"
                                               + (f"; not {', '.join(unknown)}" if unknown else ""))
        _require_range(f"{key}.timeout_s", webhook.timeout_s, 0.1, 120)
        if not 1 <= len(webhook.retry_schedule_s) <= 50:
            raise ConfigError(f"{key}.retry_schedule_s", "1 to 50 delays in seconds, the first usually 0")
        for delay in webhook.retry_schedule_s:
            _require_range(f"{key}.retry_schedule_s", delay, 0, 7 * 86400)
        _require_range(f"{key}.disable_after_s", webhook.disable_after_s, 1, 365 * 86400)
        _require_range(f"{key}.cancel_hold_s", webhook.cancel_hold_s, 0, 86400)
        for field, credential in (("secret", webhook.name), ("previous_secret", webhook.name + ".previous")):
            secret = getattr(webhook, field)
            if field == "secret" and not secret and secrets_needed:
                raise ConfigError(f"{key}.secret", f"missing required value (set the systemd credential "
                                                   f"'{CREDENTIAL_WEBHOOK_SECRET}{credential}', "
                                                   f"{webhook.environment_name}, or secret)")
            if secret and not webhook_secret_well_formed(secret):
                raise ConfigError(f"{key}.{field}", f"not a Standard Webhooks secret: {WEBHOOK_SECRET_PREFIX} and "
                                                    "the base64 of 24 to 64 random bytes (tracker.py webhooks secret)")


def webhook_secret_well_formed(secret: str) -> bool:
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        return False
    try:
        key = base64.b64decode(secret[len(WEBHOOK_SECRET_PREFIX):], validate=True)
    except (ValueError, binascii.Error):
        return False
    return 24 <= len(key) <= 64


def new_webhook_secret() -> str:
    return WEBHOOK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _require_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(key, f"must be between {low:g} and {high:g}, got {value:g}")


def _require_database_url(value: str) -> None:
    if not value.startswith(("postgresql://", "postgres://")):
        raise ConfigError("storage.url", "must be a postgresql:// URL (or empty: the SQLite file at storage.path)")
    try:
        pg().conninfo.conninfo_to_dict(value)
    except pg().ProgrammingError:
        raise ConfigError("storage.url", "not a valid PostgreSQL connection URL") from None


def _require_http_url(key: str, value: str) -> None:
    try:
        url = aiohttp.client.URL(value)
    except (ValueError, TypeError):
        raise ConfigError(key, "not a valid URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(key, "must be an http:// or https:// URL with a host")


def _validate_listen(listen: str, key: str = "http.listen") -> None:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(key, f'expected "host:port", got "{listen}"')


def _validate_api(api: ApiConfig, http: HttpConfig) -> None:
    if api.listen:
        _validate_listen(api.listen, "api.listen")
        if api.listen == http.listen and api.port != 0:
            raise ConfigError("api.listen", "must differ from http.listen: the API has a listener of its own")
    for cidr in api.trusted_proxies:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError("api.trusted_proxies", f'not an IP network: "{cidr}"') from None
    _require_range("api.max_body_bytes", api.max_body_bytes, 1024, 64 * 1024 * 1024)


# ════════════════════════════════════════════════════════════════════════════════════════════
# Records and states — what flows through the pipeline, each frozen and built by keyword: a
# feed page's returns and quarantined items, a correction, a box or report that is due, the
# outcome of one partner call (BoxUpdate, ReportUpdate), the other transitions the committer
# stores, what a commit did; and the states a box and a report pass through.
# ════════════════════════════════════════════════════════════════════════════════════════════


class BoxState(enum.StrEnum):
    TRACKING = "tracking"  # polled until a terminal status
    DELIVERED = "delivered"  # courier collected it; its items' reports are queued
    CANCELLED = "cancelled"  # customer withdrew; nothing to report
    STALE = "stale"  # carrier never registered the waybill; needs a person
    EMPTIED = "emptied"  # corrections moved every item in it to another waybill; no longer polled


class ReportState(enum.StrEnum):
    PENDING = "pending"  # queued, not yet acknowledged by the partner
    DONE = "done"  # partner answered 200 (recorded) or 409 (recorded earlier)
    DEAD = "dead"  # partner answered 422: resending the same body cannot help
    WITHDRAWN = "withdrawn"  # a correction moved its return to a box not yet delivered; queued again when it is


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReturnItem:
    id: str
    order_number: str
    order_item_number: str
    shipment_number: str
    requested_at: str | None


REPORTED_FIELDS = ("order_number", "order_item_number", "shipment_number")  # what a report carries
CORRECTABLE_FIELDS = (*REPORTED_FIELDS, "requested_at")
FEED_SOURCE = "feed"


def _same_order_item(a: ReturnItem, b: ReturnItem) -> bool:
    return (a.order_number, a.order_item_number) == (b.order_number, b.order_item_number)


def order_item_name(item: ReturnItem) -> str:
    """The name of a return pushed without an id, and the name a feed listing of the same order
    item is matched by: the partner holds each order item once."""
    return f"order:{item.order_number}:{item.order_item_number}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Correction:
    """A relisted return whose fields differ from the stored ones. The latest listing is the truth."""

    before: ReturnItem
    after: ReturnItem
    report_state: ReportState | None = None  # the report's, when the correction arrived (None: none yet)
    source: str = FEED_SOURCE  # where the listing came from: the feed, or the API key that pushed it

    @property
    def return_id(self) -> str:
        return self.after.id

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(f for f in CORRECTABLE_FIELDS if getattr(self.before, f) != getattr(self.after, f))

    @property
    def moved(self) -> bool:
        """The waybill was reissued: the return now belongs to another box."""
        return self.before.shipment_number != self.after.shipment_number

    @property
    def changes_report(self) -> bool:
        return any(f in REPORTED_FIELDS for f in self.fields)

    def describe(self) -> str:
        return ", ".join(f"{f} {getattr(self.before, f)!r} → {getattr(self.after, f)!r}" for f in self.fields)


def reconcile_listings(items: Iterable[ReturnItem],
                       stored: Mapping[str, ReturnItem]) -> tuple[list[ReturnItem], list[Correction]]:
    """A page's listings against what is stored: the returns never seen before (in their last
    listing) and the corrections, one per changed return, from the version before this page (or its
    first listing in it) to its last listing in it. An unchanged relisting is neither."""
    first: dict[str, ReturnItem] = {}
    last: dict[str, ReturnItem] = {}
    for item in items:
        first.setdefault(item.id, stored.get(item.id, item))
        last[item.id] = item
    new = [item for return_id, item in last.items() if return_id not in stored]
    corrections = [Correction(before=first[return_id], after=item) for return_id,
                   item in last.items() if first[return_id] != item]
    return new, corrections


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuarantinedItem:
    return_id: str | None
    reason: str
    raw: str

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.raw.encode("utf-8", "replace")).hexdigest()


@dataclasses.dataclass(frozen=True, kw_only=True)
class SentCursor:
    """The cursor a feed page was asked with (None: the feed's beginning)."""

    cursor: str | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class FeedPage:
    """One page of the feed, committed with the cursor that follows it — all or nothing."""

    items: tuple[ReturnItem, ...]
    quarantined: tuple[QuarantinedItem, ...]
    next_cursor: str | None
    has_more: bool
    first_checks: tuple[tuple[str, float], ...] = ()  # (shipment, when) for boxes not seen before
    epoch: int | None = None  # the feed lease it was read under (PostgreSQL): stored only while it holds
    source: str = FEED_SOURCE  # or the name of the API key that pushed these returns
    # A page read from the feed, asked with this cursor: stored only while the database still
    # holds that cursor (it may have lost its latest commits: a crash under synchronous_commit =
    # off, a failover to an asynchronous standby; or an answer was lost after the commit).
    read_from: SentCursor | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class DueBox:
    shipment_number: str
    first_seen_at: float
    not_found: int
    errors: int
    status_since: float | None = None  # the partner's time of the newest status already recorded
    checks: int = 0  # calls made for it so far
    claim: int | None = None  # this instance's claim on it (PostgreSQL); its answer is stored only under it


@dataclasses.dataclass(frozen=True, kw_only=True)
class StatusChange:
    """One entry of a box's status history: the status and the partner's time it took effect."""

    status: str
    at: float  # the entry's updated_at, Unix seconds


@dataclasses.dataclass(frozen=True, kw_only=True)
class BoxUpdate:
    """The outcome of one tracking call; applied only while the box is still being tracked."""

    shipment_number: str
    state: BoxState
    next_check_at: float | None
    not_found: int
    errors: int
    registered: bool
    last_status: str | None = None
    delivered_at: str | None = None
    last_error: str | None = None
    unknown_status: str | None = None
    called: bool = True  # False: deferred without a partner call (counters and last error stay)
    history: tuple[StatusChange, ...] = ()  # entries newer than the box's status_since, oldest first
    claim: int | None = None  # the claim the check was made under (DueBox.claim)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DueReport:
    return_id: str
    order_number: str
    order_item_number: str
    shipment_number: str
    collected_at: str
    attempts: int
    queued_at: float = 0.0  # when the box was seen delivered and this report queued
    revision: int = 0  # bumped by each correction of its fields
    first_sent_revision: int | None = None  # the oldest revision an earlier attempt sent
    claim: int | None = None  # this instance's claim on it (PostgreSQL)

    @property
    def sent_before_correction(self) -> bool:
        """An earlier attempt sent fields a correction has since changed (its answer unknown)."""
        return self.first_sent_revision is not None and self.first_sent_revision < self.revision

    def body(self) -> dict[str, str]:
        return {
            "order_number": self.order_number,
            "order_item_number": self.order_item_number,
            "shipment_number": self.shipment_number,
            "result": "collected",
            "collected_at": self.collected_at,
        }


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReportUpdate:
    return_id: str
    state: ReportState
    next_attempt_at: float | None
    outcome: str | None
    last_error: str | None
    called: bool = True  # False: deferred without a partner call (attempts and last error stay)
    revision: int = 0  # the revision of the body this answer was to
    attempt: int = 0  # which attempt this was (recorded in report_attempts when called)
    http_status: int | None = None
    latency_s: float | None = None
    claim: int | None = None  # the claim the call was made under (DueReport.claim)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WakeBoxes:
    """A quiet status woke (a box was just seen leaving it): its boxes are asked again within
    `spread_s`, spread over it, instead of when their quiet-time intervals end."""

    status: str
    spread_s: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class Prune:
    """Retention: up to `limit` finished boxes closed before `cutoff`, with all their rows."""

    cutoff: float
    limit: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Heartbeat:
    """A real write that changes nothing that matters: proves the disk takes writes (a full or
    read-only disk fails it). It goes through the committer like every write: one writer."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckNow:
    """The shop asked for a check of this box now (the API): first in due order, at most once a
    cooldown. CommitResult.checks_queued says whether it was queued."""

    shipment_number: str
    cooldown_s: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class Audit:
    """Rows of the API's audit trail, written with the daemon's other writes."""

    entries: tuple["AuditEntry", ...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Idempotent:
    """An API request's Idempotency-Key: taken (answer None: CommitResult.idempotency says whether
    this request holds it, or what holds it), or given the request's answer (status, body)."""

    key_name: str
    idem_key: str
    body_hash: str
    answer: tuple[int, str] | None = None
    asker: str = dataclasses.field(default_factory=lambda: secrets.token_hex(8))  # this request, in a batch


class DeliveryState(enum.StrEnum):
    PENDING = "pending"  # due at next_attempt_at (kept while its endpoint is disabled)
    DELIVERED = "delivered"  # the receiver answered 2xx
    FAILED = "failed"  # its retry schedule ran out: `tracker.py webhooks replay` sends it again


@dataclasses.dataclass(frozen=True, kw_only=True)
class DueDelivery:
    id: str  # "<endpoint> <event id>"
    event_id: str  # "<type>:<subject>": one per cause
    type: str
    subject: str  # the return id, or the shipment number
    occurred_at: str | None  # the partner's time of what happened, when known
    attempts: int
    replays: int  # an answer counts only for the replay it was sent under


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeliveryUpdate:
    """One attempt to deliver an event to an endpoint, and what it means for the endpoint."""

    id: str
    endpoint: str
    state: DeliveryState
    next_attempt_at: float | None
    replays: int = 0
    http_status: int | None = None
    error: str | None = None
    gone: bool = False  # 410: the receiver wants nothing more; the endpoint is disabled at once
    disable_after_s: float = math.inf  # the endpoint failing this long is disabled


@dataclasses.dataclass(frozen=True, kw_only=True)
class WebhookEndpoints:
    """The configured receivers and their events, stored at start: every instance and command
    sees them, and an event is queued for each one that takes it, in the event's transaction."""

    endpoints: tuple[tuple[str, tuple[str, ...], float], ...]  # name, events, cancel_hold_s


@dataclasses.dataclass(frozen=True, kw_only=True)
class EnableEndpoint:
    name: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class AnnounceOverdue:
    """pickup.overdue for each box still tracked whose return was requested before `before`, once
    a box: no transition causes it, the overdue watch notices it."""

    before: float


Transition = (FeedPage | BoxUpdate | ReportUpdate | WakeBoxes | Prune | Heartbeat | CheckNow | Audit | Idempotent
              | DeliveryUpdate | WebhookEndpoints | EnableEndpoint | AnnounceOverdue)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CommitResult:
    returns_added: int = 0
    quarantined_added: int = 0
    reports_queued: int = 0
    corrections: tuple[Correction, ...] = ()
    broken_corrections: frozenset[str] = frozenset()  # ids of stored returns relisted unusable
    superseded: frozenset[str] = frozenset()  # reports whose settling answer was to an outdated body
    pruned: int = 0  # finished boxes retention deleted (with their returns, reports, histories)
    lost_claims: frozenset[str] = frozenset()  # answers not stored: another instance holds the row now
    checks_queued: frozenset[str] = frozenset()  # boxes a CheckNow put first in due order
    # per Idempotent taken (by its asker): None when that request holds the key now, else what
    # holds it (body hash, status or None while the first request runs, body)
    idempotency: tuple[tuple[str, tuple[str, int | None, str | None] | None], ...] = ()
    disabled_endpoints: frozenset[str] = frozenset()  # webhook endpoints this commit disabled
    enabled_endpoints: frozenset[str] = frozenset()
    deliveries_queued: int = 0  # webhook deliveries this commit queued
    cursor_moved: str | None = None  # a page not stored: the stored cursor (or "") is not the one it was read from

    def __add__(self, other: "CommitResult") -> "CommitResult":
        return CommitResult(
            returns_added=self.returns_added + other.returns_added,
            quarantined_added=self.quarantined_added + other.quarantined_added,
            reports_queued=self.reports_queued + other.reports_queued, corrections=self.corrections + other.corrections,
            broken_corrections=self.broken_corrections | other.broken_corrections,
            superseded=self.superseded | other.superseded,
            pruned=self.pruned + other.pruned, lost_claims=self.lost_claims | other.lost_claims,
            checks_queued=self.checks_queued | other.checks_queued, idempotency=self.idempotency + other.idempotency,
            disabled_endpoints=self.disabled_endpoints | other.disabled_endpoints,
            enabled_endpoints=self.enabled_endpoints | other.enabled_endpoints,
            deliveries_queued=self.deliveries_queued + other.deliveries_queued,
            cursor_moved=self.cursor_moved if self.cursor_moved is not None else other.cursor_moved)


API_SCOPES = ("returns:read", "returns:write", "shipments:check")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ApiKey:
    """A key of the shop's API, as stored (its secret only as a hash, elsewhere)."""

    name: str
    scopes: tuple[str, ...]
    allow: tuple[str, ...] = ()  # CIDRs it may be used from; empty: anywhere
    rate_per_s: float = 100.0
    created_at: float = 0.0
    expires_at: float | None = None
    revoked_at: float | None = None
    prefix: str = ""

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "ApiKey":
        return cls(name=row["name"], scopes=tuple(filter(None, row["scopes"].split(","))),
                   allow=tuple(filter(None, row["allow"].split(","))), rate_per_s=row["rate_per_s"],
                   created_at=row.get("created_at") or 0.0, expires_at=row["expires_at"],
                   revoked_at=row["revoked_at"], prefix=row.get("prefix") or "")

    def usable(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AuditEntry:
    """One write request to the API, or one key change."""

    at: float
    key_name: str | None
    source_ip: str
    action: str  # e.g. "returns.push", "shipments.check", "api-key.create"
    target: str  # what it acted on, or counts ("500 accepted, 2 rejected")
    result: str  # "ok", or the refusal's type
    request_id: str


class LeaseLost(Exception):
    """A feed page read under a lease another instance has since taken: not stored."""


# ════════════════════════════════════════════════════════════════════════════════════════════
# Storage — SQLite's tables, every SQL statement written once, PostgreSQL's tables, the two
# dialects, the per-backend adapters (Database), who shares the work (Fleet), and the Store that
# holds every transition once over them. The committer's writer connection runs one transaction
# per batch of transitions (nothing interleaves); a reader serves everything else. SQLite in
# WAL + synchronous=NORMAL: a kill -9 loses nothing committed; a power cut may lose the last
# commits, and every one of them is redone idempotently (page re-read and deduplicated, box
# re-checked, report re-sent and settled by the partner's 409).
# ════════════════════════════════════════════════════════════════════════════════════════════


SCHEMA_VERSION = 10  # 2: state_counts, kept by triggers; 3: partial indexes instead of full ones on state;
#                    4: corrections, and the report revisions they bump; 5: box status histories;
#                    6: report attempts, boxes' requested_at (overdue pickups); 7: the shop's API (keys,
#                    audit, boxes' check_requested_at); 8: returns' second names, corrections' sources;
#                    9: webhooks (endpoints, the outbox of events, deliveries); 10: endpoints' cancel_hold_s
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS returns (
    id                TEXT PRIMARY KEY,
    order_number      TEXT NOT NULL,
    order_item_number TEXT NOT NULL,
    shipment_number   TEXT NOT NULL,
    requested_at      TEXT,
    seen_at           REAL NOT NULL,
    source            TEXT NOT NULL DEFAULT 'feed'
);
CREATE INDEX IF NOT EXISTS returns_by_shipment ON returns (shipment_number);
CREATE INDEX IF NOT EXISTS returns_by_order ON returns (order_number);
CREATE TABLE IF NOT EXISTS boxes (
    shipment_number TEXT PRIMARY KEY,
    state           TEXT NOT NULL,
    next_check_at   REAL,
    first_seen_at   REAL NOT NULL,
    checks          INTEGER NOT NULL DEFAULT 0,
    not_found       INTEGER NOT NULL DEFAULT 0,
    errors          INTEGER NOT NULL DEFAULT 0,
    registered_at   REAL,
    last_status     TEXT,
    delivered_at    TEXT,
    closed_at       REAL,
    last_error      TEXT,
    status_since    REAL,
    requested_at    REAL,
    check_requested_at REAL
);
-- boxes.status_since: the partner's time of the newest status in box_history (NULL: none yet);
-- boxes.requested_at: when its first return was requested (the feed's requested_at), for overdue.
CREATE INDEX IF NOT EXISTS boxes_due ON boxes (next_check_at) WHERE state = 'tracking';
CREATE INDEX IF NOT EXISTS boxes_stale ON boxes (first_seen_at) WHERE state = 'stale';
CREATE INDEX IF NOT EXISTS boxes_closed ON boxes (closed_at) WHERE state IN ('delivered', 'cancelled', 'emptied');
CREATE TABLE IF NOT EXISTS reports (
    return_id         TEXT PRIMARY KEY,
    order_number      TEXT NOT NULL,
    order_item_number TEXT NOT NULL,
    shipment_number   TEXT NOT NULL,
    collected_at      TEXT NOT NULL,
    state             TEXT NOT NULL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    next_attempt_at   REAL,
    queued_at         REAL NOT NULL,
    done_at           REAL,
    outcome           TEXT,
    last_error        TEXT,
    revision            INTEGER NOT NULL DEFAULT 0,
    first_sent_revision INTEGER,
    accepted_revision   INTEGER
);
-- reports: a correction to a report's fields bumps `revision`; each answer is applied with the
-- revision its attempt sent, so an answer to an outdated body is told apart. first_sent_revision is
-- the oldest revision ever sent (a later 409 may be holding it); accepted_revision the one the
-- partner recorded, or may hold after a 409. (No comments inside CREATE TABLE: ALTER TABLE
-- rewrites that text.)
CREATE INDEX IF NOT EXISTS reports_due ON reports (next_attempt_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS reports_pending_by_age ON reports (queued_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS reports_dead ON reports (done_at) WHERE state = 'dead';
CREATE TABLE IF NOT EXISTS quarantine (
    id          INTEGER PRIMARY KEY,
    fingerprint TEXT NOT NULL UNIQUE,
    return_id   TEXT,
    reason      TEXT NOT NULL,
    raw         TEXT NOT NULL,
    seen_at     REAL NOT NULL,
    resolved_at REAL
);
CREATE INDEX IF NOT EXISTS quarantine_open ON quarantine (return_id) WHERE resolved_at IS NULL;
CREATE INDEX IF NOT EXISTS quarantine_by_return ON quarantine (return_id);
-- Rows per table and state, kept by triggers (STATE_COUNT_TRIGGERS, TOTAL_COUNT_TRIGGERS, below)
-- in the same transaction as the rows, so the metrics gauges read a handful of rows instead of
-- counting a history that grows for years.
CREATE TABLE IF NOT EXISTS state_counts (
    kind  TEXT NOT NULL,
    state TEXT NOT NULL,
    n     INTEGER NOT NULL,
    PRIMARY KEY (kind, state)
) WITHOUT ROWID;
-- Every status a box passed through, as the partner's history shows it (changed_at is its
-- updated_at), with when a check first saw it; at most HISTORY_PER_BOX a box. What the tracking
-- schedule learns from, and what an operator reads.
CREATE TABLE IF NOT EXISTS box_history (
    shipment_number TEXT NOT NULL,
    changed_at      REAL NOT NULL,
    status          TEXT NOT NULL,
    seen_at         REAL NOT NULL,
    PRIMARY KEY (shipment_number, changed_at, status)
) WITHOUT ROWID;
-- Each call made for a report (at most ATTEMPTS_PER_REPORT a report, the latest): for `show`.
CREATE TABLE IF NOT EXISTS report_attempts (
    id           INTEGER PRIMARY KEY,
    return_id    TEXT NOT NULL,
    attempt      INTEGER NOT NULL,
    attempted_at REAL NOT NULL,
    outcome      TEXT NOT NULL,
    http_status  INTEGER,
    latency_s    REAL,
    error        TEXT
);
CREATE INDEX IF NOT EXISTS report_attempts_by_return ON report_attempts (return_id, id);
-- One row per applied correction: a relisted return whose fields differ from the stored ones.
-- `fields` names the changed fields (comma-separated), `before` and `after` are their two versions
-- (JSON objects), `report_state` is the report's state when the correction arrived (NULL: none yet),
-- `source` where the listing came from: 'feed', or the name of the API key that pushed it.
CREATE TABLE IF NOT EXISTS corrections (
    id           INTEGER PRIMARY KEY,
    return_id    TEXT NOT NULL,
    fields       TEXT NOT NULL,
    before       TEXT NOT NULL,
    after        TEXT NOT NULL,
    report_state TEXT,
    corrected_at REAL NOT NULL,
    source       TEXT NOT NULL DEFAULT 'feed'
);
CREATE INDEX IF NOT EXISTS corrections_by_return ON corrections (return_id);
CREATE TABLE IF NOT EXISTS unknown_statuses (
    status        TEXT PRIMARY KEY,
    first_seen_at REAL NOT NULL,
    last_seen_at  REAL NOT NULL,
    seen          INTEGER NOT NULL
);
"""
TABLES_IN_BOTH = """
-- A return's other names: one pushed without an id is named by its order item
-- (order:<order_number>:<order_item_number>); the feed's id for the same order item, listed later,
-- is a second name that finds the same return (or the other way round).
CREATE TABLE IF NOT EXISTS return_names (
    name      TEXT PRIMARY KEY,
    return_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS return_names_by_return ON return_names (return_id);
-- The shop's API keys: only a hash of each (SHA-256: a key is 190 random bits, so a fast hash
-- suffices), found by its lookup prefix. scopes and allow are comma-separated.
CREATE TABLE IF NOT EXISTS api_keys (
    name       TEXT PRIMARY KEY,
    prefix     TEXT NOT NULL UNIQUE,
    hash       TEXT NOT NULL,
    scopes     TEXT NOT NULL,
    allow      TEXT NOT NULL,
    rate_per_s REAL NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    revoked_at REAL
);
-- One row per write request to the API and per key change (`tracker.py audit`).
CREATE TABLE IF NOT EXISTS audit (
    id         INTEGER PRIMARY KEY,
    at         REAL NOT NULL,
    key_name   TEXT,
    source_ip  TEXT NOT NULL,
    action     TEXT NOT NULL,
    target     TEXT NOT NULL,
    result     TEXT NOT NULL,
    request_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_time ON audit (at);
-- Idempotency-Key on the API's POSTs: the first answer, replayed for the same key and body for
-- IDEMPOTENCY_KEEP_S; status NULL while the first request runs.
CREATE TABLE IF NOT EXISTS idempotency (
    key_name   TEXT NOT NULL,
    idem_key   TEXT NOT NULL,
    body_hash  TEXT NOT NULL,
    status     INTEGER,
    body       TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (key_name, idem_key)
);
CREATE INDEX IF NOT EXISTS idempotency_by_age ON idempotency (created_at);
-- Webhooks: the configured endpoints (stored at start), one event per cause (its id
-- "<type>:<subject>"), written in the transaction of the transition that caused it (an outbox), and
-- one delivery per event and endpoint that takes it.
CREATE TABLE IF NOT EXISTS webhook_endpoints (
    name          TEXT PRIMARY KEY,
    events        TEXT NOT NULL,
    disabled_at   REAL,
    disabled_why  TEXT,
    failing_since REAL,
    cancel_hold_s REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS webhook_events (
    id          TEXT PRIMARY KEY,
    type        TEXT NOT NULL,
    subject     TEXT NOT NULL,
    occurred_at TEXT,
    created_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_events_by_time ON webhook_events (created_at);
CREATE INDEX IF NOT EXISTS webhook_events_by_subject ON webhook_events (subject);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id              TEXT PRIMARY KEY,
    endpoint        TEXT NOT NULL,
    event_id        TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    replays         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    created_at      REAL NOT NULL,
    delivered_at    REAL,
    last_status     INTEGER,
    last_error      TEXT
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (endpoint, next_attempt_at)
    WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS webhook_deliveries_by_event ON webhook_deliveries (event_id);
"""  # the tables added since there are two backends, in SQLite's words (pg_words: PostgreSQL's)
SCHEMA += TABLES_IN_BOTH

# ── SQL, written once ───────────────────────────────────────────────────────────────────────
# Every statement the store runs, by name, in SQLite's words with `?` or `:name` parameters, and
# a few words of our own that each dialect spells its way (DIALECT_RULES, below):
#   x IN LIST(p)       p is one parameter holding a list of ids (a JSON array on SQLite, text[] on
#                      PostgreSQL); callers pass a Python list
#   FROM LIST_ROWS(p)  that list as rows of one column, `value`
#   GREATEST / LEAST   the larger / smaller of two values (SQLite: MAX and MIN of two arguments)
#   EPOCH_OF(column)   an ISO 8601 text column as Unix seconds
#   RANDOM_FRACTION    a random number in [0, 1)
#   ROW_ORDER(alias)   the order rows were inserted in (SQLite's rowid, PostgreSQL's seq)
#   RELEASE_CLAIM      clears the row's claim (PostgreSQL's fleet; SQLite has no claims)
#   INDEXED BY name    SQLite's plan pin; PostgreSQL's planner needs none
#   JSON_ROWS(JSON_ROW('name', value, …))  the rows as one JSON array of objects
# Booleans are passed as Python bools (SQLite stores 1 and 0).
#
# The hot path: what the stages and the metrics ask many times a minute while the tables grow for
# years. Each reads a partial index holding only unfinished rows, so its cost follows the backlog,
# never the history. INDEXED BY pins the plan (without it SQLite picks the state index and sorts
# every unfinished row per query) and turns a query the index cannot serve into an error instead
# of a silent scan; the state is written literally because only a literal lets SQLite prove that
# the partial index covers the query. tests/test_storage.py checks each plan.
HOT_PATH_SQL = {
    "due_boxes": "SELECT shipment_number, first_seen_at, not_found, errors, status_since, checks"
                 " FROM boxes INDEXED BY boxes_due"
                 " WHERE state = 'tracking' AND next_check_at <= ? ORDER BY next_check_at LIMIT ?",
    "next_box_due_at": "SELECT MIN(next_check_at) FROM boxes INDEXED BY boxes_due WHERE state = 'tracking'",
    "due_reports": "SELECT return_id, order_number, order_item_number, shipment_number, collected_at, attempts,"
                   " queued_at, revision, first_sent_revision FROM reports INDEXED BY reports_due"
                   " WHERE state = 'pending' AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?",
    "next_report_due_at": "SELECT MIN(next_attempt_at) FROM reports INDEXED BY reports_due WHERE state = 'pending'",
    "oldest_pending_report": "SELECT MIN(queued_at) FROM reports INDEXED BY reports_pending_by_age"
                             " WHERE state = 'pending'",
    "overdue_count": "SELECT COUNT(*), MIN(COALESCE(requested_at, first_seen_at)) FROM boxes INDEXED BY boxes_overdue"
                     " WHERE state = 'tracking' AND COALESCE(requested_at, first_seen_at) < ?",
}
# A report queued for a delivered box: new, or one a correction withdrew when it moved its return
# to this box before the box was delivered. Any other report of the return is left as it is.
QUEUE_REPORT_UPSERT = (
    " ON CONFLICT (return_id) DO UPDATE SET state = 'pending', order_number = excluded.order_number,"
    " order_item_number = excluded.order_item_number, shipment_number = excluded.shipment_number,"
    " collected_at = excluded.collected_at, next_attempt_at = excluded.next_attempt_at,"
    " queued_at = excluded.queued_at WHERE reports.state = 'withdrawn'")
# Per feed page (or per batch of report answers), over its ids (one list parameter) instead of a
# statement per item; each starts from the page's ids and looks rows up by primary key. Also
# checked by test.
PAGE_SQL = {
    "stored_returns":  # what the page's ids hold now: a relisting that differs is a correction
        "SELECT id, order_number, order_item_number, shipment_number, requested_at FROM returns WHERE id IN LIST(?)",
    "named_returns":  # the returns the page's other ids are second names of
        "SELECT n.name, r.id, r.order_number, r.order_item_number, r.shipment_number, r.requested_at"
        " FROM return_names n JOIN returns r ON r.id = n.return_id WHERE n.name IN LIST(?)",
    "names_of":  # which of these returns have a second name already
        "SELECT DISTINCT return_id FROM return_names WHERE return_id IN LIST(?)",
    "returns_of_orders":  # for returns pushed without an id: one stored for the same order item
        "SELECT id, order_number, order_item_number, shipment_number, requested_at FROM returns"
        " WHERE order_number IN LIST(?)",
    "report_states": "SELECT return_id, state FROM reports WHERE return_id IN LIST(?)",
    "reports_for_delivered_boxes":  # an item joining a box already delivered is reportable at once
        "INSERT INTO reports (return_id, order_number, order_item_number, shipment_number, collected_at,"
        " state, next_attempt_at, queued_at)"
        " SELECT r.id, r.order_number, r.order_item_number, r.shipment_number, b.delivered_at, 'pending', ?, ?"
        " FROM returns r JOIN boxes b ON b.shipment_number = r.shipment_number"
        " WHERE r.id IN LIST(?) AND b.state = 'delivered'" + QUEUE_REPORT_UPSERT,
    "empty_boxes":  # boxes a correction took the last item from: no longer polled, nor stale
        "UPDATE boxes SET state = 'emptied', next_check_at = NULL, closed_at = ?"
        " WHERE shipment_number IN LIST(?) AND state IN ('tracking', 'stale')"
        " AND NOT EXISTS (SELECT 1 FROM returns r WHERE r.shipment_number = boxes.shipment_number)",
    "revive_emptied_boxes":  # an item listed again in an emptied box: tracked again, the stale clock anew
        "UPDATE boxes SET state = 'tracking', next_check_at = ?, first_seen_at = ?, not_found = 0, errors = 0,"
        " closed_at = NULL WHERE shipment_number IN LIST(?) AND state = 'emptied'",
    "resolve_quarantine":  # a relisted item that now validates closes its quarantine entry
        "UPDATE quarantine SET resolved_at = ? WHERE resolved_at IS NULL AND return_id IN LIST(?)",
    "report_revisions":  # which settling answers were to a body a correction has since changed
        "SELECT return_id, revision FROM reports WHERE return_id IN LIST(?)",
}
# Statements in SQLite's words alone.
SQLITE_ONLY_SQL = {
    # What state_counts holds, counted the slow way, for `status` on a version-1 file it may not
    # write to (Store.open fills state_counts once from it when it upgrades one).
    "count_by_state": "SELECT 'returns', '', COUNT(*) FROM returns"
                      " UNION ALL SELECT 'boxes', state, COUNT(*) FROM boxes GROUP BY state"
                      " UNION ALL SELECT 'reports', state, COUNT(*) FROM reports GROUP BY state",
}
# The write path's other statements: one transition's steps, in Store's order.
WRITE_SQL = {
    "put_meta": "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    "insert_return": "INSERT INTO returns (id, order_number, order_item_number, shipment_number, requested_at,"
                     " seen_at, source) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
    "insert_box": "INSERT INTO boxes (shipment_number, state, next_check_at, first_seen_at, requested_at)"
                  " VALUES (?, ?, ?, ?, (SELECT MIN(EPOCH_OF(requested_at)) FROM returns WHERE shipment_number = ?))"
                  " ON CONFLICT (shipment_number) DO NOTHING",
    "insert_quarantine": "INSERT INTO quarantine (fingerprint, return_id, reason, raw, seen_at)"
                         " VALUES (?, ?, ?, ?, ?) ON CONFLICT (fingerprint) DO NOTHING",
    "correct_return": "UPDATE returns SET order_number = ?, order_item_number = ?, shipment_number = ?,"
                      " requested_at = ? WHERE id = ?",
    "insert_correction": "INSERT INTO corrections (return_id, fields, before, after, report_state, corrected_at,"
                         " source) VALUES (?, ?, ?, ?, ?, ?, ?)",
    "insert_name": "INSERT INTO return_names (name, return_id) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
    "drop_name": "DELETE FROM return_names WHERE return_id = ? AND name = ?",
    # A correction to a report not yet accepted: the next attempt carries the corrected fields. A
    # move to another waybill withdraws it until that box is delivered (QUEUE_REPORT_UPSERT queues
    # it again, at once if it already is); a dead one is sent again, since the correction may be
    # what the partner refused it for. An accepted report keeps the body the partner holds; only
    # its revision moves, which marks it outdated for an operator.
    "correct_report":
        "UPDATE reports SET revision = revision + 1,"
        " order_number = CASE WHEN state = 'done' THEN order_number ELSE :order_number END,"
        " order_item_number = CASE WHEN state = 'done' THEN order_item_number ELSE :order_item_number END,"
        " shipment_number = CASE WHEN state = 'done' THEN shipment_number ELSE :shipment_number END,"
        " state = CASE WHEN state = 'done' THEN 'done' WHEN :moved THEN 'withdrawn' ELSE 'pending' END,"
        " next_attempt_at = CASE WHEN state = 'done' OR :moved THEN NULL WHEN state = 'dead' THEN :now"
        " ELSE next_attempt_at END,"
        " attempts = CASE WHEN state = 'dead' THEN 0 ELSE attempts END,"
        " outcome = CASE WHEN state = 'dead' THEN NULL ELSE outcome END,"
        " done_at = CASE WHEN state = 'dead' THEN NULL ELSE done_at END"
        " WHERE return_id = :return_id",
    # One tracking answer, applied only while the box is still being tracked.
    "box_update":
        "UPDATE boxes SET state = :state, next_check_at = :next_check_at, checks = checks + :called_n,"
        " not_found = :not_found, errors = :errors,"
        " registered_at = CASE WHEN :registered THEN COALESCE(registered_at, :now) ELSE registered_at END,"
        " last_status = COALESCE(:last_status, last_status), delivered_at = COALESCE(:delivered_at, delivered_at),"
        " closed_at = :closed_at, last_error = CASE WHEN :called THEN :last_error ELSE last_error END,"
        " status_since = GREATEST(COALESCE(status_since, :since), COALESCE(:since, status_since))"
        " RELEASE_CLAIM WHERE shipment_number = :shipment_number AND state = 'tracking'",
    "insert_history": "INSERT INTO box_history (shipment_number, changed_at, status, seen_at) VALUES (?, ?, ?, ?)"
                      " ON CONFLICT DO NOTHING",
    # bounded per box: the oldest entries past HISTORY_PER_BOX go
    "bound_history": "DELETE FROM box_history WHERE shipment_number = ? AND changed_at < (SELECT changed_at"
                     " FROM box_history WHERE shipment_number = ? ORDER BY changed_at DESC LIMIT 1 OFFSET ?)",
    "queue_reports": "INSERT INTO reports (return_id, order_number, order_item_number, shipment_number, collected_at,"
                     " state, next_attempt_at, queued_at)"
                     " SELECT id, order_number, order_item_number, shipment_number, ?, ?, ?, ?"
                     " FROM returns WHERE shipment_number = ?" + QUEUE_REPORT_UPSERT,
    "unknown_status": "INSERT INTO unknown_statuses (status, first_seen_at, last_seen_at, seen) VALUES (?, ?, ?, 1)"
                      " ON CONFLICT (status) DO UPDATE SET last_seen_at = excluded.last_seen_at,"
                      " seen = unknown_statuses.seen + 1",
    # One partner answer to a report. An answer to a body a correction has since changed (the call
    # was already on its way) settles the report only if the partner recorded it — then it holds
    # the old body, and accepted_revision < revision says so; any other answer leaves the corrected
    # report to be sent, at once if it is pending. A 409 says an earlier send was recorded: the
    # oldest body ever sent is the one it may hold.
    "report_answer":
        "UPDATE reports SET"
        " state = CASE WHEN :state = 'done' OR revision = :revision THEN :state ELSE state END,"
        " attempts = attempts + :called_n,"
        " next_attempt_at = CASE WHEN :state = 'done' OR revision = :revision THEN :next_attempt_at"
        " WHEN state = 'pending' THEN :now ELSE next_attempt_at END,"
        " outcome = CASE WHEN :state = 'done' OR revision = :revision THEN :outcome ELSE outcome END,"
        " last_error = CASE WHEN :called THEN :last_error ELSE last_error END,"
        " done_at = CASE WHEN :state = 'done' OR revision = :revision THEN :done_at ELSE done_at END,"
        " first_sent_revision = CASE WHEN :called THEN LEAST(COALESCE(first_sent_revision, :revision), :revision)"
        " ELSE first_sent_revision END,"
        " accepted_revision = CASE :outcome WHEN 'recorded' THEN :revision"
        " WHEN 'duplicate' THEN LEAST(COALESCE(first_sent_revision, :revision), :revision) ELSE accepted_revision END"
        " RELEASE_CLAIM WHERE return_id = :return_id AND state IN ('pending', 'withdrawn')",
    "insert_attempt": "INSERT INTO report_attempts (return_id, attempt, attempted_at, outcome, http_status, latency_s,"
                      " error) VALUES (?, ?, ?, ?, ?, ?, ?)",
    # bounded per report: only a report retried that often has older ones
    "bound_attempts": "DELETE FROM report_attempts WHERE return_id = ? AND id NOT IN (SELECT id FROM report_attempts"
                      " WHERE return_id = ? ORDER BY id DESC LIMIT ?)",
    # Every tracked box in a status that woke, not due within the spread, is due at a random moment in it.
    "wake_boxes": "UPDATE boxes SET next_check_at = :now + RANDOM_FRACTION * :spread WHERE state = 'tracking'"
                  " AND (last_status = :status OR :status = '*') AND next_check_at > :now + :spread",
}
# What `status` lists and `requeue` moves: rare, but never a scan of the history. Each reads the
# partial index of its state (stale and dead rows are few; tracking and pending ones are the
# backlog) — a full index on state would be written by every transition of every row, for these
# alone (it was: a quarter of the SQLite writer's time in bench/store_writes.py). The state is
# literal for the reason given above; also checked by test. `:all` true means every row of the
# state, else those in `:ids`.
OPERATOR_SQL = {
    "oldest_pending_reports": "SELECT return_id, shipment_number, queued_at, attempts, last_error FROM reports"
                              " WHERE state = 'pending' ORDER BY queued_at LIMIT ?",
    "oldest_tracking_boxes": "SELECT shipment_number, first_seen_at, last_status, checks FROM boxes"
                             " WHERE state = 'tracking' ORDER BY first_seen_at LIMIT ?",
    "dead_reports": "SELECT return_id, shipment_number, last_error, done_at FROM reports WHERE state = 'dead'"
                    " ORDER BY done_at LIMIT ?",
    # with the latest correction's two versions of the changed fields
    "outdated_reports": "SELECT p.return_id, c.before, c.after, p.done_at FROM reports p"
                        " JOIN corrections c ON c.id = (SELECT MAX(id) FROM corrections WHERE return_id = p.return_id)"
                        " WHERE p.accepted_revision < p.revision ORDER BY p.done_at LIMIT ?",
    "overdue_boxes": "SELECT shipment_number, COALESCE(requested_at, first_seen_at), last_status, status_since,"
                     " checks FROM boxes WHERE state = 'tracking' AND COALESCE(requested_at, first_seen_at) < ?"
                     " ORDER BY COALESCE(requested_at, first_seen_at) LIMIT ?",
    "stale_boxes": "SELECT b.shipment_number, b.first_seen_at,"
                   " (SELECT COUNT(*) FROM returns r WHERE r.shipment_number = b.shipment_number)"
                   " FROM boxes b WHERE b.state = 'stale' ORDER BY b.first_seen_at LIMIT ?",
    "requeue_dead_reports": "UPDATE reports SET state = 'pending', attempts = 0, next_attempt_at = :now,"
                            " outcome = NULL, done_at = NULL WHERE state = 'dead'"
                            " AND (:all OR return_id IN LIST(:ids)) RETURNING return_id",
    # first_seen_at restarts, or the box would be stale again at its first 404
    "requeue_stale_boxes": "UPDATE boxes SET state = 'tracking', next_check_at = :now, first_seen_at = :now,"
                           " not_found = 0, errors = 0, closed_at = NULL, last_error = NULL WHERE state = 'stale'"
                           " AND (:all OR shipment_number IN LIST(:ids)) RETURNING shipment_number",
}
# `show`, the API and webhooks: the whole story of the returns each key names (its id, a second
# name, its order number or its shipment number) — several keys in one statement, each key's
# story one row, each part a JSON array of its rows (JSON_ROWS of JSON_ROW(name, value, …)): a
# lookup is one hop to the database, however busy the event loop, and a webhook sender's many
# share their hops (STORY_BATCH keys a statement). Each part reads by an index; its rows are put
# in order in Python (STORY_ORDER). The CTEs hold, by key: `named`, the returns it names; `ids`,
# their ids, other names and the key itself; `shipments`, their boxes and the key itself.
STORY_PARTS = {  # part: (table, columns, which rows)
    "returns": ("returns", "id, order_number, order_item_number, shipment_number, requested_at, seen_at, source",
                "id IN (NAMED)"),
    "names": ("return_names", "name, return_id", "return_id IN (IDS)"),
    "quarantine": ("quarantine", "return_id, reason, raw, seen_at, resolved_at", "return_id IN (IDS)"),
    "boxes": ("boxes", "shipment_number, state, last_status, checks, not_found, first_seen_at, next_check_at,"
                       " closed_at, last_error", "shipment_number IN (SHIPMENTS)"),
    "history": ("box_history", "shipment_number, changed_at, status, seen_at", "shipment_number IN (SHIPMENTS)"),
    "reports": ("reports", "return_id, state, order_number, order_item_number, shipment_number, collected_at,"
                           " attempts, next_attempt_at, queued_at, done_at, outcome, last_error, revision,"
                           " accepted_revision", "return_id IN (IDS)"),
    "attempts": ("report_attempts", "id, return_id, attempt, attempted_at, outcome, http_status, latency_s, error",
                 "return_id IN (IDS)"),
    "corrections": ("corrections", "id, return_id, fields, before, after, report_state, corrected_at, source",
                    "return_id IN (IDS)"),
    "events": ("webhook_events", "id, type, subject, occurred_at, created_at",
               "subject IN (IDS) OR subject IN (SHIPMENTS)"),
    "deliveries": ("webhook_deliveries", "event_id, endpoint, state, attempts, replays, last_status, last_error,"
                                         " created_at, delivered_at, next_attempt_at",
                   "event_id IN (SELECT id FROM webhook_events WHERE subject IN (IDS) OR subject IN (SHIPMENTS))"),
}
STORY_ORDER = {"returns": ("seen_at", "id"), "names": ("name",), "quarantine": ("seen_at",), "boxes": (),
               "history": ("shipment_number", "changed_at"), "reports": (), "attempts": ("return_id", "id"),
               "corrections": ("id",), "events": ("created_at", "id"), "deliveries": ("created_at", "endpoint")}
WEBHOOK_PARTS = ("events", "deliveries")  # not in a webhook's own body: it would tell of its own delivery
STORY_BATCH = 16  # keys a statement: each part's lookup in the CTEs grows with the square of it


def _story_sql(parts: Iterable[str]) -> str:
    by_key = {"NAMED": "SELECT id FROM named WHERE named.key = k.key",
              "IDS": "SELECT id FROM ids WHERE ids.key = k.key",
              "SHIPMENTS": "SELECT shipment_number FROM shipments WHERE shipments.key = k.key"}

    def rows(table: str, columns: str, where: str) -> str:
        pairs = ", ".join(f"'{c}', {c}" for c in (c.strip() for c in columns.split(",")))
        keyed = re.sub(r"\b(NAMED|IDS|SHIPMENTS)\b", lambda m: by_key[m.group(1)], where)
        return f"(SELECT COALESCE(JSON_ROWS(JSON_ROW({pairs})), '[]') FROM {table} WHERE {keyed})"
    return ("WITH keys AS (SELECT DISTINCT CAST(value AS TEXT) AS key FROM LIST_ROWS(:keys)),"
            " named AS (SELECT k.key, r.id FROM keys k JOIN returns r"
            " ON r.id = k.key OR r.order_number = k.key OR r.shipment_number = k.key"
            " UNION SELECT k.key, n.return_id FROM keys k JOIN return_names n ON n.name = k.key),"
            " ids AS (SELECT key, id FROM named UNION SELECT m.key, n.name FROM named m"
            " JOIN return_names n ON n.return_id = m.id UNION SELECT key, key FROM keys),"
            " shipments AS (SELECT m.key, r.shipment_number FROM named m JOIN returns r ON r.id = m.id"
            " UNION SELECT key, key FROM keys)"
            " SELECT k.key AS key, " + ", ".join(f"{rows(*STORY_PARTS[part])} AS {part}" for part in parts)
            + " FROM keys k")


SHOW_SQL = {"stories": _story_sql(STORY_PARTS),
            "stories_for_webhooks": _story_sql(p for p in STORY_PARTS if p not in WEBHOOK_PARTS)}
# Retention: boxes closed before :cutoff whose every return is finished too (reported before it,
# or in a cancelled box) go with all their rows, a batch at a time, oldest first (the deletes in
# this order); then resolved quarantine entries. A stale box needs a person: never finished. Each
# batch is one transaction.
RETENTION_SQL = {
    "finished_boxes":
        "SELECT b.shipment_number FROM boxes b INDEXED BY boxes_closed"
        " WHERE b.state IN ('delivered', 'cancelled', 'emptied') AND b.closed_at < :cutoff"
        " AND NOT EXISTS (SELECT 1 FROM returns r JOIN reports p ON p.return_id = r.id"
        " WHERE r.shipment_number = b.shipment_number AND NOT ((p.state = 'done' AND p.done_at < :cutoff)"
        " OR (p.state = 'withdrawn' AND b.state = 'cancelled')))"
        " ORDER BY b.closed_at LIMIT :limit",
    "delete_attempts": "DELETE FROM report_attempts WHERE return_id IN"
                       " (SELECT id FROM returns WHERE shipment_number IN LIST(:boxes))",
    "delete_corrections": "DELETE FROM corrections WHERE return_id IN"
                          " (SELECT id FROM returns WHERE shipment_number IN LIST(:boxes))",
    "delete_quarantine": "DELETE FROM quarantine WHERE resolved_at IS NOT NULL AND return_id IN"
                         " (SELECT id FROM returns WHERE shipment_number IN LIST(:boxes) UNION SELECT name"
                         " FROM return_names WHERE return_id IN (SELECT id FROM returns"
                         " WHERE shipment_number IN LIST(:boxes)))",
    "delete_reports": "DELETE FROM reports WHERE return_id IN"
                      " (SELECT id FROM returns WHERE shipment_number IN LIST(:boxes))",
    "delete_deliveries": "DELETE FROM webhook_deliveries WHERE event_id IN (SELECT id FROM webhook_events"
                         " WHERE subject IN (SELECT id FROM returns WHERE shipment_number IN LIST(:boxes))"
                         " OR subject IN LIST(:boxes))",
    "delete_events": "DELETE FROM webhook_events WHERE subject IN"
                     " (SELECT id FROM returns WHERE shipment_number IN LIST(:boxes)) OR subject IN LIST(:boxes)",
    "delete_names": "DELETE FROM return_names WHERE return_id IN"
                    " (SELECT id FROM returns WHERE shipment_number IN LIST(:boxes))",
    "delete_returns": "DELETE FROM returns WHERE shipment_number IN LIST(:boxes)",
    "delete_history": "DELETE FROM box_history WHERE shipment_number IN LIST(:boxes)",
    "delete_boxes": "DELETE FROM boxes WHERE shipment_number IN LIST(:boxes)",
    "resolved_quarantine": "DELETE FROM quarantine WHERE id IN (SELECT id FROM quarantine"
                           " WHERE resolved_at < :cutoff LIMIT :limit)",
}
PRUNE_DELETES = tuple(name for name in RETENTION_SQL if name.startswith("delete_"))
# `export`: every return (or every closed box's history), streamed in insertion order — one pass
# over the tables, constant memory however many rows. `:state` is a report or a box state, or NULL.
EXPORT_SQL = {
    "export_returns":
        "SELECT r.id AS return_id, r.order_number, r.order_item_number, r.shipment_number, r.requested_at,"
        " r.seen_at AS collected_at, b.state AS box_state, b.last_status, b.delivered_at,"
        " p.state AS report_state, p.outcome AS report_outcome, p.done_at AS reported_at,"
        " p.attempts AS report_attempts, p.last_error AS report_error"
        " FROM returns r LEFT JOIN boxes b ON b.shipment_number = r.shipment_number"
        " LEFT JOIN reports p ON p.return_id = r.id"
        " WHERE r.seen_at >= :since AND r.seen_at < :until"
        " AND (CAST(:state AS TEXT) IS NULL OR p.state = :state OR b.state = :state) ORDER BY ROW_ORDER(r)",
    "export_timelines":
        "SELECT b.shipment_number, COALESCE(b.requested_at, b.first_seen_at) AS requested_at,"
        " b.registered_at, (SELECT COUNT(*) FROM returns r WHERE r.shipment_number = b.shipment_number)"
        " AS items, h.changed_at, h.status FROM boxes b JOIN box_history h"
        " ON h.shipment_number = b.shipment_number WHERE b.state IN ('delivered', 'cancelled')"
        " AND b.first_seen_at >= :since AND b.first_seen_at < :until"
        " AND (CAST(:state AS TEXT) IS NULL OR b.state = :state) ORDER BY b.shipment_number, h.changed_at",
}
# The rest of the reads.
READ_SQL = {
    "feed_cursor": "SELECT value FROM meta WHERE key = ?",
    # the histories the tracking schedule learns from at start: boxes closed in the last days
    "learned_history": "SELECT h.shipment_number, h.changed_at, h.status FROM boxes b JOIN box_history h"
                       " ON h.shipment_number = b.shipment_number WHERE b.state IN ('delivered', 'cancelled')"
                       " AND b.closed_at >= ? ORDER BY h.shipment_number, h.changed_at",
    "open_quarantine": "SELECT return_id, reason, raw, seen_at FROM quarantine WHERE resolved_at IS NULL"
                       " ORDER BY seen_at LIMIT ?",
    "open_quarantine_for": "SELECT return_id, raw FROM quarantine WHERE resolved_at IS NULL"
                           " AND (:all OR return_id IN LIST(:ids)) ORDER BY seen_at",
    "latest_corrections": "SELECT return_id, before, after, report_state, corrected_at FROM corrections"
                          " ORDER BY id DESC LIMIT ?",
    "unknown_statuses": "SELECT status, seen, last_seen_at FROM unknown_statuses ORDER BY status",
    "state_counts": "SELECT kind, state, n FROM state_counts",
    "open_quarantine_count": "SELECT COUNT(*) FROM quarantine WHERE resolved_at IS NULL",
    "unknown_status_count": "SELECT COUNT(*) FROM unknown_statuses",
}
# The shop's API: its keys, its audit trail, a check asked for now, and the listing by cursor.
API_SQL = {
    "insert_api_key": "INSERT INTO api_keys (name, prefix, hash, scopes, allow, rate_per_s, created_at, expires_at)"
                      " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    "api_key_by_prefix": "SELECT name, hash, scopes, allow, rate_per_s, expires_at, revoked_at FROM api_keys"
                         " WHERE prefix = ?",
    "api_keys": "SELECT name, prefix, scopes, allow, rate_per_s, created_at, expires_at, revoked_at FROM api_keys"
                " ORDER BY created_at, name",
    "revoke_api_key": "UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
    "insert_audit": "INSERT INTO audit (at, key_name, source_ip, action, target, result, request_id)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
    "audit_since": "SELECT at, key_name, source_ip, action, target, result, request_id FROM audit"
                   " WHERE at >= ? ORDER BY at, id",
    "prune_audit": "DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE at < :cutoff LIMIT :limit)",
    # A check now: first in due order (next_check_at 0), at most once a cooldown a box. A box
    # already due or in flight is the same check: its answer sets the next one as usual.
    "request_check": "UPDATE boxes SET next_check_at = 0, check_requested_at = :now WHERE shipment_number = :shipment"
                     " AND state = 'tracking'"
                     " AND (check_requested_at IS NULL OR check_requested_at <= :now - :cooldown)"
                     " RETURNING shipment_number",
    "box_check_state": "SELECT state, check_requested_at FROM boxes WHERE shipment_number = ?",
    # An Idempotency-Key taken by the first request with it; one whose holder has kept it past
    # :abandoned without an answer (a crash) or that is past :expired is taken anew.
    "claim_idempotency": "INSERT INTO idempotency (key_name, idem_key, body_hash, created_at)"
                         " VALUES (:key_name, :idem_key, :body_hash, :now) ON CONFLICT (key_name, idem_key) DO UPDATE"
                         " SET body_hash = excluded.body_hash, status = NULL, body = NULL,"
                         " created_at = excluded.created_at"
                         " WHERE idempotency.created_at < :expired"
                         " OR (idempotency.status IS NULL AND idempotency.created_at < :abandoned)"
                         " RETURNING created_at",
    "idempotency": "SELECT body_hash, status, body FROM idempotency WHERE key_name = ? AND idem_key = ?",
    "answer_idempotency": "UPDATE idempotency SET status = :status, body = :body"
                          " WHERE key_name = :key_name AND idem_key = :idem_key",
    "prune_idempotency": "DELETE FROM idempotency WHERE created_at < :expired",
    # every return in insertion order after a cursor (the last row's order key), by state and time
    "list_returns": "SELECT r.id, ROW_ORDER(r) AS seq FROM returns r LEFT JOIN reports p ON p.return_id = r.id"
                    " LEFT JOIN boxes b ON b.shipment_number = r.shipment_number"
                    " WHERE ROW_ORDER(r) > :after AND r.seen_at >= :since"
                    " AND (CAST(:state AS TEXT) IS NULL OR p.state = :state OR b.state = :state)"
                    " ORDER BY ROW_ORDER(r) LIMIT :limit",
}
# Webhooks. An event is announced in the transaction of what caused it (an outbox), once per cause
# (its id "<type>:<subject>"), and queued at once for every endpoint that takes its type; the
# senders deliver what is due per endpoint, in due order.
WEBHOOK_SQL = {
    "put_endpoint": "INSERT INTO webhook_endpoints (name, events, cancel_hold_s) VALUES (?, ?, ?)"
                    " ON CONFLICT (name) DO UPDATE SET events = excluded.events,"
                    " cancel_hold_s = excluded.cancel_hold_s",
    "announce_box_returns": "INSERT INTO webhook_events (id, type, subject, occurred_at, created_at)"
                            " SELECT :type || ':' || id, :type, id, :at, :now FROM returns"
                            " WHERE shipment_number = :shipment ON CONFLICT (id) DO NOTHING",
    "announce_collected_joining":  # returns listed into a box already collected
        "INSERT INTO webhook_events (id, type, subject, occurred_at, created_at)"
        " SELECT 'return.collected:' || r.id, 'return.collected', r.id, b.delivered_at, :now"
        " FROM returns r JOIN boxes b ON b.shipment_number = r.shipment_number"
        " WHERE r.id IN LIST(:ids) AND b.state = 'delivered' ON CONFLICT (id) DO NOTHING",
    "cancelled_boxes_of": "SELECT DISTINCT b.shipment_number, b.status_since FROM returns r JOIN boxes b"
                          " ON b.shipment_number = r.shipment_number"
                          " WHERE r.id IN LIST(:ids) AND b.state = 'cancelled'",
    "announce_corrected": "INSERT INTO webhook_events (id, type, subject, occurred_at, created_at)"
                          " SELECT 'return.corrected:' || return_id || ':' || id, 'return.corrected', return_id,"
                          " :at, :now FROM corrections WHERE return_id IN LIST(:ids) AND corrected_at = :now"
                          " ON CONFLICT (id) DO NOTHING",
    # stale, or refused, again after a requeue: another cause, another id
    "announce_stale": "INSERT INTO webhook_events (id, type, subject, occurred_at, created_at)"
                      " SELECT 'shipment.stale:' || shipment_number || ':' || checks, 'shipment.stale',"
                      " shipment_number,"
                      " :at, :now FROM boxes WHERE shipment_number IN LIST(:boxes) AND state = 'stale'"
                      " ON CONFLICT (id) DO NOTHING",
    "announce_overdue": "INSERT INTO webhook_events (id, type, subject, occurred_at, created_at)"
                        " SELECT 'pickup.overdue:' || shipment_number, 'pickup.overdue', shipment_number, :at, :now"
                        " FROM boxes WHERE state = 'tracking' AND COALESCE(requested_at, first_seen_at) < :before"
                        " ON CONFLICT (id) DO NOTHING",
    "announce_refused": "INSERT INTO webhook_events (id, type, subject, occurred_at, created_at)"
                        " SELECT 'report.refused:' || return_id || ':' || attempts, 'report.refused', return_id,"
                        " :at, :now FROM reports WHERE return_id IN LIST(:ids) AND state = 'dead'"
                        " ON CONFLICT (id) DO NOTHING",
    "queue_deliveries": "INSERT INTO webhook_deliveries (id, endpoint, event_id, state, next_attempt_at, created_at)"
                        " SELECT e.name || ' ' || v.id, e.name, v.id, 'pending',"
                        " CASE WHEN v.type = 'return.cancelled' THEN :now + e.cancel_hold_s ELSE :now END, :now"
                        " FROM webhook_events v"
                        " JOIN webhook_endpoints e ON (',' || e.events || ',') LIKE ('%,' || v.type || ',%')"
                        " WHERE v.created_at = :now ON CONFLICT (id) DO NOTHING",
    "due_deliveries": "SELECT d.id, d.event_id, v.type, v.subject, v.occurred_at, d.attempts, d.replays"
                      " FROM webhook_deliveries d INDEXED BY webhook_deliveries_due"
                      " JOIN webhook_events v ON v.id = d.event_id"
                      " WHERE d.endpoint = :endpoint AND d.state = 'pending' AND d.next_attempt_at <= :now"
                      " AND NOT EXISTS (SELECT 1 FROM webhook_endpoints e WHERE e.name = :endpoint"
                      " AND e.disabled_at IS NOT NULL) ORDER BY d.next_attempt_at LIMIT :limit",
    "next_delivery_due_at": "SELECT MIN(next_attempt_at) FROM webhook_deliveries INDEXED BY webhook_deliveries_due"
                            " WHERE endpoint = :endpoint AND state = 'pending' AND NOT EXISTS (SELECT 1"
                            " FROM webhook_endpoints e WHERE e.name = :endpoint AND e.disabled_at IS NOT NULL)",
    "delivery_answer": "UPDATE webhook_deliveries SET state = :state, attempts = attempts + 1,"
                       " next_attempt_at = :next_attempt_at, last_status = :status, last_error = :error,"
                       " delivered_at = CASE WHEN :state = 'delivered' THEN :now ELSE delivered_at END"
                       " WHERE id = :id AND state = 'pending' AND replays = :replays",
    "endpoint_answered": "UPDATE webhook_endpoints SET failing_since = NULL WHERE name = ?",
    "endpoint_failed": "UPDATE webhook_endpoints SET failing_since = COALESCE(failing_since, ?) WHERE name = ?",
    "disable_endpoint": "UPDATE webhook_endpoints SET disabled_at = :now, disabled_why = :why"
                        " WHERE name = :name AND disabled_at IS NULL"
                        " AND (:gone OR failing_since < :now - :after) RETURNING name",
    "enable_endpoint": "UPDATE webhook_endpoints SET disabled_at = NULL, disabled_why = NULL, failing_since = NULL"
                       " WHERE name = :name RETURNING name",
    "wake_deliveries": "UPDATE webhook_deliveries SET next_attempt_at = :now WHERE endpoint = :name"
                       " AND state = 'pending'",
    "webhook_endpoints": "SELECT e.name, e.events, e.disabled_at, e.disabled_why, e.failing_since,"
                         " (SELECT COUNT(*) FROM webhook_deliveries d WHERE d.endpoint = e.name"
                         " AND d.state = 'pending') AS pending,"
                         " (SELECT MIN(d.created_at) FROM webhook_deliveries d WHERE d.endpoint = e.name"
                         " AND d.state = 'pending') AS oldest_pending_at FROM webhook_endpoints e ORDER BY e.name",
    "deliveries": "SELECT d.endpoint, d.event_id, v.type, v.subject, d.state, d.attempts, d.last_status,"
                  " d.last_error, d.created_at, d.delivered_at, d.next_attempt_at FROM webhook_deliveries d"
                  " JOIN webhook_events v ON v.id = d.event_id"
                  " WHERE (CAST(:event AS TEXT) IS NULL OR d.event_id = :event)"
                  " AND (NOT :failed OR (d.state <> 'delivered' AND d.attempts > 0))"
                  " ORDER BY d.created_at DESC, d.id LIMIT :limit",
    # a cancel not yet sent anywhere, taken back: its return moved to the waybill that replaced it
    "withdraw_cancel_deliveries": "DELETE FROM webhook_deliveries WHERE event_id IN LIST(:events)"
                                  " AND state = 'pending' AND attempts = 0 AND replays = 0",
    "withdraw_cancels": "DELETE FROM webhook_events WHERE id IN LIST(:events) AND NOT EXISTS"
                        " (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = webhook_events.id)",
    "replay_event": "UPDATE webhook_deliveries SET state = 'pending', next_attempt_at = :now, attempts = 0,"
                    " replays = replays + 1"
                    " WHERE event_id = :event RETURNING endpoint",
}
SQL = {**HOT_PATH_SQL, **PAGE_SQL, **WRITE_SQL, **OPERATOR_SQL, **SHOW_SQL, **RETENTION_SQL, **EXPORT_SQL, **READ_SQL,
       **API_SQL, **WEBHOOK_SQL}

STATE_COUNT_TRIGGERS = """
CREATE TRIGGER IF NOT EXISTS {table}_uncounted AFTER DELETE ON {table} BEGIN
    UPDATE state_counts SET n = n - 1 WHERE kind = '{table}' AND state = OLD.state;
END;
CREATE TRIGGER IF NOT EXISTS {table}_counted AFTER INSERT ON {table} BEGIN
    INSERT INTO state_counts (kind, state, n) VALUES ('{table}', NEW.state, 1)
    ON CONFLICT (kind, state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS {table}_recounted AFTER UPDATE OF state ON {table}
WHEN OLD.state IS NOT NEW.state BEGIN
    UPDATE state_counts SET n = n - 1 WHERE kind = '{table}' AND state = OLD.state;
    INSERT INTO state_counts (kind, state, n) VALUES ('{table}', NEW.state, 1)
    ON CONFLICT (kind, state) DO UPDATE SET n = n + 1;
END;
"""
SCHEMA += "".join(STATE_COUNT_TRIGGERS.format(table=table) for table in ("boxes", "reports"))  # our names only
TOTAL_COUNT_TRIGGERS = """
CREATE TRIGGER IF NOT EXISTS {table}_counted AFTER INSERT ON {table} BEGIN
    INSERT INTO state_counts (kind, state, n) VALUES ('{table}', '', 1)
    ON CONFLICT (kind, state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS {table}_uncounted AFTER DELETE ON {table} BEGIN
    UPDATE state_counts SET n = n - 1 WHERE kind = '{table}' AND state = '';
END;
"""
SCHEMA += "".join(TOTAL_COUNT_TRIGGERS.format(table=table) for table in ("returns", "corrections"))  # ours only
# Columns an older file lacks (its CREATE TABLE has run already): (table, column definition).
ADDED_COLUMNS = (
    ("reports", "revision INTEGER NOT NULL DEFAULT 0"),  # 4
    ("reports", "first_sent_revision INTEGER"),  # 4
    ("reports", "accepted_revision INTEGER"),  # 4
    ("boxes", "status_since REAL"),  # 5
    ("boxes", "requested_at REAL"),  # 6
    ("boxes", "check_requested_at REAL"),  # 7: when the API last asked for a check now
    ("corrections", "source TEXT NOT NULL DEFAULT 'feed'"),  # 8
    ("returns", "source TEXT NOT NULL DEFAULT 'feed'"),  # 8: the feed, or the API key that pushed it first
    ("webhook_endpoints", "cancel_hold_s REAL NOT NULL DEFAULT 0"),  # 10
)
SCHEMA_AFTER_MIGRATION = (
    "CREATE INDEX IF NOT EXISTS reports_outdated ON reports (done_at) WHERE accepted_revision < revision",
    "CREATE INDEX IF NOT EXISTS boxes_overdue ON boxes (COALESCE(requested_at, first_seen_at))"
    " WHERE state = 'tracking'",
)
HISTORY_PER_BOX = 32  # status history entries kept a box (a failed pickup attempt adds two)
IDEMPOTENCY_KEEP_S = 24 * 3600.0  # an API Idempotency-Key's first answer is replayed this long
IDEMPOTENCY_ABANDONED_S = 30.0  # a key held this long without an answer is free again: its instance died (a
#                                 request takes a commit or two; a failing store refuses it at once)
ATTEMPTS_PER_REPORT = 20  # report attempts kept a report, the latest
RETENTION_BATCH = 200  # finished boxes deleted a transaction (about 500 returns' rows: milliseconds)
VACUUM_PAGES_PER_BATCH = 2000  # free pages handed back to the file system after each batch
FEED_CURSOR_KEY = "feed_cursor"
HEARTBEAT_KEY = "heartbeat"
# What `migrate` copies, table by table in this order, and the columns both backends share (ids the
# databases number themselves are numbered anew, in the same order). state_counts is not copied:
# the target's triggers count the rows as they arrive.
COPIED_TABLES = {
    "meta": ("key", "value"),
    "returns": ("id", "order_number", "order_item_number", "shipment_number", "requested_at", "seen_at", "source"),
    "return_names": ("name", "return_id"),
    "boxes": ("shipment_number", "state", "next_check_at", "first_seen_at", "checks", "not_found", "errors",
              "registered_at", "last_status", "delivered_at", "closed_at", "last_error", "status_since",
              "requested_at"),
    "reports": ("return_id", "order_number", "order_item_number", "shipment_number", "collected_at", "state",
                "attempts", "next_attempt_at", "queued_at", "done_at", "outcome", "last_error", "revision",
                "first_sent_revision", "accepted_revision"),
    "quarantine": ("fingerprint", "return_id", "reason", "raw", "seen_at", "resolved_at"),
    "box_history": ("shipment_number", "changed_at", "status", "seen_at"),
    "report_attempts": ("return_id", "attempt", "attempted_at", "outcome", "http_status", "latency_s", "error"),
    "corrections": ("return_id", "fields", "before", "after", "report_state", "corrected_at", "source"),
    "unknown_statuses": ("status", "first_seen_at", "last_seen_at", "seen"),
    "api_keys": ("name", "prefix", "hash", "scopes", "allow", "rate_per_s", "created_at", "expires_at", "revoked_at"),
    "audit": ("at", "key_name", "source_ip", "action", "target", "result", "request_id"),
    "idempotency": ("key_name", "idem_key", "body_hash", "status", "body", "created_at"),
    "webhook_endpoints": ("name", "events", "disabled_at", "disabled_why", "failing_since", "cancel_hold_s"),
    "webhook_events": ("id", "type", "subject", "occurred_at", "created_at"),
    "webhook_deliveries": ("id", "endpoint", "event_id", "state", "attempts", "replays", "next_attempt_at",
                           "created_at", "delivered_at", "last_status", "last_error"),
}


async def _rollback(connection: aiosqlite.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):  # the failure may already have ended the transaction
        await connection.execute("ROLLBACK")


# ── PostgreSQL's tables ─────────────────────────────────────────────────────────────────────
# The same tables in PostgreSQL, for `storage.url` (the tables both backends began with are written
# per backend: identity columns, triggers in PL/pgSQL, seconds as double precision; those added
# since are TABLES_IN_BOTH, made PostgreSQL's by pg_words), and the fleet's own: claims on rows,
# the feed's lease, the alerts sent.

PG_SCHEMA_VERSION = 6  # PostgreSQL's own numbering: 1 holds what SQLite's version 6 holds; 2: no instances
#                       table; 3: the shop's API (SQLite's 7); 4: names, corrections' sources (SQLite's 8);
#                       5: webhooks (SQLite's 9); 6: endpoints' cancel_hold_s (SQLite's 10)
PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS returns (
    seq               BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    id                TEXT PRIMARY KEY,
    order_number      TEXT NOT NULL,
    order_item_number TEXT NOT NULL,
    shipment_number   TEXT NOT NULL,
    requested_at      TEXT,
    seen_at           DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS returns_by_shipment ON returns (shipment_number);
CREATE INDEX IF NOT EXISTS returns_by_order ON returns (order_number);
CREATE TABLE IF NOT EXISTS boxes (
    shipment_number TEXT PRIMARY KEY,
    state           TEXT NOT NULL,
    next_check_at   DOUBLE PRECISION,
    first_seen_at   DOUBLE PRECISION NOT NULL,
    checks          INTEGER NOT NULL DEFAULT 0,
    not_found       INTEGER NOT NULL DEFAULT 0,
    errors          INTEGER NOT NULL DEFAULT 0,
    registered_at   DOUBLE PRECISION,
    last_status     TEXT,
    delivered_at    TEXT,
    closed_at       DOUBLE PRECISION,
    last_error      TEXT,
    status_since    DOUBLE PRECISION,
    requested_at    DOUBLE PRECISION,
    claimed_by      TEXT,
    claim_until     DOUBLE PRECISION,
    claim           BIGINT
);
CREATE INDEX IF NOT EXISTS boxes_due ON boxes (next_check_at) WHERE state = 'tracking';
CREATE INDEX IF NOT EXISTS boxes_stale ON boxes (first_seen_at) WHERE state = 'stale';
CREATE INDEX IF NOT EXISTS boxes_closed ON boxes (closed_at) WHERE state IN ('delivered', 'cancelled', 'emptied');
CREATE INDEX IF NOT EXISTS boxes_overdue ON boxes ((COALESCE(requested_at, first_seen_at))) WHERE state = 'tracking';
CREATE TABLE IF NOT EXISTS reports (
    return_id           TEXT PRIMARY KEY,
    order_number        TEXT NOT NULL,
    order_item_number   TEXT NOT NULL,
    shipment_number     TEXT NOT NULL,
    collected_at        TEXT NOT NULL,
    state               TEXT NOT NULL,
    attempts            INTEGER NOT NULL DEFAULT 0,
    next_attempt_at     DOUBLE PRECISION,
    queued_at           DOUBLE PRECISION NOT NULL,
    done_at             DOUBLE PRECISION,
    outcome             TEXT,
    last_error          TEXT,
    revision            INTEGER NOT NULL DEFAULT 0,
    first_sent_revision INTEGER,
    accepted_revision   INTEGER,
    claimed_by          TEXT,
    claim_until         DOUBLE PRECISION,
    claim               BIGINT
);
CREATE INDEX IF NOT EXISTS reports_due ON reports (next_attempt_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS reports_pending_by_age ON reports (queued_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS reports_dead ON reports (done_at) WHERE state = 'dead';
CREATE INDEX IF NOT EXISTS reports_outdated ON reports (done_at) WHERE accepted_revision < revision;
-- Claims (several instances share the work): an instance takes a due box or report with a claim
-- number from this sequence and a lease on the database's clock; its answer is stored only while
-- the row still carries that claim. The partial indexes find an instance's claims to renew.
CREATE SEQUENCE IF NOT EXISTS claims;
CREATE INDEX IF NOT EXISTS boxes_claimed ON boxes (claimed_by) WHERE claimed_by IS NOT NULL;
CREATE INDEX IF NOT EXISTS reports_claimed ON reports (claimed_by) WHERE claimed_by IS NOT NULL;
-- Leases for singleton work (the feed): who holds it, until when (database clock), and an epoch
-- bumped at every change of holder — a page is stored only under the epoch it was read under.
CREATE TABLE IF NOT EXISTS leases (
    name   TEXT PRIMARY KEY,
    holder TEXT,
    epoch  BIGINT NOT NULL DEFAULT 0,
    until  DOUBLE PRECISION NOT NULL DEFAULT 0
);
INSERT INTO leases (name) VALUES ('feed') ON CONFLICT (name) DO NOTHING;
-- Version 1 counted live instances by heartbeats; their membership locks do now (PgFleet).
DROP TABLE IF EXISTS instances;
-- Slack alerts sent by any instance: one per key and window for the whole fleet.
CREATE TABLE IF NOT EXISTS alerts_sent (
    key     TEXT PRIMARY KEY,
    sent_at DOUBLE PRECISION NOT NULL
);
-- The database's clock, in Unix seconds: leases never depend on the hosts' clocks agreeing.
CREATE OR REPLACE FUNCTION tracker_now() RETURNS double precision LANGUAGE sql VOLATILE AS $$
    SELECT extract(epoch FROM clock_timestamp())::double precision
$$;
CREATE TABLE IF NOT EXISTS quarantine (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    fingerprint TEXT NOT NULL UNIQUE,
    return_id   TEXT,
    reason      TEXT NOT NULL,
    raw         TEXT NOT NULL,
    seen_at     DOUBLE PRECISION NOT NULL,
    resolved_at DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS quarantine_open ON quarantine (return_id) WHERE resolved_at IS NULL;
CREATE INDEX IF NOT EXISTS quarantine_by_return ON quarantine (return_id);
CREATE TABLE IF NOT EXISTS state_counts (
    kind  TEXT NOT NULL,
    state TEXT NOT NULL,
    n     BIGINT NOT NULL,
    PRIMARY KEY (kind, state)
);
CREATE TABLE IF NOT EXISTS box_history (
    shipment_number TEXT NOT NULL,
    changed_at      DOUBLE PRECISION NOT NULL,
    status          TEXT NOT NULL,
    seen_at         DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (shipment_number, changed_at, status)
);
CREATE TABLE IF NOT EXISTS report_attempts (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    return_id    TEXT NOT NULL,
    attempt      INTEGER NOT NULL,
    attempted_at DOUBLE PRECISION NOT NULL,
    outcome      TEXT NOT NULL,
    http_status  INTEGER,
    latency_s    DOUBLE PRECISION,
    error        TEXT
);
CREATE INDEX IF NOT EXISTS report_attempts_by_return ON report_attempts (return_id, id);
CREATE TABLE IF NOT EXISTS corrections (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    return_id    TEXT NOT NULL,
    fields       TEXT NOT NULL,
    before       TEXT NOT NULL,
    after        TEXT NOT NULL,
    report_state TEXT,
    corrected_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS corrections_by_return ON corrections (return_id);
CREATE TABLE IF NOT EXISTS unknown_statuses (
    status        TEXT PRIMARY KEY,
    first_seen_at DOUBLE PRECISION NOT NULL,
    last_seen_at  DOUBLE PRECISION NOT NULL,
    seen          BIGINT NOT NULL
);
{tables_in_both}
-- Columns a database of an earlier version lacks, last: each ALTER locks its table until the commit.
ALTER TABLE boxes ADD COLUMN IF NOT EXISTS check_requested_at DOUBLE PRECISION;
ALTER TABLE returns ADD COLUMN IF NOT EXISTS source TEXT NOT NULL DEFAULT 'feed';
ALTER TABLE corrections ADD COLUMN IF NOT EXISTS source TEXT NOT NULL DEFAULT 'feed';
ALTER TABLE webhook_endpoints ADD COLUMN IF NOT EXISTS cancel_hold_s DOUBLE PRECISION NOT NULL DEFAULT 0;
CREATE OR REPLACE FUNCTION tracker_count_state() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE state_counts SET n = n - 1 WHERE kind = TG_TABLE_NAME AND state = OLD.state;
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        INSERT INTO state_counts (kind, state, n) VALUES (TG_TABLE_NAME, NEW.state, 1)
        ON CONFLICT (kind, state) DO UPDATE SET n = state_counts.n + 1;
    END IF;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION tracker_count_total() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO state_counts (kind, state, n) VALUES (TG_TABLE_NAME, '', CASE TG_OP WHEN 'INSERT' THEN 1 ELSE -1 END)
    ON CONFLICT (kind, state) DO UPDATE SET n = state_counts.n + excluded.n;
    RETURN NULL;
END $$;
"""


def pg_words(ddl: str) -> str:
    """SQLite's DDL of a table new in both, in PostgreSQL's types: a rowid key an identity."""
    ddl = ddl.replace("INTEGER PRIMARY KEY", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY")
    return re.sub(r"\bINTEGER\b", "BIGINT", re.sub(r"\bREAL\b", "DOUBLE PRECISION", ddl))


PG_SCHEMA = PG_SCHEMA.replace("{tables_in_both}", pg_words(TABLES_IN_BOTH))
PG_STATE_COUNT_TRIGGERS = """
CREATE OR REPLACE TRIGGER {table}_counted AFTER INSERT OR DELETE ON {table}
    FOR EACH ROW EXECUTE FUNCTION tracker_count_state();
CREATE OR REPLACE TRIGGER {table}_recounted AFTER UPDATE OF state ON {table}
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION tracker_count_state();
"""
PG_TOTAL_COUNT_TRIGGERS = """
CREATE OR REPLACE TRIGGER {table}_counted AFTER INSERT OR DELETE ON {table}
    FOR EACH ROW EXECUTE FUNCTION tracker_count_total();
"""
PG_SCHEMA += "".join(PG_STATE_COUNT_TRIGGERS.format(table=table) for table in ("boxes", "reports"))  # ours only
PG_SCHEMA += "".join(PG_TOTAL_COUNT_TRIGGERS.format(table=table) for table in ("returns", "corrections"))

# Sharing the work (several instances on one database: PgFleet). Every lease is on tracker_now(),
# the database's clock. A claim takes due rows nobody holds (or whose holder's lease ran out),
# skipping rows another instance is claiming this very moment (SKIP LOCKED: River, Oban, pgqueuer
# alike). Only PostgreSQL has a fleet, so these are written in its words alone.
PG_FLEET_SQL = {
    "claim_boxes":
        "WITH due AS (SELECT shipment_number FROM boxes WHERE state = 'tracking' AND next_check_at <= %(now)s"
        " AND (claim_until IS NULL OR claim_until < tracker_now()) ORDER BY next_check_at LIMIT %(limit)s"
        " FOR UPDATE SKIP LOCKED)"
        " UPDATE boxes b SET claimed_by = %(me)s, claim_until = tracker_now() + %(lease)s, claim = nextval('claims')"
        " FROM due WHERE b.shipment_number = due.shipment_number"
        " RETURNING b.next_check_at AS due_at, b.shipment_number, b.first_seen_at, b.not_found, b.errors,"
        " b.status_since, b.checks, b.claim",
    "claim_reports":
        "WITH due AS (SELECT return_id FROM reports WHERE state = 'pending' AND next_attempt_at <= %(now)s"
        " AND (claim_until IS NULL OR claim_until < tracker_now()) ORDER BY next_attempt_at LIMIT %(limit)s"
        " FOR UPDATE SKIP LOCKED)"
        " UPDATE reports r SET claimed_by = %(me)s, claim_until = tracker_now() + %(lease)s, claim = nextval('claims')"
        " FROM due WHERE r.return_id = due.return_id"
        " RETURNING r.next_attempt_at AS due_at, r.return_id, r.order_number, r.order_item_number, r.shipment_number,"
        " r.collected_at, r.attempts, r.queued_at, r.revision, r.first_sent_revision, r.claim",
    # inside the commit: which answers still hold their claim (the rows locked until it ends)
    "box_claims": "SELECT shipment_number, claim FROM boxes WHERE shipment_number = ANY(%s) FOR UPDATE",
    "report_claims": "SELECT return_id, claim FROM reports WHERE return_id = ANY(%s) FOR UPDATE",
    # only what the instance still holds in memory: a claim it dropped runs out and goes to anyone
    "renew_box_claims": "UPDATE boxes SET claim_until = tracker_now() + %(lease)s"
                        " WHERE shipment_number = ANY(%(boxes)s) AND claimed_by = %(me)s",
    "renew_report_claims": "UPDATE reports SET claim_until = tracker_now() + %(lease)s"
                           " WHERE return_id = ANY(%(reports)s) AND claimed_by = %(me)s",
    "release_box_claims": "UPDATE boxes SET claimed_by = NULL, claim_until = NULL, claim = NULL"
                          " WHERE claimed_by = %(me)s",
    "release_report_claims": "UPDATE reports SET claimed_by = NULL, claim_until = NULL, claim = NULL"
                             " WHERE claimed_by = %(me)s",
    # the feed: kept by its holder under the same epoch, or taken (a new epoch) once it ran out
    "keep_feed": "UPDATE leases SET until = tracker_now() + %(lease)s"
                 " WHERE name = 'feed' AND holder = %(me)s AND epoch = %(epoch)s RETURNING epoch",
    "take_feed": "UPDATE leases SET holder = %(me)s, epoch = epoch + 1, until = tracker_now() + %(lease)s"
                 " WHERE name = 'feed' AND (until < tracker_now() OR holder IS NULL) RETURNING epoch",
    "give_up_feed": "UPDATE leases SET until = 0 WHERE name = 'feed' AND holder = %(me)s",
    "number_returns_in_commit_order": "SELECT pg_advisory_xact_lock(hashtext('tracker returns'))",
    # a box's answer (which may queue its returns' reports) and a page (which may correct those
    # returns) never commit side by side: each would miss the other's rows (a report queued with
    # the fields a correction was replacing, the correction finding no report to correct)
    "beside_no_page": "SELECT pg_advisory_xact_lock_shared(hashtext('tracker returns'))",
    # Membership: each live instance holds a session advisory lock (MEMBER_LOCK_CLASS, its own key)
    # on a connection of its own. PostgreSQL drops the lock with the session, so a process that
    # dies leaves the count at once, and a host that dies within its TCP keepalives.
    "join_fleet": "SELECT pg_try_advisory_lock(%(class)s, %(key)s)",
    "leave_fleet": "SELECT pg_advisory_unlock_all()",
    "fleet_members": "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                     " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                     " AND classid = %(class)s AND objsubid = 2",
    # one Slack message per key and window for the fleet: whoever inserts (or renews) it sends it
    "alert_once": "INSERT INTO alerts_sent (key, sent_at) VALUES (%(key)s, tracker_now())"
                  " ON CONFLICT (key) DO UPDATE SET sent_at = excluded.sent_at"
                  " WHERE alerts_sent.sent_at < tracker_now() - %(window)s RETURNING key",
    "has_schema": "SELECT to_regclass('meta') IS NOT NULL",
    "schema_version": "SELECT value FROM meta WHERE key = 'schema_version'",
}
PG_RETRY_SQLSTATES = ("40001", "40P01")  # serialization failure, deadlock: the transaction is run again
PG_COMMIT_ATTEMPTS = 5
MEMBER_LOCK_CLASS = 0x74726B  # "trk": the first key of every instance's membership lock
FLEET_COUNT_EVERY_S = 0.5  # how often an instance counts the fleet (a dead one's share returns within it)
FLEET_SETTLE_S = 5.0  # after its own reconnect, the others' too: the count may only rise until this
#                      long after it last rose


# ── the dialects ────────────────────────────────────────────────────────────────────────────


class Dialect(enum.StrEnum):
    SQLITE = "sqlite"
    POSTGRESQL = "postgresql"


# (pattern, replacement) in order, each dialect's spelling of SQL's shared words (see "SQL,
# written once"). PostgreSQL's placeholders: `?` → %s, `:name` → %(name)s (a literal % doubled
# first; a `::` cast is never a name).
DIALECT_RULES: dict[Dialect, tuple[tuple[str, str], ...]] = {
    Dialect.SQLITE: (
        (r"\bIN LIST\(([^)]+)\)", r"IN (SELECT value FROM json_each(\1))"),
        (r"\bLIST_ROWS\(([^)]+)\)", r"json_each(\1)"),
        (r"\bGREATEST\(", "MAX("),
        (r"\bLEAST\(", "MIN("),
        (r"\bEPOCH_OF\((\w+)\)", r"((julianday(\1) - 2440587.5) * 86400.0)"),
        (r"\bRANDOM_FRACTION\b", "((abs(random()) % 1000000) / 1000000.0)"),
        (r"\bROW_ORDER\((\w+)\)", r"\1.rowid"),
        (r" RELEASE_CLAIM\b", ""),
        (r"\bJSON_ROWS\(", "json_group_array("),
        (r"\bJSON_ROW\(", "json_object("),
    ),
    Dialect.POSTGRESQL: (
        (r"%", "%%"),
        (r"\bIN LIST\(([^)]+)\)", r"= ANY(CAST(\1 AS text[]))"),
        (r"\bLIST_ROWS\(([^)]+)\)", r"unnest(CAST(\1 AS text[])) AS value"),
        (r"\?", "%s"),
        (r"(?<![:\w]):([A-Za-z_]\w*)", r"%(\1)s"),
        (r"\bEPOCH_OF\((\w+)\)", r"EXTRACT(EPOCH FROM \1::timestamptz)::float8"),
        (r"\bRANDOM_FRACTION\b", "random()"),
        (r"\bROW_ORDER\((\w+)\)", r"\1.seq"),
        (r" RELEASE_CLAIM\b", ", claimed_by = NULL, claim_until = NULL, claim = NULL"),
        (r" INDEXED BY \w+", ""),
        (r"\bJSON_ROWS\(", "json_agg("),
        (r"\bJSON_ROW\(", "json_build_object("),
    ),
}


def in_dialect(dialect: Dialect, sql: str) -> str:
    for pattern, replacement in DIALECT_RULES[dialect]:
        sql = re.sub(pattern, replacement, sql)
    return sql


STATEMENTS: dict[Dialect, dict[str, str]] = {
    Dialect.SQLITE: {name: in_dialect(Dialect.SQLITE, sql) for name, sql in SQL.items()} | SQLITE_ONLY_SQL,
    Dialect.POSTGRESQL: {name: in_dialect(Dialect.POSTGRESQL, sql) for name, sql in SQL.items()} | PG_FLEET_SQL,
}
Params = Sequence[Any] | Mapping[str, Any]


T = typing.TypeVar("T")


class NotYetInSchema(Exception):
    """A read of what an older SQLite file lacks (opened read-only by `status` before any upgrade)."""


# ── the per-backend adapters ────────────────────────────────────────────────────────────────
# A Database runs statements by name (STATEMENTS of its dialect) and nothing else: no rule of the
# store is here. Store is written once over this Protocol.


class Transaction(typing.Protocol):
    async def execute(self, name: str, params: Params = ()) -> int:
        """Runs one statement; the rows it changed."""

    async def execute_many(self, name: str, rows: Sequence[Params]) -> int:
        """Runs one statement per row (rows hold no lists); the rows changed in all."""

    async def fetch(self, name: str, params: Params = ()) -> list[tuple[Any, ...]]: ...

    async def fetch_dicts(self, name: str, params: Params = ()) -> list[dict[str, Any]]:
        """Rows read by column name."""


class Database(typing.Protocol):
    dialect: Dialect
    where: str  # what `status` prints: a path, or a URL without its password

    async def in_transaction(self, work: Callable[[Transaction], Awaitable[T]]) -> T:
        """`work` in one transaction, committed when it returns, rolled back when it raises (and,
        where the database asks for it, run again)."""

    async def fetch(self, name: str, params: Params = ()) -> list[tuple[Any, ...]]:
        """One read outside any transaction (raises NotYetInSchema for what an old file lacks)."""

    async def fetch_dicts(self, name: str, params: Params = ()) -> list[dict[str, Any]]: ...

    def stream(self, name: str, params: Mapping[str, Any]) -> typing.AsyncGenerator[dict[str, Any], None]:
        """Every row as a dict, fetched a chunk at a time within one read snapshot."""

    async def query(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        """A statement of the caller's own, in this dialect (tests, `migrate`)."""

    async def freed_space_back(self) -> None:
        """After retention deleted rows: what the file system can have back."""

    async def close(self) -> None: ...


def _as_json_lists(params: Params) -> Params:
    """SQLite takes an id list as a JSON array (read by json_each)."""
    if isinstance(params, Mapping):
        return {k: json.dumps(v) if isinstance(v, list) else v for k, v in params.items()}
    return [json.dumps(v) if isinstance(v, list) else v for v in params]


class SqliteTransaction:
    def __init__(self, connection: aiosqlite.Connection) -> None:
        self._connection = connection
        self._sql = STATEMENTS[Dialect.SQLITE]

    async def execute(self, name: str, params: Params = ()) -> int:
        cursor = await self._connection.execute(self._sql[name], _as_json_lists(params))
        return max(cursor.rowcount, 0)

    async def execute_many(self, name: str, rows: Sequence[Params]) -> int:
        if not rows:
            return 0
        cursor = await self._connection.executemany(self._sql[name], rows)
        return max(cursor.rowcount, 0)

    async def fetch(self, name: str, params: Params = ()) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in await self._connection.execute_fetchall(self._sql[name], _as_json_lists(params))]

    async def fetch_dicts(self, name: str, params: Params = ()) -> list[dict[str, Any]]:
        return await _sqlite_dicts(self._connection, self._sql[name], _as_json_lists(params))


_SQLITE_COLUMNS: dict[str, list[str]] = {}  # a statement's column names, learned at its first run


@contextlib.contextmanager
def _not_yet_in_schema() -> typing.Iterator[None]:
    """SQLite's "no such table/column" as NotYetInSchema: an older file opened read-only lacks it."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if "no such" in str(exc):
            raise NotYetInSchema(str(exc)) from exc
        raise


async def _sqlite_dicts(connection: aiosqlite.Connection, sql: str, params: Params) -> list[dict[str, Any]]:
    """Rows by column name. After a statement's first run, one thread hop that runs it to its end
    (execute_fetchall: see SqliteDatabase.query), its names zipped on from what that run learned."""
    with _not_yet_in_schema():
        names = _SQLITE_COLUMNS.get(sql)
        if names is not None:
            return [dict(zip(names, row)) for row in await connection.execute_fetchall(sql, params)]
        cursor = await connection.execute(sql, params)
    try:
        names = _SQLITE_COLUMNS[sql] = [column[0] for column in cursor.description]
        return [dict(zip(names, row)) for row in await cursor.fetchall()]
    finally:
        await cursor.close()


class SqliteDatabase:
    """One file in WAL mode: a writer connection for the committer's transactions, a reader for
    everything else (WAL lets it read while the writer writes)."""

    dialect = Dialect.SQLITE

    def __init__(self, writer: aiosqlite.Connection, reader: aiosqlite.Connection, path: str) -> None:
        self.writer = writer
        self._reader = reader
        self.where = path
        self._sql = STATEMENTS[Dialect.SQLITE]

    @classmethod
    async def open(cls, path: str, *, readonly: bool = False) -> "SqliteDatabase":
        if readonly:
            if not Path(path).exists():
                raise FileNotFoundError(path)
            reader = await aiosqlite.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
            await reader.execute("PRAGMA busy_timeout = 5000")
            return cls(reader, reader, path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # the file holds customer data: owner only
        os.close(fd)
        writer = await aiosqlite.connect(path, isolation_level=None)
        try:
            for pragma in (
                "PRAGMA auto_vacuum = INCREMENTAL",  # before anything is written: a new file starts so
                "PRAGMA journal_mode = WAL",
                "PRAGMA synchronous = NORMAL",
                "PRAGMA busy_timeout = 5000",
                "PRAGMA foreign_keys = ON",
            ):
                await writer.execute(pragma)
            await cls._check_integrity(writer, path)
            await cls._vacuum_incrementally(writer)
            await writer.executescript(SCHEMA)
            await cls._migrate(writer)
        except BaseException:
            await writer.close()  # its thread would otherwise keep the failed process alive
            raise
        reader = await aiosqlite.connect(path, isolation_level=None)
        await reader.execute("PRAGMA busy_timeout = 5000")
        return cls(writer, reader, path)

    @staticmethod
    async def _migrate(writer: aiosqlite.Connection) -> None:
        """Version 2 counts rows by state with triggers: count what a version-1 file already
        holds, once. Version 3 reads stale and dead rows by partial indexes (SCHEMA creates them):
        the full indexes on state go. Versions 4 to 6 add columns (ADDED_COLUMNS; SCHEMA creates
        their new tables). One transaction, so a concurrent `requeue` cannot slip between."""
        await writer.execute("BEGIN IMMEDIATE")
        try:
            version = list(await writer.execute_fetchall("PRAGMA user_version"))[0][0]
            if version < 2:
                await writer.execute("DELETE FROM state_counts")
                await writer.execute("INSERT INTO state_counts (kind, state, n) " + SQLITE_ONLY_SQL["count_by_state"])
            if version < 3:
                await writer.execute("DROP INDEX IF EXISTS boxes_by_state")
                await writer.execute("DROP INDEX IF EXISTS reports_by_state")
            if version < SCHEMA_VERSION:
                for table, column in ADDED_COLUMNS:
                    present = {row[1] for row in await writer.execute_fetchall(f"PRAGMA table_info({table})")}
                    if column.split()[0] not in present:
                        await writer.execute(f"ALTER TABLE {table} ADD COLUMN {column}")  # our names only
            for statement in SCHEMA_AFTER_MIGRATION:
                await writer.execute(statement)
            await writer.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            await writer.execute("COMMIT")
        except BaseException:
            await _rollback(writer)
            raise

    @staticmethod
    async def _vacuum_incrementally(writer: aiosqlite.Connection) -> None:
        """Pages that retention frees go back to the file system (PRAGMA incremental_vacuum after
        each batch). A file made before that needs one full VACUUM to switch: once, at start."""
        if list(await writer.execute_fetchall("PRAGMA auto_vacuum"))[0][0] != 2:  # set on open; an old file:
            await writer.execute("VACUUM")

    @staticmethod
    async def _check_integrity(writer: aiosqlite.Connection, path: str) -> None:
        """A damaged file must stop the start, not be written on. quick_check reads every page
        (seconds for millions of rows) but skips the slow index-content comparison."""
        rows = await writer.execute_fetchall("PRAGMA quick_check(5)")
        problems = [row[0] for row in rows if row[0] != "ok"]
        if problems:
            raise sqlite3.DatabaseError(
                f"{path} failed its integrity check: {'; '.join(problems)} — stop here and restore it from "
                "a backup (README: Operating it)")

    async def close(self) -> None:
        await self._reader.close()
        if self.writer is not self._reader:
            await self.writer.close()

    async def in_transaction(self, work: Callable[[Transaction], Awaitable[T]]) -> T:
        await self.writer.execute("BEGIN IMMEDIATE")
        try:
            result = await work(SqliteTransaction(self.writer))
            await self.writer.execute("COMMIT")
        except BaseException:
            await _rollback(self.writer)
            raise
        return result

    async def freed_space_back(self) -> None:
        # Outside the transaction: the pragma frees a page a step, and only a script runs it to its end.
        await self.writer.executescript(f"PRAGMA incremental_vacuum({VACUUM_PAGES_PER_BATCH});")

    async def fetch(self, name: str, params: Params = ()) -> list[tuple[Any, ...]]:
        return await self.query(self._sql[name], _as_json_lists(params))

    async def query(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        # One thread hop that runs the statement to its end. A statement left open across hops
        # (execute, then fetch, then close) holds its read snapshot, and a query another stage
        # runs meanwhile on this connection would see that stale snapshot.
        with _not_yet_in_schema():
            return [tuple(row) for row in await self._reader.execute_fetchall(sql, params)]

    async def fetch_dicts(self, name: str, params: Params = ()) -> list[dict[str, Any]]:
        return await _sqlite_dicts(self._reader, self._sql[name], _as_json_lists(params))

    async def stream(self, name: str, params: Mapping[str, Any]) -> typing.AsyncGenerator[dict[str, Any], None]:
        async with self._reader.execute(self._sql[name], params) as cursor:
            names = [column[0] for column in cursor.description]
            async for row in cursor:
                yield dict(zip(names, row))

    async def rows_of(self, table: str) -> typing.AsyncGenerator[tuple[Any, ...], None]:
        """Every row of one of COPIED_TABLES, its columns in that order, oldest first (`migrate`)."""
        columns = ", ".join(COPIED_TABLES[table])  # our names only
        order = "shipment_number, changed_at" if table == "box_history" else "rowid"  # WITHOUT ROWID
        async with self._reader.execute(f"SELECT {columns} FROM {table} ORDER BY {order}") as cursor:
            async for row in cursor:
                yield tuple(row)


class PostgresTransaction:
    def __init__(self, cursor: "psycopg.AsyncCursor[Any]") -> None:
        self._cursor = cursor
        self._sql = STATEMENTS[Dialect.POSTGRESQL]

    async def execute(self, name: str, params: Params = ()) -> int:
        await self._cursor.execute(self._sql[name], params)
        return max(self._cursor.rowcount, 0)

    async def execute_many(self, name: str, rows: Sequence[Params]) -> int:
        if not rows:
            return 0
        await self._cursor.executemany(self._sql[name], rows)
        return max(self._cursor.rowcount, 0)

    async def fetch(self, name: str, params: Params = ()) -> list[tuple[Any, ...]]:
        await self._cursor.execute(self._sql[name], params)
        return [tuple(row) for row in await self._cursor.fetchall()]

    async def fetch_dicts(self, name: str, params: Params = ()) -> list[dict[str, Any]]:
        await self._cursor.execute(self._sql[name], params)
        names = [column.name for column in self._cursor.description or ()]
        return [dict(zip(names, row)) for row in await self._cursor.fetchall()]


class PostgresDatabase:
    """Two connections — the writer runs the committer's transactions, the reader single
    statements (reads, claims, renewals) — each opened again after it broke. A failed connection
    raises psycopg.OperationalError, which the committer treats as the disk's failures are
    treated: nothing was changed, try again later."""

    dialect = Dialect.POSTGRESQL

    def __init__(self, url: str, readonly: bool, lease_s: float) -> None:
        self.url = url
        self.where = redact_database_url(url)
        self.lease_s = lease_s
        self._readonly = readonly
        self._sql = STATEMENTS[Dialect.POSTGRESQL]
        self._writer: psycopg.AsyncConnection[Any] | None = None
        self._reader: psycopg.AsyncConnection[Any] | None = None

    @classmethod
    async def open(cls, url: str, *, readonly: bool = False, lease_s: float = 30.0) -> "PostgresDatabase":
        db = cls(url, readonly, lease_s)
        conn = await db._connection("writer")
        if not readonly:
            await db._migrate(conn)
        return db

    async def connect(self, role: str) -> "psycopg.AsyncConnection[Any]":
        """A new connection whose death either end notices within about lease_s: libpq's TCP
        keepalives for a server that vanished, the server's own (set for this session) for a
        client host that did — it then ends the session and drops what the session held."""
        idle, interval = max(1, int(self.lease_s / 3)), max(1, int(self.lease_s / 9))
        conn = await pg().AsyncConnection.connect(
            self.url, autocommit=True, connect_timeout=10, application_name=f"tracker-{role}",
            keepalives=1, keepalives_idle=idle, keepalives_interval=interval, keepalives_count=3)
        await conn.execute(f"SET tcp_keepalives_idle = {idle}; SET tcp_keepalives_interval = {interval};"
                           " SET tcp_keepalives_count = 3")  # our numbers only
        if self._readonly:
            await conn.execute("SET default_transaction_read_only = on")
        return conn

    async def _connection(self, role: str) -> "psycopg.AsyncConnection[Any]":
        conn = self._writer if role == "writer" else self._reader
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                await conn.close()
            conn = await self.connect(role)
            if role == "writer":
                self._writer = conn
            else:
                self._reader = conn
        return conn

    async def _migrate(self, conn: "psycopg.AsyncConnection[Any]") -> None:
        """One transaction under an advisory lock: instances starting together migrate once. A
        database already at this version is left alone: the DDL would lock the tables the running
        instances write, and could deadlock with their commits."""
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('tracker schema'))")
            exists = await (await conn.execute(self._sql["has_schema"])).fetchone()
            found = exists and exists[0] and await (await conn.execute(self._sql["schema_version"])).fetchone()
            if found and found[0] == str(PG_SCHEMA_VERSION):
                return
            await conn.execute(PG_SCHEMA)  # our constant, several statements
            await conn.execute(self._sql["put_meta"], ("schema_version", str(PG_SCHEMA_VERSION)))

    async def close(self) -> None:
        for conn in (self._writer, self._reader):
            if conn is not None:
                await conn.close()

    async def in_transaction(self, work: Callable[[Transaction], Awaitable[T]]) -> T:
        for attempt in range(PG_COMMIT_ATTEMPTS):
            conn = await self._connection("writer")
            try:
                async with conn.transaction():
                    return await work(PostgresTransaction(conn.cursor()))
            except pg().errors.OperationalError as exc:
                if exc.sqlstate not in PG_RETRY_SQLSTATES or attempt == PG_COMMIT_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    async def freed_space_back(self) -> None:
        pass  # autovacuum's: deleted rows' space is reused in place

    async def fetch(self, name: str, params: Params = ()) -> list[tuple[Any, ...]]:
        return await self.query(self._sql[name], params)

    async def query(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        cursor = await (await self._connection("reader")).execute(sql, params)
        return [tuple(row) for row in await cursor.fetchall()] if cursor.description else []

    async def fetch_dicts(self, name: str, params: Params = ()) -> list[dict[str, Any]]:
        conn = await self._connection("reader")
        async with conn.cursor(row_factory=pg().rows.dict_row) as cursor:
            await cursor.execute(self._sql[name], params)
            return await cursor.fetchall()

    async def stream(self, name: str, params: Mapping[str, Any]) -> typing.AsyncGenerator[dict[str, Any], None]:
        """From a server-side cursor in one read-only transaction: constant memory."""
        conn = await self._connection("reader")
        async with conn.transaction():
            async with conn.cursor(name="tracker_export", row_factory=pg().rows.dict_row) as cursor:
                await cursor.execute(self._sql[name], params)
                async for row in cursor:
                    yield row

    async def holds_anything(self) -> bool:
        """Whether any table but the schema's own bookkeeping has a row (`migrate`)."""
        for table in COPIED_TABLES:
            where = " WHERE key <> 'schema_version'" if table == "meta" else ""
            if (await self.query(f"SELECT EXISTS (SELECT 1 FROM {table}{where})"))[0][0]:
                return True
        return False

    async def copy_in(self, tables: Mapping[str, typing.AsyncIterator[tuple[Any, ...]]]) -> dict[str, int]:
        """COPY each table's rows in, all in one transaction: a failed copy leaves the database
        empty, as it was. Returns the rows copied a table."""
        copied: dict[str, int] = {}
        conn = await self._connection("writer")
        async with conn.transaction():
            cur = conn.cursor()
            for table, rows in tables.items():
                copied[table] = 0
                columns = ", ".join(COPIED_TABLES[table])  # our names only
                async with cur.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                    async for row in rows:
                        await copy.write_row(row)
                        copied[table] += 1
        return copied


def redact_database_url(url: str) -> str:
    """A connection URL without its password, for logs and `status`."""
    try:
        info = pg().conninfo.conninfo_to_dict(url)
    except pg().ProgrammingError:
        return "postgresql://(unparsable URL)"
    hosts = str(info.get("host") or "localhost").split(",")
    ports = str(info.get("port") or "5432").split(",")
    ports += ports[-1:] * (len(hosts) - len(ports))  # libpq: one port for every host
    user = f"{info['user']}@" if info.get("user") else ""
    return f"postgresql://{user}{','.join(f'{h}:{p}' for h, p in zip(hosts, ports))}/{info.get('dbname', '')}"


# ── the fleet: who does what when instances share the database ──────────────────────────────
# Claims on due rows, the feed's lease and its fencing epoch, membership (how many share the
# partner's limits) and the fleet's one-alert-per-window. On SQLite one instance is the fleet
# (InstanceLock keeps a second away): SoloFleet.


U = typing.TypeVar("U", BoxUpdate, ReportUpdate)
CLAIMS = {"boxes": ("shipment_number", "box_claims"), "reports": ("return_id", "report_claims")}  # key, statement


class Fleet(typing.Protocol):
    @property
    def leads_feed(self) -> bool:
        """Whether this instance pages the feed now."""

    async def due(self, kind: str, now: float, limit: int) -> list[dict[str, Any]]:
        """Due boxes or reports (kind) this instance may work on, in due order: DueBox's or
        DueReport's fields by name (with its claim on PostgreSQL)."""

    def claim_holds(self, kind: str, seconds: float, key: str) -> bool:
        """Whether this instance's claim on the item lasts `seconds` more."""

    async def fence_page(self, tx: Transaction, page: FeedPage) -> None:
        """Inside the page's commit: raises LeaseLost if another instance pages the feed now; and
        the page's returns are numbered in commit order across the instances."""

    async def still_claimed(self, tx: Transaction, kind: str, updates: Sequence[U]) -> tuple[list[U], list[str]]:
        """Inside the commit: the answers whose rows still carry their claim, and the keys of those
        that lost it."""

    async def renew(self, boxes: Sequence[str], reports: Sequence[str]) -> None:
        """Keep the claims this instance still holds, and the feed's lease if it has it."""

    async def count(self) -> int:
        """How many live instances share the partner's limits."""

    async def lead_feed(self) -> int | None:
        """The feed lease's epoch while this instance pages the feed; None while another does."""

    async def alert_once(self, key: str, window_s: float) -> bool:
        """Whether this instance is the one to send alert `key` now."""

    async def leave(self) -> None:
        """At shutdown: what this instance held goes back at once."""

    async def close(self) -> None: ...


class SoloFleet:
    """The fleet of one: every due row is this instance's, and so is the feed."""

    leads_feed = True

    def __init__(self, db: Database) -> None:
        self._db = db

    async def due(self, kind: str, now: float, limit: int) -> list[dict[str, Any]]:
        return await self._db.fetch_dicts(f"due_{kind}", (now, limit))

    def claim_holds(self, kind: str, seconds: float, key: str) -> bool:
        return True

    async def fence_page(self, tx: Transaction, page: FeedPage) -> None:
        return None

    async def still_claimed(self, tx: Transaction, kind: str, updates: Sequence[U]) -> tuple[list[U], list[str]]:
        return list(updates), []

    async def renew(self, boxes: Sequence[str], reports: Sequence[str]) -> None:
        return None

    async def count(self) -> int:
        return 1

    async def lead_feed(self) -> int | None:
        return 0

    async def alert_once(self, key: str, window_s: float) -> bool:
        return True

    async def leave(self) -> None:
        return None

    async def close(self) -> None:
        return None


class PgFleet:
    """Instances sharing one PostgreSQL database. A due row is worked on under a claim with a
    lease on the database's clock, renewed while held and checked at commit; the feed is paged
    by the holder of its lease, each page stored only under the epoch it was read under; the
    live instances are counted by their membership locks."""

    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self._lease_s = db.lease_s
        self._feed_epoch: int | None = None
        self._held_since: dict[tuple[str, str], float] = {}  # (kind, key) → monotonic time its lease began
        self._member: psycopg.AsyncConnection[Any] | None = None
        self._joined = False
        self._rejoined = 1  # the most counted since this instance last joined again
        self._counted = 1
        self._settle_until = -math.inf

    @property
    def leads_feed(self) -> bool:
        return self._feed_epoch is not None

    def _params(self, **more: Any) -> dict[str, Any]:
        return {"me": self.instance, "lease": self._lease_s, **more}

    async def due(self, kind: str, now: float, limit: int) -> list[dict[str, Any]]:
        """Claims them: due, and held by nobody else (or by one whose lease ran out)."""
        asked_at = time.monotonic()  # the lease began no sooner than this
        rows = await self._db.fetch_dicts(f"claim_{kind}", self._params(now=now, limit=limit))
        key = CLAIMS[kind][0]
        for row in rows:
            self._held_since[(kind, row[key])] = asked_at
        rows.sort(key=lambda row: row["due_at"])  # UPDATE … RETURNING keeps no order
        return [{name: value for name, value in row.items() if name != "due_at"} for row in rows]

    def claim_holds(self, kind: str, seconds: float, key: str) -> bool:
        """By when the claim was taken or last renewed: an item is started only if its call can
        end before another instance may claim it."""
        since = self._held_since.get((kind, key))
        return since is not None and time.monotonic() + seconds < since + self._lease_s

    async def fence_page(self, tx: Transaction, page: FeedPage) -> None:
        """Stored only under the feed lease it was read under; and one transaction at a time adds
        returns, so their seq (the API's list cursor) is in commit order: a reader paging by seq
        never passes a number a transaction still running holds."""
        await tx.execute("number_returns_in_commit_order")  # first: before any row lock of the commit
        if page.epoch is not None and await tx.execute("keep_feed", self._params(epoch=page.epoch)) != 1:
            raise LeaseLost(f"the feed lease of epoch {page.epoch} passed to another instance")

    async def still_claimed(self, tx: Transaction, kind: str, updates: Sequence[U]) -> tuple[list[U], list[str]]:
        """Those that lost it: their lease ran out and another instance claimed the row — its
        answer, not this stale one, is the one to store."""
        key, statement = CLAIMS[kind]
        if kind == "boxes" and updates:
            await tx.execute("beside_no_page")  # before the rows' locks, as a page takes its lock
        claimed = [u for u in updates if u.claim is not None]
        if not claimed:
            return list(updates), []
        held = dict(await tx.fetch(statement, ([getattr(u, key) for u in claimed],)))
        lost = [getattr(u, key) for u in claimed if held.get(getattr(u, key), u.claim) != u.claim]
        return [u for u in updates if u.claim is None or getattr(u, key) not in lost], lost

    async def renew(self, boxes: Sequence[str], reports: Sequence[str]) -> None:
        """Every lease_s / 4."""
        asked_at = time.monotonic()
        params = self._params(boxes=list(boxes), reports=list(reports))
        for statement in ("renew_box_claims", "renew_report_claims"):
            await self._db.fetch(statement, params)
        renewed = {("boxes", key): asked_at for key in boxes} | {("reports", key): asked_at for key in reports}
        self._held_since = renewed | {held: at for held, at in self._held_since.items() if at > asked_at}
        epoch = self._feed_epoch  # the collect stage may take or lose the lease meanwhile
        if epoch is not None and not await self._db.fetch("keep_feed", {**params, "epoch": epoch}):
            if self._feed_epoch == epoch:
                self._feed_epoch = None  # it ran out while this instance could not renew it

    async def count(self) -> int:
        """The instances holding a membership lock, this one's taken again first if its session
        ended. After this instance's own reconnect (a cut, a restart, a failover: the others'
        sessions may have ended too) the count may only rise while they come back — until
        FLEET_SETTLE_S after the last of them did: no instance ever briefly believes it is alone
        and takes the whole rate."""
        if self._member is None or self._member.closed or self._member.broken:
            await self._join()
        assert self._member is not None
        cursor = await self._member.execute(STATEMENTS[Dialect.POSTGRESQL]["fleet_members"],
                                            {"class": MEMBER_LOCK_CLASS})
        counted = max(1, (await cursor.fetchone() or (1,))[0])
        if time.monotonic() < self._settle_until:
            if counted > self._rejoined:  # another one is back: the rest may be on their way
                self._rejoined = counted
                self._settle_until = time.monotonic() + FLEET_SETTLE_S
            if counted < self._counted:
                return self._counted
        self._counted = counted
        return counted

    async def _join(self) -> None:
        if self._member is not None:
            await self._member.close()
            self._member = None
        conn = await self._db.connect("member")
        try:
            while True:  # a key another instance drew already: draw again
                key = int.from_bytes(os.urandom(4), "big") & 0x7FFFFFFF
                cursor = await conn.execute(STATEMENTS[Dialect.POSTGRESQL]["join_fleet"],
                                            {"class": MEMBER_LOCK_CLASS, "key": key})
                if (await cursor.fetchone() or (False,))[0]:
                    break
        except BaseException:
            await conn.close()
            raise
        if self._joined:  # again: the others' sessions may have ended with this one's
            self._settle_until = time.monotonic() + FLEET_SETTLE_S
            self._rejoined = 1
        self._joined = True
        self._member = conn

    async def lead_feed(self) -> int | None:
        """Kept, or taken once the holder's lease ran out."""
        params = self._params(epoch=self._feed_epoch)
        rows = await self._db.fetch("keep_feed", params) if self._feed_epoch is not None else []
        if not rows:
            rows = await self._db.fetch("take_feed", params)
        self._feed_epoch = rows[0][0] if rows else None
        return self._feed_epoch

    async def alert_once(self, key: str, window_s: float) -> bool:
        """The first of the fleet to ask in each window sends it."""
        return bool(await self._db.fetch("alert_once", {"key": key, "window": window_s}))

    async def leave(self) -> None:
        for statement in ("release_box_claims", "release_report_claims", "give_up_feed"):
            await self._db.fetch(statement, self._params())
        if self._member is not None and not self._member.broken:
            # at once: a closed session's locks go only when its server process has noticed
            await self._member.execute(STATEMENTS[Dialect.POSTGRESQL]["leave_fleet"])
        await self.close()

    async def close(self) -> None:
        if self._member is not None:
            await self._member.close()  # the membership lock goes with the session
            self._member = None


# ── the store: every transition and read, written once ──────────────────────────────────────


class StateStore(typing.Protocol):
    """What the stages, the daemon and the commands see of the state, whichever database holds it."""

    fleet: Fleet
    where: str
    announces: bool  # webhooks are configured: what happens is written to the outbox too

    async def commit(self, transitions: Sequence[Transition], now: float) -> CommitResult: ...
    async def feed_cursor(self) -> str | None: ...
    async def due_boxes(self, now: float, limit: int) -> list[DueBox]: ...
    async def next_box_due_at(self) -> float | None: ...
    async def due_reports(self, now: float, limit: int) -> list[DueReport]: ...
    async def next_report_due_at(self) -> float | None: ...
    async def oldest_pending_report_queued_at(self) -> float | None: ...
    async def closed_histories(self, since: float) -> list[tuple[StatusChange, ...]]: ...
    async def counts(self) -> dict[str, int]: ...
    async def overdue(self, before: float) -> tuple[int, float | None]: ...
    async def overdue_boxes(self, before: float, limit: int) -> list[tuple[Any, ...]]: ...
    async def oldest_pending_reports(self, limit: int) -> list[tuple[Any, ...]]: ...
    async def oldest_tracking_boxes(self, limit: int) -> list[tuple[Any, ...]]: ...
    async def open_quarantine(self, limit: int) -> list[tuple[Any, ...]]: ...
    async def dead_reports(self, limit: int) -> list[tuple[Any, ...]]: ...
    async def stale_boxes(self, limit: int) -> list[tuple[Any, ...]]: ...
    async def latest_corrections(self, limit: int) -> list[tuple[Any, ...]]: ...
    async def outdated_reports(self, limit: int) -> list[tuple[Any, ...]]: ...
    async def unknown_statuses(self) -> list[tuple[Any, ...]]: ...
    async def story(self, key: str, *, webhooks: bool = True) -> dict[str, Any]: ...

    async def stories(self, keys: Sequence[str], *, webhooks: bool = True) -> dict[str, dict[str, Any]]: ...
    def export(self, kind: str, params: Mapping[str, Any]) -> typing.AsyncGenerator[dict[str, Any], None]: ...
    async def requeue_dead_reports(self, ids: Sequence[str] | None, now: float) -> list[str]: ...
    async def requeue_stale_boxes(self, ids: Sequence[str] | None, now: float) -> list[str]: ...
    async def open_quarantine_for(self, ids: Sequence[str] | None) -> list[tuple[Any, ...]]: ...
    async def add_api_key(self, key: "ApiKey", key_hash: str, prefix: str) -> None: ...
    async def api_key_by_prefix(self, prefix: str) -> tuple[str, "ApiKey"] | None: ...
    async def api_keys(self) -> list["ApiKey"]: ...
    async def revoke_api_key(self, name: str, now: float) -> bool: ...
    async def audit(self, entries: Sequence["AuditEntry"]) -> None: ...
    async def audit_since(self, since: float) -> list[dict[str, Any]]: ...
    async def box_check_state(self, shipment_number: str) -> tuple[str, float | None] | None: ...
    async def list_returns(self, *, after: int, since: float, state: str | None,
                           limit: int) -> list[tuple[str, int]]: ...
    async def due_deliveries(self, endpoint: str, now: float, limit: int) -> list[DueDelivery]: ...
    async def next_delivery_due_at(self, endpoint: str) -> float | None: ...
    async def webhook_endpoints(self) -> list[dict[str, Any]]: ...
    async def deliveries(self, *, event: str | None, failed: bool, limit: int) -> list[dict[str, Any]]: ...
    async def replay_events(self, events: Sequence[str], now: float) -> list[tuple[str, str]]: ...
    async def close(self) -> None: ...


async def _feed_cursor_in(reader: Transaction | Database) -> str | None:
    """The stored cursor, read by a transaction (inside a commit) or by the database."""
    rows = await reader.fetch("feed_cursor", (FEED_CURSOR_KEY,))
    return rows[0][0] if rows else None


ANNOUNCING = (FeedPage, BoxUpdate, ReportUpdate, AnnounceOverdue)  # the transitions that may write webhook events


class Store:
    """The state's rules: callers hand transitions to `commit`, each batch one transaction; reads
    are single statements. Written once over a Database (which backend) and a Fleet (who else
    shares it)."""

    def __init__(self, db: Database, fleet: Fleet) -> None:
        self.db = db
        self.fleet = fleet
        self.where = db.where
        self.announces = False

    @classmethod
    async def open(cls, where: str, *, readonly: bool = False, lease_s: float = 30.0) -> "Store":
        """A SQLite file at the path `where`, or the PostgreSQL database at the URL `where`."""
        if where.startswith(("postgresql://", "postgres://")):
            pg = await PostgresDatabase.open(where, readonly=readonly, lease_s=lease_s)
            return cls(pg, PgFleet(pg))
        sqlite = await SqliteDatabase.open(where, readonly=readonly)
        return cls(sqlite, SoloFleet(sqlite))

    async def close(self) -> None:
        await self.fleet.close()
        await self.db.close()

    # ── writes: one transaction per batch of transitions ────────────────────────────────────

    async def commit(self, transitions: Sequence[Transition], now: float) -> CommitResult:
        result = await self.db.in_transaction(lambda tx: self._apply(tx, transitions, now))
        if any(isinstance(t, Prune) for t in transitions):
            await self.db.freed_space_back()
        return result

    async def _apply(self, tx: Transaction, transitions: Sequence[Transition], now: float) -> CommitResult:
        result = CommitResult()
        for page in (t for t in transitions if isinstance(t, FeedPage)):
            await self.fleet.fence_page(tx, page)
            if page.read_from is not None and (stored := await _feed_cursor_in(tx)) != page.read_from.cursor:
                result += CommitResult(cursor_moved=stored or "")
                continue
            result += await self._write_page(tx, page, now)
        boxes, lost_boxes = await self.fleet.still_claimed(
            tx, "boxes", [t for t in transitions if isinstance(t, BoxUpdate)])
        if boxes:
            result += CommitResult(reports_queued=await self._write_box_updates(tx, boxes, now))
        reports, lost_reports = await self.fleet.still_claimed(
            tx, "reports", [t for t in transitions if isinstance(t, ReportUpdate)])
        if reports:
            result += CommitResult(superseded=await self._write_report_updates(tx, reports, now))
        if lost_boxes or lost_reports:
            result += CommitResult(lost_claims=frozenset(lost_boxes + lost_reports))
        for wake in (t for t in transitions if isinstance(t, WakeBoxes)):
            await tx.execute("wake_boxes", {"now": now, "spread": wake.spread_s, "status": wake.status})
        for prune in (t for t in transitions if isinstance(t, Prune)):
            result += CommitResult(pruned=await self._prune(tx, prune))
        if any(isinstance(t, Heartbeat) for t in transitions):
            await tx.execute("put_meta", (HEARTBEAT_KEY, repr(now)))
        for check in (t for t in transitions if isinstance(t, CheckNow)):
            params = {"now": now, "shipment": check.shipment_number, "cooldown": check.cooldown_s}
            if await tx.fetch("request_check", params):
                result += CommitResult(checks_queued=frozenset({check.shipment_number}))
        for key in (t for t in transitions if isinstance(t, Idempotent)):
            result += CommitResult(idempotency=((key.asker, await self._idempotent(tx, key, now)),))
        for endpoints in (t for t in transitions if isinstance(t, WebhookEndpoints)):
            await tx.execute_many("put_endpoint", [(name, ",".join(events), hold)
                                                   for name, events, hold in endpoints.endpoints])
        deliveries = [t for t in transitions if isinstance(t, DeliveryUpdate)]
        if deliveries:
            result += CommitResult(disabled_endpoints=await self._write_deliveries(tx, deliveries, now))
        for enable in (t for t in transitions if isinstance(t, EnableEndpoint)):
            if await tx.fetch("enable_endpoint", {"name": enable.name}):
                await tx.execute("wake_deliveries", {"name": enable.name, "now": now})
                result += CommitResult(enabled_endpoints=frozenset({enable.name}))
        for overdue in (t for t in transitions if isinstance(t, AnnounceOverdue)):
            if self.announces:
                await tx.execute("announce_overdue", {"before": overdue.before, "at": _iso(now), "now": now})
        if self.announces and any(isinstance(t, ANNOUNCING) for t in transitions):
            # what they announced, to every endpoint taking it
            result += CommitResult(deliveries_queued=await tx.execute("queue_deliveries", {"now": now}))
        audited = [e for t in transitions if isinstance(t, Audit) for e in t.entries]
        if audited:
            await tx.execute_many("insert_audit", [
                (e.at, e.key_name, e.source_ip, e.action, e.target, e.result, e.request_id) for e in audited])
        return result

    async def _write_page(self, tx: Transaction, page: FeedPage, now: float) -> CommitResult:
        listed = {i.id for i in page.items} | {q.return_id for q in page.quarantined if q.return_id}
        stored, names = await self._stored_under_names(tx, page.items, listed)
        items = [dataclasses.replace(i, id=names[i.id]) if i.id in names else i for i in page.items]
        new, corrections = reconcile_listings(items, stored)
        added = await tx.execute_many("insert_return", [
            (i.id, i.order_number, i.order_item_number, i.shipment_number, i.requested_at, now, page.source)
            for i in new])
        if corrections:
            corrections = await self._write_corrections(tx, corrections, now, page.source)
        await tx.execute_many("insert_box", [(s, BoxState.TRACKING.value, t, now, s) for s, t in page.first_checks])
        await tx.execute("revive_emptied_boxes", (now, now, [s for s, _ in page.first_checks]))
        ids = sorted({i.id for i in items})
        queued = await tx.execute("reports_for_delivered_boxes", (now, now, ids))
        if self.announces and queued:
            await tx.execute("announce_collected_joining", {"ids": ids, "now": now})
        joined = sorted({i.id for i in new} | {c.return_id for c in corrections if c.moved})  # a box new to them
        if self.announces and joined:  # into a box already withdrawn (a reissue's later items, say)
            await tx.execute_many("announce_box_returns", [
                {"type": "return.cancelled", "at": _iso(since) if since is not None else None, "now": now,
                 "shipment": shipment} for shipment, since in await tx.fetch("cancelled_boxes_of", {"ids": joined})])
        await tx.execute("resolve_quarantine", (now, sorted({*ids, *(i.id for i in page.items)})))
        quarantined = await tx.execute_many("insert_quarantine", [
            (q.fingerprint, q.return_id, q.reason, q.raw, now) for q in page.quarantined])
        if page.next_cursor is not None:
            await tx.execute("put_meta", (FEED_CURSOR_KEY, page.next_cursor))
        broken = frozenset(q.return_id for q in page.quarantined
                           if q.return_id and (q.return_id in stored or q.return_id in names))
        return CommitResult(returns_added=added, quarantined_added=quarantined, reports_queued=queued,
                            corrections=tuple(corrections), broken_corrections=broken)

    async def _stored_under_names(self, tx: Transaction, items: Sequence[ReturnItem], listed: set[str]
                                  ) -> tuple[dict[str, ReturnItem], dict[str, str]]:
        """What the listed returns hold now, by the id each is stored under, and the listed ids that
        are other names of a stored return (listed id → stored id). A return pushed without an id
        (named by its order item) and a listing of the same order item under the partner's id are
        one return, whichever came first: the later name becomes a second name of the first — when
        that is unambiguous: the first still holds that order item, it is the only one that does,
        and it has no partner's id yet. Otherwise the listing is a return of its own."""
        by_order_item = {order_item_name(i): i for i in items}
        rows = await tx.fetch_dicts("stored_returns", (sorted(listed | by_order_item.keys()),))
        stored = {row["id"]: ReturnItem(**row) for row in rows}
        unknown = sorted(listed - stored.keys())
        if not unknown:
            return stored, {}
        names: dict[str, str] = {}
        for row in await tx.fetch_dicts("named_returns", (unknown,)):
            names[row.pop("name")] = row["id"]
            stored[row["id"]] = ReturnItem(**row)
        unnamed = [i for i in items if i.id not in stored and i.id not in names]
        under_partner_id = [i for i in unnamed if i.id != order_item_name(i)]
        without_id = [i for i in unnamed if i.id == order_item_name(i)]
        added: dict[str, str] = {}
        pushed = {order_item_name(i) for i in under_partner_id} & stored.keys()
        if pushed:  # a listing under the partner's id of a return pushed without one
            named_already = {row[0] for row in await tx.fetch("names_of", (sorted(pushed),))}
            for item in under_partner_id:
                first = order_item_name(item)
                if first in pushed - named_already and _same_order_item(stored[first], item):
                    added[item.id] = first
                    named_already.add(first)
        if without_id:  # …or the other way round: the partner's id came first (stored, or in this page)
            rows = await tx.fetch_dicts("returns_of_orders", (sorted({i.order_number for i in without_id}),))
            on_file = {row["id"]: ReturnItem(**row) for row in rows if row["id"] != order_item_name(ReturnItem(**row))}
            in_page = {i.id: i for i in under_partner_id if i.id not in added}
            for item in without_id:
                same = {r.id for r in (*on_file.values(), *in_page.values()) if _same_order_item(r, item)}
                if len(same) == 1:
                    (first,) = same
                    added[item.id] = first
                    if first in on_file:
                        stored[first] = on_file[first]
        await tx.execute_many("insert_name", list(added.items()))
        return stored, names | added

    async def _write_corrections(self, tx: Transaction, corrections: Sequence[Correction],
                                 now: float, source: str) -> list[Correction]:
        """Apply corrections: the return takes its latest fields, its report follows them (see
        WRITE_SQL's correct_report), a box left without items stops being polled, and each is
        recorded."""
        reports = {row[0]: ReportState(row[1])
                   for row in await tx.fetch("report_states", ([c.return_id for c in corrections],))}
        corrections = [dataclasses.replace(c, report_state=reports.get(c.return_id), source=source)
                       for c in corrections]
        await tx.execute_many("correct_return", [
            (c.after.order_number, c.after.order_item_number, c.after.shipment_number, c.after.requested_at,
             c.return_id) for c in corrections])
        await tx.execute_many("insert_correction", [
            (c.return_id, ",".join(c.fields), json.dumps({f: getattr(c.before, f) for f in c.fields}),
             json.dumps({f: getattr(c.after, f) for f in c.fields}),
             c.report_state.value if c.report_state else None, now, c.source) for c in corrections])
        await tx.execute_many("correct_report", [
            {"order_number": c.after.order_number, "order_item_number": c.after.order_item_number,
             "shipment_number": c.after.shipment_number, "moved": c.moved, "now": now, "return_id": c.return_id}
            for c in corrections if c.report_state is not None and c.changes_report])
        if self.announces:
            await tx.execute("announce_corrected", {"ids": sorted({c.return_id for c in corrections}), "at": _iso(now),
                                                    "now": now})
            withdrawn = {"events": sorted(f"return.cancelled:{c.return_id}" for c in corrections if c.moved)}
            if withdrawn["events"]:
                await tx.execute("withdraw_cancel_deliveries", withdrawn)
                await tx.execute("withdraw_cancels", withdrawn)
        await tx.execute_many("drop_name", [  # the order item it was matched by is no longer its own
            (c.return_id, order_item_name(c.before)) for c in corrections
            if not _same_order_item(c.before, c.after) and c.return_id != order_item_name(c.before)])
        await tx.execute("empty_boxes", (now, sorted({c.before.shipment_number for c in corrections if c.moved})))
        return corrections

    async def _write_box_updates(self, tx: Transaction, updates: Sequence[BoxUpdate], now: float) -> int:
        await tx.execute_many("box_update", [
            {"state": u.state.value, "next_check_at": u.next_check_at, "called_n": int(u.called),
             "not_found": u.not_found, "errors": u.errors, "registered": bool(u.registered), "now": now,
             "last_status": u.last_status, "delivered_at": u.delivered_at,
             "closed_at": None if u.state is BoxState.TRACKING else now, "called": u.called,
             "last_error": u.last_error, "since": u.history[-1].at if u.history else None,
             "shipment_number": u.shipment_number}
            for u in updates])
        recorded = [u for u in updates if u.history]
        if recorded:
            await tx.execute_many("insert_history",
                                  [(u.shipment_number, h.at, h.status, now) for u in recorded for h in u.history])
            await tx.execute_many("bound_history",
                                  [(u.shipment_number, u.shipment_number, HISTORY_PER_BOX - 1) for u in recorded])
        queued = await tx.execute_many("queue_reports", [
            (u.delivered_at, ReportState.PENDING.value, now, now, u.shipment_number)
            for u in updates if u.state is BoxState.DELIVERED])
        if self.announces:
            await self._announce_box_returns(tx, updates, now)
        await tx.execute_many("unknown_status", [(u.unknown_status, now, now) for u in updates if u.unknown_status])
        return queued

    async def _announce_box_returns(self, tx: Transaction, updates: Sequence[BoxUpdate], now: float) -> None:
        """return.collected for each return in a box collected now (the refund trigger),
        return.cancelled for each in a box the customer withdrew, shipment.stale for a waybill the
        carrier never registered."""
        announced = [{"type": "return.collected" if u.state is BoxState.DELIVERED else "return.cancelled",
                      "at": u.delivered_at if u.state is BoxState.DELIVERED else (
                          _iso(u.history[-1].at) if u.history else None),
                      "now": now, "shipment": u.shipment_number}
                     for u in updates if u.state in (BoxState.DELIVERED, BoxState.CANCELLED)]
        if announced:
            await tx.execute_many("announce_box_returns", announced)
        stale = sorted(u.shipment_number for u in updates if u.state is BoxState.STALE)
        if stale:
            await tx.execute("announce_stale", {"boxes": stale, "at": _iso(now), "now": now})

    async def _write_deliveries(self, tx: Transaction, updates: Sequence[DeliveryUpdate],
                                now: float) -> frozenset[str]:
        """Each attempt's outcome; an endpoint that answered is failing no longer; one that failed
        since more than its disable_after_s (or answered 410) is disabled. Returns those disabled."""
        await tx.execute_many("delivery_answer", [
            {"state": u.state.value, "next_attempt_at": u.next_attempt_at, "status": u.http_status,
             "error": u.error, "now": now, "id": u.id, "replays": u.replays} for u in updates])
        failing = {u.endpoint: u for u in updates if u.state is not DeliveryState.DELIVERED}
        answered = {u.endpoint for u in updates if u.state is DeliveryState.DELIVERED} - failing.keys()
        await tx.execute_many("endpoint_answered", [(name,) for name in sorted(answered)])
        await tx.execute_many("endpoint_failed", [(now, name) for name in sorted(failing)])
        disabled: set[str] = set()
        for name, u in sorted(failing.items()):
            why = "answered 410 Gone" if u.gone else f"failing for over {_human_duration(u.disable_after_s)}"
            params = {"now": now, "why": why, "name": name, "gone": u.gone, "after": min(u.disable_after_s, 1e12)}
            if await tx.fetch("disable_endpoint", params):
                disabled.add(name)
        return frozenset(disabled)

    async def _write_report_updates(self, tx: Transaction, updates: Sequence[ReportUpdate],
                                    now: float) -> frozenset[str]:
        """Returns the reports settled (done or dead) by an answer to a body since corrected."""
        await tx.execute_many("report_answer", [
            {"state": u.state.value, "revision": u.revision, "called_n": int(u.called), "called": u.called,
             "next_attempt_at": u.next_attempt_at, "now": now, "outcome": u.outcome, "last_error": u.last_error,
             "done_at": None if u.state is ReportState.PENDING else now, "return_id": u.return_id}
            for u in updates])
        called = [u for u in updates if u.called]
        await tx.execute_many("insert_attempt", [
            (u.return_id, u.attempt, now, u.outcome or "retry", u.http_status, u.latency_s, u.last_error)
            for u in called])
        await tx.execute_many("bound_attempts", [
            (u.return_id, u.return_id, ATTEMPTS_PER_REPORT) for u in called if u.attempt > ATTEMPTS_PER_REPORT])
        refused = sorted(u.return_id for u in updates if u.state is ReportState.DEAD)
        if refused and self.announces:
            await tx.execute("announce_refused", {"ids": refused, "at": _iso(now), "now": now})
        settling = {u.return_id: u.revision for u in updates if u.state is not ReportState.PENDING}
        if not settling:
            return frozenset()
        revisions = await tx.fetch("report_revisions", (sorted(settling),))
        return frozenset(return_id for return_id, revision in revisions if revision != settling[return_id])

    async def _idempotent(self, tx: Transaction, key: Idempotent,
                          now: float) -> tuple[str, int | None, str | None] | None:
        names = {"key_name": key.key_name, "idem_key": key.idem_key}
        if key.answer is not None:
            await tx.execute("answer_idempotency", {**names, "status": key.answer[0], "body": key.answer[1]})
            return None
        claim = {**names, "body_hash": key.body_hash, "now": now, "expired": now - IDEMPOTENCY_KEEP_S,
                 "abandoned": now - IDEMPOTENCY_ABANDONED_S}
        if await tx.fetch("claim_idempotency", claim):
            return None
        body_hash, status, body = (await tx.fetch("idempotency", (key.key_name, key.idem_key)))[0]
        return body_hash, status, body

    async def _prune(self, tx: Transaction, prune: Prune) -> int:
        params = {"cutoff": prune.cutoff, "limit": prune.limit}
        boxes = [row[0] for row in await tx.fetch("finished_boxes", params)]
        if boxes:
            for statement in PRUNE_DELETES:
                await tx.execute(statement, {"boxes": boxes})
        await tx.execute("resolved_quarantine", params)
        await tx.execute("prune_audit", params)
        await tx.execute("prune_idempotency", {"expired": time.time() - IDEMPOTENCY_KEEP_S})
        return len(boxes)

    # ── operator requeues: back into the pipeline after the cause was fixed ─────────────────
    # `ids` None means all.

    async def requeue_dead_reports(self, ids: Sequence[str] | None, now: float) -> list[str]:
        return await self._requeue("requeue_dead_reports", ids, now)

    async def requeue_stale_boxes(self, ids: Sequence[str] | None, now: float) -> list[str]:
        return await self._requeue("requeue_stale_boxes", ids, now)

    async def _requeue(self, statement: str, ids: Sequence[str] | None, now: float) -> list[str]:
        params = {"now": now, **self._which(ids)}
        rows = await self.db.in_transaction(lambda tx: tx.fetch(statement, params))
        return sorted(row[0] for row in rows)

    async def open_quarantine_for(self, ids: Sequence[str] | None) -> list[tuple[Any, ...]]:
        return await self.db.fetch("open_quarantine_for", self._which(ids))

    async def due_deliveries(self, endpoint: str, now: float, limit: int) -> list[DueDelivery]:
        """With several instances, the one paging the feed delivers: one instance at a time."""
        if not self.fleet.leads_feed:
            return []
        rows = await self.db.fetch_dicts("due_deliveries", {"endpoint": endpoint, "now": now, "limit": limit})
        return [DueDelivery(**row) for row in rows]

    async def next_delivery_due_at(self, endpoint: str) -> float | None:
        rows = await self.db.fetch("next_delivery_due_at", {"endpoint": endpoint})
        return rows[0][0] if rows else None

    async def webhook_endpoints(self) -> list[dict[str, Any]]:
        return await self.db.fetch_dicts("webhook_endpoints")

    async def deliveries(self, *, event: str | None, failed: bool, limit: int) -> list[dict[str, Any]]:
        return await self.db.fetch_dicts("deliveries", {"event": event, "failed": failed, "limit": limit})

    async def replay_events(self, events: Sequence[str], now: float) -> list[tuple[str, str]]:
        """Each event due again, at once, to every endpoint it was queued for: (event, endpoint)."""
        async def replay(tx: Transaction) -> list[tuple[str, str]]:
            return [(event, row[0]) for event in events
                    for row in await tx.fetch("replay_event", {"event": event, "now": now})]
        return await self.db.in_transaction(replay)

    @staticmethod
    def _which(ids: Sequence[str] | None) -> dict[str, Any]:
        return {"all": ids is None, "ids": list(ids or ())}

    # ── reads for the stages ────────────────────────────────────────────────────────────────

    async def _value(self, name: str) -> Any:
        return (await self.db.fetch(name))[0][0]

    async def closed_histories(self, since: float) -> list[tuple[StatusChange, ...]]:
        """The status histories of boxes closed since `since`, each oldest first."""
        histories: dict[str, list[StatusChange]] = {}
        for shipment_number, at, status in await self.db.fetch("learned_history", (since,)):
            histories.setdefault(shipment_number, []).append(StatusChange(status=status, at=at))
        return [tuple(history) for history in histories.values()]

    async def feed_cursor(self) -> str | None:
        return await _feed_cursor_in(self.db)

    async def due_boxes(self, now: float, limit: int) -> list[DueBox]:
        """On PostgreSQL: claims them."""
        return [DueBox(**row) for row in await self.fleet.due("boxes", now, limit)]

    async def next_box_due_at(self) -> float | None:
        return await self._value("next_box_due_at")

    async def due_reports(self, now: float, limit: int) -> list[DueReport]:
        return [DueReport(**row) for row in await self.fleet.due("reports", now, limit)]

    async def next_report_due_at(self) -> float | None:
        return await self._value("next_report_due_at")

    async def oldest_pending_report_queued_at(self) -> float | None:
        return await self._value("oldest_pending_report")

    # ── for `status`, the demo and the housekeeping ─────────────────────────────────────────

    async def _newer_read(self, name: str, *params: Any) -> list[Any]:
        """A read of what an older SQLite file lacks: on such a file, opened read-only by
        `status` before any upgrade, there is none of it yet."""
        try:
            return await self.db.fetch(name, params)
        except NotYetInSchema:
            return []

    async def overdue(self, before: float) -> tuple[int, float | None]:
        """How many tracked boxes were requested before `before`, and the oldest one's request."""
        rows = await self._newer_read("overdue_count", before)
        return (rows[0][0], rows[0][1]) if rows else (0, None)

    async def overdue_boxes(self, before: float, limit: int) -> list[tuple[str, float, str | None, float | None, int]]:
        return await self._newer_read("overdue_boxes", before, limit)

    async def oldest_pending_reports(self, limit: int) -> list[tuple[str, str, float, int, str | None]]:
        return await self.db.fetch("oldest_pending_reports", (limit,))

    async def oldest_tracking_boxes(self, limit: int) -> list[tuple[str, float, str | None, int]]:
        return await self.db.fetch("oldest_tracking_boxes", (limit,))

    async def open_quarantine(self, limit: int) -> list[tuple[str | None, str, str, float]]:
        return await self.db.fetch("open_quarantine", (limit,))

    async def dead_reports(self, limit: int) -> list[tuple[str, str, str | None, float]]:
        return await self.db.fetch("dead_reports", (limit,))

    async def stale_boxes(self, limit: int) -> list[tuple[str, float, int]]:
        return await self.db.fetch("stale_boxes", (limit,))

    async def latest_corrections(self, limit: int) -> list[tuple[str, str, str, str | None, float]]:
        """(return id, before, after, report state then, when), newest first; before/after are JSON."""
        return await self._newer_read("latest_corrections", limit)

    async def outdated_reports(self, limit: int) -> list[tuple[str, str, str, float | None]]:
        """Reports the partner recorded under fields a correction has since changed: (return id, the
        latest correction's before and after as JSON, when the report was recorded)."""
        return await self._newer_read("outdated_reports", limit)

    async def unknown_statuses(self) -> list[tuple[str, int, float]]:
        return await self.db.fetch("unknown_statuses")

    async def counts(self) -> dict[str, int]:
        """Totals by kind and state, e.g. {"returns": 10, "boxes.tracking": 3, "reports.done": 7}."""
        try:
            by_state = await self.db.fetch("state_counts")
        except NotYetInSchema:  # a version-1 file opened read-only (`status`): count
            by_state = await self.db.fetch("count_by_state")
        counts: dict[str, int] = {}
        for kind, state, n in by_state:
            if n:
                counts[f"{kind}.{state}" if state else kind] = n
        counts.setdefault("returns", 0)
        counts["quarantine.open"] = await self._value("open_quarantine_count")
        counts["unknown_statuses"] = await self._value("unknown_status_count")
        return counts

    async def story(self, key: str, *, webhooks: bool = True) -> dict[str, Any]:
        """Everything known about the returns `key` names (an id, order number or shipment number),
        their boxes, reports and (unless `webhooks` is false) the events announced of them and
        their deliveries, as plain data; empty lists when it names nothing."""
        return (await self.stories([key], webhooks=webhooks))[key]

    async def stories(self, keys: Sequence[str], *, webhooks: bool = True) -> dict[str, dict[str, Any]]:
        """The story of each key, as `story` tells it: one statement for up to STORY_BATCH keys."""
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(keys), STORY_BATCH):
            for row in await self.db.fetch_dicts("stories" if webhooks else "stories_for_webhooks",
                                                 {"keys": list(keys[start:start + STORY_BATCH])}):
                story: dict[str, Any] = {}
                for part, order in STORY_ORDER.items():
                    if part not in row:
                        continue
                    rows = json.loads(row[part]) if isinstance(row[part], str) else row[part]  # SQLite's, psycopg's
                    story[part] = sorted(rows, key=lambda r: tuple(r[c] for c in order)) if order else rows
                found[row["key"]] = story
        return found

    def export(self, kind: str, params: Mapping[str, Any]) -> typing.AsyncGenerator[dict[str, Any], None]:
        """Every return ("returns") or closed box's history ("timelines") as dicts, streamed within
        one read snapshot (a consistent export), in constant memory."""
        return self.db.stream(f"export_{kind}", params)

    # ── the shop's API ──────────────────────────────────────────────────────────────────────

    async def add_api_key(self, key: "ApiKey", key_hash: str, prefix: str) -> None:
        await self.db.in_transaction(lambda tx: tx.execute("insert_api_key", (
            key.name, prefix, key_hash, ",".join(key.scopes), ",".join(key.allow), key.rate_per_s, key.created_at,
            key.expires_at)))

    async def api_key_by_prefix(self, prefix: str) -> tuple[str, "ApiKey"] | None:
        """(its hash, the key) for a lookup prefix, revoked and expired ones too."""
        rows = await self.db.fetch_dicts("api_key_by_prefix", (prefix,))
        if not rows:
            return None
        row = rows[0]
        return row["hash"], ApiKey.from_row(row)

    async def api_keys(self) -> list["ApiKey"]:
        return [ApiKey.from_row(row) for row in await self.db.fetch_dicts("api_keys")]

    async def revoke_api_key(self, name: str, now: float) -> bool:
        return await self.db.in_transaction(lambda tx: tx.execute("revoke_api_key", (now, name))) == 1

    async def audit(self, entries: Sequence["AuditEntry"]) -> None:
        """For the commands (their own connection); the daemon audits through its committer (Audit)."""
        await self.commit([Audit(entries=tuple(entries))], time.time())

    async def audit_since(self, since: float) -> list[dict[str, Any]]:
        return await self.db.fetch_dicts("audit_since", (since,))

    async def box_check_state(self, shipment_number: str) -> tuple[str, float | None] | None:
        """(the box's state, when a check was last asked for), or None for no such box."""
        rows = await self.db.fetch("box_check_state", (shipment_number,))
        return (rows[0][0], rows[0][1]) if rows else None

    async def list_returns(self, *, after: int, since: float, state: str | None, limit: int) -> list[tuple[str, int]]:
        """(return id, order key) of the returns after the order key `after`, in insertion order."""
        return [(row[0], row[1]) for row in await self.db.fetch(
            "list_returns", {"after": after, "since": since, "state": state, "limit": limit})]


STORAGE_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, LeaseLost)  # a failed read or write


def storage_errors_and(*others: type[Exception]) -> tuple[type[Exception], ...]:
    """These and the storage errors as they stand now: PostgreSQL's join them once pg() has run."""
    return (*others, *STORAGE_ERRORS)


@functools.cache
def pg() -> Any:
    """psycopg, imported when PostgreSQL is first named: the driver and libpq cost a daemon on
    SQLite 11 MB and its start-up time for nothing. As a side effect STORAGE_ERRORS is rebound to
    hold its errors from then on (none can be raised before)."""
    global STORAGE_ERRORS
    import psycopg
    import psycopg.conninfo
    import psycopg.errors
    import psycopg.rows
    STORAGE_ERRORS = (*STORAGE_ERRORS, psycopg.Error)
    return psycopg


async def open_store(config: "StorageConfig", *, readonly: bool = False) -> Store:
    return await Store.open(config.url or config.path, readonly=readonly, lease_s=config.lease_s)


class InstanceLock:
    """One daemon per state file: a second one would double every partner call."""

    def __init__(self, db_path: str) -> None:
        self._path = db_path + ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"another tracker is already running on {self._path[:-5]}") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ════════════════════════════════════════════════════════════════════════════════════════════
# Partner client — one aiohttp session, a cap on calls in flight, an adaptive rate per endpoint,
# breakers, a timeout on every call. It never raises for what the partner does: every answer,
# silence or garbage becomes a Reply whose `outcome` the stages act on. Then what the answers
# mean: a feed page, a tracking answer and its history, parsed and validated (GarbledAnswer).
# ════════════════════════════════════════════════════════════════════════════════════════════


class Endpoint(enum.StrEnum):
    RETURNS = "returns"
    TRACKING = "tracking"
    RESULTS = "results"


class Outcome(enum.StrEnum):
    OK = "ok"  # 200 with a JSON body
    NOT_FOUND = "not_found"  # 404
    CONFLICT = "conflict"  # 409
    REFUSED = "refused"  # 422
    UNAUTHORIZED = "unauthorized"  # 401: the token is wrong or revoked
    RATE_LIMITED = "rate_limited"  # 429
    SERVER_ERROR = "server_error"  # 5xx
    CLIENT_ERROR = "client_error"  # any other 4xx
    TIMEOUT = "timeout"
    CONNECTION = "connection"  # refused, reset, closed mid-body
    GARBLED = "garbled"  # 200 whose body is not JSON, or too large
    DEFERRED = "deferred"  # not sent: the endpoint's retry budget is spent


MAX_BODY_BYTES = 8 * 1024 * 1024  # a feed page of 500 items is ~100 KB; anything near this is broken
MAX_RETRY_AFTER_S = 3600.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Reply:
    endpoint: "Endpoint | str"  # a partner's endpoint, or a webhook endpoint's name
    outcome: Outcome
    status: int | None  # None when no HTTP answer arrived
    body: Any  # parsed JSON for 200 (None otherwise unless the error body parsed)
    retry_after: float | None
    latency_s: float
    detail: str = ""  # short, secret-free description for logs and alerts


# What may go better if asked again: the retry budget counts these.
TRANSIENT_OUTCOMES = frozenset(
    {Outcome.RATE_LIMITED, Outcome.SERVER_ERROR, Outcome.TIMEOUT, Outcome.CONNECTION, Outcome.GARBLED}
)
# The partner answered as its contract says: evidence that it is healthy and keeping up.
ANSWERED_OUTCOMES = frozenset({Outcome.OK, Outcome.NOT_FOUND, Outcome.CONFLICT, Outcome.REFUSED})
# What the partner's rate limiter let through: it answered, if not always well.
LET_THROUGH_OUTCOMES = ANSWERED_OUTCOMES | {Outcome.SERVER_ERROR, Outcome.CLIENT_ERROR, Outcome.GARBLED}
# What opens a circuit. Not 429: that is the adaptive rate's signal, and near the partner's limit a
# short run of 429s is normal.
BREAKER_FAILURES = frozenset({Outcome.SERVER_ERROR, Outcome.TIMEOUT, Outcome.CONNECTION, Outcome.GARBLED})
# Under a backlog the calls that finish work go first.
PRIORITY = {"results": 0, "tracking": 1, "returns": 2}


class RatePhase(enum.StrEnum):
    STARTUP = "startup"  # doubling: the limit is not known yet, or it has risen
    HOLD = "hold"  # just under the limit as last measured
    PROBE = "probe"  # a little over it, rising, for two seconds: has the limit risen?
    WAIT = "wait"  # every call refused (a fixed window spent): a trickle until one is let through


class AdaptiveRate:
    """Finds and respects the partner's unpublished, changing rate limit for one endpoint.

    It measures the limit instead of guessing at it (TCP BBR measures a path's delivery rate the
    same way): when a call is answered 429, what the partner let through in the second before is
    the limit, whatever the limiter's shape — a fixed one-second window lets exactly its N through
    in any second in which it refuses some, a drained token bucket lets its refill rate through. The
    rate is then held a little under that measure (MARGIN). What makes the measure exact:
    - Calls still in flight count as let through: a limiter refuses at once, an accepted call takes
      the partner's whole latency.
    - A token bucket lets everything through while it drains, so the second before its first 429
      overstates its refill rate, and a ramp's second understates it; the episode's own latest
      quarter-second (12 calls at least) is the refill rate. Until it has that many, only the
      episode's first 429 decides. Unless that quarter-second repeats the one a second before: a
      sliding log lets calls through as older ones age out, echoing a ramp at half the limit, and
      its count is the second before.
    - A run of REFUSED_RUN refusals with nothing let through between means a fixed window is spent:
      the rate drops to a trickle (WAIT) until a call is let through again, and the calls the spent
      window let through are counted then, from its last refusal back (a window's first 429 still
      has the window before's tail in its second). The trickle slows as the wait goes on (its gap
      a tenth of the wait so far): a ten-second window is waited out with a few dozen refusals.
    - A window refused for over a second is longer than one, and a second's count says little of
      it: what was let through since the reset before (or the first call), over the time between,
      is its rate. That measure never exceeds a window's count, so it may raise a second's.
    Only calls sent after the last change tell of the rate in force (TCP's one cut per window).

    STARTUP doubles the rate every DOUBLING_S from a tenth of limits.rate_per_s until a 429. After
    each measure the rate holds for HOLD_S, then probes from PROBE_ABOVE over the measure, rising,
    for PROBE_S — long enough that a fixed window wholly inside it counted the excess. A probe that
    demand filled and that drew no 429 means the limit rose: STARTUP again. A probe that finds the
    limit where it was costs a few refused calls. If the other endpoints' calls fall by more than
    half this one's rate since its last 429 (the tracking stage finishing), a pooled limit has room
    for it: STARTUP again, at once. The rate grows only while callers queue for it (an idle
    endpoint's rate says nothing), never exceeds limits.rate_per_s, and is cut by a fifth on a
    second timeout within 20 answers (one hanging call is that call's fault) and by a tenth when
    latency doubles.

    Callers queue in order; one timer a tick (10 ms) releases every caller whose slot — 1/rate
    after the previous one — falls in it: at most rate/100 + 1 calls together, the rate over any
    second exact, and a change of rate re-spaces the callers already waiting."""

    MARGIN = 0.97  # hold this far under the measured limit: the measure is exact to a few calls
    PROBE_ABOVE = 1.01  # probe from this far over it: a fixed window refuses the excess, 1% of a second
    PROBE_RISE = 0.02  # the probe rises by this share of its start each second
    HOLD_S = 1.0
    PROBE_S = 2.0  # a fixed window that far into a probe has counted 75% of a second at the probe rate
    DOUBLING_S = 0.7
    WINDOW_S = 1.0  # a limiter counts per second; so does the measure
    KEEP_S = 3.0  # send times kept: a window before the longest span measured
    EPISODE_GAP_S = 0.2  # a 429 this long after the previous one begins a new episode
    EPISODE_MIN_CALLS = 12  # calls sent since an episode began before its accepted rate is trusted
    EPISODE_MIN_ACCEPTED = 5
    ECHO_TOLERANCE = 0.15  # a span's calls let through this close to a second before's: a sliding log
    EPISODE_SPAN_S = 0.25  # the episode's latest span measured (more at low rates, for enough calls):
    # a bucket may have held tokens when the episode began
    REFUSED_RUN = 12  # this many refused in a row, none let through between: the window is spent
    TRICKLE = 0.05  # of the accepted rate, while waiting for a spent window to reset
    WAIT_BACKOFF = 0.1  # the trickle's gap grows to this share of the time the window has refused so far
    WAIT_MIN_RATE = 1.0  # calls/s: the slowest trickle (a minutes-long window is found a second late)
    GAP_TRUSTED_S = 0.25  # a reset found within this of the last refusal bounds the spent window's count
    DECREASE_ON_TIMEOUT = 0.8
    DECREASE_ON_LATENCY = 0.9
    LATENCY_WINDOW = 20
    LATENCY_RISE = 2.0
    LATENCY_FLOOR_S = 0.02  # below this, "rising" latency is noise
    TIMEOUT_WINDOW = 20  # a timeout cuts when another came within this many observed calls
    TICK_S = 0.01  # callers whose slots share a tick wake together: one loop pass, not one each
    LOOK_EVERY_S = 0.1  # how often a holding rate looks at the other endpoints' calls

    def __init__(self, max_rate: float, tick_offset_s: float = 0.0) -> None:
        self.max_rate = max_rate
        # Ticks begin this far into each 10 ms: endpoints by priority, so that under a limit they
        # share, the first claim on the tokens each tick is the reports' and the prober pays for
        # its own probe.
        self.tick_offset_s = tick_offset_s
        self.min_rate = min(max_rate, max(0.2, max_rate * 0.005))
        self.rate = max(self.min_rate, max_rate / 10)
        self.phase = RatePhase.STARTUP
        self.measured: float | None = None  # the partner's limit as last measured (calls/s)
        self._base = self.rate  # the rate the phase began at
        self._phase_s = 0.0  # seconds of queued demand in this phase
        self._clock = math.inf  # when _phase_s was last advanced (not yet)
        self._decided_at = -math.inf  # calls sent before this tell of an older rate
        self._next = 0.0  # the next free slot
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._paused_until = 0.0
        self._sent: collections.deque[float] = collections.deque()  # send times, the last KEEP_S
        self._refused: collections.deque[float] = collections.deque()  # send times of 429s, KEEP_S
        self._first_sent: float | None = None
        self._sent_total = 0  # calls sent and refused since the start: a long window's count outlives KEEP_S
        self._refused_total = 0
        self._last_reset: tuple[float, int, int] | None = None  # a spent window's reset: (sent at, sent, refused)
        self.siblings: list[AdaptiveRate] = []  # the other endpoints': the partner may pool its limit
        self._others_at_cut = 0.0  # the other endpoints' calls/s when this one was last refused
        self._next_look = 0.0
        self._episode_from = -math.inf  # send time of the 429 that began this episode
        self._last_refused = -math.inf
        self._refusing = False  # refused calls since the last one let through
        self._run_from = -math.inf  # send time of the first of them
        self._recent: collections.deque[float] = collections.deque(maxlen=self.LATENCY_WINDOW)
        self._baseline: float | None = None
        self._observed = 0
        self._last_timeout = -math.inf

    def measured_or_nan(self) -> float:
        return math.nan if self.measured is None else self.measured

    def set_max(self, max_rate: float) -> None:
        """A new cap (this instance's share of the fleet's): the rate never above it from now on."""
        if max_rate == self.max_rate:
            return
        self.max_rate = max_rate
        self.min_rate = min(max_rate, max(0.2, max_rate * 0.005))
        self.rate = max(self.min_rate, min(self.rate, max_rate))
        self._base = max(self.min_rate, min(self._base, max_rate))

    def pause(self, seconds: float) -> None:
        """Hold every caller until a maintenance Retry-After has passed."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    async def acquire(self) -> None:
        """Wait for this call's slot. Callers queue in order; one timer a tick releases every caller
        whose slot falls in it, at the rate in force when it fires (a change re-spaces the queue)."""
        while (wait := self._paused_until - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        now = time.monotonic()
        if not self._waiters and self._due(now) <= 0:
            self._take(now, queued=False)
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._arm()
        await waiter

    def _due(self, now: float) -> float:
        """Seconds until the tick holding the next free slot begins (≤ 0: it has begun)."""
        slot = max(now, self._next) - self.tick_offset_s
        return math.ceil(slot / self.TICK_S) * self.TICK_S - self.TICK_S + self.tick_offset_s - now

    def _take(self, now: float, queued: bool) -> None:
        self._grow(now, queued)
        self._next = max(now, self._next) + 1.0 / self.rate

    def _arm(self) -> None:
        if self._timer is None and self._waiters:
            delay = max(self._due(time.monotonic()), 0.0)
            self._timer = asyncio.get_running_loop().call_later(delay, self._release)

    def _rearm(self) -> None:
        """The rate changed: the queue's next release may be due sooner (or later)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._arm()

    def _release(self) -> None:
        self._timer = None
        now = time.monotonic()
        waiters = self._waiters
        while waiters:  # a pause holds new callers back; those queued before it go and meet the breaker
            if waiters[0].done():  # its caller was cancelled
                waiters.popleft()
                continue
            if self._due(now) > 0:
                break
            self._take(now, queued=True)
            waiters.popleft().set_result(None)
        self._arm()

    def sent(self, at: float) -> None:
        """A call left at `at` (monotonic): it counts towards the accepted calls until answered 429."""
        if self._first_sent is None:
            self._first_sent = at
        self._sent_total += 1
        self._sent.append(at)
        horizon = at - self.KEEP_S
        while self._sent[0] < horizon:
            self._sent.popleft()

    def observe(self, outcome: "Outcome", sent_at: float, answered_at: float) -> None:
        self._observed += 1
        fresh = sent_at >= self._decided_at  # sent at the rate now in force
        if outcome is Outcome.RATE_LIMITED:
            self._note_refused(sent_at)
            if self.phase is RatePhase.WAIT:
                self._trickle_slower(sent_at, answered_at)
                return
            if self._everything_refused_since(sent_at):
                # A fixed window is spent: whatever is sent before it resets is refused. A trickle
                # (a share of what the partner accepted in the last second) finds the reset.
                trickle = self.TRICKLE * self._accepted_rate(sent_at - self.WINDOW_S, sent_at)
                self._settle(min(self.rate, trickle), answered_at, RatePhase.WAIT)
            elif fresh:
                self._settle_to_measure(sent_at, answered_at)
            return
        if self._refusing and sent_at > self._last_refused and outcome in LET_THROUGH_OUTCOMES:
            self._refusals_ended(sent_at, answered_at)
        if self.phase is RatePhase.WAIT:
            return
        if outcome is Outcome.TIMEOUT:
            if fresh and self._observed - self._last_timeout <= self.TIMEOUT_WINDOW:
                self._settle(self.rate * self.DECREASE_ON_TIMEOUT, answered_at)
            self._last_timeout = self._observed
        elif outcome in ANSWERED_OUTCOMES:
            if self._latency_rising(answered_at - sent_at) and fresh:
                self._settle(self.rate * self.DECREASE_ON_LATENCY, answered_at)

    def _accepted_since(self, mark: tuple[float, int, int] | None, now: float) -> float | None:
        """Calls/s let through from a mark (sent at, sent, refused counts then) to now."""
        if mark is None or now - mark[0] < self.WINDOW_S:
            return None
        since, sent, refused = mark
        accepted = (self._sent_total - sent) - (self._refused_total - refused) - 1  # not the call that found it
        return max(1, accepted) / (now - since)

    def _trickle_slower(self, sent_at: float, now: float) -> None:
        """A trickle's call refused too: the longer the window has refused, the longer the next
        one waits — a tenth of the time so far, so the reset is found at most that late and a
        ten-second window draws a few dozen refusals, not its whole wait at the trickle's rate."""
        if sent_at < self._decided_at:
            return
        gap = max(1.0 / self.rate, self.WAIT_BACKOFF * (sent_at - self._run_from))
        if 1.0 / gap < self.rate:
            self._settle(1.0 / gap, now, RatePhase.WAIT)

    def _refusals_ended(self, sent_at: float, now: float) -> None:
        """A call sent after the last refused one was let through. If the refused calls came in one
        unbroken run, a fixed window was spent and has reset: the calls let through in the second
        before the run's last refusal are exactly what that window allows — no earlier window's
        tail in the count, as there is at a run's first refusal."""
        self._refusing = False
        # Calls of the first refusal's own tick may have been let through before the window ran out.
        after_first = math.nextafter(self._episode_from, math.inf)
        sent, refused = self._count(after_first, math.nextafter(self._last_refused, math.inf))
        if self.phase is not RatePhase.WAIT and sent > refused:
            return
        # The window reset between the run's last refused call and this one: the second before
        # that refused call may reach back into the window before (an overcount), the second
        # before this call misses the spent window's start (an undercount). Each errs by at most
        # the calls of the gap between the two; the mean halves it. After a long gap (demand
        # paused) the undercount says nothing.
        last, this = self._last_refused, sent_at
        previous, self._last_reset = self._last_reset, (this, self._sent_total, self._refused_total)
        over = self._accepted_rate(last - self.WINDOW_S, last)
        under = self._accepted_rate(this - self.WINDOW_S, last) * (last - this + self.WINDOW_S) / self.WINDOW_S
        second = (over + under) / 2 if this - last <= self.GAP_TRUSTED_S else over
        # A window of another length: the second's count says little of it. What was let through
        # since the reset before, over the time from that one to this, does — and is never above a
        # window's count (unless every window since was spent, it is below).
        cycle = self._accepted_since(previous, this)
        if last - self._run_from > self.WINDOW_S:  # refused for over a second: a window longer than one
            if cycle is None and self._first_sent is not None:
                cycle = self._accepted_since((self._first_sent, 0, 0), this)
            self.measured = cycle if cycle is not None else second
        else:
            self.measured = max(second, cycle or 0.0)
        rate = self.MARGIN * self.measured
        self._settle(rate if self.phase is RatePhase.WAIT else min(self.rate, rate), now)

    def _grow(self, now: float, queued: bool) -> None:
        # The phase's clock runs only while callers queue for slots: while demand, not the rate,
        # holds calls back, a higher rate would be untested.
        if queued:
            self._phase_s += max(0.0, min(now - self._clock, self.WINDOW_S))
        self._clock = now
        if self.phase in (RatePhase.HOLD, RatePhase.PROBE) and now >= self._next_look and self._others_left_room(now):
            self._enter(RatePhase.STARTUP, self.rate)
        elif self.phase is RatePhase.HOLD and self._phase_s >= self.HOLD_S:
            self._enter(RatePhase.PROBE, self._base * self.PROBE_ABOVE / self.MARGIN)
        elif self.phase is RatePhase.PROBE:
            if self._phase_s >= self.PROBE_S and self._probe_went_out(now):
                self._enter(RatePhase.STARTUP, self.rate)  # a whole window over the old limit, no 429
            else:
                # Rising, so that a token bucket refilled during the hold is drained within it.
                self.rate = min(self.max_rate, self._base * (1.0 + self.PROBE_RISE * self._phase_s))
        elif self.phase is RatePhase.STARTUP:
            self.rate = min(self.max_rate, self._base * 2.0 ** (self._phase_s / self.DOUBLING_S))

    def _others_left_room(self, now: float) -> bool:
        """Have the other endpoints slowed, since this one was last refused, by more than half its
        own rate? If the partner pools one limit for all, that room is this endpoint's now (the
        tracking stage finishing leaves it to the reports); if not, the climb costs a 429 or two."""
        self._next_look = now + self.LOOK_EVERY_S
        return self._others_at_cut - self._others_rate(now) > 0.5 * self.rate

    def _others_rate(self, now: float) -> float:
        return sum(other._count(now - self.WINDOW_S, now)[0] for other in self.siblings) / self.WINDOW_S

    def _probe_went_out(self, now: float) -> bool:
        """In each of the last two seconds, more calls went out than the limit as measured allows:
        demand filled the probe, so a window wholly inside it saw the excess."""
        over = self._base * (1.0 + self.PROBE_ABOVE) / (2.0 * self.PROBE_ABOVE) * self.WINDOW_S
        return all(self._count(now - k * self.WINDOW_S, now - (k - 1) * self.WINDOW_S)[0] + 1 >= over
                   for k in (1, 2))

    def _enter(self, phase: RatePhase, rate: float) -> None:
        self.phase = phase
        floor = min(self.min_rate, self.WAIT_MIN_RATE) if phase is RatePhase.WAIT else self.min_rate
        self.rate = self._base = max(floor, min(rate, self.max_rate))
        self._phase_s = 0.0

    def _note_refused(self, sent_at: float) -> None:
        self._refused_total += 1
        if not self._refusing:
            self._run_from = sent_at
        self._refusing = True
        if sent_at - self._last_refused > self.EPISODE_GAP_S:
            self._episode_from = sent_at
        self._last_refused = max(self._last_refused, sent_at)
        self._refused.append(sent_at)
        horizon = sent_at - self.KEEP_S
        while self._refused[0] < horizon:
            self._refused.popleft()

    def _everything_refused_since(self, s: float) -> bool:
        """The last REFUSED_RUN calls sent up to s were all refused, nothing accepted between."""
        if len(self._refused) < self.REFUSED_RUN:
            return False
        first = min(itertools.islice(reversed(self._refused), self.REFUSED_RUN))
        sent, refused = self._count(first, math.nextafter(s, math.inf))
        return sent == refused

    def _settle_to_measure(self, sent_at: float, now: float) -> None:
        measure = self._measure(sent_at)
        if measure is None:
            return
        if self.phase is RatePhase.STARTUP:
            # The second before a ramp's first 429 was mostly spent below the limit: it undercounts.
            # Stop growing here; the calls refused next measure the limit.
            measure = max(measure, self.rate)
        self.measured = measure
        self._others_at_cut = self._others_rate(now)
        self._settle(min(self.rate, self.MARGIN * measure), now)

    def _measure(self, s: float) -> float | None:
        """The calls/s the partner let through up to the refused call sent at s: over the second
        before it at an episode's first 429, then over the episode's latest EPISODE_SPAN_S once
        enough calls went out in it, and over the second before again once it is a second old.
        None while the episode is too young to tell more than its first 429 did."""
        young = s - self._episode_from < self.WINDOW_S
        if young:
            span = max(self.EPISODE_SPAN_S, 1.5 * self.EPISODE_MIN_CALLS / self.rate)
            start = max(self._episode_from, s - span)
            sent, refused = self._count(start, s)
            if sent >= self.EPISODE_MIN_CALLS and sent - refused >= self.EPISODE_MIN_ACCEPTED:
                recent = (sent - refused) / max(s - start, 1e-3)
                if not self._echoes(recent, start, s):
                    return recent
                # a sliding log: the second before is its count
            elif s > self._episode_from:
                return None
        first = self._first_sent if self._first_sent is not None else s
        return self._accepted_rate(max(s - self.WINDOW_S, first), s)

    def _echoes(self, recent: float, start: float, end: float) -> bool:
        """Does what the partner lets through now repeat what it let through a second before? A
        drained bucket lets its refill rate through, whatever was sent before; a sliding log lets a
        call through as one a second older ages out, so it echoes the calls of a second before (a
        ramp's, about half the limit). Then the second before, not its latest span, is the log's count."""
        if self._first_sent is None or start - self.WINDOW_S < self._first_sent:
            return False
        echo = self._accepted_rate(start - self.WINDOW_S, end - self.WINDOW_S)
        return abs(recent - echo) <= self.ECHO_TOLERANCE * recent

    def _accepted_rate(self, start: float, end: float) -> float:
        sent, refused = self._count(start, end)
        return max(1, sent - refused) / max(end - start, 1e-3)

    def _count(self, start: float, end: float) -> tuple[int, int]:
        """Calls sent, and of those answered 429, with send times in [start, end). Calls go out a
        tick at a time: the span from one tick to another holds the calls of the first only."""
        sent = bisect.bisect_left(self._sent, end) - bisect.bisect_left(self._sent, start)
        refused = sum(1 for at in self._refused if start <= at < end)
        return sent, refused

    def _settle(self, rate: float, now: float, phase: RatePhase = RatePhase.HOLD) -> None:
        last_slot = self._next - 1.0 / self.rate
        self._enter(phase, rate)
        self._next = last_slot + 1.0 / self.rate  # the queue re-spaced at the new rate from the last slot
        self._rearm()
        self._clock = now
        self._decided_at = now

    def _latency_rising(self, latency_s: float) -> bool:
        self._recent.append(latency_s)
        if len(self._recent) < self.LATENCY_WINDOW:
            return False
        median = sorted(self._recent)[self.LATENCY_WINDOW // 2]  # robust to the odd slow answer
        if self._baseline is None:
            self._baseline = median
        rising = median > max(self.LATENCY_RISE * self._baseline, self.LATENCY_FLOOR_S)
        self._baseline += 0.01 * (median - self._baseline)  # a slower partner becomes the new normal
        return rising


class CircuitState(enum.StrEnum):
    CLOSED = "closed"  # calls flow
    OPEN = "open"  # no calls until the open period ends
    HALF_OPEN = "half_open"  # one probe at a time; enough successes close it, a failure reopens it


class CircuitBreaker:
    """Per endpoint. Opens when at least half of the last 20 calls failed (with 10 or more seen) or 5
    failed in a row; while open, callers wait instead of calling. After the open period — doubling
    from 1 s to 10 s while probes fail, and never shorter than the partner's Retry-After — one probe
    goes out at a time, and 3 successful probes in a row close it."""

    WINDOW = 20
    MIN_CALLS = 10
    FAILURE_RATE = 0.5
    CONSECUTIVE_FAILURES = 5
    OPEN_BASE_S = 1.0
    OPEN_MAX_S = 10.0
    PROBES_TO_CLOSE = 3

    def __init__(self, endpoint: "Endpoint | str",
                 on_change: Callable[["CircuitBreaker", CircuitState, str], None]) -> None:
        self.endpoint = endpoint
        self.state = CircuitState.CLOSED
        self._on_change = on_change
        self._window: collections.deque[bool] = collections.deque(maxlen=self.WINDOW)
        self._consecutive = 0
        self._open_until = 0.0
        self._open_s = self.OPEN_BASE_S
        self._probe_in_flight = False
        self._probe_successes = 0
        self._changed = asyncio.Event()

    async def admit(self) -> bool:
        """Wait until a call may go out. True when that call is a half-open probe."""
        while True:
            if self.state is CircuitState.CLOSED:
                return False
            now = time.monotonic()
            if self.state is CircuitState.OPEN and now >= self._open_until:
                self._set(CircuitState.HALF_OPEN, "probing")
            if self.state is CircuitState.HALF_OPEN and not self._probe_in_flight:
                self._probe_in_flight = True
                return True
            self._changed.clear()
            wait = self._open_until - now if self.state is CircuitState.OPEN else None
            try:
                async with asyncio.timeout(wait):
                    await self._changed.wait()
            except TimeoutError:
                pass

    def abandon_probe(self) -> None:
        """A probe cancelled before its answer (shutdown): let another one go."""
        self._probe_in_flight = False
        self._changed.set()

    def record(self, reply: "Reply", probe: bool) -> None:
        failed = reply.outcome in BREAKER_FAILURES
        if probe:
            self._probe_in_flight = False
            self._changed.set()
            if failed:
                self._open_s = min(self.OPEN_MAX_S, self._open_s * 2)
                self._open(reply, f"probe failed: {reply.detail or reply.outcome.value}")
            elif reply.outcome is not Outcome.DEFERRED:
                self._probe_successes += 1
                if self._probe_successes >= self.PROBES_TO_CLOSE:
                    self._window.clear()
                    self._consecutive = 0
                    self._open_s = self.OPEN_BASE_S
                    self._set(CircuitState.CLOSED, "probes succeeded")
            return
        if self.state is not CircuitState.CLOSED or reply.outcome is Outcome.DEFERRED:
            return  # answers to calls sent before it opened say nothing new
        self._window.append(failed)
        self._consecutive = self._consecutive + 1 if failed else 0
        failures = sum(self._window)
        if self._consecutive >= self.CONSECUTIVE_FAILURES or (
                len(self._window) >= self.MIN_CALLS and failures / len(self._window) >= self.FAILURE_RATE):
            self._open(reply, f"{failures} of the last {len(self._window)} calls failed")

    def _open(self, reply: "Reply", why: str) -> None:
        self._open_until = time.monotonic() + max(self._open_s, reply.retry_after or 0.0)
        self._probe_successes = 0
        self._set(CircuitState.OPEN, why)

    def _set(self, state: CircuitState, why: str) -> None:
        previous, self.state = self.state, state
        self._changed.set()
        if previous is not state:
            self._on_change(self, previous, why)


UNAUTHORIZED_RETRY_S = 10.0  # after a 401, the endpoint is asked again at most this often


class TokenGate:
    """Per endpoint. After a 401 the endpoint's calls wait here instead of each asking again: one
    trial call per UNAUTHORIZED_RETRY_S tries the token, and the first answer that is not a 401
    lets everyone through. A new token (SIGHUP) allows a trial at once."""

    def __init__(self, on_change: Callable[[bool], None]) -> None:
        self.refused = False
        self._on_change = on_change
        self._next_trial_at = 0.0
        self._trial_in_flight = False
        self._changed = asyncio.Event()

    async def admit(self) -> bool:
        """Wait until a call may go out. True when that call is the trial of a refused token."""
        while self.refused:
            now = time.monotonic()
            if not self._trial_in_flight and now >= self._next_trial_at:
                self._trial_in_flight = True
                return True
            self._changed.clear()
            wait = None if self._trial_in_flight else self._next_trial_at - now
            try:
                async with asyncio.timeout(wait):
                    await self._changed.wait()
            except TimeoutError:
                pass
        return False

    def record(self, outcome: "Outcome", trial: bool) -> None:
        if trial:
            self._trial_in_flight = False
            self._changed.set()
        if outcome is Outcome.UNAUTHORIZED:
            if trial or not self.refused:
                self._next_trial_at = time.monotonic() + UNAUTHORIZED_RETRY_S
            self._set(True)
        elif outcome in ANSWERED_OUTCOMES:
            self._set(False)  # the partner answered the request itself: it took the token

    def abandon_trial(self) -> None:
        self._trial_in_flight = False
        self._changed.set()

    def new_token(self) -> None:
        self._next_trial_at = 0.0
        self._changed.set()

    def _set(self, refused: bool) -> None:
        if refused is not self.refused:
            self.refused = refused
            self._changed.set()
            self._on_change(refused)


class RetryBudget:
    """While an endpoint is failing (10% or more of its calls in the last 10 s failed or were
    rate-limited), retries may be at most ~20% of its calls (plus a few, so a quiet endpoint can
    still retry): during a partner's bad minute, retries do not multiply the load. A retry over
    budget is deferred without calling. While the endpoint is healthy a retry is an ordinary call;
    otherwise, after a storm in which every pending item failed once, the budget would starve
    the very calls that now succeed."""

    WINDOW_S = 10.0
    RATIO = 0.2
    ALLOWANCE = 5
    UNHEALTHY = 0.1

    def __init__(self) -> None:
        self._calls: collections.deque[tuple[float, bool, bool]] = collections.deque()
        self._retries = 0
        self._failures = 0

    def allows_retry(self) -> bool:
        self._expire(time.monotonic())
        calls = len(self._calls)
        if self._failures < self.UNHEALTHY * calls:
            return True
        return self._retries < self.ALLOWANCE + self.RATIO * calls

    def record(self, retry: bool, failed: bool) -> None:
        now = time.monotonic()
        self._expire(now)
        self._calls.append((now, retry, failed))
        self._retries += retry
        self._failures += failed

    def _expire(self, now: float) -> None:
        while self._calls and self._calls[0][0] < now - self.WINDOW_S:
            _, retry, failed = self._calls.popleft()
            self._retries -= retry
            self._failures -= failed


class PrioritySemaphore:
    """A semaphore whose waiters are served lowest priority number first, in arrival order within
    a priority: under a backlog, reports (which finish the job) go before tracking, tracking
    before feed paging."""

    def __init__(self, slots: int) -> None:
        self._slots = slots
        self._free = slots
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @property
    def capacity(self) -> int:
        return self._slots

    def resize(self, slots: int) -> None:
        """More slots wake waiters at once; fewer take effect as holders release theirs."""
        added, self._slots = slots - self._slots, slots
        if added < 0:
            self._free += added  # below zero until enough slots come back
        for _ in range(max(0, added)):
            self.release()

    async def acquire(self, priority: int) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._order), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # the slot was handed over just as we were cancelled: pass it on
            raise

    def release(self) -> None:
        if self._free < 0:  # a slot the fleet's share took away (resize)
            self._free += 1
            return
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)  # the slot passes straight to the waiter
                return
        self._free += 1


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After is seconds or an HTTP date; anything else is ignored rather than trusted."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = dt.datetime.strptime(value.strip(), "%a, %d %b %Y %H:%M:%S GMT").replace(tzinfo=dt.UTC)
        except ValueError:
            return None
        seconds = (when - dt.datetime.now(dt.UTC)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


class PartnerClient:
    def __init__(self, config: Config, session: aiohttp.ClientSession, metrics: "Metrics",
                 on_circuit_change: Callable[[CircuitBreaker, CircuitState, str], None],
                 on_token_change: Callable[[Endpoint, bool], None] = lambda endpoint, refused: None) -> None:
        self._base = config.partner.base_url.rstrip("/")
        self._token = config.partner.token
        self._timeout = config.partner.timeout_s
        self._session = session
        self._metrics = metrics
        self._limits = config.limits
        self.fleet_size = 1  # instances sharing the limits (share_limits)
        self._slots = PrioritySemaphore(config.limits.concurrency)
        self.rates = {e: AdaptiveRate(config.limits.rate_per_s, PRIORITY[e.value] * AdaptiveRate.TICK_S / 4)
                      for e in Endpoint}
        for endpoint, rate in self.rates.items():
            rate.siblings = [other for e, other in self.rates.items() if e is not endpoint]
        self.budgets = {e: RetryBudget() for e in Endpoint}

        def changed(breaker: CircuitBreaker, previous: CircuitState, why: str) -> None:
            metrics.set_circuit(str(breaker.endpoint), breaker.state)
            on_circuit_change(breaker, previous, why)

        self.breakers = {e: CircuitBreaker(e, changed) for e in Endpoint}
        self.gates = {e: TokenGate(functools.partial(on_token_change, e)) for e in Endpoint}
        # Metric children looked up once: labels() takes a lock and hashes on every call. Gauges of
        # state the client holds anyway are read when scraped, not set on every call.
        self._latency = {e: metrics.partner_latency.labels(e.value) for e in Endpoint}
        self.in_flight = dict.fromkeys(Endpoint, 0)
        for e in Endpoint:
            metrics.partner_in_flight.labels(e.value).set_function(functools.partial(self.in_flight.__getitem__, e))
            metrics.partner_rate.labels(e.value).set_function(functools.partial(getattr, self.rates[e], "rate"))
            metrics.partner_limit_measured.labels(e.value).set_function(self.rates[e].measured_or_nan)
        self._calls = {(e, o): metrics.partner_calls.labels(e.value, o.value) for e in Endpoint for o in Outcome}

    @property
    def call_slots(self) -> int:
        """Calls this instance may have in flight (its share of limits.concurrency)."""
        return self._slots.capacity

    def share_limits(self, instances: int) -> None:
        """limits.rate_per_s and limits.concurrency are the fleet's: with `instances` live, this one
        takes its share of each (the partner's limit does not grow with our instance count), and
        still adapts to 429s and latency within it."""
        self.fleet_size = instances
        for rate in self.rates.values():
            rate.set_max(self._limits.rate_per_s / instances)
        self._slots.resize(max(1, math.ceil(self._limits.concurrency / instances)))

    def set_token(self, token: str) -> None:
        """A new token (SIGHUP): calls from now on carry it, and refused endpoints try it at once."""
        self._token = token
        for gate in self.gates.values():
            gate.new_token()

    # The three calls hand back _call's coroutine instead of awaiting it: one frame less for every
    # resumption of a call in flight to pass through.
    def returns_page(self, cursor: str | None, limit: int, *, retry: bool = False) -> Awaitable[Reply]:
        params = {"limit": str(limit)}
        if cursor is not None:
            params["cursor"] = cursor
        return self._call(Endpoint.RETURNS, "GET", "/returns", retry, params=params)

    def tracking(self, shipment_number: str, *, retry: bool = False) -> Awaitable[Reply]:
        return self._call(
            Endpoint.TRACKING, "GET", "/tracking", retry, params={"shipment_number": shipment_number}
        )

    def post_result(self, report: DueReport) -> Awaitable[Reply]:
        return self._call(
            Endpoint.RESULTS, "POST", "/results", report.attempts > 0, json_body=report.body(),
            headers={"Idempotency-Key": report.return_id},
        )

    async def _call(
        self,
        endpoint: Endpoint,
        method: str,
        path: str,
        retry: bool,
        *,
        params: dict[str, str] | None = None,
        json_body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        breaker, rate, budget = self.breakers[endpoint], self.rates[endpoint], self.budgets[endpoint]
        gate = self.gates[endpoint]
        reply: Reply | None = None
        trial = False
        while reply is None:
            trial = gate.refused and await gate.admit()  # while the token is refused, callers wait here
            probe = False
            try:
                # while the circuit is open, callers wait here
                probe = breaker.state is not CircuitState.CLOSED and await breaker.admit()
                if retry and not probe and not budget.allows_retry():
                    self._metrics.retries_deferred.labels(endpoint.value).inc()
                    return Reply(endpoint=endpoint, outcome=Outcome.DEFERRED, status=None, body=None, retry_after=None,
                                 latency_s=0.0, detail="retry budget spent")
                await rate.acquire()
                await self._slots.acquire(PRIORITY[endpoint.value])
                try:
                    if not probe and breaker.state is not CircuitState.CLOSED:
                        continue  # it opened while this call waited its turn: wait again
                    self.in_flight[endpoint] += 1
                    started = time.monotonic()
                    rate.sent(started)
                    try:
                        reply = await self._exchange(endpoint, method, path, params, json_body, headers, started)
                    finally:
                        self.in_flight[endpoint] -= 1
                finally:
                    self._slots.release()
            except BaseException:
                if probe:
                    breaker.abandon_probe()
                raise
            finally:
                if trial and reply is None:  # not sent after all: let another call try the token
                    gate.abandon_trial()
        gate.record(reply.outcome, trial)
        budget.record(retry, failed=reply.outcome in TRANSIENT_OUTCOMES)
        breaker.record(reply, probe)
        rate.observe(reply.outcome, started, started + reply.latency_s)
        if reply.status == 503 and reply.retry_after:
            rate.pause(reply.retry_after)  # maintenance: the partner said when to come back
        self._calls[endpoint, reply.outcome].inc()
        self._latency[endpoint].observe(reply.latency_s)
        return reply

    async def _exchange(
        self,
        endpoint: Endpoint,
        method: str,
        path: str,
        params: dict[str, str] | None,
        json_body: dict[str, Any] | None,
        headers: dict[str, str] | None,
        started: float,
    ) -> Reply:
        def reply(outcome: Outcome, status: int | None, body: Any = None, retry_after: float | None = None,
                  detail: str = "") -> Reply:
            return Reply(endpoint=endpoint, outcome=outcome, status=status, body=body, retry_after=retry_after,
                         latency_s=time.monotonic() - started, detail=detail)

        all_headers = {"Authorization": f"Bearer {self._token}", "User-Agent": USER_AGENT, **(headers or {})}
        try:
            async with asyncio.timeout(self._timeout):  # covers connect, headers and the whole body
                async with self._session.request(
                    method, self._base + path, params=params, json=json_body, headers=all_headers
                ) as resp:
                    raw = await _read_capped(resp)
                    status = resp.status
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        except TimeoutError:
            return reply(Outcome.TIMEOUT, None, detail=f"no answer within {self._timeout:g}s")
        except _BodyTooLarge:
            return reply(Outcome.GARBLED, None, detail=f"body larger than {MAX_BODY_BYTES} bytes")
        except (aiohttp.ClientError, OSError) as exc:
            return reply(Outcome.CONNECTION, None, detail=type(exc).__name__)
        body = _parse_json(raw)
        if status == 200:
            if body is _NOT_JSON:
                return reply(Outcome.GARBLED, status, detail=f"200 with non-JSON body ({len(raw)} bytes)")
            return reply(Outcome.OK, status, body)
        outcome = _outcome_for_status(status)
        error = body.get("error") if isinstance(body, dict) else None
        detail = f"{status} {storable_text(error, 200)}" if isinstance(error, str) else f"{status}"
        return reply(outcome, status, None if body is _NOT_JSON else body, retry_after, detail)


class _BodyTooLarge(Exception):
    pass


_NOT_JSON = object()


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
    """Read the body, refusing one over MAX_BODY_BYTES without holding it all in memory."""
    if resp.content_length is not None:
        if resp.content_length > MAX_BODY_BYTES:
            raise _BodyTooLarge
        return await resp.read()  # the common case: a declared length under the cap, read at once
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(65536):
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # ValueError covers bad UTF-8 and bad JSON
        return _NOT_JSON


def _outcome_for_status(status: int) -> Outcome:
    if status == 404:
        return Outcome.NOT_FOUND
    if status == 409:
        return Outcome.CONFLICT
    if status == 422:
        return Outcome.REFUSED
    if status == 401:
        return Outcome.UNAUTHORIZED
    if status == 429:
        return Outcome.RATE_LIMITED
    if status >= 500:
        return Outcome.SERVER_ERROR
    if 200 <= status < 300:
        return Outcome.GARBLED  # a 2xx we were not promised: treat the answer as unusable
    return Outcome.CLIENT_ERROR


def retry_delay(attempt: int, base_s: float, max_s: float, retry_after: float | None) -> float:
    """Exponential backoff with full jitter (spreads retries of a burst), never before Retry-After."""
    ceiling = min(max_s, base_s * 2 ** min(attempt, 30))
    return max(retry_after or 0.0, random.uniform(base_s / 2, ceiling))


def jittered(seconds: float, spread: float = 0.2) -> float:
    return seconds * random.uniform(1 - spread, 1 + spread)


# ── what the partner's answers mean ─────────────────────────────────────────────────────────


class GarbledAnswer(Exception):
    """A 200 whose body does not follow the contract. The message says what was wrong."""


class PickupStatus(enum.StrEnum):
    REQUESTED = "requested"
    ASSIGNED = "assigned"
    PICKING_UP = "picking_up"
    DELIVERED = "delivered"
    CANCELLED = "cancelled"


KNOWN_STATUSES = frozenset(s.value for s in PickupStatus)
RETURN_FIELDS = ("id", "order_number", "order_item_number", "shipment_number")
MAX_FIELD_CHARS = 128
MAX_STATUS_CHARS = 64
MAX_CURSOR_CHARS = 1024
QUARANTINE_RAW_CHARS = 2000


def parse_returns_page(body: Any, sent_cursor: str | None, now: float, first_check_in_s: float) -> FeedPage:
    """Split a feed page into usable items and quarantined ones. Raises GarbledAnswer only when
    the page itself is unusable (then the cursor must not move)."""
    if not isinstance(body, dict):
        raise GarbledAnswer(f"page is {type(body).__name__}, not an object")
    data = body.get("data")
    if not isinstance(data, list):
        raise GarbledAnswer(f"data is {type(data).__name__}, not a list")
    has_more = body.get("has_more", False)
    if not isinstance(has_more, bool):
        raise GarbledAnswer("has_more is not a boolean")
    next_cursor = body.get("next_cursor")
    if next_cursor is not None and printable_or_none(next_cursor, MAX_CURSOR_CHARS) is None:
        raise GarbledAnswer("next_cursor is not a short printable string")
    if not next_cursor:
        if data:
            raise GarbledAnswer("items without a next_cursor")
        next_cursor = None
    if not data and next_cursor in (None, sent_cursor):
        has_more = False  # an empty page that does not move cannot have more behind it
    items: list[ReturnItem] = []
    quarantined: list[QuarantinedItem] = []
    for raw in data:
        checked = validate_return(raw)
        if isinstance(checked, ReturnItem):
            items.append(checked)
        else:
            quarantined.append(checked)
    return FeedPage(items=tuple(items), quarantined=tuple(quarantined), next_cursor=next_cursor, has_more=has_more,
                    first_checks=first_checks(items, now, first_check_in_s), read_from=SentCursor(cursor=sent_cursor))


def first_checks(items: Iterable[ReturnItem], now: float, first_check_in_s: float) -> tuple[tuple[str, float], ...]:
    """When each box of these returns is first asked about (a box not seen before is created
    with it): spread over an interval, so a burst's first checks do not land at once."""
    when: dict[str, float] = {}
    for item in items:
        when.setdefault(item.shipment_number, now + jittered(first_check_in_s, 0.5))
    return tuple(when.items())


def validate_return(raw: Any) -> ReturnItem | QuarantinedItem:
    if not isinstance(raw, dict):
        return _quarantine(raw, None, f"item is {type(raw).__name__}, not an object")
    return_id = printable_or_none(raw.get("id")) or None
    for name in RETURN_FIELDS:
        value = raw.get(name)
        if name not in raw:
            return _quarantine(raw, return_id, f"{name} is missing")
        if not isinstance(value, str):
            return _quarantine(raw, return_id, f"{name} is {'null' if value is None else type(value).__name__}")
        if not value.strip():
            return _quarantine(raw, return_id, f"{name} is empty")
        if len(value) > MAX_FIELD_CHARS or not value.isprintable():
            return _quarantine(raw, return_id, f"{name} is too long or unprintable")
    return ReturnItem(
        id=raw["id"],
        order_number=raw["order_number"],
        order_item_number=raw["order_item_number"],
        shipment_number=raw["shipment_number"],
        requested_at=printable_or_none(raw.get("requested_at")),
    )


def printable_or_none(value: Any, limit: int = MAX_FIELD_CHARS) -> str | None:
    """A short printable string, or None. Lone surrogates (JSON can carry them; UTF-8 cannot)
    are not printable, so nothing unstorable gets through."""
    return value if isinstance(value, str) and len(value) <= limit and value.isprintable() else None


def storable_text(value: str, limit: int) -> str:
    """Text from the partner for logs and the database: cut to `limit`, anything UTF-8 cannot
    carry escaped."""
    return value[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


def _quarantine(raw: Any, return_id: str | None, reason: str) -> QuarantinedItem:
    try:  # ASCII: a lone surrogate or control character is kept as an escape, not as itself
        text = json.dumps(raw, sort_keys=True)
    except (TypeError, ValueError, RecursionError):
        text = "(not representable: nested too deeply)"
    return QuarantinedItem(return_id=return_id, reason=reason, raw=text[:QUARANTINE_RAW_CHARS])


def parse_tracking(body: Any, shipment_number: str) -> tuple[str, str | None]:
    """The current status (the last history entry) and its updated_at. Raises GarbledAnswer."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise GarbledAnswer("no status history list")
    if not body["data"]:
        raise GarbledAnswer("empty status history")
    last = body["data"][-1]
    if not isinstance(last, dict):
        raise GarbledAnswer("history entry is not an object")
    status = last.get("return_status")
    if not isinstance(status, str) or not status or len(status) > MAX_STATUS_CHARS or not status.isprintable():
        raise GarbledAnswer("return_status is not a short string")
    if last.get("shipment_number", shipment_number) != shipment_number:
        raise GarbledAnswer("history belongs to another shipment")
    updated_at = last.get("updated_at")
    if status == PickupStatus.DELIVERED and not _is_timestamp(updated_at):
        raise GarbledAnswer("delivered without a valid updated_at")
    return status, updated_at if isinstance(updated_at, str) else None


def parse_history(body: Any, since: float | None) -> tuple[StatusChange, ...]:
    """The history entries newer than `since`, oldest first, at most HISTORY_PER_BOX. Called on a
    body parse_tracking accepted; an entry without a usable status or time is left out. Read from
    the newest back to the first not newer than `since` (the contract lists them oldest first)."""
    changes = []
    for entry in reversed(body["data"][-HISTORY_PER_BOX:]):
        if not isinstance(entry, dict):
            continue
        status, at = entry.get("return_status"), unix_seconds(entry.get("updated_at"))
        if at is None or not isinstance(status, str) or not status or len(status) > MAX_STATUS_CHARS \
                or not status.isprintable():
            continue
        if since is not None and at <= since:
            break
        changes.append(StatusChange(status=status, at=at))
    changes.sort(key=lambda change: change.at)
    return tuple(changes)


def answered_history(reply: Reply, shipment_number: str) -> tuple[StatusChange, ...] | None:
    """The whole status history a tracking answer carries, or None when it carries none we can use."""
    if reply.outcome is not Outcome.OK:
        return None
    try:
        parse_tracking(reply.body, shipment_number)
    except GarbledAnswer:
        return None
    return parse_history(reply.body, None)


def unix_seconds(value: Any) -> float | None:
    """An ISO 8601 time as Unix seconds (UTC when it names no zone), or None."""
    if not isinstance(value, str) or len(value) > MAX_FIELD_CHARS:
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


def _is_timestamp(value: Any) -> bool:
    if not isinstance(value, str) or len(value) > MAX_FIELD_CHARS:
        return False
    try:
        dt.datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


# ════════════════════════════════════════════════════════════════════════════════════════════
# The tracking schedule — when to ask about a box again.
# When to ask about a box again. Only the move to `delivered` has to be noticed soon (within
# detect_within_s, meant as the 95th percentile); every other move is read from the history the
# answer carries, exactly, whenever it is asked. So a box is asked again after detect_within_s plus
# a hold: how long, at the least, the boxes seen before it in the same status, as long in it, at the
# same local hour of the week, still took to be delivered (their LEAD_RISK quantile) — and never
# less than the shortest lead from entering a last-mile status (one a delivery follows) on its way.
# What they show is all it knows — the couriers' hours, days off, a status's usual length; nothing
# is assumed. Without deliveries behind it, the hold is 0: the fixed cadence. A hold is never longer
# than QUIET_CAP_S: a box in a rare case (its courier came late in the day) is late by hours, not days.
#
# A sales event's boxes move in step, so the first night is one nobody has seen. A status no box
# has left for a while (with many checks to show it) is quiet, and so is the fleet while no box
# comes near delivery: their boxes are asked again after twice as long as it has been quiet (up to
# QUIET_CAP_S), except the sentinels — one box in SENTINEL_EVERY, and at least SENTINELS_AT_LEAST —
# which keep the cadence. The first move out of the quiet — a sentinel usually sees it — wakes every
# box concerned: the first delivery wakes the fleet. docs/schedule.md has the numbers.
# ════════════════════════════════════════════════════════════════════════════════════════════

LEAD_RISK = 0.05
LEAD_MIN_SAMPLES = 30
LEAD_CELL_SAMPLES = 100  # a cell's most recent deliveries
LEAD_DWELL_GRID_S = (0, 300, 900, 1800, 3600, 5400, 7200, 10800, 14400, 21600, 28800, 43200, 64800, 86400,
                     129600, 172800, 259200)
LEARN_FROM_DAYS = 28  # at start, the schedule learns again from the boxes closed this recently
QUIET_CAP_S = 8 * 3600.0
QUIET_GROWTH = 2.0  # a status quiet for q is asked again after QUIET_GROWTH × q
QUIET_MIN_CHECKS = 50  # checks of a status's boxes that saw nobody leave it, before it counts as quiet
SENTINEL_EVERY = 50
SENTINELS_AT_LEAST = 100  # a small fleet needs more than one in 50: the first delivery is seen by one of them
ANY_STATUS = "*"  # the fleet: quiet while no box comes near delivery; woken, it wakes every box
CHECK_JITTER = 0.1


class LatestSamples:
    """The `keep` samples taken at the latest moments, whatever order they are learned in. A slow
    box's delivery is learned days after a quick one's from the same hour: keeping the latest
    learned would keep only the slow ones, and their leads would hold every box back for days."""

    __slots__ = ("_keep", "_heap")

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._heap: list[tuple[float, float]] = []  # (taken at, value), the earliest first

    def add(self, at: float, value: float) -> None:
        if len(self._heap) < self._keep:
            heapq.heappush(self._heap, (at, value))
        elif at > self._heap[0][0]:
            heapq.heapreplace(self._heap, (at, value))

    def quantile(self, q: float) -> float | None:
        """The q quantile of the values kept, or None while fewer than LEAD_MIN_SAMPLES."""
        if len(self._heap) < LEAD_MIN_SAMPLES:
            return None
        return sorted(value for _, value in self._heap)[int(q * len(self._heap))]


class TrackingSchedule:
    """Learns from the status histories tracking answers carry; decides each box's next check.
    With learn=False it is the fixed cadence: track_every_s ±20%, whatever the box.

    A hold is read from a cell: (status, time in it — a point of LEAD_DWELL_GRID_S —, local hour of
    the week). Each delivery behind a status adds, for every grid point its box reached in it, how
    long the delivery still took from that moment, to the cell of that moment's hour."""

    def __init__(self, config: ScheduleConfig, *, learn: bool = True) -> None:
        self._config = config
        self.learning = learn
        self.tracked = 0  # boxes being tracked, as the driver last counted them
        self._zone = zoneinfo.ZoneInfo(config.timezone)
        self._cells: dict[tuple[str, int, int], LatestSamples] = {}
        self._holds: dict[tuple[str, int, int], float | None] = {}  # computed from a cell, until it changes
        self._last_exit: dict[str, float] = {}  # status → the latest partner time a box left it
        self._quiet_from: dict[str, float] = {}  # status → since when no box has been seen leaving it
        self._checks_since_exit: dict[str, int] = {}
        self._followers: dict[str, set[str]] = {}  # status → the statuses seen to follow it
        self._first_statuses: collections.Counter[str] = collections.Counter()  # what histories start with
        self._entry_leads: dict[str, LatestSamples] = {}  # status → entered it … delivered
        self._mile_leads: dict[str, float] | None = None  # from the two above, until they change

    def hour_of_week(self, at: float) -> int:
        local = dt.datetime.fromtimestamp(at, self._zone)
        return local.weekday() * 24 + local.hour

    # ── deciding ───────────────────────────────────────────────────────────────────────────

    def next_check(self, shipment_number: str, status: str, entered_at: float | None, now: float) -> float:
        if not self.learning:
            return now + jittered(self._config.track_every_s)
        within = self._config.detect_within_s
        dwell = max(0.0, now - entered_at) if entered_at is not None else 0.0
        point = bisect.bisect_right(LEAD_DWELL_GRID_S, dwell) - 1
        past_point = dwell - LEAD_DWELL_GRID_S[point]
        hold = max(0.0, (self._hold((status, point, self.hour_of_week(now))) or 0.0) - past_point,
                   self._last_mile_lead(status))
        interval = within + min(hold, QUIET_CAP_S)
        if not self.is_sentinel(shipment_number):  # a sentinel keeps the cadence while quiet
            # the fleet's quiet is no reason to wait for a box that is on its last mile itself
            last_mile = PickupStatus.DELIVERED in self._followers.get(status, ())
            fleet = 0.0 if last_mile else self._quiet_for(ANY_STATUS, now)
            interval = max(interval, self._quiet_for(status, now), fleet)
        return now + jittered(interval, CHECK_JITTER)

    def is_sentinel(self, shipment_number: str) -> bool:
        """One box in SENTINEL_EVERY, or as many more as make SENTINELS_AT_LEAST of those tracked:
        the quiet ends when a sentinel sees a delivery, and the share of deliveries before that is
        about one in the number of sentinels."""
        share = max(1 / SENTINEL_EVERY, SENTINELS_AT_LEAST / max(1, self.tracked))
        return zlib.crc32(shipment_number.encode()) % 10_000 < share * 10_000

    def _last_mile_lead(self, status: str) -> float:
        """However a box moves on from `status`, it is delivered only from a last-mile status (one a
        delivery has been seen to follow), and never sooner after entering the first one on its way
        than the boxes before it took (their LEAD_RISK quantile). Of the first last-mile statuses
        on the ways seen from `status`, the shortest such lead; 0 when `status` is one itself, or
        when one on the way has too few deliveries behind it."""
        if self._mile_leads is None:
            self._mile_leads = self._compute_mile_leads()
        return self._mile_leads.get(status, 0.0)

    def _compute_mile_leads(self) -> dict[str, float]:
        last_mile = {s for s, followers in self._followers.items() if PickupStatus.DELIVERED in followers}
        entry_leads: dict[str, float] = {}
        for status in last_mile:
            samples = self._entry_leads.get(status)
            entry_leads[status] = (samples.quantile(LEAD_RISK) if samples else None) or 0.0
        leads: dict[str, float] = {}
        for status in self._followers.keys() - last_mile:
            first_miles, seen, frontier = set(), {status}, [status]
            while frontier:  # the ways on from `status`, each as far as its first last-mile status
                for follower in self._followers.get(frontier.pop(), ()):
                    if follower in last_mile:
                        first_miles.add(follower)
                    elif follower not in seen:
                        seen.add(follower)
                        frontier.append(follower)
            if first_miles:
                leads[status] = min(entry_leads[s] for s in first_miles)
        return leads

    def first_check_in(self) -> float:
        """How long after collection a new box is first asked (±50%, so a burst does not land at
        once): track_every_s, or — once deliveries have taught it — the cadence plus the lead of
        the status boxes are first seen in: nothing can have come near delivery sooner."""
        if not self.learning or not self._first_statuses:
            return self._config.track_every_s
        first = self._first_statuses.most_common(1)[0][0]
        return max(self._config.track_every_s, self._config.detect_within_s + self._last_mile_lead(first))

    def _hold(self, key: tuple[str, int, int]) -> float | None:
        if key not in self._holds:
            cell = self._cells.get(key)
            self._holds[key] = cell.quantile(LEAD_RISK) if cell else None
        return self._holds[key]

    def _quiet_for(self, status: str, now: float) -> float:
        if self._checks_since_exit.get(status, 0) < QUIET_MIN_CHECKS:
            return 0.0
        quiet = now - max(self._last_exit.get(status, -math.inf), self._quiet_from.get(status, now))
        return min(QUIET_CAP_S, QUIET_GROWTH * quiet) if quiet >= 2 * self._config.detect_within_s else 0.0

    # ── learning ───────────────────────────────────────────────────────────────────────────

    def learn(self, history: Sequence[StatusChange], now: float) -> list[str]:
        """Take in one answer's whole history (oldest first). Returns the statuses it woke: quiet
        ones a box has just been seen leaving, whose boxes should all be asked again soon."""
        if not self.learning or not history:
            return []
        woken = []
        for left, entered in zip(history, history[1:]):
            if entered.status == PickupStatus.CANCELLED:
                continue  # a withdrawal is no sign the couriers are at work, and needs no haste
            followers = self._followers.setdefault(left.status, set())
            if entered.status not in followers:
                followers.add(entered.status)
                self._mile_leads = None
            last = self._last_exit.get(left.status)
            if last is not None and entered.at <= last:
                continue
            if self._quiet_for(left.status, now) > 0:
                woken.append(left.status)
            self._last_exit[left.status] = entered.at
            self._checks_since_exit[left.status] = 0
        current = history[-1].status
        # ANY_STATUS stands for the fleet: it is quiet while no box comes near delivery — none is
        # delivered, none enters a last-mile status. A status never seen before is no such sign by
        # itself (the first morning's `assigned` is not): if it leads to deliveries, the sentinels
        # see the first of them.
        near = [entry.at for entry in history if entry.status != PickupStatus.CANCELLED and (
                entry.status == PickupStatus.DELIVERED
                or PickupStatus.DELIVERED in self._followers.get(entry.status, ()))]
        if near and max(near) > self._last_exit.get(ANY_STATUS, -math.inf):
            if self._quiet_for(ANY_STATUS, now) > 0:
                woken.append(ANY_STATUS)
            self._last_exit[ANY_STATUS] = max(near)
            self._checks_since_exit[ANY_STATUS] = 0
        for counted in (current, ANY_STATUS):
            self._quiet_from.setdefault(counted, now)
            self._checks_since_exit[counted] = self._checks_since_exit.get(counted, 0) + 1
        if current in (PickupStatus.DELIVERED, PickupStatus.CANCELLED):
            self._learn_leads(history)
        return woken

    def restore(self, histories: Iterable[Sequence[StatusChange]]) -> None:
        """At start: what the boxes closed lately showed (their recorded histories)."""
        for history in histories:
            for left, entered in zip(history, history[1:]):
                if entered.status != PickupStatus.CANCELLED:
                    self._last_exit[left.status] = max(self._last_exit.get(left.status, -math.inf), entered.at)
                    self._followers.setdefault(left.status, set()).add(entered.status)
            if history and history[-1].status in (PickupStatus.DELIVERED, PickupStatus.CANCELLED):
                self._learn_leads(history)

    def _learn_leads(self, history: Sequence[StatusChange]) -> None:
        self._first_statuses[history[0].status] += 1
        delivered_at = history[-1].at if history[-1].status == PickupStatus.DELIVERED else math.inf
        if delivered_at < math.inf:
            for entry in history[:-1]:
                leads = self._entry_leads.get(entry.status)
                if leads is None:
                    leads = self._entry_leads[entry.status] = LatestSamples(LEAD_CELL_SAMPLES * 10)
                leads.add(entry.at, delivered_at - entry.at)
            self._mile_leads = None
        for entry, following in zip(history, history[1:]):
            for point, dwell in enumerate(LEAD_DWELL_GRID_S):
                if dwell > following.at - entry.at:
                    break
                moment = entry.at + dwell
                key = (entry.status, point, self.hour_of_week(moment))
                cell = self._cells.get(key)
                if cell is None:
                    cell = self._cells[key] = LatestSamples(LEAD_CELL_SAMPLES)
                cell.add(moment, delivered_at - moment)
                self._holds.pop(key, None)


# ════════════════════════════════════════════════════════════════════════════════════════════
# The stages — collect (feed → returns and boxes), track (box → terminal status), report
# (outbox → partner). What an answer means is a pure function (decide_*); the stage commits it
# through the Committer, the only writer, before anything acts on it; a Dispatcher runs each
# stage's due items, a bounded number at a time. All of them stop on the daemon's one StopSignal.
# ════════════════════════════════════════════════════════════════════════════════════════════


NOT_FOUND_GROWTH_CAP = 16  # a 404'd box is re-asked at most every 16 × track_every_s


def decide_box_update(box: DueBox, reply: Reply, now: float, schedule: ScheduleConfig,
                      tracking: TrackingSchedule | None = None) -> BoxUpdate:
    """What one tracking answer means for a box. Pure but for what `tracking` has learned: no I/O,
    no clock but `now`. Without `tracking`, the fixed cadence."""
    if reply.outcome is Outcome.OK:
        try:
            status, updated_at = parse_tracking(reply.body, box.shipment_number)
        except GarbledAnswer as exc:
            return _box_retry(box, now, schedule, reply, f"garbled: {exc}")
        history = parse_history(reply.body, box.status_since)
        if status == PickupStatus.DELIVERED:
            return BoxUpdate(shipment_number=box.shipment_number, state=BoxState.DELIVERED, next_check_at=None,
                             not_found=0, errors=0, registered=True, last_status=status, delivered_at=updated_at,
                             history=history)
        if status == PickupStatus.CANCELLED:
            return BoxUpdate(shipment_number=box.shipment_number, state=BoxState.CANCELLED, next_check_at=None,
                             not_found=0, errors=0, registered=True, last_status=status, history=history)
        next_check = (tracking.next_check(box.shipment_number, status, unix_seconds(updated_at), now) if tracking
                      else now + jittered(schedule.track_every_s))
        return BoxUpdate(
            shipment_number=box.shipment_number, state=BoxState.TRACKING, next_check_at=next_check, not_found=0,
            errors=0, registered=True, last_status=status,
            unknown_status=None if status in KNOWN_STATUSES else status, history=history,
        )
    if reply.outcome is Outcome.DEFERRED:
        delay = retry_delay(box.errors, schedule.retry_base_s, schedule.retry_max_s, None)
        return BoxUpdate(shipment_number=box.shipment_number, state=BoxState.TRACKING, next_check_at=now + delay,
                         not_found=box.not_found, errors=box.errors, registered=False,
                         called=False)
    if reply.outcome is Outcome.NOT_FOUND:
        not_found = box.not_found + 1
        stale_at = box.first_seen_at + schedule.stale_after_s
        if now >= stale_at:
            return BoxUpdate(shipment_number=box.shipment_number, state=BoxState.STALE, next_check_at=None,
                             not_found=not_found, errors=0, registered=False,
                             last_error="unknown to the carrier")
        growth = min(2 ** (not_found - 1), NOT_FOUND_GROWTH_CAP)
        next_check = min(now + jittered(schedule.track_every_s * growth), stale_at)
        return BoxUpdate(shipment_number=box.shipment_number, state=BoxState.TRACKING, next_check_at=next_check,
                         not_found=not_found, errors=0, registered=False)
    return _box_retry(box, now, schedule, reply, reply.detail or reply.outcome.value)


def _box_retry(box: DueBox, now: float, schedule: ScheduleConfig, reply: Reply, error: str) -> BoxUpdate:
    errors = box.errors + 1
    # A 401 needs no longer delay here: the endpoint's token gate holds the call until its trial,
    # and lets it go the moment a new token works.
    delay = retry_delay(errors, schedule.retry_base_s, schedule.retry_max_s, reply.retry_after)
    return BoxUpdate(shipment_number=box.shipment_number, state=BoxState.TRACKING, next_check_at=now + delay,
                     not_found=box.not_found, errors=errors, registered=False,
                     last_error=f"{reply.outcome.value}: {error}"[:500])


def decide_report_update(report: DueReport, reply: Reply, now: float, schedule: ScheduleConfig) -> ReportUpdate:
    """What one results answer means for a report. 200/409 settle it, 422 kills it, the rest retry."""
    sent: dict[str, Any] = {"revision": report.revision, "attempt": report.attempts + 1, "http_status": reply.status,
            "latency_s": round(reply.latency_s, 4)}
    if reply.outcome is Outcome.OK and reply.body == {"data": {"result": True}}:
        return ReportUpdate(return_id=report.return_id, state=ReportState.DONE, next_attempt_at=None,
                            outcome="recorded", last_error=None, **sent)
    if reply.outcome is Outcome.CONFLICT:
        return ReportUpdate(return_id=report.return_id, state=ReportState.DONE, next_attempt_at=None,
                            outcome="duplicate", last_error=None, **sent)
    if reply.outcome is Outcome.REFUSED:
        return ReportUpdate(return_id=report.return_id, state=ReportState.DEAD, next_attempt_at=None,
                            outcome="refused", last_error=reply.detail[:500],
                            **sent)
    if reply.outcome is Outcome.DEFERRED:
        delay = retry_delay(report.attempts, schedule.retry_base_s, schedule.retry_max_s, None)
        return ReportUpdate(return_id=report.return_id, state=ReportState.PENDING, next_attempt_at=now + delay,
                            outcome=None, last_error=None, called=False,
                            revision=report.revision)
    # Anything else leaves the outcome unknown or failed: send the same report again later.
    error = reply.detail or reply.outcome.value
    if reply.outcome is Outcome.OK:
        error = "200 without {data: {result: true}}"
    delay = retry_delay(report.attempts + 1, schedule.retry_base_s, schedule.retry_max_s, reply.retry_after)
    return ReportUpdate(return_id=report.return_id, state=ReportState.PENDING, next_attempt_at=now + delay,
                        outcome=None,
                        last_error=f"{reply.outcome.value}: {error}"[:500], **sent)


COMMIT_BATCH_MAX = 1000
COMMIT_GATHER_S = 0.02  # a call waits at most this long for its transition's transaction to begin
STORAGE_SETTLE_S = 15.0  # after a failed commit, the database counts as unwritable this long


class StopSignal:
    """The daemon's one way to stop. Set once; the stages' loops check `is_set()`, and each wait
    that must end at once on it is an event the signal sets too (`waking`)."""

    def __init__(self) -> None:
        self._stopped = asyncio.Event()
        self._wakes: list[asyncio.Event] = []

    def is_set(self) -> bool:
        return self._stopped.is_set()

    def set(self) -> None:
        self._stopped.set()
        for event in self._wakes:
            event.set()

    async def wait(self) -> None:
        await self._stopped.wait()

    def waking(self, event: asyncio.Event) -> asyncio.Event:
        """`event`, which the signal sets too when it is set."""
        self._wakes.append(event)
        if self.is_set():
            event.set()
        return event


class StorageUnavailable(Exception):
    """The last commit failed (disk full, read-only, I/O error). Nothing was changed."""


UNGATHERED = (FeedPage, CheckNow, Audit, Idempotent)  # committed without waiting for company


class Committer:
    """The only writer. Transitions that finish together are committed in one transaction; a
    stage's `submit` returns only once its transition is durable."""

    def __init__(self, store: StateStore, on_committed: Callable[[CommitResult], None],
                 on_failure: Callable[[Exception], None], log: Logger, latency: Any = None,
                 gather_s: float = COMMIT_GATHER_S) -> None:
        self._store = store
        self._latency = latency
        self._gather_s = gather_s
        self._on_committed = on_committed
        self._on_failure = on_failure
        self._log = log
        self._queue: asyncio.Queue[tuple[Transition, asyncio.Future[CommitResult]] | None] = asyncio.Queue()
        self._failures = 0
        self._last_failure_at = -math.inf

    @property
    def healthy(self) -> bool:
        """No failed commit for a while. Not just "the last commit worked": on a full disk a
        write into existing pages can succeed between failing ones, and readiness must not flap."""
        return time.monotonic() - self._last_failure_at > STORAGE_SETTLE_S

    @property
    def queued(self) -> int:
        """Transitions handed in and not yet taken into a transaction."""
        return self._queue.qsize()

    async def submit(self, transition: Transition) -> CommitResult:
        """What the transaction that made it durable did (shared with the rest of its batch)."""
        future: asyncio.Future[CommitResult] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((transition, future))
        return await future

    async def probe(self) -> bool:
        """Whether the database takes a write now."""
        try:
            await self.submit(Heartbeat())
        except StorageUnavailable:
            return False
        return True

    def close(self) -> None:
        self._queue.put_nowait(None)

    async def run(self) -> None:
        closing = False
        while not closing:
            first = await self._queue.get()
            if first is None:
                return
            if self._queue.qsize() < COMMIT_BATCH_MAX and not isinstance(first[0], UNGATHERED):
                # Calls finishing within the gather window of each other share one transaction: a
                # commit costs about the same for one transition as for a hundred (WAL pages, a
                # round trip to the writer thread), and a partner call takes 20 ms or more anyway.
                # A feed page is a batch by itself, and the feed reads its next page only after
                # this one is stored: waiting would slow a catch-up by the window per page. The
                # API's writes have a caller waiting on the other end of a request: neither waits.
                await asyncio.sleep(self._gather_s)
            batch = [first]
            while len(batch) < COMMIT_BATCH_MAX and not self._queue.empty():
                entry = self._queue.get_nowait()
                if entry is None:
                    closing = True
                    break
                batch.append(entry)
            await self._commit(batch)

    async def _commit(self, batch: list[tuple[Transition, asyncio.Future[CommitResult]]]) -> None:
        started = time.monotonic()
        try:
            result = await self._store.commit([t for t, _ in batch], time.time())
        except STORAGE_ERRORS as exc:
            self._failures += 1
            self._last_failure_at = time.monotonic()
            self._log.error("storage.commit_failed", error=str(exc), transitions=len(batch))
            self._on_failure(exc)
            for _, future in batch:
                if not future.done():
                    future.set_exception(StorageUnavailable(str(exc)))
            # Give the disk a moment instead of failing every queued transition at full speed.
            await asyncio.sleep(min(30.0, 0.5 * 2 ** min(self._failures, 6)))
            return
        if self._latency is not None:
            self._latency.observe(time.monotonic() - started)
        if self._failures:
            self._log.info("storage.recovered")
        self._failures = 0
        self._log.debug("storage.committed", transitions=len(batch), latency_s=round(time.monotonic() - started, 4))
        for _, future in batch:
            if not future.done():
                future.set_result(result)
        self._on_committed(result)


Item = typing.TypeVar("Item")


class Dispatcher(typing.Generic[Item]):
    """Runs `handle` for every due item, at most `capacity` at a time and each item at most once
    at a time (an item stays in flight until its transition is committed).

    Due items are fetched a few batches ahead and started from memory as slots free up: one
    query per PREFETCH × capacity items, not one per finished call. What is in memory stays
    valid — only this dispatcher acts on a due item, and nothing it holds is in flight."""

    IDLE_POLL_S = 1.0
    MIN_TICK_S = 0.05
    PREFETCH = 4

    def __init__(
        self,
        name: str,
        fetch_due: Callable[[float, int], Awaitable[list[Item]]],
        next_due_at: Callable[[], Awaitable[float | None]],
        key: Callable[[Item], str],
        handle: Callable[[Item], Awaitable[None]],
        capacity: int,
        log: Logger,
        may_start: Callable[[str], bool] = lambda key: True,
        fetch_at_most: Callable[[], int | None] = lambda: None,
        stop: "StopSignal | None" = None,
    ) -> None:
        self.name = name
        self._may_start = may_start
        self._fetch_at_most = fetch_at_most
        self._fetch_due = fetch_due
        self._next_due_at = next_due_at
        self._key = key
        self._handle = handle
        self._capacity = capacity
        self._log = log
        self._stop = stop or StopSignal()
        self._nudge = self._stop.waking(asyncio.Event())
        self.in_flight: dict[str, asyncio.Task[None]] = {}
        self._ready: collections.deque[Item] = collections.deque()
        self._settled_during_fetch: set[str] | None = None

    def wake(self) -> None:
        self._nudge.set()

    def held(self) -> list[str]:
        """The items fetched and not yet finished: in flight or waiting for a slot."""
        return [*self.in_flight, *(self._key(item) for item in self._ready)]

    def forget(self, keys: Iterable[str]) -> None:
        """Drop these items from what was fetched ahead: they changed in the database (a
        correction) and are fetched again as they are now. One in flight finishes as it started."""
        keys = set(keys)
        if self._settled_during_fetch is not None:  # a fetch running now may still hold the old rows
            self._settled_during_fetch |= keys
        if self._ready:
            self._ready = collections.deque(item for item in self._ready if self._key(item) not in keys)

    async def run(self, *, once: bool = False, grace_s: float = 5.0) -> None:
        pass_time = time.time()  # in `once`, only what was due when the pass started
        async with asyncio.TaskGroup() as tasks:
            while not self._stop.is_set():
                self._nudge.clear()
                started = await self._dispatch(tasks, pass_time if once else time.time())
                if once and not started and not self.in_flight:
                    break
                if started and len(self.in_flight) < self._capacity:
                    continue
                await self._idle(once)
            self._ready.clear()
            await self._drain(grace_s)

    async def _dispatch(self, tasks: asyncio.TaskGroup, now: float) -> int:
        free = self._capacity - len(self.in_flight)
        if free <= 0:
            return 0
        if not self._ready:
            await self._fetch_ahead(now)
        started = 0
        while self._ready and started < free:
            item = self._ready.popleft()
            key = self._key(item)
            if not self._may_start(key):
                # Its claim may lapse before a call could end (the database has not answered for
                # a while): another instance may take it, so it is left to whoever claims it next.
                continue
            self.in_flight[key] = tasks.create_task(self._run_one(key, item))
            started += 1
        return started

    async def _fetch_ahead(self, now: float) -> None:
        # An item that settles while the query runs may still look due in the query's snapshot.
        self._settled_during_fetch = set()
        try:
            ahead = self._capacity * self.PREFETCH
            due = await self._fetch_due(now, min(ahead, self._fetch_at_most() or ahead) + len(self.in_flight))
        except STORAGE_ERRORS as exc:  # a database restarting, a connection cut: the idle poll tries again
            self._log.warning("storage.read_failed", stage=self.name, error=str(exc))
            due = []
        busy = self.in_flight.keys() | self._settled_during_fetch
        self._settled_during_fetch = None
        self._ready.extend(item for item in due if self._key(item) not in busy)

    async def _run_one(self, key: str, item: Item) -> None:
        try:
            await self._handle(item)
        except StorageUnavailable:
            pass  # nothing changed in the database; the item is due again and will be retried
        finally:
            slot_was_the_limit = len(self.in_flight) >= self._capacity
            del self.in_flight[key]
            if self._settled_during_fetch is not None:
                self._settled_during_fetch.add(key)
            # Wake the loop only when the freed slot can be used: otherwise nothing new is due
            # and the timer finds what becomes due (a query per finished call would not).
            if slot_was_the_limit or self._ready or not self.in_flight:
                self._nudge.set()

    async def _idle(self, once: bool) -> None:
        timeout = self.IDLE_POLL_S
        if not once and len(self.in_flight) < self._capacity:
            try:
                next_due = await self._next_due_at()
            except STORAGE_ERRORS as exc:
                self._log.warning("storage.read_failed", stage=self.name, error=str(exc))
                next_due = None
            if next_due is not None:  # items coming due close together are started together
                timeout = min(timeout, max(self.MIN_TICK_S, next_due - time.time()))
        try:
            async with asyncio.timeout(timeout):
                await self._nudge.wait()
        except TimeoutError:
            pass

    async def _drain(self, grace_s: float) -> None:
        """Let calls in flight finish and commit for a grace period, then cancel the rest: what did
        not finish stays pending in the database and is done after the restart."""
        if not self.in_flight:
            return
        _, pending = await asyncio.wait(list(self.in_flight.values()), timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            self._log.info("shutdown.cancelled_in_flight", stage=self.name, calls=len(pending))


class Stages:
    """The three stages over one store, client, committer and alerter."""

    def __init__(self, config: Config, store: StateStore, client: PartnerClient, committer: Committer,
                 alerts: "Alerter", metrics: "Metrics", log: Logger, stop: "StopSignal") -> None:
        self.config = config
        self.store = store
        self.client = client
        self.committer = committer
        self.alerts = alerts
        self.metrics = metrics
        self.log = log
        self._stop = stop
        self._feed_nudge = stop.waking(asyncio.Event())
        self._boxes_closed = {state: metrics.boxes_closed.labels(state.value)
                              for state in (BoxState.DELIVERED, BoxState.CANCELLED, BoxState.STALE)}
        self.schedule = TrackingSchedule(config.schedule)
        self._report_attempts = {outcome: metrics.reports.labels(outcome)
                                 for outcome in ("recorded", "duplicate", "refused", "retry", "deferred")}
        # An item is under way from its fetch until its transition is committed; only its call
        # takes one of the client's limits.concurrency slots. Under a burst a commit takes as long
        # as a call: with no more items under way than slots, the slots stood idle half the time.
        capacity = 2 * config.limits.concurrency
        # With several instances (PostgreSQL) an item is started only while its claim outlasts the
        # longest call, and an instance claims only what its share of the rate calls in a couple of
        # seconds: claiming a whole backlog ahead would leave the others idle while it works through it.
        self.tracker = Dispatcher[DueBox](
            "track", store.due_boxes, store.next_box_due_at, lambda b: b.shipment_number, self.check_box,
            capacity, log, functools.partial(store.fleet.claim_holds, "boxes", config.partner.timeout_s),
            functools.partial(self._claim_at_most, Endpoint.TRACKING), stop,
        )
        self.reporter = Dispatcher[DueReport](
            "report", store.due_reports, store.next_report_due_at, lambda r: r.return_id, self.send_report,
            capacity, log, functools.partial(store.fleet.claim_holds, "reports", config.partner.timeout_s),
            functools.partial(self._claim_at_most, Endpoint.RESULTS), stop,
        )

    async def one_pass(self, grace_s: float) -> None:
        """`tracker.py once`: each stage once over what is due now, in order."""
        await self.collect(once=True)
        await self.tracker.run(once=True, grace_s=grace_s)
        await self.reporter.run(once=True, grace_s=grace_s)

    async def _pause(self, seconds: float) -> None:
        """The feed loop's wait: ended early by shutdown or by `wake_feed` (a new token)."""
        if self._stop.is_set():
            return
        self._feed_nudge.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._feed_nudge.wait()

    def wake_feed(self) -> None:
        self._feed_nudge.set()

    # ── collect ─────────────────────────────────────────────────────────────────────────────

    async def collect(self, *, once: bool = False) -> None:
        """Page through the feed from the stored cursor; each page commits with its cursor. With
        several instances (PostgreSQL) only the holder of the feed's lease pages it, each page
        stored only under the lease's epoch it was read under; an instance that takes the lease
        reads the cursor again, since the previous holder moved it."""
        schedule = self.config.schedule
        epoch: int | None = None
        cursor: str | None = None
        failures = 0
        while not self._stop.is_set():
            leading = await self._lead_feed()
            if leading is None:  # another instance pages the feed; take over if its lease runs out
                epoch = None
                if once:
                    return
                await self._pause(min(schedule.returns_every_s, self.config.storage.lease_s / 4))
                continue
            if leading != epoch:
                read, cursor = await self._stored_cursor()
                if not read:
                    return  # stopped while the database could not be read
                epoch = leading
            reply = await self.client.returns_page(cursor, self.config.partner.page_size, retry=failures > 0)
            page, error = None, reply.detail or reply.outcome.value
            if reply.outcome is Outcome.OK:
                try:
                    page = dataclasses.replace(
                        parse_returns_page(reply.body, cursor, time.time(), self.schedule.first_check_in()),
                        epoch=epoch)
                except GarbledAnswer as exc:
                    error = f"garbled page: {exc}"
            if page is None:
                if reply.outcome is not Outcome.DEFERRED:
                    failures += 1
                    self._partner_failed(Endpoint.RETURNS, reply, error)
                if once:
                    return
                delay = retry_delay(failures, schedule.retry_base_s, schedule.retry_max_s, reply.retry_after)
                await self._pause(delay)  # after a 401 the token gate paces the next call
                continue
            failures = 0
            try:
                result = await self.committer.submit(page)
            except StorageUnavailable:
                await self._pause(schedule.retry_base_s)
                continue
            if result.cursor_moved is not None:
                self._cursor_moved(cursor, result.cursor_moved)
                epoch = None  # read the stored cursor again, and the feed from there
                continue
            self._page_committed(page, reply, result)
            if page.first_checks:
                self.tracker.wake()  # its idle wait knew nothing of these boxes' first checks
            cursor = page.next_cursor or cursor
            if page.has_more:
                continue
            if once:
                return
            await self._pause(schedule.returns_every_s)

    CLAIM_AHEAD_S = 2.0

    def _claim_at_most(self, endpoint: Endpoint) -> int | None:
        if self.client.fleet_size == 1:
            return None  # alone: fetch ahead as far as the dispatcher likes
        return max(8, math.ceil(self.client.rates[endpoint].rate * self.CLAIM_AHEAD_S))

    def _claim_lost(self, stage: str, key: str) -> None:
        """An answer made under a claim that ran out (this instance could not renew it in time):
        another instance holds the item now, and its answer is the one stored."""
        self.metrics.claims_lost.labels(stage).inc()
        self.log.warning("storage.claim_lost", stage=stage, key=key)

    async def _lead_feed(self) -> int | None:
        try:
            return await self.store.fleet.lead_feed()
        except STORAGE_ERRORS as exc:
            self.log.warning("storage.read_failed", stage="collect", error=str(exc))
            return None

    async def _stored_cursor(self) -> tuple[bool, str | None]:
        """(True, the feed's stored cursor), read again until the database answers; (False, None)
        when stopped first."""
        failures = 0
        while not self._stop.is_set():
            try:
                return True, await self.store.feed_cursor()
            except STORAGE_ERRORS as exc:
                failures += 1
                self.log.warning("storage.read_failed", stage="collect", error=str(exc))
                await self._pause(retry_delay(failures, self.config.schedule.retry_base_s,
                                              self.config.schedule.retry_max_s, None))
        return False, None

    def _cursor_moved(self, read_from: str | None, stored: str) -> None:
        """The database no longer holds the cursor this loop paged from: it lost its latest commits
        (returns with them), or a commit this loop saw fail was made. The feed is read again from
        the stored cursor; what was already stored is merged as any relisting is."""
        self.metrics.feed_rewound.inc()
        self.log.warning("collect.cursor_moved", read_from=read_from, stored=stored or None)

    def _page_committed(self, page: FeedPage, reply: Reply, result: CommitResult) -> None:
        self.metrics.feed_last_success.set(time.time())
        self.log.info("collect.page", items=len(page.items), quarantined=len(page.quarantined),
                      corrected=len(result.corrections), has_more=page.has_more, latency_s=round(reply.latency_s, 4))
        for q in page.quarantined:
            self.log.warning("collect.quarantined", return_id=q.return_id, reason=q.reason,
                             correction=q.return_id in result.broken_corrections)
            if q.return_id in result.broken_corrections:
                self.alerts.alert(*broken_correction_alert(q))
            else:
                self.alerts.alert(*quarantine_alert(q))
        if result.corrections:
            self._corrections_applied(result.corrections)

    def pushed(self, page: FeedPage, result: CommitResult) -> None:
        """Returns the shop pushed through the API, committed as a feed page is."""
        self.log.info("api.pushed", items=len(page.items), new=result.returns_added, corrected=len(result.corrections))
        if result.corrections:
            self._corrections_applied(result.corrections)
        if page.first_checks:
            self.tracker.wake()

    def _corrections_applied(self, corrections: Sequence[Correction]) -> None:
        self.reporter.forget(c.return_id for c in corrections)  # fetched ahead with the old fields
        self.tracker.forget(c.before.shipment_number for c in corrections if c.moved)  # maybe emptied
        for c in corrections:
            report = c.report_state.value if c.report_state else None
            self.log.info("collect.corrected", return_id=c.return_id, fields=list(c.fields),
                          before={f: getattr(c.before, f) for f in c.fields},
                          after={f: getattr(c.after, f) for f in c.fields}, report=report)
            if c.report_state is ReportState.DONE and c.changes_report:
                self.alerts.alert(*corrected_after_report_alert(c))

    # ── track ───────────────────────────────────────────────────────────────────────────────

    async def check_box(self, box: DueBox) -> None:
        reply = await self.client.tracking(box.shipment_number, retry=box.errors > 0)
        now = time.time()
        history = answered_history(reply, box.shipment_number)
        woken = self.schedule.learn(history, now) if history else []  # first: this answer counts for this box too
        update = decide_box_update(box, reply, now, self.config.schedule, self.schedule)
        if box.claim is not None:  # PostgreSQL: the answer is stored only under the claim it was made under
            update = dataclasses.replace(update, claim=box.claim)
        if box.shipment_number in (await self.committer.submit(update)).lost_claims:
            self._claim_lost("track", box.shipment_number)
            return
        self.log.info("track.checked", shipment_number=box.shipment_number, outcome=reply.outcome.value,
                      status=update.last_status, state=update.state.value, next_check_at=update.next_check_at,
                      latency_s=round(reply.latency_s, 4))
        if update.state is not BoxState.TRACKING:
            self._boxes_closed[update.state].inc()
            self.metrics.box_checks.observe(box.checks + 1)
        if update.state is BoxState.DELIVERED and (delivered_at := unix_seconds(update.delivered_at)) is not None:
            self.metrics.detect_delay.observe(max(0.0, now - delivered_at))
        await self._wake(woken)
        if update.state is BoxState.STALE:
            self.alerts.alert(*stale_alert(box.shipment_number, self.config.schedule.stale_after_s))
        if update.unknown_status:
            self.metrics.unknown_statuses.inc()
            self.log.warning("track.unknown_status", shipment_number=box.shipment_number,
                             status=update.unknown_status)
            self.alerts.alert(*unknown_status_alert(update.unknown_status, box.shipment_number))
        if reply.outcome not in (Outcome.OK, Outcome.NOT_FOUND, Outcome.DEFERRED):
            self._partner_failed(Endpoint.TRACKING, reply, update.last_error or "")
        elif update.last_error and update.state is BoxState.TRACKING:
            self.log.warning("track.garbled", shipment_number=box.shipment_number, error=update.last_error)

    async def _wake(self, woken: Sequence[str]) -> None:
        for status in woken:
            spread = self.config.schedule.detect_within_s
            self.log.info("track.woken", status=status, within_s=spread)
            await self.committer.submit(WakeBoxes(status=status, spread_s=spread))
            self.tracker.wake()

    # ── report ──────────────────────────────────────────────────────────────────────────────

    async def send_report(self, report: DueReport) -> None:
        reply = await self.client.post_result(report)
        update = decide_report_update(report, reply, time.time(), self.config.schedule)
        if report.claim is not None:
            update = dataclasses.replace(update, claim=report.claim)
        result = await self.committer.submit(update)
        if report.return_id in result.lost_claims:
            self._claim_lost("report", report.return_id)  # the partner's 409 settles the other's send
            return
        superseded = report.return_id in result.superseded
        if superseded and update.state is ReportState.DEAD:
            # The partner refused the fields a correction has since replaced: the corrected report
            # is still pending and goes next.
            update = dataclasses.replace(update, state=ReportState.PENDING, outcome=None)
        outcome = update.outcome or ("deferred" if not update.called else "retry")
        self._report_attempts[outcome].inc()
        if update.state is ReportState.DONE and report.queued_at:
            self.metrics.report_delay.observe(max(0.0, time.time() - report.queued_at))
        self.log.info("report.sent", return_id=report.return_id, shipment_number=report.shipment_number,
                      outcome=outcome, attempt=report.attempts + 1, latency_s=round(reply.latency_s, 4),
                      error=update.last_error)
        if update.state is ReportState.DONE and superseded:
            self.alerts.alert(*recorded_before_correction_alert(report))
        elif update.outcome == "duplicate" and report.sent_before_correction:
            self.alerts.alert(*duplicate_of_uncorrected_alert(report))
        if update.state is ReportState.DEAD:
            self.alerts.alert(*dead_report_alert(report, reply.detail))
        elif update.state is ReportState.PENDING and reply.outcome not in (Outcome.OK, Outcome.DEFERRED):
            self._partner_failed(Endpoint.RESULTS, reply, update.last_error or "")

    # ── shared ──────────────────────────────────────────────────────────────────────────────

    def _partner_failed(self, endpoint: Endpoint, reply: Reply, error: str) -> None:
        self.log.warning("partner.call_failed", endpoint=endpoint.value, outcome=reply.outcome.value,
                         status=reply.status, error=error, latency_s=round(reply.latency_s, 4))


# ════════════════════════════════════════════════════════════════════════════════════════════
# Alerts — Slack incoming webhook. `alert` never blocks and never fails: it folds repeats of
# the same key into the pending message, drops past a bound, and one task posts at Slack's pace.
# A broken or slow webhook costs tracking nothing.
# ════════════════════════════════════════════════════════════════════════════════════════════


def _human_duration(seconds: float) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            return _amount(seconds / size, unit)
    return f"{_amount(seconds, '')}s"


def _amount(value: float, unit: str) -> str:
    number = f"{value:.0f}" if value >= 10 else f"{value:.1f}".rstrip("0").rstrip(".")
    return f"{number} {unit}{'' if number == '1' else 's'}" if unit else f"{number} "


# ── what each alert says ────────────────────────────────────────────────────────────────────
# An alert is a key (repeats of one key within a minute fold into one message) and its text.


class Alert(typing.NamedTuple):
    key: str
    text: str


def quarantine_alert(q: QuarantinedItem) -> Alert:
    return Alert("quarantine", f"Return {q.return_id or '(no id)'} was set aside: {q.reason}. "
                               "See `tracker.py status` for the raw item.")


def broken_correction_alert(q: QuarantinedItem) -> Alert:
    return Alert("broken_correction", f"A correction of return {q.return_id} was set aside: {q.reason}. The stored "
                                      "version is kept and used. See `tracker.py status` for the raw item.")


def corrected_after_report_alert(c: Correction) -> Alert:
    return _held_by_the_partner(c.return_id, f"Return {c.return_id} was corrected after the partner recorded its "
                                             f"report: {c.describe()}. The partner holds the old fields and the "
                                             "report is not sent again.")


def recorded_before_correction_alert(report: DueReport) -> Alert:
    return _held_by_the_partner(report.return_id,
                                f"The partner recorded return {report.return_id} as order {report.order_number} "
                                f"item {report.order_item_number}, box {report.shipment_number}: a report sent just "
                                "before a correction of those fields arrived. The corrected report is not sent.")


def duplicate_of_uncorrected_alert(report: DueReport) -> Alert:
    return _held_by_the_partner(report.return_id,
                                f"The partner answered 409 to the corrected report of return {report.return_id}: it "
                                "had recorded an earlier send, made before the correction, and may hold the old "
                                "fields.")


def _held_by_the_partner(return_id: str, what_happened: str) -> Alert:
    """The partner holds fields a correction has since changed: a person decides."""
    return Alert(f"corrected_after_report:{return_id}", f"{what_happened} Check with the partner and decide; "
                                                        "`tracker.py status` lists every such return.")


def stale_alert(shipment_number: str, stale_after_s: float) -> Alert:
    return Alert("stale", f"Shipment {shipment_number} is still unknown to the carrier after "
                          f"{_human_duration(stale_after_s)}; no longer tracked. Needs a person.")


def unknown_status_alert(status: str, shipment_number: str) -> Alert:
    return Alert(f"unknown_status:{status}",
                 f"The partner sent an unknown pickup status '{status}' (shipment {shipment_number}); still tracking.")


def dead_report_alert(report: DueReport, detail: str) -> Alert:
    return Alert("dead", f"The partner refused the report for return {report.return_id} "
                         f"(order {report.order_number} item {report.order_item_number}): {detail}. "
                         "It will not be resent until requeued.")


def overdue_alert(count: int, sample: Sequence[str], overdue_after_s: float, oldest_age_s: float) -> Alert:
    more = ", …" if count > len(sample) else ""
    return Alert("overdue", f"{count} pickup(s) overdue — not collected {_human_duration(overdue_after_s)} "
                            f"after the return was requested — oldest {_human_duration(oldest_age_s)}: "
                            f"{', '.join(sample)}{more}. `tracker.py status` lists them; "
                            "`tracker.py show SHIPMENT` tells one's story.")


def webhook_disabled_alert(name: str, update: DeliveryUpdate) -> Alert:
    why = "it answered 410 Gone" if update.gone else f"it has failed for over {_human_duration(update.disable_after_s)}"
    return Alert(f"webhook:{name}", f"Webhook endpoint {name} is disabled: {why} (last: {update.error}). Its events "
                                    f"are kept; once it is fixed: tracker.py webhooks enable {name}")


def overdue_cleared_alert() -> Alert:
    return Alert("overdue_cleared", "No pickup is overdue any more.")


def storage_alert(exc: Exception) -> Alert:
    return Alert("storage", f"Cannot write the state database: {exc}. Work is paused until it can.")


def circuit_open_alert(endpoint: str, why: str) -> Alert:
    return Alert(f"circuit_open:{endpoint}", f"The partner's /{endpoint} is failing ({why}). Calls to it are paused "
                                             "and probed every few seconds; work waits, nothing is lost.")


def circuit_closed_alert(endpoint: str) -> Alert:
    return Alert(f"circuit_closed:{endpoint}", f"The partner's /{endpoint} answers again; calls resumed.")


def token_refused_alert(endpoint: str) -> Alert:
    return Alert(f"unauthorized:{endpoint}",
                 f"The partner refuses our token on /{endpoint} (401). Calls to it wait; one every "
                 f"{UNAUTHORIZED_RETRY_S:g} s tries again. Replace the token, then `systemctl reload tracker` "
                 "(SIGHUP re-reads it); nothing is lost meanwhile.")


def token_accepted_alert(endpoint: str) -> Alert:
    return Alert(f"authorized:{endpoint}", f"The partner accepts our token on /{endpoint} again; calls resumed.")


# ── sending them ────────────────────────────────────────────────────────────────────────────


@dataclasses.dataclass(kw_only=True)
class _PendingAlert:
    text: str
    count: int = 1
    attempts: int = 0


class Alerter:
    MIN_INTERVAL_S = 1.0  # Slack takes about one message a second per webhook
    FOLD_WINDOW_S = 60.0  # the same key is posted at most once a minute; repeats are counted
    MAX_PENDING = 100
    MAX_ATTEMPTS = 3
    POST_TIMEOUT_S = 5.0

    def __init__(self, webhook_url: str, session: aiohttp.ClientSession | None, metrics: "Metrics",
                 log: Logger, redact: Callable[[str], str],
                 first_in_fleet: Callable[[str, float], Awaitable[bool]] | None = None) -> None:
        self._first_in_fleet = first_in_fleet  # several instances: one of them sends each alert
        self._url = webhook_url
        self._session = session
        self._metrics = metrics
        self._log = log
        self._redact = redact
        self._pending: OrderedDict[str, _PendingAlert] = OrderedDict()
        self._sent_at: dict[str, float] = {}
        self._changed = asyncio.Event()
        self._closing = False
        self._paused_until = 0.0

    def alert(self, key: str, text: str) -> None:
        text = self._redact(text)
        self._log.warning("alert.raised", key=key, text=text)
        if not self._url or self._session is None:
            self._metrics.alerts.labels("disabled").inc()
            return
        if key in self._pending:
            self._pending[key].count += 1
            self._metrics.alerts.labels("folded").inc()
            return
        if len(self._pending) >= self.MAX_PENDING:
            self._metrics.alerts.labels("dropped").inc()
            return
        self._pending[key] = _PendingAlert(text=text)
        self._changed.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        """Post what is pending now, without waiting out fold windows, then let `run` return.
        The daemon bounds how long that may take; what is not posted was already logged."""
        self._closing = True
        self._changed.set()

    async def run(self) -> None:
        while True:
            key, wait = self._next_ready()
            if key is None:
                if self._closing:
                    return
                self._changed.clear()
                try:
                    async with asyncio.timeout(wait):
                        await self._changed.wait()
                except TimeoutError:
                    pass
                continue
            entry = self._pending.pop(key)
            if not entry.attempts and not await self._ours_to_send(key):
                self._metrics.alerts.labels("elsewhere").inc()
                continue
            await self._post(key, entry)
            await asyncio.sleep(self.MIN_INTERVAL_S)

    async def _ours_to_send(self, key: str) -> bool:
        """Another instance already sent this key within the fold window: then not ours. If the
        database cannot tell, send it: an alert twice is better than none."""
        if self._first_in_fleet is None:
            return True
        try:
            return await self._first_in_fleet(key, self.FOLD_WINDOW_S)
        except STORAGE_ERRORS:
            return True

    def _next_ready(self) -> tuple[str | None, float]:
        now = time.monotonic()
        if now < self._paused_until:
            return None, self._paused_until - now
        soonest = 3600.0
        for key in self._pending:
            ready_at = self._sent_at.get(key, -math.inf) + self.FOLD_WINDOW_S
            if ready_at <= now or self._closing:
                return key, 0.0
            soonest = min(soonest, ready_at - now)
        return None, soonest

    async def _post(self, key: str, entry: _PendingAlert) -> None:
        text = entry.text if entry.count == 1 else f"{entry.text}\n(×{entry.count}: repeats folded into this message)"
        status, retry_after = None, None
        try:
            async with asyncio.timeout(self.POST_TIMEOUT_S):
                assert self._session is not None  # alert() queues nothing without one
                async with self._session.post(self._url, json={"text": f"[tracker] {text}"}) as resp:
                    status = resp.status
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self._log.warning("alert.post_failed", key=key, error=type(exc).__name__)
        if status == 200:
            self._sent_at[key] = time.monotonic()
            self._metrics.alerts.labels("sent").inc()
            return
        if status is not None:
            self._log.warning("alert.post_failed", key=key, status=status)
        if status == 429:
            self._paused_until = time.monotonic() + (retry_after or self.MIN_INTERVAL_S)
        else:
            entry.attempts += 1
        if entry.attempts >= self.MAX_ATTEMPTS or self._closing:
            self._metrics.alerts.labels("failed").inc()
            return
        again = self._pending.pop(key, None)  # repeats that arrived meanwhile join the retry
        if again:
            entry.count += again.count
        self._pending[key] = entry
        self._pending.move_to_end(key, last=False)


# ════════════════════════════════════════════════════════════════════════════════════════════
# Webhooks — the shop's receivers told what happened, as Standard Webhooks say: every attempt
# signed (webhook-id, webhook-timestamp, webhook-signature: v1,<HMAC-SHA256>), the id the same on
# every retry and replay, so a receiver that keeps the ids it has seen handles each event once.
# Each endpoint has senders of its own (WEBHOOK_CONCURRENCY) and a breaker of its own: a slow or
# dead one delays no other, nor the pipeline. With several instances the one paging the feed sends.
# ════════════════════════════════════════════════════════════════════════════════════════════

WEBHOOK_CONCURRENCY = 32  # requests in flight to one endpoint
# Deliveries under way for one endpoint: reading its story, waiting for a request slot, or for
# its answer to be committed — which must not hold a slot. Under a burst that last step (to the
# daemon, into a transaction, back) took 270 ms, and 256 under way delivered 950 a second while
# the burst announced 1,800.
WEBHOOK_UNDER_WAY = 32 * WEBHOOK_CONCURRENCY
WEBHOOK_STORY_FRESH_S = 1.0  # a body read longer ago than this before its request is read again


def webhook_id(event_id: str) -> str:
    """The event's id as receivers see it: its cause ("<type>:<subject>"), fit for a header."""
    return "evt_" + urllib.parse.quote(event_id, safe=":._-")


def webhook_event_id(given: str) -> str:
    """What `webhooks replay` and `deliveries --event` accept: the id a receiver saw, or the cause."""
    return urllib.parse.unquote(given[len("evt_"):]) if given.startswith("evt_") else given


SHIPMENT_EVENTS = ("shipment.stale", "pickup.overdue")  # about a box: the rest are about a return


def webhook_body(delivery: DueDelivery, story: Mapping[str, Any]) -> str:
    """The event and the story as it stands now, in the API's schema: the return's, or the
    shipment's with its returns; only the id of one retention has deleted since."""
    data: dict[str, Any] = {"id": delivery.subject}
    box = next((b for b in story["boxes"] if b["shipment_number"] == delivery.subject), None)
    if delivery.type in SHIPMENT_EVENTS and box is not None:
        data = {**api_box(box, story), "returns": [api_return(r["id"], story) for r in story["returns"]
                                                   if r["shipment_number"] == delivery.subject]}
    elif (return_id := return_named(delivery.subject, story)) is not None:
        data = api_return(return_id, story)
    return json.dumps({"type": delivery.type, "timestamp": delivery.occurred_at, "data": data},
                      separators=(",", ":"))


def decide_delivery(delivery: DueDelivery, webhook: WebhookConfig, status: int | None, error: str | None,
                    retry_after: float | None, now: float) -> DeliveryUpdate:
    """2xx: delivered. 410: the receiver wants nothing more: the endpoint is disabled, the event
    kept. Anything else: again after the schedule's next delay (never sooner than Retry-After), or
    failed once the schedule has run out."""
    delivered = DeliveryUpdate(id=delivery.id, endpoint=webhook.name, state=DeliveryState.DELIVERED,
                               next_attempt_at=None, replays=delivery.replays, http_status=status,
                               disable_after_s=webhook.disable_after_s)
    if status is not None and 200 <= status < 300:
        return delivered
    failed = dataclasses.replace(delivered, error=error or f"HTTP {status}")
    if status == 410:
        return dataclasses.replace(failed, state=DeliveryState.PENDING, next_attempt_at=now, gone=True)
    made = delivery.attempts + 1
    if made >= len(webhook.retry_schedule_s):
        return dataclasses.replace(failed, state=DeliveryState.FAILED)
    delay = max(webhook.retry_schedule_s[made], retry_after or 0.0)
    return dataclasses.replace(failed, state=DeliveryState.PENDING, next_attempt_at=now + delay)


def webhook_signers(webhook: WebhookConfig) -> list[standardwebhooks.Webhook]:
    return [standardwebhooks.Webhook(secret) for secret in (webhook.secret, webhook.previous_secret) if secret]


def signed_headers(signers: Sequence[standardwebhooks.Webhook], msg_id: str, body: str,
                   at: dt.datetime) -> dict[str, str]:
    """Signed by every secret in use: during a rotation a receiver holding either verifies."""
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": " ".join(signer.sign(msg_id, at, body) for signer in signers),
            "Content-Type": "application/json", "User-Agent": "tracker-webhooks"}


Asked = typing.TypeVar("Asked")
Answer = typing.TypeVar("Answer")


class Gathered(typing.Generic[Asked, Answer]):
    """Asks made within one turn of the event loop answered together, `batch` to a call of
    `answer_all`: under a burst a sender starts hundreds of deliveries at once, and a call each
    would cost a thread hop or a request each. A call failing with StorageUnavailable fails every
    ask waiting on it; when the ask making the call is cancelled, the others ask again."""

    def __init__(self, answer_all: Callable[[list[Asked]], Awaitable[list[Answer]]], batch: int) -> None:
        self._answer_all = answer_all
        self._batch = batch
        self._asked: list[tuple[Asked, asyncio.Future[Answer]]] = []

    async def ask(self, item: Asked) -> Answer:
        while True:
            answer: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
            self._asked.append((item, answer))
            if len(self._asked) == 1:  # the first to ask calls for all who ask before the loop's next turn
                await self._call_for_all(answer)
            try:
                return await answer
            except _AskAbandoned:
                continue

    async def _call_for_all(self, own: "asyncio.Future[Answer]") -> None:
        asked: list[tuple[Asked, asyncio.Future[Answer]]] = []
        failure: BaseException | None = None
        try:
            await asyncio.sleep(0)
            asked, self._asked = self._asked, []
            for start in range(0, len(asked), self._batch):  # each batch's waiters answered as it comes
                batch = asked[start:start + self._batch]
                answers = await self._answer_all([item for item, _ in batch])
                for (_, waiting), answer in zip(batch, answers, strict=True):
                    if not waiting.done():  # its delivery may have been cancelled meanwhile
                        waiting.set_result(answer)
        except StorageUnavailable as exc:
            failure = exc
        except BaseException:
            failure = _AskAbandoned()  # this caller was cancelled: the others ask again
            raise
        finally:
            if failure is not None:
                if not asked:
                    asked, self._asked = self._asked, []
                for _, waiting in asked:
                    if not waiting.done() and not (waiting is own and isinstance(failure, _AskAbandoned)):
                        waiting.set_exception(failure)


class _AskAbandoned(Exception):
    """The ask calling for the others was cancelled before it could answer them."""


class StoryReader:
    """Stories for webhook bodies, read together (Gathered): STORY_BATCH keys a statement."""

    def __init__(self, store: "StoryStore") -> None:
        self._store = store
        self._gathered: Gathered[str, dict[str, Any]] = Gathered(self._read, STORY_BATCH)

    async def story(self, key: str) -> dict[str, Any]:
        """The story of `key`; StorageUnavailable when it could not be read (the delivery stays pending)."""
        return await self._gathered.ask(key)

    async def _read(self, keys: list[str]) -> list[dict[str, Any]]:
        try:
            stories = await self._store.stories(keys, webhooks=False)
        except STORAGE_ERRORS as exc:
            raise StorageUnavailable(f"a webhook body's story could not be read: {exc}") from exc
        return [stories[key] for key in keys]


class StoryStore(typing.Protocol):
    async def stories(self, keys: Sequence[str], *, webhooks: bool = True) -> dict[str, dict[str, Any]]: ...


class Outbox(typing.Protocol):
    """What the senders work from: the daemon's outbox, as the webhooks' process sees it."""

    async def due_deliveries(self, endpoint: str, now: float, limit: int) -> list[DueDelivery]: ...

    async def next_delivery_due_at(self, endpoint: str) -> float | None: ...

    async def story(self, key: str) -> dict[str, Any]: ...

    async def settle(self, update: DeliveryUpdate) -> bool:
        """What became of an attempt, committed; whether its endpoint is disabled by it."""


class WebhookSender:
    """One endpoint's deliveries, due first first: WEBHOOK_UNDER_WAY under way, of which
    WEBHOOK_CONCURRENCY requests at a time."""

    def __init__(self, webhook: WebhookConfig, outbox: Outbox, session: aiohttp.ClientSession,
                 metrics: "WebhookMetrics", log: Logger, stop: StopSignal) -> None:
        self.webhook = webhook
        self._outbox = outbox
        self._session = session
        self._metrics = metrics
        self._log = log
        self._signers = webhook_signers(webhook)
        self.breaker = CircuitBreaker(webhook.name, self._breaker_changed)
        self._disabled = False  # since this instance saw it disabled; the database says when it is enabled
        self.dispatcher: Dispatcher[DueDelivery] = Dispatcher(
            f"webhook:{webhook.name}", self._due, lambda: outbox.next_delivery_due_at(webhook.name),
            lambda d: d.id, self.deliver, WEBHOOK_UNDER_WAY, log, stop=stop)
        self._requests = asyncio.Semaphore(WEBHOOK_CONCURRENCY)
        self._timeout = aiohttp.ClientTimeout(total=webhook.timeout_s)

    async def _due(self, now: float, limit: int) -> list[DueDelivery]:
        due = await self._outbox.due_deliveries(self.webhook.name, now, limit)  # none while it is disabled
        if due:
            self._disabled = False
        return due

    async def deliver(self, delivery: DueDelivery) -> None:
        if self._disabled:
            return  # fetched before it was disabled: kept, pending, for when it is enabled
        body = webhook_body(delivery, await self._outbox.story(delivery.subject))
        read_at = time.monotonic()
        async with self._requests:
            probe = await self.breaker.admit()
            sent = False
            try:
                if self._disabled:
                    return
                if time.monotonic() - read_at > WEBHOOK_STORY_FRESH_S:  # it waited out a breaker: as it is now
                    body = webhook_body(delivery, await self._outbox.story(delivery.subject))
                sent = True
                update = await self._request(delivery, body, probe)
            finally:
                if probe and not sent:  # a probe that never went out: let another one go
                    self.breaker.abandon_probe()
        if await self._outbox.settle(update):
            self._disabled = True
            self.dispatcher.forget(self.dispatcher.held())

    async def _request(self, delivery: DueDelivery, body: str, probe: bool) -> DeliveryUpdate:
        """One signed attempt, the breaker's probe or not; what became of it."""
        headers = signed_headers(self._signers, webhook_id(delivery.event_id), body, dt.datetime.now(dt.UTC))
        status, error, retry_after = None, None, None
        started = time.monotonic()
        try:
            async with self._session.post(self.webhook.url, data=body.encode(), headers=headers, allow_redirects=False,
                                          timeout=self._timeout) as resp:
                status = resp.status  # the answer's body is never read: a huge or endless one costs nothing
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                outcome = Outcome.OK if 200 <= status < 300 else _outcome_for_status(status)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {str(exc)[:200]}" if str(exc) else type(exc).__name__
            outcome = Outcome.TIMEOUT if isinstance(exc, TimeoutError) else Outcome.CONNECTION
        except asyncio.CancelledError:
            if probe:
                self.breaker.abandon_probe()
            raise
        latency = time.monotonic() - started
        self.breaker.record(Reply(endpoint=self.webhook.name, outcome=outcome, status=status, body=None,
                                  retry_after=retry_after, latency_s=latency, detail=error or f"HTTP {status}"), probe)
        update = decide_delivery(delivery, self.webhook, status, error, retry_after, time.time())
        self._metrics.deliveries.labels(self.webhook.name, update.state.value).inc()
        self._metrics.latency.labels(self.webhook.name).observe(latency)
        # each delivery's outcome is kept with it (`webhooks deliveries`, `show`): a burst's tens of
        # thousands of accepted ones are not worth a line each, a failure is
        logged = self._log.debug if update.state is DeliveryState.DELIVERED else self._log.info
        logged("webhook.sent", endpoint=self.webhook.name, event_id=delivery.event_id, attempt=delivery.attempts + 1,
               status=status, error=error, state=update.state.value, latency_s=round(latency, 4))
        return update

    def _breaker_changed(self, breaker: CircuitBreaker, previous: CircuitState, why: str) -> None:
        self._log.warning("webhook.circuit_changed", endpoint=breaker.endpoint, state=breaker.state.value,
                          previous=previous.value, why=why)


# ── the webhooks' own process ───────────────────────────────────────────────────────────────
# A delivery costs about half a millisecond of CPU (its story, its body, a signed request): a
# burst's 30,000 are as much CPU as the whole pipeline, and on the daemon's loop they held up
# the partner's calls. So the daemon starts `tracker.py webhook-process` (HelperProcess), whose
# senders read stories on a read-only connection of their own and make the requests. What is
# due, and what became of each attempt, goes over the daemon's socket (OutboxDesk): the daemon
# stays the one writer, it alone knows whether this instance leads (and so delivers), and it
# alerts. It wakes the process on its stdin when a commit queued deliveries.

WEBHOOK_PROCESS_COMMAND = "webhook-process"
SETTLE_BATCH = 256  # attempts' outcomes a request to the daemon


def delivery_update_of(raw: Mapping[str, Any]) -> DeliveryUpdate:
    return DeliveryUpdate(**{**raw, "state": DeliveryState(raw["state"])})


class OutboxDesk:
    """The daemon's side: what is due to an endpoint, and the outcomes committed — with the alert
    when one disabled its endpoint."""

    def __init__(self, store: StateStore, committer: "Committer", alerts: "Alerter", log: Logger) -> None:
        self._store = store
        self._committer = committer
        self._alerts = alerts
        self._log = log

    def application(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/due", self._due)
        app.router.add_post("/next-due", self._next_due)
        app.router.add_post("/settle", self._settle)
        return app

    async def _due(self, request: web.Request) -> web.Response:
        asked = await request.json()
        due = await self._store.due_deliveries(asked["endpoint"], asked["now"], asked["limit"])
        return web.json_response([vars(d) for d in due])  # flat records: their fields as they are

    async def _next_due(self, request: web.Request) -> web.Response:
        return web.json_response(await self._store.next_delivery_due_at((await request.json())["endpoint"]))

    async def _settle(self, request: web.Request) -> web.Response:
        updates = [delivery_update_of(raw) for raw in await request.json()]
        try:
            results = await asyncio.gather(*(self._committer.submit(u) for u in updates))
        except StorageUnavailable as exc:
            return web.json_response({"error": str(exc)}, status=503)
        disabled = [u.endpoint in r.disabled_endpoints for u, r in zip(updates, results, strict=True)]
        for name in {u.endpoint for u, d in zip(updates, disabled, strict=True) if d}:
            update = next(u for u, d in zip(updates, disabled, strict=True) if d and u.endpoint == name)
            self._log.warning("webhook.disabled", endpoint=name, error=update.error)
            self._alerts.alert(*webhook_disabled_alert(name, update))
        return web.json_response(disabled)


class DaemonOutbox:
    """The webhooks' process's side: stories read here, the rest asked of the daemon (OutboxDesk)."""

    def __init__(self, daemon: aiohttp.ClientSession, store: StoryStore) -> None:
        self._daemon = daemon
        self._stories = StoryReader(store)
        self._settled: Gathered[DeliveryUpdate, bool] = Gathered(self._settle_all, SETTLE_BATCH)

    async def due_deliveries(self, endpoint: str, now: float, limit: int) -> list[DueDelivery]:
        due = await self._ask("/due", {"endpoint": endpoint, "now": now, "limit": limit})
        return [DueDelivery(**raw) for raw in due]

    async def next_delivery_due_at(self, endpoint: str) -> float | None:
        return typing.cast(float | None, await self._ask("/next-due", {"endpoint": endpoint}))

    async def story(self, key: str) -> dict[str, Any]:
        return await self._stories.story(key)

    async def settle(self, update: DeliveryUpdate) -> bool:
        return await self._settled.ask(update)

    async def _settle_all(self, updates: list[DeliveryUpdate]) -> list[bool]:
        return typing.cast(list[bool], await self._ask("/settle", [vars(u) for u in updates]))

    async def _ask(self, path: str, body: Any) -> Any:
        """The daemon's answer; StorageUnavailable when there is none (what was asked stays as it was)."""
        try:
            async with self._daemon.post(f"http://tracker{path}", json=body) as answer:
                if answer.status != 200:
                    raise StorageUnavailable(f"the daemon answered {path} with HTTP {answer.status}")
                return await answer.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise StorageUnavailable(f"the daemon did not answer {path}: {exc}") from exc


async def serve_webhook_process(stdin: asyncio.StreamReader) -> None:
    """`tracker.py webhook-process`: the senders, as HelperProcess starts them. A line on stdin
    wakes them (deliveries were queued); its end stops them, with the stages' grace."""
    setup, config, log = await helper_setup(stdin, "tracker.webhooks")
    registry = prometheus_client.CollectorRegistry()
    metrics = WebhookMetrics(registry)
    stop = StopSignal()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    store = await open_store(config.storage, readonly=True)
    try:
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=setup["daemon_socket"]),
                                  timeout=aiohttp.ClientTimeout(total=60)) as daemon,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=WEBHOOK_CONCURRENCY * len(config.webhook)),
                                  cookie_jar=aiohttp.DummyCookieJar()) as session,
        ):
            outbox = DaemonOutbox(daemon, store)
            senders = [WebhookSender(w, outbox, session, metrics, log, stop) for w in config.webhook]
            metrics_runner = await serve_metrics_on(setup["metrics_socket"], registry)
            print(json.dumps({"ready": None}), flush=True)
            try:
                async with asyncio.TaskGroup() as tasks:
                    for sender in senders:
                        tasks.create_task(sender.dispatcher.run(grace_s=config.schedule.shutdown_grace_s))
                    reader = tasks.create_task(wake_on_each_line(stdin, senders, stop))
                    await stop.wait()  # SIGTERM, or the end of stdin: the senders drain
                    reader.cancel()
            finally:
                await metrics_runner.cleanup()
    finally:
        await store.close()


async def wake_on_each_line(stdin: asyncio.StreamReader, senders: Sequence[WebhookSender], stop: StopSignal) -> None:
    while await stdin.readline():
        for sender in senders:
            sender.dispatcher.wake()
    stop.set()  # the daemon closed our stdin, or died


# ════════════════════════════════════════════════════════════════════════════════════════════
# The shop's API — the shop's own systems hand the tracker returns, ask where one stands and
# ask for a check now, over /v1 on a listener of its own ([api] listen). Every request carries
# a key (Authorization: Bearer trk_…) with scopes, CIDRs it may come from and a rate; every write
# is an audit row; every refusal an RFC 9457 problem. A pushed return is committed as a feed
# page is, so it is tracked and reported by the same rules. openapi.json beside this file is the
# contract, served at /v1/openapi.json.
# ════════════════════════════════════════════════════════════════════════════════════════════

API_KEY_PREFIX = "trk_"  # recognisable, so secret scanners can find a leaked key
API_KEY_BODY_CHARS = 32  # base62: about 190 random bits
API_KEY_LOOKUP_CHARS = 8  # the part stored in clear, to find a key's hash
API_KEY_CACHE_S = 1.0  # a revoke or an expiry takes effect within this, on every instance
API_BATCH_MAX = 500
IDEMPOTENCY_KEY_CHARS = 255
CHECK_COOLDOWN_S = 60.0  # a box is checked now at most this often at a key's asking
API_LIST_MAX = 500
OPENAPI_PATH = Path(__file__).resolve().parent / "openapi.json"
BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
REQUEST_CONTEXT = web.RequestKey("context", dict)  # the request's id and route, shared with its clones


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        digits.append(BASE62[digit])
    return "".join(reversed(digits))


def new_api_key() -> str:
    """trk_ + 32 random base62 characters + a 6-character CRC32 of them (a typo is told apart
    from a wrong key without a database read, as GitHub's tokens are)."""
    body = "".join(secrets.choice(BASE62) for _ in range(API_KEY_BODY_CHARS))
    return f"{API_KEY_PREFIX}{body}{_base62(zlib.crc32(body.encode()), 6)}"


def api_key_well_formed(key: str) -> bool:
    body, check = key[len(API_KEY_PREFIX):-6], key[-6:]
    return (key.startswith(API_KEY_PREFIX) and len(body) == API_KEY_BODY_CHARS and all(c in BASE62 for c in body)
            and _base62(zlib.crc32(body.encode()), 6) == check)


def api_key_lookup(key: str) -> str:
    return key[len(API_KEY_PREFIX):len(API_KEY_PREFIX) + API_KEY_LOOKUP_CHARS]


def api_key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Problem(Exception):
    """An RFC 9457 problem: raised anywhere in a request, answered as application/problem+json."""

    def __init__(self, status: int, slug: str, title: str, detail: str = "", *,
                 headers: Mapping[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail or title)
        self.status, self.slug, self.title, self.detail = status, slug, title, detail
        self.headers = dict(headers or {})
        self.extra = extra

    def response(self, instance: str) -> web.Response:
        body = {"type": f"/v1/problems/{self.slug}", "title": self.title, "status": self.status,
                "detail": self.detail or self.title, "instance": instance, **self.extra}
        response = web.json_response(body, status=self.status, headers=self.headers,
                                     content_type="application/problem+json")
        response[PROBLEM_SLUG] = self.slug
        return response


PROBLEM_SLUG = web.ResponseKey("problem", str)  # which problem an answer is, for the refusals' metric


def problem_slug_of(status: int, body: bytes) -> str | None:
    """The slug of a problem answer that came from elsewhere (the daemon's process)."""
    if status < 400:
        return None
    try:
        kind = json.loads(body).get("type", "")
    except (ValueError, AttributeError):
        return None
    return kind.rpartition("/")[2] if isinstance(kind, str) else None


def return_named(name: str, story: Mapping[str, Any]) -> str | None:
    """The id of the return the story tells that `name` is the id or a second name of."""
    if any(r["id"] == name for r in story["returns"]):
        return name
    return next((n["return_id"] for n in story["names"] if n["name"] == name), None)


def api_return(return_id: str, story: Mapping[str, Any]) -> dict[str, Any]:
    """A return as the API tells it (openapi.json's Return): its fields, its other names, where it
    stands, its box and status history, its corrections, its report and the attempts at it. Never a
    raw partner payload: only what the tracker made of the answers."""
    ret = next(r for r in story["returns"] if r["id"] == return_id)
    box = next((b for b in story["boxes"] if b["shipment_number"] == ret["shipment_number"]), None)
    report = next((p for p in story["reports"] if p["return_id"] == return_id), None)
    return {
        "id": return_id,
        "order_number": ret["order_number"],
        "order_item_number": ret["order_item_number"],
        "shipment_number": ret["shipment_number"],
        "requested_at": ret["requested_at"],
        "also_known_as": [n["name"] for n in story["names"] if n["return_id"] == return_id],
        "received_at": _iso(ret["seen_at"]),
        "source": ret["source"],
        "state": report["state"] if report is not None else (box["state"] if box is not None else "received"),
        "summary": where_it_stands(return_id, story),
        "box": None if box is None else api_box(box, story),
        "corrections": [{"fields": c["fields"].split(","), "before": json.loads(c["before"]),
                         "after": json.loads(c["after"]), "corrected_at": _iso(c["corrected_at"]),
                         "source": c["source"]}
                        for c in story["corrections"] if c["return_id"] == return_id],
        "report": None if report is None else {
            "state": report["state"], "collected_at": report["collected_at"], "attempts": report["attempts"],
            "outcome": report["outcome"], "queued_at": _iso(report["queued_at"]), "done_at": _iso(report["done_at"]),
            "next_attempt_at": _iso(report["next_attempt_at"])},
        "attempts": [{"attempt": a["attempt"], "at": _iso(a["attempted_at"]), "outcome": a["outcome"],
                      "http_status": a["http_status"], "latency_s": a["latency_s"]}
                     for a in story["attempts"] if a["return_id"] == return_id],
        **({"webhooks": api_webhooks(webhook_events_of(return_id, story), story)} if "events" in story else {}),
    }


def webhook_events_of(return_id: str, story: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The events announced of a return: under its id or another name of it, or of its box."""
    ret = next(r for r in story["returns"] if r["id"] == return_id)
    subjects = {return_id, ret["shipment_number"], *(n["name"] for n in story["names"] if n["return_id"] == return_id)}
    return [e for e in story["events"] if e["subject"] in subjects]


def api_webhooks(events: Iterable[Mapping[str, Any]], story: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each event (its webhook-id, type, when it happened and was announced) with its deliveries:
    to which endpoint, how far, the last answer."""
    return [{"id": webhook_id(e["id"]), "type": e["type"], "occurred_at": e["occurred_at"],
             "announced_at": _iso(e["created_at"]),
             "deliveries": [{"endpoint": d["endpoint"], "state": d["state"], "attempts": d["attempts"],
                             "replays": d["replays"], "last_status": d["last_status"], "last_error": d["last_error"],
                             "delivered_at": _iso(d["delivered_at"]),
                             "next_attempt_at": _iso(d["next_attempt_at"]) if d["state"] == "pending" else None}
                            for d in deliveries_of(e, story)]}
            for e in events]


def deliveries_of(event: Mapping[str, Any], story: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """An event's deliveries in a story, one an endpoint that takes it."""
    return [d for d in story["deliveries"] if d["event_id"] == event["id"]]


def api_box(box: Mapping[str, Any], story: Mapping[str, Any]) -> dict[str, Any]:
    shipment = box["shipment_number"]
    return {
        "shipment_number": shipment, "state": box["state"], "last_status": box["last_status"],
        "checks": box["checks"], "first_seen_at": _iso(box["first_seen_at"]),
        "next_check_at": _iso(box["next_check_at"]) if box["state"] == BoxState.TRACKING else None,
        "closed_at": _iso(box["closed_at"]),
        "history": [{"status": h["status"], "at": _iso(h["changed_at"]), "seen_at": _iso(h["seen_at"])}
                    for h in story["history"] if h["shipment_number"] == shipment],
    }


def pushed_return(raw: Any) -> ReturnItem | QuarantinedItem:
    """A return the shop pushed, checked as a feed item is. Without an `id` it is named by its
    order item: order:<order_number>:<order_item_number>."""
    if isinstance(raw, dict) and raw.get("id") is None and "id" in raw:
        raw = {k: v for k, v in raw.items() if k != "id"}
    if isinstance(raw, dict) and "id" not in raw:
        order, item = raw.get("order_number"), raw.get("order_item_number")
        if isinstance(order, str) and isinstance(item, str):
            raw = {**raw, "id": f"order:{order}:{item}"}
    if isinstance(raw, dict) and set(raw) - {*RETURN_FIELDS, "requested_at"}:
        unknown = ", ".join(sorted(set(raw) - {*RETURN_FIELDS, "requested_at"}))[:200]
        return QuarantinedItem(return_id=None, reason=f"unknown field(s): {unknown}", raw="")
    return validate_return(raw)


class KeyRing:
    """The keys, looked up by prefix and cached for API_KEY_CACHE_S; each key's rate as a token
    bucket of this instance's."""

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._cache: dict[str, tuple[float, tuple[str, ApiKey] | None]] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # name → (tokens, at)

    async def find(self, secret: str) -> ApiKey | None:
        """The key this secret is (revoked and expired ones too), or None."""
        prefix = api_key_lookup(secret)
        now = time.monotonic()
        cached = self._cache.get(prefix)
        if cached is None or now - cached[0] > API_KEY_CACHE_S:
            cached = (now, await self._store.api_key_by_prefix(prefix))
            self._cache[prefix] = cached
            if len(self._cache) > 10_000:  # wrong keys with many prefixes: forget the oldest
                self._cache.pop(next(iter(self._cache)))
        found = cached[1]
        if found is None or not hmac.compare_digest(found[0], api_key_hash(secret)):
            return None
        return found[1]

    def wait_s(self, key: ApiKey) -> float:
        """0 when the key may make a request now (and it is counted), else how long until it may."""
        now = time.monotonic()
        tokens, at = self._buckets.get(key.name, (key.rate_per_s, now))
        tokens = min(key.rate_per_s, tokens + (now - at) * key.rate_per_s)  # a second's burst at most
        if tokens < 1.0:
            self._buckets[key.name] = (tokens, now)
            return (1.0 - tokens) / key.rate_per_s
        self._buckets[key.name] = (tokens - 1.0, now)
        return 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Route:
    method: str
    path: str
    scope: str | None  # None: no key needed
    name: str  # the metrics' route label, and the ShopApi method that answers it


API_ROUTES = (
    Route(method="GET", path="/v1/openapi.json", scope=None, name="openapi"),
    Route(method="POST", path="/v1/returns", scope="returns:write", name="push_one"),
    Route(method="POST", path="/v1/returns/batch", scope="returns:write", name="push_batch"),
    Route(method="GET", path="/v1/returns", scope="returns:read", name="list_returns"),
    Route(method="GET", path="/v1/returns/{id}", scope="returns:read", name="get_return"),  # never "batch"
    Route(method="GET", path="/v1/shipments/{shipment_number}", scope="returns:read", name="get_shipment"),
    Route(method="POST", path="/v1/shipments/{shipment_number}/check", scope="shipments:check", name="check"),
)


FORWARDED_HEADERS = ("Authorization", "Content-Type", "Idempotency-Key")  # and the request's id, as set here
NOT_HANDED_BACK = frozenset(("content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"))
CLIENT_HEADER = "X-Tracker-Client"  # the client's address, as the API's process found it


class ShopApi:
    """The /v1 handlers over the store, the committer and the tracking stage — in the daemon's
    process. In the API's own process (`daemon` given) the reads are answered there and every
    write, once its key passed, is handed on to the daemon's: the only writer."""

    def __init__(self, config: Config, store: StateStore, metrics: "ApiMetrics | None", log: Logger, *,
                 stages: Stages | None = None, daemon: aiohttp.ClientSession | None = None) -> None:
        self._config = config
        self._store = store
        self._stages = stages
        self._daemon = daemon
        self._metrics = metrics
        self._log = log
        self._keys = KeyRing(store)
        self._trusted = [ipaddress.ip_network(cidr, strict=False) for cidr in config.api.trusted_proxies]
        self._forwarded = None
        if self._trusted:
            import aiohttp_remotes  # only with trusted proxies: 3 MB a daemon without them never needs
            self._forwarded = aiohttp_remotes.XForwardedFiltered(set(self._trusted))
        self._openapi = OPENAPI_PATH.read_bytes()

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self._config.api.max_body_bytes, middlewares=[self._answer])
        for route in API_ROUTES:
            # /v1/returns/batch is the batch's alone: a GET there is 405, as the document says
            path = route.path.replace("{id}", "{id:(?!batch$)[^/]+}")
            app.router.add_route(route.method, path, functools.partial(self._guarded, route, getattr(self, route.name)))
        return app

    # ── every request: its id, its client, its key, its problem, its metrics ────────────────

    @web.middleware
    async def _answer(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        started = time.monotonic()
        request_id = request.headers.get("X-Request-Id", "")[:64] or secrets.token_hex(8)
        context = request[REQUEST_CONTEXT] = {"request_id": request_id, "route": "unknown"}  # shared with clones
        try:
            if self._metrics is None:  # behind the API's own process: its client's address is in the header
                response = await handler(request.clone(remote=request.headers.get(CLIENT_HEADER, "")))
            elif self._forwarded is not None and self._peer_is_trusted(request):
                response = await self._forwarded.middleware(request, handler)
            else:
                response = await handler(request)  # X-Forwarded-For from anyone else is not believed
        except Problem as problem:
            response = problem.response(request.path)
        except web.HTTPException as exc:  # aiohttp's own: no such route or method, a body too large
            slug = {404: "not-found", 405: "method-not-allowed", 413: "body-too-large"}.get(exc.status, "bad-request")
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            response = Problem(exc.status, slug, exc.reason, headers=headers).response(request.path)
        except Exception:  # noqa: BLE001 — a bug answers 500 and is logged; the daemon goes on
            self._log.error("api.failed", path=request.path, request_id=request_id, exc_info=True)
            response = Problem(500, "internal-error", "Internal Server Error",
                               f"see the tracker's log for request {request_id}").response(request.path)
        response.headers["X-Request-Id"] = request_id
        if self._metrics is not None:
            self._metrics.requests.labels(context["route"], str(response.status)).inc()
            self._metrics.latency.labels(context["route"]).observe(time.monotonic() - started)
            refused = response.get(PROBLEM_SLUG) if response.status in (401, 403, 429) else None
            if refused:
                self._metrics.refusals.labels(refused).inc()
        return response

    def _peer_is_trusted(self, request: web.Request) -> bool:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if not peer:
            return False
        try:
            address = ipaddress.ip_address(peer[0])
        except ValueError:
            return False
        return any(address in network for network in self._trusted)

    async def _guarded(self, route: Route, handler: Callable[[web.Request, ApiKey | None],
                                                             Awaitable[web.StreamResponse]],
                       request: web.Request) -> web.StreamResponse:
        request[REQUEST_CONTEXT]["route"] = route.name
        key = await self._authorize(request, route.scope) if route.scope else None
        if self._daemon is not None and route.method == "POST":
            return await self._hand_on(request)
        idem_key = request.headers.get("Idempotency-Key")
        if key is None or request.method != "POST" or idem_key is None:
            return await handler(request, key)
        if not 1 <= len(idem_key) <= IDEMPOTENCY_KEY_CHARS:
            raise Problem(400, "invalid-idempotency-key", "Bad Request",
                          f"an Idempotency-Key is 1 to {IDEMPOTENCY_KEY_CHARS} characters")
        return await self._once(request, key, idem_key, route, handler)

    async def _once(self, request: web.Request, key: ApiKey, idem_key: str, route: Route,
                    handler: Callable[[web.Request, ApiKey | None], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        """The same key and body answer as the first request with that Idempotency-Key did (for
        IDEMPOTENCY_KEEP_S); another body is 422; while the first still runs, 409."""
        body_hash = hashlib.sha256(route.name.encode() + b"\0" + await request.read()).hexdigest()
        taken = Idempotent(key_name=key.name, idem_key=idem_key, body_hash=body_hash)
        held = dict((await self._submit(taken)).idempotency).get(taken.asker)
        if held is not None:
            if held[0] != body_hash:
                raise Problem(422, "idempotency-key-reused", "Unprocessable Content",
                              "this Idempotency-Key came with another request before")
            if held[1] is None:
                raise Problem(409, "idempotency-key-in-use", "Conflict",
                              "the first request with this Idempotency-Key is still being answered",
                              headers={"Retry-After": "1"})
            replayed = web.Response(status=held[1], body=(held[2] or "").encode(), content_type=(
                "application/problem+json" if held[1] >= 400 else "application/json"))
            replayed.headers["Idempotent-Replayed"] = "true"
            return replayed
        try:
            response = await handler(request, key)
        except Problem as problem:
            response = problem.response(request.path)
        body = response.body.decode() if isinstance(response, web.Response) and response.body is not None else ""
        await self._submit(dataclasses.replace(taken, answer=(response.status, body)))
        return response

    async def _hand_on(self, request: web.Request) -> web.StreamResponse:
        """A write whose key passed here, to the daemon's process (which checks it again, keeps
        the Idempotency-Key and writes the audit row), and its answer back as it came."""
        assert self._daemon is not None
        headers = {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}
        headers |= {CLIENT_HEADER: request.remote or "", "X-Request-Id": request[REQUEST_CONTEXT]["request_id"]}
        try:
            async with self._daemon.request(request.method, f"http://tracker{request.path_qs}", headers=headers,
                                            data=await request.read()) as answer:
                body = await answer.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._log.warning("api.daemon_unreachable", error=str(exc) or type(exc).__name__)
            raise Problem(503, "daemon-unavailable", "Service Unavailable",
                          "the tracker's daemon cannot take writes now", headers={"Retry-After": "5"}) from None
        headers = {name: value for name, value in answer.headers.items() if name.lower() not in NOT_HANDED_BACK}
        response = web.Response(status=answer.status, body=body, headers=headers)
        if (slug := problem_slug_of(answer.status, body)) is not None:
            response[PROBLEM_SLUG] = slug
        return response

    def _pipeline(self) -> Stages:
        assert self._stages is not None, "a write reached the API's own process"
        return self._stages

    async def _submit(self, transition: Transition) -> CommitResult:
        try:
            return await self._pipeline().committer.submit(transition)
        except StorageUnavailable as exc:
            raise Problem(503, "storage-unavailable", "Service Unavailable", str(exc),
                          headers={"Retry-After": "5"}) from None

    async def _authorize(self, request: web.Request, scope: str) -> ApiKey:
        header = request.headers.get("Authorization", "")
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise Problem(401, "unauthorized", "Unauthorized", "send Authorization: Bearer <key>",
                          headers={"WWW-Authenticate": 'Bearer realm="tracker"'})
        secret = secret.strip()
        key = await self._keys.find(secret) if api_key_well_formed(secret) else None
        if key is None or not key.usable(time.time()):
            raise Problem(401, "unauthorized", "Unauthorized", "the key is unknown, revoked or expired",
                          headers={"WWW-Authenticate": 'Bearer realm="tracker", error="invalid_token"'})
        client = request.remote or ""
        if key.allow and not _address_in(client, key.allow):
            raise Problem(403, "address-not-allowed", "Forbidden",
                          f"key {key.name!r} may not be used from {client}")
        if scope not in key.scopes:
            raise Problem(403, "scope-missing", "Forbidden", f"key {key.name!r} lacks the scope {scope}")
        wait = self._keys.wait_s(key)
        if wait:
            raise Problem(429, "rate-limited", "Too Many Requests",
                          f"key {key.name!r} may make {key.rate_per_s:g} requests a second here",
                          headers={"Retry-After": str(max(1, math.ceil(wait)))})
        return key

    async def _json(self, request: web.Request) -> Any:
        if request.content_type != "application/json":
            raise Problem(415, "unsupported-media-type", "Unsupported Media Type", "send application/json")
        try:
            return json.loads(await request.read())
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise Problem(400, "invalid-json", "Bad Request", "the body is not JSON") from None

    async def _audit(self, request: web.Request, key: ApiKey | None, action: str, target: str, result: str) -> None:
        entry = AuditEntry(at=time.time(), key_name=key.name if key else None, source_ip=request.remote or "",
                           action=action, target=target[:500], result=result,
                           request_id=request[REQUEST_CONTEXT]["request_id"])
        try:
            await self._pipeline().committer.submit(Audit(entries=(entry,)))
        except StorageUnavailable as exc:  # the write itself was committed: an audit row lost is logged
            self._log.error("api.audit_failed", action=action, target=target, error=str(exc))

    # ── the endpoints ───────────────────────────────────────────────────────────────────────

    async def openapi(self, request: web.Request, key: ApiKey | None) -> web.StreamResponse:
        return web.Response(body=self._openapi, content_type="application/json")

    async def push_one(self, request: web.Request, key: ApiKey | None) -> web.StreamResponse:
        item = pushed_return(await self._json(request))
        if isinstance(item, QuarantinedItem):
            await self._audit(request, key, "returns.push", "1 rejected", "invalid-return")
            raise Problem(422, "invalid-return", "Unprocessable Content", item.reason)
        result = await self._commit_pushed([item], key)
        await self._audit(request, key, "returns.push", item.id, "ok")
        story = await self._store.story(item.id)
        return_id = return_named(item.id, story) or item.id
        return web.json_response(api_return(return_id, story), status=201 if result.returns_added else 200,
                                 headers={"Location": f"/v1/returns/{urllib.parse.quote(return_id, safe=':')}"})

    async def push_batch(self, request: web.Request, key: ApiKey | None) -> web.StreamResponse:
        body = await self._json(request)
        raw = body.get("returns") if isinstance(body, dict) and set(body) == {"returns"} else None
        if not isinstance(raw, list) or not raw:
            raise Problem(422, "invalid-batch", "Unprocessable Content", 'send {"returns": [ … ]}, 1 to 500 of them')
        if len(raw) > API_BATCH_MAX:
            raise Problem(422, "batch-too-large", "Unprocessable Content", f"at most {API_BATCH_MAX} returns a batch")
        checked = [pushed_return(r) for r in raw]
        accepted = [item for item in checked if isinstance(item, ReturnItem)]
        result = await self._commit_pushed(accepted, key) if accepted else CommitResult()
        added = result.returns_added
        results = [{"index": i, "id": item.id, "status": "accepted"} if isinstance(item, ReturnItem)
                   else {"index": i, "id": item.return_id, "status": "rejected", "reason": item.reason}
                   for i, item in enumerate(checked)]
        rejected = len(checked) - len(accepted)
        await self._audit(request, key, "returns.push_batch", f"{len(accepted)} accepted ({added} new), "
                                                              f"{rejected} rejected", "ok")
        return web.json_response({"accepted": len(accepted), "new": added, "rejected": rejected, "results": results})

    async def _commit_pushed(self, items: Sequence[ReturnItem], key: ApiKey | None) -> CommitResult:
        page = FeedPage(items=tuple(items), quarantined=(), next_cursor=None, has_more=False,
                        first_checks=first_checks(items, time.time(), self._pipeline().schedule.first_check_in()),
                        source=key.name if key is not None else "api")
        result = await self._submit(page)
        self._pipeline().pushed(page, result)
        return result

    async def get_return(self, request: web.Request, key: ApiKey | None) -> web.StreamResponse:
        name = request.match_info["id"]
        story = await self._store.story(name)
        return_id = return_named(name, story)
        if return_id is None:
            raise Problem(404, "not-found", "Not Found", f"no return {name!r}")
        return web.json_response(api_return(return_id, story))

    async def list_returns(self, request: web.Request, key: ApiKey | None) -> web.StreamResponse:
        query = request.query
        state = query.get("state")
        if state is not None and state not in {*(s.value for s in BoxState), *(s.value for s in ReportState)}:
            raise Problem(400, "invalid-parameter", "Bad Request", f"state: not a box or report state: {state[:40]!r}")
        since = unix_seconds(query["since"]) if "since" in query else 0.0
        try:
            limit = int(query.get("limit", "100"))
            after = int(query["cursor"], 36) if "cursor" in query else 0
        except (ValueError, OverflowError):
            limit = after = -1
        if since is None or not 1 <= limit <= API_LIST_MAX or not 0 <= after < 36 ** 12:
            raise Problem(400, "invalid-parameter", "Bad Request",
                          f"since is a date, limit 1 to {API_LIST_MAX}, cursor a next_cursor")
        for field in ("order_number", "shipment_number"):
            if field in query:
                if not printable_or_none(query[field]):
                    raise Problem(400, "invalid-parameter", "Bad Request", f"{field}: 1 to {MAX_FIELD_CHARS} printable "
                                                                           "characters")
                story = await self._store.story(query[field])
                found = [api_return(r["id"], story) for r in story["returns"] if r[field] == query[field]]
                return web.json_response({"returns": found, "next_cursor": None, "has_more": False})
        rows = await self._store.list_returns(after=after, since=since, state=state, limit=limit + 1)
        page = rows[:limit]
        found = []
        for return_id, _ in page:
            story = await self._store.story(return_id)
            if any(r["id"] == return_id for r in story["returns"]):  # retention may have taken it meanwhile
                found.append(api_return(return_id, story))
        more = len(rows) > limit
        return web.json_response({"returns": found, "has_more": more,
                                  "next_cursor": _base36(page[-1][1]) if more and page else None})

    async def get_shipment(self, request: web.Request, key: ApiKey | None) -> web.StreamResponse:
        shipment = request.match_info["shipment_number"]
        story = await self._store.story(shipment)
        box = next((b for b in story["boxes"] if b["shipment_number"] == shipment), None)
        if box is None:
            raise Problem(404, "not-found", "Not Found", f"no shipment {shipment!r}")
        returns = [api_return(r["id"], story) for r in story["returns"] if r["shipment_number"] == shipment]
        return web.json_response({**api_box(box, story), "returns": returns})

    async def check(self, request: web.Request, key: ApiKey | None) -> web.StreamResponse:
        shipment = request.match_info["shipment_number"]
        result = await self._submit(CheckNow(shipment_number=shipment, cooldown_s=CHECK_COOLDOWN_S))
        if shipment in result.checks_queued:
            self._pipeline().tracker.wake()
            await self._audit(request, key, "shipments.check", shipment, "ok")
            return web.json_response({"shipment_number": shipment, "check": "queued"}, status=202)
        found = await self._store.box_check_state(shipment)
        outcome, last = found if found is not None else (None, None)
        if outcome == BoxState.TRACKING:
            outcome = "cooling"
        slug = {None: "not-found", "cooling": "check-cooling-down"}.get(outcome, "shipment-closed")
        await self._audit(request, key, "shipments.check", shipment, slug)
        if outcome is None:
            raise Problem(404, "not-found", "Not Found", f"no shipment {shipment!r}")
        if outcome == "cooling":
            wait = max(1, math.ceil((last or 0) + CHECK_COOLDOWN_S - time.time()))
            raise Problem(429, "check-cooling-down", "Too Many Requests",
                          f"{shipment} was asked for a check less than {CHECK_COOLDOWN_S:g} s ago",
                          headers={"Retry-After": str(wait)})
        raise Problem(409, "shipment-closed", "Conflict", f"{shipment} is {outcome}: no longer tracked", state=outcome)


def _address_in(address: str, cidrs: Sequence[str]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def _base36(number: int) -> str:
    digits = ""
    while True:
        number, digit = divmod(number, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[digit] + digits
        if not number:
            return digits


async def start_api_server(api: ShopApi, host: str, port: int) -> tuple[web.AppRunner, str]:
    # a request still running at shutdown gets a second: the committer closes right after
    runner = web.AppRunner(api.application(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    return runner, f"{bound_host}:{bound_port}"


# ── the API's own process ───────────────────────────────────────────────────────────────────
# A lookup costs about a millisecond of CPU (HTTP, the key, the story's read and its JSON): at
# 200 a second a fifth of the core the pipeline runs on. With [api] own_process the daemon
# starts `tracker.py api-process`, which listens on [api] listen, answers every read from a
# read-only connection of its own and hands each write — once its key passed — to the daemon
# over a socket in a private directory. Its setup (the config, the socket's path) comes on its
# stdin, never in its arguments or environment; it leaves when its stdin closes (the daemon
# ended, however it ended) or on SIGTERM. The daemon's /metrics carries its metrics too.

API_PROCESS_COMMAND = "api-process"
HELPER_START_S = 30.0  # a helper process's start, to its first line (the API's, the webhooks')
HELPER_RESTART_S = (1.0, 30.0)  # backoff after one died, from…to
# Below the daemon in the kernel's scheduling: where the two want one core at once, the
# pipeline gets it first (about 10:1), and a lookup waits a fraction of a millisecond.
API_PROCESS_NICE = 10


class HelperProcess:
    """The daemon's side of a process of its own (`tracker.py api-process`, `webhook-process`):
    the socket its requests to the daemon come in on (`desk`), the process started and kept
    running (started again, with backoff, if it dies), its metrics fetched for /metrics, a line
    to it on its stdin, its end."""

    def __init__(self, config: Config, command: str, title: str, desk: web.Application, log: Logger) -> None:
        self._config = config
        self._command = command
        self.name = command.removesuffix("-process")  # its log lines'
        self.title = title  # what readiness and errors call it
        self._desk = desk
        self._log = log
        self._directory = Path(tempfile.mkdtemp(prefix=f"tracker-{self.name}-"))  # 0700: only this user connects
        self._daemon_socket = str(self._directory / "daemon.sock")  # its requests come in here
        self._metrics_socket = str(self._directory / "metrics.sock")  # its metrics are read here
        self._runner: web.AppRunner | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._metrics_session: aiohttp.ClientSession | None = None
        self.address: str | None = None  # where it listens, if it does
        self.running = False

    async def start(self) -> str | None:
        """The daemon's socket listening and the process ready; where it listens, if it does."""
        self._runner = web.AppRunner(self._desk, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.UnixSite(self._runner, self._daemon_socket).start()
        self._metrics_session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=self._metrics_socket),
            timeout=aiohttp.ClientTimeout(total=5))
        return await self._spawn()

    async def _spawn(self) -> str | None:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).resolve()), self._command,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert process.stdin is not None and process.stdout is not None
        setup = {"config": dataclasses.asdict(self._config), "daemon_socket": self._daemon_socket,
                 "metrics_socket": self._metrics_socket}
        process.stdin.write(json.dumps(setup).encode() + b"\n")
        await process.stdin.drain()
        try:
            async with asyncio.timeout(HELPER_START_S):
                line = await process.stdout.readline()
        except TimeoutError:
            line = b""
        try:
            address = json.loads(line)["ready"]
        except (ValueError, KeyError, TypeError):
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            code = await process.wait()
            raise OSError(f"{self.title} did not start (exit {code}); its error is logged above") from None
        self._process, self.address, self.running = process, address, True
        self._log.info(f"{self.name}.listening" if address else f"{self.name}.started", address=address,
                       pid=process.pid)
        return address

    def tell(self) -> None:
        """A line on its stdin (the webhooks' process: deliveries were queued). Lines not read yet
        are enough: it is not told again until it has read them."""
        process = self._process
        if process is not None and process.stdin is not None and not process.stdin.is_closing():
            if process.stdin.transport.get_write_buffer_size() == 0:
                process.stdin.write(b"\n")

    async def keep_running(self, stop: StopSignal) -> None:
        """Started again whenever it dies, until the daemon stops."""
        delay = HELPER_RESTART_S[0]
        while not stop.is_set():
            assert self._process is not None
            code = await self._process.wait()
            self.running = False
            if stop.is_set():
                return
            self._log.error(f"{self.name}.process_exited", code=code, restart_in_s=delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()
            if stop.is_set():
                return
            try:
                await self._spawn()
                delay = HELPER_RESTART_S[0]
            except OSError as exc:
                self._log.error(f"{self.name}.process_failed", error=str(exc))
                delay = min(delay * 2, HELPER_RESTART_S[1])

    async def exposition(self) -> bytes:
        """Its metrics, or none while it does not answer (a scrape never fails for it)."""
        if self._metrics_session is None or not self.running:
            return b""
        try:
            async with self._metrics_session.get("http://tracker/metrics") as answer:
                return await answer.read() if answer.status == 200 else b""
        except (aiohttp.ClientError, TimeoutError):
            return b""

    async def close(self, within_s: float = 5.0) -> None:
        """Its stdin closed (it finishes and leaves), waited for `within_s`, then killed."""
        process, self._process, self.running = self._process, None, False
        if process is not None and process.returncode is None:
            assert process.stdin is not None
            process.stdin.close()
            try:
                async with asyncio.timeout(within_s):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        session, self._metrics_session = self._metrics_session, None
        if session is not None:
            await session.close()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        shutil.rmtree(self._directory, ignore_errors=True)


async def helper_setup(stdin: asyncio.StreamReader, logger: str) -> tuple[dict[str, Any], Config, Logger]:
    """In a helper process: its setup from the daemon, our parent, on stdin; its config; its log."""
    setup = json.loads(await stdin.readline())
    config = _typed_config(setup["config"])
    REDACT.set_secrets(config.secrets)
    configure_logging(config.log.level, sys.stderr)
    return setup, config, structlog.get_logger(logger)


async def serve_metrics_on(path: str, registry: prometheus_client.CollectorRegistry) -> web.AppRunner:
    """A helper process's metrics, for the daemon's /metrics to carry."""
    async def metrics_page(_request: web.Request) -> web.Response:
        return web.Response(body=prometheus_client.generate_latest(registry),
                            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics_page)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.UnixSite(runner, path).start()
    return runner


async def listening_soon(api: ShopApi, host: str, port: int) -> tuple[web.AppRunner, str]:
    """The port may still be held for a moment by the process before this one, finishing its last
    requests after its daemon died and a new daemon started this one."""
    deadline = time.monotonic() + HELPER_START_S / 2
    while True:
        try:
            return await start_api_server(api, host, port)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def serve_api_process(stdin: asyncio.StreamReader) -> None:
    """`tracker.py api-process`: the API's own process, as HelperProcess starts it."""
    os.nice(API_PROCESS_NICE)
    setup, config, log = await helper_setup(stdin, "tracker.api")
    registry = prometheus_client.CollectorRegistry()
    store = await open_store(config.storage, readonly=True)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=setup["daemon_socket"]),
                                         timeout=aiohttp.ClientTimeout(total=60)) as daemon:
            api = ShopApi(config, store, ApiMetrics(registry), log, daemon=daemon)
            runner, address = await listening_soon(api, config.api.host, config.api.port)
            metrics_runner = await serve_metrics_on(setup["metrics_socket"], registry)
            print(json.dumps({"ready": address}), flush=True)
            stopped = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
            async with asyncio.TaskGroup() as tasks:
                until_eof = tasks.create_task(stdin.read())  # the daemon closed it, or died
                until_signal = tasks.create_task(stopped.wait())
                await asyncio.wait({until_eof, until_signal}, return_when=asyncio.FIRST_COMPLETED)
                until_eof.cancel()
                until_signal.cancel()
            await runner.cleanup()
            await metrics_runner.cleanup()
    finally:
        await store.close()


HELPERS: dict[str, Callable[[asyncio.StreamReader], Awaitable[None]]] = {
    API_PROCESS_COMMAND: serve_api_process, WEBHOOK_PROCESS_COMMAND: serve_webhook_process}


async def run_helper(serve: Callable[[asyncio.StreamReader], Awaitable[None]]) -> None:
    """A helper process (HelperProcess), its setup and its end on its stdin."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # a Ctrl-C stops the daemon, which closes our stdin
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin.buffer)
    await serve(stdin)


# ════════════════════════════════════════════════════════════════════════════════════════════
# Observability and HTTP — JSON logs with secrets redacted, Prometheus metrics, and the daemon's
# own small HTTP server (/healthz, /readyz, /metrics) on the event loop: no second server thread.
# ════════════════════════════════════════════════════════════════════════════════════════════


class Redactor:
    """Replaces every known secret in log fields and alert texts, whatever field it hides in."""

    MASK = "[redacted]"

    def __init__(self) -> None:
        self._secrets: tuple[str, ...] = ()

    def set_secrets(self, secrets: Iterable[str]) -> None:
        self._secrets = tuple(s for s in secrets if len(s) >= 4)

    def add_secrets(self, secrets: Iterable[str]) -> None:
        """A replaced token stays a secret: old log lines and messages may still carry it."""
        self.set_secrets((*self._secrets, *secrets))

    def text(self, value: str) -> str:
        for secret in self._secrets:
            if secret in value:
                value = value.replace(secret, self.MASK)
        return value

    def rendered(self, _logger: Any, _method: str, line: str) -> str:
        """The last processor, on the finished line: whatever field, nesting or traceback a secret
        hid in, it is caught here; so is any bearer token, known or not."""
        return self.text(BEARER_TOKEN.sub("Bearer " + self.MASK, line))

    def __call__(self, _logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        """Before rendering: an Authorization field is masked whatever it holds (a scheme other
        than Bearer, a token we never knew). Secrets in values are caught on the finished line."""
        for key in event:
            if key.lower() == "authorization":
                event[key] = self.MASK
        return event


REDACT = Redactor()
BEARER_TOKEN = re.compile(r"Bearer\s+[^\s\"',;]+")


def configure_logging(level: str, stream: typing.TextIO | None = None) -> None:
    stream = stream or sys.stdout
    tty = stream.isatty()
    renderer: Any = structlog.dev.ConsoleRenderer(colors=True) if tty else structlog.processors.JSONRenderer()
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if not tty:  # tracebacks without their frames' locals: a local may hold a key or a token
        processors.append(structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)))
    final_chain: list[Any] = [*processors, REDACT, renderer, REDACT.rendered]  # the last one gets the line
    structlog.configure(
        processors=final_chain,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )


class Metrics:
    """Every metric the daemon exports, in a registry of its own (tests run several daemons)."""

    def __init__(self, *, api_here: bool = True) -> None:
        r = self.registry = prometheus_client.CollectorRegistry()
        self.partner_calls = prometheus_client.Counter(
            "tracker_partner_calls_total", "Partner API calls by endpoint and outcome.",
            ["endpoint", "outcome"], registry=r)
        self.partner_latency = prometheus_client.Histogram(
            "tracker_partner_call_duration_seconds", "Partner API call latency, including failures.",
            ["endpoint"], registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.partner_in_flight = prometheus_client.Gauge(
            "tracker_partner_calls_in_flight", "Partner API calls awaiting an answer.", ["endpoint"], registry=r)
        self.returns_collected = prometheus_client.Counter(
            "tracker_returns_collected_total", "New returns stored from the feed.", registry=r)
        self.returns_corrected = prometheus_client.Counter(
            "tracker_returns_corrected_total", "Relisted returns whose fields changed, by changed field.",
            ["field"], registry=r)
        self.returns_quarantined = prometheus_client.Counter(
            "tracker_returns_quarantined_total", "Feed items set aside as unusable.", registry=r)
        self.reports_queued = prometheus_client.Counter(
            "tracker_reports_queued_total", "Reports queued because their box was delivered.", registry=r)
        self.reports = prometheus_client.Counter(
            "tracker_report_attempts_total",
            "Report attempts by outcome (recorded, duplicate, refused, retry, deferred).",
            ["outcome"], registry=r)
        self.boxes_closed = prometheus_client.Counter(
            "tracker_boxes_closed_total", "Boxes that left tracking, by final state.", ["state"], registry=r)
        # The API's own metrics are kept where it is served: here, or in its own process; the
        # webhooks' senders' in theirs. `elsewhere` fetches those processes' expositions for /metrics.
        self.api = ApiMetrics(r) if api_here else None
        self.elsewhere: list[Callable[[], Awaitable[bytes]]] = []
        self.webhook_pending = prometheus_client.Gauge(
            "tracker_webhook_pending", "Webhook deliveries not made yet, by endpoint.", ["endpoint"], registry=r)
        self.webhook_oldest_pending_age = prometheus_client.Gauge(
            "tracker_webhook_oldest_pending_age_seconds", "Age of the oldest delivery not made yet, by endpoint.",
            ["endpoint"], registry=r)
        self.webhook_disabled = prometheus_client.Gauge(
            "tracker_webhook_endpoint_disabled", "1 while an endpoint is disabled (410, or failing too long).",
            ["endpoint"], registry=r)
        self.webhook_failing_since = prometheus_client.Gauge(
            "tracker_webhook_endpoint_failing_since_timestamp_seconds", "When an endpoint's deliveries began to "
            "fail without a success since (Unix time); 0 while its last answer was a success.", ["endpoint"],
            registry=r)
        self.claims_lost = prometheus_client.Counter(
            "tracker_claims_lost_total", "Answers not stored because their claim ran out and another instance "
            "took the item (PostgreSQL, several instances), by stage.", ["stage"], registry=r)
        self.fleet_instances = prometheus_client.Gauge(
            "tracker_fleet_instances", "Live instances sharing the database and the partner's limits (1 on SQLite).",
            registry=r)
        self.feed_leader = prometheus_client.Gauge(
            "tracker_feed_leader", "1 while this instance pages the returns feed.", registry=r)
        self.unknown_statuses = prometheus_client.Counter(
            "tracker_unknown_statuses_total", "Tracking answers with a status not in the contract.", registry=r)
        self.alerts = prometheus_client.Counter(
            "tracker_alerts_total", "Slack alerts by outcome (sent, folded, dropped, failed, disabled).",
            ["outcome"], registry=r)
        self.feed_last_success = prometheus_client.Gauge(
            "tracker_feed_last_success_timestamp_seconds", "When a feed page was last stored.", registry=r)
        self.feed_rewound = prometheus_client.Counter(
            "tracker_feed_rewound", "Feed pages not stored because the database no longer held the cursor they "
            "were read from (it lost its latest commits): the feed was read again from the stored one.", registry=r)
        self.partner_rate = prometheus_client.Gauge(
            "tracker_partner_rate_limit_per_second", "The adaptive call rate in force, by endpoint.",
            ["endpoint"], registry=r)
        self.partner_limit_measured = prometheus_client.Gauge(
            "tracker_partner_limit_measured_per_second",
            "The partner's rate limit as last measured: calls it let through per second while refusing "
            "some, by endpoint (NaN until it first refused one).", ["endpoint"], registry=r)
        self.circuit_state = prometheus_client.Gauge(
            "tracker_partner_circuit_state", "1 for the circuit's current state (closed, open, half_open).",
            ["endpoint", "state"], registry=r)
        self.boxes = prometheus_client.Gauge(
            "tracker_boxes", "Boxes in the database, by state.", ["state"], registry=r)
        self.reports_by_state = prometheus_client.Gauge(
            "tracker_reports", "Reports in the database, by state.", ["state"], registry=r)
        self.quarantine_open = prometheus_client.Gauge(
            "tracker_quarantine_open", "Quarantined feed items not yet resolved.", registry=r)
        self.outbox_pending = prometheus_client.Gauge(
            "tracker_outbox_pending", "Reports queued and not yet accepted by the partner.", registry=r)
        self.boxes_overdue = prometheus_client.Gauge(
            "tracker_boxes_overdue", "Boxes not collected schedule.overdue_after_s after their first return was "
            "requested, still tracked.", registry=r)
        self.outbox_oldest_age = prometheus_client.Gauge(
            "tracker_outbox_oldest_age_seconds", "Age of the oldest pending report (0 when none).", registry=r)
        self.report_delay = prometheus_client.Histogram(
            "tracker_report_delay_seconds", "From a box seen delivered to its report accepted by the partner.",
            registry=r, buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400))
        self.detect_delay = prometheus_client.Histogram(
            "tracker_delivery_detect_delay_seconds",
            "From the partner's delivered time to the check that saw it (the tracking schedule's aim).",
            registry=r, buckets=(60, 300, 600, 900, 1200, 1800, 3600, 7200, 21600, 86400))
        self.box_checks = prometheus_client.Histogram(
            "tracker_box_checks", "Tracking calls a box took, counted when it closes.",
            registry=r, buckets=(1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233))
        self.db_commit_latency = prometheus_client.Histogram(
            "tracker_db_commit_duration_seconds", "Database transaction latency (one batch of transitions).",
            registry=r, buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))
        self.token_refused = prometheus_client.Gauge(
            "tracker_partner_token_refused", "1 while the partner answers 401 to our token, by endpoint.",
            ["endpoint"], registry=r)
        self.db_writable = prometheus_client.Gauge(
            "tracker_db_writable", "1 when the state database accepts writes.", registry=r)
        self.info = prometheus_client.Info("tracker", "Build information.", registry=r)
        self.info.info({"version": VERSION})
        prometheus_client.ProcessCollector(registry=r)
        prometheus_client.PlatformCollector(registry=r)
        self.retries_deferred = prometheus_client.Counter(
            "tracker_partner_retries_deferred_total", "Retries not sent because the retry budget was spent.",
            ["endpoint"], registry=r)
        for endpoint in Endpoint:
            self.partner_latency.labels(endpoint.value)
            self.partner_in_flight.labels(endpoint.value)
            self.retries_deferred.labels(endpoint.value)
            self.token_refused.labels(endpoint.value).set(0)
            self.set_circuit(endpoint.value, CircuitState.CLOSED)
            for call_outcome in Outcome:
                self.partner_calls.labels(endpoint.value, call_outcome.value)
        for alert_outcome in ("sent", "folded", "dropped", "failed", "disabled", "elsewhere"):
            self.alerts.labels(alert_outcome)
        for report_outcome in ("recorded", "duplicate", "refused", "retry", "deferred"):
            self.reports.labels(report_outcome)
        for state in (BoxState.DELIVERED, BoxState.CANCELLED, BoxState.STALE):
            self.boxes_closed.labels(state.value)
        for field in CORRECTABLE_FIELDS:
            self.returns_corrected.labels(field)
        for stage in ("track", "report"):
            self.claims_lost.labels(stage)
        self.fleet_instances.set(1)

    async def refresh_from(self, store: StateStore) -> dict[str, int]:
        """The gauges that count rows: refreshed on a timer, not per transition. Returns the counts."""
        counts = await store.counts()
        for box_state in BoxState:
            self.boxes.labels(box_state.value).set(counts.get(f"boxes.{box_state.value}", 0))
        for report_state in ReportState:
            self.reports_by_state.labels(report_state.value).set(counts.get(f"reports.{report_state.value}", 0))
        self.quarantine_open.set(counts.get("quarantine.open", 0))
        self.outbox_pending.set(counts.get(f"reports.{ReportState.PENDING.value}", 0))
        oldest = await store.oldest_pending_report_queued_at()
        self.outbox_oldest_age.set(0 if oldest is None else max(0.0, time.time() - oldest))
        if store.announces:
            for endpoint in await store.webhook_endpoints():
                self.webhook_pending.labels(endpoint["name"]).set(endpoint["pending"])
                age = 0.0 if endpoint["oldest_pending_at"] is None else time.time() - endpoint["oldest_pending_at"]
                self.webhook_oldest_pending_age.labels(endpoint["name"]).set(max(0.0, age))
                self.webhook_disabled.labels(endpoint["name"]).set(0 if endpoint["disabled_at"] is None else 1)
                self.webhook_failing_since.labels(endpoint["name"]).set(endpoint["failing_since"] or 0)
        return counts

    def set_circuit(self, endpoint: str, state: CircuitState) -> None:
        for each in CircuitState:
            self.circuit_state.labels(endpoint, each.value).set(1 if each is state else 0)

    async def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry) + b"".join([await e() for e in self.elsewhere])


class ApiMetrics:
    """The shop's API's metrics, in the registry of the process that serves it."""

    def __init__(self, registry: prometheus_client.CollectorRegistry) -> None:
        self.registry = registry
        self.requests = prometheus_client.Counter(
            "tracker_api_requests_total", "Requests to the shop's API, by route and HTTP status.",
            ["route", "status"], registry=registry)
        self.latency = prometheus_client.Histogram(
            "tracker_api_request_duration_seconds", "The shop's API: time to answer, by route.", ["route"],
            registry=registry, buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.refusals = prometheus_client.Counter(
            "tracker_api_refusals_total", "Requests to the shop's API refused: no or a bad key, a missing scope, "
            "an address not allowed, a rate exceeded.", ["reason"], registry=registry)


class WebhookMetrics:
    """The senders' metrics, in the registry of the webhooks' process."""

    def __init__(self, registry: prometheus_client.CollectorRegistry) -> None:
        self.deliveries = prometheus_client.Counter(
            "tracker_webhook_deliveries_total", "Webhook delivery attempts by endpoint and what became of the "
            "delivery (delivered; pending: to be tried again; failed: its retry schedule ran out).",
            ["endpoint", "state"], registry=registry)
        self.latency = prometheus_client.Histogram(
            "tracker_webhook_delivery_duration_seconds", "Time for a webhook receiver to answer, by endpoint.",
            ["endpoint"], registry=registry, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))


async def start_http_server(listen_host: str, listen_port: int, metrics: Metrics,
                            health: Callable[[], dict[str, Any]],
                            readiness: Callable[[], list[str]]) -> tuple[web.AppRunner, str]:
    """Only GET (and HEAD) on these three paths; aiohttp answers 404/405 to anything else."""

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response(health())  # answering at all proves the event loop runs

    async def readyz(_request: web.Request) -> web.Response:
        problems = readiness()
        return web.json_response({"ready": not problems, "problems": problems}, status=503 if problems else 200)

    async def metrics_page(_request: web.Request) -> web.Response:
        return web.Response(body=await metrics.exposition(),
                            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, listen_host, listen_port)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"{host}:{port}"


# ════════════════════════════════════════════════════════════════════════════════════════════
# The daemon and its housekeeping — the daemon owns every task in task groups. One way to stop:
# Daemon.stop() (SIGTERM, SIGINT, a failed stage, the end of `once`) sets the StopSignal; then,
# in order (Daemon._shut_down): calls in flight get `shutdown_grace_s` to finish and commit, the
# rest are cancelled (they stay pending in the database), the chores end, the committer commits
# what it was handed, pending alerts get ALERT_FLUSH_S. Beside the stages, Housekeeping keeps
# the gauges, overdue pickups (OverdueWatch), the writability probe, retention, the fleet's
# count and the token re-read on SIGHUP; SystemdNotifier speaks sd_notify.
# ════════════════════════════════════════════════════════════════════════════════════════════


class SystemdNotifier:
    """The sd_notify protocol over $NOTIFY_SOCKET (Type=notify): READY=1 once the database is open
    and the server listens, WATCHDOG=1 from the event loop at half of WatchdogSec (a hung loop stops
    the pings and systemd restarts the service), STOPPING=1 on shutdown. A no-op outside systemd."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address  # '@': abstract namespace
        watchdog_usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        for_us = not watchdog_pid or watchdog_pid == str(os.getpid())
        self.watchdog_interval_s = int(watchdog_usec) / 2e6 if watchdog_usec.isdigit() and for_us else None

    def notify(self, message: str) -> None:
        if not self._address:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)  # a datagram to a local socket: never waits
            with contextlib.suppress(OSError):  # systemd gone or not listening: nothing to tell
                sock.sendto(message.encode(), self._address)

    async def keep_watchdog_fed(self) -> None:
        if self.watchdog_interval_s is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval_s)


ALERT_FLUSH_S = 2.0  # at shutdown, pending alerts get this long to reach Slack
OVERDUE_ALERT_EVERY_S = 3600.0  # while pickups are overdue, Slack hears of them this often at most
OVERDUE_ALERT_NAMES = 5  # the oldest overdue shipments an alert names
OVERDUE_ANNOUNCE_EVERY_S = 60.0  # pickup.overdue for boxes that became overdue meanwhile, at the latest
HOUSEKEEPING_EVERY_S = 5.0
RETENTION_BACKLOG_EVERY_S = 0.5  # between retention batches while finished rows past keep_days remain


class OverdueWatch:
    """Pickups not collected overdue_after_s after their return was requested: the gauge, one
    Slack message an hour at most while any are, and one when none are any more; with webhooks,
    pickup.overdue once a box (written when the count of them changes, and every minute)."""

    def __init__(self, config: Config, store: StateStore, committer: Committer, alerts: "Alerter",
                 metrics: "Metrics", log: Logger) -> None:
        self._overdue_after_s = config.schedule.overdue_after_s
        self._store = store
        self._committer = committer
        self._alerts = alerts
        self._metrics = metrics
        self._log = log
        self._alerted_at = -math.inf
        self._announced: tuple[int, float] = (0, -math.inf)  # the count then, and when

    async def check(self, now: float) -> None:
        count, oldest = await self._store.overdue(now - self._overdue_after_s)
        self._metrics.boxes_overdue.set(count)
        if count and self._store.announces and (count != self._announced[0]
                                                or now - self._announced[1] >= OVERDUE_ANNOUNCE_EVERY_S):
            with contextlib.suppress(StorageUnavailable):  # the next check writes them
                await self._committer.submit(AnnounceOverdue(before=now - self._overdue_after_s))
                self._announced = (count, now)
        if count and now - self._alerted_at >= OVERDUE_ALERT_EVERY_S:
            sample = [row[0] for row in await self._store.overdue_boxes(now - self._overdue_after_s,
                                                                         OVERDUE_ALERT_NAMES)]
            age = now - (oldest or now)
            self._alerts.alert(*overdue_alert(count, sample, self._overdue_after_s, age))
            self._log.warning("track.overdue", boxes=count, oldest_s=round(age))
            self._alerted_at = now
        elif not count and self._alerted_at > -math.inf:
            self._alerts.alert(*overdue_cleared_alert())
            self._alerted_at = -math.inf


class Housekeeping:
    """What the daemon does beside the stages: the row-count gauges, overdue pickups, the
    database's writability probe and retention every few seconds; the fleet's count and this
    instance's share of the limits; the token re-read on SIGHUP."""

    def __init__(self, config: Config, store: StateStore, stages: Stages, metrics: "Metrics", log: Logger,
                 config_path: Path | None = None) -> None:
        self.config = config
        self._store = store
        self._stages = stages
        self._metrics = metrics
        self._log = log
        self._config_path = config_path
        self._overdue = OverdueWatch(config, store, stages.committer, stages.alerts, metrics, log)

    async def keep_house(self) -> None:
        """Every few seconds — retention faster while a backlog of finished rows remains."""
        while True:
            backlog = False
            try:
                self._metrics.db_writable.set(1 if await self._stages.committer.probe() else 0)
                counts = await self._metrics.refresh_from(self._store)
                self._stages.schedule.tracked = counts.get(f"boxes.{BoxState.TRACKING.value}", 0)
                await self._overdue.check(time.time())
                backlog = await self._retain()
            except STORAGE_ERRORS as exc:
                self._log.warning("storage.read_failed", error=str(exc))
            await asyncio.sleep(RETENTION_BACKLOG_EVERY_S if backlog else HOUSEKEEPING_EVERY_S)

    async def _retain(self) -> bool:
        """One retention batch (storage.keep_days; 0 keeps everything). True when more remain."""
        keep_days = self.config.storage.keep_days
        if not keep_days:
            return False
        try:
            result = await self._stages.committer.submit(Prune(cutoff=time.time() - keep_days * 86400,
                                                               limit=RETENTION_BATCH))
        except StorageUnavailable:
            return False  # the committer has said so; the next tick tries again
        if result.pruned:
            self._log.info("storage.pruned", boxes=result.pruned, keep_days=keep_days)
        return result.pruned >= RETENTION_BATCH

    async def keep_fleet(self) -> None:
        """Count the fleet every FLEET_COUNT_EVERY_S and take this instance's share of the
        partner's limits (a dead instance's share comes back within a count); every lease_s / 4
        renew what this instance holds (its claims, the feed's lease). On a failed count the share
        stays as it was. On SQLite: the fleet of one."""
        fleet, stages = self._store.fleet, self._stages
        instances = 1
        renew_every = max(0.5, self.config.storage.lease_s / 4)
        renewed_at = -math.inf
        while True:
            try:
                if time.monotonic() - renewed_at >= renew_every:
                    renewed_at = time.monotonic()
                    await fleet.renew(stages.tracker.held(), stages.reporter.held())
                live = await fleet.count()
            except STORAGE_ERRORS as exc:
                self._log.warning("storage.read_failed", stage="fleet", error=str(exc))
            else:
                if live != instances:
                    self._log.info("fleet.changed", instances=live, rate_per_s=self.config.limits.rate_per_s / live)
                    stages.client.share_limits(live)
                instances = live
                self._metrics.fleet_instances.set(live)
            self._metrics.feed_leader.set(1 if fleet.leads_feed else 0)
            await asyncio.sleep(FLEET_COUNT_EVERY_S)

    def reload_token(self) -> None:
        """SIGHUP: read the token again from where `run` read it (config file, environment,
        systemd credential). Only the token changes; other settings need a restart."""
        if self._config_path is None:
            return
        try:
            fresh = load_config(self._config_path)
        except ConfigError as exc:
            self._log.error("config.reload_failed", error=str(exc))
            return
        changed = fresh.partner.token != self.config.partner.token
        if changed:
            REDACT.add_secrets([fresh.partner.token])
            self.config = dataclasses.replace(self.config, partner=dataclasses.replace(
                self.config.partner, token=fresh.partner.token))
        self._stages.client.set_token(self.config.partner.token)
        self._stages.wake_feed()  # a feed loop resting after a 401 tries the new token now
        # The token is now the same in both: any section that still differs keeps its old values.
        ignored = [f.name for f in dataclasses.fields(Config) if getattr(fresh, f.name) != getattr(self.config, f.name)]
        self._log.info("config.reloaded", token_changed=changed, needs_restart_for=ignored or None)


class StageFailed(Exception):
    """A stage ended on an error it was not built to handle: the daemon stopped (exit 1)."""


class Daemon:
    """Owns every task. One way to stop: `stop()` (SIGTERM, SIGINT, a failed stage, the end of a
    `once` pass) sets the one StopSignal the stages watch; what follows, in order, is decided in
    `_shut_down` alone."""

    def __init__(self, config: Config, log: Logger | None = None, config_path: Path | None = None) -> None:
        self.config = config
        self._config_path = config_path
        self.log: Logger = log or structlog.get_logger("tracker")
        self.metrics = Metrics(api_here=not (config.api.listen and config.api.own_process))
        self.http_address: str | None = None
        self._api_address: str | None = None
        self._api_runner: web.AppRunner | None = None
        self._api_process: HelperProcess | None = None
        self._webhook_process: HelperProcess | None = None
        self._api_reads: StateStore | None = None
        self._stop = StopSignal()
        self.store: StateStore | None = None  # once run() has opened it
        self._stages: Stages | None = None
        self._housekeeping: Housekeeping | None = None
        self.notifier = SystemdNotifier()
        self.started = asyncio.Event()
        self.failure: str | None = None  # what stopped it, when a stage failed
        REDACT.set_secrets(config.secrets)

    @property
    def api_address(self) -> str | None:
        """Where the shop's API listens, once started ([api] listen)."""
        return self._api_process.address if self._api_process is not None else self._api_address

    @property
    def tracking_schedule(self) -> TrackingSchedule | None:
        return self._stages.schedule if self._stages is not None else None

    def stop(self) -> None:
        if not self._stop.is_set():
            self.log.info("shutdown.requested")
            self.notifier.notify("STOPPING=1")
        self._stop.set()

    def reload_token(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.reload_token()

    async def run(self, *, once: bool = False) -> None:
        """Until stopped (`once`: one pass over what is due). Raises StageFailed after an orderly
        shutdown when a stage failed."""
        lock = None if self.config.storage.url else InstanceLock(self.config.storage.path)
        if lock is not None:
            lock.acquire()
        try:
            self.store = store = await open_store(self.config.storage)
            try:
                await self._run_with(store, once)
                with contextlib.suppress(*STORAGE_ERRORS):  # else its leases run out by themselves
                    await store.fleet.leave()
            finally:
                await store.close()
        finally:
            if lock is not None:
                lock.release()
        self.log.info("shutdown.complete")
        if self.failure is not None:
            raise StageFailed(self.failure)

    async def _run_with(self, store: StateStore, once: bool) -> None:
        config = self.config
        connector = aiohttp.TCPConnector(limit=config.limits.concurrency, ttl_dns_cache=300)
        # No aiohttp timeouts: partner.timeout_s bounds each whole exchange (connect, headers, body)
        # in PartnerClient, and aiohttp's own would only add timers to every call.
        timeouts = aiohttp.ClientTimeout()
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeouts) as partner_session,
            aiohttp.ClientSession() as slack_session,  # no partner headers ever reach Slack
        ):
            alerts = Alerter(config.slack.webhook_url, slack_session, self.metrics, self.log, REDACT.text,
                             store.fleet.alert_once)
            committer = Committer(store, self._on_committed, lambda exc: alerts.alert(*storage_alert(exc)),
                                  self.log, self.metrics.db_commit_latency)
            client = PartnerClient(config, partner_session, self.metrics,
                                   lambda breaker, previous, why: self._circuit_changed(alerts, breaker, previous, why),
                                   lambda endpoint, refused: self._token_changed(alerts, endpoint, refused))
            stages = Stages(config, store, client, committer, alerts, self.metrics, self.log, self._stop)
            histories = await store.closed_histories(time.time() - LEARN_FROM_DAYS * 86400)
            stages.schedule.restore(histories)  # what was learned before a restart is in the histories
            self.log.info("schedule.restored", boxes=len(histories))
            self._stages = stages
            await self._store_webhook_endpoints(store)
            housekeeping = Housekeeping(config, store, stages, self.metrics, self.log, self._config_path)
            self._housekeeping = housekeeping
            runner = None
            try:  # what started is closed however the start ends: an open connection's thread holds the exit
                if not once:
                    runner, self.http_address = await start_http_server(
                        config.http.host, config.http.port, self.metrics, self._health, self.readiness)
                    self.log.info("http.listening", address=self.http_address)
                    if config.api.listen:
                        # the API reads on a connection of its own: a lookup never queues behind the
                        # stages' due-work fetches (its writes go through the committer)
                        self._api_reads = await open_store(config.storage, readonly=True)
                        if config.api.own_process:
                            writes = ShopApi(config, self._api_reads, None, self.log, stages=stages)
                            self._api_process = HelperProcess(config, API_PROCESS_COMMAND, "the API's process",
                                                              writes.application(), self.log)
                            await self._api_process.start()
                            self.metrics.elsewhere.append(self._api_process.exposition)
                        else:
                            api = ShopApi(config, self._api_reads, self.metrics.api, self.log, stages=stages)
                            self._api_runner, self._api_address = await start_api_server(api, config.api.host,
                                                                                         config.api.port)
                            self.log.info("api.listening", address=self._api_address)
                    if config.webhook:
                        desk = OutboxDesk(store, committer, alerts, self.log)
                        self._webhook_process = HelperProcess(config, WEBHOOK_PROCESS_COMMAND, "the webhooks' process",
                                                              desk.application(), self.log)
                        await self._webhook_process.start()
                        self.metrics.elsewhere.append(self._webhook_process.exposition)
                self.log.info("daemon.started", mode="once" if once else "run", storage=config.storage.where,
                              partner=config.partner.base_url, concurrency=config.limits.concurrency,
                              rate_per_s=config.limits.rate_per_s)
                self.started.set()
                self.notifier.notify("READY=1")
                async with asyncio.TaskGroup() as tasks:
                    commit_task = tasks.create_task(committer.run(), name="committer")
                    alert_task = tasks.create_task(alerts.run(), name="alerts")
                    chores = [tasks.create_task(self.notifier.keep_watchdog_fed(), name="watchdog"),
                              tasks.create_task(housekeeping.keep_house(), name="housekeeping"),
                              tasks.create_task(housekeeping.keep_fleet(), name="fleet")]
                    for helper in self._helpers():
                        chores.append(tasks.create_task(helper.keep_running(self._stop), name=helper.name))
                    await self._run_stages(stages, once)
                    await self._shut_down(chores, committer, commit_task, alerts, alert_task)
            finally:
                await self._close_helpers()
                if runner is not None:
                    await runner.cleanup()

    async def _run_stages(self, stages: Stages, once: bool) -> None:
        """The three stages, each in its own task, until the stop signal; a stage that fails sets
        it, so the others drain as at SIGTERM."""
        grace = self.config.schedule.shutdown_grace_s
        async with asyncio.TaskGroup() as stage_tasks:
            if once:
                stage_tasks.create_task(self._stage("once", stages.one_pass(grace)), name="once")
                return
            collect = stage_tasks.create_task(self._stage("collect", stages.collect()), name="collect")
            if self._webhook_process is not None:
                stage_tasks.create_task(self._close_at_stop(self._webhook_process, grace), name="webhooks")
            stage_tasks.create_task(self._stage("track", stages.tracker.run(grace_s=grace)), name="track")
            stage_tasks.create_task(self._stage("report", stages.reporter.run(grace_s=grace)), name="report")
            stage_tasks.create_task(self._cancel_after_grace(collect, grace), name="shutdown-guard")

    async def _store_webhook_endpoints(self, store: StateStore) -> None:
        """The configured endpoints stored (before the committer runs: this is the only writer
        now), and the outbox switched on."""
        if self.config.webhook:
            endpoints = tuple((w.name, w.events, w.cancel_hold_s) for w in self.config.webhook)
            await store.commit([WebhookEndpoints(endpoints=endpoints)], time.time())
            store.announces = True

    async def _close_at_stop(self, helper: "HelperProcess", grace_s: float) -> None:
        """The webhooks' process told to stop when the stages are: its deliveries drain with theirs."""
        await self._stop.wait()
        await helper.close(within_s=grace_s + 5.0)

    def _helpers(self) -> list["HelperProcess"]:
        return [h for h in (self._api_process, self._webhook_process) if h is not None]

    async def _stage(self, name: str, work: Awaitable[None]) -> None:
        try:
            await work
        except Exception as exc:  # noqa: BLE001 — any failure of a stage stops the daemon, named
            cause: BaseException = exc
            while isinstance(cause, BaseExceptionGroup):  # a stage's calls run in a TaskGroup of its own
                cause = cause.exceptions[0]
            error = f"{type(cause).__name__}: {cause}"
            self.failure = f"the {name} stage failed: {error}"
            self.log.error("daemon.stage_failed", stage=name, error=error, exc_info=exc)
            self.stop()

    async def _cancel_after_grace(self, collect: asyncio.Task[None], grace: float) -> None:
        """A feed call in flight at shutdown gets the same grace as the others, then is cancelled;
        its page was not committed, so the cursor has not moved."""
        await self._stop.wait()
        _, pending = await asyncio.wait({collect}, timeout=grace)
        for task in pending:
            task.cancel()

    async def _shut_down(self, chores: Sequence[asyncio.Task[None]], committer: Committer,
                         commit_task: asyncio.Task[None], alerts: "Alerter", alert_task: asyncio.Task[None]) -> None:
        """The order of shutdown, once the stages have drained: the chores end, every transition
        already handed to the committer is committed, then pending alerts get ALERT_FLUSH_S."""
        self._stop.set()  # already, but for the end of a `once` pass
        await self._close_helpers()  # no request may hand the committer work once it closes
        for chore in chores:
            chore.cancel()
        committer.close()
        await commit_task
        alerts.close()
        _, pending = await asyncio.wait({alert_task}, timeout=ALERT_FLUSH_S)
        for task in pending:
            task.cancel()

    async def _close_helpers(self) -> None:
        for helper in self._helpers():
            await helper.close()
        if self._api_runner is not None:
            runner, self._api_runner = self._api_runner, None
            await runner.cleanup()
        if self._api_reads is not None:
            reads, self._api_reads = self._api_reads, None
            await reads.close()

    def _circuit_changed(self, alerts: "Alerter", breaker: CircuitBreaker, previous: CircuitState, why: str) -> None:
        endpoint = str(breaker.endpoint)
        self.log.warning("partner.circuit_changed", endpoint=endpoint, state=breaker.state.value,
                         previous=previous.value, why=why)
        if previous is CircuitState.CLOSED and breaker.state is CircuitState.OPEN:
            alerts.alert(*circuit_open_alert(endpoint, why))
        elif breaker.state is CircuitState.CLOSED:
            alerts.alert(*circuit_closed_alert(endpoint))

    def _token_changed(self, alerts: "Alerter", endpoint: Endpoint, refused: bool) -> None:
        self.metrics.token_refused.labels(endpoint.value).set(1 if refused else 0)
        if refused:
            self.log.error("partner.token_refused", endpoint=endpoint.value)
            alerts.alert(*token_refused_alert(endpoint.value))
        else:
            self.log.info("partner.token_accepted", endpoint=endpoint.value)
            alerts.alert(*token_accepted_alert(endpoint.value))

    def _on_committed(self, result: CommitResult) -> None:
        if result.returns_added:
            self.metrics.returns_collected.inc(result.returns_added)
        if result.quarantined_added:
            self.metrics.returns_quarantined.inc(result.quarantined_added)
        for correction in result.corrections:
            for field in correction.fields:
                self.metrics.returns_corrected.labels(field).inc()
        if result.reports_queued:
            self.metrics.reports_queued.inc(result.reports_queued)
            if self._stages is not None:
                self._stages.reporter.wake()
        if (result.deliveries_queued or result.enabled_endpoints) and self._webhook_process is not None:
            self._webhook_process.tell()

    def _health(self) -> dict[str, Any]:
        return {"status": "ok", "version": VERSION, "stopping": self._stop.is_set()}

    def readiness(self) -> list[str]:
        """Why the daemon cannot do its work now (what /readyz says); empty when it can."""
        problems = []
        if self._stop.is_set():
            problems.append("shutting down")
        if self._stages is not None:
            if not self._stages.committer.healthy:  # a failed probe counts too
                problems.append("the state database is not writable")
            for endpoint, breaker in self._stages.client.breakers.items():
                if breaker.state is not CircuitState.CLOSED:
                    problems.append(f"the circuit to /{endpoint.value} is {breaker.state.value}")
            for endpoint, gate in self._stages.client.gates.items():
                if gate.refused:
                    problems.append(f"the partner refuses the token on /{endpoint.value}")
        for helper in self._helpers():
            if not helper.running and not self._stop.is_set():
                problems.append(f"{helper.title} is not running")
        return problems


# ════════════════════════════════════════════════════════════════════════════════════════════
# CLI — run, once, check-config, status, show, export, requeue, replay (the tracking schedule's
# what-if over recorded or modelled timelines), migrate, demo. Usage errors exit 2, config
# errors exit 2 naming the key.
# ════════════════════════════════════════════════════════════════════════════════════════════

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def add_config_argument(command: argparse.ArgumentParser, text: str = "config file (default: ./config.toml)") -> None:
    command.add_argument("--config", type=Path, default=Path("config.toml"), help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tracker.py", description="Collect returns, track pickups, report collected items to the partner.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (
        ("run", "run the daemon until SIGTERM/SIGINT (SIGHUP re-reads the partner token)"),
        ("once", "one pass over what is due now (feed, tracking, reports), then exit"),
        ("status", "show what the state database holds"),
        ("check-config", "validate the config (and the token's sources) as `run` would, start nothing"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        add_config_argument(command)
    requeue = commands.add_parser(
        "requeue", help="put dead reports, stale boxes or quarantined returns back into the pipeline",
        description="After the cause is fixed: dead reports are sent again, stale boxes tracked again, "
                    "quarantined returns re-validated and, where they now pass, collected. Without ids: all.")
    requeue.add_argument("kind", choices=("dead", "stale", "quarantined"))
    requeue.add_argument("ids", nargs="*", help="return ids (dead, quarantined) or shipment numbers (stale)")
    add_config_argument(requeue)
    show = commands.add_parser(
        "show", help="one return's whole story: by return id, order number or shipment number",
        description="Everything known about the returns each ID names (a return id, an order number or a "
                    "shipment number): when collected, corrections, the box's status history and checks, every "
                    "report attempt, and where it stands now. Needs no token.")
    show.add_argument("ids", nargs="+", metavar="ID")
    show.add_argument("--json", action="store_true", help="one JSON object per ID, for scripts")
    add_config_argument(show)
    export = commands.add_parser(
        "export", help="stream every return (or closed boxes' histories, for replay) as CSV or JSON lines",
        description="One row per return: its box, statuses, collected and reported times, report outcome — "
                    "streamed in constant memory. --timelines: each closed box's recorded status history in the "
                    "format `replay` reads. DATEs are YYYY-MM-DD (UTC) or ISO 8601 times; they bound when the "
                    "tracker collected the return (first saw the box).")
    export.add_argument("--since", type=parse_date, default=None, metavar="DATE", help="from this time on")
    export.add_argument("--until", type=parse_date, default=None, metavar="DATE", help="before this time")
    export.add_argument("--state", choices=sorted({*(s.value for s in ReportState), *(s.value for s in BoxState)}),
                        help="only returns whose report, or whose box, is in this state")
    export.add_argument("--format", choices=("csv", "jsonl"), default="csv", help="default csv")
    export.add_argument("--timelines", action="store_true",
                        help="closed boxes' status histories as JSON lines, as `replay` reads them")
    add_config_argument(export)
    replay = commands.add_parser(
        "replay", help="what-if: replay pickup timelines through the tracking schedule on a virtual clock",
        description="Replays pickup timelines (JSON lines: shipment_number, requested_at, registered_at, "
                    "events) through the same scheduling decisions the track stage makes, starting with no "
                    "history, and against fixed polling at track_every_s. Prints a summary; the last line "
                    "is one JSON object.")
    replay.add_argument("timelines", type=Path, help="a JSON-lines file of pickup timelines")
    add_config_argument(replay, "config file whose [schedule] to use (default: ./config.toml, if it exists)")
    replay.add_argument("--seed", type=int, default=1, help="seed of the schedule's jitter (default 1)")
    migrate = commands.add_parser(
        "migrate", help="copy the SQLite state into an empty PostgreSQL database",
        description="Copies everything the SQLite file at storage.path holds — the feed's cursor, returns, "
                    "boxes and their histories, reports and their attempts, corrections, quarantine — into an "
                    "empty PostgreSQL database, in one transaction, and prints what it copied. Refuses a "
                    "database that holds anything. Stop the daemon first; afterwards set storage.url.")
    migrate.add_argument("--to", required=True, metavar="URL",
                         help="postgresql://… (a password from libpq's ~/.pgpass or PGPASSWORD, not here)")
    add_config_argument(migrate)
    check = commands.add_parser(
        "check", help="check these waybills now, ahead of other tracking calls",
        description="What POST /v1/shipments/{shipment_number}/check does, for an operator: each open box goes "
                    "first in due order (a running daemon makes the call within a second or two), at most once "
                    f"every {CHECK_COOLDOWN_S:g} s a box.")
    check.add_argument("shipments", nargs="+", metavar="SHP")
    add_config_argument(check)
    api_key = commands.add_parser(
        "api-key", help="create, list or revoke the shop's API keys",
        description="A key is printed once, when created, and stored only as a hash. A revoke takes effect "
                    "within a second on every instance.")
    key_commands = api_key.add_subparsers(dest="key_command", required=True, metavar="ACTION")
    create = key_commands.add_parser("create", help="a new key, printed once")
    create.add_argument("name", help="who uses it, e.g. refunds (letters, digits, - and _)")
    create.add_argument("--scope", action="append", required=True, choices=API_SCOPES, dest="scopes",
                        help="what it may do; repeat for several")
    create.add_argument("--allow", action="append", default=[], metavar="CIDR",
                        help="an address range it may be used from; repeat for several (default: anywhere)")
    create.add_argument("--rate", type=float, default=100.0, help="requests a second, per instance (default 100)")
    create.add_argument("--expires", type=parse_date, default=None, metavar="DATE",
                        help="YYYY-MM-DD or an ISO 8601 time; after it the key is refused")
    add_config_argument(create)
    listed = key_commands.add_parser("list", help="every key: name, scopes, ranges, rate, state")
    add_config_argument(listed)
    revoke = key_commands.add_parser("revoke", help="refuse a key from now on")
    revoke.add_argument("name")
    add_config_argument(revoke)
    audit = commands.add_parser("audit", help="the API's write requests and key changes, oldest first",
                                description="One line per push, batch, check and key change: when, key, "
                                            "source address, action, target, result, request id.")
    audit.add_argument("--since", type=parse_date, default=0.0, metavar="DATE", help="from this date on")
    add_config_argument(audit)
    webhooks = commands.add_parser(
        "webhooks", help="the shop's webhook endpoints: list, deliveries, replay, enable, test, secret",
        description="Endpoints are [[webhook]] tables in the config file, the same on every host; their secrets "
                    "come from the systemd credential webhook_<name> or TRACKER_WEBHOOK_SECRET_<NAME>.")
    hook_commands = webhooks.add_subparsers(dest="hook_command", required=True, metavar="ACTION")
    add_config_argument(hook_commands.add_parser("list", help="each endpoint: events, state, deliveries pending"))
    deliveries = hook_commands.add_parser("deliveries", help="the latest deliveries, newest first")
    deliveries.add_argument("--failed", action="store_true", help="only those not delivered after an attempt")
    deliveries.add_argument("--event", default=None, metavar="ID", help="only this event's (its webhook-id)")
    deliveries.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    add_config_argument(deliveries)
    replay = hook_commands.add_parser("replay", help="send these events again, under the same webhook-id")
    replay.add_argument("events", nargs="+", metavar="EVENT_ID")
    add_config_argument(replay)
    enable = hook_commands.add_parser("enable", help="an endpoint disabled (410, or failing too long) works "
                                                     "again; what it missed is delivered")
    enable.add_argument("name")
    add_config_argument(enable)
    test = hook_commands.add_parser("test", help="send the endpoint a signed test event now and say what it answered")
    test.add_argument("name")
    add_config_argument(test)
    hook_commands.add_parser("secret", help="print a new secret (whsec_…) for an endpoint's credential")
    demo = commands.add_parser("demo", help="run the whole pipeline against the partner stand-in",
                               description="Start the partner stand-in on loopback with a burst of returns, "
                                           "run the daemon against it, and print a summary.")
    demo.add_argument("--returns", type=int, default=30000, help="returns in the burst (default 30000)")
    demo.add_argument("--seconds", type=float, default=20.0, help="seconds over which they arrive (default 20)")
    demo.add_argument("--seed", type=int, default=1, help="scenario seed (default 1)")
    demo.add_argument("--deadline", type=float, default=600.0, help="give up after this many seconds")
    demo.add_argument("--database-url", default="", metavar="URL",
                      help="keep the state in this empty PostgreSQL database instead of a SQLite file")
    demo.add_argument("--instances", type=int, default=1, help="daemons sharing the work (needs --database-url)")
    demo.add_argument("--kill-one-at", type=float, default=None, metavar="S",
                      help="kill -9 one of the instances S seconds in")
    demo.add_argument("--feed-down", action="store_true",
                      help="the partner's feed answers 503 throughout: the returns are pushed through the shop's API")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in HELPERS:  # the daemon's own helpers (HelperProcess), not commands for people
        asyncio.run(run_helper(HELPERS[argv[0]]))
        return EXIT_OK
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import demo  # the demo and the stand-in live beside this file, never inside it

        return demo.main(returns=args.returns, seconds=args.seconds, seed=args.seed, deadline_s=args.deadline,
                         instances=args.instances, database_url=args.database_url, kill_one_at=args.kill_one_at,
                         feed_down=args.feed_down)
    if args.command == "replay":
        return replay_command(args.timelines, args.config, args.seed)
    if args.command == "webhooks" and args.hook_command == "secret":
        print(new_webhook_secret())
        return EXIT_OK
    try:
        sends = args.command in ("run", "once", "check-config") or getattr(args, "hook_command", "") == "test"
        loader = load_config if sends else load_status_config
        config = loader(args.config)
    except ConfigError as exc:
        print(f"tracker: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for warning in config_file_warnings(args.config):
        print(f"tracker: warning: {warning}", file=sys.stderr)
    if args.command == "check-config":
        print(f"tracker: {args.config}: ok (partner {config.partner.base_url}, database {config.storage.where}, "
              f"listening on {config.http.listen}, Slack {'on' if config.slack.webhook_url else 'off'}, "
              f"webhooks {', '.join(w.name for w in config.webhook) or 'none'})")
        return EXIT_OK
    if args.command == "status":
        return asyncio.run(print_status(config))
    if args.command == "requeue":
        return asyncio.run(requeue(config, args.kind, args.ids or None))
    if args.command == "show":
        return asyncio.run(show(config, args.ids, as_json=args.json))
    if args.command == "export":
        return asyncio.run(export(config, since=args.since, until=args.until, state=args.state,
                                  fmt="jsonl" if args.timelines else args.format, timelines=args.timelines))
    if args.command == "migrate":
        return asyncio.run(migrate(config, args.to))
    if args.command == "api-key":
        return asyncio.run(api_key_command(config, args))
    if args.command == "check":
        return asyncio.run(check_now(config, args.shipments))
    if args.command == "audit":
        return asyncio.run(print_audit(config, args.since))
    if args.command == "webhooks":
        return asyncio.run(webhooks_command(config, args))
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # one journald record per line, as it happens
    configure_logging(config.log.level)
    settle_garbage_collector()
    try:
        asyncio.run(run_until_signalled(config, once=args.command == "once", config_path=args.config))
    except StageFailed as exc:  # logged as daemon.stage_failed, with its traceback
        print(f"tracker: stopped: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except RuntimeError as exc:  # e.g. another instance holds the lock
        print(f"tracker: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except storage_errors_and(OSError) as exc:
        print(f"tracker: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def config_file_warnings(path: Path) -> list[str]:
    """A config file that holds a secret must be private to its owner."""
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except OSError:
        return []
    raw = tomllib.loads(text)
    tables = [(section, table) for section, value in raw.items()
              for table in (value if isinstance(value, list) else [value]) if isinstance(table, dict)]
    holds = sorted({key for key in SECRET_KEYS for section, table in tables
                    if key.split(".")[0] == section and table.get(key.split(".")[1])})
    if holds and mode & 0o077:
        return [f"{path} holds {' and '.join(holds)} and can be read by other users "
                f"(mode {mode & 0o777:o}); run: chmod 600 {path} — or move the token to {ENV_TOKEN} "
                f"or the systemd credential '{CREDENTIAL_TOKEN_FILE}', a webhook's secret to "
                f"'{CREDENTIAL_WEBHOOK_SECRET}<name>'"]
    return []


def load_status_config(path: Path) -> Config:
    """`status` and `requeue` touch only the database: they must work without the partner token."""
    return load_config(path, {**os.environ, ENV_TOKEN: os.environ.get(ENV_TOKEN) or "not-needed-for-status"},
                       secrets_needed=False)


GC_YOUNG_THRESHOLD = 20_000


def settle_garbage_collector() -> None:
    """A partner call allocates a few dozen short-lived objects, all freed by reference counting;
    at Python's default threshold (700) the cyclic collector then ran ~600 times per 30k burst,
    finding next to nothing, for 1.4 CPU-s (6–7% of the daemon's CPU). What exists at start-up
    (modules, config) lives as long as the process, so it is frozen out of the collector's scans."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


async def run_until_signalled(config: Config, *, once: bool, config_path: Path | None = None) -> None:
    daemon = Daemon(config, config_path=config_path)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload_token)
    await daemon.run(once=once)


async def migrate(config: Config, target: str, out: typing.TextIO | None = None) -> int:
    """The SQLite state at storage.path, copied into the empty PostgreSQL database at `target`."""
    out = out or sys.stdout
    try:
        _require_database_url(target)
    except ConfigError as exc:
        print(f"tracker: --to: {exc.problem}", file=sys.stderr)
        return EXIT_USAGE
    where = redact_database_url(target)
    if not Path(config.storage.path).exists():
        print(f"tracker: no state database at {config.storage.path}", file=sys.stderr)
        return EXIT_FAILURE
    lock = InstanceLock(config.storage.path)  # no daemon writes to the file while it is copied
    try:
        lock.acquire()
    except RuntimeError as exc:
        print(f"tracker: {exc}; stop it before migrating", file=sys.stderr)
        return EXIT_FAILURE
    try:
        source = await SqliteDatabase.open(config.storage.path)  # brought to the current schema first
        try:
            destination = await PostgresDatabase.open(target)
        except pg().Error as exc:
            await source.close()
            print(f"tracker: cannot open {where}: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        try:
            if await destination.holds_anything():
                print(f"tracker: {where} is not empty; migrate copies into an empty database only",
                      file=sys.stderr)
                return EXIT_FAILURE
            copied = await destination.copy_in({table: source.rows_of(table) for table in COPIED_TABLES})
            counts = await Store(destination, PgFleet(destination)).counts()
        except STORAGE_ERRORS as exc:
            print(f"tracker: the copy failed, {where} is left as it was: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        finally:
            await destination.close()
            await source.close()
    finally:
        lock.release()
    print(f"tracker: copied {config.storage.path} into {where}:", file=out)
    for table, n in copied.items():
        print(f"  {table:<17} {n:>10,} rows", file=out)
    print(f"  now there: {counts.get('returns', 0):,} returns · "
          f"{sum(n for k, n in counts.items() if k.startswith('boxes.')):,} boxes · "
          f"{sum(n for k, n in counts.items() if k.startswith('reports.')):,} reports. "
          f"Set storage.url (or {ENV_DATABASE_URL}) to it and start the daemon.", file=out)
    return EXIT_OK


async def requeue(config: Config, kind: str, ids: list[str] | None, out: typing.TextIO | None = None) -> int:
    """Works beside a running daemon: it picks up what is requeued at its next look (within a second)."""
    out = out or sys.stdout
    if not config.storage.url and not Path(config.storage.path).exists():
        print(f"tracker: no state database at {config.storage.path}", file=sys.stderr)
        return EXIT_FAILURE
    store = await open_store(config.storage)
    try:
        now = time.time()
        if kind == "dead":
            moved, label = await store.requeue_dead_reports(ids, now), "dead report(s) queued to be sent again"
        elif kind == "stale":
            moved, label = await store.requeue_stale_boxes(ids, now), "stale box(es) tracked again"
        else:
            moved, still_bad = await requeue_quarantined(store, ids, now)
            label = "quarantined return(s) collected"
            for return_id, reason in still_bad:
                print(f"still invalid, left in quarantine: {return_id or '(no id)'}: {reason}", file=out)
    finally:
        await store.close()
    print(f"{len(moved)} {label}" + (f": {', '.join(moved)}" if moved else ""), file=out)
    if ids:
        missing = sorted(set(ids) - set(moved))
        if missing:
            print(f"not found in that state: {', '.join(missing)}", file=out)
    return EXIT_OK


async def check_now(config: Config, shipments: Sequence[str], out: typing.TextIO | None = None) -> int:
    """`tracker.py check SHP…`: exit 1 when any could not be queued (each says why)."""
    out = out or sys.stdout
    if not config.storage.url and not Path(config.storage.path).exists():
        print(f"tracker: no state database at {config.storage.path}", file=sys.stderr)
        return EXIT_FAILURE
    store = await open_store(config.storage)
    failed = False
    try:
        for shipment in shipments:
            result = await store.commit([CheckNow(shipment_number=shipment, cooldown_s=CHECK_COOLDOWN_S)], time.time())
            if shipment in result.checks_queued:
                print(f"{shipment}: queued — checked ahead of other boxes by the running daemon", file=out)
                continue
            failed = True
            found = await store.box_check_state(shipment)
            if found is None:
                print(f"{shipment}: no such shipment", file=out)
            elif found[0] == BoxState.TRACKING:
                print(f"{shipment}: asked for less than {CHECK_COOLDOWN_S:g} s ago; try again later", file=out)
            else:
                print(f"{shipment}: {found[0]}, no longer tracked", file=out)
    finally:
        await store.close()
    return EXIT_FAILURE if failed else EXIT_OK


API_KEY_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


async def api_key_command(config: Config, args: argparse.Namespace, out: typing.TextIO | None = None) -> int:
    """`tracker.py api-key create|list|revoke`; each change is an audit row (source "cli")."""
    out = out or sys.stdout
    if args.key_command == "create":
        if not API_KEY_NAME.fullmatch(args.name):
            print("tracker: api-key: a name is 1 to 64 letters, digits, - or _", file=sys.stderr)
            return EXIT_USAGE
        if not 0.1 <= args.rate <= 100_000:
            print("tracker: api-key: --rate must be between 0.1 and 100000", file=sys.stderr)
            return EXIT_USAGE
        for cidr in args.allow:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                print(f"tracker: api-key: --allow {cidr!r} is not an IP network", file=sys.stderr)
                return EXIT_USAGE
    if not config.storage.url and not Path(config.storage.path).exists() and args.key_command != "create":
        print(f"tracker: no state database at {config.storage.path}", file=sys.stderr)
        return EXIT_FAILURE
    store = await open_store(config.storage)
    try:
        now = time.time()
        if args.key_command == "create":
            secret = new_api_key()
            key = ApiKey(name=args.name, scopes=tuple(sorted(set(args.scopes))), allow=tuple(args.allow),
                         rate_per_s=args.rate, created_at=now, expires_at=args.expires)
            try:
                await store.add_api_key(key, api_key_hash(secret), api_key_lookup(secret))
            except STORAGE_ERRORS as exc:
                if "UNIQUE" not in str(exc).upper() and "duplicate" not in str(exc):
                    raise
                print(f"tracker: api-key: a key named {args.name!r} exists already", file=sys.stderr)
                return EXIT_FAILURE
            await store.audit([AuditEntry(at=now, key_name=None, source_ip="cli", action="api-key.create",
                                          target=args.name, result="ok", request_id="cli")])
            print(f"created key {args.name!r} ({', '.join(key.scopes)}); it is shown this once — store it now:",
                  file=out)
            print(secret, file=out)
        elif args.key_command == "revoke":
            revoked = await store.revoke_api_key(args.name, now)
            await store.audit([AuditEntry(at=now, key_name=None, source_ip="cli", action="api-key.revoke",
                                          target=args.name, result="ok" if revoked else "not-found",
                                          request_id="cli")])
            if not revoked:
                print(f"tracker: api-key: no live key named {args.name!r}", file=sys.stderr)
                return EXIT_FAILURE
            print(f"revoked key {args.name!r}: refused on every instance within a second", file=out)
        else:
            for key in await store.api_keys():
                state = ("revoked " + _stamp(key.revoked_at) if key.revoked_at is not None
                         else "expired" if not key.usable(now) else "active")
                expiry = f", expires {_stamp(key.expires_at)}" if key.expires_at is not None else ""
                print(f"{key.name:<20} {API_KEY_PREFIX}{key.prefix}…  {','.join(key.scopes):<45} "
                      f"{','.join(key.allow) or 'anywhere':<20} {key.rate_per_s:g}/s  {state}{expiry}", file=out)
    finally:
        await store.close()
    return EXIT_OK


async def print_audit(config: Config, since: float, out: typing.TextIO | None = None) -> int:
    out = out or sys.stdout
    store = await open_for_reading(config)
    if store is None:
        return EXIT_FAILURE
    try:
        for row in await store.audit_since(since):
            print(f"{_stamp(row['at'])}  {row['key_name'] or '-':<16} {row['source_ip']:<15} {row['action']:<20} "
                  f"{row['target']}  → {row['result']}  [{row['request_id']}]", file=out)
    finally:
        await store.close()
    return EXIT_OK


async def webhooks_command(config: Config, args: argparse.Namespace, out: typing.TextIO | None = None) -> int:
    out = out or sys.stdout
    if args.hook_command == "test":
        return await send_test_webhook(config, args.name, out)
    if args.hook_command == "enable" and args.name not in {w.name for w in config.webhook}:
        print(f"tracker: no [[webhook]] named {args.name!r} in {args.config}", file=sys.stderr)
        return EXIT_USAGE
    store = await open_for_reading(config) if args.hook_command in ("list", "deliveries") else \
        await open_store(config.storage)
    if store is None:
        return EXIT_FAILURE
    try:
        if args.hook_command == "list":
            stored = {row["name"]: row for row in await store.webhook_endpoints()}
            for webhook in config.webhook:
                row = stored.get(webhook.name, {})
                state = (f"disabled {_stamp(row['disabled_at'])}: {row['disabled_why']}" if row.get("disabled_at")
                         else f"failing since {_stamp(row['failing_since'])}" if row.get("failing_since") else "active")
                oldest = f", oldest {_ago(row['oldest_pending_at'])}" if row.get("oldest_pending_at") else ""
                print(f"{webhook.name:<16} {webhook.url}  {','.join(webhook.events)}  {state}  "
                      f"{row.get('pending', 0)} pending{oldest}", file=out)
        elif args.hook_command == "deliveries":
            event = webhook_event_id(args.event) if args.event else None
            for row in await store.deliveries(event=event, failed=args.failed, limit=args.limit):
                when = _stamp(row["delivered_at"]) if row["delivered_at"] else (
                    f"next {_stamp(row['next_attempt_at'])}" if row["next_attempt_at"] else "-")
                answer = row["last_error"] or (f"HTTP {row['last_status']}" if row["last_status"] else "not tried")
                print(f"{_stamp(row['created_at'])}  {row['endpoint']:<16} {webhook_id(row['event_id'])}  "
                      f"{row['state']:<9} {row['attempts']} attempt(s), {answer}, {when}", file=out)
        elif args.hook_command == "replay":
            replayed = await store.replay_events([webhook_event_id(e) for e in args.events], time.time())
            for event, endpoint in replayed:
                print(f"{webhook_id(event)} → {endpoint}: due again now", file=out)
            missing = set(map(webhook_event_id, args.events)) - {event for event, _ in replayed}
            for event in sorted(missing):
                print(f"tracker: no delivery of {webhook_id(event)} is stored", file=sys.stderr)
            return EXIT_FAILURE if missing else EXIT_OK
        elif args.hook_command == "enable":
            result = await store.commit([EnableEndpoint(name=args.name)], time.time())
            print(f"{args.name}: {'enabled' if result.enabled_endpoints else 'not stored yet: start the daemon'}",
                  file=out)
    finally:
        await store.close()
    return EXIT_OK


async def send_test_webhook(config: Config, name: str, out: typing.TextIO) -> int:
    """A signed `tracker.test` event, sent now, as a delivery would be; nothing is stored."""
    webhook = next((w for w in config.webhook if w.name == name), None)
    if webhook is None:
        print(f"tracker: no [[webhook]] named {name!r}", file=sys.stderr)
        return EXIT_USAGE
    at = dt.datetime.now(dt.UTC)
    msg_id = f"evt_tracker.test:{secrets.token_hex(8)}"
    body = json.dumps({"type": "tracker.test", "timestamp": at.isoformat(), "data": {}}, separators=(",", ":"))
    headers = signed_headers(webhook_signers(webhook), msg_id, body, at)
    try:
        async with aiohttp.ClientSession() as session, session.post(
                webhook.url, data=body.encode(), headers=headers, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=webhook.timeout_s)) as resp:
            print(f"{name}: {webhook.url} answered {resp.status} ({msg_id})", file=out)
            return EXIT_OK if 200 <= resp.status < 300 else EXIT_FAILURE
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        print(f"{name}: {webhook.url} did not answer: {type(exc).__name__} {exc}", file=out)
        return EXIT_FAILURE


async def requeue_quarantined(store: StateStore, ids: list[str] | None,
                              now: float) -> tuple[list[str], list[tuple[str | None, str]]]:
    """Re-validate quarantined raw items; the ones that now pass are collected as from the feed."""
    items: list[ReturnItem] = []
    still_bad: list[tuple[str | None, str]] = []
    for return_id, raw in await store.open_quarantine_for(ids):
        try:
            checked = validate_return(json.loads(raw))
        except (ValueError, RecursionError):
            still_bad.append((return_id, "the stored raw item is truncated or not JSON"))
            continue
        if isinstance(checked, ReturnItem):
            items.append(checked)
        else:
            still_bad.append((return_id, checked.reason))
    if items:
        first_checks = tuple({item.shipment_number: now for item in items}.items())
        await store.commit([FeedPage(items=tuple(items), quarantined=(), next_cursor=None, has_more=False,
                                     first_checks=first_checks)], now)
    return sorted(item.id for item in items), still_bad


@dataclasses.dataclass(frozen=True, kw_only=True)
class PickupTimeline:
    """One box's real (or modelled) pickup, as ../shared/timelines.py writes it."""

    shipment_number: str
    requested_at: float
    registered_at: float | None  # before it the partner answers 404; None: never
    events: tuple[StatusChange, ...]  # oldest first

    @classmethod
    def from_json(cls, line: str) -> "PickupTimeline":
        raw = json.loads(line)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        events = raw.get("events")
        if not isinstance(events, list) or not events:
            raise ValueError("events must be a non-empty list")
        try:
            changes = tuple(StatusChange(status=str(e["status"]), at=float(e["at"])) for e in events)
            registered = raw.get("registered_at")
            return cls(shipment_number=str(raw["shipment_number"]), requested_at=float(raw["requested_at"]),
                       registered_at=None if registered is None else float(registered),
                       events=tuple(sorted(changes, key=lambda c: c.at)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"missing or wrong field: {exc}") from None


@dataclasses.dataclass(kw_only=True)
class ReplayResult:
    boxes: int = 0
    calls: int = 0
    delivered: int = 0
    delays: list[float] = dataclasses.field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        delays = sorted(self.delays)

        def quantile(q: float) -> float | None:
            return round(delays[min(len(delays) - 1, int(q * len(delays)))], 1) if delays else None
        return {"boxes": self.boxes, "calls": self.calls,
                "calls_per_box": round(self.calls / self.boxes, 2) if self.boxes else 0.0,
                "delivered": self.delivered, "undetected": self.delivered - len(delays),
                "detect_delay_s": {"p50": quantile(0.5), "p95": quantile(0.95), "p99": quantile(0.99),
                                   "max": round(delays[-1], 1) if delays else None}}


def replay_timelines(timelines: Sequence[PickupTimeline], config: ScheduleConfig, *, learn: bool,
                     seed: int = 1) -> ReplayResult:
    """Every box checked as the daemon would — the feed seen every returns_every_s, first checks
    spread as collect spreads them, each answer decided by decide_box_update — on a virtual clock.
    The partner answers 404 before registered_at, then the events up to that moment."""
    random.seed(seed)  # the schedule's jitter, repeatable
    tracking = TrackingSchedule(config, learn=learn)
    result = ReplayResult(boxes=len(timelines))
    answers = [[{"shipment_number": t.shipment_number, "return_status": e.status,
                 "updated_at": dt.datetime.fromtimestamp(e.at, dt.UTC).isoformat()} for e in t.events]
               for t in timelines]
    times = [[e.at for e in t.events] for t in timelines]
    due: list[DueBox] = []
    status_of: list[str | None] = [None] * len(timelines)
    by_status: dict[str, set[int]] = collections.defaultdict(set)
    next_at: list[float] = []
    queue: list[tuple[float, int]] = []
    collected = [False] * len(timelines)
    # A box whose timeline never ends (an export of unfinished pickups) is not asked about forever.
    horizon = max((t.events[-1].at for t in timelines), default=0.0) + config.stale_after_s
    for i, timeline in enumerate(timelines):
        seen_in_feed = timeline.requested_at + random.uniform(0, config.returns_every_s)
        due.append(DueBox(shipment_number=timeline.shipment_number, first_seen_at=seen_in_feed, not_found=0, errors=0))
        next_at.append(seen_in_feed)
        heapq.heappush(queue, (next_at[i], i))
        result.delivered += timelines[i].events[-1].status == PickupStatus.DELIVERED
    while queue:
        now, i = heapq.heappop(queue)
        if now > horizon:
            break
        if now != next_at[i]:
            continue  # rescheduled since (a wake-up)
        if not collected[i]:  # the feed lists it now: its first check, as collect spreads them
            collected[i] = True
            tracking.tracked += 1
            next_at[i] = now + jittered(tracking.first_check_in(), 0.5)
            heapq.heappush(queue, (next_at[i], i))
            continue
        timeline, box = timelines[i], due[i]
        if timeline.registered_at is None or now < timeline.registered_at:
            reply = Reply(endpoint=Endpoint.TRACKING, outcome=Outcome.NOT_FOUND, status=404, body=None,
                          retry_after=None, latency_s=0.0)
        else:
            seen = answers[i][:bisect.bisect_right(times[i], now)]
            reply = Reply(endpoint=Endpoint.TRACKING, outcome=Outcome.OK, status=200, body={"data": seen},
                          retry_after=None, latency_s=0.0)
        woken = []  # as the track stage does: learn from the answer first, then decide
        if reply.outcome is Outcome.OK and learn:  # (the history as answered: these events, parsed)
            woken = tracking.learn(timeline.events[:len(reply.body["data"])], now)
        update = decide_box_update(box, reply, now, config, tracking)
        result.calls += 1
        if status_of[i] is not None:
            by_status[status_of[i]].discard(i)  # type: ignore[index]
        if update.state is BoxState.DELIVERED:
            result.delays.append(now - timeline.events[-1].at)
        if update.state is not BoxState.TRACKING:
            tracking.tracked -= 1
        if update.state is BoxState.TRACKING and update.next_check_at is not None:
            since = update.history[-1].at if update.history else box.status_since
            due[i] = DueBox(shipment_number=box.shipment_number, first_seen_at=box.first_seen_at,
                            not_found=update.not_found, errors=update.errors, status_since=since,
                            checks=box.checks + 1)
            status_of[i] = update.last_status or status_of[i]
            if status_of[i] is not None:
                by_status[status_of[i]].add(i)  # type: ignore[index]
            next_at[i] = update.next_check_at
            heapq.heappush(queue, (next_at[i], i))
        for status in woken:  # as WakeBoxes, after this box's own update
            for j in set().union(*by_status.values()) if status == ANY_STATUS else by_status[status]:
                if next_at[j] > now + config.detect_within_s:
                    next_at[j] = now + random.uniform(0, config.detect_within_s)
                    heapq.heappush(queue, (next_at[j], j))
    return result


def replay_command(path: Path, config_path: Path, seed: int) -> int:
    schedule = ScheduleConfig()
    if config_path.exists():
        try:
            schedule = load_status_config(config_path).schedule
        except ConfigError as exc:
            print(f"tracker: config error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        with path.open(encoding="utf-8") as lines:
            timelines = [PickupTimeline.from_json(line) for line in lines if line.strip()]
    except OSError as exc:
        print(f"tracker: cannot read {path}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except ValueError as exc:
        print(f"tracker: {path}: not pickup timelines ({exc})", file=sys.stderr)
        return EXIT_FAILURE
    started = time.monotonic()
    learned = replay_timelines(timelines, schedule, learn=True, seed=seed).summary()
    fixed = replay_timelines(timelines, schedule, learn=False, seed=seed).summary()
    print(f"replayed {len(timelines):,} pickups in {time.monotonic() - started:.1f} s "
          f"(detect_within_s {schedule.detect_within_s:g}, track_every_s {schedule.track_every_s:g})")
    for name, run in (("learned schedule", learned), (f"fixed every {schedule.track_every_s:g} s", fixed)):
        delay = run["detect_delay_s"]
        print(f"  {name:<22} {run['calls']:>10,} calls  {run['calls_per_box']:>7.1f} per box  "
              f"delay p50 {delay['p50']} s  p95 {delay['p95']} s  p99 {delay['p99']} s  max {delay['max']} s  "
              f"undetected {run['undetected']} of {run['delivered']:,} delivered")
    print(json.dumps({**learned, "fixed": fixed}))
    return EXIT_OK


async def show(config: Config, keys: Sequence[str], *, as_json: bool, out: typing.TextIO | None = None) -> int:
    """`tracker.py show`: exit 1 when an ID names nothing (the others are still shown)."""
    out = out or sys.stdout
    store = await open_for_reading(config)
    if store is None:
        return EXIT_FAILURE
    unknown = []
    try:
        for key in keys:
            try:
                story = await store.story(key)
            except NotYetInSchema:
                print(f"tracker: {config.storage.where} was written by an older version; start the daemon "
                      "(or `tracker.py once`) once to upgrade it", file=sys.stderr)
                return EXIT_FAILURE
            if not (story["returns"] or story["boxes"] or story["quarantine"]):
                unknown.append(key)
                print(f"tracker: no return, order or shipment is known as {key!r}", file=sys.stderr)
                continue
            story["now"] = {r["id"]: where_it_stands(r["id"], story) for r in story["returns"]}
            if as_json:
                print(json.dumps({"query": key, **story}, default=str), file=out)
            else:
                print("\n".join(story_lines(key, story)), file=out)
    finally:
        await store.close()
    return EXIT_FAILURE if unknown else EXIT_OK


def parse_date(text: str) -> float:
    """A command-line DATE: YYYY-MM-DD (UTC midnight) or an ISO 8601 time; Unix seconds."""
    epoch = unix_seconds(text)
    if epoch is None:
        raise argparse.ArgumentTypeError(f"not a date: {text!r} (expected YYYY-MM-DD or an ISO 8601 time)")
    return epoch


EXPORT_COLUMNS = ["return_id", "order_number", "order_item_number", "shipment_number", "requested_at", "collected_at",
                  "box_state", "last_status", "delivered_at", "report_state", "report_outcome", "reported_at",
                  "report_attempts", "report_error"]  # EXPORT_SQL["returns"]'s, in its order
EXPORT_TIMES = ("collected_at", "reported_at")  # our clock, Unix seconds: written as ISO 8601 UTC


async def export(config: Config, *, since: float | None, until: float | None, state: str | None, fmt: str,
                 timelines: bool, out: typing.TextIO | None = None) -> int:
    out = out or sys.stdout
    store = await open_for_reading(config)
    if store is None:
        return EXIT_FAILURE
    params = {"since": -math.inf if since is None else since, "until": math.inf if until is None else until,
              "state": state}
    try:
        if timelines:
            await export_timelines(store, params, out)
            return EXIT_OK
        writer = csv.DictWriter(out, fieldnames=EXPORT_COLUMNS, lineterminator="\n")
        if fmt == "csv":
            writer.writeheader()
        async with contextlib.aclosing(store.export("returns", params)) as rows:
            async for row in rows:
                for key in EXPORT_TIMES:
                    row[key] = _iso(row[key])
                if fmt == "jsonl":
                    out.write(json.dumps(row) + "\n")
                else:
                    writer.writerow(row)
    except sqlite3.OperationalError as exc:
        if "no such" not in str(exc):
            raise
        print(f"tracker: {config.storage.path} was written by an older version ({exc}); start the daemon "
              "(or `tracker.py once`) once to upgrade it", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        await store.close()
    return EXIT_OK


async def export_timelines(store: StateStore, params: Mapping[str, Any], out: typing.TextIO) -> None:
    """Each closed box as ../shared/timelines.py writes one: what `replay` reads."""
    box: dict[str, Any] | None = None
    async with contextlib.aclosing(store.export("timelines", params)) as rows:
        async for row in rows:
            if box is None or box["shipment_number"] != row["shipment_number"]:
                if box is not None:
                    out.write(json.dumps(box) + "\n")
                box = {"shipment_number": row["shipment_number"], "items": row["items"],
                       "requested_at": row["requested_at"], "registered_at": row["registered_at"], "events": []}
            box["events"].append({"status": row["status"], "at": row["changed_at"]})
    if box is not None:
        out.write(json.dumps(box) + "\n")


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat()


def where_it_stands(return_id: str, story: Mapping[str, Any]) -> str:
    """One line: what has become of this return, and what happens next."""
    ret = next(r for r in story["returns"] if r["id"] == return_id)
    report = next((p for p in story["reports"] if p["return_id"] == return_id), None)
    box = next((b for b in story["boxes"] if b["shipment_number"] == ret["shipment_number"]), None)
    if report is not None:
        state = report["state"]
        if state == ReportState.DONE and (report["accepted_revision"] or 0) < report["revision"]:
            return (f"reported ({report['outcome']}) {_when(report['done_at'])}, but under fields a correction has "
                    "since changed: not resent — decide with the partner")
        if state == ReportState.DONE:
            verb = "had already recorded it (409)" if report["outcome"] == "duplicate" else "recorded it"
            return f"reported: the partner {verb} {_when(report['done_at'])}"
        if state == ReportState.DEAD:
            return (f"the partner refused the report ({report['last_error']}); once fixed: "
                    f"tracker.py requeue dead {return_id}")
        if state == ReportState.WITHDRAWN:
            return f"a correction moved it to box {ret['shipment_number']}: reported once that box is collected"
        last = f", last attempt: {report['last_error']}" if report["last_error"] else ""
        return (f"collected {report['collected_at']}; report pending after {report['attempts']} attempt(s){last}; "
                f"next attempt {_when(report['next_attempt_at'])}")
    if box is None:
        return "waiting for its box to be created (the feed page is being stored)"
    if box["state"] == BoxState.TRACKING:
        status = box["last_status"] or "not registered by the carrier yet"
        return f"pickup not collected yet: {status}; next check {_when(box['next_check_at'])}"
    if box["state"] == BoxState.CANCELLED:
        return "the customer withdrew the return (cancelled): nothing to report"
    if box["state"] == BoxState.STALE:
        return (f"the carrier never registered waybill {box['shipment_number']}; once it does: "
                f"tracker.py requeue stale {box['shipment_number']}")
    return f"box {box['shipment_number']} is {box['state']}"


def story_lines(key: str, story: Mapping[str, Any]) -> list[str]:
    lines = [f"tracker show {key}"]
    for q in story["quarantine"]:
        if not any(r["id"] == q["return_id"] for r in story["returns"]):
            lines += ["", f"return {q['return_id']} — set aside {_when(q['seen_at'])}: {q['reason']}",
                      f"  raw: {q['raw'][:160]}"]
    for ret in story["returns"]:
        rid = ret["id"]
        lines += ["", f"return {rid} — order {ret['order_number']} item {ret['order_item_number']}, "
                      f"box {ret['shipment_number']}",
                  f"  {_stamp(ret['seen_at'])}  {_received_from(ret['source'])}"
                  f" (requested {ret['requested_at'] or '-'})"]
        names = [n["name"] for n in story["names"] if n["return_id"] == rid]
        if names:
            lines.append(f"  also known as {', '.join(names)}")
        events: list[tuple[float, str]] = []
        for c in story["corrections"]:
            if c["return_id"] == rid:
                events.append((c["corrected_at"], f"corrected by {c['source']}: {_changes(c['before'], c['after'])}"))
        for q in story["quarantine"]:
            if q["return_id"] == rid:
                resolved = f" (resolved {_stamp(q['resolved_at'])})" if q["resolved_at"] else ""
                events.append((q["seen_at"], f"a listing was set aside: {q['reason']}{resolved}"))
        lines += [f"  {_stamp(at)}  {text}" for at, text in sorted(events, key=lambda e: e[0])]
        for box in story["boxes"]:
            if box["shipment_number"] != ret["shipment_number"]:
                continue
            closed = f", closed {_stamp(box['closed_at'])}" if box["closed_at"] else ""
            lines.append(f"  box {box['shipment_number']}: {box['state']}, {box['checks']} check(s), "
                         f"next {_stamp(box['next_check_at']) if box['next_check_at'] else 'none'}{closed}")
            lines += _history_lines(story, box["shipment_number"])
        report = next((p for p in story["reports"] if p["return_id"] == rid), None)
        if report is not None:
            lines.append(f"  report: {report['state']}, {report['attempts']} attempt(s), queued "
                         f"{_stamp(report['queued_at'])}, collected_at {report['collected_at']}")
            lines += [_attempt_line(a) for a in story["attempts"] if a["return_id"] == rid]
        lines += _webhook_lines(webhook_events_of(rid, story), story)
        lines.append(f"  now: {story['now'][rid]}")
    if not story["returns"] and story["boxes"]:
        for box in story["boxes"]:
            lines += ["", f"box {box['shipment_number']}: {box['state']} (no return is in it now), "
                          f"{box['checks']} check(s)"]
            lines += _history_lines(story, box["shipment_number"])
    return lines


def _received_from(source: str) -> str:
    return "collected from the feed" if source == FEED_SOURCE else f"pushed through the API by {source}"


def _history_lines(story: Mapping[str, Any], shipment_number: str) -> list[str]:
    """A box's statuses: the partner's time, and when a check first saw each."""
    return [f"    {_stamp(h['changed_at'])}  {h['status']:<14} (seen {_stamp(h['seen_at'])})"
            for h in story["history"] if h["shipment_number"] == shipment_number]


def _webhook_lines(events: Iterable[Mapping[str, Any]], story: Mapping[str, Any]) -> list[str]:
    """Each event announced, and how each endpoint's delivery of it stands."""
    lines = []
    for event in events:
        lines.append(f"  {_stamp(event['created_at'])}  webhook {event['type']} {webhook_id(event['id'])}")
        deliveries = deliveries_of(event, story)
        for d in deliveries:
            answer = f"HTTP {d['last_status']}" if d["last_status"] else (d["last_error"] or "none yet")
            when = {"delivered": f" {_stamp(d['delivered_at'])}",
                    "pending": f", next {_stamp(d['next_attempt_at'])}"}.get(d["state"], "")
            lines.append(f"    → {d['endpoint']}: {d['state']}{when}, {d['attempts']} attempt(s), last answer {answer}")
        if not deliveries:
            lines.append("    → no endpoint takes it")
    return lines


def _attempt_line(attempt: Mapping[str, Any]) -> str:
    latency = "-" if attempt["latency_s"] is None else f"{attempt['latency_s']:.3f}"
    error = f"  {attempt['error']}" if attempt["error"] else ""
    return (f"    {_stamp(attempt['attempted_at'])}  #{attempt['attempt']} {attempt['outcome']:<9} "
            f"HTTP {attempt['http_status'] or '-'}  {latency} s{error}")


def _stamp(timestamp: float | None) -> str:
    return "-" if timestamp is None else dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _when(timestamp: float | None) -> str:
    return "-" if timestamp is None else f"at {_stamp(timestamp)}"


async def open_for_reading(config: Config) -> StateStore | None:
    """The state database, read-only (`status`, `show`); None, said on stderr, when there is none."""
    try:
        return await open_store(config.storage, readonly=True)
    except storage_errors_and(FileNotFoundError) as exc:
        print(f"tracker: no state database at {config.storage.where} ({exc})", file=sys.stderr)
        return None


async def print_status(config: Config, out: typing.TextIO | None = None) -> int:
    out = out or sys.stdout
    store = await open_for_reading(config)
    if store is None:
        return EXIT_FAILURE
    try:
        for line in await status_lines(store, overdue_after_s=config.schedule.overdue_after_s):
            print(line, file=out)
    finally:
        await store.close()
    return EXIT_OK


async def status_lines(store: StateStore, limit: int = 10, overdue_after_s: float = ScheduleConfig.overdue_after_s
                       ) -> list[str]:
    c = await store.counts()
    overdue_before = time.time() - overdue_after_s

    def states(kind: str, names: Iterable[str]) -> str:
        return " · ".join(f"{name} {c.get(f'{kind}.{name}', 0):,}" for name in names)

    lines = [
        f"tracker status — {store.where}",
        "",
        (f"  returns   {c.get('returns', 0):,} collected · {c.get('corrections', 0):,} corrections applied · "
         f"{c.get('quarantine.open', 0):,} quarantined"),
        f"  boxes     {states('boxes', (s.value for s in BoxState))} · overdue "
        f"{(await store.overdue(overdue_before))[0]:,}",
        f"  reports   {states('reports', (s.value for s in ReportState))}",
        f"  feed      cursor {'set' if await store.feed_cursor() else 'not set (starts at the beginning)'}",
    ]
    sections: list[tuple[str, list[str]]] = [
        ("Oldest pending reports", [
            f"  {rid}  box {sn}  queued {_ago(queued)}  attempts {attempts}" + (f"  last: {err}" if err else "")
            for rid, sn, queued, attempts, err in await store.oldest_pending_reports(limit)]),
        (f"Overdue pickups (not collected {_human_duration(overdue_after_s)} after the request)", [
            f"  {sn}  requested {_ago(requested)}  status {status or '(not registered yet)'} since {_ago(since)}"
            f"  checks {checks}"
            for sn, requested, status, since, checks in await store.overdue_boxes(overdue_before, limit)]),
        ("Longest-tracked boxes", [
            f"  {sn}  first seen {_ago(seen)}  status {status or '(not registered yet)'}  checks {checks}"
            for sn, seen, status, checks in await store.oldest_tracking_boxes(limit)]),
        ("Quarantined returns (open)", [
            f"  {rid or '(no id)'}  {reason}  seen {_ago(seen)}\n      raw: {raw[:160]}"
            for rid, reason, raw, seen in await store.open_quarantine(limit)]),
        ("Dead reports (partner refused; once fixed: tracker.py requeue dead [ids])", [
            f"  {rid}  box {sn}  {err}  {_ago(done)}" for rid, sn, err, done in await store.dead_reports(limit)]),
        ("Reports the partner recorded before a correction of their fields (not resent: decide with the partner)", [
            f"  {rid}  {_changes(before, after)}  recorded {_ago(done)}"
            for rid, before, after, done in await store.outdated_reports(limit)]),
        ("Latest corrections (relisted returns whose fields changed)", [
            f"  {rid}  {_changes(before, after)}  report {report or 'not queued yet'}  {_ago(when)}"
            for rid, before, after, report, when in await store.latest_corrections(limit)]),
        ("Stale boxes (never registered; once it is: tracker.py requeue stale [ids])", [
            f"  {sn}  first seen {_ago(seen)}  items {items}" for sn, seen, items in await store.stale_boxes(limit)]),
        ("Unknown statuses seen", [
            f"  {status!r}  seen {seen:,} times, last {_ago(last)}"
            for status, seen, last in await store.unknown_statuses()]),
    ]
    for title, rows in sections:
        lines += ["", f"{title}:"] + (rows or ["  none"])
    return lines


def _changes(before: str, after: str) -> str:
    old, new = json.loads(before), json.loads(after)
    return ", ".join(f"{field} {old[field]!r} → {new[field]!r}" for field in new)


def _ago(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    when = dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    seconds = max(0.0, time.time() - timestamp)
    return f"{when} ({_human_duration(seconds)} ago)"


def main_quietly_on_a_closed_pipe(argv: Sequence[str] | None = None) -> int:
    """`tracker.py status | head` closes stdout early: end quietly (no traceback), as `head` meant."""
    try:
        return main(argv)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush has nowhere to fail
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main_quietly_on_a_closed_pipe())
