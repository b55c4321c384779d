"""The parameters of ``emseg segment``: :class:`SegmentConfig`, also the ``[segment]`` table of a TOML file.

Every threshold and size is a field here (with its default), so that a benchmark can choose them
on validation data and a TOML file can carry the choice; the command line overrides single keys.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from emseg.errors import InputError
from emseg.io import read_toml
from emseg.runtime.choices import check_integer, check_number, check_table_keys

#: How objects are formed: connected components of a class set, or a seeded watershed between boundaries.
MODES = ("components", "watershed")
#: The watershed map's value where ``mask_classes`` exclude a voxel (above every probability).
OUTSIDE = 2.0


@dataclass(frozen=True)
class SegmentConfig:
    """How class probabilities become objects (uint64 instance labels).

    The class defaults follow the Drosophila VNC labels (1 mitochondria, 2 membrane, 3 synapse,
    4 glia / extracellular); the thresholds and sizes are starting points to be chosen on
    validation data.

    Attributes
    ----------
    mode : {"components", "watershed"}
        ``components``: connected components of the voxels of ``classes``. ``watershed``: cells
        enclosed by ``boundary_classes``, flooded from seeds on their boundary probability.
    classes : tuple of int
        The object classes of ``components``: a voxel is foreground when its argmax class is one
        of them, or, with ``threshold``, when their summed probability exceeds it.
    boundary_classes : tuple of int
        The boundary classes of ``watershed``: their summed probability is the boundary map.
    threshold : float or None
        ``components``: foreground = summed probability of ``classes`` > threshold; None: argmax.
    seed_threshold : float
        ``watershed``: seeds are the connected components of (boundary < seed_threshold), after
        ``seed_erosion`` erosions.
    seed_erosion : int
        Binary erosions (by the ``connectivity`` neighbourhood) of the seed region: separates
        cells that touch through a weak boundary.
    seed_min_size : int
        Seeds with fewer voxels (over the whole volume) are dropped; their region is flooded
        by neighbouring seeds.
    mask_threshold : float or None
        ``watershed``: flood only where boundary < mask_threshold (the rest stays 0); None:
        the whole volume (boundaries are split between the cells they separate).
    mask_classes : tuple of int or None
        ``watershed`` with ``mask_threshold``: compare the summed probability of these classes
        (the background) with ``mask_threshold`` instead of the boundary map, so that objects
        keep their boundary voxels: for a background / interior / boundary network, seeds and
        flooding from 1 - p(interior) (``boundary_classes`` 0, 2) inside p(background) <
        ``mask_threshold`` (``mask_classes`` 0). None: the boundary map.
    min_size : int
        Objects with fewer voxels (over the whole volume) are removed (set to 0).
    per_section : bool
        2D objects, section by section (z is not followed): the default for anisotropic ssTEM.
        False: 3D objects.
    connectivity : int
        Neighbourhood of connected components, erosion and watershed: 1 faces, 2 also edges,
        3 also corners (in 2D at most 2). With ``per_section`` it applies within each section.
    halo : tuple of int
        ``watershed``: context read around each block (z, y, x or a single value for every
        axis; z is 0 with ``per_section``). A block must be at least as large as its halo
        along every axis it does not span whole.
    block_shape : tuple of int or None
        Voxels labelled at once (volume axes); None: the prediction's blocks (whole sections
        of up to 1024 x 1024 for a 2D network), grown to the halo where needed.
    """

    mode: str = "components"
    classes: tuple[int, ...] = (1,)
    boundary_classes: tuple[int, ...] = (2, 3, 4)
    threshold: float | None = None
    seed_threshold: float = 0.1
    seed_erosion: int = 2
    seed_min_size: int = 8
    mask_threshold: float | None = None
    mask_classes: tuple[int, ...] | None = None
    min_size: int = 32
    per_section: bool = True
    connectivity: int = 1
    halo: tuple[int, ...] = (4, 32, 32)
    block_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("classes", "boundary_classes", "mask_classes", "halo", "block_shape"):  # int or list: tuple
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(int(v) for v in np.atleast_1d(value)))
        if self.mode not in MODES:
            raise InputError(f"`mode` must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("classes", "boundary_classes", "mask_classes"):
            values = getattr(self, name)
            if values is None:
                continue
            if not values:
                raise InputError(f"`{name}` is empty (need at least one class)")
            if any(v < 0 for v in values):
                raise InputError(f"`{name}` must be class indices >= 0, got {list(values)}")
            if len(set(values)) != len(values):
                raise InputError(f"`{name}` has duplicates: {list(values)}")
        if self.threshold is not None and not 0 <= self.threshold < 1:
            raise InputError(f"`threshold` must be in [0, 1), got {self.threshold}")
        if not 0 < self.seed_threshold <= 1:
            raise InputError(f"`seed_threshold` must be in (0, 1], got {self.seed_threshold}")
        if self.mask_threshold is not None:
            if not 0 < self.mask_threshold <= 1:
                raise InputError(f"`mask_threshold` must be in (0, 1], got {self.mask_threshold}")
            if self.mask_classes is None and self.mask_threshold < self.seed_threshold:
                raise InputError(f"`mask_threshold` {self.mask_threshold} must be >= `seed_threshold` "
                                 f"{self.seed_threshold} (seeds lie inside the mask)")
        if self.mask_classes is not None and self.mask_threshold is None:
            raise InputError("`mask_classes` needs a `mask_threshold` (flood where their probability is below it)")
        for name in ("seed_erosion", "min_size", "seed_min_size"):
            if getattr(self, name) < 0:
                raise InputError(f"`{name}` must be >= 0, got {getattr(self, name)}")
        if self.connectivity not in (1, 2, 3):
            raise InputError(f"`connectivity` must be 1, 2 or 3, got {self.connectivity}")
        if not 1 <= len(self.halo) <= 3 or any(h < 0 for h in self.halo):
            raise InputError(f"`halo` must be 1 to 3 sides >= 0, got {list(self.halo)}")
        if self.block_shape is not None and (not self.block_shape or any(b < 1 for b in self.block_shape)):
            raise InputError(f"`block_shape` sides must be positive, got {list(self.block_shape)}")

    # ----------------------------------------------------------------------------- for a volume

    @property
    def object_classes(self) -> tuple[int, ...]:
        """The classes this mode reads: ``classes`` or ``boundary_classes``."""
        return self.classes if self.mode == "components" else self.boundary_classes

    @property
    def class_key(self) -> str:
        return "classes" if self.mode == "components" else "boundary_classes"

    def flood_mask(self, boundary: np.ndarray) -> np.ndarray | None:
        """Where the watershed floods, from the map of :func:`~emseg.instances.objects.object_map`
        (None: everywhere). With ``mask_classes`` the map is :data:`OUTSIDE` beyond the mask."""
        if self.mask_classes is not None:
            return boundary < OUTSIDE
        return boundary < self.mask_threshold if self.mask_threshold is not None else None

    def halo_for(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The watershed's context per axis of a volume of ``shape`` (0 everywhere for components)."""
        nd = len(shape)
        if self.mode == "components":
            return (0,) * nd
        halo = self.halo * nd if len(self.halo) == 1 else self.halo[-nd:]
        halo = (0,) * (nd - len(halo)) + tuple(halo)
        if self.per_section and nd == 3:
            halo = (0,) + halo[1:]
        return tuple(int(h) for h in halo)

    def seed_halo_for(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Context the seed erosion needs per axis (0 along z with ``per_section``)."""
        nd = len(shape)
        if self.mode == "components":
            return (0,) * nd
        return tuple(0 if (self.per_section and nd == 3 and ax == 0) else int(self.seed_erosion) for ax in range(nd))

    def check_for(self, shape: Sequence[int], n_classes: int, *, source: str | None = None) -> None:
        """What depends on the volume and the model: class indices (``source`` names where the
        classes come from), connectivity, block against halo."""
        nd = len(shape)
        for key, classes in ((self.class_key, self.object_classes), ("mask_classes", self.mask_classes or ())):
            bad = [c for c in classes if c >= n_classes]
            if bad:
                raise InputError(f"`{key}` {bad[0]} is out of range: the model has {n_classes} classes "
                                 f"(0..{n_classes - 1})", source=source)
        if self.mode == "components" and len(self.classes) == n_classes and self.threshold is None:
            raise InputError(f"`classes` {list(self.classes)} are all {n_classes} classes: every voxel would be "
                             f"foreground", source=source)
        within = nd - 1 if (self.per_section and nd == 3) else nd
        if self.connectivity > within:
            raise InputError(f"`connectivity` {self.connectivity} exceeds {within}, the dimension objects are "
                             f"formed in")
        if self.block_shape is not None:
            check_block(self.block_shape, shape, self.halo_for(shape))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    def replace(self, **changes: Any) -> "SegmentConfig":
        """A copy with ``changes`` (``None`` values ignored), checked again."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def check_block(block_shape: Sequence[int], shape: Sequence[int], halo: Sequence[int], *,
                source: str | None = None) -> None:
    """A block has the volume's dimension and is at least its halo along every axis it does not span."""
    if len(block_shape) != len(shape):
        raise InputError(f"`block_shape` {tuple(block_shape)} does not fit a {len(shape)}D volume", source=source)
    for axis, (b, s, h) in enumerate(zip(block_shape, shape, halo)):
        if b < s and b < h:
            raise InputError(f"`block_shape` {tuple(block_shape)} is smaller than the halo {tuple(halo)} the "
                             f"stitching needs along axis {axis} (set by `halo`; a block must be at least its halo, "
                             f"or span the axis)", source=source)


