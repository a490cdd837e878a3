"""A throwaway PostgreSQL server run as a direct child process, for tests that need a real database.

Every server is a copy of one template cluster (made by ``initdb`` once per process), listens on
127.0.0.1 on its own free port, and can be stopped, killed and restarted precisely because it is a
child of the test process rather than a daemon.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, TypeVar
from urllib.parse import quote

__all__ = [
    "PostgresServer",
    "PsqlError",
    "ServerError",
    "ServerUnavailable",
    "StopMode",
    "find_postgres_bindir",
]

StopMode = Literal["smart", "fast", "immediate"]

#: Signal the postmaster takes for each shutdown mode (see PostgreSQL's "Shutting Down the Server").
_STOP_SIGNALS: dict[str, signal.Signals] = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}

#: What the log says once a server accepts connections: a primary, then a hot standby.
_READY_MARKERS = ("ready to accept connections", "ready to accept read-only connections")
_LOG_TAIL_LINES = 30


class ServerUnavailable(RuntimeError):
    """The binaries (or the OS user) needed to run a test server are missing on this machine."""


class ServerError(RuntimeError):
    """A test server failed to initialise, start or stop; the message ends with its log's tail."""


class PsqlError(RuntimeError):
    """``psql`` reported an error; ``stderr`` holds its message."""

    def __init__(self, message: str, stderr: str) -> None:
        super().__init__(message)
        self.stderr = stderr


# --------------------------------------------------------------------------------------------------
# Process plumbing shared with the PgBouncer wrapper.


@dataclass(frozen=True)
class RunAs:
    """The OS account a server process runs as; ``None`` ids mean "the current user"."""

    uid: int | None = None
    gid: int | None = None

    def popen_kwargs(self) -> dict[str, object]:
        """Keyword arguments for ``subprocess.Popen`` that switch to this account."""
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def chown(self, path: Path) -> None:
        """Give ``path`` (recursively) to this account, so the server can use it."""
        if self.uid is None or self.gid is None:
            return
        uid, gid = self.uid, self.gid
        os.chown(path, uid, gid)
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                os.lchown(os.path.join(root, name), uid, gid)


def run_as(os_user: str = "postgres") -> RunAs:
    """The account to run servers as: ``os_user`` when we are root (they refuse root), else us."""
    if os.geteuid() != 0:
        return RunAs()
    try:
        entry = pwd.getpwnam(os_user)
    except KeyError:
        raise ServerUnavailable(
            f"running as root, but there is no OS user {os_user!r} to run the server as "
            "(PostgreSQL and PgBouncer refuse to run as root)"
        ) from None
    return RunAs(entry.pw_uid, entry.pw_gid)


#: Free space /dev/shm needs before servers are put there rather than in the default temp dir.
_SHM_MIN_FREE = 2 * 1024**3


def temp_root() -> str | None:
    """Where server directories go: ``$FTP_TESTING_TMPDIR``, else a roomy /dev/shm, else $TMPDIR.

    A cluster is a thousand small files; creating them in memory (tmpfs) takes a few milliseconds
    where a disk-backed /tmp has been measured at 0.2-0.8 s. Containers often give /dev/shm only
    64 MB, hence the free-space check.
    """
    if env := os.environ.get("FTP_TESTING_TMPDIR"):
        return env
    try:
        shm = os.statvfs("/dev/shm")
    except OSError:
        return None
    if shm.f_bavail * shm.f_frsize >= _SHM_MIN_FREE and os.access("/dev/shm", os.W_OK):
        return "/dev/shm"
    return None


def make_workdir(prefix: str, owner: RunAs) -> Path:
    """A fresh private temporary directory owned by ``owner`` (pytest's tmp_path is 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=temp_root()))
    owner.chown(path)
    return path


_port_lock = threading.Lock()
_ports_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now, never the same one twice in this process."""
    with _port_lock:
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((host, 0))
                port: int = sock.getsockname()[1]
            if port not in _ports_handed_out:
                _ports_handed_out.add(port)
                return port
    raise ServerError("could not find a free TCP port")


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file, or a note that it is missing."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


