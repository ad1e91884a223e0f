"""Tests never touch the network: every connection or name lookup that leaves this machine raises.

Allowed: AF_UNIX sockets and loopback addresses (accelerate / torch.distributed tests talk over
127.0.0.1). Every blocked attempt is also recorded, so that a library which swallows the error
still fails the test (tests/conftest.py checks `take_attempts()` after each test). Python
subprocesses of the tests get the same guard through `sitecustomize.py` beside this file.
"""

import ipaddress
import socket
import sys

_attempts: list[str] = []
_original = {}


class NetworkAccessInTests(RuntimeError):
    """Not an OSError on purpose: retry loops that catch OSError must not hide it."""


def _is_local(host) -> bool:
    me = socket.gethostname()
    if host in (None, "", "localhost", me) or str(host).startswith(me + "."):  # this machine, also by its FQDN
        return True
    try:
        address = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return False  # a name that would need a DNS lookup
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback or address.is_unspecified


def _block(what: str):
    _attempts.append(what)
    print(f"cotexnet test guard: network access in tests blocked: {what}", file=sys.stderr)
    raise NetworkAccessInTests(f"network access in tests: {what} (tests must stay offline)")


def _check(sock, address) -> None:
    if sock.family == socket.AF_UNIX:
        return
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or not _is_local(address[0]):
        _block(f"connect to {address!r}")


def _connect(self, address):
    _check(self, address)
    return _original["connect"](self, address)


def _connect_ex(self, address):
    _check(self, address)
    return _original["connect_ex"](self, address)


def _getaddrinfo(host, *args, **kwargs):
    if not _is_local(host.decode() if isinstance(host, bytes) else host):
        _block(f"name lookup of {host!r}")
    return _original["getaddrinfo"](host, *args, **kwargs)


def install() -> None:
    if _original:
        return
    _original.update(connect=socket.socket.connect, connect_ex=socket.socket.connect_ex,
                     getaddrinfo=socket.getaddrinfo)
    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = _connect, _connect_ex, _getaddrinfo


def take_attempts() -> list[str]:
    """The blocked attempts since the last call (and forget them)."""
    taken = _attempts[:]
    _attempts.clear()
    return taken
