"""Multi-host URLs: the pool tries the hosts one by one, each with its own time limit.

Left to themselves the drivers give a black-holed first host the whole connect: asyncpg's
``timeout`` covers every host of the list, and libpq waits ``connect_timeout`` (at least 2 s)
per host, so a host that drops packets uses up the attempt and the healthy one is never tried.
So for a URL with several hosts the pool narrows each attempt to one host (the ``do_connect``
listener of :mod:`fault_tolerant_pool.timeouts` rewrites ``host`` and ``port`` of that attempt)
and goes through them itself:

- A round tries every host once, starting with the host that gave the last connection
  (sticky, as pgx and libpq keep the order), or a random one with ``load_balance_hosts=random``.
- Moving to the next host of a round costs no backoff; a round that fails is one failed attempt
  for the backoff and the deadline.
- In a connect's first round, every host gets at most :data:`FIRST_LOOK` seconds (a host that has
  not answered by then is most likely gone, as Happy Eyeballs assumes after 250 ms); from the
  second round on, each host gets the attempt's full time limit, so a slow network still
  connects.
- ``target_session_attrs`` stays in the arguments: the driver checks it on the one host, and a
  host of the wrong kind ("session is read-only") is a transient failure, so the next host is
  tried. ``prefer-standby`` is left to the driver (it ranks hosts, it does not filter them).
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

#: Seconds a host may take in a connect's first round before the next host is tried.
FIRST_LOOK = 0.5

#: ``target_session_attrs`` values that filter hosts one by one (any other value, such as
#: ``prefer-standby``, is left to the driver's own multi-host connect).
FILTERING_ATTRS = frozenset({"any", "read-write", "read-only", "primary", "standby"})

#: The label of a host that answered but was not of the kind asked for.
NOT_WRITABLE = "not of the target_session_attrs kind"

#: The values that ask for a writable server.
WRITER_ATTRS = frozenset({"read-write", "primary"})


@dataclass(frozen=True, slots=True)
class Host:
    """One host of a multi-host URL, in the driver's own spelling."""

    host: str
    port: Any
    """The driver's value: an int for asyncpg, a string for libpq (psycopg)."""

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def _split(value: Any) -> list[Any] | None:
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, str):
        return value.split(",")
    return None


def hosts_of(arguments: Mapping[str, Any] | None) -> tuple[Host, ...]:
    """The hosts of DBAPI connect arguments: several for a multi-host URL, else one or none.

    asyncpg's arguments hold lists (``host=['a', 'b']``, ``port=[1, 2]``), libpq's comma
    separated strings (``host='a,b'``, ``port='1,2'``); one port may serve every host.
    """
    if arguments is None:
        return ()
    hosts = _split(arguments.get("host"))
    if not hosts or len(hosts) < 2 or any(not isinstance(h, str) or not h for h in hosts):
        return ()
    port = arguments.get("port")
    ports = _split(port) if port is not None else [None]
    if ports is None:
        ports = [port]
    if len(ports) == 1:
        ports = ports * len(hosts)
    if len(ports) != len(hosts):
        return ()  # the driver will say what is wrong with it
    return tuple(Host(h, p) for h, p in zip(hosts, ports, strict=True))


def wants_writer(arguments: Mapping[str, Any] | None) -> bool:
    """Whether the URL asks for a writable server (``target_session_attrs``)."""
    attrs = None if arguments is None else arguments.get("target_session_attrs")
    return isinstance(attrs, str) and attrs.strip().lower() in WRITER_ATTRS


class HostRotation:
    """The pool's multi-host state: which host to try first; the rounds of one connect.

    Thread-safe enough without a lock for its one shared value (``preferred``): an int written
    whole. ``random`` is injectable for tests.
    """

    __slots__ = ("balance", "hosts", "preferred", "random")

    def __init__(
        self,
        hosts: tuple[Host, ...],
        *,
        balance: bool = False,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self.hosts = hosts
        self.balance = balance
        self.preferred = 0
        self.random = random

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any] | None) -> HostRotation | None:
        """A rotation for a multi-host URL whose hosts the pool may try one by one, else None."""
        hosts = hosts_of(arguments)
        if not hosts:
            return None
        assert arguments is not None
        attrs = arguments.get("target_session_attrs")
        if isinstance(attrs, str) and attrs.strip().lower() not in FILTERING_ATTRS:
            return None
        if arguments.get("hostaddr") not in (None, ""):
            return None  # libpq pairs hostaddr with host; leave such a list to it
        balance = str(arguments.get("load_balance_hosts", "")).strip().lower() == "random"
        return cls(hosts, balance=balance)

    def round(self) -> Round:
        """The order of the hosts for one connect's first round."""
        count = len(self.hosts)
        start = int(self.random() * count) % count if self.balance else self.preferred
        return Round(self, start)

    def connected(self, index: int) -> None:
        """A connection was made to ``hosts[index]``: try it first next time."""
        self.preferred = index


class Round:
    """Where one connect is in its rounds over the hosts (not shared between connects)."""

    __slots__ = ("failed_host", "failures", "number", "position", "rotation", "start")

    def __init__(self, rotation: HostRotation, start: int) -> None:
        self.rotation = rotation
        self.start = start
        self.position = 0  # how many hosts of the current round were tried
        self.number = 0  # rounds completed
        self.failed_host: Host | None = None
        self.failures: dict[Host, str] = {}
        """The last failure of each host (its label), for the give-up message."""

    @property
    def index(self) -> int:
        hosts = self.rotation.hosts
        return (self.start + self.position) % len(hosts)

    @property
    def host(self) -> Host:
        return self.rotation.hosts[self.index]

    def most(self) -> float | None:
        """The most the current host's try may take beyond the attempt's own limit (None: no
        more than that)."""
        return FIRST_LOOK if self.number == 0 else None

    def failed(self, label: str) -> bool:
        """The current host failed (transiently); True if another host of this round is left.

        Otherwise the round is over and the next one starts from the same first host.
        """
        self.failed_host = host = self.host
        self.failures[host] = label
        self.position += 1
        if self.position < len(self.rotation.hosts):
            return True
        self.position = 0
        self.number += 1
        return False

    def connected(self) -> None:
        self.rotation.connected(self.index)

    def summary(self, writer: bool) -> str:
        """What the give-up message says of the hosts: each with the label of its last failure,
        and, for a URL that asks for a writer, whether none was writable."""
        tried = ", ".join(f"{host} [{label}]" for host, label in self.failures.items())
        if writer and NOT_WRITABLE in self.failures.values():
            return f"no host was writable; hosts tried: {tried}"
        return f"hosts tried: {tried}"


def narrow(cparams: dict[str, Any], host: Host) -> None:
    """Make one attempt's connect arguments name only ``host`` (the ``do_connect`` listener)."""
    cparams["host"] = host.host
    if host.port is not None:
        cparams["port"] = host.port
    else:
        cparams.pop("port", None)
