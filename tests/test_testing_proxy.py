"""The fault-injecting TCP proxy of ``fault_tolerant_pool.testing``, with real sockets."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from fault_tolerant_pool.testing import FaultProxy, PostgresServer, PsqlError
from fault_tolerant_pool.testing.server import run_psql


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        assert isinstance(self.server, _EchoServer)
        while data := self.request.recv(65536):
            self.server.received.append(data)
            self.request.sendall(data)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128  # the default 5 drops SYNs when 100 clients arrive at once

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Echo)
        self.received: list[bytes] = []  # every chunk read, on any connection

    def has_received(self, data: bytes) -> bool:
        return data in b"".join(self.received)


@pytest.fixture
def echo_server() -> Iterator[_EchoServer]:
    """A TCP echo server on 127.0.0.1 that records what it receives."""
    server = _EchoServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def echo_port(echo_server: _EchoServer) -> int:
    """The echo server's port."""
    return int(echo_server.server_address[1])


@pytest.fixture(params=[True, False], ids=["process", "thread"])
def isolated(request: pytest.FixtureRequest) -> bool:
    """Whether the proxy forwards in a child process (the default) or in a thread."""
    return bool(request.param)


@pytest.fixture
def proxy(echo_port: int, isolated: bool) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", echo_port, isolated=isolated) as proxy:
        yield proxy


def connect(proxy: FaultProxy, timeout: float = 2.0) -> socket.socket:
    return socket.create_connection((proxy.host, proxy.port), timeout=timeout)


def echo(sock: socket.socket, data: bytes = b"ping") -> bytes:
    sock.sendall(data)
    received = b""
    while len(received) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_passes_bytes_through_and_counts_connections(proxy: FaultProxy) -> None:
    assert proxy.port != 0
    with connect(proxy) as sock:
        assert echo(sock) == b"ping"
        big = bytes(range(256)) * 8192  # 2 MB, more than any socket buffer
        assert echo(sock, big) == big
        assert proxy.open_connections == 1
    assert proxy.connections_accepted == 1
    assert wait_until(lambda: proxy.open_connections == 0)


def test_handles_a_hundred_concurrent_connections(proxy: FaultProxy) -> None:
    socks = [connect(proxy) for _ in range(100)]
    try:
        for i, sock in enumerate(socks):
            sock.sendall(b"%d" % i)
        assert [sock.recv(16) for sock in socks] == [b"%d" % i for i in range(100)]
        assert proxy.open_connections == 100
    finally:
        for sock in socks:
            sock.close()
    assert wait_until(lambda: proxy.open_connections == 0)


def test_refuse_closes_the_port_until_healthy(proxy: FaultProxy) -> None:
    port = proxy.port
    with connect(proxy) as open_before:
        proxy.refuse()
        with pytest.raises(ConnectionRefusedError):
            connect(proxy)
        assert echo(open_before) == b"ping"  # open connections carry on
        proxy.healthy()
        assert proxy.port == port
        with connect(proxy) as sock:
            assert echo(sock) == b"ping"


def test_reset_sends_rst_to_open_connections_only(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        assert echo(sock) == b"ping"
        assert proxy.reset() == 1
        with pytest.raises(ConnectionResetError):
            sock.sendall(b"x")
            sock.recv(16)
    with connect(proxy) as sock:  # new connections still pass
        assert echo(sock) == b"ping"


def test_blackhole_swallows_everything_until_healthy(proxy: FaultProxy) -> None:
    with connect(proxy, timeout=0.3) as before:
        assert echo(before) == b"ping"
        proxy.blackhole()
        before.sendall(b"lost?")
        with pytest.raises(TimeoutError):
            before.recv(16)
        with connect(proxy, timeout=0.3) as during:  # the connect itself succeeds
            during.sendall(b"hello")
            with pytest.raises(TimeoutError):
                during.recv(16)
            proxy.healthy()
            during.settimeout(2)
            assert during.recv(16) == b"hello"  # like a healed partition: late, not lost
        before.settimeout(2)
        assert before.recv(16) == b"lost?"


def test_latency_delays_each_direction(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        proxy.latency(0.1)
        started = time.monotonic()
        assert echo(sock) == b"ping"
        assert 0.2 <= time.monotonic() - started < 1.0  # 0.1 s there and 0.1 s back
        proxy.healthy()
        started = time.monotonic()
        assert echo(sock) == b"ping"
        assert time.monotonic() - started < 0.1
    with pytest.raises(ValueError):
        proxy.latency(-1)


def test_a_dead_target_resets_the_client(isolated: bool) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    with FaultProxy("127.0.0.1", dead_port, isolated=isolated) as proxy:
        # The RST may even beat connect() back to the client.
        with pytest.raises(ConnectionResetError), connect(proxy) as sock:
            sock.recv(16)
        assert wait_until(lambda: proxy.open_connections == 0)


def test_set_target_moves_new_connections(proxy: FaultProxy, echo_port: int) -> None:
    with connect(proxy) as old:
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))
            other.listen()
            proxy.set_target("127.0.0.1", other.getsockname()[1])
            with connect(proxy):
                peer, _ = other.accept()  # the new connection reached the new target
                peer.close()
        assert echo(old) == b"ping"  # the old one still talks to the old target


