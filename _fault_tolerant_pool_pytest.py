"""Pytest fixtures for real PostgreSQL, PgBouncer and fault-proxy tests (entry point ``pytest11``).

The plugin loads in every test session of every project that installs this package, so it is a
module of its own outside the package (as Hypothesis does with ``_hypothesis_pytestplugin``):
importing a module of ``fault_tolerant_pool.testing`` imports ``fault_tolerant_pool`` first, and
with it SQLAlchemy and OpenTelemetry. It imports nothing but pytest and the standard library,
starts nothing and writes nothing until a test asks for one of its fixtures
(tests/unit/test_plugin_cost.py holds it to that). When the server binaries are missing a test
is skipped, except in CI (``CI=true``), where it fails: a suite must not go green by skipping
everything.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

import pytest

if TYPE_CHECKING:
    from fault_tolerant_pool.testing.bouncer import PgBouncer
    from fault_tolerant_pool.testing.patroni import PatroniCluster
    from fault_tolerant_pool.testing.proxy import FaultProxy
    from fault_tolerant_pool.testing.server import PostgresServer

_T = TypeVar("_T")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _require(make: Callable[[], _T]) -> _T:
    """Build a test resource; skip (or, in CI, fail) the test if its binaries are missing."""
    from fault_tolerant_pool.testing.server import ServerUnavailable

    try:
        return make()
    except ServerUnavailable as exc:
        if _in_ci():
            pytest.fail(f"{exc} (CI is set, so this fails instead of skipping)", pytrace=False)
        pytest.skip(str(exc))


def _new_server() -> PostgresServer:
    from fault_tolerant_pool.testing.server import PostgresServer

    server = PostgresServer()
    try:
        server.start()
    except BaseException:
        server.destroy()
        raise
    return server


@pytest.fixture
def pg_server() -> Iterator[PostgresServer]:
    """A fresh, running PostgreSQL for this test alone (superuser ``postgres``), destroyed after."""
    server = _require(_new_server)
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def pg_server_session() -> Iterator[PostgresServer]:
    """One running PostgreSQL shared by the whole session: do not stop it or break it."""
    server = _require(_new_server)
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg_standby(pg_server: PostgresServer) -> Iterator[PostgresServer]:
    """A hot standby streaming from ``pg_server`` (``pg_basebackup -R``), running, destroyed after.

    ``pg_standby.promote()`` makes it a primary; ``pg_server.set_read_only()`` demotes the
    primary while it stays reachable; ``multi_host_url(driver, [pg_server, pg_standby])`` from
    ``fault_tolerant_pool.testing`` reaches whichever of them is writable.
    """
    standby = _require(pg_server.standby)
    try:
        yield standby
    finally:
        standby.destroy()


@pytest.fixture
def pg_primary_standby(
    pg_server: PostgresServer, pg_standby: PostgresServer
) -> tuple[PostgresServer, PostgresServer]:
    """The pair ``(primary, standby)``: ``pg_server`` and ``pg_standby``, destroyed after."""
    return pg_server, pg_standby


@pytest.fixture
def pg_replicas(
    pg_server: PostgresServer, pg_standby: PostgresServer
) -> Iterator[tuple[PostgresServer, PostgresServer, PostgresServer]]:
    """A primary and two hot standbys streaming from it: ``(pg_server, pg_standby, second)``,
    destroyed after. ``standby.delay_replay(5)`` makes one lag; ``standby.stop()`` takes it
    away; ``standby.promote()`` makes it a primary (read routing: docs/replicas.md)."""
    second = _require(pg_server.standby)
    try:
        yield pg_server, pg_standby, second
    finally:
        second.destroy()


@pytest.fixture
def fault_proxy(pg_server: PostgresServer) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` in front of ``pg_server``; connect with ``pg_server.url(port=...)``."""
    from fault_tolerant_pool.testing.proxy import FaultProxy

    with FaultProxy(pg_server.host, pg_server.port) as proxy:
        yield proxy


@pytest.fixture
def pgbouncer(pg_server: PostgresServer) -> Iterator[PgBouncer]:
    """A running PgBouncer (transaction mode) in front of ``pg_server``, destroyed after."""

    def make() -> PgBouncer:
        from fault_tolerant_pool.testing.bouncer import PgBouncer

        bouncer = PgBouncer(pg_server)
        try:
            bouncer.start()
        except BaseException:
            bouncer.destroy()
            raise
        return bouncer

    bouncer = _require(make)
    try:
        yield bouncer
    finally:
        bouncer.destroy()


def _new_patroni_cluster() -> PatroniCluster:
    from fault_tolerant_pool.testing.patroni import PatroniCluster

    cluster = PatroniCluster()
    try:
        cluster.start()
    except BaseException:
        cluster.destroy()
        raise
    return cluster


@pytest.fixture(scope="session")
def patroni_cluster_session() -> Iterator[PatroniCluster]:
    """One Patroni cluster (etcd, two nodes, HAProxy) for the whole session, started on first use
    (about 10 s); tests that break it use ``patroni_cluster``, which restores it first."""
    cluster = _require(_new_patroni_cluster)
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def patroni_cluster(patroni_cluster_session: PatroniCluster) -> PatroniCluster:
    """The session's Patroni cluster, restored to health (a leader, a streaming replica, HAProxy
    routing to the leader) before the test: break it as you like."""
    patroni_cluster_session.restore()
    return patroni_cluster_session
