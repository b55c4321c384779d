"""Small files written atomically (JSON, CSV, text, matplotlib figures) and JSON-safe conversion."""
from __future__ import annotations

import json
import math
import os
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Mapping

from emseg.errors import InputError


def save_figure(fig: Any, path: str | Path, *, dpi: int) -> Path:
    """Save a matplotlib figure to ``path`` under a temporary name, rename it into place, close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}{path.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


#: The largest config file read (a config is a few kilobytes).
MAX_CONFIG_BYTES = 1 << 20


def read_toml(path: str | Path, *, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Parse a TOML file; a missing file or a syntax error is an :class:`InputError` naming it.

    ``overrides`` replace keys (``None`` values are ignored); dotted keys reach into tables, e.g.
    ``{"optim.lr": 1e-4}``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such config file", source=str(path))
    if not path.is_file():
        raise InputError("is not a file", source=str(path))
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise InputError(f"too large for a config file ({path.stat().st_size:,} bytes; at most "
                         f"{MAX_CONFIG_BYTES:,})", source=str(path))
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise InputError(f"not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}); a config is TOML",
                         source=str(path)) from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"invalid TOML ({exc})".splitlines()[0], source=str(path)) from None
    except RecursionError:
        raise InputError("invalid TOML (nested too deeply)", source=str(path)) from None
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        parent, _, name = key.rpartition(".")
        target = table.setdefault(parent, {}) if parent else table
        target[name] = value
    return table


def read_json_file(path: str | Path, *, what: str, max_bytes: int) -> Any:
    """The JSON document in ``path``: at most ``max_bytes``, UTF-8, nested no deeper than Python's
    parser allows; anything else is an :class:`InputError` naming the file (``what``: "an answers
    file", say, in the messages)."""
    path = Path(path)
    src = str(path)
    if not path.is_file():
        raise InputError("no such file" if not path.exists() else "is not a file", source=src)
    size = path.stat().st_size
    if size > max_bytes:
        raise InputError(f"too large for {what} ({size:,} bytes; at most {max_bytes:,})", source=src)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError("not JSON (not UTF-8 text)", source=src) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"not JSON ({exc.msg} at line {exc.lineno})", source=src) from None
    except RecursionError:
        raise InputError(f"not {what} (nested too deeply)", source=src) from None


def json_objects(items: list, noun: str, expected: str, src: str) -> Iterator[tuple[int, str, dict]]:
    """``(number, where, entry)`` for each entry of a list read with :func:`read_json_file`: its
    1-based ``number`` and ``where`` = ``"NOUN NUMBER"`` for the messages; an entry that is not a
    JSON object is an :class:`InputError` ("WHERE: expected an object with EXPECTED")."""
    for number, entry in enumerate(items, start=1):
        where = f"{noun} {number}"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: expected an object with {expected}", source=src)
        yield number, where, entry


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary name beside ``path``, then rename it into place."""
    path = Path(path)
    if not path.parent.exists():
        raise InputError("output folder does not exist", source=str(path.parent))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def json_safe(obj: Any) -> Any:
    """Plain JSON data: NaN/inf become None, numpy/torch scalars become Python numbers, tuples lists."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 0) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def atomic_write_json(path: str | Path, data: Any, *, indent: int = 2) -> None:
    """Write ``json_safe(data)`` atomically (strict JSON: no NaN)."""
    atomic_write_text(path, json.dumps(json_safe(data), indent=indent, allow_nan=False) + "\n")


def check_output_location(path: str | Path, *, folder: bool = False, must_exist_parent: bool = True) -> None:
    """Raise :class:`InputError` when ``path`` cannot be written, before any work starts.

    The nearest existing ancestor must be a folder (``/dev/null/x`` is refused); with
    ``must_exist_parent`` the parent itself must exist. ``folder`` means ``path`` is a folder to
    create or reuse, so an existing file there is refused too.
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise InputError("exists and is not a folder", source=str(path))
    parent = path.parent
    ancestor = parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise InputError(f"cannot write here: {ancestor} is a file, not a folder", source=str(path))
    if must_exist_parent and not parent.exists():
        raise InputError("output folder does not exist", source=str(parent))
    if ancestor.exists() and not os.access(ancestor, os.W_OK):
        raise InputError(f"cannot write here: {ancestor} is not writable", source=str(path))
