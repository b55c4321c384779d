"""The overwrite rule and the writer lock of every output (one shared check for all commands).

An output that is already there is never replaced by surprise: :func:`check_overwrite` refuses
it unless the caller's config says ``overwrite``. What counts as "there" depends on the target:

* a volume ``FILE.h5:DATASET``: the dataset (or group) ``DATASET`` in an existing file; other
  datasets of the file are kept by every writer, so adding one to an existing file is allowed;
* a volume ``FILE.zarr[/ARRAY]``: the array (or group) at that path, the whole store without one;
* a group ``FILE.h5:GROUP`` / ``FILE.zarr[/GROUP]`` (:func:`emseg.io.open_output_group`): the group,
  the whole file or store without one;
* any other file (JSON, CSV, a ``.zip`` package, a figure): the file.

:func:`claim_output` takes the writer lock of the output's container (``.NAME.lock`` beside it,
:func:`emseg.runtime.locks.lock_output`) and then applies the rule, so a second writer of the same
file or store is refused naming the first, whatever it writes.
"""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Iterable

import h5py

from emseg.errors import InputError
from emseg.io._files import check_output_location
from emseg.io._volume import VolumeSpec, parse_group_spec, parse_spec
from emseg.runtime.locks import WriterLock, lock_output

__all__ = ["check_overwrite", "claim_output", "claim_outputs"]

#: What the refusal says; `overwrite` becomes ``--overwrite`` on the command line.
_HINT = "pass `overwrite` to replace it, or choose another output"


def _h5_holds(path: Path, key: str) -> bool:
    try:
        with h5py.File(path, "r") as fh:
            return bool(key) and key in fh
    except OSError:  # unreadable: check_output_volume names the problem
        return False
    except (ValueError, KeyError):
        return False


def check_overwrite(target: str | Path | VolumeSpec, *, overwrite: bool, kind: str = "volume") -> None:
    """Raise :class:`InputError` when ``target`` holds data and ``overwrite`` is not set.

    Parameters
    ----------
    target : str, Path or VolumeSpec
        A volume spec (``kind="volume"``), a group spec (``kind="group"``, as
        :func:`emseg.io.parse_group_spec` reads it) or a plain file path (``kind="file"``).
    overwrite : bool
        The caller's permission to replace what is there.
    kind : {"volume", "group", "file"}

    Examples
    --------
    >>> check_overwrite("/nonexistent/new.h5:pred", overwrite=False)
    >>> check_overwrite(__file__, overwrite=False, kind="file")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    emseg.errors.InputError: ...: already exists; pass `overwrite` to replace it, or choose another output
    """
    if overwrite:
        return
    if kind == "file":
        path = Path(target)
        if path.exists() or path.is_symlink():
            raise InputError(f"already exists; {_HINT}", source=str(path))
        return
    if kind == "group":

        path, key, fmt = parse_group_spec(str(target))
        spec = VolumeSpec(path, key, fmt)
    else:
        spec = parse_spec(target)
    if not spec.path.exists():
        return
    if spec.fmt == "h5":
        if not spec.key:
            raise InputError(f"already exists; {_HINT}", source=str(spec.path))
        if _h5_holds(spec.path, spec.key):
            raise InputError(f"'{spec.key}' already exists in this file; {_HINT}", source=str(spec.path))
        return
    where = spec.path / spec.key if spec.key else spec.path
    if where.exists():
        raise InputError(f"already exists; {_HINT}", source=str(spec))


def _container(target: str | Path | VolumeSpec, kind: str) -> Path:
    if kind == "file":
        return Path(target)
    if kind == "group":

        return parse_group_spec(str(target))[0]
    return parse_spec(target).path


def claim_output(target: str | Path | VolumeSpec, *, overwrite: bool, kind: str = "volume",
                 check: bool = True) -> WriterLock:
    """Lock ``target``'s container for this writer, then apply :func:`check_overwrite`.

    Returns the acquired :class:`~emseg.runtime.locks.WriterLock`; hold it (``with``) until the
    output is committed or discarded. ``check=False`` only locks (a resumed output).
    """
    container = _container(target, kind)
    check_output_location(container)
    lock = lock_output(container, what=str(container))
    try:
        if check:
            check_overwrite(target, overwrite=overwrite, kind=kind)
    except BaseException:
        lock.release()
        raise
    return lock


def claim_outputs(targets: Iterable[tuple[str | Path | VolumeSpec, str]], *, overwrite: bool) -> ExitStack:
    """:func:`claim_output` of every ``(target, kind)`` (``None`` targets skipped), as one ExitStack.

    Every output is checked before any is written; on a refusal the locks taken so far are released.
    """
    stack = ExitStack()
    seen: set[Path] = set()
    try:
        for target, kind in targets:
            if target is None or target == "":
                continue
            container = _container(target, kind).resolve()
            if container in seen:  # two outputs in one container: one lock, each checked
                check_overwrite(target, overwrite=overwrite, kind=kind)
                continue
            seen.add(container)
            stack.enter_context(claim_output(target, overwrite=overwrite, kind=kind))
    except BaseException:
        stack.close()
        raise
    return stack
