"""The output-container protocol and the helpers every staged output shares.

Every output of emseg (one array or a group of arrays, HDF5, zarr or OME-Zarr) is a
:class:`StagedOutput`: it is written under a hidden temporary name beside its final place
(:func:`staging_tag`) and published by :meth:`~StagedOutput.commit`, one rename
(:func:`replace_output`), so a reader sees either the old output or the complete new one;
:meth:`~StagedOutput.discard` removes the temporary data and leaves any previous output as it was.
As a context manager, leaving the ``with`` block normally commits and an exception discards.
"""
from __future__ import annotations

import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import zarr

__all__ = ["StagedArray", "StagedOutput", "auto_chunks", "replace_output", "staging_tag", "zarr_compressors"]


class StagedOutput:
    """Base of every output container: ``commit()`` publishes, ``discard()`` throws away.

    Subclasses implement :meth:`commit` (idempotent) and :meth:`discard`; this class gives them
    the context-manager behaviour.
    """

    #: The writer lock of the output (:func:`emseg.io.claim_output`), released by :meth:`release_claim`.
    claim: Any = None

    def commit(self) -> None:
        raise NotImplementedError

    def discard(self) -> None:
        raise NotImplementedError

    def release_claim(self) -> None:
        """Drop the output's writer lock, if this output holds one (after commit or discard)."""
        claim, self.claim = self.claim, None
        if claim is not None:
            claim.release()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.commit()
            else:
                self.discard()
        finally:
            self.release_claim()


class StagedArray(StagedOutput):
    """A staged output of one array (``self.array``): sliceable for writing and reading back."""

    array: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def attrs(self):
        return self.array.attrs

    def __setitem__(self, index, value) -> None:
        self.array[index] = value

    def __getitem__(self, index) -> np.ndarray:
        return np.asarray(self.array[index])


def staging_tag() -> str:
    """The suffix of a temporary name: ``tmp-PID-RANDOM`` (dead runs' temps are found by the PID)."""
    return f"tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def auto_chunks(shape: Iterable[int], itemsize: int, target_bytes: int = 1 << 20) -> tuple[int, ...]:
    """Chunk shape of about ``target_bytes``: whole trailing (in-plane) axes first, then sections.

    Leading axes (channels, z) get chunk 1 until the trailing axes fill the budget.
    """
    shape = tuple(int(s) for s in shape)
    budget = max(1, target_bytes // max(1, itemsize))
    chunks = [1] * len(shape)
    # Fill from the last axis backwards, keeping in-plane chunks square-ish.
    if len(shape) >= 2:
        side = int(math.sqrt(budget))
        chunks[-1] = min(shape[-1], side)
        chunks[-2] = min(shape[-2], max(1, budget // chunks[-1]))
        remaining = budget // (chunks[-1] * chunks[-2])
        for ax in range(len(shape) - 3, -1, -1):
            chunks[ax] = max(1, min(shape[ax], remaining))
            remaining = max(1, remaining // chunks[ax])
    else:
        chunks[0] = min(shape[0], budget)
    return tuple(max(1, c) for c in chunks)


def replace_output(tmp: Path, final: Path) -> None:
    """Move ``tmp`` (file or directory) onto ``final``, replacing what was there.

    A file is replaced atomically. A directory is swapped with two renames, so a reader sees either
    the old or the new tree, never a half-written one.
    """
    tmp, final = Path(tmp), Path(final)
    if tmp.is_dir() and final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    else:
        os.replace(tmp, final)


def zarr_compressors(dtype: np.dtype) -> list:
    """The codecs of every zarr output: blosc zstd, bit-shuffled for bytes, byte-shuffled otherwise."""
    shuffle = "bitshuffle" if dtype.itemsize == 1 else "shuffle"
    return [zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle=shuffle)]
