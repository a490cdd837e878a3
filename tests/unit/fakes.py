"""Stand-ins for the unit tests of the retry loop: a DBAPI's error classes and a fake clock."""

from __future__ import annotations

import types


class FakeDBAPI(types.SimpleNamespace):
    class Error(Exception):
        sqlstate: str | None = None

    class OperationalError(Error):
        pass


class Clock:
    """A clock that only moves when something sleeps on it (or a test moves it)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
