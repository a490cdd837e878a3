"""The demo's tests: the app in-process on the plugin's throwaway PostgreSQL, and ``python -m demo``
as a subprocess (with and without a real browser).

They need the ``demo`` extra; without it they are not collected, except in CI (``CI=true``), where
that is an error.
"""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


try:
    import fastapi  # noqa: F401
    import httpx  # noqa: F401
    import prometheus_client  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError:
    if in_ci():
        raise
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
