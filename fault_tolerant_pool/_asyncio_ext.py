"""SQLAlchemy's asyncio classes, or stand-ins when greenlet is not installed.

``sqlalchemy.ext.asyncio`` refuses to import without greenlet, which a sync-only install may
lack. The transaction runner and the replica router only test binds against these classes:
without greenlet no async engine can exist, so the stand-ins match nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import (
        AsyncConnection,
        AsyncEngine,
        AsyncSession,
        async_sessionmaker,
    )
else:
    try:
        from sqlalchemy.ext.asyncio import (
            AsyncConnection,
            AsyncEngine,
            AsyncSession,
            async_sessionmaker,
        )
    except ImportError:  # no greenlet: a sync-only install

        class _Unavailable:
            def __init__(self, *args: Any, **kw: Any) -> None:
                raise ImportError(
                    "SQLAlchemy's asyncio extension needs greenlet: "
                    "pip install 'sqlalchemy[asyncio]'"
                )

            def __class_getitem__(cls, item: Any) -> type:
                return cls

        class AsyncConnection(_Unavailable):
            pass

        class AsyncEngine(_Unavailable):
            pass

        class AsyncSession(_Unavailable):
            pass

        class async_sessionmaker(_Unavailable):
            pass


__all__ = ["AsyncConnection", "AsyncEngine", "AsyncSession", "async_sessionmaker"]
