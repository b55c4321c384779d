"""Sample values in and out of the network: raw intensities as float32, predictions as what is stored."""
from __future__ import annotations

import numpy as np

from emseg.errors import InputError


def to_float(block: np.ndarray, dtype: np.dtype | None = None) -> np.ndarray:
    """Raw intensities as float32: integer types divided by their maximum (uint8 -> [0, 1]).

    Floating-point raw data are passed through unchanged.
    """
    dtype = np.dtype(dtype if dtype is not None else block.dtype)
    out = np.asarray(block, dtype=np.float32)
    if np.issubdtype(dtype, np.integer):
        out = out / np.float32(np.iinfo(dtype).max)
    return out


#: Sample types of probability outputs: float32, or uint8 scaled to 0-255 (p ~ value / 255).
PROBABILITY_DTYPES = ("float32", "uint8")


def to_output(data: np.ndarray, output_type: str, dtype: str = "float32") -> np.ndarray:
    """What is written for a block: probabilities as float32 or uint8 (``round(255 p)``, computed in
    place); labels (already uint8 from :func:`emseg.engine.inference.predict_block`) as they are."""
    if output_type == "labels":
        return data.astype(np.uint8, copy=False)
    if output_type != "probabilities":
        raise InputError(f"output type must be 'probabilities' or 'labels', got {output_type!r}")
    if dtype == "uint8":
        data = np.multiply(data, 255.0, out=data if data.dtype == np.float32 and data.flags.writeable else None,
                           dtype=np.float32)
        return np.rint(data, out=data).astype(np.uint8)
    if dtype != "float32":
        raise InputError(f"probabilities are written as float32 or uint8, not {dtype!r}")
    return data.astype(np.float32, copy=False)
