"""A pytest plugin for SQLAlchemy's own ``test/engine/test_pool.py`` (from its sdist): this
project's queue pools in place of ``QueuePool`` and ``AsyncAdaptedQueuePool``.

``overflow_idle`` comes from the environment variable ``FTP_OVERFLOW_IDLE`` (unset: the
default); every other setting is this project's default. Run it as docs/lifetime.md's
"SQLAlchemy's own pool tests" paragraph shows (``python -s`` keeps the sdist's ``lib/`` out, so the
installed SQLAlchemy, the one the project imports, is the one tested).
"""

from __future__ import annotations

import os
from typing import Any

import sqlalchemy.pool

from fault_tolerant_pool.overflow import DEFAULT_OVERFLOW_IDLE
from fault_tolerant_pool.pool import FaultTolerantAsyncQueuePool, FaultTolerantQueuePool

OVERFLOW_IDLE = float(os.environ.get("FTP_OVERFLOW_IDLE", DEFAULT_OVERFLOW_IDLE))


class QueuePool(FaultTolerantQueuePool):
    def __init__(self, creator: Any, **kw: Any) -> None:
        kw.setdefault("overflow_idle", OVERFLOW_IDLE)
        super().__init__(creator, **kw)


class AsyncAdaptedQueuePool(FaultTolerantAsyncQueuePool):
    def __init__(self, creator: Any, **kw: Any) -> None:
        kw.setdefault("overflow_idle", OVERFLOW_IDLE)
        super().__init__(creator, **kw)


sqlalchemy.pool.QueuePool = QueuePool  # type: ignore[misc]
sqlalchemy.pool.AsyncAdaptedQueuePool = AsyncAdaptedQueuePool  # type: ignore[misc]
