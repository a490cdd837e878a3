"""How long a login takes here, and so when a connect attempt in flight is presumed held.

A proxy in front of the database (HAProxy with no healthy backend, PgBouncer, a cloud load
balancer, a Kubernetes service) accepts the TCP connection at once and may then hold it for
seconds before it fails: HAProxy retries a refused backend for about 2 s, a black-holed one
until ``timeout connect``. An attempt that waits on such a socket says nothing about an attempt
started now, which may find the route ready. So the gate (:mod:`.probe`) stops counting an
attempt as "the" attempt in flight once it has lasted longer than a login normally takes here,
and lets a waiting caller try alongside it, as Happy Eyeballs (RFC 8305) starts the next address
after its Connection Attempt Delay instead of waiting for the first to time out.

The delay follows the logins the pool has seen: :data:`FACTOR` times a moving average of their
durations, within RFC 8305's bounds (at least 100 ms, at most 2 s; 250 ms before any login).
One slow login (held, then served) moves the average by at most a quarter of it, so a single
outlier does not stretch the delay, while a network whose logins are slow does, within a few.
"""

from __future__ import annotations

#: An attempt is presumed held after this many times the typical login.
FACTOR = 4.0
#: RFC 8305's bounds of the Connection Attempt Delay.
FLOOR = 0.1
CEILING = 2.0
#: Before any login was seen: RFC 8305's recommended 250 ms.
INITIAL = 0.25
#: Weight of each new login in the moving average.
ALPHA = 0.25
#: A login counts at most this many times the current average (held-then-served outliers).
CLIP = 2.0


class LoginTimes:
    """A moving average of login durations; :attr:`held_after` is the delay it implies.

    Pure: fed durations, no clock of its own.
    """

    __slots__ = ("held_after", "typical")

    def __init__(self, initial_delay: float = INITIAL) -> None:
        self.typical = initial_delay / FACTOR
        self.held_after = initial_delay
        """Seconds after which an attempt still in flight is presumed held."""

    def observe(self, seconds: float) -> None:
        """A login (an attempt that reached the server) took ``seconds``."""
        typical = self.typical
        sample = min(max(seconds, 0.0), CLIP * typical)
        typical += ALPHA * (sample - typical)
        self.typical = typical
        self.held_after = min(max(FACTOR * typical, FLOOR), CEILING)
