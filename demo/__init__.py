"""The demo service: FastAPI on uvicorn over fault-tolerant pools, with a live page of the pool.

Run it with ``python -m demo`` (``bash scripts/demo.sh`` on a fresh machine). Without
``DATABASE_URL`` it starts a throwaway PostgreSQL of its own, which ``python -m demo restart-db``
(or the button on the page) restarts while you watch the requests ride through.
"""

from .app import create_app
from .settings import Settings

__all__ = ["Settings", "create_app"]
