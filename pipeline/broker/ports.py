"""Ports on 127.0.0.1: a free one for a new listener, and whether a remembered one is free.

Used by the local broker (which keeps its ports across restarts) and by ``pipeline up``'s
supervisor (each stage instance's HTTP surface).
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

from pipeline.errors import PortInUseError

__all__ = ["check_port_free", "free_port", "port_is_free"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    Picked below the range the kernel hands out to outgoing connections
    (``ip_local_port_range``): a port from that range (what binding port 0 gives) can become
    the local port of some client's connection before the listener that was promised it
    binds it (a stage's Kafka connections, say): "address already in use".
    """
    first, _ = _ephemeral_range()
    low = 10_000 if first > 12_000 else 1024
    if first - low >= 1000:
        for _ in range(50):
            port = random.randrange(low, first)
            if _bindable(port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range of local ports for outgoing connections (Linux; a usual default
    elsewhere)."""
    try:
        first, last = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return first, last


def _bindable(port: int) -> bool:
    """Whether a listener could bind ``127.0.0.1:port`` now (no SO_REUSEADDR: strict)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def port_is_free(port: int) -> bool:
    """Whether ``127.0.0.1:port`` can be bound.

    The probe binds with ``SO_REUSEADDR``, as the broker's JVM does: a port whose only
    sockets are in TIME_WAIT (a broker that just stopped) is free for a restart.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def check_port_free(port: int, role: str, *, remembered: bool = False) -> None:
    """Raise :class:`PortInUseError` when ``127.0.0.1:port`` is taken."""
    if port_is_free(port):
        return
    if remembered:
        raise PortInUseError(
            f"Port {port} on 127.0.0.1 (the broker's {role} port, kept from its last run so "
            f"that clients and stages find it again) is in use by another process. Stop "
            f"whatever listens there ('ss -ltnp | grep :{port}'), or start afresh (--fresh) "
            f"or on another port (--port) and point the clients at the new address."
        )
    raise PortInUseError(
        f"Port {port} on 127.0.0.1 (the broker's {role} port) is already in use. Stop "
        f"whatever listens there ('ss -ltnp | grep :{port}'), or choose another port "
        f"(--port), or leave the port unset to pick a free one."
    )