class LogWatcher:
    """Reads a growing log file from a given offset and tells whether a marker has appeared."""

    def __init__(self, path: Path, offset: int) -> None:
        self._path = path
        self._offset = offset
        self._text = ""

    def seen(self, marker: str) -> bool:
        """Whether ``marker`` has been written since the offset."""
        try:
            with self._path.open("rb") as log:
                log.seek(self._offset)
                chunk = log.read()
        except OSError:
            return False
        self._offset += len(chunk)
        self._text += chunk.decode("utf-8", errors="replace")
        return marker in self._text


def log_size(path: Path) -> int:
    """The current size of a log file (0 if it does not exist yet)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def wait_for_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Reap ``proc`` within ``timeout`` seconds; whether it exited."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def kill_group(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGKILL ``proc`` and every process of its process group, reap it, and wait for the rest."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _group_alive(proc.pid):
        time.sleep(0.005)


def crash_postmaster(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGKILL all children of a postmaster at once; wait for it to exit (restart_after_crash off).

    The postmaster is stopped (SIGSTOP) meanwhile, so it neither forks nor warns the other
    backends before all of them are dead; afterwards it reaps them itself, leaving no zombie.
    """
    try:
        os.kill(proc.pid, signal.SIGSTOP)
    except ProcessLookupError:
        proc.wait(timeout=timeout)
        return
    try:
        children = _children(proc.pid)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not children:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
    if not wait_for_exit(proc, timeout):
        kill_group(proc)


def terminate(proc: subprocess.Popen[bytes], sig: signal.Signals, timeout: float) -> None:
    """Send ``sig`` and reap; SIGKILL the process group if it has not exited within ``timeout``."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    if not wait_for_exit(proc, timeout):
        kill_group(proc)


def _proc_stats() -> list[tuple[int, str, int, int]]:
    """(pid, state, ppid, pgrp) of every process, read from /proc."""
    stats = []
    for path in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(path, "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        stats.append((int(path.split("/")[2]), fields[0].decode(), int(fields[1]), int(fields[2])))
    return stats


def _children(pid: int) -> list[int]:
    """The live child processes of ``pid``."""
    return [p for p, state, ppid, _ in _proc_stats() if ppid == pid and state != "Z"]


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in process group ``pgid``."""
    return any(pgrp == pgid and state != "Z" for _, state, _, pgrp in _proc_stats())


class _Registry:
    """Everything still running or on disk, so that interpreter exit leaves nothing behind."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: dict[subprocess.Popen[bytes], signal.Signals] = {}
        self._dirs: set[Path] = set()
        self._registered = False

    def _ensure_hook(self) -> None:
        if not self._registered:
            atexit.register(self.cleanup)
            self._registered = True

    def add_proc(self, proc: subprocess.Popen[bytes], stop_signal: signal.Signals) -> None:
        """Remember a child; at exit it gets ``stop_signal``, then SIGKILL if it lingers."""
        with self._lock:
            self._ensure_hook()
            self._procs[proc] = stop_signal

    def discard_proc(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._procs.pop(proc, None)

    def add_dir(self, path: Path) -> None:
        with self._lock:
            self._ensure_hook()
            self._dirs.add(path)

    def discard_dir(self, path: Path) -> None:
        with self._lock:
            self._dirs.discard(path)

    def cleanup(self) -> None:
        """Kill every registered process group and remove every registered directory."""
        with self._lock:
            procs, self._procs = list(self._procs.items()), {}
            dirs, self._dirs = list(self._dirs), set()
        for proc, stop_signal in procs:
            with contextlib.suppress(Exception):
                terminate(proc, stop_signal, timeout=5.0)
        for path in dirs:
            shutil.rmtree(path, ignore_errors=True)


registry = _Registry()


# --------------------------------------------------------------------------------------------------
# Binaries and the template cluster.


@functools.cache
def find_postgres_bindir() -> Path:
    """The directory holding ``initdb``, ``postgres`` and ``psql``.

    Looks at ``$PG_BINDIR``, then ``pg_config --bindir``, then ``/usr/lib/postgresql/*/bin``
    (newest version first); raises :class:`ServerUnavailable` when none has the binaries.
    """
    candidates: list[Path] = []
    if env := os.environ.get("PG_BINDIR"):
        candidates.append(Path(env))
    if pg_config := shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out:
                candidates.append(Path(out))
    versioned = glob.glob("/usr/lib/postgresql/*/bin")
    versioned.sort(key=lambda p: _version_key(Path(p).parent.name), reverse=True)
    candidates.extend(Path(p) for p in versioned)
    for bindir in candidates:
        if all(os.access(bindir / exe, os.X_OK) for exe in ("initdb", "postgres", "psql")):
            return bindir
    looked = ", ".join(str(c) for c in candidates) or "nothing found"
    raise ServerUnavailable(
        "PostgreSQL server binaries (initdb, postgres, psql) not found; install them "
        "(Debian: apt-get install postgresql) or set PG_BINDIR. Looked at: " + looked
    )


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


