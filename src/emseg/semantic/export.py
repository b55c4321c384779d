"""Export a trained checkpoint as a bioimage.io model package (model spec 0.5).

The package (a zip) holds ``rdf.yaml``, the architecture source (the U-Net module of emseg, made
self-contained, with a class returning softmax probabilities), ``pytorch_state_dict`` weights and a
TorchScript trace of the same network, test input and output tensors computed by emseg's own
sliding window, a cover image, a README describing the training data, and the licence and
citations (emseg's and those carried by the training data files).
"""
from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import struct
import tempfile
import uuid
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import torch

from emseg import __version__
from emseg.data.values import to_float
from emseg.engine.inference import SlidingWindow, softmax_forward
from emseg.errors import InputError
from emseg.io import check_output_location, check_overwrite, claim_output, open_volume, parse_spec
from emseg.models import UNet, build_model, conditioning, unet
from emseg.models.checkpoint import check_model_config, load_checkpoint, model_from_state
from emseg.synthetic import make_volume

FORMAT_VERSION = "0.5.4"
WRAPPER = '''

class EmsegProbabilities(UNet):
    """The emseg U-Net returning class probabilities (softmax; sigmoid for one channel)."""

    def forward(self, x):
        logits = super().forward(x)
        return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)
'''


@dataclass(frozen=True)
class ExportResult:
    output: str
    axes: str
    patch_shape: tuple[int, ...]
    halo: tuple[int, ...]
    n_classes: int
    files: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.output, "axes": self.axes, "patch_shape": list(self.patch_shape),
                "halo": list(self.halo), "n_classes": self.n_classes, "files": list(self.files)}


def architecture_source() -> str:
    """One importable file: emseg's conditioning and U-Net modules plus :data:`WRAPPER`."""

    parts = []
    for module in (conditioning, unet):
        text = inspect.getsource(module)
        text = re.sub(r"^from __future__ import annotations\n", "", text, flags=re.M)
        text = re.sub(r"^from emseg\.models\.conditioning import .*\n", "", text, flags=re.M)
        parts.append(text)
    return "from __future__ import annotations\n" + "\n\n".join(parts) + WRAPPER


def write_png(path: Path, rgb: np.ndarray) -> None:
    """A minimal 8-bit RGB PNG writer (no imaging library needed)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.write_bytes(png)


def _cover(raw: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Raw section beside the predicted labels in colour, at least 256 pixels high."""
    grey = np.repeat(raw[..., None], 3, axis=-1).astype(np.uint8)
    palette = np.array([[0, 0, 0], [230, 80, 60], [60, 160, 230], [250, 200, 40], [120, 200, 90], [200, 90, 220]])
    labels = probs.argmax(0)
    colour = (0.5 * grey + 0.5 * palette[labels % len(palette)]).astype(np.uint8)
    image = np.concatenate([grey, colour], axis=1)
    k = max(1, int(np.ceil(256 / image.shape[0])))
    return image.repeat(k, 0).repeat(k, 1)


def _training_sources(config: dict) -> list[dict[str, Any]]:
    """The training cubes of a checkpoint's config with what their files say about themselves."""

    out = []
    for cube in config.get("train", []) or []:
        entry: dict[str, Any] = {"raw": cube.get("raw"), "label": cube.get("label")}
        try:
            spec = parse_spec(cube["raw"])
            if spec.fmt == "h5" and spec.path.exists():
                with h5py.File(spec.path, "r") as fh:
                    for key in ("dataset", "citation", "doi", "license", "source"):
                        if key in fh.attrs:
                            entry[key] = str(fh.attrs[key])
        except Exception:
            pass
        out.append(entry)
    return out


