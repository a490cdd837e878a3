"""Where a pool connects, for telemetry: server address, port and database, never credentials.

The pool never sees the engine's URL. ``create_engine`` hands it a creator that closes over the
connect arguments the dialect built from the URL (SQLAlchemy names them ``cparams`` in 2.0 and
2.1); they are read once, when the pool is built, and only the host, port and database are kept.
A creator the application wrote itself (``creator=``) exposes none: the server attributes are then
left out and the pool name falls back to the database system's name (pass ``pool_name=``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

#: PostgreSQL's port when the URL names none (both drivers default to it).
DEFAULT_PORT = 5432

#: The connect-argument keys of the database name: asyncpg's, then psycopg's (libpq's).
_DATABASE_KEYS = ("database", "dbname")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """The server a pool connects to, as the OpenTelemetry conventions name its parts."""

    address: str | None = None
    """``server.address``: a host name, an IP address or a Unix socket directory."""
    port: int | None = None
    """``server.port``."""
    namespace: str | None = None
    """``db.namespace``: the database name."""

    @property
    def known(self) -> bool:
        return self.address is not None or self.namespace is not None

    def pool_name(self) -> str:
        """The conventions' default pool name, ``server.address:server.port/db.namespace``."""
        port = "" if self.port is None else str(self.port)
        return f"{self.address or ''}:{port}/{self.namespace or ''}"

    def attributes(self) -> dict[str, str | int]:
        """The span attributes this endpoint knows (absent parts are left out, not guessed)."""
        attributes: dict[str, str | int] = {}
        if self.address is not None:
            attributes["server.address"] = self.address
        if self.port is not None:
            attributes["server.port"] = self.port
        if self.namespace is not None:
            attributes["db.namespace"] = self.namespace
        return attributes


def connect_arguments(creator: Callable[..., Any]) -> Mapping[str, Any] | None:
    """The keyword arguments ``create_engine``'s creator passes to the DBAPI, or None if unknown."""
    code = getattr(creator, "__code__", None)
    closure = getattr(creator, "__closure__", None)
    if code is None or not closure:
        return None
    for name, cell in zip(code.co_freevars, closure, strict=True):
        if name == "cparams":
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                return None
            return value if isinstance(value, Mapping) else None
    return None


def _first(value: Any) -> Any:
    """The first of several hosts or ports (a multi-host URL: a list, or libpq's "a,b")."""
    if isinstance(value, list | tuple):
        return value[0] if value else None
    if isinstance(value, str) and "," in value:
        return value.split(",", 1)[0]
    return value


def _port(value: Any) -> int | None:
    value = _first(value)
    if value is None or value == "":
        return DEFAULT_PORT
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def endpoint_of(arguments: Mapping[str, Any] | None) -> Endpoint:
    """Read host, port and database from DBAPI connect arguments; everything else is ignored.

    With several hosts (a multi-host URL) the first one is reported.
    """
    if arguments is None:
        return Endpoint()
    host = _first(arguments.get("host"))
    address = host if isinstance(host, str) and host else None
    namespace = None
    for key in _DATABASE_KEYS:
        database = arguments.get(key)
        if isinstance(database, str) and database:
            namespace = database
            break
    return Endpoint(address, _port(arguments.get("port")), namespace)


def password_of(arguments: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The password among the connect arguments, only to scrub it from messages."""
    password = None if arguments is None else arguments.get("password")
    return (password,) if isinstance(password, str) and password else ()
