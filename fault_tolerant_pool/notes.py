"""What the pool keeps per connection record, beyond SQLAlchemy's own: one slotted object.

:class:`ConnectionNotes` holds the lifetime stamp (:mod:`.upkeep`), what the server said about
writes when the connection was made (:mod:`.demotion`), the mark of a failed statement
(:mod:`.watchdog`), the start of a measured checkout (:mod:`.telemetry`) and the credentials
offered to a connect (:mod:`.credentials`). The checkout and the checkin read it every time, so
its facts are slots of one object the record holds in a slot of its own: two attribute reads, no
call, no allocation. A record of this project's pools
(:class:`~fault_tolerant_pool.setup_retry.SetUpRetriedRecord`) makes its notes when it is made;
any other record of SQLAlchemy's (one made by hand) gets them in its ``__dict__`` at first use
(:func:`notes_of`).

A record holds one physical connection at a time, and a reconnect clears nothing. The facts of
a connection are written again when the next one is made: the lifetime stamp by the upkeep,
``connected_read_only`` by the demotion watch (each only in a pool that has one). The others are
taken when read: ``offer`` by the connect it was made for, ``checked_out_at`` at checkin,
``suspect`` by the next rollback, which is the next connection's when its own connection was
invalidated first (that rollback then gets the ping's time limit too, which costs nothing).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .liveness import Probe


class ConnectionNotes:
    """What the pool knows about the connection a record holds (see the module docstring)."""

    __slots__ = (
        "checked_out_at",
        "connected_read_only",
        "deadline",
        "fresh",
        "generation",
        "last_used",
        "offer",
        "probe",
        "suspect",
    )

    def __init__(self) -> None:
        self.generation: int | None = None
        """The pool's generation when the connection was made (see ``Upkeep.drain``); None:
        not stamped (made while the pool had no upkeep), and the stamp below means nothing."""
        self.deadline = math.inf
        """When the connection is retired (its lifetime drawn with jitter when it was made)."""
        self.last_used = 0.0
        """When the connection was made or last came back to the pool (idle time counts from it)."""
        self.fresh = False
        """Not returned yet: made for the checkout that lends it, so it is neither probed nor
        pinged."""
        self.probe: Probe | None = None
        """The look at the socket that finds a connection the server closed while it was idle."""
        self.connected_read_only: bool | None = None
        """Whether the server took no writes when the connection was made (None: it did not say)."""
        self.suspect = False
        """A statement failed on the connection: its next rollback gets the ping's time limit."""
        self.checked_out_at: float | None = None
        """When a measured checkout lent the connection (``perf_counter``), for its use time."""
        self.offer: Any = None
        """The credentials (a ``credentials.Secret``) offered to the connect in progress, until
        ``do_connect`` takes them."""


def notes_of(record: Any) -> ConnectionNotes:
    """``record``'s notes: its own, or new ones kept in its ``__dict__`` (a record made by hand,
    or a test's stand-in). For the connect path and SQLAlchemy's events, which may meet any
    record; the checkout and checkin read ``record.notes`` directly."""
    notes: ConnectionNotes | None = getattr(record, "notes", None)
    if notes is None:
        notes = record.notes = ConnectionNotes()
    return notes
