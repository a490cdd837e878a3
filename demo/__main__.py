"""``python -m demo``: serve the demo; ``python -m demo restart-db``: restart its embedded database;
``python -m demo failover-db``: fail it over to its standby; ``python -m demo chaos-db``: the
chaos mix (sessions terminated, a restart, a crash, sessions terminated again).

    python -m demo                      # throwaway PostgreSQL and standby, http://127.0.0.1:8000/
    DATABASE_URL=postgresql://app:pw@db/app python -m demo
    DATABASE_URL=postgresql://app:pw@pgbouncer:6432/app python -m demo --pool null
    python -m demo restart-db --down-for 3       # from a second terminal
    python -m demo failover-db --gap 1           # writer read-only, standby promoted 1 s later
    python -m demo rebuild-standby               # after a failover: a new standby, same port
    python -m demo chaos-db --pause 5            # four faults in a row, 5 s apart
    python -m demo --patroni            # on a throwaway Patroni cluster (etcd, 2 nodes, HAProxy)

Ctrl-C stops the server and everything it started.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from types import FrameType
from typing import Any

from .settings import ENVIRONMENT_VARIABLES, Settings, SettingsError

log = logging.getLogger("demo")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    )
    if args.command == "restart-db":
        return restart_db(args.url, args.down_for, wait=not args.no_wait)
    if args.command == "failover-db":
        return failover_db(args.url, args.gap, wait=not args.no_wait)
    if args.command == "rebuild-standby":
        return rebuild_standby(args.url, wait=not args.no_wait)
    if args.command == "chaos-db":
        return chaos_db(args.url, args.pause, wait=not args.no_wait)
    try:
        settings = Settings.from_environ(
            os.environ,
            host=args.host,
            port=args.port,
            pool=args.pool,
            retry_deadline=args.retry_deadline,
            standby=args.standby,
            patroni=args.patroni,
            patroni_route=args.patroni_route,
        )
    except SettingsError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    if settings.patroni and settings.database_url is not None:
        print("demo: --patroni (DEMO_PATRONI) starts a Patroni cluster of its own; "
              "unset DATABASE_URL to use it", file=sys.stderr)  # fmt: skip
        return 2
    return serve(settings)


def _parser() -> argparse.ArgumentParser:
    variables = "\n".join(f"  {name:<28} {doc}" for name, doc in ENVIRONMENT_VARIABLES.items())
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description="The fault_tolerant_pool demo service (FastAPI on uvicorn).",
        epilog="environment variables:\n" + variables,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "command", nargs="?", default="serve",
        choices=["serve", "restart-db", "failover-db", "rebuild-standby", "chaos-db"],
    )  # fmt: skip
    parser.add_argument("--host", help="listen address (DEMO_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (DEMO_PORT, default 8000; 0: any)")
    parser.add_argument(
        "--pool", choices=["queue", "null"],
        help="queue: FaultTolerantQueuePool; null: FaultTolerantNullPool for a PgBouncer URL "
        "(DEMO_POOL, default queue)",
    )  # fmt: skip
    parser.add_argument("--retry-deadline", type=float, help="DEMO_RETRY_DEADLINE, default 10")
    parser.add_argument(
        "--no-standby", dest="standby", action="store_const", const=False, default=None,
        help="the throwaway PostgreSQL runs without a streaming standby (DEMO_STANDBY=off)",
    )  # fmt: skip
    parser.add_argument(
        "--patroni", action="store_const", const=True, default=None,
        help="run on a throwaway Patroni cluster (etcd, two nodes, HAProxy; Debian's patroni, "
        "etcd-server and haproxy) instead of the embedded PostgreSQL (DEMO_PATRONI=on)",
    )  # fmt: skip
    parser.add_argument(
        "--patroni-route", choices=["haproxy", "multihost"],
        help="with --patroni: the engine goes through HAProxy's read-write port (haproxy, the "
        "default) or lists every node (multihost) (DEMO_PATRONI_ROUTE)",
    )  # fmt: skip
    restart = parser.add_argument_group("restart-db")
    restart.add_argument(
        "--url", default=None,
        help="the running demo (default http://127.0.0.1:$DEMO_PORT, i.e. port 8000)",
    )  # fmt: skip
    restart.add_argument(
        "--down-for", type=float, default=2.0, help="seconds the database stays down (default 2)"
    )
    restart.add_argument("--no-wait", action="store_true", help="return once the restart has begun")
    failover = parser.add_argument_group("failover-db")
    failover.add_argument(
        "--gap", type=float, default=1.0,
        help="seconds between turning the writer read-only and promoting the standby (default 1)",
    )  # fmt: skip
    chaos = parser.add_argument_group("chaos-db")
    chaos.add_argument(
        "--pause", type=float, default=5.0,
        help="seconds between the chaos mix's steps (0.5-30, default 5: about 20 s in all)",
    )  # fmt: skip
    return parser


# --------------------------------------------------------------------------------------------------
# serve


class _Terminated(Exception):
    """SIGTERM, turned into an exception so that the clean-up code runs."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def serve(settings: Settings) -> int:
    """Start the embedded database if needed, the app, and uvicorn; clean up on Ctrl-C."""
    # uvicorn handles SIGINT/SIGTERM for a graceful shutdown, then re-raises the signal with the
    # handler that was there before it: ours, so that the finally blocks below run either way.
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        sock = _listen(settings.host, settings.port)
    except OSError as exc:
        print(f"demo: cannot listen on {settings.host}:{settings.port}: {exc.strerror}",
              file=sys.stderr)  # fmt: skip
        return 1
    embedded = None
    patroni = None
    telemetry = None
    try:
        if settings.patroni:
            patroni = _start_patroni(settings.patroni_route)
            if patroni is None:
                return 1
            settings = settings.replace(database_url=patroni.url("asyncpg"))
        elif settings.database_url is None:
            embedded = _start_embedded(settings.standby)
            if embedded is None:
                return 1
            settings = settings.replace(database_url=embedded.url("asyncpg"))
        import uvicorn

        from .app import create_app
        from .telemetry import install

        telemetry = install(settings)
        port = sock.getsockname()[1]
        app = create_app(
            settings,
            database=embedded,
            patroni=patroni,
            on_ready=lambda: _print_banner(settings, port, embedded, patroni),
        )
        config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="on",
            # Ctrl-C / SIGTERM: in-flight requests get this long to finish, then the lifespan
            # gives checked-out connections as long again (fault_tolerant_pool.shutdown)
            timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout)),
        )
        uvicorn.Server(config).run(sockets=[sock])
    except (KeyboardInterrupt, _Terminated):
        pass
    finally:
        sock.close()
        if telemetry is not None:
            telemetry.shutdown()
        if embedded is not None:
            embedded.destroy()
        if patroni is not None:
            patroni.destroy()
    if patroni is not None:
        print("demo stopped (Patroni cluster stopped and deleted)", flush=True)
        return 0
    print("demo stopped" + (" (embedded PostgreSQL deleted)" if embedded is not None else ""),
          flush=True)  # fmt: skip
    return 0


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _start_embedded(standby: bool) -> Any:
    from fault_tolerant_pool.testing import ServerUnavailable

    from .embedded import EmbeddedDatabase

    what = "a throwaway PostgreSQL" + (" and a streaming standby" if standby else "")
    print(f"starting {what} (no DATABASE_URL given) ...", flush=True)
    try:
        database = EmbeddedDatabase(make_standby=standby)
    except ServerUnavailable as exc:
        print(
            f"demo: {exc}\n"
            "Install PostgreSQL (bash scripts/demo.sh does it on Debian) or set DATABASE_URL.",
            file=sys.stderr,
        )
        return None
    try:
        database.start()
    except BaseException:
        database.destroy()
        raise
    return database


