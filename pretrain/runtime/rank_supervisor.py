"""A rank that dies names itself: each launched rank runs as the child of a small supervisor.

A rank killed from outside (SIGKILL from the out-of-memory killer, a segfault, NCCL's watchdog
abort) prints nothing, and DeepSpeed's launcher reports the failure with the command line of
whichever rank it started last, not the one that died. Every recipe calls `supervise()` first
thing (`pretrain.recipe_entry`), before torch is imported: under a launcher (WORLD_SIZE > 1)
the process forks; the child returns and trains as before, while the parent waits for it,
passes on SIGTERM and SIGUSR1 (preemption), and when the child ends badly prints one line naming the rank, local
rank, host, process id and how it ended, then exits with the child's code (128 + N for signal
N), which the launcher passes on. Stdlib only, so the parent stays small.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import time

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_PR_SET_PDEATHSIG = 1

# What a cluster team should look at for the usual fatal signals.
_SIGNAL_HINTS = {
    signal.SIGKILL: "sent from outside the process: the out-of-memory killer (see `dmesg` on that "
                    "host), the scheduler or a user",
    signal.SIGABRT: "an abort in native code, or NCCL's watchdog after parallel.collective_timeout_s",
    signal.SIGSEGV: "a crash in native code",
    signal.SIGBUS: "a crash in native code (often a full /dev/shm)",
}


def describe_end(status: int) -> tuple[str, int]:
    """('killed by SIGKILL (...)' or 'exited with code N', the exit code to pass on)."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exited with code {code}", code
    name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
    hint = _SIGNAL_HINTS.get(-code)
    return f"killed by {name}" + (f" ({hint})" if hint else ""), 128 - code


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this (child) process when its parent ends (Linux); a no-op elsewhere."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent ended before the request took effect
        os._exit(128 + signal.SIGKILL)


def supervise() -> None:
    """Return at once outside a multi-rank launch; inside one, fork: return in the child (which
    then runs the rank) and, in the parent, wait for the child, report a bad end and exit."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        _die_with_parent(parent)
        return
    def forward(signum, frame):
        try:
            os.kill(child, signum)
        except ProcessLookupError:  # already reaped: the exit follows
            pass

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    # Ctrl-C reaches the child from the terminal directly; the parent only waits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    started = time.monotonic()
    _, status = os.waitpid(child, 0)
    how, code = describe_end(status)
    if code != 0:
        sys.stderr.write(
            f"rank {os.environ.get('RANK', '?')} (local rank {os.environ.get('LOCAL_RANK', '?')}) on host "
            f"{socket.gethostname()}, pid {child}: {how} after {time.monotonic() - started:.0f} s\n")
        sys.stderr.flush()
    os._exit(code)
