"""Credentials: the cache, refresh on a refused login, provider errors, the file provider.

No database: a fake creator stands for the driver, a fake clock for time; async providers run in
SQLAlchemy's real greenlet bridge (``greenlet_spawn``) on a real event loop.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.util import greenlet_spawn

from fault_tolerant_pool.connector import RetryingConnector
from fault_tolerant_pool.credentials import (
    CredentialSource,
    FileCredentials,
    apply_credentials,
    coerce_provider,
)
from fault_tolerant_pool.errors import ConnectRetriesExhausted, CredentialsError
from fault_tolerant_pool.notes import ConnectionNotes
from fault_tolerant_pool.policy import RetryPolicy
from fault_tolerant_pool.stats import ConnectCounters


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Provider:
    """Answers from a script; counts its calls."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self) -> Any:
        self.calls += 1
        answer = self.answers[min(self.calls, len(self.answers)) - 1]
        if isinstance(answer, BaseException):
            raise answer
        return answer


def source(provider: Any, clock: Clock | None = None) -> tuple[CredentialSource, ConnectCounters]:
    counters = ConnectCounters()
    return CredentialSource(provider, counters, clock=clock or Clock()), counters


# -- the cache -------------------------------------------------------------------------------------


def test_an_answer_without_expiry_is_asked_for_every_connect() -> None:
    provider = Provider("pw")
    src, counters = source(provider)
    assert src.get(in_loop=False, timeout=1).password == "pw"
    assert src.get(in_loop=False, timeout=1).password == "pw"
    assert provider.calls == 2
    assert counters.credential_fetches == 2


def test_an_answer_with_expiry_is_cached_until_a_margin_before_it() -> None:
    clock = Clock()
    provider = Provider({"user": "app", "password": "a", "expires_in": 900})
    src, _ = source(provider, clock)
    first = src.get(in_loop=False, timeout=1)
    assert (first.user, first.password) == ("app", "a")
    clock.now += 839
    assert src.get(in_loop=False, timeout=1) is first
    assert provider.calls == 1
    clock.now += 1  # 60 s before expiry: refreshed
    src.get(in_loop=False, timeout=1)
    assert provider.calls == 2


def test_short_lived_answers_keep_three_quarters_of_their_life_in_the_cache() -> None:
    clock = Clock()
    provider = Provider({"password": "a", "expires_in": 40})
    src, _ = source(provider, clock)
    src.get(in_loop=False, timeout=1)
    clock.now += 29.9
    src.get(in_loop=False, timeout=1)
    assert provider.calls == 1
    clock.now += 0.2
    src.get(in_loop=False, timeout=1)
    assert provider.calls == 2


@pytest.mark.parametrize(
    "expires_at",
    [
        1_000_000.0 + 600,
        datetime.datetime.fromtimestamp(1_000_000.0 + 600, tz=datetime.timezone.utc),
        datetime.datetime.fromtimestamp(1_000_000.0 + 600, tz=datetime.timezone.utc).replace(
            tzinfo=None
        ),  # naive: UTC
    ],
    ids=["epoch", "aware", "naive_utc"],
)
def test_expires_at_in_epoch_seconds_or_datetime(expires_at: Any) -> None:
    clock = Clock()
    provider = Provider({"password": "a", "expires_at": expires_at})
    src, _ = source(provider, clock)
    src.get(in_loop=False, timeout=1)
    clock.now += 539
    src.get(in_loop=False, timeout=1)
    assert provider.calls == 1
    clock.now += 2
    src.get(in_loop=False, timeout=1)
    assert provider.calls == 2


def test_refused_drops_the_cache_once_per_answer() -> None:
    provider = Provider(
        {"password": "old", "expires_in": 900}, {"password": "new", "expires_in": 900}
    )
    src, counters = source(provider)
    old = src.get(in_loop=False, timeout=1)
    src.refused(old)
    src.refused(old)  # a second connect failed with the same answer: not another refresh
    assert counters.credential_refreshes == 1
    assert src.get(in_loop=False, timeout=1).password == "new"
    assert provider.calls == 2
    assert set(src.secrets()) == {"old", "new"}