def _start_patroni(route: str) -> Any:
    from fault_tolerant_pool.testing import ServerUnavailable

    from .patroni import PatroniDemo

    print("starting a throwaway Patroni cluster (etcd, two Patroni nodes, HAProxy; about 10 s) ...",
          flush=True)  # fmt: skip
    try:
        cluster = PatroniDemo(route="multihost" if route == "multihost" else "haproxy")
    except ServerUnavailable as exc:
        print(
            f"demo: {exc}\nbash scripts/demo.sh --patroni installs them on Debian (as root).",
            file=sys.stderr,
        )
        return None
    try:
        cluster.start()
    except BaseException:
        cluster.destroy()
        raise
    return cluster


def _patroni_lines(patroni: Any) -> list[str]:
    cluster = patroni.cluster
    nodes = ", ".join(
        f"{node.name} on 127.0.0.1:{node.pg_port}"
        + (" (leader)" if node.name == patroni.leader else "")
        for node in cluster.nodes
    )
    if patroni.route == "multihost":
        route = (
            "a multi-host URL over the nodes' ports ("
            + ", ".join(f"127.0.0.1:{node.port}" for node in cluster.nodes)
            + "), target_session_attrs=read-write"
        )
    else:
        route = f"HAProxy's read-write port 127.0.0.1:{cluster.haproxy_port} (routes to the leader)"
    return [
        f"  database   throwaway Patroni cluster (data in {cluster.workdir}, deleted on exit)",
        f"  nodes      {nodes}",
        f"  engine     through {route}",
    ]


