"""The demo's reads (``GET /notes/``, ``GET /notes/{id}``): on a standby through a
:class:`~fault_tolerant_pool.ReplicaRouter` when the demo has one, and what the page shows of them.

With readers (the embedded database's servers, each by its own URL, or ``DEMO_READ_URLS``) every
read is one unit of work in the transaction runner on ``router.reads``: a standby in rotation
takes it, the writer when none is (the router's checks find a standby promoted, down or behind),
and a read cut in flight runs again, on another server, so that none fails. Without readers a
read is a plain checkout on the writer's engine, as it was before the router.

Servers are named by port and by a name of the demo's own (``reader 1``), never by host or URL:
the router's own OpenTelemetry metrics name them ``host:port/database``, so they are kept out of
``/metrics`` and the demo exports its own (:class:`~demo.telemetry.ReadsCollector`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import sqlalchemy as sa
from opentelemetry.metrics import NoOpMeterProvider
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from fault_tolerant_pool import ReaderStatus, ReplicaRouter, run_transaction_async

from . import db
from .settings import Settings, database_url

if TYPE_CHECKING:
    from .embedded import EmbeddedDatabase

log = logging.getLogger("demo.reads")

T = TypeVar("T")
Unit = Callable[[AsyncConnection], Awaitable[T]]

#: The router's metrics would name servers by host: the demo keeps them out of /metrics.
_NO_METRICS = NoOpMeterProvider()

#: Seconds startup waits for the standbys to replay the schema (usually milliseconds).
CATCH_UP_TIMEOUT = 5.0
_WRITER_LSN = sa.text("SELECT pg_current_wal_lsn()::text")
#: An LSN as PostgreSQL writes it, checked before it goes into the standby's query as a literal
#: (a bind parameter of type pg_lsn is not one every driver encodes).
_LSN = re.compile(r"[0-9A-F]{1,8}/[0-9A-F]{1,8}")

#: Why the writer answered a read (``/health``'s ``reads.writer.reasons``, the page says them
#: in words). The first four say why no reader was in rotation, from the router's last checks.
WRITER_REASONS = (
    "no_standby",  # every reader says it is a primary: the standby was promoted
    "standby_down",  # a reader's check failed or hung, or its pool is failing to connect
    "standby_behind",  # a standby further behind than the router lets it be
    "not_checked",  # no check of the readers has answered yet
    "read_your_writes",  # the request committed on the writer a moment before
    "checkout_failed",  # a reader was in rotation: its checkout failed (or it just came back)
)


def why_no_reader(readers: Sequence[ReaderStatus], max_replica_lag: float) -> str | None:
    """Why no reader could take a read, from what the router last found of each (one of the
    first four :data:`WRITER_REASONS`); None while a reader is in rotation.

    A standby out of rotation that measured more than half the allowed lag counts as behind:
    the router presumes such a standby falls further behind until its next check.
    """
    if any(reader.in_rotation for reader in readers):
        return None
    standbys = [reader for reader in readers if reader.role == "standby"]
    if any(reader.lag is not None and reader.lag > max_replica_lag / 2 for reader in standbys):
        return "standby_behind"
    if standbys or any(reader.role == "down" for reader in readers):
        return "standby_down"
    if any(reader.role == "unknown" for reader in readers):
        return "not_checked"
    return "no_standby"


@dataclass(frozen=True)
class Reader:
    """One reader's engine, and how the demo names it: ``reader N`` and its port."""

    name: str
    port: int | None
    engine: AsyncEngine


