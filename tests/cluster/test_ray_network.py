"""The embedded local Ray (`connect(None)`) listens on loopback only: every TCP listener and bound
UDP socket of the Ray processes this test starts (GCS, raylet with its object manager, the agents,
the core workers of a task and an actor, and the driver's own core worker) is on 127.0.0.1 / ::1."""

from __future__ import annotations

import importlib
import ipaddress
import os

import pytest

pytestmark = pytest.mark.ray


def _psutil():
    """Ray ships psutil (ray/thirdparty_files) and puts it on sys.path when it is imported."""
    import ray  # noqa: F401

    return importlib.import_module("psutil")


def _bound_sockets(proc) -> list:
    """(laddr ip, port, kind) of every TCP listener and bound UDP socket of `proc`."""
    import socket

    psutil = _psutil()

    out = []
    try:
        for c in proc.net_connections(kind="inet"):
            listening = c.type == socket.SOCK_STREAM and c.status == psutil.CONN_LISTEN
            bound_udp = c.type == socket.SOCK_DGRAM and c.laddr
            if listening or bound_udp:
                out.append((c.laddr.ip, c.laddr.port, "tcp" if listening else "udp"))
    except psutil.NoSuchProcess:
        pass
    return out


def _program(proc) -> str:
    """The basename of the program `proc` runs ("" once it has exited)."""
    psutil = _psutil()
    try:
        argv = proc.cmdline()
    except psutil.Error:
        return ""
    return os.path.basename(argv[0]) if argv else ""


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:127.0.0.1 (a dual-stack socket bound to 127.0.0.1)
    return addr.is_loopback


def test_embedded_ray_listens_on_loopback_only():
    import ray

    from rayq.cluster.trainer import connect

    psutil = _psutil()

    if ray.is_initialized():
        pytest.skip("another test's Ray is running in this process")
    me = psutil.Process()
    before = set(_bound_sockets(me))
    connect(None, num_cpus=1)
    try:
        @ray.remote(num_cpus=0.1)
        def pid() -> int:
            return os.getpid()

        @ray.remote(num_cpus=0.1)
        class Holder:
            def pid(self) -> int:
                return os.getpid()

        holder = Holder.remote()
        worker_pids = {ray.get(pid.remote()), ray.get(holder.pid.remote())}
        started = me.children(recursive=True)  # only the processes this test's Ray started
        # the program's own name, not a prefix of its command line: a long install path pushed
        # "raylet" past a truncated cmdline once
        names = {_program(p) for p in started}
        assert worker_pids <= {p.pid for p in started}, "Ray's workers are not this test's children"
        assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), names

        found = {p.pid: _bound_sockets(p) for p in started}
        found[me.pid] = [s for s in _bound_sockets(me) if s not in before]  # the driver's core worker
        every = [(pid, s) for pid, socks in found.items() for s in socks]
        assert len(every) >= 4, every  # GCS, raylet, object manager, core workers at least
        exposed = [(pid, s) for pid, s in every if not _is_loopback(s[0])]
        assert not exposed, f"Ray sockets beyond loopback: {exposed}"
        assert all(found[p] for p in worker_pids), "a worker with no listening socket: nothing checked"
    finally:
        ray.shutdown()
