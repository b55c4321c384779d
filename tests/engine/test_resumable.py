"""The resume protocol of blockwise writers (emseg.engine.resumable)."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import zarr

from emseg.engine.blocks import plan_blocks
from emseg.engine.cluster import BlockFailed
from emseg.engine.resumable import run_resumable
from emseg.errors import InputError

SHAPE = (2, 32, 32)


def _write_index(block, *, store: str, key: str, fail: frozenset = frozenset(), calls: list | None = None) -> int:
    """Fill the block's inner region with its index + 1 (module level, so that it pickles)."""
    if calls is not None:
        calls.append(block.index)
    if block.index in fail:
        raise RuntimeError("on purpose")
    dest = zarr.open_array(store=store, path=key or None, mode="r+")
    dest[block.inner] = block.index + 1
    return block.index


def _run(out, blocks, calls, fail=frozenset(), progress=None, params=None):
    def make_task(part):
        return functools.partial(_write_index, store=part.store, key=part.key, fail=fail, calls=calls)

    return run_resumable(make_task, blocks, f"{out}", SHAPE, "uint16", (1, 16, 16), attrs={"kind": "index"},
                         params=params or {"version": 1}, weight=lambda block: block.size, retries=0,
                         progress=progress)


def test_a_failed_run_resumes_with_only_the_missing_blocks_and_then_appears_whole(tmp_path):
    out = tmp_path / "out.zarr"
    blocks = plan_blocks(SHAPE, (1, 16, 16), (0, 0, 0))
    calls: list[int] = []
    with pytest.raises(BlockFailed):
        _run(out, blocks, calls, fail=frozenset({2, 5}))
    assert not out.exists() and (tmp_path / "out.zarr.partial").is_dir()  # the final name only when complete
    assert sorted(calls) == list(range(len(blocks)))

    seen: list[tuple[int, int]] = []
    calls.clear()
    run = _run(out, blocks, calls, progress=lambda done, total: seen.append((done, total)))
    assert sorted(calls) == [2, 5] and sorted(run.computed) == [2, 5] and len(run.skipped) == len(blocks) - 2
    total = int(np.prod(SHAPE))
    # progress starts at the voxels found done, ends at the whole volume
    assert seen[0] == (total - 2 * 16 * 16, total) and seen[-1] == (total, total)
    expected = np.zeros(SHAPE, np.uint16)
    for b in blocks:
        expected[b.inner] = b.index + 1
    array = zarr.open_array(str(out), mode="r")
    np.testing.assert_array_equal(array[:], expected)
    assert "emseg_resume" not in array.attrs and array.attrs["kind"] == "index"
    assert not (tmp_path / "out.zarr.partial").exists()


def test_a_partial_started_with_other_parameters_is_refused(tmp_path):
    out = tmp_path / "out.zarr"
    blocks = plan_blocks(SHAPE, (1, 16, 16), (0, 0, 0))
    with pytest.raises(BlockFailed):
        _run(out, blocks, [], fail=frozenset({0}), params={"version": 1})
    with pytest.raises(InputError, match=r"with other parameters is here \(version 1 -> 2\)"):
        _run(out, blocks, [], params={"version": 2})
