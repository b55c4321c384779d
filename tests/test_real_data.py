"""Checks on the real drosophila VNC stack (../shared/data); skipped when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from emseg.io import VolumeRegion, check_raw, open_volume, read_info, validate_labels

ROOT = Path(os.environ.get("EMSEG_DATA", Path(__file__).resolve().parents[2] / "shared/data/drosophila_vnc"))
STACK = ROOT / "vnc_stack1.h5"
pytestmark = pytest.mark.skipif(not STACK.exists(), reason="drosophila VNC data not available")

# Class fractions of stack 1 as published in the data set's README (percent).
README_FRACTIONS = [74.06, 5.38, 17.16, 0.56, 2.85]


def test_stack_validates_and_class_fractions_match_its_readme():
    with open_volume(f"{STACK}:raw") as raw, open_volume(f"{STACK}:label") as label:
        assert raw.shape == label.shape == (20, 1024, 1024)
        check_raw(raw)
        info = read_info(f"{STACK}:label", 5)
        assert info.tolist() == [[1] * 5, [0] * 5]  # no info dataset: all labelled, none absent
        counts = validate_labels(label, 5, raw=raw, info=info)
    fractions = 100 * counts / counts.sum()
    np.testing.assert_allclose(fractions, README_FRACTIONS, atol=0.006)


def test_region_view_reads_the_same_voxels_as_direct_slicing():
    with open_volume(f"{STACK}:raw") as raw:
        view = VolumeRegion(raw, [(15, 20), (100, 300)])
        assert view.shape == (5, 200, 1024)
        np.testing.assert_array_equal(view[1:3, 5:9, -4:], raw[16:18, 105:109, 1020:1024])
