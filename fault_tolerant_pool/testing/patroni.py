"""A real high-availability cluster for tests: etcd, Patroni nodes over PostgreSQL, and HAProxy.

The stack users run in production (Patroni with etcd as its store, HAProxy in front, routing by
Patroni's REST API), from Debian's packages (``etcd-server``, ``patroni``, ``haproxy``), as
plain child processes on 127.0.0.1: etcd and HAProxy as the current user, Patroni (and so
PostgreSQL) as the ``postgres`` OS user when we are root.

Every way into a node goes through a :class:`~fault_tolerant_pool.testing.FaultProxy` of its
own (its PostgreSQL port, its REST API, its link to etcd), so :meth:`PatroniCluster.partition`
cuts a node off from everyone (clients, HAProxy, the other nodes, the store) at once, the way a
network partition does. Timings are short for tests (``ttl`` 10 s, ``loop_wait`` 1 s,
``retry_timeout`` 4 s; HAProxy checks every second, ``fall 2 rise 1``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .failover import multi_host_url
from .proxy import FaultProxy
from .server import (
    RunAs,
    ServerError,
    ServerUnavailable,
    find_postgres_bindir,
    free_port,
    log_tail,
    make_workdir,
    registry,
    run_as,
    run_psql,
    sqlalchemy_url,
    terminate,
)

__all__ = [
    "ClusterTimeline",
    "PatroniCluster",
    "PatroniNode",
    "PatroniTiming",
    "find_patroni_stack",
]

Role = Literal["primary", "replica"]
#: Patroni's ``role`` of the leader (3.0 says "master"; later versions "primary").
WRITER_ROLES = ("master", "primary")

#: Debian package of each program, for the message when one is missing.
_PACKAGES = {"etcd": "etcd-server", "patroni": "patroni", "haproxy": "haproxy"}
_SEARCH = {
    "etcd": ("/usr/bin/etcd",),
    "patroni": ("/usr/bin/patroni",),
    "haproxy": ("/usr/sbin/haproxy",),
}


def find_patroni_stack() -> dict[str, Path]:
    """The ``etcd``, ``patroni`` and ``haproxy`` executables; :class:`ServerUnavailable` names
    the Debian packages of those missing."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name, fallbacks in _SEARCH.items():
        for candidate in (shutil.which(name), *fallbacks):
            if candidate and os.access(candidate, os.X_OK):
                found[name] = Path(candidate)
                break
        else:
            missing.append(name)
    if missing:
        packages = " ".join(_PACKAGES[name] for name in missing)
        raise ServerUnavailable(
            f"{', '.join(missing)} not found; a Patroni cluster needs them "
            f"(Debian: apt-get install {packages})"
        )
    return found


@dataclass(frozen=True)
class PatroniTiming:
    """Patroni's and HAProxy's timing (Patroni's rule: ``loop_wait + 2 * retry_timeout <= ttl``).

    Patroni's defaults are ``ttl`` 30, ``loop_wait`` 10, ``retry_timeout`` 10: a crashed leader
    is replaced after up to 30 s. The test defaults replace it after about 10 s.
    """

    ttl: int = 10
    loop_wait: int = 1
    retry_timeout: int = 4
    check_interval: str = "1s"
    """HAProxy's ``inter`` (``fall 2 rise 1``)."""

    def __post_init__(self) -> None:
        if self.loop_wait + 2 * self.retry_timeout > self.ttl:
            raise ValueError(
                f"Patroni needs loop_wait + 2 * retry_timeout <= ttl, got loop_wait="
                f"{self.loop_wait}, retry_timeout={self.retry_timeout}, ttl={self.ttl}"
            )


# --------------------------------------------------------------------------------------------------
# Processes


