"""Sample values in and out of the network (emseg.data.values)."""
from __future__ import annotations

import numpy as np
import pytest

from emseg.data.values import to_float, to_output


@pytest.mark.parametrize("dtype, scale", [(np.uint8, 255), (np.uint16, 65535), (np.int16, 32767)])
def test_to_float_scales_integers_by_dtype_max(dtype, scale):
    block = np.array([[0, 1], [scale // 2, scale]], dtype=dtype)
    out = to_float(block)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, block.astype(np.float64) / scale, rtol=1e-6)


def test_to_float_passes_floats_through():
    block = np.array([-3.5, 0.25, 1e4], dtype=np.float64)
    out = to_float(block)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, block.astype(np.float32))


def test_uint8_probabilities_round_to_the_nearest_step():
    probs = np.random.default_rng(0).random((3, 4, 50), dtype=np.float32)
    probs[0, 0, :2] = [0.0, 1.0]
    out = to_output(probs.copy(), "probabilities", "uint8")
    assert out.dtype == np.uint8 and out[0, 0, 0] == 0 and out[0, 0, 1] == 255
    exact = probs.astype(np.float64) * 255
    clear = np.abs(exact - np.floor(exact) - 0.5) > 1e-4  # not within float32 rounding of a half step
    np.testing.assert_array_equal(out[clear], np.round(exact[clear]).astype(np.uint8))
    assert np.abs(out / 255.0 - probs).max() <= 0.5 / 255 + 1e-7
    with pytest.raises(ValueError):
        to_output(probs, "logits")
    with pytest.raises(ValueError):
        to_output(probs, "probabilities", "float16")
