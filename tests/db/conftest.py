"""Database tests: each gets a fresh real PostgreSQL from the plugin's ``pg_server``."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
