"""SQLAlchemy's own pool tests pass with this project's pools, except the docs' short list."""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import sqlalchemy

from . import suite
from .expected_failures import EXPECTED, MODES, NOT_RUN


@pytest.fixture(scope="module")
def outcomes() -> Iterator[dict[str, Future[suite.Outcome]]]:
    """Both modes run at once in processes of their own (the suite mostly sleeps)."""
    suite.prepare()  # fetch and unpack once, before the runs share the directory
    with ThreadPoolExecutor(len(MODES)) as pool:
        yield {mode: pool.submit(suite.run, mode) for mode in MODES}


@pytest.mark.parametrize("mode", list(MODES))
def test_sqlalchemy_pool_suite(mode: str, outcomes: dict[str, Future[suite.Outcome]]) -> None:
    outcome = outcomes[mode].result()
    summary = outcome.output.strip().splitlines()[-1] if outcome.output.strip() else ""
    assert outcome.returncode == 0, (
        f"SQLAlchemy {sqlalchemy.__version__}'s pool suite ({mode}) differs from "
        f"tests/sqlalchemy_suite/expected_failures.py:\n{outcome.output[-20000:]}"
    )
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|xfailed|deselected)", summary)}
    assert counts.get("passed", 0) >= 40, summary  # it really ran
    reasons = EXPECTED[suite.series()][mode].values()
    not_run = sum(reason.startswith(NOT_RUN) for reason in reasons)
    assert counts.get("xfailed", 0) == len(reasons) - not_run, summary
    assert counts.get("deselected", 0) == not_run, summary


def docs_rows() -> dict[tuple[str, str], str]:
    """(test node id, mode) -> reason, from the table of expected failures in docs/sqlalchemy.md."""
    section = (suite.ROOT / "docs" / "sqlalchemy.md").read_text()
    rows: dict[tuple[str, str], str] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`test/"):
            for mode in cells[1].split(", "):
                rows[cells[0].strip("`"), mode.strip("`")] = cells[2]
    return rows


def test_the_docs_list_exactly_the_expected_failures() -> None:
    listed = {
        (test, mode): reason
        for modes in EXPECTED.values()
        for mode, tests in modes.items()
        for test, reason in tests.items()
    }
    assert docs_rows() == listed
