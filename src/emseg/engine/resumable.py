"""The resume protocol of every blockwise writer (``emseg predict --scheduler/--resume``, ``emseg noise
--scheduler``).

Tasks write their own chunks of a fixed ``.partial`` zarr array whose attributes hold the run's
parameters (:func:`resumable_zarr`); each finished block leaves a done marker
(:class:`~emseg.engine.cluster.DoneMarkers`), so a rerun with the same parameters computes only the
missing blocks; the array is renamed into place when every block is done, so the final name
appears only complete. :func:`run_resumable` is the whole loop: the partial, the blocks run by
:func:`~emseg.engine.cluster.run_blocks` in this process or on a dask cluster, and the progress of
a run that continues.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import zarr

from emseg.engine.cluster import BlockRun, DoneMarkers, require_distributed, run_blocks
from emseg.errors import InputError
from emseg.io import (VolumeSpec, check_output_location, check_overwrite, claim_output, clean_output_temps,
                      is_ome_path, parse_spec, replace_output,
                      zarr_compressors)
from emseg.runtime.locks import lock_output

#: Attribute of a partial output holding the parameters it was started with.
RESUME_ATTR = "emseg_resume"
PARTIAL_SUFFIX = ".partial"
DONE_DIR = ".done"


def partial_location(spec) -> tuple[Path, str, Path, Path]:
    """(store, key, partial folder, final folder) of the partial zarr output of ``spec``.

    ``out.zarr`` is written as ``out.zarr.partial``; ``out.zarr/pred/probs`` as
    ``out.zarr/pred/.probs.partial``. Both names are fixed, so a rerun finds them.
    """
    if spec.key:
        parent, _, name = spec.key.rpartition("/")
        key = f"{parent}/.{name}{PARTIAL_SUFFIX}" if parent else f".{name}{PARTIAL_SUFFIX}"
        return spec.path, key, spec.path / key, spec.path / spec.key
    store = spec.path.with_name(spec.path.name + PARTIAL_SUFFIX)
    return store, "", store, spec.path


def check_resumable_output(spec: VolumeSpec, *, overwrite: bool) -> None:
    """A resumable output may continue its own ``.partial``; a finished output there is kept
    unless ``overwrite`` (:func:`emseg.io.check_overwrite`)."""
    if not partial_location(spec)[2].exists():
        check_overwrite(spec, overwrite=overwrite)


def check_resumable_options(output: str, *, scheduler: str | None, workers: int | None, resume: bool,
                            client: Any = None, command: str = "predict",
                            example: str = "pred.zarr/probs") -> VolumeSpec:
    """The options of a blockwise writer that can run on a cluster or resume: ``workers`` only with
    a local scheduler; a resumable run (``scheduler``, ``client`` or ``resume``) writes plain zarr
    (``example``) in a folder that exists, and a scheduler needs dask.distributed. Returns the
    parsed output spec."""
    if workers is not None and scheduler != "local" and client is None:
        raise InputError("`workers` applies only when `scheduler` is 'local'")
    out_spec = parse_spec(output)
    if scheduler is None and client is None and not resume:
        return out_spec
    if is_ome_path(out_spec.path):
        raise InputError(f"`scheduler` and `resume` write plain zarr; {command} in-process for an OME-Zarr output",
                         source=str(output))
    check_output_location(out_spec.path)
    if out_spec.fmt != "zarr":
        what = "`scheduler`" if scheduler or client is not None else "`resume`"
        raise InputError(f"{what} needs a zarr output (e.g. {example}): blocks are written in place by "
                         f"independent tasks, which HDF5 files do not allow", source=str(out_spec))
    if client is None and scheduler is not None:
        require_distributed()
    return out_spec


def check_resume_params(stored: Any, params: dict[str, Any], partial: Path) -> None:
    if stored == params:
        return
    if not isinstance(stored, dict):
        diff = ["(no parameters recorded)"]
    else:
        diff = [f"{k} {stored.get(k)!r} -> {params.get(k)!r}" for k in sorted(set(stored) | set(params))
                if stored.get(k) != params.get(k)]
    raise InputError(f"an unfinished run with other parameters is here ({'; '.join(diff)}): rerun with "
                     f"the original parameters to resume it, or delete it to start over", source=str(partial))


@dataclass(frozen=True)
class PartialZarr:
    """The ``.partial`` array a resumable run writes: open it with ``store`` and ``key``."""

    store: str
    key: str
    #: The partial folder, and the folder it becomes when complete.
    path: Path
    final: Path
    markers: DoneMarkers

    @property
    def hint(self) -> str:
        """The advice of a :class:`BlockFailed` raised while this partial is written."""
        return f"finished blocks are kept in {self.path}: rerun the same command to compute only the missing ones"


@contextlib.contextmanager
def resumable_zarr(spec: str | VolumeSpec, shape: Sequence[int], dtype: Any, chunks: Sequence[int], *,
                   attrs: dict[str, Any], params: dict[str, Any], what: str | None = None,
                   overwrite: bool = False) -> Iterator[PartialZarr]:
    """Create or reopen the ``.partial`` zarr array of output ``spec``; rename it into place on success.

    The partial (see :func:`partial_location`) is locked (:func:`emseg.runtime.locks.lock_output`) while it
    is written, so one writer at a time. A new partial gets ``attrs`` plus ``params`` under
    :data:`RESUME_ATTR`; an existing one must hold the same ``params`` (else InputError, naming what
    differs). The caller runs its blocks with ``done=partial.markers``; when the ``with`` block ends
    without an exception the array is renamed to its final name (data first, then the bookkeeping:
    a crash in between leaves a complete output with a stale attribute, never a partial without
    its parameters). On an exception the partial and its markers stay for the next run.

    Examples
    --------
    >>> with resumable_zarr("out.zarr/probs", shape, "float32", chunks, attrs={}, params=p) as part:  # doctest: +SKIP
    ...     run_blocks(task, blocks, done=part.markers, failure_hint=part.hint)
    """
    spec = parse_spec(spec)
    what = what or str(spec)
    spec = VolumeSpec(Path(spec.path).resolve(), spec.key, spec.fmt)
    store, key, partial, final = partial_location(spec)
    if not final.parent.exists() and not spec.key:
        raise InputError("output folder does not exist", source=str(final.parent))
    params = json.loads(json.dumps(params))
    dtype = np.dtype(dtype)
    if key:  # the group holding the partial array (and its lock file)
        root = zarr.open_group(store=str(store), mode="a")
        if key.rpartition("/")[0]:
            root.require_group(key.rpartition("/")[0])
    with claim_output(spec, overwrite=overwrite, check=False), lock_output(partial, what=what):
        clean_output_temps(spec)
        check_resumable_output(spec, overwrite=overwrite)
        if partial.exists():
            try:
                stored = zarr.open_array(store=str(store), path=key or None, mode="r+").attrs.get(RESUME_ATTR)
            except Exception:  # noqa: BLE001 - unreadable partial: reported as "no parameters recorded"
                stored = None
            check_resume_params(stored, params, partial)
        else:
            zarr.create_array(store=str(store), name=key or None, shape=tuple(shape), dtype=dtype,
                              chunks=tuple(chunks), compressors=zarr_compressors(dtype), fill_value=0,
                              attributes=dict(attrs, **{RESUME_ATTR: params}))
        yield PartialZarr(str(store), key, partial, final, DoneMarkers(partial / DONE_DIR))
        replace_output(partial, final)
        array = zarr.open_array(store=str(spec.path), path=spec.key or None, mode="r+")
        del array.attrs[RESUME_ATTR]
        DoneMarkers(final / DONE_DIR).clear()


def run_resumable(make_task: Callable[[PartialZarr], Callable[[Any], Any]], blocks: Sequence[Any],
                  spec: str | VolumeSpec, shape: Sequence[int], dtype: Any, chunks: Sequence[int], *,
                  attrs: dict[str, Any], params: dict[str, Any], weight: Callable[[Any], int] = lambda block: 1,
                  scheduler: str | None = None, workers: int | None = None, client: Any = None,
                  retries: int = 2, progress: Callable[[int, int], None] | None = None,
                  overwrite: bool = False, what: str | None = None) -> BlockRun:
    """Write ``blocks`` into the resumable output ``spec``: :func:`resumable_zarr` around
    :func:`~emseg.engine.cluster.run_blocks`.

    ``make_task(partial)`` returns the picklable task that computes one block and writes it into
    ``partial.store`` / ``partial.key``. ``progress(done, total)`` counts ``weight(block)`` (1 per
    block unless given), blocks found done at once. A failure is a
    :class:`~emseg.engine.cluster.BlockFailed` naming ``what`` (default: ``spec``); the finished
    blocks stay for the rerun.
    """
    what = what or str(spec)
    total = sum(weight(b) for b in blocks)
    with resumable_zarr(spec, shape, dtype, chunks, attrs=attrs, params=params, what=what,
                        overwrite=overwrite) as part:
        finished = part.markers.done()
        done = [sum(weight(b) for b in blocks if b.index in finished)]
        if progress is not None:
            progress(done[0], total)

        def on_done(block: Any, _result: Any) -> None:
            done[0] += weight(block)
            if progress is not None:
                progress(done[0], total)

        return run_blocks(make_task(part), blocks, scheduler=scheduler, workers=workers, client=client,
                          retries=retries, done=part.markers, on_done=on_done, failure_source=what,
                          failure_hint=part.hint)
