"""The kill harness: start a command in its own process group and SIGKILL the whole group
when a condition becomes true (a stage's file appears, a database row appears), optionally
after a delay. Reused by every test that must survive a kill at any line."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def rows(db: Path, query: str) -> int:
    """The first column of ``query``'s first row, 0 while the database or table is missing
    or locked (the command under test may be writing it)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.05) as conn:
            row = conn.execute(query).fetchone()
    except sqlite3.Error:
        return 0
    return int(row[0]) if row and row[0] is not None else 0


def kill_when(command: Sequence[str], condition: Callable[[], bool], *, delay: float = 0.0,
              timeout: float = 300.0, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> tuple[bool, int]:
    """Run ``command``; once ``condition()`` holds, wait ``delay`` s and SIGKILL its process
    group. Returns (killed, return code): ``killed`` is False when the command ended before
    the condition held."""
    proc = subprocess.Popen(list(command), cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if condition():
                time.sleep(delay)
                os.killpg(proc.pid, signal.SIGKILL)
                return True, proc.wait(timeout=30)
            time.sleep(0.005)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            raise TimeoutError(f"{command} neither finished nor met the condition in {timeout} s")
        return False, proc.returncode
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
