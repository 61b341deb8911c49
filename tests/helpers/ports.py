"""A free TCP port for a test's rendezvous.

Tests run in parallel workers (pytest-xdist), so a fixed port or a per-module range would collide
between two workers running launcher tests at once; the OS hands out a port nobody holds.
"""

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