class CountingLock:
    """The source's lock, counting the threads that asked for it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.asked = 0
        self.changed = threading.Condition()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        with self.changed:
            self.asked += 1
            self.changed.notify_all()
        return self.lock.acquire(blocking, timeout)

    def release(self) -> None:
        self.lock.release()


def test_threads_finding_the_cache_empty_share_one_call() -> None:
    started = threading.Event()
    release = threading.Event()
    calls = []

    def slow() -> str:
        calls.append(1)
        started.set()
        release.wait(5)
        return "pw"

    src, _ = source(slow)
    lock = CountingLock()
    src._lock = lock  # type: ignore[assignment]
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(src.get(in_loop=False, timeout=5).password))
        for _ in range(4)
    ]
    threads[0].start()
    started.wait(5)
    for thread in threads[1:]:
        thread.start()
    with lock.changed:
        lock.changed.wait_for(lambda: lock.asked == 4, timeout=5)  # all queued behind the first
    release.set()
    for thread in threads:
        thread.join(5)
    assert results == ["pw"] * 4
    assert len(calls) == 1


# -- async providers and engines -------------------------------------------------------------------


def in_bridge(fn: Any) -> Any:
    """Run ``fn`` the way pool code runs for an async engine: in SQLAlchemy's greenlet bridge."""

    async def main() -> Any:
        return await greenlet_spawn(fn)

    return asyncio.run(main())


def test_async_provider_is_awaited_and_shared_by_concurrent_connects() -> None:
    calls = []
    ticks = []

    async def provider() -> dict[str, Any]:
        calls.append(1)
        await asyncio.sleep(0.05)
        return {"password": "pw", "expires_in": 900}

    src, _ = source(provider)

    async def main() -> list[str]:
        async def tick() -> None:
            for _ in range(3):
                await asyncio.sleep(0.01)
                ticks.append(1)

        ticker = asyncio.ensure_future(tick())
        got = await asyncio.gather(
            *(greenlet_spawn(lambda: src.get(in_loop=True, timeout=5).password) for _ in range(5))
        )
        await ticker
        return list(got)

    assert asyncio.run(main()) == ["pw"] * 5
    assert len(calls) == 1
    assert len(ticks) == 3  # the loop kept running while the provider was awaited


def test_blocking_provider_runs_in_a_thread_for_async_engines() -> None:
    seen: list[int] = []

    class Blocking:
        blocking = True

        def get_credentials(self) -> str:
            seen.append(threading.get_ident())
            return "pw"

    src, _ = source(Blocking())
    loop_thread: list[int] = []

    def run() -> str:
        loop_thread.append(threading.get_ident())
        return src.get(in_loop=True, timeout=5).password

    assert in_bridge(run) == "pw"
    assert seen and seen[0] != loop_thread[0]


def test_slow_async_provider_is_bounded_by_the_time_left() -> None:
    async def provider() -> str:
        await asyncio.sleep(5)
        return "pw"

    src, _ = source(provider)
    started = time.monotonic()
    with pytest.raises(CredentialsError, match=r"did not answer within 0\.05s") as info:
        in_bridge(lambda: src.get(in_loop=True, timeout=0.05))
    assert time.monotonic() - started < 2
    assert info.value.transient is True


def test_async_provider_for_a_sync_engine_runs_on_a_private_loop() -> None:
    async def provider() -> str:
        await asyncio.sleep(0)
        return "pw"

    src, _ = source(provider)
    assert src.get(in_loop=False, timeout=1).password == "pw"


# -- errors ----------------------------------------------------------------------------------------


def test_provider_error_names_the_provider_and_hides_known_secrets() -> None:
    provider = Provider(
        {"password": "s3cr3t-old", "expires_in": 10},
        RuntimeError("vault said no to s3cr3t-old"),
    )
    clock = Clock()
    src, _ = source(provider, clock)
    src.get(in_loop=False, timeout=1)
    clock.now += 100
    with pytest.raises(CredentialsError) as info:
        src.get(in_loop=False, timeout=1)
    message = str(info.value)
    assert "s3cr3t-old" not in message
    assert "credentials provider" in message and "Provider instance" in message
    assert "RuntimeError: vault said no to ***" in message
    assert info.value.transient is False
    assert isinstance(info.value.__cause__, RuntimeError)