def export_model(model_path: str | Path, output: str | Path, *, test_input: str | None = None,
                 name: str | None = None, license: str = "MIT", authors: Sequence[str] = ("emseg user",),
                 halo: Sequence[int] | None = None, overwrite: bool = False) -> ExportResult:
    """Write the bioimage.io package of checkpoint ``model_path`` to ``output`` (a ``.zip``).

    ``test_input`` (a volume spec) gives the test tensor, the central patch of its middle section;
    without it a synthetic EM-like patch is used. ``halo`` (per spatial axis) defaults to a quarter
    of the patch, the border emseg's sliding window blends away.

    Examples
    --------
    >>> export_model("runs/mito/best.pt", "mito.zip", test_input="vnc.h5:raw")  # doctest: +SKIP
    """

    output = Path(output)
    if output.suffix.lower() != ".zip":
        raise InputError("the package is a .zip file", source=str(output))
    check_output_location(output)
    check_overwrite(output, overwrite=overwrite, kind="file")
    state = load_checkpoint(model_path)
    model_config = check_model_config(state["model_config"], source=str(model_path))
    if model_config.get("cond_channels"):
        raise InputError("label-conditioned checkpoints cannot be exported", source=str(model_path))
    config = state.get("config") or {}
    model = model_from_state(state, source=str(model_path))
    ndim = int(model.ndim)
    patch = tuple(int(p) for p in (config.get("patch_shape") or [64] * ndim))[-ndim:]
    halo = tuple(int(h) for h in (halo if halo is not None else [p // 4 for p in patch]))
    if len(halo) != ndim or any(not 0 <= h < p / 2 for h, p in zip(halo, patch)):
        raise InputError(f"halo {halo} must have {ndim} values, each below half the patch {patch}")
    n_classes = int(model_config["out_channels"])
    space = ("z", "y", "x")[3 - ndim:]
    # the test tensor: a patch of the given volume, or the synthetic generator's
    if test_input is not None:
        with open_volume(test_input) as vol:
            shape = vol.shape
            box = tuple(slice(max(0, (s - p) // 2), max(0, (s - p) // 2) + p)
                        for s, p in zip(shape[-ndim:], patch))
            lead = tuple(s // 2 for s in shape[:-ndim])
            raw = np.asarray(vol[lead + box])
    else:

        raw = make_volume((1,) * (3 - ndim) + patch if ndim == 2 else patch, rng=0).raw.reshape(patch)
    if raw.shape != patch:
        raise InputError(f"the test input must hold a patch {patch}, got {raw.shape}", source=str(test_input))
    raw = raw.astype(np.uint8) if raw.dtype != np.uint8 and raw.max() <= 255 and raw.min() >= 0 else raw
    window = SlidingWindow(softmax_forward(model), patch, divisor=model.divisor, overlap=0.0, batch_size=1)
    probs = window(to_float(raw, raw.dtype)).astype(np.float32)
    tmp = Path(tempfile.mkdtemp(prefix=".emseg-export-", dir=output.parent))
    try:
        (tmp / "emseg_unet.py").write_text(architecture_source())
        torch.save(model.state_dict(), tmp / "weights.pt")
        wrapped = _wrapped(model, model_config)
        example = torch.from_numpy(to_float(raw, raw.dtype))[None, None]
        with torch.no_grad():
            traced = torch.jit.trace(wrapped, example, check_trace=False)
        traced.save(str(tmp / "weights.torchscript"))
        np.save(tmp / "test_input.npy", raw[None, None])
        np.save(tmp / "test_output.npy", probs[None])
        section = (lambda a: a[a.shape[0] // 2]) if ndim == 3 else (lambda a: a)
        rgb_raw = section(raw.astype(np.float64))
        rgb_raw = (255 * (rgb_raw - rgb_raw.min()) / max(np.ptp(rgb_raw), 1e-9)).astype(np.uint8)
        write_png(tmp / "cover.png", _cover(rgb_raw, probs[(slice(None),) + ((probs.shape[1] // 2,) if ndim == 3
                                                                             else ())]))
        sources = _training_sources(config)
        (tmp / "README.md").write_text(_readme(name or Path(model_path).parent.name, config, sources, patch, halo))
        rdf = _rdf(name or f"emseg U-Net {Path(model_path).parent.name}", model_config, config, sources, patch,
                   halo, space, n_classes, license, authors, raw.dtype)
        (tmp / "rdf.yaml").write_text(json.dumps(rdf, indent=2))  # JSON is valid YAML
        files = tuple(sorted(p.name for p in tmp.iterdir()))
        part = output.with_name(f".{output.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        with claim_output(output, overwrite=overwrite, kind="file"):  # one writer; an existing file kept
            try:
                with zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED) as zf:
                    for f in files:
                        zf.write(tmp / f, f)
                os.replace(part, output)
            finally:
                part.unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(str(output), "bc" + "".join(space), patch, halo, n_classes, files)


def _wrapped(model: torch.nn.Module, model_config: dict) -> torch.nn.Module:

    class Probabilities(UNet):
        def forward(self, x):
            logits = super().forward(x)
            return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)

    net = Probabilities(**model_config)
    net.load_state_dict(model.state_dict())
    return net.eval()


def _readme(name, config, sources, patch, halo) -> str:
    lines = [f"# {name}", "", "A U-Net trained with emseg (label-efficient segmentation of electron-microscopy "
             "volumes).", "", f"- input: one greyscale channel, scaled to [0, 1] (uint8 / 255); patch {list(patch)}, "
             f"halo {list(halo)} per side", f"- output: {config.get('n_classes', '?')} class probabilities "
             "(softmax)", f"- training steps: {config.get('steps', '?')}", "", "## Training data", ""]
    for s in sources or [{"raw": "(not recorded)"}]:
        lines.append(f"- raw `{s.get('raw')}`, labels `{s.get('label')}`"
                     + (f": {s['dataset']}" if "dataset" in s else "")
                     + (f" ({s['license']})" if "license" in s else ""))
        if "citation" in s:
            lines.append(f"  - {s['citation']}")
    return "\n".join(lines) + "\n"


def _rdf(name, model_config, config, sources, patch, halo, space, n_classes, license, authors, dtype) -> dict:

    size_in = [{"type": "space", "id": a, "size": {"min": p, "step": d}}
               for a, p, d in zip(space, patch, _divisor(model_config))]
    size_out = [{"type": "space", "id": a, "size": {"tensor_id": "raw", "axis_id": a}, "halo": h}
                for a, h in zip(space, halo)]
    cite = [{"text": "emseg: label-efficient segmentation of electron-microscopy volumes with PyTorch",
             "url": "https://pypi.org/project/emseg/"}]
    for s in sources:
        if "citation" in s:
            cite.append({"text": s["citation"], **({"doi": s["doi"]} if "doi" in s else {})})
    training_data = {
        "type": "dataset", "format_version": "0.3.0", "name": (sources[0].get("dataset") if sources else None)
        or "emseg training cubes", "description": "; ".join(f"{s.get('raw')} with labels {s.get('label')}"
                                                            for s in sources) or "not recorded",
        "cite": cite[1:] or cite, **({"license": _spdx(sources[0]["license"])}
                                     if sources and _spdx(sources[0].get("license", "")) else {}),
    }
    torch_version = torch.__version__.split("+")[0]
    rdf = {
        "type": "model", "format_version": FORMAT_VERSION, "name": name,
        "description": f"emseg U-Net, {n_classes} classes, {len(space)}D, patch {list(patch)}",
        "authors": [{"name": a} for a in authors], "cite": cite, "license": license,
        "documentation": "README.md", "covers": ["cover.png"], "tags": ["electron-microscopy", "segmentation",
                                                                       "unet", "emseg"],
        "training_data": training_data,
        "inputs": [{
            "id": "raw", "description": "greyscale EM", "axes": [{"type": "batch"},
                                                                 {"type": "channel", "channel_names": ["raw"]}]
            + size_in, "test_tensor": {"source": "test_input.npy"}, "data": {"type": str(np.dtype(dtype))},
            "preprocessing": [{"id": "ensure_dtype", "kwargs": {"dtype": "float32"}},
                              {"id": "scale_linear", "kwargs": {"gain": 1.0 / 255.0, "offset": 0.0}},
                              {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}],
        }],
        "outputs": [{
            "id": "probabilities", "description": "class probabilities",
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": [f"class{c}" for c in range(n_classes)]}]
            + size_out, "test_tensor": {"source": "test_output.npy"}, "data": {"type": "float32"},
        }],
        "weights": {
            "pytorch_state_dict": {"source": "weights.pt", "pytorch_version": torch_version,
                                   "architecture": {"source": "emseg_unet.py", "callable": "EmsegProbabilities",
                                                    "kwargs": model_config}},
            "torchscript": {"source": "weights.torchscript", "pytorch_version": torch_version,
                            "parent": "pytorch_state_dict"},
        },
        "config": {"emseg": {"version": __version__, "training": {k: config.get(k) for k in (
            "n_classes", "patch_shape", "steps", "batch_size") if k in config}, "training_data": sources}},
    }
    return rdf


def _divisor(model_config: dict) -> list[int]:

    return list(build_model(model_config).divisor)


def _spdx(text: str) -> str | None:
    m = re.match(r"CC BY(-NC)?(-SA|-ND)? (\d\.\d)", text or "")
    return f"CC-BY{m.group(1) or ''}{m.group(2) or ''}-{m.group(3)}" if m else None
