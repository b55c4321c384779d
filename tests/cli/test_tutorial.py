"""docs/tutorial.md, run: every ```sh command on a tiny synthetic copy of the VNC files, in order.

The ```toml blocks (first line ``# NAME``) are written as files; sizes are shrunk by the
substitutions below; ``napari FILE...`` lines open their files with emseg's napari reader; the
painting of step 5 is done with the plugin's writer, from the synthetic ground truth.
"""
from __future__ import annotations

import json
import re
import shlex
import zipfile
from pathlib import Path

import h5py
import numpy as np
from click.testing import CliRunner

from conftest import synthetic, write_h5
from emseg.cli.main import cli
from emseg.napari import read_crops, read_layers, write_crop_labels

TUTORIAL = Path(__file__).resolve().parents[2] / "docs" / "tutorial.md"

#: Real sizes -> tiny ones (a 20 x 64 x 64 copy of each stack).
SHRINK = {"256": "32", "steps = 3000": "steps = 2", "valid_every = 500": "valid_every = 2",
          "batch_size = 8": "batch_size = 2", "depth = 4": "depth = 2", "base_width = 16": "base_width = 4"}


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def shrink(text: str) -> str:
    for old, new in SHRINK.items():
        text = text.replace(old, new)
    return text


def _tiny_vnc(folder: Path) -> dict[str, np.ndarray]:
    """vnc_stack1.h5 (raw, label 0..4) and vnc_stack2_unlabeled.h5 (raw) with the real attributes' kind."""
    truth = {}
    for name, seed, labelled in (("vnc_stack1.h5", 0, True), ("vnc_stack2_unlabeled.h5", 1, False)):
        vol = synthetic((20, 64, 64), seed)
        label = np.asarray(vol.label).astype(np.uint8)
        label[(label == 0) & (np.asarray(vol.raw) > 200)] = 4  # five classes, like the VNC labels
        path = write_h5(folder / name, raw=vol.raw, **({"label": label} if labelled else {}))
        with h5py.File(path, "a") as fh:
            fh.attrs["voxel_size_nm"] = np.array([50.0, 4.6, 4.6])
            fh.attrs["license"] = "CC BY-NC-SA 3.0"
            fh.attrs["doi"] = "10.6084/m9.figshare.856713"
        truth[name] = label
    return truth


def _paint(truth: np.ndarray) -> None:
    """What a person does in step 5: label the crops (leaving a border unlabelled), one flag."""
    doc = read_crops("crops.h5")
    labels, absent = {}, {}
    for name in doc["names"]:
        z, y, x = (int(v) for v in doc[name]["attrs"]["offset"])
        d, h, w = doc[name]["raw"].shape
        lab = truth[z:z + d, y:y + h, x:x + w].astype(np.int16)
        lab[:, :2] = -1
        labels[name] = lab
        absent[name] = [k for k in range(5) if not (lab == k).any()]
    write_crop_labels("crops.h5", labels, not_present=absent)


def test_tutorial_commands_run(tmp_path, monkeypatch):
    text = TUTORIAL.read_text()
    monkeypatch.chdir(tmp_path)
    truth = _tiny_vnc(tmp_path)
    for block in blocks(text, "toml"):
        first, _, body = block.partition("\n")
        assert first.startswith("# "), f"toml block without a '# FILE' line: {first!r}"
        (tmp_path / first[2:].strip()).write_text(shrink(block))
    commands = [line for block in blocks(text, "sh") for line in shrink(block).splitlines() if line.strip()]
    assert [c.split()[:2] for c in commands if c.startswith("emseg")] == [
        ["emseg", "train"], ["emseg", "predict"], ["emseg", "predict"], ["emseg", "query"], ["emseg", "train"],
        ["emseg", "export"]]
    runner = CliRunner()
    for line in commands:
        args = shlex.split(line, comments=True)
        if args[0] == "napari":
            for path in args[1:]:
                assert read_layers(path), path
            continue
        assert args[0] == "emseg", line
        if args[1] == "train" and "vnc_more.toml" in args:
            _paint(truth["vnc_stack2_unlabeled.h5"])  # step 5 happens before the second training
        result = runner.invoke(cli, [*args[1:], "--device", "cpu"] if args[1] != "export" else args[1:])
        assert result.exit_code == 0, f"{line}\n{result.output}"
    # what the tutorial says was written
    assert (tmp_path / "runs/vnc/best.pt").is_file() and (tmp_path / "runs/vnc_more/best.pt").is_file()
    queries = json.loads((tmp_path / "queries.json").read_text())
    assert len(queries["queries"]) == 4 and (tmp_path / "queries.png").is_file()
    crops = read_crops(tmp_path / "crops.h5")
    assert all((crops[n]["label"] >= 0).any() for n in crops["names"])
    kinds = [t[2] for t in read_layers(tmp_path / "stack2.ome.zarr")]
    assert kinds == ["image", "labels"]
    with zipfile.ZipFile(tmp_path / "vnc_more.zip") as zf:
        assert "rdf.yaml" in zf.namelist()
        assert "CC-BY-NC-SA-3.0" in zf.read("rdf.yaml").decode()


def test_tutorial_python_snippet_names_the_plugin():
    snippets = blocks(TUTORIAL.read_text(), "python")
    assert snippets and all('plugin="emseg"' in s for s in snippets if "open(" in s)
    manifest = (Path(__file__).resolve().parents[2] / "src/emseg/napari/napari.yaml").read_text()
    assert "name: emseg" in manifest and "Save crop labels" in manifest