def test_transient_provider_failures_are_marked_transient() -> None:
    src, _ = source(Provider(ConnectionRefusedError(111, "Connection refused")))
    with pytest.raises(CredentialsError) as info:
        src.get(in_loop=False, timeout=1)
    assert info.value.transient is True


@pytest.mark.parametrize(
    ("answer", "complaint"),
    [
        (None, "returned a NoneType"),
        ("", "empty password"),
        ({"user": "app"}, "without a non-empty 'password'"),
        ({"password": "p", "user": 3}, "'user' that is not"),
        ({"password": "p", "expires_in": "soon"}, "bad expiry"),
    ],
)
def test_unusable_answers_are_refused_without_showing_them(answer: Any, complaint: str) -> None:
    src, _ = source(Provider(answer))
    with pytest.raises(CredentialsError, match=complaint) as info:
        src.get(in_loop=False, timeout=1)
    assert "'p'" not in str(info.value)


def test_named_providers_and_import_strings() -> None:
    class Named:
        name = "vault:db/creds/app"

        def get_credentials(self) -> str:
            return "pw"

    assert CredentialSource(Named(), ConnectCounters()).name == "vault:db/creds/app"
    assert coerce_provider("os:getcwd") is os.getcwd
    from sqlalchemy.exc import ArgumentError

    for bad in ("nocolon", "no_such_module_x:y", 42):
        with pytest.raises(ArgumentError, match="credentials"):
            coerce_provider(bad)


# -- the retry loop with credentials ---------------------------------------------------------------


class FakeDBAPI(types.SimpleNamespace):
    class Error(Exception):
        sqlstate: str | None = None

    class OperationalError(Error):
        pass


def auth_failure() -> Exception:
    error = FakeDBAPI.OperationalError('password authentication failed for user "app"')
    error.sqlstate = "28P01"
    return error


class Record:
    """Stands for the pool's connection record (the offer goes into its notes)."""

    def __init__(self) -> None:
        self.notes = ConnectionNotes()


class Server:
    """A creator that accepts one password, through the real ``do_connect`` listener."""

    def __init__(self, password: str, clock: Clock, cost: float = 0.001) -> None:
        self.password = password
        self.clock = clock
        self.cost = cost
        self.logins: list[str] = []

    def __call__(self, record: Any) -> str:
        cparams: dict[str, Any] = {"user": "from_url", "password": "from_url"}
        apply_credentials(None, record, [], cparams)
        self.clock.now += self.cost
        self.logins.append(cparams["password"])
        if cparams["password"] != self.password:
            raise auth_failure()
        return f"connection as {cparams['user']}"


def connector(server: Any, src: CredentialSource, clock: Clock, **policy: Any) -> RetryingConnector:
    return RetryingConnector(
        server,
        RetryPolicy(**policy),
        src._counters,
        sleep=clock.sleep,
        dbapi=lambda: FakeDBAPI,
        clock=clock,
        random=lambda: 0.5,
        secrets=src.secrets,
        credentials=src,
    )


def test_stale_cached_secret_is_refreshed_once_and_retried_at_once() -> None:
    clock = Clock()
    provider = Provider(
        {"user": "app", "password": "old", "expires_in": 900},
        {"user": "app", "password": "new", "expires_in": 900},
    )
    src, counters = source(provider, clock)
    server = Server("old", clock)
    connect = connector(server, src, clock)
    assert connect(Record()) == "connection as app"
    server.password = "new"  # rotated
    assert connect(Record()) == "connection as app"
    assert server.logins == ["old", "old", "new"]
    assert clock.sleeps == []  # retried at once
    assert provider.calls == 2
    snap = counters.snapshot(0, 0, 0, 0)
    assert (snap.credential_fetches, snap.credential_refreshes) == (2, 1)
    assert (snap.connects, snap.failed_attempts, snap.give_ups) == (2, 1, 0)


