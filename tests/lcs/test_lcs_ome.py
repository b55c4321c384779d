"""``emseg lcs infer`` into OME-Zarr: channels in the order asked for, a labels image beside them."""
from __future__ import annotations

import json

import numpy as np
import zarr
from click.testing import CliRunner

from conftest import ome_group, ome_models, to_toml, validated_ome_image, write_h5
from emseg.cli.main import cli
from test_lcs import atlas_arrays, cells, config_dict


def test_lcs_infer_writes_channels_and_labels(tmp_path):
    raw, label = cells((4, 64, 64), 0)
    araw, alabel = atlas_arrays()
    h5 = write_h5(tmp_path / "data.h5", raw=raw, label=label, atlas_raw=araw, atlas_label=alabel)
    (tmp_path / "lcs.toml").write_text(to_toml(config_dict(h5, steps=2)))
    runner = CliRunner()
    result = runner.invoke(cli, ["lcs", "train", str(tmp_path / "lcs.toml"), "--out", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 0, result.output
    model = str(tmp_path / "run" / "best.pt")
    for out in ("plain.zarr", "o.ome.zarr"):
        result = runner.invoke(cli, ["lcs", "infer", model, f"{h5}:raw", str(tmp_path / out), "--labels", "2,1",
                                     "--json"])
        assert result.exit_code == 0, result.output
    arrays = json.loads(result.stdout)["arrays"]
    assert set(arrays) == {"prob_1", "prob_2", "labels"}
    validated_ome_image(tmp_path / "o.ome.zarr")
    image = ome_group(tmp_path / "o.ome.zarr")
    level0 = np.asarray(image["0"])
    assert image["0"].attrs["channels"] == ["prob_2", "prob_1"]  # in the order of --labels
    for c, name in enumerate(image["0"].attrs["channels"]):
        np.testing.assert_array_equal(level0[c], np.asarray(zarr.open_array(store=str(tmp_path / "plain.zarr"),
                                                                            path=name, mode="r")))
    seg = ome_group(tmp_path / "o.ome.zarr" / "labels" / "labels")
    ome_models().ImageLabel.from_zarr(seg)
    assert len(seg.attrs["ome"]["multiscales"][0]["datasets"]) == len(image.attrs["ome"]["multiscales"][0]["datasets"])
