"""A TCP proxy that injects network faults between a client and a server, for failure tests.

The forwarding loop (one selector for every connection) runs in a child process by default, so it
does not compete with the test for the GIL; ``isolated=False`` runs it in a thread of the test
process instead. Faults (refuse, reset, blackhole, latency, a cut on a marker) can be switched from
any thread; each call returns once the loop has applied it, so a test can rely on the fault being
in place.

This file only imports the standard library at the top: the child process runs it as a script.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import queue
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

__all__ = ["FaultProxy"]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

_CHUNK = 65536
#: Bytes buffered in one direction before the proxy stops reading from the sender (backpressure).
_MAX_BUFFERED = 4 * 1024 * 1024
_LINGER_RST = struct.pack("ii", 1, 0)
_COMMAND_TIMEOUT = 10.0


def _close_with_reset(sock: socket.socket) -> None:
    """Close ``sock`` so that the peer gets a TCP RST instead of an orderly FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    sock.close()


class _Flow:
    """One direction of a proxied connection: bytes read from ``src``, waiting to go to ``dst``."""

    __slots__ = ("buffered", "chunks", "dst", "eof", "shut", "src")

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src = src
        self.dst = dst
        self.chunks: deque[tuple[float, bytes]] = deque()  # (time due, data)
        self.buffered = 0
        self.eof = False  # src has sent FIN
        self.shut = False  # we have passed the FIN on to dst


class _Connection:
    """A client connection and, once connected, its upstream connection."""

    __slots__ = ("client", "connecting", "cut_pending", "flows", "masks", "upstream")

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.connecting = False
        #: A forwarding ``cut_on`` fired here: reset at the server's next bytes (its answer).
        self.cut_pending = False
        self.flows: tuple[_Flow, _Flow] | None = None  # (client->upstream, upstream->client)
        self.masks: dict[socket.socket, int] = {}

    def sockets(self) -> list[socket.socket]:
        return [self.client] if self.upstream is None else [self.client, self.upstream]


