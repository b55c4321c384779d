"""``emseg.engine.blocks``: block plans tile the volume exactly once, halos stay inside it."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from emseg.engine.blocks import Block, default_block_shape, plan_blocks


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 23), min_size=2, max_size=3), data=st.data())
def test_inner_regions_tile_the_volume_once_and_halos_are_clipped(shape, data):
    block = [data.draw(st.integers(1, s + 3)) for s in shape]
    halo = [data.draw(st.integers(0, 4)) for _ in shape]
    blocks = plan_blocks(shape, block, halo)
    covered = np.zeros(shape, dtype=np.int64)
    for b in blocks:
        covered[b.inner] += 1
        for i, o, s, h in zip(b.inner, b.outer, shape, halo):
            # the outer region is the inner one grown by the halo, cut at the volume's faces
            assert o.start == max(0, i.start - h) and o.stop == min(s, i.stop + h)
        view = np.arange(int(np.prod(shape))).reshape(shape)
        np.testing.assert_array_equal(view[b.outer][b.inner_in_outer], view[b.inner])
        assert b.size == int(np.prod([i.stop - i.start for i in b.inner]))
    assert (covered == 1).all()  # every voxel written by exactly one block
    assert [b.index for b in blocks] == list(range(len(blocks)))


def test_block_size_and_inner_in_outer_by_hand():
    b = Block(0, (slice(4, 8), slice(0, 3)), (slice(2, 10), slice(0, 5)))
    assert b.size == 12 and b.inner_in_outer == (slice(2, 6), slice(0, 3))


@settings(max_examples=40, deadline=None)
@given(z=st.integers(1, 40), y=st.integers(8, 3000), x=st.integers(8, 3000),
       chunk=st.sampled_from([16, 64, 128]), pz=st.sampled_from([1, 8]))
def test_default_blocks_are_chunk_multiples_and_hold_a_patch(z, y, x, chunk, pz):
    patch = (min(pz, z), min(64, y), min(64, x))
    chunks = (1, chunk, chunk)
    shape = default_block_shape((z, y, x), patch, chunks)
    assert all(s % c == 0 for s, c in zip(shape, chunks))
    # never wider than the volume rounded up to whole chunks, never narrower than a patch or a chunk
    for side, size, p, c in zip(shape, (z, y, x), patch, chunks):
        assert side <= -(-size // c) * c
        assert side >= min(-(-size // c) * c, max(p, c))
