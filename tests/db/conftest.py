"""Fixtures for the database tests: a fresh real PostgreSQL per test (the plugin's ``pg_server``)."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
