"""What a fault-tolerant pool adds to SQLAlchemy's, assembled once from its settings.

:func:`FaultTolerance.assemble` builds the runtime pieces in dependency order (counters,
credentials, telemetry, the gate, the demotion watch, the statement-time signals) and wires
them to one another there; nothing is wired onto them afterwards. ``recreate()`` and
``engine.dispose()`` hand the same value to the new pool: counters, the gate's state, the leak
tracker and the telemetry carry over.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy.exc import ArgumentError

from . import watchdog
from .classify import Classifier, classify
from .credentials import CredentialSource
from .demotion import DemotionWatch
from .doubt import Doubt, ping_mode
from .endpoint import connect_arguments, endpoint_of, password_of
from .hosts import HostRotation, wants_writer
from .leaks import LeakTracker
from .lifetime import LifetimePolicy
from .liveness import LivenessPolicy
from .overflow import DEFAULT_OVERFLOW_IDLE
from .policy import DEFAULT_DEADLINE, RetryPolicy
from .probe import Gate, WaitingRoom
from .settings import PoolSettings
from .stats import ConnectCounters
from .telemetry import PoolTelemetry
from .watchdog import DEFAULT_PING_TIMEOUT


class StatementSignals:
    """The engine's ``handle_error`` listener (the first one; the application's come after): a
    demoted writer's error becomes a disconnect, a connection whose statement failed is marked
    for a bounded rollback, and a disconnect or a connection-class error raises the doubt that
    makes new connections pinged."""

    __slots__ = ("demotion", "doubt")

    def __init__(self, demotion: DemotionWatch | None, doubt: Doubt) -> None:
        self.demotion = demotion
        self.doubt = doubt

    def handle_error(self, context: Any) -> None:
        connection = context.connection
        if connection is not None and not context.is_disconnect:
            with contextlib.suppress(Exception):  # closed meanwhile: nothing to mark
                watchdog.suspect(connection.connection._connection_record)
        demotion = self.demotion
        if demotion is not None:
            demotion.handle_error(context)
        if context.is_disconnect or classify(context.original_exception).transient:
            self.doubt.raised()


@dataclass(frozen=True)
class FaultTolerance:
    """Everything a fault-tolerant pool adds to SQLAlchemy's; carried over by ``recreate()``."""

    policy: RetryPolicy
    telemetry: PoolTelemetry
    classifier: Classifier | None = None
    ping: bool | None = None
    """Ping each new connection inside the retry loop (``retry_ping``): True always, False
    never, None only while the pool has reason to doubt (see :mod:`.doubt`)."""
    counters: ConnectCounters = field(default_factory=ConnectCounters, compare=False)
    credentials: CredentialSource | None = field(default=None, compare=False)
    lifetime: LifetimePolicy = field(default_factory=LifetimePolicy)
    liveness: LivenessPolicy = field(default_factory=LivenessPolicy)
    secrets: Callable[[], tuple[str, ...]] = field(default=tuple, compare=False)
    """The passwords known to the pool (URL, credentials), scrubbed from every message."""
    hosts: HostRotation | None = field(default=None, compare=False)
    """A multi-host URL's hosts, tried one by one (see :mod:`.hosts`)."""
    wants_writer: bool = False
    """The URL asks for a writable server (``target_session_attrs``)."""
    demotion: DemotionWatch | None = field(default=None, compare=False)
    """Statement-time signals of a demoted writer (``demotion_check``)."""
    doubt: Doubt = field(default_factory=Doubt, compare=False)
    ping_timeout: float | None = DEFAULT_PING_TIMEOUT
    leaks: LeakTracker | None = field(default=None, compare=False)
    """The checkouts and their leak reports (``leak_threshold``), shared by recreated pools."""
    gate: Gate = field(default_factory=lambda: Gate(DEFAULT_DEADLINE), compare=False)
    """The pool's connect state: the probe, fail-fast, ``max_waiting`` (see :mod:`.probe`)."""
    overflow_idle: float = DEFAULT_OVERFLOW_IDLE
    """Seconds connections beyond ``pool_size`` may sit idle (0: SQLAlchemy's rule)."""
    signals: StatementSignals | None = field(default=None, compare=False)
    """The engine's ``handle_error`` listener (see :class:`StatementSignals`)."""
    settings: PoolSettings = field(default_factory=PoolSettings, compare=False)
    """The validated keyword arguments this was assembled from."""

    @classmethod
    def assemble(
        cls, creator: Any, dialect: Any, settings: PoolSettings, *, null_pool: bool = False
    ) -> FaultTolerance:
        """The runtime pieces for ``settings``; ``null_pool``: every checkout is a connect, so
        the gate does not cap concurrent connects while healthy (that would cap the app)."""
        s = settings
        policy = RetryPolicy(
            attempts=s.retry_attempts,
            deadline=s.retry_deadline,
            initial_delay=s.retry_initial_delay,
            max_delay=s.retry_max_delay,
            attempt_timeout=s.retry_attempt_timeout,
        )
        counters = ConnectCounters()
        provider = s.credentials
        source = CredentialSource(provider, counters) if provider is not None else None
        arguments = connect_arguments(creator)

        def secrets() -> tuple[str, ...]:
            known = password_of(arguments)
            return known + source.secrets() if source is not None else known

        telemetry = PoolTelemetry(
            endpoint=endpoint_of(arguments),
            system=getattr(dialect, "name", None) or "postgresql",
            pool_name=s.pool_name,
            tracer_provider=s.tracer_provider,
            meter_provider=s.meter_provider,
            secrets=secrets,
        )
        counters.listener = telemetry
        writer = wants_writer(arguments)
        demotion = DemotionWatch(writer, counters.demoted) if s.demotion_check else None
        gate = Gate(policy.deadline, fail_fast=s.fail_fast, room=WaitingRoom(s.max_waiting))
        if null_pool:
            gate.schedule = replace(gate.schedule, healthy_concurrency=None)
        gate.listener = telemetry
        telemetry.connect_figures = gate.figures
        doubt = Doubt()
        threshold = s.leak_threshold
        return cls(
            policy=policy,
            telemetry=telemetry,
            classifier=s.retry_classifier,
            ping=ping_mode(s.retry_ping),
            hosts=HostRotation.from_arguments(arguments),
            wants_writer=writer,
            demotion=demotion,
            doubt=doubt,
            ping_timeout=s.ping_timeout,
            counters=counters,
            credentials=source,
            lifetime=LifetimePolicy(s.max_lifetime, s.lifetime_jitter, s.max_idle),
            liveness=LivenessPolicy(s.liveness_check, s.liveness_ping_after),
            secrets=secrets,
            gate=gate,
            overflow_idle=s.overflow_idle,
            leaks=None if threshold is None else LeakTracker(threshold, counters),
            signals=StatementSignals(demotion, doubt),
            settings=s,
        )

    @classmethod
    def from_arguments(cls, creator: Any, dialect: Any, **settings: Any) -> FaultTolerance:
        """:meth:`assemble` from keyword arguments (numbers or ``engine_from_config``
        strings), validated; an unknown keyword is an ``ArgumentError``."""
        given = dict(settings)
        validated = PoolSettings.take(given)
        if given:
            raise ArgumentError(f"unknown pool setting(s): {', '.join(sorted(given))}")
        return cls.assemble(creator, dialect, validated)
