"""The demo on a real Patroni cluster (``python -m demo --patroni``): etcd, two Patroni nodes over
PostgreSQL and HAProxy, from the testing module's :class:`PatroniCluster`, with what the page's
buttons do to it (switch over, kill the leader's postmaster) and what the page shows of it (the
leader, each node's role, the writes each node took).

Every fault ends with a restore step (:meth:`PatroniCluster.restore`: every node back and
healthy, HAProxy routing writes to the leader), so the cluster never stays broken and the next
button press is the same experiment again.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from fault_tolerant_pool.testing.patroni import PatroniCluster, PatroniNode
from fault_tolerant_pool.testing.server import ServerError

PatroniState = Literal["starting", "running", "switching over", "recovering", "failed", "down"]
ActionKind = Literal["switchover", "kill-leader"]
Route = Literal["haproxy", "multihost"]

#: The page polls the leader through this; Patroni's REST API is asked at most this often.
LEADER_INTERVAL = 1.0
#: How long a fault may take before the demo calls it failed (then the next press restores).
FAULT_TIMEOUT = 60.0
RESTORE_TIMEOUT = 120.0


class _Stopped(Exception):
    """The demo is shutting down: the action in progress gives up."""


@dataclass(frozen=True)
class Action:
    """One press of a button (epoch seconds): ``done_at`` when a leader took writes again,
    ``restored_at`` when the cluster was healthy again (every node back, HAProxy routing)."""

    number: int
    kind: ActionKind
    from_node: str
    to_node: str | None
    started_at: float
    done_at: float | None = None
    restored_at: float | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class PatroniDemo:
    """A :class:`PatroniCluster` with a state the page can show, and the page's faults.

    The blocking methods (:meth:`start`, :meth:`switchover`, :meth:`kill_leader`,
    :meth:`refresh`, :meth:`destroy`) are meant for a thread, never the event loop.
    """

    def __init__(self, cluster: PatroniCluster | None = None, route: Route = "haproxy") -> None:
        if route not in ("haproxy", "multihost"):
            raise ValueError(f"route must be 'haproxy' or 'multihost', got {route!r}")
        #: ``ServerUnavailable`` here when etcd, Patroni or HAProxy is missing.
        self.cluster = cluster if cluster is not None else PatroniCluster()
        self.route: Route = route
        self.state: PatroniState = "starting"
        #: What the action under way is doing now, in words (``None``: nothing under way).
        self.activity: str | None = None
        self.actions: list[Action] = []
        #: The node Patroni reports writable (``cluster.leader()``), polled by :meth:`refresh`.
        self.leader: str | None = None
        self.leader_checked_at: float | None = None
        #: Each node's ``GET /patroni`` (role and state), polled by :meth:`refresh`.
        self.statuses: dict[str, dict[str, Any]] = {}
        #: The server port (``inet_server_port()``) of each node's PostgreSQL -> the node's name.
        self.names_by_port: dict[int, str] = {n.pg_port: n.name for n in self.cluster.nodes}
        self._lock = threading.Lock()
        self._busy = False
        self._idle = threading.Event()
        self._idle.set()
        self._stop = threading.Event()
        self._needs_restore = False
        self._refreshed = 0.0

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start etcd, the nodes and HAProxy (about 10 s); return once HAProxy routes writes."""
        self.cluster.start()
        self.state = "running"
        self.refresh(force=True)

    def destroy(self) -> None:
        """Stop the action under way (it gives up at its next step), then every process of the
        cluster, and delete its directory."""
        self._stop.set()
        self._idle.wait(15.0)
        self.cluster.destroy()
        self.state = "down"

    def stop_actions(self) -> None:
        """Make the action under way give up at its next step (the demo is shutting down)."""
        self._stop.set()

    # -- what the page shows ---------------------------------------------------------------------

    def url(self, driver: str = "asyncpg") -> str:
        """The engine's URL: HAProxy's read-write port, or a multi-host URL over every node."""
        if self.route == "multihost":
            return self.cluster.multi_host_url(driver)
        return self.cluster.haproxy_url(driver)

    def node_name(self, server_port: int | None) -> str | None:
        """The node whose PostgreSQL listens on ``server_port`` (``inet_server_port()``)."""
        return None if server_port is None else self.names_by_port.get(server_port)

    @property
    def busy(self) -> bool:
        return self._busy

    def refresh(self, force: bool = False) -> None:
        """Ask Patroni which node leads and what each node is doing; at most once a second
        (unless ``force``). Blocking (HTTP to each node's REST API): run it in a thread."""
        now = time.monotonic()
        if not force and now - self._refreshed < LEADER_INTERVAL:
            return
        self._refreshed = now
        leader = self.cluster.leader()
        self.statuses = {node.name: node.status() for node in self.cluster.nodes}
        self.leader = leader.name if leader is not None else None
        self.leader_checked_at = time.time()

    def nodes(self, writes: dict[str, int]) -> list[dict[str, Any]]:
        """Each node: its name, its PostgreSQL's port, what Patroni says of it, its writes."""
        found = []
        for node in self.cluster.nodes:
            status = self.statuses.get(node.name, {})
            found.append(
                {
                    "name": node.name,
                    "port": node.pg_port,
                    "leader": node.name == self.leader,
                    "role": status.get("role"),
                    "state": status.get("state"),
                    "timeline": status.get("timeline"),
                    "writes": writes.get(node.name, 0),
                }
            )
        return found

    # -- the faults --------------------------------------------------------------------------------

    def begin(self) -> str | None:
        """Claim the right to break the cluster; the reason why not, or None."""
        with self._lock:
            if self._busy:
                return f"the cluster is busy ({self.activity or self.state})"
            if self.state not in ("running", "failed"):
                return f"the cluster is {self.state}"
            self._busy = True
            self._idle.clear()
            return None

    def _release(self) -> None:
        with self._lock:
            self._busy = False
            self.activity = None
            self._idle.set()

    def switchover(self) -> None:
        """A planned switchover (Patroni's ``POST /switchover``): the leader hands over to the
        replica, which is promoted; the old leader rejoins as a replica. Call :meth:`begin`
        first; blocking."""
        self._run("switchover", self._switchover)

    def kill_leader(self) -> None:
        """SIGKILL the leader's postmaster: Patroni starts it again in place (crash recovery; the
        leader key is kept), a few seconds of no writes. Call :meth:`begin` first; blocking."""
        self._run("kill-leader", self._kill_leader)

    def _run(self, kind: ActionKind, fault: Callable[[int], None]) -> None:
        number = len(self.actions) + 1
        try:
            if self._needs_restore:  # the last action failed half-way: heal first
                self.activity = "restoring the cluster first"
                self._restore()
                self._needs_restore = False
                self.state = "running"
            fault(number)
            self.state = "running"
            self.activity = "restoring the cluster: every node back, HAProxy routing"
            self._restore()
            self._update(number, restored_at=time.time())
        except _Stopped:
            pass
        except BaseException as exc:
            self.state = "failed"
            self._needs_restore = True
            # the first line only: a ServerError goes on with Patroni's status and log tails
            error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"[:300]
            if self.actions and self.actions[-1].number == number:
                self._update(number, error=error)
            else:
                self.actions.append(
                    Action(number, kind, self.leader or "?", None, time.time(), error=error)
                )
            if not isinstance(exc, Exception):
                raise
        finally:
            self._release()

    def _switchover(self, number: int) -> None:
        self.state = "switching over"
        self.activity = "switching over (Patroni's POST /switchover)"
        self.actions.append(Action(number, "switchover", self.leader or "?", None, time.time()))
        old = self.cluster.switchover()  # returns once Patroni has done it (about 2 s)
        self._update(number, from_node=old.name)
        self.activity = "waiting for Patroni to report the new leader"
        new = self._wait_for_leader(lambda leader: leader is not old, "a new leader")
        self._update(number, to_node=new.name, done_at=time.time())

    def _kill_leader(self, number: int) -> None:
        self.state = "recovering"
        self.activity = "killing the leader's postmaster (SIGKILL)"
        pids = {node.name: node.postmaster_pid() for node in self.cluster.nodes}
        self.actions.append(Action(number, "kill-leader", self.leader or "?", None, time.time()))
        killed = self.cluster.kill_leader_postmaster()
        self._update(number, from_node=killed.name)
        self.activity = f"Patroni restarts {killed.name}'s PostgreSQL (crash recovery)"
        old_pid = pids.get(killed.name)

        def back() -> bool:
            # Patroni keeps saying "running" while its postmaster is dead: a new postmaster pid
            # (not the zombie's) is what says PostgreSQL is back.
            pid = killed.postmaster_pid()
            return pid is not None and pid != old_pid and killed.status().get("state") == "running"

        self._wait_until(back, f"{killed.name}'s PostgreSQL to start again")
        leader = self._wait_for_leader(lambda leader: True, "a leader")
        self._update(number, to_node=leader.name, done_at=time.time())

    def _update(self, number: int, **changes: Any) -> None:
        for i, action in enumerate(self.actions):
            if action.number == number:
                self.actions[i] = dataclasses.replace(action, **changes)

    def _wait_until(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + FAULT_TIMEOUT
        while not condition():
            if self._stop.is_set():
                raise _Stopped
            if time.monotonic() > deadline:
                raise ServerError(f"timed out after {FAULT_TIMEOUT:g} s waiting for {what}")
            time.sleep(0.1)

    def _wait_for_leader(self, wanted: Callable[[PatroniNode], bool], what: str) -> PatroniNode:
        found: list[PatroniNode] = []

        def leader() -> bool:
            node = self.cluster.leader()
            if node is None or not wanted(node):
                return False
            found.append(node)
            return True

        self._wait_until(leader, what)
        self.leader = found[-1].name
        self.leader_checked_at = time.time()
        return found[-1]

    def _restore(self) -> None:
        """:meth:`PatroniCluster.restore` in short steps, so that a shutdown does not wait for it
        (and a destroyed cluster is never started again)."""
        deadline = time.monotonic() + RESTORE_TIMEOUT
        while True:
            if self._stop.is_set():
                raise _Stopped
            try:
                self.cluster.restore(timeout=3.0)
                return
            except ServerError:
                if time.monotonic() > deadline:
                    raise
