"""An exclusive lock on a database directory while it is written (``fcntl.flock``).

Two ``tune`` runs on one work directory once interleaved their lines, and each wrote record
indices as if it owned the file, so records pointed at the wrong workloads. :class:`DirLock`
holds ``DIR/.tune.lock`` (which says who holds it: pid, host, command, since when) for as long
as a writer runs. The kernel drops a ``flock`` when its process dies, so ``kill -9`` never
leaves a stale lock behind. Re-entrant within one process (the ``tune`` command locks the work
directory, and :func:`tuning.tune.tune_tasks` locks it again).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from .dbfiles import LOCK_FILE

__all__ = ["DirLock", "LockedError"]

_HELD: dict[str, int] = {}  # resolved lock file -> nesting depth in this process


class LockedError(RuntimeError):
    """Another process holds the lock (the message names it)."""


def _holder(file: Path) -> str:
    try:
        info = json.loads(file.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')} "
            f"({info.get('command')})")


class DirLock:
    """Context manager: exclusive ``flock`` on ``directory/.tune.lock``.

    Parameters
    ----------
    directory : path
        The directory to lock (created if missing).
    what : str
        How to name it in the error ("tuning work directory", "committed database").
    wait : bool
        Block until the holder lets go, instead of raising :class:`LockedError`.
    """

    def __init__(self, directory: str | os.PathLike, *, what: str = "database directory", wait: bool = False):
        self.directory = Path(directory)
        self.what = what
        self.wait = wait
        self.file = self.directory / LOCK_FILE
        self._fd: int | None = None
        self._key = ""

    def __enter__(self) -> DirLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._key = str(self.file.resolve())
        if _HELD.get(self._key):
            _HELD[self._key] += 1
            return self
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not self.wait:
                    raise LockedError(
                        f"{self.what} {self.directory} is in use by {_holder(self.file)}; "
                        "wait for it to finish (or pass --wait to queue behind it)") from None
                print(f"waiting for {_holder(self.file)} to release {self.directory} ...",
                      file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
            info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                    "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _HELD[self._key] = 1
        return self

    def __exit__(self, *exc) -> None:
        _HELD[self._key] -= 1
        if _HELD[self._key]:
            return
        del _HELD[self._key]
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
