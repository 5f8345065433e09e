"""What a rank does when a peer fails, and the per-rank logs a cluster team reads afterwards.

When a rank dies, the others' next collective fails: on gloo at once ("Connection closed by
peer") or after the process group's timeout (`parallel.collective_timeout_s`); NCCL's watchdog
aborts the process after that timeout. A rank whose collective failed prints one line naming
itself, its host, the step and phase it was in and the error, and exits with code 6 at once:
tearing the process group down normally could wait on the dead peer. The launcher then ends
the node's other ranks (DeepSpeed's launch.py does) and exits with that code; the rank that
died first is named by its supervisor (`pretrain.runtime.rank_supervisor`).

With `logging.per_rank_logs`, every rank's stdout and stderr also go, through `tee` processes
that outlive it, to `<out_dir>/logs/rank_XXXXX.log`, which opens with the rank's identity and
process id; nothing a dying rank wrote is lost.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

import torch

from pretrain.runtime.exit_codes import COLLECTIVE


def is_collective_failure(error: BaseException) -> bool:
    """A failed collective or rendezvous store operation: torch's distributed errors (NCCL, the
    store) and gloo's, which torch raises as a plain RuntimeError carrying gloo's source path."""
    return isinstance(error, torch.distributed.DistError) or (
        isinstance(error, RuntimeError) and "gloo" in str(error))


def exit_after_collective_failure(error: BaseException, rank: int, step: int, phase: str) -> NoReturn:
    """Print which rank failed where and why, then end the process with code 6."""
    lines = str(error).strip().splitlines() or [""]
    sys.stderr.write(
        f"rank {rank} on host {socket.gethostname()}: a collective failed at step {step} in {phase} "
        f"({type(error).__name__}: {lines[0][:400]}). A peer rank probably died or hung: the rank that "
        f"ended first is named in its launcher's log ('rank N ... killed by' or 'exited with code') "
        f"and its own log says why. Exiting with code {COLLECTIVE}.\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(COLLECTIVE)


def rank_log_path(out_dir: str | Path, rank: int) -> Path:
    return Path(out_dir) / "logs" / f"rank_{rank:05d}.log"


def tee_to_rank_log(out_dir: str | Path, rank: int) -> Path:
    """From now on, copy this process's stdout and stderr into its per-rank log; returns the path.

    The log opens with one line naming the rank, its local rank, host, process id, world size and
    rendezvous address. Each stream goes through its own `tee -a` process, which ignores the
    signals that end or preempt a rank (it ends when the rank's last write end closes).
    """
    path = rank_log_path(out_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as log:
        log.write(f"rank {rank} (local rank {os.environ.get('LOCAL_RANK', '0')}) on host "
                  f"{socket.gethostname()}, pid {os.getpid()}, world {os.environ.get('WORLD_SIZE', '1')}, "
                  f"master {os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}, "
                  f"started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    sys.stdout.flush()
    sys.stderr.flush()
    for fd in (1, 2):
        tee = subprocess.Popen(["sh", "-c", 'trap "" INT TERM HUP USR1; exec tee -a "$0"', str(path)],
                               stdin=subprocess.PIPE, stdout=fd)
        os.dup2(tee.stdin.fileno(), fd)
        tee.stdin.close()
    return path
