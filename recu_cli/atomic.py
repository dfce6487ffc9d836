"""Atomic file writes: a reader (or a crash) never sees a half-written file, and a write
never replaces anything but a regular file.

Every file recu writes goes through here, so two rules hold everywhere:
- only a regular file (or nothing) is ever replaced: an output path that is a FIFO, a
  device, a socket or a folder is one error line and stays as it was (`os.replace` would
  swap a `/dev/null` or a named pipe for a plain file, and as root destroy the device);
- a full disk, a quota or a file size limit is one line naming the file and the
  filesystem, whatever library was writing (torch's own writer reports a full disk as
  "unexpected pos 64 vs 0": so torch writes through a Python file object here).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from recu_cli.errors import RecuError

# errors that mean "the filesystem took no more bytes", not "this path is wrong"
NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def target(path: Path) -> Path:
    """Where writing `path` lands: a symlink is followed (the link stays and the file it
    points to is replaced), anything else is `path` itself."""
    return Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)


def check_target(path: Path) -> None:
    """Refuse an existing output that is not a regular file (one line, exit code 2).

    Commands call it before their work, so a wrong -o costs nothing; `atomic_path` calls
    it again before it creates and before it renames."""
    try:
        mode = os.stat(path).st_mode  # follows symlinks, like `target`
    except OSError:
        return  # absent (or unreachable: the write itself then says why)
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    raise RecuError(
        f"{path} is {kind}; recu writes only regular files and never replaces anything "
        "else: give the path of a new or existing regular file"
    )


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    The temporary name holds the process id (`name.<pid>.tmp`), so two processes never
    write the same temporary file. On any error (Ctrl-C included) it is removed and
    `path` is untouched. The result gets the usual umask permissions (some writers create
    0600 files), like every other file of a run folder. A full disk is a `RecuError`
    naming `path` and its filesystem (exit code 1).
    """
    check_target(path)
    real = target(Path(path))
    tmp = real.with_name(f"{real.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        check_target(path)  # something else may have appeared there meanwhile
        os.replace(tmp, real)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            raise no_space(path, e) from e
        raise
    try:
        fd = os.open(real.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # directory fsync is best effort (not supported everywhere)


@functools.cache
def _umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def torch_save(obj: object, path: Path) -> None:
    """`torch.save`, atomically, through a Python file object that keeps the OSError of a
    failed write: torch reports it as a RuntimeError ('unexpected pos 64 vs 0') without
    the errno, and a full disk must read as one."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        out = _Recording(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is not None:
                raise out.error from None
            raise


class _Recording:
    """A writable file object that remembers the OSError its `write` raised."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def append_text(path: Path, text: str) -> None:
    """Append to a log file (train.log): a regular file or a new one, nothing else."""
    check_target(path)
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError as e:
        if e.errno in NO_SPACE:
            raise no_space(path, e) from e
        raise


def no_space(path: Path, e: OSError) -> RecuError:
    """One line for a write the filesystem refused for lack of room (exit code 1)."""
    where = filesystem(Path(path))
    if e.errno == errno.EFBIG:
        limit = _fsize_limit()
        what = f"file size limit reached{limit} on {where} while writing {path}"
        todo = "raise the limit or write a smaller file"
    elif e.errno == errno.EDQUOT:
        what, todo = f"disk quota exceeded on {where} while writing {path}", "free some space"
    else:
        what = f"no space left on {where} while writing {path}"
        todo = "free some space there or write elsewhere"
    return RecuError(f"{what}; {todo} (nothing was replaced)", exit_code=1)


def filesystem(path: Path) -> str:
    """'device DEV (TYPE, mounted on MOUNT)' for the filesystem `path` is (or would be) on."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    mount = p if p.is_dir() else p.parent
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    device = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 2 and _unescape(fields[1]) == str(mount):
                device = f"{_unescape(fields[0])} ({fields[2]}"  # the last mount wins
    if device is None:
        return f"the filesystem mounted on {mount}"
    return f"device {device}, mounted on {mount})"


def _fsize_limit() -> str:
    """' (N bytes, ulimit -f)' when the process has a file size limit (Unix)."""
    try:
        import resource
    except ImportError:
        return ""
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return "" if soft == resource.RLIM_INFINITY else f" ({soft:,} bytes, ulimit -f)"


def _unescape(field: str) -> str:
    """/proc/self/mounts writes space, tab, newline and backslash as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field