class Reads(Protocol):
    """Where the demo's reads run: :class:`PlainReads` or :class:`RoutedReads`."""

    async def start(self) -> None: ...

    async def run(self, unit: Unit[T]) -> T: ...

    def health(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


class PlainReads:
    """No readers: a read is a plain checkout on the writer's engine (as before the router: a
    read whose statement a fault cut answers a clean 503)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def start(self) -> None:
        pass

    async def run(self, unit: Unit[T]) -> T:
        async with self.engine.connect() as conn:
            return await unit(conn)

    def health(self) -> dict[str, Any]:
        return {"routed": False}

    async def aclose(self) -> None:
        pass


class RoutedReads:
    """Reads through a :class:`ReplicaRouter` over the writer and ``readers``, each one unit of
    work in the transaction runner on ``router.reads``; which server answered it, and why the
    writer did when it did."""

    def __init__(self, writer: AsyncEngine, readers: Sequence[Reader]) -> None:
        self.readers = tuple(readers)
        self.router = ReplicaRouter(
            writer, [reader.engine for reader in self.readers], meter_provider=_NO_METRICS
        )
        #: Reads the writer answered, by reason (:data:`WRITER_REASONS`).
        self.on_writer: dict[str, int] = {}
        #: Runs of a read beyond its first: the ones a fault cut, run again by the runner.
        self.run_again = 0
        #: The last read answered: ``route`` (``reader`` or ``writer``), ``name``, ``port``,
        #: ``reason`` (the writer's), ``at`` (epoch s).
        self.last: dict[str, Any] | None = None
        self._by_engine: dict[Engine, Reader] = {r.engine.sync_engine: r for r in self.readers}
        self._sticky_seen = 0

    async def start(self) -> None:
        """Start the router's checks and wait for their first answers (1.5 s at most), then for
        the standbys to replay the schema the demo has just made on the writer: the first reads
        already know which server is a standby, and find the table there."""
        await self.router.wait_ready()
        await self._caught_up(CATCH_UP_TIMEOUT)

    async def _caught_up(self, timeout: float) -> None:
        """Wait until every reader the router found a standby has replayed the writer's WAL as
        of now, ``timeout`` at most."""
        writer = self.router.writer
        assert isinstance(writer, AsyncEngine)
        async with writer.connect() as conn:
            lsn = (await conn.execute(_WRITER_LSN)).scalar_one()
        if not _LSN.fullmatch(lsn):
            return
        replayed = sa.text(f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn")
        deadline = time.monotonic() + timeout
        standbys = [
            reader
            for reader, status in zip(self.readers, self.router.stats().readers, strict=True)
            if status.role == "standby"
        ]
        for reader in standbys:
            while True:
                left = max(deadline - time.monotonic(), 0.1)
                # A reader that does not answer is the router's concern (its checks).
                with contextlib.suppress(Exception):
                    if await asyncio.wait_for(_ask(reader.engine, replayed), left):
                        break
                if time.monotonic() >= deadline:
                    log.warning("%s has not replayed the schema yet; reads go on", reader.name)
                    return
                await asyncio.sleep(0.05)

    async def run(self, unit: Unit[T]) -> T:
        served: list[Engine] = []

        async def read(conn: AsyncConnection) -> T:
            served.append(conn.sync_engine)
            return await unit(conn)

        result = await run_transaction_async(self.router.reads, read)
        self.run_again += len(served) - 1
        self._answered_by(served[-1])
        return result

    def _answered_by(self, engine: Engine) -> None:
        at = round(time.time(), 3)
        reader = self._by_engine.get(engine)
        if reader is not None:
            self.last = {"route": "reader", "name": reader.name, "port": reader.port,
                         "reason": None, "at": at}  # fmt: skip
            return
        reason = self._why_on_writer()
        self.on_writer[reason] = self.on_writer.get(reason, 0) + 1
        self.last = {"route": "writer", "name": "writer", "port": None, "reason": reason, "at": at}

    def _why_on_writer(self) -> str:
        """The router counts a read kept on the writer for read-your-writes before it looks at
        the readers; the demo's account follows its counter, then the readers' state."""
        stats = self.router.stats()
        if stats.read_your_writes > self._sticky_seen:
            self._sticky_seen += 1
            return "read_your_writes"
        return why_no_reader(stats.readers, self.router.max_replica_lag) or "checkout_failed"

    def health(self) -> dict[str, Any]:
        """``/health``'s ``reads``: each reader as the router sees it, by name and port, and
        the reads the writer took (the router's counts, and the demo's reasons)."""
        stats = self.router.stats()
        servers = [
            {
                "name": reader.name,
                "port": reader.port,
                "role": status.role,
                "in_rotation": status.in_rotation,
                "lag": None if status.lag is None else round(status.lag, 3),
                "reads": status.reads,
                "skipped_for_lag": status.skipped_for_lag,
                "skipped_down": status.skipped_down,
            }
            for reader, status in zip(self.readers, stats.readers, strict=True)
        ]
        return {
            "routed": True,
            "max_replica_lag": self.router.max_replica_lag,
            "servers": servers,
            "writer": {
                "reads": stats.writer_reads,
                "fallbacks": stats.fallbacks,
                "read_your_writes": stats.read_your_writes,
                "reasons": dict(self.on_writer),
            },
            "run_again": self.run_again,
            "last": self.last,
        }

    async def aclose(self) -> None:
        """Stop the router's checks, then close the readers' engines (the router leaves them)."""
        await self.router.aclose()
        for reader in self.readers:
            await reader.engine.dispose()


async def _ask(engine: AsyncEngine, query: sa.TextClause) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(query)).scalar_one()


def open_reads(
    settings: Settings, writer: AsyncEngine, database: EmbeddedDatabase | None = None
) -> PlainReads | RoutedReads:
    """The demo's read path: ``DEMO_READ_URLS``, else the embedded database's servers when it
    has a standby, else none (plain reads on the writer)."""
    urls = list(settings.reader_urls)
    if not urls and database is not None:
        driver = writer.url.get_driver_name()
        urls = [database_url(url) for url in database.reader_urls(driver)]
    if not urls:
        return PlainReads(writer)
    readers = [
        Reader(
            f"reader {number}",
            url.port,
            db.make_engine(settings, url, f"{settings.service_name}-reader-{number}", reader=True),
        )
        for number, url in enumerate(urls, start=1)
    ]
    return RoutedReads(writer, readers)