def _reads_line(settings: Settings, embedded: Any) -> str | None:
    """Where GET /notes/ reads (ports only: a reader URL may hold a password)."""
    if settings.read_urls:
        ports = ", ".join(f":{url.port or 5432}" for url in settings.reader_urls)
        return f"GET /notes/ on the read replicas of DEMO_READ_URLS ({ports}), a ReplicaRouter"
    if embedded is not None and embedded.can_fail_over:
        return (
            "GET /notes/ on the standby through a ReplicaRouter over both servers' own URLs "
            "(on the writer while no standby is in rotation)"
        )
    return None


def _print_banner(settings: Settings, port: int, embedded: Any, patroni: Any = None) -> None:
    host = settings.host if settings.host not in ("0.0.0.0", "::") else "127.0.0.1"
    base = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    url = settings.url
    pool = "FaultTolerantNullPool" if settings.pool == "null" else "FaultTolerantQueuePool"
    if embedded is not None:
        database = (
            f"embedded PostgreSQL on 127.0.0.1:{embedded.server.port} "
            f"(throwaway, data in {embedded.server.workdir}, deleted on exit)"
        )
        if embedded.no_standby_reason is not None:
            database += f"\n  standby    none: {embedded.no_standby_reason}"
        if embedded.standby is not None:
            database += (
                f"\n  standby    streaming hot standby on 127.0.0.1:{embedded.standby.port} "
                "(the engine's URL lists both, target_session_attrs=read-write)"
            )
    else:
        database = url.render_as_string(hide_password=True)
    lines = [
        "",
        "fault_tolerant_pool demo",
        *(_patroni_lines(patroni) if patroni is not None else [f"  database   {database}"]),
        f"  pool       {pool} ({url.get_driver_name()}, "
        f"retry_deadline={settings.retry_deadline:g}s)",
        f"  page       {base}/",
        f"  endpoints  {base}/pg_version/  {base}/notes/  {base}/health  {base}/metrics  "
        f"{base}/docs",
    ]
    reads = _reads_line(settings, embedded)
    if reads:
        lines.append(f"  reads      {reads}")
    if settings.otlp_endpoint:
        lines.append(f"  traces     OTLP/HTTP to {settings.otlp_endpoint}")
    if embedded is not None:
        restart = "python -m demo restart-db" + (f" --url {base}" if port != 8000 else "")
        lines.append(f"  restart    {restart}   (or the button on the page)")
        if embedded.standby is not None:
            failover = "python -m demo failover-db" + (f" --url {base}" if port != 8000 else "")
            lines.append(f"  failover   {failover}   (or the button on the page)")
        chaos = "python -m demo chaos-db" + (f" --url {base}" if port != 8000 else "")
        lines.append(f"  chaos      {chaos}   (or the button on the page)")
    if patroni is not None:
        lines.append("  faults     the page's buttons: Switch over, Kill the leader's postmaster")
    lines += ["Ctrl-C stops everything.", ""]
    print("\n".join(lines), flush=True)


