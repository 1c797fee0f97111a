"""One benchmark row in its own process group, output to a log file.

Each vLLM row must leave nothing behind on the GPU for the next one: the
engine core and its workers are children of the row's process, so the whole
group is killed once the row returns or runs out of time."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def run_isolated(cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> int | str:
    """Run ``cmd`` with stdout and stderr in ``log``; its exit status, or
    ``"timeout"``. The process group is killed either way."""
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout"
        finally:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            time.sleep(2)  # let the driver release the killed engine's GPU memory