def test_a_provider_returning_a_stale_password_first_gets_one_refresh() -> None:
    clock = Clock()
    provider = Provider("stale", "good")
    src, _ = source(provider, clock)
    server = Server("good", clock)
    assert connector(server, src, clock)(Record()) == "connection as from_url"
    assert server.logins == ["stale", "good"]


def test_refused_again_after_the_refresh_is_permanent() -> None:
    clock = Clock()
    provider = Provider("wrong-1", "wrong-2")
    src, counters = source(provider, clock)
    server = Server("right", clock)
    with pytest.raises(ConnectRetriesExhausted) as info:
        connector(server, src, clock)(Record())
    assert server.logins == ["wrong-1", "wrong-2"]
    assert info.value.transient is False and info.value.attempts == 2
    assert "wrong-1" not in str(info.value) and "wrong-2" not in str(info.value)
    assert counters.give_ups == 1


def test_provider_failure_is_a_clear_connect_error() -> None:
    clock = Clock()
    src, _ = source(Provider(KeyError("db/creds/app")), clock)
    with pytest.raises(ConnectRetriesExhausted) as info:
        connector(Server("x", clock), src, clock)(Record())
    assert "permanent error, not retried" in str(info.value)
    assert "credentials provider" in str(info.value) and "KeyError" in str(info.value)
    assert isinstance(info.value.last_error, CredentialsError)


def test_transient_provider_failure_is_retried_within_the_deadline() -> None:
    clock = Clock()
    provider = Provider(ConnectionRefusedError(111, "refused"), "pw")
    src, _ = source(provider, clock)
    assert connector(Server("pw", clock), src, clock)(Record()) == "connection as from_url"
    assert len(clock.sleeps) == 1


def test_time_spent_in_the_provider_counts_against_the_deadline() -> None:
    clock = Clock()

    def slow_and_stale() -> str:
        clock.now += 3.0
        return "stale"

    src, _ = source(slow_and_stale, clock)
    server = Server("good", clock)
    with pytest.raises(ConnectRetriesExhausted):
        connector(server, src, clock, deadline=2.0)(Record())
    assert server.logins == ["stale"]  # no second attempt: the deadline passed in the provider


def test_credentials_that_never_reach_the_driver_are_an_error() -> None:
    clock = Clock()
    src, _ = source(Provider("pw"), clock)
    closed = []

    class Conn:
        def close(self) -> None:
            closed.append(1)

    with pytest.raises(ConnectRetriesExhausted, match="were not applied"):
        connector(lambda record: Conn(), src, clock)(Record())
    assert closed == [1]


# -- FileCredentials -------------------------------------------------------------------------------


def test_file_credentials_reread_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "password"
    path.write_text("first\n")
    provider = FileCredentials(path, user="app")
    assert provider.get_credentials() == {"password": "first", "user": "app"}
    answer = provider.get_credentials()
    assert provider.get_credentials() is answer  # unchanged: not read again
    # Kubernetes swaps a symlinked directory; an atomic rename gives a new inode the same way
    new = tmp_path / "password.new"
    new.write_text("second\n")
    os.replace(new, path)
    assert provider.get_credentials()["password"] == "second"
    assert "FileCredentials(" in provider.name and "second" not in repr(provider)


def test_file_credentials_json_and_user_file(tmp_path: Path) -> None:
    secret = tmp_path / "creds.json"
    secret.write_text(json.dumps({"username": "v-app-1", "password": "x", "expires_in": 60}))
    assert FileCredentials(secret).get_credentials()["username"] == "v-app-1"
    password, user = tmp_path / "password", tmp_path / "username"
    password.write_text("pw")
    user.write_text("app\n")
    provider = FileCredentials(password, user_path=user)
    assert provider.get_credentials() == {"password": "pw", "user": "app"}
    user.write_text("app2\n")
    os.utime(user, ns=(0, 1))  # a different mtime even on a coarse clock
    assert provider.get_credentials()["user"] == "app2"


def test_missing_file_is_a_permanent_provider_error(tmp_path: Path) -> None:
    src, _ = source(FileCredentials(tmp_path / "absent"))
    with pytest.raises(CredentialsError, match="FileNotFoundError") as info:
        src.get(in_loop=False, timeout=1)
    assert info.value.transient is False
