"""A connection lost during SQLAlchemy's set-up of it is made again, not failed.

The retried creator covers the login. After it, SQLAlchemy runs the pool's ``first_connect`` and
``connect`` events on the new connection (the dialect's own set-up queries, the application's
listeners) before anything is lent. A server that goes away in that window (a restart, a crash,
PgBouncer moving) made the checkout fail although no statement of the caller had run: SQLAlchemy
closes the stranded connection and raises. Here the record connects again (through the retried
creator, which waits out the outage) when the events failed with a transient error, at most
:data:`SETUP_RETRIES` times. Nothing was lent, so nothing is replayed; a permanent error (a
listener's own bug, a permission) is raised at once, as SQLAlchemy does.

``_ConnectionRecord.__connect`` is the only place that runs both halves; a subclass reaches it
by its mangled name. SQLAlchemy 2.0 and 2.1 both close the stranded connection before raising.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.pool.base import _ConnectionRecord

from .classify import Classifier, classify_with
from .errors import redact
from .notes import ConnectionNotes

logger = logging.getLogger("fault_tolerant_pool.retry")

#: Connects after the first whose set-up may fail before the error is raised. Each goes through
#: the retried creator, which waits for the server itself; this only bounds a server that keeps
#: dropping connections right after the login.
SETUP_RETRIES = 3

_connect_and_set_up = _ConnectionRecord._ConnectionRecord__connect  # type: ignore[attr-defined]


def set_up_again(error: BaseException, classifier: Classifier | None, left: int) -> bool:
    """Whether a connection whose set-up failed with ``error`` is made again (``left`` more
    tries allowed): only for a transient error, never for a cancellation or an exit."""
    if left <= 0 or not isinstance(error, Exception):
        return False
    return classify_with(classifier, error).transient


class SetUpRetriedRecord(_ConnectionRecord):
    """SQLAlchemy's pool record; its connect is made again when the set-up after the login
    fails with a transient error. It carries the pool's notes on its connection (``notes``)."""

    __slots__ = ("notes",)

    def __init__(self, pool: Any, connect: bool = True) -> None:
        # made before SQLAlchemy's __init__, which connects: the connect path writes the notes
        self.notes = ConnectionNotes()
        _ConnectionRecord.__init__(self, pool, connect)

    def _ConnectionRecord__connect(self) -> None:
        pool: Any = self._ConnectionRecord__pool  # type: ignore[attr-defined]
        ft = pool._fault_tolerance
        left = SETUP_RETRIES
        while True:
            self.fresh = False  # set by SQLAlchemy once the login succeeded
            try:
                _connect_and_set_up(self)
                return
            except BaseException as error:
                if not self.fresh or not set_up_again(error, ft.classifier, left):
                    raise
                left -= 1
                logger.warning(
                    "connection lost during SQLAlchemy's set-up of a new connection (%s: %s); "
                    "connecting again (nothing was lent)",
                    type(error).__name__, redact(str(error), ft.secrets()),
                )  # fmt: skip
