"""Fail fast, with the fix, when a rank cannot reach the rendezvous address.

torch's rendezvous waits out its whole timeout (minutes) on a wrong MASTER_ADDR and then reports
a bare connection error. Every rank checks first that MASTER_ADDR resolves; every rank but 0
then checks that MASTER_ADDR:MASTER_PORT accepts a TCP connection (rank 0 serves it), retrying
while rank 0 starts, and otherwise stops with a message naming the host, the address, where the
address comes from (the launcher's `--master_addr`, the first host of its hostfile, or the
SLURM script) and the usual causes.
"""

from __future__ import annotations

import os
import socket
import time


class RendezvousError(RuntimeError):
    """The master address cannot be resolved or reached; the message says what to fix."""


def check_master_reachable(timeout_s: float) -> None:
    """Raise RendezvousError if this rank cannot reach MASTER_ADDR:MASTER_PORT within timeout_s."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    host = socket.gethostname()
    addr = os.environ.get("MASTER_ADDR", "")
    port = os.environ.get("MASTER_PORT", "")
    if not addr or not port.isdigit():
        raise RendezvousError(f"MASTER_ADDR={addr!r} / MASTER_PORT={port!r} on host {host}: both must "
                              f"be set (the deepspeed launcher and torchrun set them; with a "
                              f"hostfile, the first host is the master)")
    try:
        socket.getaddrinfo(addr, int(port), type=socket.SOCK_STREAM)
    except OSError as e:
        raise RendezvousError(f"MASTER_ADDR {addr!r} does not resolve on host {host} ({e}); set it "
                              f"to a name or IP of the first host that every node can resolve "
                              f"(`deepspeed --master_addr`; under SLURM recipes/slurm_llada.sbatch "
                              f"takes the allocation's first host, or MASTER_ADDR when set)") from None
    if int(os.environ.get("RANK", "0")) == 0:
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((addr, int(port)), timeout=min(5.0, timeout_s)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise RendezvousError(
                    f"rank {os.environ.get('RANK')} on host {host} cannot reach MASTER_ADDR:MASTER_PORT "
                    f"= {addr}:{port} after {timeout_s:g} s ({e}); check that rank 0 started (the "
                    f"launcher with --node_rank 0 runs on the master host), that MASTER_ADDR is an "
                    f"address of that host reachable from this node (`deepspeed --master_addr`), and "
                    f"that no firewall blocks the port (parallel.rendezvous_timeout_s sets the wait)"
                ) from None
            time.sleep(0.5)
