"""``emseg.engine.cluster``: the block executor (retries, done markers, skips) and its chunk helpers."""
from __future__ import annotations

import importlib.util
import sys

import pytest

from emseg.engine.cluster import BlockFailed, DoneMarkers, fit_chunks, require_distributed, run_blocks
from emseg.errors import InputError
from emseg.engine.blocks import plan_blocks

HAVE_DASK = importlib.util.find_spec("distributed") is not None
needs_dask = pytest.mark.skipif(not HAVE_DASK, reason="dask.distributed is not installed (extra 'distributed')")
SHAPE = (4, 64, 64)
BLOCK = (2, 32, 32)  # 2 x 2 x 2 = 8 blocks
N_BLOCKS = 8


# ------------------------------------------------------------------------------ generic executor


def test_run_blocks_in_process_retries_marks_and_skips(tmp_path):
    attempts: dict[int, int] = {}

    def flaky(block):
        attempts[block.index] = attempts.get(block.index, 0) + 1
        if block.index == 2 and attempts[2] < 3:
            raise OSError("transient")
        return block.index * 10

    blocks = plan_blocks((4, 4), (2, 2), (0, 0))
    markers = DoneMarkers(tmp_path / "done")
    markers.mark(1)
    seen = []
    report = run_blocks(flaky, blocks, retries=2, done=markers, on_done=lambda b, r: seen.append((b.index, r)))
    assert report.skipped == [1] and sorted(report.computed) == [0, 2, 3]
    assert attempts == {0: 1, 2: 3, 3: 1}  # block 1 never ran, block 2 succeeded on its third attempt
    assert sorted(seen) == [(0, 0), (2, 20), (3, 30)]
    assert markers.done() == {0, 1, 2, 3}


def test_run_blocks_reports_the_block_after_retries(tmp_path):
    calls = []

    def broken(block):
        calls.append(block.index)
        if block.index == 3:
            raise ValueError("bad pixels\nsecond line")
        return None

    blocks = plan_blocks((4, 4), (2, 2), (1, 1))
    markers = DoneMarkers(tmp_path / "done")
    with pytest.raises(BlockFailed) as info:
        run_blocks(broken, blocks, retries=1, done=markers, failure_source="out.zarr")
    message = str(info.value)
    assert message.startswith("out.zarr: block 3 [2:4, 2:4] failed after 2 attempt(s) (ValueError: bad pixels)")
    assert "\n" not in message and isinstance(info.value, InputError)
    assert calls.count(3) == 2 and markers.done() == {0, 1, 2}  # the others finished and were recorded


def test_missing_dask_is_an_input_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(InputError, match=r"pip install 'emseg\[distributed\]'"):
        require_distributed()


def test_fit_chunks_tile_the_block():
    for block, chunks in [((16, 512, 512), (4, 256, 256)), ((12, 300, 500), (8, 256, 256)), ((3, 7), (8, 8))]:
        fitted = fit_chunks(block, chunks)
        assert all(b % c == 0 and c <= max(k, 1) for b, c, k in zip(block, fitted, chunks))
    assert fit_chunks((12, 300, 500), (8, 256, 256)) == (6, 150, 250)
    with pytest.raises(InputError, match="multiples"):
        fit_chunks((257,), (256,))  # a prime side only tiles into 1-voxel chunks