class _Forwarder:
    """The forwarding loop and the faults in force, run by one thread that owns every socket."""

    def __init__(
        self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.host = host
        self.port = port  # 0 until the first bind, then kept while refusing
        self.target_host = target_host
        self.target_port = target_port
        self.connections_accepted = 0
        self.connections_cut = 0
        self._refusing = False
        self._blackholed = False
        self._latency = 0.0
        self._cut: tuple[bytes, bool] | None = None  # cut_on's (marker, forward) until it fires
        self._conns: dict[socket.socket, _Connection] = {}  # keyed by client socket
        self._flows_waiting: set[_Flow] = set()  # flows holding bytes not yet sent
        self._listener: socket.socket | None = None
        self._selector: selectors.DefaultSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._commands: queue.SimpleQueue[tuple[Callable[[], object], _Reply]] = queue.SimpleQueue()
        self._commands_lock = threading.Lock()
        self._taking_commands = False  # True while the proxy thread runs its loop
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._start_lock = threading.Lock()

    # -- public API --------------------------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        """Client connections currently open through the proxy."""
        return len(self._conns)

    @property
    def faults(self) -> dict[str, object]:
        """The faults in force: ``refusing``, ``blackholed`` and ``latency``."""
        return {
            "refusing": self._refusing,
            "blackholed": self._blackholed,
            "latency": self._latency,
        }

    def start(self) -> _Forwarder:
        """Open the listening socket and start the forwarding thread."""
        with self._start_lock:
            if self._thread is not None:
                raise RuntimeError("proxy already started")
            self._selector = selectors.DefaultSelector()
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            self._selector.register(self._wake_r, selectors.EVENT_READ, None)
            self._stopping = False
            self._open_listener()
            self._taking_commands = True
            self._thread = threading.Thread(
                target=self._run, name=f"FaultProxy:{self.port}->{self.target_port}", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Close every connection and the listener, and end the forwarding thread."""
        with self._start_lock:
            thread = self._thread
            if thread is None:
                return
            self._call(self._begin_stop)
            thread.join(_COMMAND_TIMEOUT)
            self._thread = None

    def healthy(self) -> None:
        """Clear every fault: accept (on the same port), forward, no added latency, no cut."""

        def apply() -> None:
            self._refusing = False
            self._blackholed = False
            self._latency = 0.0
            self._cut = None
            for conn in self._conns.values():
                conn.cut_pending = False
            self._open_listener()
            self._resume_all()

        self._call(apply)

    def refuse(self) -> None:
        """Close the listening socket: new connections get ECONNREFUSED; open ones carry on."""

        def apply() -> None:
            self._refusing = True
            self._close_listener()

        self._call(apply)

    def reset(self) -> int:
        """Send a TCP RST to both ends of every open connection; returns how many were reset."""

        def apply() -> int:
            conns = list(self._conns.values())
            for conn in conns:
                self._drop(conn, reset=True)
            return len(conns)

        return self._call(apply)

    def blackhole(self) -> None:
        """Stop forwarding anything, on open and new connections alike, without closing them."""

        def apply() -> None:
            self._blackholed = True
            for conn in list(self._conns.values()):
                self._update(conn)

        self._call(apply)

    def latency(self, seconds: float) -> None:
        """Delay every chunk read from now on by ``seconds`` in each direction."""
        if seconds < 0:
            raise ValueError("latency must be >= 0")

        def apply() -> None:
            self._latency = float(seconds)

        self._call(apply)

    def set_target(self, host: str, port: int) -> None:
        """Send new connections to another server (open ones stay), e.g. to mimic a failover."""

        def apply() -> None:
            self.target_host = host
            self.target_port = port

        self._call(apply)

    def cut_on(self, marker: bytes, *, forward: bool) -> None:
        """Arm a one-shot cut: see :meth:`FaultProxy.cut_on`."""
        marker = _check_marker(marker)
        if not isinstance(forward, bool):
            raise TypeError(f"forward must be True or False, got {forward!r}")

        def apply() -> None:
            self._cut = (marker, forward)

        self._call(apply)

    # -- commands from other threads ---------------------------------------------------------------

    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on the proxy thread (or here if it is not running); return its result."""
        with self._commands_lock:
            if not self._taking_commands or threading.current_thread() is self._thread:
                return fn()
            reply = _Reply()
            self._commands.put((fn, reply))
            assert self._wake_w is not None
            with contextlib.suppress(BlockingIOError):  # a full pipe already means "wake up"
                self._wake_w.send(b"x")
        return reply.wait(_COMMAND_TIMEOUT)  # type: ignore[return-value]

    def _run_commands(self) -> None:
        while True:
            try:
                fn, reply = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                reply.set(fn(), None)
            except BaseException as exc:
                reply.set(None, exc)

    # -- the forwarding thread ---------------------------------------------------------------------

    def _run(self) -> None:
        selector = self._selector
        assert selector is not None
        try:
            while not self._stopping:
                for key, mask in selector.select(self._timeout()):
                    if key.fileobj is self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            while self._wake_r.recv(4096):
                                pass
                    elif key.fileobj is self._listener:
                        self._accept()
                    else:
                        conn = key.data
                        sock = key.fileobj
                        assert isinstance(conn, _Connection) and isinstance(sock, socket.socket)
                        if conn.client in self._conns:  # not dropped earlier in this batch
                            self._guarded(conn, self._on_ready, conn, sock, mask)
                self._run_commands()
                if not self._blackholed:
                    for flow in list(self._flows_waiting):
                        conn = self._owner(flow)
                        if conn is not None:
                            self._guarded(conn, self._flush_and_update, conn, flow)
        except Exception:
            _log.exception("fault proxy thread crashed")
        finally:
            with self._commands_lock:
                self._taking_commands = False
                self._close_everything()
                self._run_commands()  # answer whoever asked meanwhile

    def _timeout(self) -> float | None:
        """Seconds until the next delayed chunk is due, or None when nothing waits."""
        if self._blackholed or not self._flows_waiting:
            return None
        due = min((flow.chunks[0][0] for flow in self._flows_waiting if flow.chunks), default=None)
        return None if due is None else max(0.0, due - time.monotonic())

    def _guarded(self, conn: _Connection, action: Callable[..., None], *args: object) -> None:
        """Run an I/O action for ``conn``; a socket error on either side resets both."""
        try:
            action(*args)
        except OSError:
            self._drop(conn, reset=True)

    def _owner(self, flow: _Flow) -> _Connection | None:
        conn = self._conns.get(flow.src) or self._conns.get(flow.dst)
        if conn is None:
            self._flows_waiting.discard(flow)
        return conn

    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None
        while True:
            try:
                client, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                _log.exception("fault proxy accept failed")
                return
            self.connections_accepted += 1
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(client)
            self._conns[client] = conn
            if not self._blackholed:
                self._guarded(conn, self._connect_upstream, conn)
            if client in self._conns:
                self._update(conn)

    def _connect_upstream(self, conn: _Connection) -> None:
        family, _, _, _, address = socket.getaddrinfo(
            self.target_host, self.target_port, type=socket.SOCK_STREAM
        )[0]
        upstream = socket.socket(family, socket.SOCK_STREAM)
        conn.upstream = upstream
        upstream.setblocking(False)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = upstream.connect_ex(address)
        if err == 0:
            self._connected(conn)
        elif err == errno.EINPROGRESS:
            conn.connecting = True
        else:
            raise OSError(err, "upstream connect failed")

    def _connected(self, conn: _Connection) -> None:
        assert conn.upstream is not None
        conn.connecting = False
        conn.flows = (_Flow(conn.client, conn.upstream), _Flow(conn.upstream, conn.client))

    def _on_ready(self, conn: _Connection, sock: socket.socket, mask: int) -> None:
        if conn.connecting:
            if sock is conn.upstream and mask & selectors.EVENT_WRITE:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, "upstream connect failed")
                self._connected(conn)
                self._update(conn)
            return
        if conn.flows is None:
            return
        outgoing, incoming = conn.flows if sock is conn.client else conn.flows[::-1]
        if mask & selectors.EVENT_READ:
            data = sock.recv(_CHUNK)
            if conn.cut_pending and sock is conn.upstream:
                # The server answered the data that fired a forwarding cut_on (a client waits
                # for each answer before it sends more, so these bytes are that answer): the
                # server has acted on it (e.g. committed); the client must never learn it.
                self._cut_connection(conn)
                return
            if data and sock is conn.client and self._cut is not None and self._cut[0] in data:
                # One read holds the whole marker in practice: it sits in one small message (a
                # Query of a dozen bytes for COMMIT) written by one send() on a TCP_NODELAY
                # socket, and the client waited for the previous answer first, so nothing it
                # sent earlier can end a 64 KiB read in the middle of it.
                forward = self._cut[1]
                self._cut = None  # one-shot
                if not forward:
                    self._cut_connection(conn)  # the server never sees the data
                    return
                conn.cut_pending = True
            if data:
                outgoing.chunks.append((time.monotonic() + self._latency, data))
                outgoing.buffered += len(data)
            else:
                outgoing.eof = True
            self._flush(conn, outgoing)
        if mask & selectors.EVENT_WRITE and conn.client in self._conns:
            self._flush(conn, incoming)
        if conn.client in self._conns:
            self._update(conn)

    def _flush(self, conn: _Connection, flow: _Flow) -> None:
        """Send ``flow``'s due chunks, then its EOF once drained; drop the connection when done.

        The caller updates the selector registration afterwards (if the connection is still open).
        """
        if self._blackholed:
            return
        chunks = flow.chunks
        if chunks:
            now = time.monotonic()
            while chunks and chunks[0][0] <= now:
                due, data = chunks[0]
                try:
                    sent = flow.dst.send(data)
                except BlockingIOError:
                    break
                flow.buffered -= sent
                if sent < len(data):
                    chunks[0] = (due, data[sent:])
                    break
                chunks.popleft()
        if chunks:
            self._flows_waiting.add(flow)
            return
        self._flows_waiting.discard(flow)
        if flow.eof and not flow.shut:
            flow.shut = True
            flow.dst.shutdown(socket.SHUT_WR)
            assert conn.flows is not None
            if conn.flows[0].shut and conn.flows[1].shut:
                self._drop(conn, reset=False)

    def _flush_and_update(self, conn: _Connection, flow: _Flow) -> None:
        self._flush(conn, flow)
        if conn.client in self._conns:
            self._update(conn)

    def _update(self, conn: _Connection) -> None:
        """Register each socket of ``conn`` for exactly the events it should wait for now."""
        client_mask = upstream_mask = 0
        if conn.connecting:
            upstream_mask = selectors.EVENT_WRITE
        elif conn.flows is not None and not self._blackholed:
            to_upstream, to_client = conn.flows
            if not to_upstream.eof and to_upstream.buffered < _MAX_BUFFERED:
                client_mask = selectors.EVENT_READ
            if not to_client.eof and to_client.buffered < _MAX_BUFFERED:
                upstream_mask = selectors.EVENT_READ
            if to_upstream.chunks or to_client.chunks:
                now = time.monotonic()
                if to_upstream.chunks and to_upstream.chunks[0][0] <= now:
                    upstream_mask |= selectors.EVENT_WRITE
                if to_client.chunks and to_client.chunks[0][0] <= now:
                    client_mask |= selectors.EVENT_WRITE
        self._register(conn, conn.client, client_mask)
        if conn.upstream is not None:
            self._register(conn, conn.upstream, upstream_mask)

    def _register(self, conn: _Connection, sock: socket.socket, mask: int) -> None:
        old = conn.masks.get(sock, 0)
        if old == mask:
            return
        selector = self._selector
        assert selector is not None
        if not old:
            selector.register(sock, mask, conn)
        elif not mask:
            selector.unregister(sock)
        else:
            selector.modify(sock, mask, conn)
        conn.masks[sock] = mask

    def _cut_connection(self, conn: _Connection) -> None:
        """Reset both ends of ``conn`` for a ``cut_on``, dropping whatever it had buffered."""
        self.connections_cut += 1
        self._drop(conn, reset=True)

    def _resume_all(self) -> None:
        """After a blackhole: connect the connections that arrived meanwhile, forward again."""
        for conn in list(self._conns.values()):
            if conn.upstream is None:
                self._guarded(conn, self._connect_upstream, conn)
            if conn.client in self._conns:
                self._update(conn)

    def _drop(self, conn: _Connection, *, reset: bool) -> None:
        """Forget ``conn`` and close both its sockets (with an RST when ``reset``)."""
        selector = self._selector
        assert selector is not None
        self._conns.pop(conn.client, None)
        if conn.flows is not None:
            for flow in conn.flows:
                self._flows_waiting.discard(flow)
        for sock in conn.sockets():
            if conn.masks.get(sock):
                with contextlib.suppress(KeyError, ValueError):
                    selector.unregister(sock)
            if reset:
                _close_with_reset(sock)
            else:
                sock.close()
        conn.masks.clear()

    def _open_listener(self) -> None:
        if self._listener is not None or self._refusing or self._selector is None:
            return
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self.port))
            listener.listen(512)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._selector.register(listener, selectors.EVENT_READ, None)

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(listener)
        listener.close()

    def _begin_stop(self) -> None:
        self._stopping = True

    def _close_everything(self) -> None:
        for conn in list(self._conns.values()):
            self._drop(conn, reset=False)
        self._flows_waiting.clear()
        self._close_listener()
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._wake_r = self._wake_w = None
        if self._selector is not None:
            self._selector.close()
            self._selector = None