_template_lock = threading.Lock()
_templates: dict[tuple[Path, str, str], Path] = {}


def _template(bindir: Path, owner: RunAs, user: str, password: str) -> Path:
    """The data directory of an initdb'd cluster for ``user``/``password``, one per process."""
    key = (bindir, user, password)
    with _template_lock:
        if key not in _templates:
            _templates[key] = _initdb(bindir, owner, user, password)
        return _templates[key]


def _initdb(bindir: Path, owner: RunAs, user: str, password: str) -> Path:
    workdir = make_workdir("ftp-pg-template-", owner)
    registry.add_dir(workdir)
    pwfile = workdir / "pwfile"
    pwfile.write_text(password + "\n", encoding="utf-8")
    owner.chown(pwfile)
    data = workdir / "data"
    cmd = [
        str(bindir / "initdb"),
        "--pgdata", str(data),
        "--username", user,
        "--pwfile", str(pwfile),
        "--auth-local", "trust",
        "--auth-host", "scram-sha-256",
        "--encoding", "UTF8",
        "--locale", "C",
        "--lc-messages", "C",
        "--no-sync",
        "--no-instructions",
        "--wal-segsize", "1",  # 1 MB WAL segments: a 16 MB smaller template to copy
    ]  # fmt: skip
    env = {**os.environ, "LC_ALL": "C"}
    try:
        result = subprocess.run(
            cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=120,
            **owner.popen_kwargs(),  # type: ignore[call-overload]
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise ServerError(f"initdb timed out after {exc.timeout} s: {' '.join(cmd)}") from exc
    finally:
        pwfile.unlink(missing_ok=True)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        tail = "\n".join(output.splitlines()[-_LOG_TAIL_LINES:])
        raise ServerError(f"initdb failed (exit {result.returncode}):\n{tail}")
    return data


# --------------------------------------------------------------------------------------------------
# The server.


def sqlalchemy_url(
    driver: str | None, user: str, password: str, host: str, port: int, dbname: str
) -> str:
    """A SQLAlchemy URL for PostgreSQL (``driver=None`` gives a plain libpq-style URL)."""
    scheme = "postgresql" if driver is None else f"postgresql+{driver}"
    return f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/" + quote(
        dbname, safe=""
    )


