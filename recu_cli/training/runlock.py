"""One process per run folder: an exclusive lock held for the whole run.

`fcntl.flock` on `RUN/.lock` (which holds the owner's pid for the message). The kernel
drops the lock when the owner dies, however it dies, so a lock left by a killed run is
simply taken over: there is no stale-lock guessing.
"""

from __future__ import annotations

import os
from pathlib import Path

from recu_cli.atomic import NO_SPACE, check_target, no_space
from recu_cli.errors import RecuError

LOCK_NAME = ".lock"


class RunLock:
    """Exclusive lock on a run folder; `release()` (or process exit) frees it."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_NAME
        self._fd: int | None = None
        self._held = False

    def acquire(self) -> RunLock:
        """Take the lock or raise one line naming the folder and the running process."""
        try:
            import fcntl
        except ImportError:  # Windows: no flock; runs are not protected there
            self._held = True
            return self
        check_target(self.path)  # a FIFO or device named .lock is not ours to write
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as e:
            raise RecuError(
                f"cannot create {self.path} ({e.strerror}); pick a writable --output",
                exit_code=1,
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"process {holder}" if holder else "another process"
            raise RecuError(
                f"{self.run_dir} is in use by a running recu ({who}); wait for it to end, "
                "or give another --experiment name",
                exit_code=1,
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            os.close(fd)
            if e.errno in NO_SPACE:
                raise no_space(self.path, e) from e
            raise
        self._fd = fd
        self._held = True
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
        self._held = False

    @property
    def held(self) -> bool:
        return self._held


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
