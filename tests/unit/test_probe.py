"""The gate's state machine with a fake clock and fake waiters: no database, no sleeping.

A fake waiter's ``wait`` stands for the time the caller is blocked: it runs what the rest of the
world does meanwhile (another caller's attempt ending, the clock moving) and returns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from fault_tolerant_pool.errors import DatabaseUnreachable
from fault_tolerant_pool.hedge import INITIAL
from fault_tolerant_pool.probe import Admission, Gate, ProbeSchedule, WaitingRoom

from .fakes import Clock, FakeDBAPI

DEADLINE = 10.0
#: No jitter (a draw of 0.5), so the pauses are the schedule's own.
SCHEDULE = ProbeSchedule()
#: Attempts in flight are never presumed held: what waiting behind a probe is, on its own.
NO_HEDGING = ProbeSchedule(hedge_limit=0)


class FakeWaiter:
    def __init__(self, world: World) -> None:
        self.world = world
        self.woken = False

    def wait(self, timeout: float) -> None:
        self.world.waits.append(timeout)
        action = self.world.during_wait.pop(0) if self.world.during_wait else None
        if action is not None:
            action()
        if not self.woken:
            self.world.clock.now += max(timeout, 0.0)

    def wake(self) -> None:
        self.woken = True


class World:
    """A clock, a gate, and what happens while a caller waits (one action per wait, in order)."""

    def __init__(
        self, fail_fast: bool = True, room: WaitingRoom | None = None, hedging: bool = True
    ) -> None:
        self.clock = Clock()
        self.waits: list[float] = []
        self.during_wait: list[Callable[[], object] | None] = []
        self.gate = Gate(
            DEADLINE,
            fail_fast=fail_fast,
            schedule=SCHEDULE if hedging else NO_HEDGING,
            room=room,
            clock=self.clock,
            wall=lambda: 1_000_000.0 + self.clock.now,
            random=lambda: 0.5,
            waiter=lambda in_loop: FakeWaiter(self),
        )

    def enter(self, deadline: float = DEADLINE) -> Admission:
        return self.gate.enter(self.clock.now + deadline, False)

    def fail(self, started: float | None = None) -> None:
        now = self.clock.now
        error = ConnectionRefusedError(111, "refused")
        self.gate.finished(now, error, now if started is None else started)

    def succeed(self) -> None:
        self.gate.finished(self.clock.now, None, self.clock.now)


def failing_world(**kw: object) -> World:
    world = World(**kw)  # type: ignore[arg-type]
    assert world.enter() is Admission.GO
    world.fail()
    assert world.gate.state == "failing"
    return world


def test_the_pause_between_probes_grows_with_the_failure_then_stays() -> None:
    pause = ProbeSchedule().pause
    assert pause(0.0, 0.5) == pytest.approx(0.14)
    assert pause(2.2, 0.5) == pytest.approx(0.14 + 0.4**3)
    assert pause(3.3, 0.5) == pytest.approx(0.14 + 0.6**3)
    assert pause(10.0, 0.5) == pause(600.0, 0.5) == pytest.approx(0.6)
    assert pause(600.0, 0.0) == pytest.approx(0.6 * 0.85)
    assert pause(600.0, 0.999999) == pytest.approx(0.6 * 1.15)
    # A 2 s restart is noticed within 230 ms (the worst draw), a long outage within 0.7 s.
    assert pause(2.1, 0.999999) < 0.23 and pause(60.0, 0.999999) < 0.7


def test_healthy_callers_go_at_once_up_to_the_concurrency_limit() -> None:
    world = World()
    for _ in range(SCHEDULE.healthy_concurrency):
        assert world.enter() is Admission.GO
    world.during_wait = [world.succeed]  # one of the four connects ends while the fifth waits
    assert world.enter() is Admission.GO
    # it would have waited no longer than until the four count as held (see the hedging tests)
    assert world.waits == [INITIAL] and world.gate.state == "healthy"
    assert world.gate.hedged == 0


def test_after_a_failure_one_probe_at_a_time_paced_by_the_schedule() -> None:
    world = failing_world(hedging=False)
    # nobody may try before the next probe is due: the caller waits exactly until then
    assert world.enter() is Admission.GO
    assert world.waits == [pytest.approx(SCHEDULE.pause(0.0, 0.5))]
    # the probe is in flight: the next caller waits for its outcome, not a timer
    world.during_wait = [world.fail, None]
    assert world.enter() is Admission.GO
    # woken by the failure; it would have waited no longer than until fail-fast opens
    assert world.waits[1] == pytest.approx(DEADLINE - SCHEDULE.pause(0.0, 0.5))
    assert world.waits[2] == pytest.approx(SCHEDULE.pause(0.14, 0.5))  # then the next probe
    assert world.gate.outage_attempts == 2


def test_fail_fast_opens_after_a_whole_deadline_and_the_probe_keeps_going(
    caplog: pytest.LogCaptureFixture,
) -> None:
    world = failing_world()
    world.clock.now += DEADLINE
    with caplog.at_level(logging.INFO, logger="fault_tolerant_pool.probe"):
        assert world.enter() is Admission.GO  # the probe is due: this caller makes it
        assert world.enter() is Admission.FAIL_FAST  # a probe is in flight
        world.fail()
        assert world.enter() is Admission.FAIL_FAST  # not due yet
        assert world.gate.state == "failing_fast"
        world.clock.now += 0.6 * 1.15
        assert world.enter() is Admission.GO
        world.succeed()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(warnings) == 1 and "failing fast" in warnings[0].getMessage()
    assert "ConnectionRefusedError" in warnings[0].getMessage()
    assert len(infos) == 1 and "after 10.7s of failure (2 failed attempts)" in infos[0].getMessage()
    figures = world.gate.figures()
    assert figures.state == "healthy" and figures.outages == 1
    assert figures.last_outage == pytest.approx(DEADLINE + 0.69)
    assert figures.unreachable_since is None


def test_waiters_fail_fast_when_it_opens() -> None:
    world = failing_world(hedging=False)
    assert world.enter() is Admission.GO  # a probe, in flight until the deadline
    world.during_wait = [None]
    assert world.enter(deadline=20.0) is Admission.FAIL_FAST
    # it waited until the failure was a deadline old, not until its own deadline
    assert world.waits == [
        pytest.approx(SCHEDULE.pause(0.0, 0.5)),
        pytest.approx(DEADLINE - SCHEDULE.pause(0.0, 0.5)),
    ]


def test_without_fail_fast_callers_wait_until_their_deadline() -> None:
    world = failing_world(fail_fast=False, hedging=False)
    world.clock.now += 100.0
    assert world.enter() is Admission.GO  # probe
    assert world.enter(deadline=3.0) is Admission.EXPIRED
    assert world.waits == [pytest.approx(3.0)] and world.gate.state == "failing"


def test_recovery_lets_waiters_connect_a_few_at_a_time() -> None:
    world = failing_world()
    world.clock.now += 1.0
    assert world.enter() is Admission.GO  # the probe
    gate = world.gate
    # while it is in flight, three callers wait; it succeeds: two of them are woken
    waiters = [FakeWaiter(world) for _ in range(3)]
    gate._waiters.extend(waiters)
    world.succeed()
    assert gate.state == "recovering"
    assert [w.woken for w in waiters] == [True, True, False]
    assert list(gate._waiters) == waiters[2:]
    gate._waiters.clear()
    assert world.enter() is Admission.GO and world.enter() is Admission.GO
    world.during_wait = [world.succeed]
    assert world.enter() is Admission.GO  # the third went once one of the two ended
    world.succeed()
    world.succeed()
    assert gate.figures().state == "healthy" and gate.last_error is None


def test_a_cancelled_probe_owner_hands_the_probe_on() -> None:
    world = failing_world(hedging=False)
    world.clock.now += 1.0
    assert world.enter() is Admission.GO  # the probe's owner
    world.during_wait = [world.gate.abandoned]  # cancelled while the next caller waits
    assert world.enter() is Admission.GO  # the waiter becomes the probe at once
    assert world.waits == [pytest.approx(DEADLINE - 1.0)]  # (at most until fail-fast)
    assert world.gate._in_flight == 1


def test_a_woken_waiter_that_gives_up_hands_its_turn_on() -> None:
    world = World()
    gate = world.gate
    for _ in range(SCHEDULE.healthy_concurrency):
        assert world.enter() is Admission.GO
    other = FakeWaiter(world)

    def end_one_then_queue_another() -> None:
        gate._waiters.append(other)  # queued behind the caller below
        world.succeed()  # wakes the caller below only (one free slot)
        assert not other.woken

    def cancelled() -> None:
        end_one_then_queue_another()
        raise KeyboardInterrupt  # the woken caller is cancelled before it goes

    world.during_wait = [cancelled]
    with pytest.raises(KeyboardInterrupt):
        world.enter()
    assert other.woken  # its turn went to the next waiter
    assert gate.room.waiting == 0


def test_max_waiting_refuses_beyond_the_limit() -> None:
    room = WaitingRoom(limit=1)
    world = failing_world(room=room, hedging=False)
    world.clock.now += 1.0
    assert world.enter() is Admission.GO  # the probe, in flight

    def another_caller() -> None:
        assert world.enter() is Admission.REJECTED

    world.during_wait = [another_caller]
    assert world.enter(deadline=2.0) is Admission.EXPIRED
    assert (room.waiting, room.rejected) == (0, 1)
    assert world.gate.figures().rejected == 1


def test_a_permanent_error_means_the_server_answered() -> None:
    world = failing_world()
    world.clock.now += 1.0
    assert world.enter() is Admission.GO
    world.gate.finished(world.clock.now, None, world.clock.now)  # e.g. 28P01: reached
    assert world.gate.state == "healthy"


def test_an_earlier_connect_that_fails_moves_the_start_of_the_failure_back() -> None:
    world = World()
    world.enter()
    world.enter()
    world.clock.now += 4.0
    world.fail(started=world.clock.now - 0.5)
    world.fail(started=world.clock.now - 4.0)  # began before the first failure
    world.clock.now += DEADLINE - 4.0
    assert world.enter() is Admission.GO  # the probe: the failure is a deadline old
    assert world.gate.state == "failing_fast"


def test_the_fail_fast_error_names_since_when_and_never_a_secret() -> None:
    world = failing_world()
    secret = "s3cr3t-pw"
    last = FakeDBAPI.OperationalError(f"connection to server failed: password={secret} refused")
    world.gate.last_error = last
    error = world.gate.unreachable(
        FakeDBAPI, last, "08001", attempts=0, elapsed=0.0, secrets=(secret,)
    )
    assert isinstance(error, DatabaseUnreachable)
    assert isinstance(error, FakeDBAPI.OperationalError)
    assert secret not in str(error)
    assert "database unreachable since 1970-01-12T13:48:20Z (1 failed attempt)" in str(error)
    assert "failing fast while a probe retries; last error OperationalError [08001]" in str(error)
    assert error.unreachable_since == pytest.approx(1_000_100.0)
    assert error.outage_attempts == 1 and error.last_error is last and error.transient
    # the message is built once per failed probe, not once per refused caller
    again = world.gate.unreachable(FakeDBAPI, last, "08001", attempts=0, elapsed=0.0, secrets=())
    assert str(again) == str(error) and again is not error


# -- attempts presumed held (fault_tolerant_pool.hedge) ------------------------------------------


def test_healthy_callers_beyond_the_limit_go_once_the_attempts_in_flight_count_as_held() -> None:
    world = World()
    for _ in range(SCHEDULE.healthy_concurrency):
        assert world.enter() is Admission.GO  # four logins, held by a proxy: none ends
    assert world.enter() is Admission.GO  # the fifth waited until they counted as held
    assert world.enter() is Admission.GO  # the sixth, one more delay after the fifth went
    assert world.waits == [pytest.approx(INITIAL), pytest.approx(INITIAL)]
    assert world.gate.hedged == 2 and world.gate._in_flight == 6


def test_a_held_probe_does_not_hold_the_next_caller() -> None:
    world = failing_world()
    world.clock.now += 3.0
    assert world.enter() is Admission.GO  # the probe: a proxy accepts it and holds it
    went = world.clock.now
    assert world.enter() is Admission.GO  # the next caller tries beside it
    # after a login's delay (a held attempt costs the server nothing: no probe pause)
    assert world.clock.now - went == pytest.approx(INITIAL)
    assert world.gate.hedged == 1 and world.gate._in_flight == 2


def test_beside_a_held_probe_while_failing_fast_a_due_caller_probes_instead_of_failing() -> None:
    world = failing_world()
    world.clock.now += DEADLINE
    assert world.enter() is Admission.GO  # the probe, held
    assert world.enter() is Admission.FAIL_FAST  # too soon: it may still answer
    world.clock.now += SCHEDULE.last
    assert world.enter() is Admission.GO  # held for longer than a probe's pause: try again
    assert world.enter() is Admission.FAIL_FAST
    assert world.gate.state == "failing_fast" and world.gate.hedged == 1


def test_at_most_hedge_limit_attempts_beside_held_ones() -> None:
    world = failing_world(fail_fast=False)
    world.clock.now += 1.0
    for _ in range(1 + SCHEDULE.hedge_limit):  # the probe, then one beside it per delay
        assert world.enter() is Admission.GO
    assert world.gate._in_flight == 1 + SCHEDULE.hedge_limit
    # the next waits for an outcome, not a timer: until its own deadline at most
    assert world.enter(deadline=5.0) is Admission.EXPIRED
    assert world.waits[-1] == pytest.approx(5.0)


def test_a_failure_that_began_before_the_server_was_reached_changes_nothing() -> None:
    world = World()
    held_since = world.clock.now
    assert world.enter() is Admission.GO  # held by the proxy
    world.clock.now += 0.3
    assert world.enter() is Admission.GO  # a later attempt, routed to the new server
    world.gate.finished(world.clock.now, None, world.clock.now, world.clock.now - 0.01)
    world.clock.now += 1.7
    # the held one fails at last: stale news, the pool stays healthy
    world.gate.finished(world.clock.now, ConnectionResetError(), held_since, held_since)
    assert world.gate.state == "healthy" and world.gate.outage_attempts == 0
    # a failure of an attempt begun after that success is news
    assert world.enter() is Admission.GO
    world.gate.finished(world.clock.now, ConnectionResetError(), world.clock.now, world.clock.now)
    assert world.gate.state == "failing"


def test_the_logins_seen_set_when_an_attempt_counts_as_held() -> None:
    world = World()
    gate = world.gate
    for _ in range(30):  # loopback logins of 5 ms
        assert world.enter() is Admission.GO
        gate.finished(world.clock.now + 0.005, None, world.clock.now, world.clock.now)
    assert gate.logins.held_after == pytest.approx(0.1)  # RFC 8305's floor
    assert gate.figures().hedged == 0


def test_a_proxy_that_held_one_attempt_and_closes_the_next_is_asked_at_its_pace() -> None:
    # HAProxy between a leader's fall and its successor's rise: it held an attempt (routed to the
    # old leader, refused, retried) and closes the next ones at once (no server up). The next
    # connection may find a server any moment, and asking costs the database nothing
    world = World()
    error = OSError("server closed the connection unexpectedly")

    def closed(after: float = 0.002) -> None:
        now = world.clock.now
        world.gate.finished(now, error, now, attempt_started=now - after, proxied=True)

    assert world.enter() is Admission.GO
    closed()  # a quick close alone: the schedule's pause
    assert world.gate.next_probe_in(world.clock.now) == pytest.approx(SCHEDULE.pause(0.0, 0.5))
    assert world.enter() is Admission.GO  # the probe: held by the proxy, never reported here
    assert world.enter() is Admission.GO  # beside it once presumed held
    assert world.gate.hedged == 1
    closed()
    assert world.gate.next_probe_in(world.clock.now) == pytest.approx(SCHEDULE.proxied)
    for _ in range(3):  # beside the held probe, at the proxy's pace
        assert world.enter() is Admission.GO
        assert world.waits[-1] == pytest.approx(SCHEDULE.proxied)
        closed()
    closed(after=world.gate.logins.held_after)  # held, then closed: the proxy's pace too
    assert world.gate.next_probe_in(world.clock.now) == pytest.approx(SCHEDULE.proxied)
    world.clock.now += DEADLINE  # fail-fast opens: a long outage gets the schedule's pace
    assert world.enter() is Admission.GO
    assert world.gate.state == "failing_fast"
    closed()
    assert world.gate.next_probe_in(world.clock.now) == pytest.approx(SCHEDULE.last)
    world.succeed()
    assert world.enter() is Admission.GO  # a new failure starts without the held evidence
    closed()
    assert world.gate.next_probe_in(world.clock.now) > SCHEDULE.proxied


def test_a_quick_refusal_keeps_the_schedules_pause() -> None:
    # refused: nothing listens, the server itself is down (a fleet's attempts stay a few a second)
    world = World(hedging=False)
    now = world.clock.now
    assert world.enter() is Admission.GO
    refused = ConnectionRefusedError(111, "refused")
    world.gate.finished(now, refused, now, attempt_started=now - 0.001)
    assert world.gate.next_probe_in(now) == pytest.approx(SCHEDULE.pause(0.0, 0.5))
