"""The network guard of tests/conftest.py: outside connections fail loudly, loopback works."""

import socket
import subprocess
import sys

import cotexnet_netguard
import pytest
from cotexnet_netguard import NetworkAccessInTests


def test_outside_connections_and_lookups_raise_and_are_recorded():
    with pytest.raises(NetworkAccessInTests, match="huggingface.co"):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    with socket.socket() as sock, pytest.raises(NetworkAccessInTests, match="10.255.255.1"):
        sock.connect(("10.255.255.1", 80))
    with socket.socket(socket.AF_INET6) as sock, pytest.raises(NetworkAccessInTests):
        sock.connect_ex(("2001:db8::1", 80))
    try:  # a library that swallows the error still leaves a record: the autouse check fails the test
        socket.getaddrinfo("example.org", 80)
    except Exception:
        pass
    attempts = cotexnet_netguard.take_attempts()
    assert len(attempts) == 4 and "example.org" in attempts[-1]


def test_loopback_and_unix_sockets_work(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname(), timeout=5), socket.create_connection(
                ("localhost", server.getsockname()[1]), timeout=5):
            pass
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "s"))
        server.listen()
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(tmp_path / "s"))


def test_python_subprocesses_are_guarded_too():
    code = "import socket; socket.create_connection(('10.255.255.1', 80), timeout=2)"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert child.returncode == 1 and "NetworkAccessInTests" in child.stderr and "10.255.255.1" in child.stderr
