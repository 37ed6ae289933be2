"""Ports for listeners that start later (fedfms/ports.py): below the kernel's ephemeral range, and never the same
port twice to threads of one process that draw at once, as FLARE's simulator does for its site processes."""

from __future__ import annotations

import socket
import threading

from fedfms import ports


def test_threads_drawing_at_once_never_share_a_port_and_every_port_is_below_the_ephemeral_range():
    drawer = ports.PortDrawer()
    drawn: list[int] = []
    start = threading.Barrier(8)

    def draw():
        start.wait()
        drawn.extend(drawer.open_ports(25))

    threads = [threading.Thread(target=draw) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(drawn) == 200 and len(set(drawn)) == 200
    low, _ = ports.ephemeral_port_range()
    if low - ports.FIRST_CONFIG_PORT > 1000:
        assert all(ports.FIRST_CONFIG_PORT <= p < low for p in drawn)


def test_a_drawer_with_no_room_below_the_ephemeral_range_still_never_repeats_a_port(monkeypatch):
    # the kernel's range starts at 10500: too little room below it, so the kernel picks (bind to port 0)
    monkeypatch.setattr(ports, "ephemeral_port_range", lambda: (10500, 60999))
    real_socket = socket.socket
    handed = iter([41000, 41000, 41001, 41000, 41002])  # the kernel hands out a port it gave before

    class KernelPicks(real_socket):
        def bind(self, address):
            host, port = address
            super().bind((host, 0 if port else port))
            self._picked = next(handed) if port == 0 else port

        def getsockname(self):
            return (self.family, self._picked)

    monkeypatch.setattr(ports.socket, "socket", KernelPicks)
    drawer = ports.PortDrawer()
    assert drawer.open_ports(3) == [41000, 41001, 41002]


def test_flares_simulator_draws_its_site_ports_from_fedfms_while_a_simulation_runs():
    from nvflare.private.fed.app.simulator import simulator_runner as flare_simulator

    from fedfms.flare.simulate import watched_site_processes

    flares_own = flare_simulator.get_open_ports
    with watched_site_processes():
        assert flare_simulator.get_open_ports is not flares_own
        drawn = [flare_simulator.get_open_ports(1)[0] for _ in range(50)]
    assert flare_simulator.get_open_ports is flares_own
    assert len(set(drawn)) == 50 and all(ports.port_is_free(p) for p in drawn)
    low, _ = ports.ephemeral_port_range()
    if low - ports.FIRST_CONFIG_PORT > 1000:
        assert all(p < low for p in drawn)
