"""The live drivers still raise what the captured table (tests/data/connect_errors.json) says."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fault_tolerant_pool.classify import classify
from fault_tolerant_pool.testing import PostgresServer

from .capture import TABLE, capture_cases, first_failure

pytestmark = pytest.mark.db


def key(case: dict[str, Any]) -> tuple[str, str]:
    return case["driver"], case["case"]


def test_live_failures_match_the_table_and_classify_as_expected(pg_server: PostgresServer) -> None:
    stored = {key(c): c for c in json.loads(TABLE.read_text())}
    live = {key(c): c for c in capture_cases(pg_server)}
    assert live.keys() == stored.keys()
    for k, case in live.items():
        types = [(link["module"], link["qualname"]) for link in case["chain"]]
        stored_types = [(link["module"], link["qualname"]) for link in stored[k]["chain"]]
        # SQLAlchemy 2.0 and 2.1 name asyncpg's adapted errors differently; the driver's own
        # innermost exception must be the same.
        assert types[-1] == stored_types[-1], k
        assert [link.get("sqlstate") for link in case["chain"]][-1:] == [
            link.get("sqlstate") for link in stored[k]["chain"]
        ][-1:], k


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg_async", "psycopg"])
def test_live_classification(pg_server: PostgresServer, driver: str) -> None:
    is_async = driver != "psycopg"
    refused = first_failure(pg_server.url(driver, port=1), is_async)
    assert classify(refused).transient is True
    bad = first_failure(pg_server.url(driver, password="wrong"), is_async)
    verdict = classify(bad)
    assert verdict.transient is False and verdict.sqlstate == "28P01"
