"""A throwaway PgBouncer in front of a test PostgreSQL, run as a direct child process.

Its configuration and user list live in a private temporary directory; it listens on 127.0.0.1
on a free port that stays the same across restarts.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from .server import (
    ChildService,
    PostgresServer,
    ServerError,
    ServerUnavailable,
    find_postgres_bindir,
    free_port,
    kill_group,
    log_size,
    make_workdir,
    registry,
    run_as,
    run_psql,
    sqlalchemy_url,
)

__all__ = ["PgBouncer", "find_pgbouncer"]

BouncerStopMode = Literal["immediate", "safe"]

#: SIGINT is PgBouncer's safe shutdown (PAUSE, then SHUTDOWN); SIGTERM shuts down at once (1.18).
_STOP_SIGNALS = {"safe": signal.SIGINT, "immediate": signal.SIGTERM}
_READY_MARKER = "process up"


def find_pgbouncer() -> Path:
    """The ``pgbouncer`` executable; raises :class:`ServerUnavailable` if it is not installed."""
    for candidate in (
        os.environ.get("PGBOUNCER"),
        shutil.which("pgbouncer"),
        "/usr/sbin/pgbouncer",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise ServerUnavailable(
        "pgbouncer not found; install it (Debian: apt-get install pgbouncer) or set $PGBOUNCER"
    )


def _quote_userlist(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


class PgBouncer(ChildService):
    """PgBouncer on 127.0.0.1 forwarding every database to one PostgreSQL server.

    ``users`` maps user names to plain-text passwords; they go into the ``auth_file``, which lets
    PgBouncer both check clients and log in to a SCRAM server. ``server_login_retry`` defaults to
    1 s for tests (PgBouncer's own default is 15 s: after a failed server login it answers every
    client with an immediate error for that long). ``settings`` adds or overrides lines of the
    ``[pgbouncer]`` section.
    """

    destroy_signal = signal.SIGTERM  # pgbouncer's immediate shutdown
    _program = "pgbouncer"

    host = "127.0.0.1"

    def __init__(
        self,
        server: PostgresServer | None = None,
        *,
        target_host: str | None = None,
        target_port: int | None = None,
        users: Mapping[str, str] | None = None,
        admin_user: str | None = None,
        pool_mode: Literal["session", "transaction", "statement"] = "transaction",
        auth_type: Literal["scram-sha-256", "md5", "plain", "trust"] = "scram-sha-256",
        server_login_retry: float = 1,
        settings: Mapping[str, str] | None = None,
        port: int | None = None,
        executable: Path | str | None = None,
        os_user: str = "postgres",
    ) -> None:
        if server is not None:
            target_host = server.host if target_host is None else target_host
            target_port = server.port if target_port is None else target_port
        if target_host is None or target_port is None:
            raise ValueError("give a PostgresServer or both target_host and target_port")
        self.executable = Path(executable) if executable is not None else find_pgbouncer()
        self._owner = run_as(os_user)
        self.server = server
        self.target_host: str = target_host
        self.target_port: int = target_port
        self.users: dict[str, str] = dict(users or {})
        if server is not None:
            self.users.setdefault(server.user, server.password)
        if not self.users:
            raise ValueError("PgBouncer needs at least one user")
        self.admin_user = admin_user or (server.user if server else next(iter(self.users)))
        self.pool_mode = pool_mode
        self.auth_type = auth_type
        self.server_login_retry = server_login_retry
        self.settings: dict[str, str] = dict(settings or {})
        self.port = port if port is not None else free_port(self.host)
        self.ready_at: float | None = None
        self._lock = threading.RLock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self.workdir = make_workdir("ftp-pgbouncer-", self._owner)
        registry.add_dir(self.workdir)
        self.config_path = self.workdir / "pgbouncer.ini"
        self.userlist_path = self.workdir / "userlist.txt"
        self.log_path = self.workdir / "pgbouncer.log"
        self.write_config()

    # -- configuration -----------------------------------------------------------------------------

    def write_config(self) -> None:
        """(Re)write ``pgbouncer.ini`` and ``userlist.txt``; :meth:`reload` applies changes."""
        options = {
            "listen_addr": self.host,
            "listen_port": str(self.port),
            "unix_socket_dir": str(self.workdir),
            "auth_type": self.auth_type,
            "auth_file": str(self.userlist_path),
            "admin_users": self.admin_user,
            "pool_mode": self.pool_mode,
            "server_login_retry": str(self.server_login_retry),
            "ignore_startup_parameters": "extra_float_digits",
            **self.settings,
        }
        lines = [
            "[databases]",
            f"* = host={self.target_host} port={self.target_port}",
            "",
            "[pgbouncer]",
            *(f"{key} = {value}" for key, value in options.items()),
        ]
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.userlist_path.write_text(
            "".join(
                f"{_quote_userlist(user)} {_quote_userlist(pw)}\n"
                for user, pw in self.users.items()
            ),
            encoding="utf-8",
        )
        for path in (self.config_path, self.userlist_path):
            path.chmod(0o600)
            self._owner.chown(path)

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self, wait: bool = True, timeout: float = 30.0) -> None:
        """Start pgbouncer; with ``wait``, return once it listens."""
        with self._lock:
            if self.is_running:
                raise ServerError(f"pgbouncer on port {self.port} is already running")
            self._reap()
            self._log_offset = log_size(self.log_path)
            self.ready_at = None
            # No ``logfile``: pgbouncer logs to stderr, which (unlike a logfile) also gets the
            # errors it meets before it has read its configuration.
            with self.log_path.open("ab") as log:
                self._proc = subprocess.Popen(
                    [str(self.executable), str(self.config_path)],
                    cwd=self.workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    **self._owner.popen_kwargs(),  # type: ignore[call-overload]
                )
            registry.add_proc(self._proc, signal.SIGTERM)
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 30.0) -> float:
        """Wait until pgbouncer logs that it is up; sets and returns ``ready_at``."""
        return self._wait_logged((_READY_MARKER,), timeout)

    def read_log(self) -> str:
        """Everything pgbouncer has logged, across restarts."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def stop(
        self, mode: BouncerStopMode = "immediate", wait: bool = True, timeout: float = 30.0
    ) -> None:
        """Shut down: ``immediate`` (SIGTERM) or ``safe`` (SIGINT: waits for queries to finish)."""
        self._stop(_STOP_SIGNALS[mode], mode, wait, timeout)

    def kill(self) -> None:
        """SIGKILL pgbouncer, like a crash: clients lose their connections without a word."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            kill_group(proc)
            self._reap()

    def restart(
        self, mode: BouncerStopMode = "immediate", down_for: float = 0.0, timeout: float = 30.0
    ) -> None:
        """Stop, stay down for ``down_for`` seconds, start again on the same port."""
        self.stop(mode, timeout=timeout)
        if down_for > 0:
            time.sleep(down_for)
        self.start(timeout=timeout)

    def reload(self) -> None:
        """Rewrite the configuration files and make pgbouncer re-read them (SIGHUP)."""
        self.write_config()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGHUP)

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return (
            f"<PgBouncer {self.host}:{self.port} -> {self.target_host}:{self.target_port} "
            f"{self.pool_mode} {state}>"
        )

    # -- addresses and the admin console -----------------------------------------------------------

    def url(
        self,
        driver: str | None = "asyncpg",
        *,
        user: str | None = None,
        password: str | None = None,
        dbname: str = "postgres",
    ) -> str:
        """A SQLAlchemy URL through PgBouncer (the user defaults to the admin user)."""
        user = user if user is not None else self.admin_user
        if password is None:
            password = self.users[user]
        return sqlalchemy_url(driver, user, password, self.host, self.port, dbname)

    def psql(
        self,
        sql: str,
        dbname: str = "postgres",
        *,
        user: str | None = None,
        password: str | None = None,
        timeout: float = 30.0,
    ) -> list[tuple[str, ...]]:
        """Run ``sql`` through PgBouncer with ``psql``; rows as tuples of strings."""
        user = user if user is not None else self.admin_user
        return run_psql(
            self.server.bindir if self.server is not None else find_postgres_bindir(),
            sql,
            host=self.host,
            port=self.port,
            user=user,
            password=password if password is not None else self.users[user],
            dbname=dbname,
            timeout=timeout,
        )

    def admin(self, command: str, timeout: float = 30.0) -> list[tuple[str, ...]]:
        """Run a console command (``SHOW POOLS``, ``PAUSE``, ``RESUME``, ``RECONNECT``...)."""
        return self.psql(command, "pgbouncer", timeout=timeout)

    def show(self, what: str, timeout: float = 30.0) -> list[dict[str, str]]:
        """``SHOW <what>`` on the admin console as dicts keyed by column, e.g. ``show("POOLS")``."""
        user = self.admin_user
        header, *rows = run_psql(
            self.server.bindir if self.server is not None else find_postgres_bindir(),
            f"SHOW {what}",
            host=self.host,
            port=self.port,
            user=user,
            password=self.users[user],
            dbname="pgbouncer",
            timeout=timeout,
            header=True,
        )
        return [dict(zip(header, row, strict=True)) for row in rows]
