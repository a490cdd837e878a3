"""Failover tools: multi-host URLs (and, from :mod:`.server`, the base backup behind
:meth:`PostgresServer.standby`).

A service under test reaches "whichever server is the writer" the way it would in production: a
multi-host URL with ``target_session_attrs=read-write``, which both asyncpg and psycopg honour by
trying the hosts in turn and skipping those that are standbys or read-only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import quote

from .server import base_backup

if TYPE_CHECKING:
    from .server import PostgresServer

__all__ = ["base_backup", "multi_host_url"]

#: ``target_session_attrs`` values libpq (PostgreSQL 14+) and asyncpg both accept.
TARGET_SESSION_ATTRS = frozenset(
    {"any", "primary", "standby", "prefer-standby", "read-write", "read-only"}
)


def multi_host_url(
    driver: str | None,
    servers: Sequence[PostgresServer | tuple[str, int]],
    target_session_attrs: str | None = "read-write",
    *,
    user: str | None = None,
    password: str | None = None,
    dbname: str | None = None,
) -> str:
    """SQLAlchemy's multi-host URL for ``servers``, tried in the order given.

    ``postgresql+asyncpg://u:p@/db?host=h1:p1&host=h2:p2&target_session_attrs=read-write``: the
    form SQLAlchemy documents for asyncpg and psycopg (the psycopg dialect turns it into libpq's
    ``host=h1,h2 port=p1,p2``). A server is a :class:`PostgresServer` or a ``(host, port)`` pair,
    e.g. a :class:`FaultProxy` in front of one. The credentials and database name are the first
    :class:`PostgresServer`'s unless given. ``target_session_attrs=None`` leaves the parameter out
    (the drivers then take the first host that answers).
    """
    if not servers:
        raise ValueError("multi_host_url() needs at least one server, got none")
    if target_session_attrs is not None and target_session_attrs not in TARGET_SESSION_ATTRS:
        raise ValueError(
            f"target_session_attrs must be one of {sorted(TARGET_SESSION_ATTRS)}, "
            f"got {target_session_attrs!r}"
        )
    hosts: list[str] = []
    first: PostgresServer | None = None
    for server in servers:
        if isinstance(server, tuple):
            host, port = server
        else:
            first = first or server
            host, port = server.host, server.port
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"multi_host_url(): port of {host!r} must be a TCP port, got {port!r}")
        hosts.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    if user is None or password is None:
        if first is None:
            raise ValueError(
                "multi_host_url() needs user= and password= when no server is a PostgresServer"
            )
        user = user if user is not None else first.user
        password = password if password is not None else first.password
    if dbname is None:
        dbname = first.dbname if first is not None else "postgres"
    scheme = "postgresql" if driver is None else f"postgresql+{driver}"
    query = [f"host={quote(h, safe='[]:')}" for h in hosts]
    if target_session_attrs is not None:
        query.append(f"target_session_attrs={target_session_attrs}")
    credentials = f"{quote(user, safe='')}:{quote(password, safe='')}"
    return f"{scheme}://{credentials}@/{quote(dbname, safe='')}?" + "&".join(query)
