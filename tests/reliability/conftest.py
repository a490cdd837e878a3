"""The reliability suite: each scenario breaks a real PostgreSQL (or the network, or PgBouncer) in
one way and asserts what succeeded, what failed and with which error, and that nothing leaked."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
