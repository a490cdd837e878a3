"""Throwaway PostgreSQL servers, PgBouncers, Patroni clusters and a fault-injecting TCP proxy
for tests.

Everything runs as real processes on 127.0.0.1 (as the ``postgres`` OS user when we are root).
The classes are imported on first use, so loading the pytest plugin costs nothing for projects
that never ask for its fixtures.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .bouncer import PgBouncer, find_pgbouncer
    from .failover import multi_host_url
    from .patroni import PatroniCluster, PatroniNode, PatroniTiming, find_patroni_stack
    from .proxy import FaultProxy
    from .server import (
        PostgresServer,
        PsqlError,
        ServerError,
        ServerUnavailable,
        find_postgres_bindir,
    )

__all__ = [
    "FaultProxy",
    "PatroniCluster",
    "PatroniNode",
    "PatroniTiming",
    "PgBouncer",
    "PostgresServer",
    "PsqlError",
    "ServerError",
    "ServerUnavailable",
    "find_patroni_stack",
    "find_pgbouncer",
    "find_postgres_bindir",
    "multi_host_url",
]

_HOMES = {
    "FaultProxy": ".proxy",
    "PgBouncer": ".bouncer",
    "find_pgbouncer": ".bouncer",
    "PostgresServer": ".server",
    "PsqlError": ".server",
    "ServerError": ".server",
    "ServerUnavailable": ".server",
    "find_postgres_bindir": ".server",
    "PatroniCluster": ".patroni",
    "PatroniNode": ".patroni",
    "PatroniTiming": ".patroni",
    "find_patroni_stack": ".patroni",
    "multi_host_url": ".failover",
}


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first access."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
