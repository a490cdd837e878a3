"""The throwaway PostgreSQL the demo starts when no ``DATABASE_URL`` is given, and its restarts."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Literal

from fault_tolerant_pool.testing import PostgresServer

DatabaseState = Literal["starting", "running", "stopping", "down", "failed"]


@dataclass(frozen=True)
class Restart:
    """One restart: when the server stopped and when it accepted connections again (epoch s)."""

    number: int
    stopped_at: float
    started_at: float | None


class EmbeddedDatabase:
    """A :class:`PostgresServer` from the testing module, with a state the page can show."""

    def __init__(self, server: PostgresServer | None = None) -> None:
        self.server = server if server is not None else PostgresServer()
        self._lock = threading.Lock()
        self._restarting = False
        self.state: DatabaseState = "starting"
        self.restarts: list[Restart] = []

    def start(self) -> None:
        self.server.start()
        self.state = "running"

    def url(self, driver: str = "asyncpg") -> str:
        return self.server.url(driver)

    @property
    def restarting(self) -> bool:
        return self._restarting

    def begin_restart(self) -> bool:
        """Claim the right to restart; False if a restart is already under way."""
        with self._lock:
            if self._restarting or self.state != "running":
                return False
            self._restarting = True
            return True

    def restart(self, down_for: float) -> None:
        """Fast shutdown (in-flight statements are cut), ``down_for`` seconds down, start again.

        Blocking: run it in a thread. Call :meth:`begin_restart` first.
        """
        number = len(self.restarts) + 1
        try:
            self.state = "stopping"
            self.server.stop("fast")
            stopped_at = time.time()
            self.state = "down"
            self.restarts.append(Restart(number, stopped_at, None))
            time.sleep(down_for)
            self.state = "starting"
            self.server.start()
            self.restarts[-1] = Restart(number, stopped_at, time.time())
            self.state = "running"
        except BaseException:
            self.state = "failed"
            raise
        finally:
            with self._lock:
                self._restarting = False

    def destroy(self) -> None:
        """Stop the server and delete its data directory."""
        self.server.destroy()
        self.state = "down"
