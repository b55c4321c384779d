"""One writer per run folder or resumable output, and clean-up of temp files left by dead runs.

:class:`WriterLock` holds an exclusive ``fcntl.flock`` on a small lock file that records the
holder's process id. The kernel drops a flock when its process dies (even on ``kill -9``), so a
lock file left behind by a dead run is simply taken over by the next writer; a live holder makes
a second writer fail at once with an :class:`~emseg.errors.InputError` naming its pid.

Temp files are named ``.NAME.tmp-PID-...`` (see :func:`temp_name`). :func:`clean_stale_temps`
removes those of ``NAME`` whose process is gone; files of live processes and anything not
matching the pattern are left alone.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import uuid
from pathlib import Path

from emseg.errors import InputError

LOCK_NAME = ".emseg.lock"


def pid_alive(pid: int) -> bool:
    """Whether a process with id ``pid`` exists on this machine (ours counts as alive)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def temp_name(path: str | Path, tag: str | None = None) -> Path:
    """``DIR/.NAME.tmp-PID-RANDOM`` beside ``path``: the temp-file name :func:`clean_stale_temps` knows."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{tag or uuid.uuid4().hex[:8]}")


def clean_stale_temps(folder: str | Path, names: list[str] | tuple[str, ...] | None = None) -> list[Path]:
    """Remove ``.NAME.tmp-PID-*`` entries in ``folder`` whose process ``PID`` no longer runs.

    ``names`` limits the clean-up to temp files of those names (all ``NAME`` otherwise). Returns
    what was removed. Never raises for a file that vanished or cannot be removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)(-[0-9a-f]+)?$")
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or (names is not None and match["name"] not in names):
            continue
        if pid_alive(int(match["pid"])):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


class WriterLock:
    """An exclusive lock on ``path`` (a lock file), held from :meth:`acquire` to :meth:`release`.

    Use as a context manager. ``what`` names the locked thing in the error message.

    Examples
    --------
    >>> with WriterLock("runs/mito/.emseg.lock", what="runs/mito"):  # doctest: +SKIP
    ...     train_into("runs/mito")
    """

    def __init__(self, path: str | Path, *, what: str | None = None):
        self.path = Path(path)
        self.what = what or str(self.path.parent)
        self._fd: int | None = None

    def acquire(self) -> "WriterLock":
        for _ in range(20):  # a holder that releases while we open: retry on the new file
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise InputError(f"cannot create the lock file {self.path.name} ({exc.strerror})",
                                 source=self.what) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_pid(fd)
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise InputError(f"cannot lock {self.path.name} ({exc.strerror})", source=self.what) from None
                who = f"process {holder}" if holder else "another process"
                raise InputError(f"is in use by {who} (another emseg run writes here); wait for it to finish "
                                 f"or choose another output", source=self.what) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the file we locked was unlinked by a releasing holder
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
            return self
        raise InputError(f"could not lock {self.path.name}", source=self.what)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "WriterLock":
        return self if self.held else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode(errors="replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def lock_folder(folder: str | Path) -> WriterLock:
    """The lock of a run folder (``FOLDER/.emseg.lock``), acquired."""
    folder = Path(folder)
    return WriterLock(folder / LOCK_NAME, what=str(folder)).acquire()


def lock_output(target: str | Path, what: str | None = None) -> WriterLock:
    """The lock of a resumable output ``target`` (``.NAME.lock`` beside it), acquired."""
    target = Path(target)
    return WriterLock(target.with_name(f".{target.name.lstrip('.')}.lock"), what=what or str(target)).acquire()