# --------------------------------------------------------------------------------------------------
# asking the running demo (restart-db, failover-db, rebuild-standby, chaos-db)


def _base_url(url: str | None) -> str:
    """The running demo's address: ``--url``, else this machine's ``$DEMO_PORT`` (8000)."""
    return (url or f"http://127.0.0.1:{os.environ.get('DEMO_PORT') or 8000}").rstrip("/")


def _post(base: str, path: str, action: str) -> tuple[int, dict[str, Any]]:
    """POST an action to the running demo: (status, JSON body); status 0 if nothing answers."""
    request = urllib.request.Request(base + path, method="POST", headers={"X-Demo-Action": action})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read().decode(errors="replace"))
        except ValueError:
            body = {}
        return exc.code, body if isinstance(body, dict) else {}
    except (urllib.error.URLError, OSError) as exc:
        return 0, {"detail": str(exc)}


def _refused(base: str, what: str, status: int, body: dict[str, Any]) -> int:
    if status == 0:
        print(f"demo: no demo answers at {base} ({body.get('detail')}); start it with "
              "python -m demo", file=sys.stderr)  # fmt: skip
    elif status == 404:
        print(f"demo: this demo does not run its own database (DATABASE_URL is set), so it "
              f"cannot {what} it", file=sys.stderr)  # fmt: skip
    else:
        print(f"demo: {what} refused ({status}): {body.get('detail', body)}", file=sys.stderr)
    return 1


def _health(base: str) -> dict[str, Any] | None:
    """The running demo's ``/health``; None if it does not answer."""
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=10) as response:
            health: dict[str, Any] = json.load(response)
    except (urllib.error.URLError, OSError):
        return None
    return health


