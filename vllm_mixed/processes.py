"""Child processes: the one isolated runner and the signal-forwarding runner.

:func:`run_isolated` runs one vLLM job (a bench row, an eval engine, a GPU
benchmark row) in its own session with its output in a log file (a pipe that
nobody drains can hang a lingering engine), and afterwards kills whatever is
left of its process group and waits until it is gone: vLLM's engine core and
workers are children of the job, and the next job must start with their
memory free.

:func:`run_forwarding_signals` runs a long-lived child (``vllm-mixed serve``'s
server) on the terminal, forwards SIGINT, SIGTERM and SIGHUP to it and returns
its exit status the way a shell reports it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from types import FrameType

__all__ = ["FORWARDED_SIGNALS", "exit_status", "kill_group", "run_forwarding_signals", "run_isolated"]

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
GONE_WAIT_S = 15.0


def run_isolated(
    cmd: Sequence[str], log: Path, timeout: float | None, env: Mapping[str, str] | None = None
) -> int | None:
    """Run ``cmd`` in a new session, stdout and stderr to ``log`` (which
    starts with the command line), stdin from /dev/null. Returns its exit
    status, or ``None`` if it ran past ``timeout`` seconds. Its whole process
    group is killed afterwards in every case (Ctrl-C included), and this
    returns only once that group is gone."""
    with Path(log).open("w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(
            list(cmd), stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=None if env is None else dict(env), start_new_session=True,
        )  # fmt: skip
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            kill_group(proc.pid)
            proc.wait()


def kill_group(pgid: int, wait_s: float = GONE_WAIT_S) -> None:
    """SIGKILL whatever is left of a process group and wait (up to
    ``wait_s``) until none of it is left."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    """Any non-zombie process left in the group (zombies hold no memory and
    may never be reaped in a container without an init)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: killed by signal N is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def run_forwarding_signals(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Run ``cmd`` with this process's stdin, stdout and stderr until it
    exits; SIGINT, SIGTERM and SIGHUP sent to this process go to it (once: it
    runs in its own session, so a terminal's Ctrl-C reaches it only through
    here). Returns :func:`exit_status` of its return code; what is left of
    its process group afterwards is killed. Call from the main thread."""
    child: list[subprocess.Popen[bytes]] = []
    pending: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        if not child:
            pending.append(signum)
            return
        with suppress(ProcessLookupError):
            os.kill(child[0].pid, signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        child.append(subprocess.Popen(list(cmd), env=None if env is None else dict(env), start_new_session=True))
        for signum in pending:  # arrived while the child was starting
            forward(signum, None)
        returncode = child[0].wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if child:
            if child[0].poll() is None:  # this process is being torn down (an exception): leave no server behind
                with suppress(ProcessLookupError):
                    os.kill(child[0].pid, signal.SIGTERM)
                with suppress(subprocess.TimeoutExpired):
                    child[0].wait(timeout=GONE_WAIT_S)
            kill_group(child[0].pid)
            child[0].wait()
    return exit_status(returncode)
