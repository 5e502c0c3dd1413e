"""Ports on 127.0.0.1: a free one for a new listener, and whether a remembered one is free.

Used by the local broker (which keeps its ports across restarts) and by ``pipeline up``'s
supervisor (each stage instance's HTTP surface).
"""

from __future__ import annotations

import socket

from pipeline.errors import PortInUseError

__all__ = ["check_port_free", "free_port", "port_is_free"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