class _Child:
    """One child process with its log file, registered so interpreter exit ends it."""

    def __init__(self, name: str, log_path: Path, stop_signal: signal.Signals) -> None:
        self.name = name
        self.log_path = log_path
        self.stop_signal = stop_signal
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, cmd: list[str], cwd: Path, owner: RunAs | None = None, **env: str) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=cwd,
                env={**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", **env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **(owner.popen_kwargs() if owner is not None else {}),  # type: ignore[call-overload]
            )
        registry.add_proc(self.proc, self.stop_signal)

    def stop(self, sig: signal.Signals | None = None, timeout: float = 30.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            terminate(proc, sig or self.stop_signal, timeout)
        registry.discard_proc(proc)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the process alone (its children, e.g. a postmaster, are left running)."""
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=10)
        registry.discard_proc(proc)
        self.proc = None

    def check(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is not None:
            raise ServerError(
                f"{self.name} exited with code {proc.returncode}; log tail:\n"
                f"{log_tail(self.log_path)}"
            )


def _http(url: str, method: str = "GET", body: Any = None, timeout: float = 2.0) -> tuple[int, Any]:
    """(status, decoded JSON or text) of one request; status 0 when nothing answered."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    except (OSError, ValueError):
        return 0, None
    text = raw.decode("utf-8", errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def _poll(condition: Callable[[], bool], what: str, timeout: float, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise ServerError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


# --------------------------------------------------------------------------------------------------
# The pieces


class PatroniNode:
    """One Patroni node and the PostgreSQL it runs; reached only through its three proxies."""

    def __init__(self, cluster: PatroniCluster, name: str) -> None:
        self.cluster = cluster
        self.name = name
        self.workdir = cluster.workdir / name
        self.workdir.mkdir()
        self.datadir = self.workdir / "data"
        self.pg_port = free_port()
        self.rest_port = free_port()
        host = PatroniCluster.host
        #: Where clients (and HAProxy, and the other nodes) reach this node's PostgreSQL.
        self.pg_proxy = FaultProxy(host, self.pg_port)
        #: Where HAProxy's health check and the other nodes reach this node's REST API.
        self.rest_proxy = FaultProxy(host, self.rest_port)
        #: This node's link to etcd.
        self.dcs_proxy = FaultProxy(host, cluster.etcd_port)
        self.config_path = self.workdir / "patroni.yml"
        self.patroni = _Child(f"patroni {name}", self.workdir / "patroni.log", signal.SIGTERM)

    @property
    def port(self) -> int:
        """The port clients connect to (this node's PostgreSQL, through its proxy)."""
        return self.pg_proxy.port

    @property
    def host(self) -> str:
        return PatroniCluster.host

    @property
    def rest_url(self) -> str:
        """The REST API, directly (not through the proxy)."""
        return f"http://{PatroniCluster.host}:{self.rest_port}"

    def __repr__(self) -> str:
        return f"<PatroniNode {self.name} pg={self.port} rest={self.rest_port}>"

    def write_config(self) -> None:
        c = self.cluster
        timing = c.timing
        host = PatroniCluster.host
        socket_dir = self.workdir
        config = {
            "scope": c.scope,
            "name": self.name,
            "log": {"level": "INFO", "format": "%(asctime)s %(levelname)s: %(message)s"},
            "restapi": {
                "listen": f"{host}:{self.rest_port}",
                "connect_address": f"{host}:{self.rest_proxy.port}",
            },
            # use_proxies: no discovery of etcd's own address, which would bypass the proxy
            "etcd3": {
                "hosts": [f"{host}:{self.dcs_proxy.port}"],
                "protocol": "http",
                "use_proxies": True,
            },
            "bootstrap": {
                "dcs": {
                    "ttl": timing.ttl,
                    "loop_wait": timing.loop_wait,
                    "retry_timeout": timing.retry_timeout,
                    "maximum_lag_on_failover": 1048576,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "parameters": {
                            "max_connections": c.max_connections,
                            "wal_level": "replica",
                            "hot_standby": "on",
                            "max_wal_senders": 10,
                            "max_replication_slots": 10,
                            "wal_keep_size": "128MB",
                            "wal_log_hints": "on",
                        },
                    },
                },
                "initdb": [
                    {"encoding": "UTF8"},
                    {"locale": "C"},
                    {"auth-host": "scram-sha-256"},
                    {"auth-local": "trust"},
                ],
                "pg_hba": [
                    "local all all trust",
                    f"host replication {c.replication_user} 127.0.0.1/32 scram-sha-256",
                    "host all all 127.0.0.1/32 scram-sha-256",
                ],
            },
            "postgresql": {
                "listen": f"{host}:{self.pg_port}",
                "connect_address": f"{host}:{self.pg_proxy.port}",
                "data_dir": str(self.datadir),
                "bin_dir": str(c.bindir),
                "pgpass": str(self.workdir / "pgpass"),
                "authentication": {
                    "superuser": {"username": c.user, "password": c.password},
                    "replication": {
                        "username": c.replication_user,
                        "password": c.replication_password,
                    },
                    "rewind": {"username": c.user, "password": c.password},
                },
                "parameters": {
                    "unix_socket_directories": str(socket_dir),
                    "fsync": "off",
                    "synchronous_commit": "off",
                    "full_page_writes": "off",
                    "lc_messages": "C",
                },
                "remove_data_directory_on_rewind_failure": True,
                "remove_data_directory_on_diverged_timelines": True,
            },
            "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False},
        }
        # JSON is YAML: no YAML writer needed.
        self.config_path.write_text(json.dumps(config, indent=2))
        c.owner.chown(self.workdir)

    def start(self) -> None:
        """Start Patroni (it starts, bootstraps or joins PostgreSQL itself)."""
        if self.patroni.running:
            return
        for proxy in (self.pg_proxy, self.rest_proxy, self.dcs_proxy):
            if not proxy.is_running:
                proxy.start()
        self.patroni.start(
            [str(self.cluster.programs["patroni"]), str(self.config_path)],
            self.workdir,
            self.cluster.owner,
        )

    def stop(self, timeout: float = 60.0) -> None:
        """Stop Patroni the way a service manager does (SIGTERM): it shuts PostgreSQL down and,
        as the leader, hands the leader key back."""
        self.patroni.stop(signal.SIGTERM, timeout)

    def crash(self) -> None:
        """The node dies: Patroni and every PostgreSQL process SIGKILLed, nothing handed back."""
        self.patroni.kill()
        pid = self.postmaster_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def kill_postmaster(self) -> int:
        """SIGKILL the postmaster alone (Patroni notices and starts it again); its pid."""
        pid = self.postmaster_pid()
        if pid is None:
            raise ServerError(f"node {self.name} has no running postmaster")
        os.kill(pid, signal.SIGKILL)
        return pid

    def postmaster_pid(self) -> int | None:
        try:
            pid = int((self.datadir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def status(self) -> dict[str, Any]:
        """Patroni's ``GET /patroni`` (``role``, ``state``, ...), {} when it does not answer."""
        status, body = _http(f"{self.rest_url}/patroni", timeout=1.0)
        return body if status in (200, 503) and isinstance(body, dict) else {}

    def is_writer(self) -> bool:
        """Patroni says this node leads and its PostgreSQL runs (``GET /primary`` is 200)."""
        return _http(f"{self.rest_url}/primary", timeout=1.0)[0] == 200

    def is_replica(self) -> bool:
        """Patroni says this node is a running replica (``GET /replica`` is 200)."""
        return _http(f"{self.rest_url}/replica", timeout=1.0)[0] == 200

    def partition(self) -> None:
        """Cut this node off: its PostgreSQL, REST API and etcd link black-hole every packet."""
        for proxy in (self.pg_proxy, self.rest_proxy, self.dcs_proxy):
            proxy.blackhole()

    def heal(self) -> None:
        for proxy in (self.pg_proxy, self.rest_proxy, self.dcs_proxy):
            proxy.healthy()

    def psql(self, sql: str, timeout: float = 30.0) -> list[tuple[str, ...]]:
        """Run ``sql`` on this node directly (not through its proxy) as the superuser."""
        c = self.cluster
        return run_psql(
            c.bindir, sql, host=PatroniCluster.host, port=self.pg_port, user=c.user,
            password=c.password, dbname="postgres", timeout=timeout,
        )  # fmt: skip

    def destroy(self) -> None:
        self.crash()
        for proxy in (self.pg_proxy, self.rest_proxy, self.dcs_proxy):
            with contextlib.suppress(Exception):
                proxy.stop()


# --------------------------------------------------------------------------------------------------
# A timeline of what Patroni and HAProxy report


@dataclass
class ClusterTimeline:
    """When each node was first reported writable by Patroni (``GET /patroni``: leading, its
    PostgreSQL running, a postmaster other than the one before), and when HAProxy's read-write
    port first had it UP, after :attr:`started`."""

    started: float
    writable: dict[str, float] = field(default_factory=dict)
    down: dict[str, float] = field(default_factory=dict)
    """When each node was first no longer reported writable."""
    routed: dict[str, float] = field(default_factory=dict)
    events: list[tuple[float, str]] = field(default_factory=list)

    def route_ready(self, name: str) -> float | None:
        """When writes could first reach ``name`` through HAProxy: writable and routed."""
        writable, routed = self.writable.get(name), self.routed.get(name)
        if writable is None or routed is None:
            return None
        return max(writable, routed)


class _Watcher:
    """Polls every node's REST API and HAProxy's stats every ``step`` seconds."""

    def __init__(self, cluster: PatroniCluster, step: float = 0.05) -> None:
        self.cluster = cluster
        self.step = step
        self.timeline = ClusterTimeline(time.monotonic())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="patroni-watch", daemon=True)
        self._writers: dict[str, object] = {}
        self._routed: frozenset[str] = frozenset()

    def _read_writers(self) -> dict[str, object]:
        """Nodes Patroni reports leading with PostgreSQL running, with their postmaster's start
        time (a postmaster restarted in place is a new writer)."""
        writers: dict[str, object] = {}
        for node in self.cluster.nodes:
            status = node.status()
            if status.get("role") in WRITER_ROLES and status.get("state") == "running":
                writers[node.name] = status.get("postmaster_start_time")
        return writers

    def __enter__(self) -> ClusterTimeline:
        self._writers = self._read_writers()
        self._routed = frozenset(self.cluster.haproxy_up("primary"))
        self._thread.start()
        return self.timeline

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        timeline = self.timeline
        while not self._stop.is_set():
            writers = self._read_writers()
            now = time.monotonic()
            for name, started in writers.items():
                if self._writers.get(name, writers) != started:
                    timeline.writable.setdefault(name, now)
                    timeline.events.append((now, f"{name} writable"))
            for name in self._writers.keys() - writers.keys():
                timeline.down.setdefault(name, now)
                timeline.events.append((now, f"{name} not writable"))
            self._writers = writers
            try:
                routed = frozenset(self.cluster.haproxy_up("primary"))
            except OSError:
                routed = self._routed
            for name in routed - self._routed:
                timeline.routed.setdefault(name, now)
                timeline.events.append((now, f"haproxy routes to {name}"))
            for name in self._routed - routed:
                timeline.events.append((now, f"haproxy stops routing to {name}"))
            self._routed = routed
            self._stop.wait(self.step)


# --------------------------------------------------------------------------------------------------
# The cluster


class PatroniCluster:
    """etcd, ``nodes`` Patroni nodes and HAProxy, started by :meth:`start` (or ``with``).

    Ways in: :meth:`haproxy_url` (HAProxy's read-write port, routed by ``GET /primary``; or its
    read-only port, by ``GET /replica``) and :meth:`multi_host_url` (every node, with
    ``target_session_attrs``). Faults: :meth:`switchover`, :meth:`kill_leader_postmaster`,
    :meth:`stop_leader`, :meth:`crash_leader`, :meth:`fence_leader`, :meth:`partition_leader`;
    :meth:`restore` brings every node back and waits for a healthy cluster (a leader, every other
    node a streaming replica, HAProxy routing to the leader). :meth:`watch` records when Patroni
    reports a new leader and when HAProxy routes to it.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        nodes: int = 2,
        *,
        timing: PatroniTiming | None = None,
        user: str = "postgres",
        password: str = "postgres-test-pw",
        max_connections: int = 200,
        scope: str = "ftp",
        os_user: str = "postgres",
    ) -> None:
        if nodes < 2:
            raise ValueError(f"a Patroni cluster for failover tests needs nodes >= 2, got {nodes}")
        self.programs = find_patroni_stack()
        self.bindir = find_postgres_bindir()
        self.owner = run_as(os_user)
        self.timing = timing or PatroniTiming()
        self.user = user
        self.password = password
        self.replication_user = "replicator"
        self.replication_password = "replicator-test-pw"
        self.max_connections = max_connections
        self.scope = scope
        self.dbname = "postgres"
        self.workdir = make_workdir("ftp-patroni-", self.owner)
        registry.add_dir(self.workdir)
        self.etcd_port = free_port()
        self.etcd_peer_port = free_port()
        self.haproxy_port = free_port()
        self.haproxy_replica_port = free_port()
        self.haproxy_socket = self.workdir / "haproxy.sock"
        self.etcd = _Child("etcd", self.workdir / "etcd.log", signal.SIGTERM)
        self.haproxy = _Child("haproxy", self.workdir / "haproxy.log", signal.SIGUSR1)
        self.nodes = [PatroniNode(self, f"node{i + 1}") for i in range(nodes)]

    # -- life cycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> PatroniCluster:
        """Start etcd, the first node (it bootstraps and leads), the others (they clone it and
        stream), then HAProxy; return once HAProxy routes writes to the leader."""
        deadline = time.monotonic() + timeout
        self._start_etcd()
        _poll(self._etcd_healthy, "etcd", deadline - time.monotonic())
        for node in self.nodes:
            node.write_config()
        first, *others = self.nodes
        first.start()
        self._wait(lambda: first.is_writer(), f"{first.name} to bootstrap and lead", deadline)
        for node in others:
            node.start()
        self._start_haproxy()
        self.wait_healthy(deadline - time.monotonic())
        return self

    def __enter__(self) -> PatroniCluster:
        try:
            self.start()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def destroy(self) -> None:
        """Stop everything (immediately) and delete the cluster's directory."""
        self.haproxy.stop(signal.SIGTERM, 10)
        for node in self.nodes:
            node.destroy()
        self.etcd.stop(signal.SIGKILL, 10)
        shutil.rmtree(self.workdir, ignore_errors=True)
        registry.discard_dir(self.workdir)

    def _start_etcd(self) -> None:
        host = self.host
        data = self.workdir / "etcd-data"
        self.etcd.start(
            [
                str(self.programs["etcd"]),
                "--name", "etcd1",
                "--data-dir", str(data),
                "--listen-client-urls", f"http://{host}:{self.etcd_port}",
                "--advertise-client-urls", f"http://{host}:{self.etcd_port}",
                "--listen-peer-urls", f"http://{host}:{self.etcd_peer_port}",
                "--initial-advertise-peer-urls", f"http://{host}:{self.etcd_peer_port}",
                "--initial-cluster", f"etcd1=http://{host}:{self.etcd_peer_port}",
                "--initial-cluster-state", "new",
                "--log-level", "warn",
            ],
            self.workdir,
        )  # fmt: skip

    def _etcd_healthy(self) -> bool:
        self.etcd.check()
        return _http(f"http://{self.host}:{self.etcd_port}/health", timeout=1.0)[0] == 200

    def _haproxy_config(self) -> str:
        timing = self.timing
        lines = [
            "global",
            "    maxconn 2000",
            f"    stats socket {self.haproxy_socket} mode 600 level admin",
            "defaults",
            "    mode tcp",
            "    retries 2",
            "    timeout client 30m",
            "    timeout connect 4s",
            "    timeout server 30m",
            "    timeout check 5s",
        ]
        for section, port, check in (
            ("primary", self.haproxy_port, "/primary"),
            ("replicas", self.haproxy_replica_port, "/replica"),
        ):
            lines += [
                f"listen {section}",
                f"    bind {self.host}:{port}",
                f"    option httpchk GET {check}",
                "    http-check expect status 200",
                f"    default-server inter {timing.check_interval} fall 2 rise 1 "
                "on-marked-down shutdown-sessions",
            ]
            if section == "replicas":
                lines.append("    balance roundrobin")
            for node in self.nodes:
                lines.append(
                    f"    server {node.name} {self.host}:{node.pg_proxy.port} maxconn 1000 "
                    f"check port {node.rest_proxy.port}"
                )
        return "\n".join(lines) + "\n"

    def _start_haproxy(self) -> None:
        config = self.workdir / "haproxy.cfg"
        config.write_text(self._haproxy_config())
        self.haproxy.start([str(self.programs["haproxy"]), "-db", "-f", str(config)], self.workdir)

    def _wait(self, condition: Callable[[], bool], what: str, deadline: float) -> None:
        def check() -> bool:
            self.etcd.check()
            for node in self.nodes:
                node.patroni.check()
            return condition()

        try:
            _poll(check, what, max(deadline - time.monotonic(), 0.0), step=0.1)
        except ServerError as error:
            raise ServerError(f"{error}\n{self.describe()}") from None

    def describe(self) -> str:
        """Each node's Patroni status and log tail, for a failure message."""
        parts = []
        for node in self.nodes:
            parts.append(
                f"--- {node.name}: {node.status() or 'no answer'}\n"
                f"{log_tail(node.patroni.log_path, 15)}"
            )
        parts.append(f"--- haproxy up: {self._safe_up()}\n{log_tail(self.haproxy.log_path, 10)}")
        return "\n".join(parts)

    def _safe_up(self) -> list[str] | str:
        try:
            return self.haproxy_up("primary")
        except OSError as error:
            return f"({error})"

    # -- state ---------------------------------------------------------------------------------

    def leader(self) -> PatroniNode | None:
        """The node Patroni reports writable (``GET /primary`` 200), if exactly one is."""
        writers = [node for node in self.nodes if node.is_writer()]
        return writers[0] if len(writers) == 1 else None

    def replicas(self) -> list[PatroniNode]:
        return [node for node in self.nodes if node.is_replica()]

    def node(self, name: str) -> PatroniNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def haproxy_up(self, section: Literal["primary", "replicas"]) -> list[str]:
        """The servers HAProxy has UP in ``section``, from its stats socket."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(str(self.haproxy_socket))
            sock.sendall(b"show stat\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        up = []
        for line in b"".join(chunks).decode().splitlines():
            fields = line.split(",")
            if len(fields) > 17 and fields[0] == section and fields[1] not in (
                "FRONTEND", "BACKEND"
            ) and fields[17].startswith("UP"):  # fmt: skip
                up.append(fields[1])
        return up

    def healthy(self) -> bool:
        """A leader, every other node a replica streaming from it, HAProxy routing writes to
        the leader alone and reads to every replica."""
        leader = self.leader()
        if leader is None:
            return False
        replicas = self.replicas()
        if len(replicas) != len(self.nodes) - 1:
            return False
        # a replica is one only once it streams from the leader (GET /replica passes before)
        streaming = {
            entry.get("application_name")
            for entry in leader.status().get("replication") or ()
            if isinstance(entry, dict) and entry.get("state") == "streaming"
        }
        if any(node.name not in streaming for node in replicas):
            return False
        try:
            return self.haproxy_up("primary") == [leader.name] and sorted(
                self.haproxy_up("replicas")
            ) == sorted(n.name for n in replicas)
        except OSError:
            return False

    def wait_healthy(self, timeout: float = 90.0, steady: float = 1.5) -> PatroniNode:
        """Wait until :meth:`healthy` holds for ``steady`` seconds (a node back from a failover
        may pass for a replica, then rewind); the leader."""
        deadline = time.monotonic() + timeout
        since: list[float] = []

        def steadily_healthy() -> bool:
            if not self.healthy():
                since.clear()
                return False
            if not since:
                since.append(time.monotonic())
            return time.monotonic() - since[0] >= steady

        self._wait(steadily_healthy, "a healthy cluster", deadline)
        leader = self.leader()
        assert leader is not None
        return leader

    def wait_leader(
        self, timeout: float = 60.0, other_than: PatroniNode | None = None
    ) -> PatroniNode:
        """Wait until a node (other than ``other_than``) is reported writable; that node."""
        found: list[PatroniNode] = []

        def writer() -> bool:
            leader = self.leader()
            if leader is None or leader is other_than:
                return False
            found.append(leader)
            return True

        self._wait(writer, "a new leader", time.monotonic() + timeout)
        return found[-1]

    def restore(self, timeout: float = 120.0) -> PatroniNode:
        """Undo every fault: heal the proxies, start every stopped node; wait until healthy."""
        for node in self.nodes:
            node.heal()
            node.start()
        if self.haproxy.proc is None or not self.haproxy.running:
            self._start_haproxy()
        return self.wait_healthy(timeout)

    def watch(self, step: float = 0.05) -> contextlib.AbstractContextManager[ClusterTimeline]:
        """Record, while the ``with`` block runs, when Patroni reports each node writable and
        when HAProxy starts routing writes to it (polled every ``step`` seconds)."""
        return _Watcher(self, step)

    # -- faults ----------------------------------------------------------------------------------

    def _current_leader(self) -> PatroniNode:
        leader = self.leader()
        if leader is None:
            raise ServerError(f"the cluster has no leader now\n{self.describe()}")
        return leader

    def switchover(
        self, candidate: PatroniNode | None = None, timeout: float = 30.0
    ) -> PatroniNode:
        """A planned switchover (``POST /switchover`` on the leader) to ``candidate`` (default:
        the first other node); returns the old leader. Refused while the candidate is not a
        healthy replica yet: asked again until ``timeout``."""
        leader = self._current_leader()
        if candidate is None:
            candidate = next(n for n in self.nodes if n is not leader)
        body = {"leader": leader.name, "candidate": candidate.name}
        deadline = time.monotonic() + timeout
        while True:
            status, answer = _http(f"{leader.rest_url}/switchover", "POST", body, timeout=30.0)
            if status == 200:
                return leader
            if time.monotonic() >= deadline:
                raise ServerError(f"switchover refused ({status}): {answer}\n{self.describe()}")
            time.sleep(0.2)

    def kill_leader_postmaster(self) -> PatroniNode:
        """SIGKILL the leader's postmaster (Patroni restarts it in place); returns the leader."""
        leader = self._current_leader()
        leader.kill_postmaster()
        return leader

    def stop_leader(self) -> PatroniNode:
        """Stop the leader's Patroni (SIGTERM: PostgreSQL stops, the key is handed back)."""
        leader = self._current_leader()
        leader.stop()
        return leader

    def crash_leader(self) -> PatroniNode:
        """The leader node dies (Patroni and PostgreSQL SIGKILLed): the others take over only
        when the leader key expires (``ttl``)."""
        leader = self._current_leader()
        leader.crash()
        return leader

    def fence_leader(self) -> PatroniNode:
        """Cut the leader off from etcd alone: still reachable by clients, it demotes itself
        (restarts read-only) once it cannot renew its key within ``retry_timeout``, and the
        replica takes over when the key expires (``ttl``)."""
        leader = self._current_leader()
        leader.dcs_proxy.blackhole()
        return leader

    def partition_leader(self) -> PatroniNode:
        """Cut the leader off from clients, HAProxy, the other nodes and etcd."""
        leader = self._current_leader()
        leader.partition()
        return leader

    # -- ways in ---------------------------------------------------------------------------------

    def haproxy_url(self, driver: str | None = "asyncpg", role: Role = "primary") -> str:
        """A SQLAlchemy URL through HAProxy: its read-write port, or its read-only one."""
        port = self.haproxy_port if role == "primary" else self.haproxy_replica_port
        return sqlalchemy_url(driver, self.user, self.password, self.host, port, self.dbname)

    def multi_host_url(
        self, driver: str | None = "asyncpg", target_session_attrs: str | None = "read-write"
    ) -> str:
        """A multi-host URL over every node (through its proxy)."""
        return multi_host_url(
            driver,
            [(node.host, node.port) for node in self.nodes],
            target_session_attrs,
            user=self.user,
            password=self.password,
            dbname=self.dbname,
        )

    def execute(self, sql: str) -> list[tuple[str, ...]]:
        """Run ``sql`` on the leader (directly) as the superuser."""
        return self._current_leader().psql(sql)

    def __repr__(self) -> str:
        nodes = len(self.nodes)
        return f"<PatroniCluster {nodes} nodes haproxy={self.haproxy_port} {self.workdir}>"
