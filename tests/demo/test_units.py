"""Pure parts of the demo: settings from the environment and the 503 bodies (no database)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from demo.app import database_error_body
from demo.settings import Settings, SettingsError
from fault_tolerant_pool import ReaderStatus


def test_settings_from_the_environment() -> None:
    settings = Settings.from_environ(
        {
            "DATABASE_URL": "postgres://app:pw@db:6432/app",
            "DEMO_POOL": " NULL ",
            "DEMO_PORT": "9000",
            "DEMO_RETRY_DEADLINE": "2.5",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "",  # empty means unset
        },
        port=None,  # an unset CLI flag does not override
        host="0.0.0.0",
    )
    assert settings.pool == "null" and settings.port == 9000 and settings.host == "0.0.0.0"
    assert settings.retry_deadline == 2.5 and settings.otlp_endpoint is None
    assert settings.url.drivername == "postgresql+asyncpg"
    psycopg = Settings(database_url="postgresql+psycopg://a:b@h/d")
    assert psycopg.url.drivername == "postgresql+psycopg_async"
    assert Settings.from_environ({}) == Settings()
    assert Settings().standby is True, "the embedded database has a standby by default"
    assert Settings.from_environ({"DEMO_STANDBY": " Off "}).standby is False
    assert Settings.from_environ({"DEMO_STANDBY": "on"}, standby=False).standby is False


def test_no_standby_flag() -> None:
    from demo.__main__ import _parser

    assert _parser().parse_args([]).standby is None  # unset: DEMO_STANDBY or the default
    assert _parser().parse_args(["--no-standby"]).standby is False


@pytest.mark.parametrize(
    "url, expected",
    [
        ("postgresql+asyncpg://u:p@db:6432/app", ("db", 6432)),
        ("postgresql+asyncpg://u:p@/app?host=h1:5001&host=h2:5002", ("h1", 5001)),
        ("postgresql+psycopg_async://u:p@/app?host=[::1]:5001&host=h2:5002", ("::1", 5001)),
        ("postgresql+asyncpg://u:p@/app?host=h1", ("h1", None)),
    ],
)
def test_spans_name_the_first_host_of_a_multi_host_url(
    url: str, expected: tuple[str, int | None]
) -> None:
    from sqlalchemy.engine import make_url

    from demo.app import first_host

    assert first_host(make_url(url)) == expected


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("DEMO_POOL", "fifo", "DEMO_POOL must be 'queue' or 'null'"),
        ("DEMO_PORT", "http", "DEMO_PORT has an invalid value"),
        ("DEMO_PORT", "70000", "DEMO_PORT must be a TCP port"),
        ("DEMO_RETRY_DEADLINE", "0", "DEMO_RETRY_DEADLINE must be a positive number"),
        ("DEMO_POOL_SIZE", "0", "DEMO_POOL_SIZE must be at least 1"),
        ("DEMO_STANDBY", "maybe", "DEMO_STANDBY has an invalid value 'maybe'"),
        ("DATABASE_URL", "postgresql+psycopg2://u:s3cret@h/d", "DATABASE_URL uses"),
        ("DATABASE_URL", "not a url s3cret", "DATABASE_URL is not a valid database URL"),
    ],
)
def test_bad_settings_name_the_variable(variable: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message) as info:
        Settings.from_environ({variable: value})
    assert "s3cret" not in str(info.value)


class DriverError(Exception):
    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    "error, reason",
    [
        (DriverError('password authentication failed for user "app"', "28P01"), "connect_failed"),
        (DriverError('database "x" does not exist', "3D000"), "connect_failed"),
        (DriverError("terminating connection due to administrator command", "57P01"),
         "connection_lost"),
        (ConnectionResetError("reset by peer 10.0.0.5:5432"), "connection_lost"),
        (sa.exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached"), "pool_timeout"),
        (DriverError('duplicate key value violates "x"', "23505"), "database_error"),
        (DriverError("cannot execute INSERT in a read-only transaction", "25006"),
         "server_read_only"),
    ],
)  # fmt: skip
def test_503_bodies_say_what_happened_without_messages(error: Exception, reason: str) -> None:
    body = database_error_body(error)
    assert body["reason"] == reason
    assert str(error) not in str(body), "driver messages are never echoed"
    assert body["error_class"] == type(error).__name__
    wrapped = sa.exc.DBAPIError("SELECT 1", None, error)  # type: ignore[arg-type]
    if not isinstance(error, sa.exc.TimeoutError):
        assert database_error_body(wrapped)["reason"] == reason


def test_an_unknown_outcome_has_a_body_of_its_own() -> None:
    from fault_tolerant_pool import TransactionOutcomeUnknown

    cut = DriverError("terminating connection due to administrator command host=10.0.0.5", "57P01")
    wrapped = sa.exc.OperationalError("COMMIT", None, cut)  # type: ignore[arg-type]
    body = database_error_body(TransactionOutcomeUnknown(wrapped, attempts=2))
    assert body == {
        "error": "outcome unknown",
        "reason": "outcome_unknown",
        "detail": "the connection broke while COMMIT was in flight (run 2): the write may or may "
        "not have been committed, and it was not run again",
        "error_class": "DriverError",
        "sqlstate": "57P01",
    }
    assert database_error_body(wrapped)["reason"] == "connection_lost", "distinct from a cut"
    assert "10.0.0.5" not in str(body)


def test_idempotent_writes_setting() -> None:
    assert Settings().idempotent_writes is True
    assert Settings.from_environ({"DEMO_IDEMPOTENT_WRITES": "off"}).idempotent_writes is False
    with pytest.raises(SettingsError, match="DEMO_IDEMPOTENT_WRITES has an invalid value"):
        Settings.from_environ({"DEMO_IDEMPOTENT_WRITES": "sometimes"})


def test_read_urls_setting() -> None:
    settings = Settings.from_environ(
        {
            "DATABASE_URL": "postgres://app:pw@db/app",
            "DEMO_READ_URLS": " postgres://app:pw@replica-1:5433/app,"
            "postgresql+psycopg://app:pw@replica-2/app ",
        }
    )
    assert len(settings.read_urls) == 2
    assert [(u.drivername, u.host, u.port) for u in settings.reader_urls] == [
        ("postgresql+asyncpg", "replica-1", 5433),
        ("postgresql+psycopg_async", "replica-2", None),
    ]
    assert Settings().read_urls == ()
    with pytest.raises(SettingsError, match="DEMO_READ_URLS uses 'mysql'") as info:
        Settings.from_environ(
            {"DATABASE_URL": "postgres://h/d", "DEMO_READ_URLS": "mysql://u:s3cret@h/d"}
        )
    assert "s3cret" not in str(info.value)
    with pytest.raises(SettingsError, match="set DATABASE_URL too"):
        Settings.from_environ({"DEMO_READ_URLS": "postgres://u:s3cret@h/d"})


def reader(role: str, in_rotation: bool = False, lag: float | None = 0.0) -> ReaderStatus:
    return ReaderStatus(
        name="h:1/d", role=role, lag=lag, in_rotation=in_rotation, reads=0,
        skipped_for_lag=0, skipped_down=0,
    )  # fmt: skip


@pytest.mark.parametrize(
    "readers, reason",
    [
        ([reader("primary"), reader("standby", in_rotation=True)], None),
        ([reader("primary"), reader("primary")], "no_standby"),  # the standby was promoted
        ([reader("primary"), reader("down", lag=None)], "standby_down"),  # e.g. rebuilding
        ([reader("primary"), reader("standby", lag=0.1)], "standby_down"),  # a hung check
        ([reader("primary"), reader("standby", lag=4.0)], "standby_behind"),  # past 5 / 2
        ([reader("unknown", lag=None), reader("unknown", lag=None)], "not_checked"),
        ([reader("down", lag=None), reader("standby", lag=9.0)], "standby_behind"),
    ],
)
def test_why_the_writer_took_a_read(readers: list[ReaderStatus], reason: str | None) -> None:
    from demo.reads import WRITER_REASONS, why_no_reader

    assert why_no_reader(readers, max_replica_lag=5.0) == reason
    assert reason is None or reason in WRITER_REASONS