def _check_marker(marker: object) -> bytes:
    if not isinstance(marker, bytes | bytearray) or not marker:
        raise TypeError(f"marker must be non-empty bytes, got {marker!r}")
    return bytes(marker)


class _Reply:
    """The result of a command run on the proxy thread, handed back to the calling thread."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._value: object = None
        self._error: BaseException | None = None

    def set(self, value: object, error: BaseException | None) -> None:
        self._value, self._error = value, error
        self._done.set()

    def wait(self, timeout: float) -> object:
        if not self._done.wait(timeout):
            raise TimeoutError(f"fault proxy did not answer within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._value


# --------------------------------------------------------------------------------------------------
# The forwarding loop in a child process.

#: What the parent may ask the child (arguments travel as JSON: a marker as hex); ``stats``
#: answers (connections_accepted, open_connections, connections_cut).
_OPERATIONS: dict[str, Callable[..., Any]] = {
    "healthy": _Forwarder.healthy,
    "refuse": _Forwarder.refuse,
    "reset": _Forwarder.reset,
    "blackhole": _Forwarder.blackhole,
    "latency": _Forwarder.latency,
    "set_target": _Forwarder.set_target,
    "cut_on": lambda fwd, marker, forward: fwd.cut_on(bytes.fromhex(marker), forward=forward),
    "stats": lambda fwd: [fwd.connections_accepted, fwd.open_connections, fwd.connections_cut],
}
_REMOTE_ERRORS: dict[str, type[Exception]] = {
    "ValueError": ValueError,
    "TypeError": TypeError,
    "OSError": OSError,
    "TimeoutError": TimeoutError,
}


def _serve(config: dict[str, Any]) -> None:
    """The child process: run a forwarder; answer one JSON line on stdout per line on stdin."""
    fwd = _Forwarder(
        config["target_host"], config["target_port"], host=config["host"], port=config["port"]
    )
    fwd._refusing = config["refusing"]
    fwd._blackholed = config["blackholed"]
    fwd._latency = config["latency"]
    if config.get("cut") is not None:
        marker, forward = config["cut"]
        fwd._cut = (bytes.fromhex(marker), forward)
    out = sys.stdout.buffer
    try:
        fwd.start()
        out.write(json.dumps({"port": fwd.port}).encode() + b"\n")
    except OSError as exc:
        out.write(json.dumps({"error": type(exc).__name__, "message": str(exc)}).encode() + b"\n")
        return
    finally:
        out.flush()
    for line in sys.stdin.buffer:  # until the parent closes stdin (or dies)
        request = json.loads(line)
        try:
            reply = {"result": _OPERATIONS[request["op"]](fwd, *request["args"])}
        except Exception as exc:
            reply = {"error": type(exc).__name__, "message": str(exc)}
        out.write(json.dumps(reply).encode() + b"\n")
        out.flush()
    fwd.stop()


class _Child:
    """The parent's handle on a forwarder running in a child process (JSON lines over pipes)."""

    def __init__(self, config: dict[str, Any]) -> None:
        from .server import registry

        self._lock = threading.Lock()
        self._buffer = b""
        self._proc = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            start_new_session=True,  # not hit by the terminal's Ctrl-C; stdin EOF ends it
        )
        registry.add_proc(self._proc, signal.SIGTERM)
        try:
            self.port = int(self._reply(_COMMAND_TIMEOUT)["port"])
        except BaseException:
            self.close()
            raise

    def call(self, op: str, *args: object) -> Any:
        """Run ``op`` in the child and return its result (re-raising its error)."""
        with self._lock:
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.write(json.dumps({"op": op, "args": list(args)}).encode() + b"\n")
            except BrokenPipeError:
                raise RuntimeError(self._died()) from None
            return self._reply(_COMMAND_TIMEOUT)["result"]

    def _reply(self, timeout: float) -> dict[str, Any]:
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError(f"fault proxy process did not answer within {timeout} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(self._died())
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise _REMOTE_ERRORS.get(reply["error"], RuntimeError)(reply["message"])
        return reply

    def _died(self) -> str:
        code = self._proc.wait(timeout=5)
        return f"fault proxy process exited with code {code} (its stderr is the test's stderr)"

    def close(self, timeout: float = 10.0) -> None:
        """Close the child's stdin (it then closes every connection and exits) and reap it."""
        from .server import registry, terminate

        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            terminate(self._proc, signal.SIGTERM, timeout=timeout)
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        registry.discard_proc(self._proc)


# --------------------------------------------------------------------------------------------------
# The public face.


class FaultProxy:
    """Forwards TCP connections from ``host:port`` (127.0.0.1, a free port) to a target server.

    The port is chosen when the proxy is made and stays the same across ``refuse()``/``healthy()``
    and restarts. Faults combine: ``refuse()`` closes the listening socket (clients get
    ECONNREFUSED), ``blackhole()`` stops all forwarding (new connections are accepted, then
    hang), ``latency(s)`` delays every chunk by ``s`` seconds in each direction, ``reset()`` sends a
    TCP RST on every open connection once, ``cut_on(marker, forward=...)`` resets the one
    connection whose client next sends ``marker`` (e.g. the moment COMMIT is sent). ``healthy()``
    clears every fault.

    With ``isolated`` (the default) the forwarding loop runs in a child process: in a thread, it
    would fight the test's own event loop for the GIL and halve the client's throughput.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        isolated: bool = True,
    ) -> None:
        if not port:
            from .server import free_port

            port = free_port(host)
        self.host = host
        self.port = port
        self.isolated = isolated
        # Holds the faults in force. Without ``isolated`` it is the running forwarder; with it, it
        # never runs and mirrors every change made in the child.
        self._local = _Forwarder(target_host, target_port, host=host, port=port)
        self._child: _Child | None = None
        self._lock = threading.Lock()

    @property
    def target_host(self) -> str:
        """Where new connections go."""
        return self._local.target_host

    @property
    def target_port(self) -> int:
        """Where new connections go."""
        return self._local.target_port

    @property
    def faults(self) -> dict[str, object]:
        """The faults in force: ``refusing``, ``blackholed`` and ``latency``."""
        return self._local.faults

    @property
    def connections_accepted(self) -> int:
        """Client connections accepted since the proxy started."""
        return (
            int(self._child.call("stats")[0]) if self._child else self._local.connections_accepted
        )

    @property
    def open_connections(self) -> int:
        """Client connections currently open through the proxy."""
        return int(self._child.call("stats")[1]) if self._child else self._local.open_connections

    @property
    def connections_cut(self) -> int:
        """Connections reset by :meth:`cut_on` since the proxy started."""
        return int(self._child.call("stats")[2]) if self._child else self._local.connections_cut

    @property
    def is_running(self) -> bool:
        """Whether the proxy has been started and not stopped."""
        return self._child is not None or self._local._thread is not None

    def start(self) -> FaultProxy:
        """Start forwarding (in a child process, or a thread without ``isolated``)."""
        with self._lock:
            if self.is_running:
                raise RuntimeError("proxy already started")
            if not self.isolated:
                self._local.start()
                return self
            local = self._local
            config = {"host": self.host, "port": self.port, **local.faults}
            config.update(target_host=local.target_host, target_port=local.target_port)
            config["cut"] = None if local._cut is None else [local._cut[0].hex(), local._cut[1]]
            self._child = _Child(config)
        return self

    def stop(self) -> None:
        """Close every connection and the listener, and end the forwarding loop.

        An armed :meth:`cut_on` is disarmed (in the child it may have fired meanwhile, which
        the local copy cannot know: a restart must not arm it again).
        """
        with self._lock:
            if self._child is not None:
                child, self._child = self._child, None
                child.close()
            else:
                self._local.stop()
            self._local._cut = None

    def healthy(self) -> None:
        """Clear every fault: accept (on the same port), forward, no added latency, no cut."""
        self._apply("healthy")

    def refuse(self) -> None:
        """Close the listening socket: new connections get ECONNREFUSED; open ones carry on."""
        self._apply("refuse")

    def reset(self) -> int:
        """Send a TCP RST to both ends of every open connection; returns how many were reset."""
        return int(self._apply("reset"))

    def blackhole(self) -> None:
        """Stop forwarding anything, on open and new connections alike, without closing them."""
        self._apply("blackhole")

    def latency(self, seconds: float) -> None:
        """Delay every chunk read from now on by ``seconds`` in each direction."""
        self._apply("latency", float(seconds))

    def set_target(self, host: str, port: int) -> None:
        """Send new connections to another server (open ones stay), e.g. to mimic a failover."""
        self._apply("set_target", host, int(port))

    def cut_on(self, marker: bytes, *, forward: bool) -> None:
        """Reset the connection whose client next sends data containing ``marker``, once.

        The first client-to-server read containing ``marker`` (e.g. ``b"COMMIT"``, which
        psycopg and asyncpg send as a simple Query message), on any connection, fires it: a
        TCP RST to both ends. With ``forward=False`` that data is dropped: the server never
        sees it (a COMMIT: the server rolls the transaction back when the session ends). With
        ``forward=True`` the data reaches the server and the reset comes when the server
        answers, the answer discarded: the server has acted on it (it committed), the client
        never learns. This makes a failure while COMMIT is in flight happen exactly there, in
        both of its outcomes, which no timing of :meth:`reset` can.

        It fires once, then disarms (:attr:`connections_cut` counts the resets); ``healthy()``
        and ``stop()`` disarm it, and ``healthy()`` also lets a ``forward=True`` connection still
        waiting for its answer receive it. Arming again replaces an armed cut.
        """
        checked = _check_marker(marker)
        if not isinstance(forward, bool):
            raise TypeError(f"forward must be True or False, got {forward!r}")
        self._apply("cut_on", checked.hex(), forward)

    def _apply(self, op: str, *args: object) -> Any:
        result = _OPERATIONS[op](self._local, *args)  # validates; the local state mirrors
        child = self._child
        return child.call(op, *args) if child is not None else result

    def __enter__(self) -> FaultProxy:
        if not self.is_running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        mode = "process" if self.isolated else "thread"
        return (
            f"<FaultProxy {self.host}:{self.port} -> {self.target_host}:{self.target_port} "
            f"{mode} {self.faults}>"
        )


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
