"""The retry loop around one physical connect: attempt, classify, back off, give up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random as _random
import time
from collections.abc import Callable
from typing import Any

from . import caller_deadline
from .classify import (
    Classifier,
    Verdict,
    classify_with,
    closed_by_proxy,
    innermost_class,
    not_matching,
    sqlstate_of,
)
from .credentials import AUTH_FAILURE_SQLSTATES, CredentialSource, Secret, offer, withdraw
from .demotion import ReadOnlyRoute
from .doubt import Doubt
from .errors import CredentialsError, exhausted_error, one_line, redact, too_many_waiting
from .hosts import NOT_WRITABLE, HostRotation, Round
from .policy import Backoff, RetryPolicy
from .probe import Admission, Gate
from .stats import ConnectCounters
from .telemetry import UNTRACED, ConnectTrace, PoolTelemetry, Untraced, disabled
from .timeouts import AttemptTimer, attempt_limit, publish, release_frames, retire

logger = logging.getLogger("fault_tolerant_pool.retry")

#: Packages whose exceptions are connection failures even when SQLAlchemy has not adapted them
#: (SQLAlchemy 2.0 lets asyncpg's own errors reach the pool unwrapped).
DRIVER_PACKAGES = frozenset({"asyncpg", "psycopg", "psycopg2"})

Sleep = Callable[[float], None]
Creator = Callable[[Any], Any]
OnConnect = Callable[[Any, Any], None]


def _not_applied(credentials: CredentialSource) -> CredentialsError:
    return CredentialsError(
        f"credentials from {credentials.name} were not applied: this engine's connections are "
        "not made by SQLAlchemy's own creator (a custom creator= or async_creator= must fetch "
        "its own secret)",
        provider=credentials.name,
    )


#: A wait at the gate longer than this held the caller for another's probe (an open gate lets
#: a caller through in microseconds; a probe's backoff is 50 ms or more).
GATE_HELD = 0.01


def _at_once() -> float:
    """The "random" draw of a retry that must not wait: a refused login with refreshed secrets."""
    return 0.0


class _Retry:
    """One connect inside the retry loop: its backoff and its attempts' timer, its round of
    hosts, and what a failure of the attempt in progress needs to know. Made only once a connect
    needs the loop (its first attempt failed, the gate held it back, or several hosts)."""

    __slots__ = ("admitted", "backoff", "held", "hosts", "refreshed", "secret", "started", "timer")

    def __init__(
        self,
        backoff: Backoff,
        timer: AttemptTimer,
        hosts: Round | None,
        started: float = 0.0,
        secret: Secret | None = None,
    ) -> None:
        self.backoff = backoff
        self.timer = timer
        self.hosts = hosts
        self.started = started  # when the attempt in progress (or the failed first one) began
        self.admitted = started  # when the gate let it (or its round of hosts) go
        self.secret = secret  # the secret offered to it (credentials)
        self.refreshed = False  # a refused secret was dropped and asked for again
        self.held = False  # held at the gate while another caller probed


class RetryingConnector:
    """Calls the pool's creator until it succeeds, the attempts run out or the deadline passes.

    Only the DBAPI connect is repeated: nothing here runs after a connection is handed out, so a
    statement is never replayed. Clock, random source and sleep are injectable for tests.

    With ``credentials``, each attempt takes its secret from the source (the cache, or the
    provider within the time left before the deadline). A refused login (``28P01``/``28000``)
    drops the cached secret and is retried at once, once per connect; refused again, it is
    permanent. ``on_connect(record, connection)`` runs after each successful connect.

    With a ``gate`` (:mod:`fault_tolerant_pool.probe`), every attempt is admitted by it: while
    connects fail it paces one attempt at a time for the whole pool (its wait replaces this
    loop's own backoff sleep), and it refuses at once while the pool fails fast.

    Behind ``NullPool`` every checkout is a connect, so the path of a connect whose first attempt
    succeeds is kept to the steps the settings switched on, in order: the gate lets it through
    (one lock), the attempt's time limit is published, the creator runs, the connection is
    pinged only while in doubt, the gate and the counters hear of it. The collaborators are
    fixed when the connector is made; one that is off costs one truth test, and the first
    attempt allocates only its timer. The retry loop (:meth:`_retry`), with its backoff, its
    logging and its per-connect state, is entered only once an attempt failed, the gate holds
    the caller back, or the URL names several hosts (whose rounds are the loop's).
    """

    def __init__(
        self,
        creator: Creator,
        policy: RetryPolicy,
        counters: ConnectCounters,
        *,
        sleep: Sleep,
        dbapi: Callable[[], Any],
        classifier: Classifier | None = None,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = _random.random,
        secrets: Callable[[], tuple[str, ...]] = tuple,
        telemetry: PoolTelemetry | None = None,
        credentials: CredentialSource | None = None,
        in_loop: Callable[[], bool] = bool,
        on_connect: OnConnect | None = None,
        ping: Callable[[Any], object] | None = None,
        discard: Callable[[Any], object] | None = None,
        gate: Gate | None = None,
        hosts: HostRotation | None = None,
        wants_writer: bool = False,
        doubt: Doubt | None = None,
        vet: Callable[[Any], object] | None = None,
    ) -> None:
        self.creator = creator
        self.policy = policy
        self.counters = counters
        self.sleep = sleep
        self.dbapi = dbapi
        self.classifier = classifier
        self.clock = clock
        self.random = random
        self.secrets = secrets
        self.telemetry = telemetry if telemetry is not None else disabled()
        self.credentials = credentials
        self.in_loop = in_loop
        self.on_connect = on_connect
        self.ping = ping
        self.discard = discard
        self.gate = gate
        self.hosts = hosts
        self.wants_writer = wants_writer
        self.doubt = doubt
        """With ``ping``: ping only while this is active (None: ping every new connection)."""
        self.vet = vet
        """Raises when a new connection must not be handed out (then it is closed, and the
        error is classified like a failed attempt)."""
        self._first_limit = (policy, attempt_limit(policy.attempt_timeout, policy.deadline))
        """The pool's policy and the time limit of a connect's first attempt under it."""

    def __call__(self, record: Any) -> Any:
        telemetry = self.telemetry
        if not telemetry.active():  # only the API's no-op providers: nothing would be kept
            return self._connect(record, UNTRACED)
        with telemetry.connect() as trace:  # one span around every attempt and backoff
            return self._connect(record, trace)

    def _connect(self, record: Any, trace: ConnectTrace | Untraced) -> Any:
        """The first attempt, straight through; the retry loop only when it cannot go at once
        or has failed."""
        policy = caller_deadline.policy_for(self.policy)  # a read router's shorter deadline
        started = self.clock()
        gate = self.gate
        if self.hosts is not None or (gate is not None and not gate.enter_now()):
            # several hosts, or the gate holds this caller back (or refuses it): the loop admits
            timer = AttemptTimer(policy.attempt_timeout)
            hosts = self.hosts.round() if self.hosts is not None else None
            return self._retry(record, trace, _Retry(Backoff(policy, started), timer, hosts))
        pool_policy, limit = self._first_limit
        if policy is not pool_policy:
            limit = attempt_limit(policy.attempt_timeout, policy.deadline)
        timer = AttemptTimer(policy.attempt_timeout, started, limit)
        credentials = self.credentials
        secret: Secret | None = None
        try:
            if credentials is not None:
                elapsed = self.clock() - started
                secret = credentials.get(in_loop=self.in_loop(), timeout=policy.deadline - elapsed)
            connection = self._attempt(record, timer, secret)
        except Exception as error:
            failed = error  # handled by the loop, once out of this handler
        except BaseException:
            if gate is not None:
                gate.abandoned()  # cancelled: the probe passes to another caller
            raise
        else:
            return self._connected(record, connection, trace, started, started)
        state = _Retry(Backoff(policy, started), timer, None, started, secret)
        return self._retry(record, trace, state, failed)

    def _retry(
        self,
        record: Any,
        trace: ConnectTrace | Untraced,
        state: _Retry,
        failed: Exception | None = None,
    ) -> Any:
        """The retry loop: handle the failed attempt (if any), back off, admit and make the next
        attempt, until one succeeds or the connect gives up (raised by :meth:`_failed`)."""
        backoff, timer, hosts = state.backoff, state.timer, state.hosts
        credentials = self.credentials
        gate = self.gate
        while True:
            if failed is not None:
                self._failed(failed, state, trace)  # raises when the connect gives up
                failed = None
            state.secret = None
            if gate is not None and (hosts is None or not hosts.position):
                entered = self.clock()
                self._admit(gate, backoff)  # once a round: the gate sees rounds, not hosts
                state.admitted = admitted = self.clock()
                state.held = state.held or admitted - entered > GATE_HELD
            state.started = started = self.clock()
            if hosts is None:
                timer.begin(started, backoff.remaining(started))
            else:  # a multi-host URL: one host per try, each with its own limit
                timer.host = hosts.host
                timer.begin(started, backoff.remaining(started), hosts.most())
            try:
                if credentials is not None:
                    state.secret = credentials.get(
                        in_loop=self.in_loop(), timeout=backoff.remaining(self.clock())
                    )
                connection = self._attempt(record, timer, state.secret)
            except Exception as error:
                failed = error
            except BaseException:
                if gate is not None:
                    gate.abandoned()  # cancelled: the probe passes to another caller
                raise
            else:
                # SQLAlchemy stamped the record when the connect began; after retries, or a
                # wait at the gate for another caller's probe, that is too early (see
                # _connected)
                stamp = bool(backoff.failures) or state.held
                return self._connected(
                    record, connection, trace, backoff.started, state.admitted, stamp, hosts
                )

    def _failed(self, error: Exception, state: _Retry, trace: ConnectTrace | Untraced) -> None:
        """A failed attempt: counted, classified, told to the doubt, the gate and the trace.
        Returns when another attempt is to be made (after this loop's own backoff sleep, if
        any); raises what the caller sees when the connect gives up."""
        verdict = classify_with(self.classifier, error)
        self.counters.attempt_failed(innermost_class(error), verdict.sqlstate)
        if self.doubt is not None:
            self.doubt.raised()
        backoff, hosts, gate = state.backoff, state.hosts, self.gate
        now = self.clock()
        if (
            hosts is not None
            and verdict.transient
            and backoff.remaining(now) > 0
            and hosts.failed(NOT_WRITABLE if not_matching(error) else verdict.error_type)
        ):
            # another host of this round is left: try it now, no backoff
            trace.attempt_failed(
                error, verdict, duration=now - state.started, backoff=0.0, secrets=self.secrets()
            )
            self._log_attempt(error, verdict, backoff.failures + 1, 0.0, None, hosts)
            return
        # A server that answered but is the wrong kind (a route still leading to a replica)
        # was reached: no outage for the gate, only this loop's own backoff.
        reached = not verdict.transient or isinstance(error, ReadOnlyRoute)
        if gate is not None:
            gate.finished(
                now,
                None if reached else error,
                backoff.started,
                state.admitted,
                closed_by_proxy(verdict),
            )
        credentials = self.credentials
        refresh: str | None = None
        if verdict.transient:
            delay = backoff.next_delay(now, self.random)
            if delay is not None and not state.timer.worth_another(
                now, backoff.remaining(now + delay)
            ):
                delay = None  # black-holed, and the driver could not end by the deadline
        elif (
            credentials is not None
            and state.secret is not None
            and not state.refreshed
            and verdict.sqlstate in AUTH_FAILURE_SQLSTATES
        ):
            state.refreshed = True
            refresh = credentials.name
            credentials.refused(state.secret)  # counted, and told to the telemetry
            delay = backoff.next_delay(now, _at_once)
        else:
            backoff.stop()
            delay = None
        trace.attempt_failed(
            error, verdict, duration=now - state.started, backoff=delay, secrets=self.secrets()
        )
        if delay is None:
            trace.gave_up(verdict, error)
            failure = self._give_up(error, verdict, backoff, now, hosts)
            if failure is error:
                raise error
            raise failure from error
        self._log_attempt(error, verdict, backoff.failures, delay, refresh, hosts)
        if delay > 0 and (gate is None or reached):
            self.sleep(delay)  # with a gate, its wait for the next probe is the backoff

    def _connected(
        self,
        record: Any,
        connection: Any,
        trace: ConnectTrace | Untraced,
        started: float,
        admitted: float,
        stamp: bool = False,
        hosts: Round | None = None,
    ) -> Any:
        """The connect succeeded (``started``: when its first attempt began): told to the gate,
        the counters and the trace; the record stamped if asked; ``on_connect`` run."""
        now = self.clock()
        gate = self.gate
        if gate is not None:
            gate.finished(now, None, started, admitted)
        if stamp and record is not None:
            # After retries, or a wait at the gate for another caller's probe, SQLAlchemy's
            # stamp is too early: an invalidation of the pool during the outage would make the
            # next checkout throw this brand-new connection away (an extra login), and
            # pool_recycle would count the outage as the connection's age.
            record.starttime = time.time()
        if hosts is not None:
            hosts.connected()
        self.counters.connected()
        if trace is not UNTRACED:
            trace.connected(now - started)
        if self.on_connect is not None:
            self.on_connect(record, connection)
        return connection

    def _admit(self, gate: Gate, backoff: Backoff) -> None:
        """Wait for the gate's leave to attempt; raise what the caller sees when it refuses."""
        admission = gate.enter(backoff.started + backoff.policy.deadline, self.in_loop())
        if admission is Admission.GO:
            return
        if admission is Admission.REJECTED:
            limit = gate.room.limit
            raise too_many_waiting(0 if limit is None else limit, "the connect probe")
        now = self.clock()
        last = gate.last_error or TimeoutError("no connect slot before the deadline")
        verdict = classify_with(self.classifier, last)
        if admission is Admission.FAIL_FAST:
            gate.count_fast_failure()
            raise gate.unreachable(
                self.dbapi(),
                last,
                verdict.error_type,
                attempts=backoff.failures,
                elapsed=backoff.elapsed(now),
                secrets=self.secrets(),
            ) from last
        failure = self._give_up(last, verdict, backoff, now)  # waited its whole deadline
        raise failure from (None if failure is last else last)

    def _attempt(self, record: Any, timer: AttemptTimer, secret: Secret | None) -> Any:
        """One login: the secret offered (with ``credentials``), the creator called with the
        attempt's time limit published to the listener, then the checks switched on (a ping,
        always or while in doubt; the vetting of the server) before it counts."""
        if secret is not None:
            offer(record, secret)
        token = publish(timer)
        try:
            connection = self.creator(record)
            ping = self.ping
            if ping is not None:
                doubt = self.doubt
                if doubt is None or (doubt.until and doubt.active()):
                    self._check(ping, connection)
            if self.vet is not None:
                self._check(self.vet, connection)
        except BaseException as error:  # cancelled too: what the attempt opened must close now
            release_frames(error)
            raise
        finally:
            retire(token)
        if secret is not None and withdraw(record) is not None:
            self._discard(connection)
            assert self.credentials is not None  # a secret comes from the credentials
            raise _not_applied(self.credentials)
        return connection

    def _check(self, check: Callable[[Any], object], connection: Any) -> None:
        """Run ``check`` on a new connection; if it raises (or is cancelled), close the
        connection and re-raise."""
        try:
            check(connection)
        except BaseException:
            if self.discard is not None:
                with contextlib.suppress(Exception):
                    self.discard(connection)
            raise

    @staticmethod
    def _discard(connection: Any) -> None:
        try:
            connection.close()
        except Exception:
            logger.debug("closing a connection made without the credentials failed", exc_info=True)

    def _log_attempt(
        self,
        error: Exception,
        verdict: Verdict,
        attempt: int,
        delay: float,
        refresh: str | None,
        hosts: Round | None = None,
    ) -> None:
        gate = self.gate
        level = logging.WARNING
        if gate is not None and gate.state == "failing_fast":
            level = logging.DEBUG  # the gate warned once when failing fast began
        if logger.isEnabledFor(level):
            if refresh is not None:
                then = f"login refused: asking {refresh} again, retrying at once"
            elif hosts is not None and hosts.position:
                then = f"trying the next host, {hosts.host}, now"
            elif gate is None:
                then = f"retrying in {delay:.3f}s"
            else:
                then = f"next probe in {gate.next_probe_in(self.clock()):.3f}s"
            where = "" if hosts is None else f" at {hosts.failed_host}"
            logger.log(
                level,
                "connect attempt %d%s failed (%s, sqlstate=%s): %s; %s",
                attempt,
                where,
                type(error).__name__,
                verdict.sqlstate,
                one_line(redact(str(error), self.secrets())),
                then,
            )

    def _give_up(
        self,
        error: Exception,
        verdict: Verdict,
        backoff: Backoff,
        now: float,
        hosts: Round | None = None,
    ) -> Exception:
        self.counters.gave_up()
        elapsed = backoff.elapsed(now)
        logger.error(
            "connect failed for good after %d attempt(s) in %.2fs (%s, sqlstate=%s, %s)",
            backoff.failures,
            elapsed,
            type(error).__name__,
            verdict.sqlstate,
            "retries exhausted" if verdict.transient else "permanent",
        )
        dbapi = self.dbapi()
        dbapi_error = getattr(dbapi, "Error", None)
        is_connect_failure = (
            isinstance(error, OSError | asyncio.TimeoutError | CredentialsError)
            or (isinstance(dbapi_error, type) and isinstance(error, dbapi_error))
            or type(error).__module__.partition(".")[0] in DRIVER_PACKAGES
            # The server answered with a SQLSTATE: SQLAlchemy 2.0 lets asyncpg's own error
            # through at connect time, not adapted to the dialect's DBAPI error.
            or sqlstate_of(error) is not None
        )
        if not is_connect_failure:
            return error  # a bug or a bad argument, not a connection failure: keep it as it is
        return exhausted_error(
            dbapi,
            attempts=backoff.failures,
            elapsed=elapsed,
            last_error=error,
            transient=verdict.transient,
            error_type=verdict.error_type,
            secrets=self.secrets(),
            hosts="" if hosts is None else hosts.summary(self.wants_writer),
        )