def default_segment_block(shape: Sequence[int], block: Sequence[int], halo: Sequence[int]) -> tuple[int, ...]:
    """``block`` grown, where it splits an axis, to at least the halo (never past the volume)."""
    return tuple(b if b >= s else min(s, max(b, h)) for b, s, h in zip(block, shape, halo))


def segment_config_from_dict(data: Mapping[str, Any], *, source: str = "[segment]") -> SegmentConfig:
    """Build and check a :class:`SegmentConfig` from the ``[segment]`` table (a mapping).

    Examples
    --------
    >>> segment_config_from_dict({"mode": "watershed", "boundary_classes": [2], "halo": 16}).halo
    (16,)
    """
    data = dict(data)
    check_table_keys(data, SegmentConfig, "segment", source=source)
    try:
        for key in ("classes", "boundary_classes", "mask_classes", "halo", "block_shape"):
            if data.get(key) is not None:
                value = data[key]
                values = value if isinstance(value, (list, tuple)) else [value]
                data[key] = tuple(check_integer(v, f"`{key}`") for v in values)
        for key in ("threshold", "seed_threshold", "mask_threshold"):
            if data.get(key) is not None:
                data[key] = check_number(data[key], f"`{key}`")
        for key in ("seed_erosion", "seed_min_size", "min_size", "connectivity"):
            if key in data:
                data[key] = check_integer(data[key], f"`{key}`")
        if "per_section" in data and not isinstance(data["per_section"], bool):
            raise InputError(f"`per_section` must be true or false, got {data['per_section']!r}")
        if "mode" in data and not isinstance(data["mode"], str):
            raise InputError(f"`mode` must be a string, got {data['mode']!r}")
        return SegmentConfig(**data)
    except InputError as exc:
        raise InputError(f"[segment]: {exc}".splitlines()[0], source=source) from None
    except (TypeError, ValueError) as exc:
        raise InputError(f"[segment]: {exc}".splitlines()[0], source=source) from None


def load_segment_config(path: str | Path, *, overrides: Mapping[str, Any] | None = None) -> SegmentConfig:
    """The ``[segment]`` table of the TOML file ``path`` (other tables are ignored), with
    ``overrides`` (``None`` values ignored) applied over it.

    Examples
    --------
    >>> load_segment_config("segment.toml", overrides={"min_size": 100})  # doctest: +SKIP
    """
    table = read_toml(path).get("segment")
    if table is None:
        raise InputError("has no [segment] table", source=str(path))
    if not isinstance(table, dict):
        raise InputError("`segment` must be a table ([segment])", source=str(path))
    table = dict(table)
    table.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return segment_config_from_dict(table, source=str(path))
