"""The throwaway PostgreSQL the demo starts when no ``DATABASE_URL`` is given: a primary, by default
a streaming hot standby beside it, and what the page's buttons do to them (restart, fail over,
rebuild the standby, the chaos mix)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

from fault_tolerant_pool.testing import PostgresServer, PsqlError, ServerUnavailable, multi_host_url

DatabaseState = Literal["starting", "running", "stopping", "down", "failing over", "failed"]
Role = Literal["primary", "standby", "demoted", "rebuilding"]


@dataclass(frozen=True)
class Restart:
    """One restart: when the server stopped and when it accepted connections again (epoch s)."""

    number: int
    stopped_at: float
    started_at: float | None


@dataclass(frozen=True)
class Failover:
    """One failover: the old writer turned read-only, then the standby promoted (epoch s)."""

    number: int
    from_port: int
    to_port: int
    demoted_at: float
    promoted_at: float | None


ChaosKind = Literal["terminate", "restart", "crash"]

#: The chaos mix: (kind, what the page says). Spaced ``pause`` seconds apart.
CHAOS_STEPS: tuple[tuple[ChaosKind, str], ...] = (
    ("terminate", "terminate every client session (pg_terminate_backend)"),
    ("restart", "fast restart, down {down_for:g} s"),
    ("crash", "crash: immediate stop, started again at once (crash recovery)"),
    ("terminate", "terminate every client session again"),
)


@dataclass(frozen=True)
class ChaosStep:
    """One step of a chaos mix (epoch s): ``detail`` says what it did, ``error`` why it failed."""

    run: int
    step: int
    of: int
    kind: ChaosKind
    label: str
    port: int
    started_at: float
    done_at: float | None = None
    detail: str | None = None
    error: str | None = None


class EmbeddedDatabase:
    """:class:`PostgresServer` s from the testing module, with a state the page can show.

    With a standby (``standby=`` a running one, or ``make_standby=True`` to have :meth:`start`
    make it), :meth:`url` is a multi-host URL over both ports with
    ``target_session_attrs=read-write``, so the engine finds the writer whichever it is. The
    ports never change: a failover swaps the roles, and :meth:`rebuild_standby` puts a fresh
    standby on the demoted server's port.
    """

    def __init__(
        self,
        server: PostgresServer | None = None,
        standby: PostgresServer | None = None,
        *,
        make_standby: bool = False,
    ) -> None:
        self.server = server if server is not None else PostgresServer()
        #: The current writer (``server`` until the first failover).
        self.primary = self.server
        self.standby = standby
        #: The writer a failover turned read-only; it stays up until the standby is rebuilt.
        self.demoted: PostgresServer | None = None
        self._make_standby = make_standby
        self._lock = threading.Lock()
        self._busy = False
        self._rebuilding_port: int | None = None
        self.state: DatabaseState = "starting"
        self.restarts: list[Restart] = []
        self.failovers: list[Failover] = []
        #: Every step of every chaos mix, in order; ``chaos_runs`` counts the mixes begun.
        self.chaos_steps: list[ChaosStep] = []
        self.chaos_runs = 0
        self.chaos_running = False
        self._stopping = threading.Event()
        self.ports = self._ports()
        #: Why :meth:`start` could not make the standby it was asked for (``None``: it did).
        self.no_standby_reason: str | None = None

    def start(self) -> None:
        self.server.start()
        if self._make_standby and self.standby is None:
            try:
                self.standby = self.server.standby()
            except ServerUnavailable as exc:  # e.g. no pg_basebackup: the demo runs without
                self.no_standby_reason = str(exc)
        self.ports = self._ports()
        self.state = "running"

    def _ports(self) -> tuple[int, ...]:
        """The ports of the engine's URL, in its order (fixed once the servers are made)."""
        return tuple(s.port for s in (self.server, self.standby) if s is not None)

    @property
    def can_fail_over(self) -> bool:
        """Whether the demo runs two servers, so that failover is possible at all."""
        return len(self.ports) > 1

    def url(self, driver: str = "asyncpg") -> str:
        """The engine's URL: the primary's, or a multi-host URL over both servers' ports."""
        if self.standby is None:
            return self.server.url(driver)
        return multi_host_url(driver, [self.server, self.standby])

    def reader_urls(self, driver: str = "asyncpg") -> list[str]:
        """Each server by its own URL, in the engine URL's order: the readers of the demo's
        ``ReplicaRouter`` (empty without a standby). The writer among them takes no reads (its
        check says it is not in recovery): the standby does, or the one rebuilt on the demoted
        server's port. The ports never change, so the list stays valid through every failover."""
        if not self.can_fail_over:
            return []
        return [self.server.url(driver, port=port) for port in self.ports]

    @property
    def restarting(self) -> bool:
        return self._busy

    def _claim(self, need_standby: bool | None = None) -> str | None:
        """Claim the right to change the servers; the reason why not, or None."""
        with self._lock:
            if self._busy or self.state != "running":
                return "the database is busy (a restart, failover or rebuild is under way)"
            if need_standby is True and self.standby is None:
                if self.demoted is not None:
                    return "no standby to promote: rebuild the standby first"
                return "this demo runs without a standby (started with --no-standby)"
            if need_standby is False and self.demoted is None:
                return "there is a standby already; nothing to rebuild"
            self._busy = True
            return None

    def _release(self) -> None:
        with self._lock:
            self._busy = False

    @contextlib.contextmanager
    def _claimed(self) -> Iterator[None]:
        """Run an action claimed by a ``begin_*`` method: if it fails, the database is
        ``failed``; either way the claim ends, and ``chaos_running`` (which
        :meth:`begin_chaos` sets) with it."""
        try:
            yield
        except BaseException:
            self.state = "failed"
            raise
        finally:
            self.chaos_running = False
            self._release()

    def begin_restart(self) -> bool:
        """Claim the right to restart; False if a restart (or failover) is already under way."""
        return self._claim() is None

    def begin_failover(self) -> str | None:
        """Claim the right to fail over; the reason it cannot, or None."""
        return self._claim(need_standby=True)

    def begin_chaos(self) -> str | None:
        """Claim the right to run the chaos mix; the reason it cannot, or None."""
        refused = self._claim()
        if refused is None:
            self._stopping.clear()
            self.chaos_runs += 1
            self.chaos_running = True
        return refused

    def stop_actions(self) -> None:
        """The demo is stopping: a chaos mix under way ends after its current step."""
        self._stopping.set()

    def begin_rebuild(self) -> str | None:
        """Claim the right to rebuild the standby; the reason it cannot, or None."""
        return self._claim(need_standby=False)

    def restart(self, down_for: float) -> None:
        """Fast shutdown of the writer (in-flight statements are cut), ``down_for`` seconds down,
        start again. The standby keeps running and follows it when it is back.

        Blocking: run it in a thread. Call :meth:`begin_restart` first.
        """
        number = len(self.restarts) + 1
        with self._claimed():
            self.state = "stopping"
            self.primary.stop("fast")
            stopped_at = time.time()
            self.state = "down"
            self.restarts.append(Restart(number, stopped_at, None))
            time.sleep(down_for)
            self.state = "starting"
            self.primary.start()
            self.restarts[-1] = Restart(number, stopped_at, time.time())
            self.state = "running"

    def failover(self, gap: float) -> None:
        """Turn the writer read-only (it stays reachable); ``gap`` s later, promote the standby.

        What an operator or Patroni does in a switchover: existing sessions on the old writer
        fail their next write with SQLSTATE 25006, new ones there are read-only, and for ``gap``
        seconds no server takes writes. Blocking: run it in a thread; call
        :meth:`begin_failover` first.
        """
        old, new = self.primary, self.standby
        assert new is not None, "begin_failover() first"
        number = len(self.failovers) + 1
        with self._claimed():
            self.state = "failing over"
            old.set_read_only()
            demoted_at = time.time()
            self.failovers.append(Failover(number, old.port, new.port, demoted_at, None))
            time.sleep(gap)
            new.promote()
            self.failovers[-1] = Failover(number, old.port, new.port, demoted_at, time.time())
            self.primary, self.standby, self.demoted = new, None, old
            self.state = "running"

    def chaos(self, pause: float = 5.0, down_for: float = 2.0) -> None:
        """The chaos mix on the current writer, each step ``pause`` seconds after the previous
        one ended: terminate every client session, a fast restart (down ``down_for`` s), a crash
        (immediate stop, started again at once), terminate every session again. About 20 s with
        the defaults. Each step is recorded in :attr:`chaos_steps` as it begins and ends.

        Blocking: run it in a thread; call :meth:`begin_chaos` first. :meth:`stop_actions` ends
        it after the current step.
        """
        run = self.chaos_runs
        with self._claimed():
            for index, (kind, label) in enumerate(CHAOS_STEPS, start=1):
                if index > 1 and self._stopping.wait(pause):
                    break
                server = self.primary
                step = ChaosStep(
                    run, index, len(CHAOS_STEPS), kind, label.format(down_for=down_for),
                    server.port, time.time(),
                )  # fmt: skip
                self.chaos_steps.append(step)
                position = len(self.chaos_steps) - 1
                try:
                    detail = self._chaos_step(kind, server, down_for)
                except BaseException as exc:
                    self.chaos_steps[position] = replace(
                        step, done_at=time.time(), error=f"{type(exc).__name__}: {exc}"[:300]
                    )
                    raise
                self.chaos_steps[position] = replace(step, done_at=time.time(), detail=detail)

    def _chaos_step(self, kind: ChaosKind, server: PostgresServer, down_for: float) -> str:
        if kind == "terminate":
            count = server.terminate_backends()
            return f"{count} session{'s' if count != 1 else ''} terminated"
        self.state = "stopping"
        server.stop("fast" if kind == "restart" else "immediate")
        stopped = time.monotonic()
        self.state = "down"
        if kind == "restart":
            time.sleep(down_for)
        self.state = "starting"
        server.start()
        self.state = "running"
        return f"accepting connections again {time.monotonic() - stopped:.2f} s after the stop"

    def rebuild_standby(self) -> None:
        """Replace the demoted server by a fresh standby of the writer, on the same port.

        The demoted server went its own way (its timeline diverged at the promotion), so it is
        deleted and a new base backup of the writer is started in its place (about a second):
        the engine's multi-host URL stays valid, and the next failover goes back to that port.
        Blocking: run it in a thread; call :meth:`begin_rebuild` first.
        """
        old = self.demoted
        assert old is not None, "begin_rebuild() first"
        with self._claimed():
            try:
                self._rebuilding_port = old.port
                self.demoted = None
                old.destroy()
                self.standby = self.primary.standby(port=old.port)
            finally:
                self._rebuilding_port = None

    def servers(self) -> list[dict[str, Any]]:
        """Each server by port (in the URL's order): its role and whether it runs."""
        known: dict[int, tuple[Role, PostgresServer | None]] = {
            self.primary.port: ("primary", self.primary)
        }
        if self.standby is not None:
            known[self.standby.port] = ("standby", self.standby)
        if self.demoted is not None:
            known[self.demoted.port] = ("demoted", self.demoted)
        if self._rebuilding_port is not None:
            known[self._rebuilding_port] = ("rebuilding", None)
        found = []
        for port in sorted(known, key=lambda p: self.ports.index(p) if p in self.ports else p):
            role, server = known[port]
            found.append(
                {"port": port, "role": role, "running": server is not None and server.is_running}
            )
        return found

    def inspect(self) -> list[dict[str, Any]]:
        """:meth:`servers`, plus what each says of itself: ``pg_is_in_recovery()`` and
        ``default_transaction_read_only`` (``None`` when it does not answer). Blocking."""
        by_port = {s.port: s for s in (self.primary, self.standby, self.demoted) if s is not None}
        found = self.servers()
        for entry in found:
            entry["in_recovery"] = entry["read_only"] = None
            server = by_port.get(entry["port"])
            if server is None or not entry["running"]:
                continue
            try:
                rows = server.psql(
                    "SELECT pg_is_in_recovery(), current_setting('default_transaction_read_only')",
                    timeout=2.0,
                )
            except PsqlError:
                continue
            entry["in_recovery"] = rows[0][0] == "t"
            entry["read_only"] = rows[0][1] == "on"
        return found

    def destroy(self) -> None:
        """Stop every server and delete their data directories."""
        for server in {id(s): s for s in (self.server, self.primary, self.standby, self.demoted)
                       if s is not None}.values():  # fmt: skip
            server.destroy()
        self.state = "down"
