"""The failover toolkit of ``fault_tolerant_pool.testing``: a streaming standby, promotion, a
writer turned read-only, and multi-host URLs, against real servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from fault_tolerant_pool.testing import FaultProxy, PostgresServer, ServerError, multi_host_url

READ_ONLY_SQLSTATE = "25006"


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def connect(server: PostgresServer) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(
        host=server.host, port=server.port, user=server.user, password=server.password,
        dbname=server.dbname, autocommit=True,
    )  # fmt: skip


# -- real servers --------------------------------------------------------------------------------


@pytest.mark.db
def test_standby_replicates_refuses_writes_and_keeps_replicating_after_a_restart(
    pg_primary_standby: tuple[PostgresServer, PostgresServer],
) -> None:
    primary, standby = pg_primary_standby
    assert standby.port != primary.port and standby.workdir != primary.workdir
    assert (standby.datadir / "standby.signal").exists()
    assert standby.upstream is primary
    assert "ready to accept read-only connections" in standby.read_log()
    assert standby.is_in_recovery() and not primary.is_in_recovery()

    primary.execute("CREATE TABLE t (x int)")
    primary.execute("INSERT INTO t VALUES (1)")
    assert wait_until(lambda: standby.execute("SELECT x FROM t") == [("1",)])

    with connect(standby) as conn:
        assert conn.info.parameter_status("in_hot_standby") == "on"
        with pytest.raises(psycopg.Error) as caught:
            conn.execute("INSERT INTO t VALUES (2)")
        assert caught.value.sqlstate == READ_ONLY_SQLSTATE

    standby.restart()
    assert standby.is_in_recovery()
    primary.execute("INSERT INTO t VALUES (3)")
    assert wait_until(lambda: standby.execute("SELECT x FROM t ORDER BY x") == [("1",), ("3",)])
    # The standby follows a primary that restarts, too (it retries every 200 ms).
    primary.restart()
    primary.execute("INSERT INTO t VALUES (4)")
    assert wait_until(lambda: len(standby.execute("SELECT x FROM t")) == 3)


@pytest.mark.db
def test_promote_makes_the_standby_a_writable_primary_that_stays_one(
    pg_primary_standby: tuple[PostgresServer, PostgresServer],
) -> None:
    primary, standby = pg_primary_standby
    primary.execute("CREATE TABLE t (x int)")
    assert wait_until(lambda: standby.execute("SELECT count(*) FROM t") == [("0",)])
    seconds = standby.promote(timeout=20)
    assert 0 < seconds < 20
    assert not standby.is_in_recovery()
    with pytest.raises(ServerError, match="is not a standby"):
        standby.promote()
    standby.execute("INSERT INTO t VALUES (1)")
    assert not (standby.datadir / "standby.signal").exists()
    standby.restart()
    assert not standby.is_in_recovery()
    assert standby.execute("SELECT x FROM t") == [("1",)]
    # The old primary went its own way: the promoted server no longer streams from it.
    primary.execute("INSERT INTO t VALUES (2)")
    time.sleep(0.3)
    assert standby.execute("SELECT x FROM t") == [("1",)]


@pytest.mark.db
def test_set_read_only_turns_existing_sessions_read_only_at_their_next_command(
    pg_server: PostgresServer,
) -> None:
    pg_server.execute("CREATE TABLE t (x int)")
    with connect(pg_server) as conn:
        conn.execute("INSERT INTO t VALUES (1)")
        assert conn.info.parameter_status("default_transaction_read_only") == "off"
        pg_server.set_read_only()
        with pytest.raises(psycopg.Error) as caught:
            conn.execute("INSERT INTO t VALUES (2)")
        assert caught.value.sqlstate == READ_ONLY_SQLSTATE
        assert "read-only transaction" in str(caught.value)
        assert conn.info.parameter_status("default_transaction_read_only") == "on"
        assert not pg_server.is_in_recovery()  # still a primary, just not writable
        with connect(pg_server) as fresh:
            assert fresh.info.parameter_status("default_transaction_read_only") == "on"

        pg_server.set_read_only(False)
        conn.execute("INSERT INTO t VALUES (3)")
        assert conn.info.parameter_status("default_transaction_read_only") == "off"
    # It is in postgresql.auto.conf, so it survives a restart.
    pg_server.set_read_only()
    pg_server.restart()
    with connect(pg_server) as conn:
        assert conn.info.parameter_status("default_transaction_read_only") == "on"


def test_set_read_only_refuses_a_command_line_setting() -> None:
    server = PostgresServer.__new__(PostgresServer)
    server.settings = {"default_transaction_read_only": "on"}
    with pytest.raises(ServerError, match="default_transaction_read_only is in this server"):
        server.set_read_only()


WHERE = sa.text("SELECT inet_server_port(), pg_is_in_recovery()")


def writer_port(driver: str, url: str) -> int:
    """The port of the server a multi-host URL connects to, and check it is writable."""
    if driver == "psycopg":
        engine = sa.create_engine(url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                port, in_recovery = conn.execute(WHERE).one()
        finally:
            engine.dispose()
    else:

        async def ask() -> tuple[int, bool]:
            engine = create_async_engine(url, poolclass=NullPool)
            try:
                async with engine.connect() as conn:
                    row = (await conn.execute(WHERE)).one()
                    return int(row[0]), bool(row[1])
            finally:
                await engine.dispose()

        port, in_recovery = asyncio.run(ask())
    assert in_recovery is False
    return int(port)


@pytest.mark.db
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg", "psycopg_async"])
def test_a_multi_host_url_reaches_the_writer_before_and_after_a_failover(
    pg_primary_standby: tuple[PostgresServer, PostgresServer], driver: str
) -> None:
    primary, standby = pg_primary_standby
    # The standby listed first, behind a FaultProxy: hosts may be (host, port) pairs.
    with FaultProxy(standby.host, standby.port) as proxy:
        url = multi_host_url(driver, [(proxy.host, proxy.port), primary])
        assert writer_port(driver, url) == primary.port
        primary.set_read_only()
        standby.promote()
        # The new primary answers through the proxy; the old one is skipped: it is read-only.
        assert writer_port(driver, url) == standby.port


# -- the URL alone -------------------------------------------------------------------------------


def test_multi_host_url_form_parses_in_sqlalchemy() -> None:
    url = multi_host_url(
        "asyncpg", [("127.0.0.1", 5001), ("::1", 5002)], user="u@x", password="p:w/d",
        dbname="app",
    )  # fmt: skip
    assert url.startswith("postgresql+asyncpg://u%40x:p%3Aw%2Fd@/app?host=127.0.0.1:5001&")
    parsed = make_url(url)
    assert parsed.username == "u@x" and parsed.password == "p:w/d"
    assert parsed.database == "app" and parsed.host is None
    assert parsed.query["host"] == ("127.0.0.1:5001", "[::1]:5002")
    assert parsed.query["target_session_attrs"] == "read-write"
    plain = multi_host_url(None, [("h", 1)], None, user="u", password="p")
    assert plain == "postgresql://u:p@/postgres?host=h:1"


def test_multi_host_url_bad_input_names_the_parameter() -> None:
    with pytest.raises(ValueError, match="at least one server"):
        multi_host_url("asyncpg", [])
    with pytest.raises(ValueError, match="user= and password="):
        multi_host_url("asyncpg", [("h", 1)])
    with pytest.raises(ValueError, match="target_session_attrs must be one of"):
        multi_host_url("asyncpg", [("h", 1)], "writable", user="u", password="p")
    with pytest.raises(ValueError, match="port of 'h' must be a TCP port"):
        multi_host_url("asyncpg", [("h", 0)], user="u", password="p")
