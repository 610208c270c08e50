"""The partition proxy of the chaos test (``loadtest/proxy.py``), on plain loopback sockets."""

from __future__ import annotations

import re
import socket
import time

import pytest

from django_openworkflow.loadtest.proxy import PartitionProxy, upstream_of


class Upstream:
    """A listening socket standing for PostgreSQL: the test accepts and reads by hand."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.address = self.listener.getsockname()[:2]

    def accept(self) -> socket.socket:
        sock, _ = self.listener.accept()
        sock.settimeout(10)
        return sock

    def has_pending_connection(self) -> bool:
        self.listener.setblocking(False)
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return False
        finally:
            self.listener.settimeout(10)
        sock.close()
        return True

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def upstream():
    server = Upstream()
    yield server
    server.close()


@pytest.fixture
def proxy(upstream):
    with PartitionProxy(upstream.address) as p:
        yield p


def connect(proxy: PartitionProxy) -> socket.socket:
    sock = socket.create_connection(proxy.address, timeout=10)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"EOF after {data!r}"
        data += chunk
    return data


def wait_until(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "the condition did not become true"
        time.sleep(0.01)


def nothing_to_read(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(1)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(10)
    return False


def test_it_forwards_both_ways(proxy, upstream):
    client = connect(proxy)
    server = upstream.accept()
    client.sendall(b"ping")
    assert recv_exactly(server, 4) == b"ping"
    server.sendall(b"pong" * 50_000)
    assert recv_exactly(client, 200_000) == b"pong" * 50_000
    client.close()
    assert server.recv(1) == b""  # the FIN passes when not partitioned
    server.close()


def test_a_partition_holds_the_bytes_both_ways_until_the_heal(proxy, upstream):
    client = connect(proxy)
    server = upstream.accept()
    proxy.partition()
    client.sendall(b"request")
    server.sendall(b"late answer")
    wait_until(lambda: proxy.held() == len(b"request") + len(b"late answer"))
    assert nothing_to_read(server)
    assert nothing_to_read(client)
    assert proxy.open_connections() == 1  # open, silent
    proxy.heal()
    assert recv_exactly(server, 7) == b"request"
    assert recv_exactly(client, 11) == b"late answer"
    client.sendall(b"again")
    assert recv_exactly(server, 5) == b"again"


def test_a_connection_made_during_a_partition_reaches_upstream_at_the_heal(proxy, upstream):
    proxy.partition()
    client = connect(proxy)  # accepted: a connect() to a partitioned host would hang instead
    client.sendall(b"startup")
    wait_until(lambda: proxy.held() == 7)
    assert not upstream.has_pending_connection()
    proxy.heal()
    server = upstream.accept()
    assert recv_exactly(server, 7) == b"startup"


def test_a_side_that_closes_during_a_partition_is_not_told_until_the_heal(proxy, upstream):
    client = connect(proxy)
    server = upstream.accept()
    proxy.partition()
    client.sendall(b"last words")
    client.close()
    server.sendall(b"reply")
    wait_until(lambda: proxy.held() == len(b"last words") + len(b"reply"))
    assert nothing_to_read(server)  # no data, and no EOF either
    proxy.heal()
    assert recv_exactly(server, 10) == b"last words"  # delivered late, then the FIN
    assert server.recv(1) == b""


def test_the_server_closing_during_a_partition_reaches_the_client_at_the_heal(proxy, upstream):
    client = connect(proxy)
    server = upstream.accept()
    proxy.partition()
    server.sendall(b"bye")
    server.close()
    wait_until(lambda: proxy.held() == 3)
    assert nothing_to_read(client)
    proxy.heal()
    assert recv_exactly(client, 3) == b"bye"
    assert client.recv(1) == b""


def test_a_client_that_gave_up_before_the_heal_never_reaches_upstream(proxy, upstream):
    proxy.partition()
    client = connect(proxy)
    client.close()
    wait_until(lambda: proxy.open_connections() == 1 and proxy.connections_accepted == 1)
    proxy.heal()
    wait_until(lambda: proxy.open_connections() == 0)
    assert not upstream.has_pending_connection()


def test_a_bounded_partition_heals_by_itself(proxy, upstream):
    client = connect(proxy)
    server = upstream.accept()
    proxy.partition(0.2)
    assert proxy.partitioned
    client.sendall(b"after")
    assert recv_exactly(server, 5) == b"after"  # within the socket's 10 s timeout
    assert not proxy.partitioned
    assert proxy.partitions == 1


def test_it_listens_on_loopback_only(upstream):
    with pytest.raises(ValueError, match=re.escape("loopback only, not on '0.0.0.0'")):
        PartitionProxy(upstream.address, host="0.0.0.0")


def test_upstream_of_a_unix_socket_is_refused():
    assert upstream_of({"HOST": "db.example", "PORT": "6543"}) == ("db.example", 6543)
    assert upstream_of({"HOST": "", "PORT": ""}) == ("127.0.0.1", 5432)
    with pytest.raises(
        ValueError, match=re.escape("TCP only; HOST is a socket: /var/run/postgresql")
    ):
        upstream_of({"HOST": "/var/run/postgresql"})
