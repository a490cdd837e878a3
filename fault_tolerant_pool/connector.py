"""The retry loop around one physical connect: attempt, classify, back off, give up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random as _random
import time
from collections.abc import Callable
from typing import Any

from .classify import Classifier, Verdict, classify_with, sqlstate_of
from .errors import exhausted_error, one_line, redact
from .policy import Backoff, RetryPolicy
from .stats import ConnectCounters
from .timeouts import AttemptTimer, release_frames, retire

logger = logging.getLogger("fault_tolerant_pool.retry")

Sleep = Callable[[float], None]
Creator = Callable[[Any], Any]


class RetryingConnector:
    """Calls the pool's creator until it succeeds, the attempts run out or the deadline passes.

    Only the DBAPI connect is repeated: nothing here runs after a connection is handed out, so a
    statement is never replayed. Clock, random source and sleep are injectable for tests.
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
        ping: Callable[[Any], object] | None = None,
        discard: Callable[[Any], object] | None = None,
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
        self.ping = ping
        self.discard = discard

    def __call__(self, record: Any) -> Any:
        backoff = Backoff(self.policy, self.clock())
        timer = AttemptTimer(self.policy.attempt_timeout)
        while True:
            now = self.clock()
            timer.begin(now, backoff.remaining(now))
            try:
                connection = self._attempt(record, timer)
            except Exception as error:  # BaseException (cancellation) propagates untouched
                verdict = classify_with(self.classifier, error)
                self.counters.attempt_failed(verdict.error_type, verdict.sqlstate)
                now = self.clock()
                if verdict.transient:
                    delay = backoff.next_delay(now, self.random)
                    if delay is not None and not timer.worth_another(
                        now, backoff.remaining(now + delay)
                    ):
                        delay = None  # black-holed, and the driver could not end by the deadline
                else:
                    backoff.stop()
                    delay = None
                if delay is None:
                    failure = self._give_up(error, verdict, backoff, now)
                    if failure is error:
                        raise
                    raise failure from error
                self._log_attempt(error, verdict, backoff.failures, delay)
                self.sleep(delay)
            else:
                self.counters.connected()
                return connection

    def _attempt(self, record: Any, timer: AttemptTimer) -> Any:
        """One call of the creator, with the attempt's time limit published to the listener,
        and, with ``ping``, one round trip on the new connection before it counts."""
        token = timer.publish()
        try:
            connection = self.creator(record)
            if self.ping is not None:
                self._ping(connection)
            return connection
        except BaseException as error:  # cancelled too: what the attempt opened must close now
            release_frames(error)
            raise
        finally:
            retire(token)

    def _ping(self, connection: Any) -> None:
        """Ping a new connection; if that fails (or is cancelled), close it and re-raise."""
        assert self.ping is not None
        try:
            self.ping(connection)
        except BaseException:
            if self.discard is not None:
                with contextlib.suppress(Exception):
                    self.discard(connection)
            raise

    def _log_attempt(self, error: Exception, verdict: Verdict, attempt: int, delay: float) -> None:
        if logger.isEnabledFor(logging.WARNING):
            logger.warning(
                "connect attempt %d failed (%s, sqlstate=%s): %s; retrying in %.3fs",
                attempt,
                type(error).__name__,
                verdict.sqlstate,
                one_line(redact(str(error), self.secrets())),
                delay,
            )

    def _give_up(
        self, error: Exception, verdict: Verdict, backoff: Backoff, now: float
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
            isinstance(error, OSError | asyncio.TimeoutError)
            or (isinstance(dbapi_error, type) and isinstance(error, dbapi_error))
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
        )