def _wait_health(
    base: str,
    done: Callable[[dict[str, Any]], bool],
    timeout: float,
    failed: str,
    timed_out: str | None = None,
) -> dict[str, Any] | None:
    """Poll ``/health`` until ``done(its database part)``; the whole answer.

    If the database fails first, or ``timeout`` seconds pass, say so on stderr (``failed``, or
    ``timed_out`` for the latter if given) and return None.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        health = _health(base)
        if health is None:
            continue
        if health["database"]["state"] == "failed":
            print(f"demo: {failed}", file=sys.stderr)
            return None
        if done(health["database"]):
            return health
    print(f"demo: {timed_out or failed}", file=sys.stderr)
    return None


# --------------------------------------------------------------------------------------------------
# restart-db


def restart_db(url: str | None, down_for: float, wait: bool = True) -> int:
    """Ask the running demo to restart its embedded database; wait until it is back."""
    base = _base_url(url)
    request = urllib.request.Request(
        f"{base}/_demo/restart-db?down_for={down_for}",
        method="POST",
        headers={"X-Demo-Action": "restart-db"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            print("demo: this demo does not run its own database (DATABASE_URL is set), so it "
                  "cannot restart it; restart your server yourself", file=sys.stderr)  # fmt: skip
        else:
            print(f"demo: restart refused ({exc.code}): {exc.read().decode(errors='replace')}",
                  file=sys.stderr)  # fmt: skip
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"demo: no demo answers at {base} ({exc}); start it with python -m demo",
              file=sys.stderr)  # fmt: skip
        return 1
    number = answer["restart"]
    print(f"restart {number}: stopping the embedded PostgreSQL (fast shutdown), "
          f"down for {down_for:g}s ...", flush=True)  # fmt: skip
    if not wait:
        return 0

    def back(database: dict[str, Any]) -> bool:
        restarts = {r["number"]: r for r in database.get("restarts", [])}
        done = restarts.get(number)
        return bool(done and done["started_at"] is not None and database["state"] == "running")

    health = _wait_health(
        base, back, down_for + 60,
        failed="the database failed to start again; see the demo's log",
        timed_out="the database did not come back within a minute",
    )  # fmt: skip
    if health is None:
        return 1
    done = {r["number"]: r for r in health["database"]["restarts"]}[number]
    print(f"back: accepting connections {done['started_at'] - done['stopped_at']:.2f}s "
          f"after the stop. Requests so far: {health['requests']['ok']} ok, "
          f"{health['requests']['unavailable']} answered 503.")  # fmt: skip
    return 0


# --------------------------------------------------------------------------------------------------
# failover-db, rebuild-standby


def failover_db(url: str | None, gap: float, wait: bool = True) -> int:
    """Ask the running demo to fail its embedded database over to the standby."""
    base = _base_url(url)
    status, answer = _post(base, f"/_demo/failover?gap={gap}", "failover")
    if status != 202:
        return _refused(base, "fail over", status, answer)
    number = answer["failover"]
    print(f"failover {number}: 127.0.0.1:{answer['from_port']} turned read-only, promoting "
          f"127.0.0.1:{answer['to_port']} in {gap:g}s ...", flush=True)  # fmt: skip
    if not wait:
        return 0
    health = _wait_health(
        base,
        lambda d: (
            len(d["failovers"]) >= number
            and d["failovers"][number - 1]["promoted_at"] is not None
            and d["state"] == "running"
        ),
        gap + 60,
        failed="the failover did not finish; see the demo's log",
    )
    if health is None:
        return 1
    done = health["database"]["failovers"][number - 1]
    print(f"done: 127.0.0.1:{done['to_port']} is the primary, promoted "
          f"{done['promoted_at'] - done['demoted_at']:.2f}s after the demotion. "
          "python -m demo rebuild-standby makes a new standby.")  # fmt: skip
    return 0


def rebuild_standby(url: str | None, wait: bool = True) -> int:
    """Ask the running demo to replace its demoted server by a fresh standby."""
    base = _base_url(url)
    status, answer = _post(base, "/_demo/rebuild-standby", "rebuild-standby")
    if status != 202:
        return _refused(base, "rebuild the standby of", status, answer)
    port = answer["port"]
    print(f"rebuilding 127.0.0.1:{port} as a standby of 127.0.0.1:{answer['upstream_port']} ...",
          flush=True)  # fmt: skip
    if not wait:
        return 0

    def rebuilt(database: dict[str, Any]) -> bool:
        roles = {s["port"]: s["role"] for s in database["servers"]}
        return roles.get(port) == "standby"

    if _wait_health(base, rebuilt, 60, "the standby was not rebuilt; see the demo's log") is None:
        return 1
    print(f"done: 127.0.0.1:{port} is a standby again; python -m demo failover-db fails back.")
    return 0


# --------------------------------------------------------------------------------------------------
# chaos-db


def chaos_db(url: str | None, pause: float, wait: bool = True) -> int:
    """Ask the running demo for the chaos mix; print each step as it ends, then the outcome."""
    base = _base_url(url)
    status, answer = _post(base, f"/_demo/chaos?pause={pause}", "chaos")
    if status != 202:
        return _refused(base, "run the chaos mix on", status, answer)
    number = answer["chaos"]
    print(f"chaos mix {number} on 127.0.0.1:{answer['port']}: {', '.join(answer['steps'])}, "
          f"{pause:g}s apart ...", flush=True)  # fmt: skip
    if not wait:
        return 0
    reported: set[int] = set()

    def report(database: dict[str, Any]) -> bool:
        chaos = database.get("chaos") or {}
        steps = [s for s in chaos.get("steps", []) if s["run"] == number]
        for step in steps:
            if step["done_at"] is not None and step["step"] not in reported:
                reported.add(step["step"])
                took = step["done_at"] - step["started_at"]
                outcome = step["detail"] or f"failed: {step['error']}"
                print(f"  step {step['step']}/{step['of']} {step['label']}: {outcome} "
                      f"({took:.2f}s)", flush=True)  # fmt: skip
        return not chaos.get("running") and database["state"] == "running"

    failed = "the chaos mix did not finish; see the demo's log"
    if _wait_health(base, report, 4 * pause + 90, failed) is None:
        return 1
    health = _health(base)
    if health is None:
        return 0
    requests, pool = health["requests"], health["pool"]
    print(f"done. Requests so far: {requests['ok']} ok, {requests['unavailable']} answered 503; "
          f"writes run again: {pool.get('transaction_retries', 0)}, outcomes unknown: "
          f"{pool.get('outcomes_unknown', 0)}.")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
