"""Ports for FLARE's listeners, drawn so that nothing else on the machine takes them before they are bound.

A port found free now is only a promise: between drawing it and a process binding it (seconds for a simulated
site's process, tens of seconds for a POC server on a loaded machine), anything else may take it. Every port the
kernel picks by itself (outgoing connections, anything binding port 0, FLARE's own listeners) comes from the
kernel's ephemeral range, so ports are drawn below that range, at random. Two callers in one process that draw at
the same moment are kept apart by :class:`PortDrawer`."""

from __future__ import annotations

import random
import socket
import threading
from collections import deque
from pathlib import Path

# Ports drawn for configs start here: above the registered services most machines run, below the
# kernel's ephemeral range (see free_port).
FIRST_CONFIG_PORT = 10000


def ephemeral_port_range() -> tuple[int, int]:
    """The range the kernel hands out for outgoing connections and bind-to-port-0 (Linux default)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def port_is_free(port: int) -> bool:
    """Nobody is bound to ``port`` on any interface (a FLARE server binds 0.0.0.0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", avoid=frozenset()) -> int:
    """A port nobody is bound to right now (and not in ``avoid``), for a listener that starts later.

    It is drawn below the kernel's ephemeral range: every port the kernel picks by itself (outgoing
    connections, FLARE's internal listeners, anything binding port 0) comes from that range, so none of
    them can take this one in the tens of seconds between the config being written and the server
    binding it. A kernel-picked port was taken that way once in a CI run (the server then retried its bind
    for good). Falls back to a kernel-picked port where the ephemeral range leaves no room below it."""
    low, _ = ephemeral_port_range()
    draw = random.SystemRandom()
    if low - FIRST_CONFIG_PORT > 1000:
        for _ in range(100):
            port = draw.randrange(FIRST_CONFIG_PORT, low)
            if port not in avoid and port_is_free(port):
                return port
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port
    raise OSError(f"no free port on {host} outside the {len(avoid)} handed out already")


class PortDrawer:
    """:func:`free_port` for many threads of one process: a port it handed out is not handed out again among its
    next ``memory`` draws, so two listeners that start at the same moment never get the same port.

    FLARE's simulator asks the kernel for one port per site process and lets that process bind it later; two of
    its threads once got the same port, one site process could not listen (``Address already in use``), the
    other served the wrong site, and the run waited for ever (`make test` with 4 workers, on a fresh clone)."""

    def __init__(self, memory: int = 4096):
        self._lock = threading.Lock()
        self._recent: deque[int] = deque(maxlen=memory)

    def draw(self) -> int:
        with self._lock:
            port = free_port(avoid=frozenset(self._recent))
            self._recent.append(port)
            return port

    def open_ports(self, number: int) -> list[int]:
        """The signature of FLARE's ``nvflare.fuel.utils.network_utils.get_open_ports``."""
        return [self.draw() for _ in range(number)]
