"""The pools' own keyword arguments, declared once: name, default, validation and meaning.

:class:`PoolSettings` is the one declaration. Each field carries its default, the function
that validates a given value (a number, or a string from ``engine_from_config``) and the
sentence the parameter tables of the README and docs/parameters.md show; a test renders the
table from here and compares. Both pool classes take these keyword-only: SQLAlchemy's own
positional order (``QueuePool(creator, pool_size, max_overflow, ...)``) is untouched.

SQLAlchemy's ``create_engine`` passes a pool only the keywords the ``__init__`` of its class
(or a base class, followed through ``**kw``) names as plain parameters; keyword-only ones are
invisible to that scan (``util.get_cls_kwargs`` reads ``co_argcount``). :class:`SettingNames`,
a base of both pools, has an ``__init__`` generated from the fields for that scan alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import Field, dataclass, field, fields
from typing import Any

from sqlalchemy.exc import ArgumentError

from .classify import Classifier
from .credentials import coerce_provider
from .doubt import ping_mode
from .leaks import DEFAULT_LEAK_THRESHOLD
from .lifetime import DEFAULT_LIFETIME_JITTER, DEFAULT_MAX_IDLE, DEFAULT_MAX_LIFETIME
from .liveness import DEFAULT_LIVENESS_CHECK, DEFAULT_PING_AFTER
from .overflow import DEFAULT_OVERFLOW_IDLE
from .policy import (
    _NONE_WORDS,
    DEFAULT_ATTEMPT_TIMEOUT,
    DEFAULT_ATTEMPTS,
    DEFAULT_DEADLINE,
    DEFAULT_INITIAL_DELAY,
    DEFAULT_MAX_DELAY,
    _attempts,
    _number,
    _optional_seconds,
)
from .watchdog import DEFAULT_PING_TIMEOUT

Check = Callable[[str, Any], Any]
"""``check(name, value)``: the validated value, or ``ArgumentError`` naming the parameter."""


# -- validation, one function per kind of value ----------------------------------------------


def _seconds(name: str, value: Any) -> float:
    """More than 0 seconds."""
    return _number(name, value, minimum=0.0, strict=True)


def _seconds_or_zero(name: str, value: Any) -> float:
    """0 seconds or more (``None`` is refused: 0 is this setting's "off")."""
    if value is None:
        raise ArgumentError(f"{name} must be a number of seconds (0: off), got None")
    return _number(name, value, minimum=0.0, strict=False)


def _seconds_or_none(name: str, value: Any) -> float | None:
    """More than 0 seconds, or None (also the strings "none" and "")."""
    return _optional_seconds(name, value)


def _zero_or_more_or_none(name: str, value: Any) -> float | None:
    """0 seconds or more, or None."""
    if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
        return None
    return _number(name, value, minimum=0.0, strict=False)


def _fraction(name: str, value: Any) -> float:
    """A share in ``[0, 1)``."""
    share = _number(name, value, minimum=0.0, strict=False)
    if share >= 1.0:
        raise ArgumentError(
            f"{name} must be a fraction below 1 (0.25 = up to 25% shorter), got {value!r}"
        )
    return share


def _count(name: str, value: Any) -> int | None:
    """A positive integer, or None."""
    return _attempts(value, name)


def _count_or_zero(name: str, value: Any) -> int | None:
    """A positive integer, or None / 0 for "no limit" (psycopg_pool's spelling)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "0")):
        return None
    try:
        number = int(value) if isinstance(value, str) else value
    except ValueError:
        number = None
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise ArgumentError(f"{name} must be a positive integer or None, got {value!r}")
    return number or None


_TRUE = frozenset({"true", "yes", "on", "y", "t", "1"})
_FALSE = frozenset({"false", "no", "off", "n", "f", "0", ""})


def _flag(name: str, value: Any) -> bool:
    """True or false, also from ``engine_from_config`` strings ("true", "off", "1", ...)."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
    elif isinstance(value, bool | int) and value in (0, 1):
        return bool(value)
    raise ArgumentError(f"{name} must be true or false, got {value!r}")


def _ping(name: str, value: Any) -> bool | str:
    """True (always), False (never) or "auto" (while the pool is in doubt)."""
    mode = ping_mode(value)
    return "auto" if mode is None else mode


def _callable(name: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise ArgumentError(f"{name} must be a callable taking an exception, got {value!r}")
    return value


def _credentials(name: str, value: Any) -> Any:
    return coerce_provider(value)


def _name(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ArgumentError(f"{name} must be a non-empty string, got {value!r}")
    return value.strip()


def _provider(method: str) -> Check:
    def check(name: str, value: Any) -> Any:
        if value is not None and not callable(getattr(value, method, None)):
            raise ArgumentError(
                f"{name} must be an OpenTelemetry {name.replace('_', ' ')} "
                f"(with {method}()), got {value!r}"
            )
        return value

    return check


def _about(check: Check, meaning: str) -> dict[str, Any]:
    """A field's metadata: its check, its line in the parameter table."""
    return {"check": check, "meaning": meaning}


# -- the declaration --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class PoolSettings:
    """Every keyword argument the two pool classes add, validated; immutable, carried over by
    ``recreate()`` and ``engine.dispose()``. Field order is the parameter table's."""

    retry_deadline: float = field(
        default=DEFAULT_DEADLINE,
        metadata=_about(
            _seconds,
            "Seconds the whole retry sequence of one connect may take. No sleep carries past it "
            "and no attempt starts after it.",
        ),
    )
    retry_attempts: int | None = field(
        default=DEFAULT_ATTEMPTS,
        metadata=_about(
            _count,
            "Attempts including the first. `None`: only the deadline bounds the sequence.",
        ),
    )
    retry_initial_delay: float = field(
        default=DEFAULT_INITIAL_DELAY,
        metadata=_about(
            _seconds_or_zero,
            "Cap of the first backoff sleep, in seconds.",
        ),
    )
    retry_max_delay: float = field(
        default=DEFAULT_MAX_DELAY,
        metadata=_about(
            _seconds_or_zero,
            "Largest cap of a backoff sleep; the cap doubles from the initial delay up to this.",
        ),
    )
    retry_classifier: Classifier | None = field(
        default=None,
        metadata=_about(
            _callable,
            '`callable(exception) -> True / False / None`: transient, permanent, or "use the '
            'built-in table".',
        ),
    )
    retry_attempt_timeout: float | None = field(
        default=DEFAULT_ATTEMPT_TIMEOUT,
        metadata=_about(
            _seconds_or_none,
            "Seconds one connect attempt may take, clamped to the time left before "
            "`retry_deadline` and told to the driver as its own connect timeout. `None`: the "
            "driver is told nothing (its own connect timeout, or yours in `connect_args`, applies "
            "as with a stock pool; the deadline still ends the retries, but an attempt may "
            "outlast it). See "
            "[Black holes](retry.md#black-holes-every-attempt-has-a-time-limit).",
        ),
    )
    retry_ping: bool | str = field(
        default="auto",
        metadata=_about(
            _ping,
            "Ping new connections (one round trip) inside the retry loop, so a pooler that accepts "
            'logins it cannot serve (PgBouncer while PostgreSQL is down) is retried. `"auto"`: '
            "only while the pool has reason to doubt (a failed attempt, or a statement that met a "
            "disconnect or a connection error, in the last 10 s); `True`: every new connection; "
            "`False`: never. See [Behind PgBouncer](pgbouncer.md).",
        ),
    )
    demotion_check: bool = field(
        default=True,
        metadata=_about(
            _flag,
            "Treat a write refused because the server turned read-only since the connection was "
            "made (SQLSTATE `25006`, a demoted writer) as a disconnect: every pooled connection is "
            "replaced. The application's own `READ ONLY` transactions are left alone. See "
            "[Failover](failover.md).",
        ),
    )
    ping_timeout: float | None = field(
        default=DEFAULT_PING_TIMEOUT,
        metadata=_about(
            _seconds_or_none,
            "Seconds every ping may take (the liveness ping, `retry_ping`, `pool_pre_ping`), and "
            "the rollback of a connection whose statement failed, before the connection's socket "
            "is shut down and it is replaced. `None`: no limit. See [Failover](failover.md).",
        ),
    )
    fail_fast: bool = field(
        default=True,
        metadata=_about(
            _flag,
            "Once connecting has failed for a whole `retry_deadline`, callers that need a new "
            "connection fail at once (`DatabaseUnreachable`) while one probe per pool keeps "
            "trying; idle pooled connections keep serving. `False`: every such caller waits for "
            "the probe up to its own deadline. See [When the database stays down]"
            "(outages.md#when-the-database-stays-down-one-probe-per-pool-fail-fast).",
        ),
    )
    max_waiting: int | None = field(
        default=None,
        metadata=_about(
            _count_or_zero,
            "Most callers that may wait at once for a slot (`pool_timeout`) or for the probe; one "
            "more is refused at once with `TooManyWaiting` (psycopg_pool's name and meaning). "
            "`None` or `0`: no limit.",
        ),
    )
    credentials: Any = field(
        default=None,
        metadata=_about(
            _credentials,
            "Where each physical connect gets its secret: a sync or async callable, an object "
            'with `get_credentials()`, or (from a config file) a `"module:attribute"` string. See '
            "[Credentials](credentials.md).",
        ),
    )
    max_lifetime: float | None = field(
        default=DEFAULT_MAX_LIFETIME,
        metadata=_about(
            _seconds_or_none,
            "Seconds a pooled connection may live; retired at checkin or before checkout, never "
            "while checked out. `None`: no limit. See [Lifetime, idle and liveness]"
            "(lifetime.md#lifetime-idle-and-liveness).",
        ),
    )
    lifetime_jitter: float = field(
        default=DEFAULT_LIFETIME_JITTER,
        metadata=_about(
            _fraction,
            "Share of `max_lifetime` each connection's lifetime is shortened by, drawn once per "
            "connection in `[0, jitter)`: connections made together do not retire together.",
        ),
    )
    max_idle: float | None = field(
        default=DEFAULT_MAX_IDLE,
        metadata=_about(
            _seconds_or_none,
            "Seconds; the pool closes connections it has held idle, unused, for that long. "
            "`None`: never.",
        ),
    )
    overflow_idle: float = field(
        default=DEFAULT_OVERFLOW_IDLE,
        metadata=_about(
            _seconds_or_zero,
            "Seconds the pool keeps connections beyond `pool_size` idle before closing them; up to "
            "`pool_size + max_overflow` stay open while the load needs them. `0`: SQLAlchemy's "
            "rule (a returned overflow connection is closed whenever `pool_size` others are "
            "idle). See [Overflow connections]"
            "(lifetime.md#overflow-connections-kept-idle-not-closed-at-once).",
        ),
    )
    liveness_check: bool = field(
        default=DEFAULT_LIVENESS_CHECK,
        metadata=_about(
            _flag,
            "Look at each pooled connection before lending it (no round trip) and replace it, "
            "through the retry, if the server has closed it.",
        ),
    )
    liveness_ping_after: float | None = field(
        default=DEFAULT_PING_AFTER,
        metadata=_about(
            _zero_or_more_or_none,
            "Seconds of idleness after which the liveness check also makes a real ping. `None`: "
            "never ping; `0`: ping at every checkout.",
        ),
    )
    pool_name: str | None = field(
        default=None,
        metadata=_about(
            _name,
            "`db.client.connection.pool.name` of the pool's spans and metrics. `None`: "
            "`server.address:server.port/db.namespace` from the URL (see "
            "[OpenTelemetry](opentelemetry.md)).",
        ),
    )
    tracer_provider: Any = field(
        default=None,
        metadata=_about(
            _provider("get_tracer"),
            "OpenTelemetry `TracerProvider` for the pool's spans. `None`: the global one (also "
            "when it is set after the engine is created).",
        ),
    )
    meter_provider: Any = field(
        default=None,
        metadata=_about(
            _provider("get_meter"),
            "OpenTelemetry `MeterProvider` for the pool's metrics. `None`: the global one.",
        ),
    )
    leak_threshold: float | None = field(
        default=DEFAULT_LEAK_THRESHOLD,
        metadata=_about(
            _seconds_or_none,
            "Seconds a checkout may last before it is reported, once, as a leak (a WARNING with "
            "the holding task or thread and the checkout site; an INFO when it comes back). "
            "`None`: off, nothing recorded. See [Leaks, drain and graceful shutdown](leaks.md).",
        ),
    )

    @classmethod
    def take(cls, keywords: dict[str, Any]) -> PoolSettings:
        """The settings named in ``keywords`` (taken out of it: what is left is SQLAlchemy's),
        each validated; the others keep their defaults."""
        given = {}
        for setting in SETTINGS:
            name = setting.name
            if name in keywords:
                given[name] = setting.metadata["check"](name, keywords.pop(name))
        settings = cls(**given)
        if settings.retry_max_delay < settings.retry_initial_delay:
            raise ArgumentError(
                f"retry_max_delay ({settings.retry_max_delay!r}) must be at least "
                f"retry_initial_delay ({settings.retry_initial_delay!r})"
            )
        return settings


SETTINGS: tuple[Field[Any], ...] = fields(PoolSettings)
NAMES: tuple[str, ...] = tuple(setting.name for setting in SETTINGS)


def parameter_table() -> str:
    """The Markdown table of docs/parameters.md (the README's links point into ``docs/``)."""
    rows = ["| parameter | default | meaning |", "|---|---|---|"]
    for setting in SETTINGS:
        default = setting.default
        shown = f'"{default}"' if isinstance(default, str) else repr(default)
        rows.append(f"| `{setting.name}` | `{shown}` | {setting.metadata['meaning']} |")
    return "\n".join(rows)


def _names_for_sqlalchemy() -> Callable[..., None]:
    """An ``__init__`` naming every setting as a plain parameter, for SQLAlchemy's scan only
    (see the module docstring); the pools' own ``__init__`` never calls it."""
    source = (
        f"def __init__(self, {', '.join(NAMES)}, **kw):\n"
        "    raise TypeError('SettingNames is read by create_engine(), never called')\n"
    )
    namespace: dict[str, Any] = {}
    exec(compile(source, __file__, "exec"), namespace)  # names from the declaration above
    function: Callable[..., None] = namespace["__init__"]
    function.__qualname__ = "SettingNames.__init__"
    return function


class SettingNames:
    """A base of both pools: tells ``create_engine`` which keywords are the pools' own."""

    __init__ = _names_for_sqlalchemy()


def signature(stock: type) -> inspect.Signature:
    """A pool ``__init__``'s signature for ``help()`` and ``inspect``: the stock class's own
    parameters (passed on through ``*args`` and ``**kw``), then the settings, keyword-only."""
    kind = inspect.Parameter
    stock_parameters = list(inspect.signature(stock.__init__).parameters.values())  # type: ignore[misc]
    positional = [p for p in stock_parameters if p.kind is kind.POSITIONAL_OR_KEYWORD]
    settings = [
        kind(setting.name, kind.KEYWORD_ONLY, default=setting.default, annotation=setting.type)
        for setting in SETTINGS
    ]
    return inspect.Signature([*positional, *settings, kind("kw", kind.VAR_KEYWORD)])