def test_stop_closes_everything_and_ends_the_loop(echo_port: int, isolated: bool) -> None:
    proxy = FaultProxy("127.0.0.1", echo_port, isolated=isolated).start()
    assert proxy.is_running
    sock = connect(proxy)
    try:
        assert echo(sock) == b"ping"
        proxy.stop()
        assert not proxy.is_running
        assert sock.recv(16) == b""
        assert not any(t.name.startswith("FaultProxy:") for t in threading.enumerate())
        with pytest.raises(ConnectionRefusedError):
            connect(proxy)
    finally:
        sock.close()


def test_faults_set_before_start_are_in_force(echo_port: int, isolated: bool) -> None:
    proxy = FaultProxy("127.0.0.1", echo_port, isolated=isolated)
    proxy.refuse()
    with proxy:
        with pytest.raises(ConnectionRefusedError):
            connect(proxy)
        assert proxy.faults == {"refusing": True, "blackholed": False, "latency": 0.0}
        proxy.healthy()
        with connect(proxy) as sock:
            assert echo(sock) == b"ping"


def test_cut_on_without_forward_drops_the_marked_data(
    proxy: FaultProxy, echo_server: _EchoServer
) -> None:
    with connect(proxy) as other, connect(proxy) as sock:
        assert echo(other) == b"ping" and echo(sock) == b"ping"
        proxy.cut_on(b"COMMIT", forward=False)
        assert echo(other, b"SELECT 1") == b"SELECT 1"  # no marker: passes
        with pytest.raises(ConnectionResetError):
            sock.sendall(b"Q\0\0\0\x0bCOMMIT\0")
            sock.recv(16)
        assert proxy.connections_cut == 1
        assert echo(other) == b"ping"  # the other connection is untouched
        time.sleep(0.1)
        assert not echo_server.has_received(b"COMMIT")  # never forwarded
        assert echo(other, b"COMMIT") == b"COMMIT"  # one-shot: disarmed once fired
    assert proxy.connections_cut == 1


def test_cut_on_with_forward_withholds_the_answer(
    proxy: FaultProxy, echo_server: _EchoServer
) -> None:
    with connect(proxy) as sock:
        assert echo(sock) == b"ping"
        proxy.cut_on(b"COMMIT", forward=True)
        sock.sendall(b"Q\0\0\0\x0bCOMMIT\0")
        with pytest.raises(ConnectionResetError):
            sock.recv(16)  # the echo came back to the proxy, but not to us
        assert echo_server.has_received(b"COMMIT")  # the server got it (it answered it)
        assert proxy.connections_cut == 1
    with connect(proxy) as sock:
        assert echo(sock, b"COMMIT") == b"COMMIT"  # one-shot


def test_healthy_and_stop_disarm_cut_on(echo_port: int, isolated: bool) -> None:
    proxy = FaultProxy("127.0.0.1", echo_port, isolated=isolated)
    proxy.cut_on(b"COMMIT", forward=False)  # armed before start: in force once started
    with proxy:
        with connect(proxy) as sock, pytest.raises(ConnectionResetError):
            sock.sendall(b"COMMIT")
            sock.recv(16)
        proxy.cut_on(b"COMMIT", forward=False)
        proxy.healthy()
        with connect(proxy) as sock:
            assert echo(sock, b"COMMIT") == b"COMMIT"
        proxy.cut_on(b"COMMIT", forward=True)
    with proxy:  # restarted: the cut armed before stop() is gone
        with connect(proxy) as sock:
            assert echo(sock, b"COMMIT") == b"COMMIT"
        assert proxy.connections_cut == (0 if isolated else 1)  # a new child counts anew
    with pytest.raises(TypeError):
        proxy.cut_on("COMMIT", forward=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        proxy.cut_on(b"", forward=True)


@pytest.mark.db
def test_in_front_of_postgresql(pg_server: PostgresServer, fault_proxy: FaultProxy) -> None:
    def select_one() -> list[tuple[str, ...]]:
        return run_psql(pg_server.bindir, "SELECT 1", host=fault_proxy.host, port=fault_proxy.port,
                        user=pg_server.user, password=pg_server.password, dbname="postgres",
                        timeout=5)  # fmt: skip

    assert select_one() == [("1",)]
    fault_proxy.refuse()
    with pytest.raises(PsqlError, match="Connection refused"):
        select_one()
    fault_proxy.healthy()
    assert select_one() == [("1",)]
    assert fault_proxy.connections_accepted == 2
    url = pg_server.url("asyncpg", port=fault_proxy.port)
    assert f"@127.0.0.1:{fault_proxy.port}/postgres" in url
