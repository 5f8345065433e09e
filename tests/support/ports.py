"""A free loopback port for each launched test's rendezvous (the launchers' default 29500 is
shared, so two tests on it would collide)."""

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