def sql_literal(value: str) -> str:
    """``value`` as an SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def sql_identifier(value: str) -> str:
    """``value`` as a quoted SQL identifier."""
    return '"' + value.replace('"', '""') + '"'


def run_psql(
    bindir: Path,
    sql: str,
    *,
    host: str,
    port: int,
    user: str,
    password: str,
    dbname: str,
    timeout: float,
    header: bool = False,
) -> list[tuple[str, ...]]:
    """Run ``sql`` with the ``psql`` binary over TCP; the rows of its last result as strings.

    Fields are split on tabs and rows on newlines, so values holding those characters come back
    split; NULL reads as an empty string. With ``header``, the first row holds the column names.
    """
    cmd = [
        str(bindir / "psql"), "-X", "-q", "-A", "-F", "\t", "-P", "footer=off",
        "-v", "ON_ERROR_STOP=1",
        "-h", host, "-p", str(port), "-U", user, "-d", dbname,
        "-c", sql,
    ]  # fmt: skip
    if not header:
        cmd.insert(1, "-t")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=password, PGCONNECT_TIMEOUT=str(max(1, int(timeout))), LC_ALL="C")
    try:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise PsqlError(f"psql timed out after {timeout} s running {sql!r}", "") from exc
    if result.returncode != 0:
        stderr = result.stderr.strip()
        raise PsqlError(
            f"psql failed on {host}:{port} as {user!r} running {sql!r}: {stderr}", stderr
        )
    return [tuple(line.split("\t")) for line in result.stdout.splitlines()]


_Service = TypeVar("_Service", bound="ChildService")


class ChildService:
    """The life cycle a server process of the toolkit shares: a direct child, ready once its log
    says so, stopped by a signal, reaped when it exits, destroyed (process and directory) on
    ``destroy()`` or at the end of a ``with``."""

    #: The signal ``destroy()`` stops the process with (the service's "immediate" shutdown).
    destroy_signal: signal.Signals = signal.SIGQUIT
    #: The program, as error messages name it.
    _program: str
    port: int
    workdir: Path
    log_path: Path
    ready_at: float | None
    _log_offset: int  # where the log stood at the last start
    _proc: subprocess.Popen[bytes] | None
    _lock: threading.RLock

    @property
    def is_running(self) -> bool:
        """Whether the process is alive."""
        proc = self._proc
        return proc is not None and proc.poll() is None

    def start(self, wait: bool = True, timeout: float = 30.0) -> None:
        raise NotImplementedError

    def _wait_logged(self, markers: tuple[str, ...], timeout: float) -> float:
        """Wait until the log shows one of ``markers`` since the last start; sets and returns
        ``ready_at``. The process exiting first, or ``timeout`` passing, is a ServerError."""
        proc = self._proc
        if proc is None:
            raise ServerError(f"{self._program} was never started")
        watcher = LogWatcher(self.log_path, self._log_offset)
        deadline = time.monotonic() + timeout
        while True:
            if any(watcher.seen(marker) for marker in markers):
                self.ready_at = time.monotonic()
                return self.ready_at
            if proc.poll() is not None:
                raise ServerError(
                    f"{self._program} on port {self.port} exited with code {proc.returncode} "
                    f"while starting; {self._logs()}"
                )
            if time.monotonic() >= deadline:
                raise ServerError(
                    f"{self._program} on port {self.port} not ready after {timeout} s; "
                    + self._logs()
                )
            time.sleep(0.005)

    def _stop(self, sig: signal.Signals, mode: str, wait: bool, timeout: float) -> None:
        """Send ``sig`` (the shutdown ``mode``); with ``wait``, return once the process has
        exited, or raise ServerError after ``timeout`` seconds."""
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                self._reap()
                return
            proc.send_signal(sig)
            if not wait:
                return
            if not wait_for_exit(proc, timeout):
                raise ServerError(
                    f"{self._program} on port {self.port} did not stop ({mode}) within "
                    f"{timeout} s; " + self._logs()
                )
            self._reap()

    def _logs(self) -> str:
        return f"log tail:\n{log_tail(self.log_path)}"

    def _reap(self) -> None:
        """Forget a process that has exited (collecting its exit status)."""
        proc = self._proc
        if proc is not None and proc.poll() is not None:
            registry.discard_proc(proc)
            self._proc = None

    def destroy(self) -> None:
        """Stop the process (immediately, killing it if needed) and delete its directory."""
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                terminate(proc, self.destroy_signal, timeout=10.0)
            self._reap()
            shutil.rmtree(self.workdir, ignore_errors=True)
            registry.discard_dir(self.workdir)

    def __enter__(self: _Service) -> _Service:
        if not self.is_running:
            try:
                self.start()
            except BaseException:
                self.destroy()
                raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()


class PostgresServer(ChildService):
    """A throwaway PostgreSQL cluster on 127.0.0.1 that a test can stop, kill and restart.

    The port stays the same across restarts, so clients can reconnect to the same URL. Settings are
    passed to ``postgres`` as ``-c key=value``. Use it as a context manager, or call
    :meth:`destroy`; anything left running is killed when the interpreter exits.

    With ``base_backup_of`` (a running server), the data directory is not a copy of the template
    but a ``pg_basebackup -R`` of that server, so this one starts as its hot standby (see
    :meth:`standby`, which also passes that server's user and password: a base backup has its
    roles).
    """

    host = "127.0.0.1"
    dbname = "postgres"
    _program = "postgres"

    def __init__(
        self,
        *,
        user: str = "postgres",
        password: str = "postgres-test-pw",
        max_connections: int = 100,
        settings: Mapping[str, str] | None = None,
        port: int | None = None,
        bindir: Path | str | None = None,
        os_user: str = "postgres",
        base_backup_of: PostgresServer | None = None,
    ) -> None:
        self.bindir = Path(bindir) if bindir is not None else find_postgres_bindir()
        self._owner = run_as(os_user)
        self.os_user = os_user
        self.user = user
        self.password = password
        self.max_connections = max_connections
        self.settings: dict[str, str] = dict(settings or {})
        self.port = port if port is not None else free_port(self.host)
        self.ready_at: float | None = None
        self._lock = threading.RLock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        #: The server this one was made a standby of (``None`` for a fresh cluster).
        self.upstream = base_backup_of
        template = (
            _template(self.bindir, self._owner, user, password) if base_backup_of is None else None
        )
        self.workdir = make_workdir("ftp-pg-", self._owner)
        registry.add_dir(self.workdir)
        self.datadir = self.workdir / "data"
        self.log_path = self.workdir / "postgres.log"
        if base_backup_of is None:
            assert template is not None
            shutil.copytree(template, self.datadir, symlinks=True)
            self._owner.chown(self.datadir)
            return
        try:
            base_backup(base_backup_of, self.datadir, self._owner)
        except BaseException:
            self.destroy()
            raise

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self, wait: bool = True, timeout: float = 30.0) -> None:
        """Start the postmaster; with ``wait``, return once it accepts connections."""
        with self._lock:
            if self.is_running:
                raise ServerError(f"server on port {self.port} is already running")
            self._reap()
            # Our own previous postmaster is dead (we reaped it and its process group), so a
            # leftover lock file can only be stale.
            (self.datadir / "postmaster.pid").unlink(missing_ok=True)
            self._log_offset = log_size(self.log_path)
            self.ready_at = None
            with self.log_path.open("ab") as log:
                self._proc = subprocess.Popen(
                    self._command(),
                    cwd=self.workdir,
                    env={**os.environ, "LC_ALL": "C"},
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # own process group: kill() takes every backend
                    **self._owner.popen_kwargs(),  # type: ignore[call-overload]
                )
            registry.add_proc(self._proc, signal.SIGQUIT)
        if wait:
            self.wait_ready(timeout)

    def _command(self) -> list[str]:
        settings = {
            "listen_addresses": self.host,
            "unix_socket_directories": str(self.workdir),
            "max_connections": str(self.max_connections),
            "fsync": "off",  # the OS survives a kill(), so committed data still does
            "lc_messages": "C",
            "restart_after_crash": "off",  # kill() relies on it
            **self.settings,
        }
        cmd = [str(self.bindir / "postgres"), "-D", str(self.datadir), "-p", str(self.port)]
        for key, value in settings.items():
            cmd += ["-c", f"{key}={value}"]
        return cmd

    def wait_ready(self, timeout: float = 30.0) -> float:
        """Wait until the log says the server accepts connections; sets and returns ``ready_at``."""
        return self._wait_logged(_READY_MARKERS, timeout)

    def stop(self, mode: StopMode = "fast", wait: bool = True, timeout: float = 30.0) -> None:
        """Shut down: ``fast`` (SIGINT), ``smart`` (SIGTERM, waits for clients) or ``immediate``."""
        self._stop(_STOP_SIGNALS[mode], mode, wait, timeout)

    def kill(self) -> None:
        """Crash the server: SIGKILL every server process at once; the next start() recovers.

        The postmaster is paused while its children are killed, so no backend gets a chance to
        say goodbye to its client; then, as ``restart_after_crash`` is off, it reaps them and
        exits. Killing the postmaster itself would orphan its children, and a container's PID 1
        may never reap them.
        """
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                if self._restarts_after_crash():
                    kill_group(proc)
                else:
                    crash_postmaster(proc)
            self._reap()

    def _restarts_after_crash(self) -> bool:
        value = self.settings.get("restart_after_crash", "off").strip().lower()
        return value in ("on", "true", "yes", "1")

    def restart(
        self, mode: StopMode = "fast", down_for: float = 0.0, timeout: float = 30.0
    ) -> None:
        """Stop, stay down for ``down_for`` seconds, start again on the same port."""
        self.stop(mode, timeout=timeout)
        if down_for > 0:
            time.sleep(down_for)
        self.start(timeout=timeout)

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"<PostgresServer {self.host}:{self.port} {state} {self.workdir}>"

    # -- replication and failover ------------------------------------------------------------------

    def standby(
        self,
        *,
        max_connections: int | None = None,
        settings: Mapping[str, str] | None = None,
        port: int | None = None,
        start: bool = True,
        timeout: float = 60.0,
    ) -> PostgresServer:
        """A hot standby streaming from this running server, started (unless ``start=False``).

        Made by ``pg_basebackup -R -X stream`` (fast checkpoint) into its own directory, on its own
        port, with this server's user and password. It inherits ``max_connections`` and
        ``settings`` (a standby needs at least the primary's ``max_connections``) and retries a
        lost primary every 200 ms (``wal_retrieve_retry_interval``; PostgreSQL's default is 5 s),
        so replication resumes promptly after the primary restarts. A restarted standby keeps
        replicating (``standby.signal`` stays); after :meth:`promote` it starts as a primary.
        """
        if not self.is_running:
            raise ServerError(f"server on port {self.port} is not running; cannot back it up")
        merged = {"wal_retrieve_retry_interval": "200ms", **self.settings, **(settings or {})}
        if max_connections is None:
            max_connections = self.max_connections
        standby = PostgresServer(
            user=self.user,
            password=self.password,
            max_connections=max_connections,
            settings=merged,
            port=port,
            bindir=self.bindir,
            os_user=self.os_user,
            base_backup_of=self,
        )
        if start:
            try:
                standby.start(timeout=timeout)
            except BaseException:
                standby.destroy()
                raise
        return standby

    def is_in_recovery(self) -> bool:
        """Whether the server is a standby (``pg_is_in_recovery()``)."""
        return self.execute("SELECT pg_is_in_recovery()") == [("t",)]

    def promote(self, wait: bool = True, timeout: float = 30.0) -> float:
        """Promote this standby to a primary (``pg_promote()``); the seconds it took.

        With ``wait``, returns once the server accepts writes (``pg_is_in_recovery()`` is false
        in a new session); raises :class:`ServerError` if that takes longer than ``timeout``.
        """
        started = time.monotonic()
        if not self.is_in_recovery():
            raise ServerError(f"server on port {self.port} is not a standby; nothing to promote")
        seconds = max(1, int(timeout))
        rows = self.execute(f"SELECT pg_promote(wait => {'true' if wait else 'false'}, "
                            f"wait_seconds => {seconds})")  # fmt: skip
        if wait:
            if rows != [("t",)]:
                raise ServerError(
                    f"server on port {self.port} did not finish promotion within {seconds} s; "
                    f"log tail:\n{log_tail(self.log_path)}"
                )
            self._poll(lambda: not self.is_in_recovery(), "accept writes", started + timeout)
        return time.monotonic() - started

    def set_read_only(self, on: bool = True, timeout: float = 10.0) -> None:
        """Turn the whole server read-only (or writable again) while it stays reachable.

        ``ALTER SYSTEM SET default_transaction_read_only`` and ``pg_reload_conf()``, as an
        operator or Patroni demotes a writer: new sessions start read-only, and existing ones
        turn read-only at their next command (a write then fails with SQLSTATE 25006), which
        PostgreSQL reports to clients as the ``default_transaction_read_only`` parameter status.
        Returns once a new session sees the new value. Survives restarts (it is in
        ``postgresql.auto.conf``); a standby made afterwards inherits it.
        """
        if "default_transaction_read_only" in self.settings:
            raise ServerError(
                "default_transaction_read_only is in this server's settings (a command-line "
                "option, which ALTER SYSTEM cannot override); remove it to use set_read_only()"
            )
        value = "on" if on else "off"
        self.execute(f"ALTER SYSTEM SET default_transaction_read_only = {value}")
        self.execute("SELECT pg_reload_conf()")
        self._poll(
            lambda: self.execute("SHOW default_transaction_read_only") == [(value,)],
            f"turn default_transaction_read_only {value}",
            time.monotonic() + timeout,
        )

    def delay_replay(self, seconds: float, timeout: float = 10.0) -> None:
        """Make this standby apply WAL ``seconds`` late (``recovery_min_apply_delay``; 0 turns
        it off): a replica that lags behind its primary, as under load or a slow disk.

        ``ALTER SYSTEM`` and ``pg_reload_conf()``; returns once a new session sees the value.
        Transactions committed on the primary from then on are replayed here ``seconds`` after
        their commit; the standby keeps answering reads, from an older snapshot.
        """
        if not self.is_in_recovery():
            raise ServerError(f"server on port {self.port} is not a standby; no replay to delay")
        value = f"{round(seconds * 1000)}ms"
        self.execute(f"ALTER SYSTEM SET recovery_min_apply_delay = '{value}'")
        self.execute("SELECT pg_reload_conf()")

        def applied() -> bool:
            shown = self.execute("SHOW recovery_min_apply_delay")[0][0]
            return (shown == "0") == (seconds == 0)

        self._poll(
            applied,
            f"set recovery_min_apply_delay to {value}",
            time.monotonic() + timeout,
        )

    def _poll(self, condition: Callable[[], bool], what: str, deadline: float) -> None:
        while not condition():
            if time.monotonic() >= deadline:
                raise ServerError(
                    f"server on port {self.port} did not {what} in time; "
                    f"log tail:\n{log_tail(self.log_path)}"
                )
            time.sleep(0.01)

    # -- addresses ---------------------------------------------------------------------------------

    def url(
        self,
        driver: str | None = "asyncpg",
        *,
        user: str | None = None,
        password: str | None = None,
        dbname: str | None = None,
        host: str | None = None,
        port: int | None = None,
    ) -> str:
        """A SQLAlchemy URL; ``driver`` e.g. ``asyncpg``, ``psycopg``, ``psycopg_async`` or None.

        ``host`` and ``port`` point it elsewhere with the same credentials, e.g. at a
        :class:`~fault_tolerant_pool.testing.FaultProxy` in front of this server.
        """
        return sqlalchemy_url(
            driver,
            user if user is not None else self.user,
            password if password is not None else self.password,
            host if host is not None else self.host,
            port if port is not None else self.port,
            dbname if dbname is not None else self.dbname,
        )

    def read_log(self) -> str:
        """Everything the server has logged, across restarts."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    # -- SQL ---------------------------------------------------------------------------------------

    def psql(
        self,
        sql: str,
        dbname: str | None = None,
        *,
        user: str | None = None,
        password: str | None = None,
        timeout: float = 30.0,
    ) -> list[tuple[str, ...]]:
        """Run ``sql`` with ``psql`` over TCP (as the superuser by default); rows as str tuples."""
        return run_psql(
            self.bindir,
            sql,
            host=self.host,
            port=self.port,
            user=user if user is not None else self.user,
            password=password if password is not None else self.password,
            dbname=dbname if dbname is not None else self.dbname,
            timeout=timeout,
        )

    def execute(self, sql: str, dbname: str | None = None) -> list[tuple[str, ...]]:
        """Run ``sql`` as the superuser; the rows of its last result."""
        return self.psql(sql, dbname)

    def create_role(
        self, name: str, password: str, connection_limit: int | None = None, superuser: bool = False
    ) -> None:
        """Create a login role with a (SCRAM-hashed) password."""
        sql = f"CREATE ROLE {sql_identifier(name)} LOGIN PASSWORD {sql_literal(password)}"
        if connection_limit is not None:
            sql += f" CONNECTION LIMIT {int(connection_limit)}"
        if superuser:
            sql += " SUPERUSER"
        self.execute(sql)

    def create_database(self, name: str, owner: str | None = None) -> None:
        """Create a database, optionally owned by ``owner``."""
        sql = f"CREATE DATABASE {sql_identifier(name)}"
        if owner is not None:
            sql += f" OWNER {sql_identifier(owner)}"
        self.execute(sql)

    def terminate_backends(self, dbname: str | None = None, user: str | None = None) -> int:
        """``pg_terminate_backend`` every client backend (but our own); how many were terminated."""
        rows = self.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
            + self._client_filter(dbname, user)
        )
        return int(rows[0][0])

    def backend_count(self, dbname: str | None = None, user: str | None = None) -> int:
        """How many client backends are connected (not counting the one asking)."""
        rows = self.execute(
            "SELECT count(*) FROM pg_stat_activity" + self._client_filter(dbname, user)
        )
        return int(rows[0][0])

    @staticmethod
    def _client_filter(dbname: str | None, user: str | None) -> str:
        where = " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        if dbname is not None:
            where += f" AND datname = {sql_literal(dbname)}"
        if user is not None:
            where += f" AND usename = {sql_literal(user)}"
        return where


def base_backup(
    primary: PostgresServer, datadir: Path, owner: RunAs, timeout: float = 120.0
) -> None:
    """``pg_basebackup -R -X stream`` of the running ``primary`` into ``datadir`` (as ``owner``).

    ``-R`` writes ``standby.signal`` and a ``primary_conninfo`` (with the primary's address and
    credentials) into the copy, so a server started on it is a hot standby streaming from the
    primary. The checkpoint is a fast one: a spread checkpoint could take minutes.
    """
    executable = primary.bindir / "pg_basebackup"
    if not os.access(executable, os.X_OK):
        raise ServerUnavailable(
            f"pg_basebackup not found in {primary.bindir} (Debian: apt-get install "
            "postgresql-client); a standby needs it"
        )
    cmd = [
        str(executable),
        "--pgdata", str(datadir),
        "--host", primary.host,
        "--port", str(primary.port),
        "--username", primary.user,
        "--no-password",
        "--write-recovery-conf",
        "--wal-method", "stream",
        "--checkpoint", "fast",
        "--no-sync",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=primary.password, LC_ALL="C")
    try:
        result = subprocess.run(
            cmd, cwd=datadir.parent, env=env, capture_output=True, text=True, timeout=timeout,
            **owner.popen_kwargs(),  # type: ignore[call-overload]
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise ServerError(
            f"pg_basebackup of the server on port {primary.port} timed out after {timeout} s"
        ) from exc
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        raise ServerError(
            f"pg_basebackup of the server on port {primary.port} failed "
            f"(exit {result.returncode}):\n{output}"
        )
