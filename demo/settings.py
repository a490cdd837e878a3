"""The demo's settings: environment variables (the docker-compose file sets them) and CLI flags."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy.engine import URL, make_url

PoolKind = Literal["queue", "null"]
PatroniRoute = Literal["haproxy", "multihost"]

#: Every environment variable the demo reads; the compose file may set no other for the demo.
ENVIRONMENT_VARIABLES: dict[str, str] = {
    "DATABASE_URL": "SQLAlchemy or libpq-style URL; unset: start a throwaway PostgreSQL",
    "DEMO_POOL": "queue (FaultTolerantQueuePool, straight to PostgreSQL) or null "
    "(FaultTolerantNullPool, for a PgBouncer URL in transaction mode)",
    "DEMO_HOST": "address to listen on (default 127.0.0.1)",
    "DEMO_PORT": "port to listen on (default 8000; 0 picks a free one)",
    "DEMO_POOL_SIZE": "pool_size of the queue pool (default 5)",
    "DEMO_MAX_OVERFLOW": "max_overflow of the queue pool (default 10)",
    "DEMO_RETRY_DEADLINE": "retry_deadline in seconds (default 10)",
    "DEMO_CONNECT_TIMEOUT": "the driver's own timeout for one connect attempt, seconds (default 5)",
    "DEMO_STARTUP_TIMEOUT": "how long startup waits for the database to create the schema "
    "(default 60)",
    "DEMO_STANDBY": "on (default) or off: whether the throwaway PostgreSQL gets a streaming "
    "standby, for the page's fail-over button (ignored with DATABASE_URL)",
    "DEMO_PATRONI": "off (default) or on: run on a throwaway Patroni cluster (etcd, two nodes, "
    "HAProxy) instead of the embedded PostgreSQL and standby (not with DATABASE_URL)",
    "DEMO_PATRONI_ROUTE": "haproxy (default: HAProxy's read-write port) or multihost (a multi-host "
    "URL over the nodes, target_session_attrs=read-write): how the engine reaches the cluster",
    "DEMO_LEAK_THRESHOLD": "leak_threshold of the pool: seconds a checkout may last before it is "
    "reported as a leak (default 10)",
    "DEMO_SHUTDOWN_TIMEOUT": "on Ctrl-C or SIGTERM, seconds in-flight requests and checked-out "
    "connections get to finish (default 10)",
    "DEMO_READ_URLS": "with DATABASE_URL: the URLs of its read replicas, separated by commas or "
    "spaces; GET /notes/ then reads there through a ReplicaRouter (unset: reads on DATABASE_URL; "
    "the embedded database reads on its standby by itself)",
    "DEMO_IDEMPOTENT_WRITES": "on (default) or off: a write carries a key of its own, so the "
    "transaction runner runs it again after a COMMIT cut in flight too; off: that write answers "
    "503 outcome_unknown",
    "OTEL_SERVICE_NAME": "service name of traces and metrics (default fault-tolerant-pool-demo)",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "send traces over OTLP/HTTP there, e.g. http://jaeger:4318",
}

_DRIVERS = {
    # scheme as written by users -> SQLAlchemy async driver name
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
    "postgresql+psycopg": "postgresql+psycopg_async",
    "postgresql+psycopg_async": "postgresql+psycopg_async",
}


_SWITCH = {"on": True, "true": True, "yes": True, "1": True,
           "off": False, "false": False, "no": False, "0": False}  # fmt: skip


class SettingsError(ValueError):
    """A setting has a value the demo cannot use; the message names the variable."""


def _switch(raw: str) -> bool:
    try:
        return _SWITCH[raw.strip().lower()]
    except KeyError:
        raise ValueError(raw) from None


def database_url(raw: str, variable: str = "DATABASE_URL") -> URL:
    """Parse a database URL into the async SQLAlchemy URL the demo uses.

    ``postgres://`` and ``postgresql://`` mean asyncpg; ``postgresql+psycopg://`` means psycopg 3's
    async flavour. Sync-only drivers are refused (the demo is an asyncio service). An error names
    ``variable`` and never repeats the URL, which may hold a password.
    """
    try:
        url = make_url(raw)
    except Exception:
        raise SettingsError(f"{variable} is not a valid database URL") from None
    driver = _DRIVERS.get(url.drivername)
    if driver is None:
        raise SettingsError(
            f"{variable} uses {url.drivername!r}; the demo speaks postgresql+asyncpg:// "
            "(also postgres:// and postgresql://) or postgresql+psycopg://"
        )
    return url.set(drivername=driver)


def _url_list(raw: str) -> tuple[str, ...]:
    """URLs separated by commas or whitespace (checked by :class:`Settings`, which names the
    variable without repeating a URL)."""
    return tuple(part for part in raw.replace(",", " ").split() if part)


@dataclass(frozen=True)
class Settings:
    """What one demo process runs with."""

    database_url: str | None = None
    """``None``: the demo starts a throwaway PostgreSQL of its own."""
    pool: PoolKind = "queue"
    host: str = "127.0.0.1"
    port: int = 8000
    pool_size: int = 5
    max_overflow: int = 10
    retry_deadline: float = 10.0
    connect_timeout: float = 5.0
    startup_timeout: float = 60.0
    standby: bool = True
    """The embedded database gets a streaming hot standby (the page's fail-over button)."""
    patroni: bool = False
    """Run on a throwaway Patroni cluster instead of the embedded PostgreSQL (``--patroni``)."""
    patroni_route: PatroniRoute = "haproxy"
    """How the engine reaches the Patroni cluster: HAProxy's read-write port or a multi-host URL."""
    leak_threshold: float = 10.0
    shutdown_timeout: float = 10.0
    read_urls: tuple[str, ...] = ()
    """Read replicas of ``database_url`` (``DEMO_READ_URLS``): ``GET /notes/`` reads there
    through a ``ReplicaRouter``. The embedded database needs none: it reads on its standby."""
    idempotent_writes: bool = True
    """``POST /notes/`` is declared idempotent (a key per write): a COMMIT cut in flight is run
    again instead of answered ``503 outcome_unknown``."""
    service_name: str = "fault-tolerant-pool-demo"
    otlp_endpoint: str | None = None

    def __post_init__(self) -> None:
        if self.pool not in ("queue", "null"):
            raise SettingsError(f"DEMO_POOL must be 'queue' or 'null', got {self.pool!r}")
        if self.patroni_route not in ("haproxy", "multihost"):
            raise SettingsError(
                f"DEMO_PATRONI_ROUTE must be 'haproxy' or 'multihost', got {self.patroni_route!r}"
            )
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"DEMO_PORT must be a TCP port, got {self.port}")
        for name, value, low in (
            ("DEMO_POOL_SIZE", self.pool_size, 1),
            ("DEMO_MAX_OVERFLOW", self.max_overflow, 0),
        ):
            if value < low:
                raise SettingsError(f"{name} must be at least {low}, got {value}")
        for name, seconds in (
            ("DEMO_RETRY_DEADLINE", self.retry_deadline),
            ("DEMO_CONNECT_TIMEOUT", self.connect_timeout),
            ("DEMO_STARTUP_TIMEOUT", self.startup_timeout),
            ("DEMO_LEAK_THRESHOLD", self.leak_threshold),
            ("DEMO_SHUTDOWN_TIMEOUT", self.shutdown_timeout),
        ):
            if not (math.isfinite(seconds) and seconds > 0):
                raise SettingsError(f"{name} must be a positive number of seconds, got {seconds}")
        if self.database_url is not None:
            database_url(self.database_url)  # validates
        if self.read_urls and self.database_url is None:
            raise SettingsError(
                "DEMO_READ_URLS lists read replicas of DATABASE_URL: set DATABASE_URL too "
                "(the embedded database reads on its own standby)"
            )
        for raw in self.read_urls:
            database_url(raw, "DEMO_READ_URLS")  # validates

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], **overrides: Any) -> Settings:
        """Settings from environment variables (see :data:`ENVIRONMENT_VARIABLES`)."""
        values: dict[str, Any] = {}
        for field, variable, convert in (
            ("database_url", "DATABASE_URL", str),
            ("pool", "DEMO_POOL", lambda v: v.strip().lower()),
            ("host", "DEMO_HOST", str),
            ("port", "DEMO_PORT", int),
            ("pool_size", "DEMO_POOL_SIZE", int),
            ("max_overflow", "DEMO_MAX_OVERFLOW", int),
            ("retry_deadline", "DEMO_RETRY_DEADLINE", float),
            ("connect_timeout", "DEMO_CONNECT_TIMEOUT", float),
            ("startup_timeout", "DEMO_STARTUP_TIMEOUT", float),
            ("standby", "DEMO_STANDBY", _switch),
            ("patroni", "DEMO_PATRONI", _switch),
            ("patroni_route", "DEMO_PATRONI_ROUTE", lambda v: v.strip().lower()),
            ("leak_threshold", "DEMO_LEAK_THRESHOLD", float),
            ("shutdown_timeout", "DEMO_SHUTDOWN_TIMEOUT", float),
            ("read_urls", "DEMO_READ_URLS", _url_list),
            ("idempotent_writes", "DEMO_IDEMPOTENT_WRITES", _switch),
            ("service_name", "OTEL_SERVICE_NAME", str),
            ("otlp_endpoint", "OTEL_EXPORTER_OTLP_ENDPOINT", str),
        ):
            raw = environ.get(variable, "").strip()
            if not raw:
                continue
            try:
                values[field] = convert(raw)
            except ValueError:
                raise SettingsError(f"{variable} has an invalid value {raw!r}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @property
    def url(self) -> URL:
        """The async SQLAlchemy URL (raises if there is none yet)."""
        if self.database_url is None:
            raise SettingsError("no database URL (the embedded database is not started)")
        return database_url(self.database_url)

    @property
    def reader_urls(self) -> tuple[URL, ...]:
        """The async SQLAlchemy URLs of ``read_urls``."""
        return tuple(database_url(raw, "DEMO_READ_URLS") for raw in self.read_urls)
