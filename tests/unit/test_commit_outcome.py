"""What a transaction's status, read after its COMMIT was cut, proves: a table, no database."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine

from fault_tolerant_pool.commit_outcome import (
    SETTLEMENTS,
    CommitNote,
    _terminate_params,
    settlement,
    wants_note,
)


@pytest.mark.parametrize(
    ("status", "same", "proves"),
    [
        # The same postmaster never gives an id twice: its answer is the transaction's own.
        ("committed", True, "committed"),
        ("aborted", True, "not_committed"),
        ("in progress", True, "ask_again"),  # its old session still holds it
        # Another instance (restart, failover) may have given the id again; had the transaction
        # committed there, its id would not be free to give: only "not committed" is proved.
        ("committed", False, "unknown"),
        ("aborted", False, "not_committed"),
        ("in progress", False, "not_committed"),
        ("future", False, "not_committed"),
        # Nothing else proves anything.
        ("future", True, "unknown"),
        (None, True, "unknown"),  # too old for the server to remember
        (None, False, "unknown"),
    ],
)
def test_what_a_status_proves(status: str | None, same: bool, proves: str) -> None:
    assert settlement(status, same) == proves


def test_the_table_never_proves_a_commit_on_another_instance() -> None:
    proved = {verdict for (_, same), verdict in SETTLEMENTS.items() if not same}
    assert "committed" not in proved


def test_the_old_session_is_matched_by_the_ids_low_32_bits() -> None:
    # An xid8 carries an epoch; pg_stat_activity.backend_xid is a 32-bit xid.
    note = CommitNote(str(3 * 2**32 + 731), 4242, "i")
    assert _terminate_params(note) == {"pid": 4242, "xid32": "731"}


def test_notes_need_postgresql_13() -> None:
    engine = create_engine("sqlite://")
    with engine.connect() as connection:
        assert not wants_note(connection)
    engine.dispose()
