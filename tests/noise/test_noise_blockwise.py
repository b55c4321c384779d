"""``emseg noise`` (``emseg.noise.blockwise``, ``process``, ``params``): blockwise synthesis of noisy labels on
disk, in this process or on dask.distributed, provenance, streamed report."""
from __future__ import annotations

import json
import sys
import types
from dataclasses import replace

import click
import h5py
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from click.testing import CliRunner
from scipy import ndimage as ndi

from conftest import (CLUSTER_BLOCK, CLUSTER_BLOCKS, CLUSTER_SHAPE, needs_dask, synthetic, tiny_train_config,
                      to_toml, write_h5, zarr_array)
from emseg import __version__
from emseg.cli.main import cli
from emseg.engine.cluster import FAIL_BLOCKS_ENV, BlockFailed
from emseg.errors import InputError
from emseg.noise import (
    TransitionCounter,
    dilate,
    erode,
    flip,
    noise_report,
    random_labels,
    sample,
    shift,
    skeleton,
    transition_matrix,
)
from emseg.noise.blockwise import (
    MODES,
    NoiseConfig,
    apply_noise,
    check_params,
    estimate_max_width,
    max_object_width,
    noise_file,
    output_dtype,
    plan_noise_blocks,
    process_block,
    resolve_params,
)


# --------------------------------------------------------------------------- helpers
def blobs(shape, n_classes=2, sigma=3.0, seed=0, ignore_frac=0.0, dtype=np.int16):
    """Smooth random labels: thresholded Gaussian-filtered noise (+ optional ignore voxels)."""
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.standard_normal(shape), sigma)
    edges = np.quantile(field, np.linspace(0, 1, n_classes + 1)[1:-1])
    lab = np.digitize(field, edges).astype(dtype)
    if ignore_frac:
        lab[rng.random(shape) < ignore_frac] = -1
    return lab


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result


def read(spec):
    """Array and attrs of FILE.h5:DS or DIR.zarr/ARRAY, read directly with h5py / zarr."""
    if ".h5:" in spec:
        path, key = spec.split(":")
        with h5py.File(path, "r") as fh:
            return fh[key][...], dict(fh[key].attrs)
    path, key = spec.split(".zarr/")
    arr = zarr.open_array(store=path + ".zarr", path=key, mode="r")
    return arr[...], dict(arr.attrs)


@pytest.fixture
def multi(tmp_path):
    """(4, 40, 44) labels with classes 0..3 and 5 % ignore voxels, int16, in an h5 file."""
    lab = blobs((4, 40, 44), n_classes=4, sigma=2.0, seed=1, ignore_frac=0.05)
    write_h5(tmp_path / "in.h5", label=lab)
    return lab, f"{tmp_path}/in.h5:label"


# --------------------------------------------------------------------------- blockwise == whole
@pytest.mark.parametrize("mode,fn", [("dilate", dilate), ("erode", erode)])
@pytest.mark.parametrize("radius,per_section", [(1, False), (2, False), (2, True)])
def test_morphology_blockwise_equals_whole(tmp_path, multi, mode, fn, radius, per_section):
    lab, spec = multi
    result = noise_file(NoiseConfig(spec, f"{tmp_path}/out.h5:x", mode, {"radius": radius, "per_section": per_section},
                                    block_shape=(3, 16, 16)))
    assert result.blocks == 2 * 3 * 3
    assert result.halo == ((0 if per_section else radius), radius, radius)
    out, _ = read(f"{tmp_path}/out.h5:x")
    np.testing.assert_array_equal(out, fn(lab, radius, per_section=per_section))


@pytest.mark.parametrize("per_section", [True, False])
def test_skeleton_blockwise_equals_whole_with_measured_halo(tmp_path, per_section):
    lab = blobs((4, 72, 72), n_classes=3, sigma=3.0, seed=5)
    write_h5(tmp_path / "in.h5", label=lab)
    result = noise_file(NoiseConfig(f"{tmp_path}/in.h5:label", f"{tmp_path}/out.h5:sk", "skeleton",
                                    {"per_section": per_section}, block_shape=(2, 24, 24)))
    # the halo is the widest object, measured independently with scipy on the whole array
    if per_section:
        widest = max(ndi.distance_transform_edt(s == k).max() for s in lab for k in (1, 2))
    else:
        widest = max(ndi.distance_transform_edt(lab == k).max() for k in (1, 2))
    width = int(np.ceil(2 * widest))
    assert result.params["halo"] == width + 4
    assert result.halo == ((0 if per_section else width + 4), width + 4, width + 4)
    out, _ = read(f"{tmp_path}/out.h5:sk")
    np.testing.assert_array_equal(out, skeleton(lab, per_section=per_section))


def test_zero_halo_skeleton_differs_so_the_halo_matters(tmp_path):
    lab = blobs((1, 72, 72), n_classes=2, sigma=3.0, seed=5)
    write_h5(tmp_path / "in.h5", label=lab)
    noise_file(NoiseConfig(f"{tmp_path}/in.h5:label", f"{tmp_path}/out.h5:sk", "skeleton", {"halo": 0},
                           block_shape=(1, 24, 24)))
    out, _ = read(f"{tmp_path}/out.h5:sk")
    assert (out != skeleton(lab)).sum() > 20


def test_width_scan_matches_whole_array_and_refuses_too_wide():
    lab = blobs((3, 60, 60), n_classes=3, sigma=2.5, seed=2)
    for per_section in (True, False):
        if per_section:
            expected = max(ndi.distance_transform_edt(s == k).max() for s in lab for k in (1, 2))
        else:
            expected = max(ndi.distance_transform_edt(lab == k).max() for k in (1, 2))
        expected = int(np.ceil(2 * expected))
        assert max_object_width(lab, per_section=per_section) == expected
        assert estimate_max_width(lab, per_section=per_section, block_shape=(2, 16, 16), margin=30) == expected
    square = np.zeros((50, 50), np.int16)
    square[5:45, 5:45] = 1  # width 40 (EDT 20) > 2 * margin 8
    with pytest.raises(ValueError, match="wider than 16 voxels"):
        estimate_max_width(square, block_shape=(20, 20), margin=8)


# --------------------------------------------------------------------------- random modes: grid-independent
WHOLE = {
    "flip": ({"p": 0.45}, lambda lab, seed: flip(lab, 0.45, n_classes=4, rng=seed)),
    "sample": ({"p": 0.1}, lambda lab, seed: sample(lab, 0.1, rng=seed, unsampled=-1)),
    "shift": ({"radius": 2}, lambda lab, seed: shift(lab, 2, rng=seed)),
    "shift-section": ({"radius": 3, "per_section": True}, lambda lab, seed: shift(lab, 3, per_section=True,
                                                                                   rng=seed)),
    "random": ({"p": 0.3}, lambda lab, seed: np.where(lab < 0, -1, random_labels(
        lab.shape, 0.3, n_classes=4, rng=seed, dtype=np.int16)).astype(np.int16)),
}


@pytest.mark.parametrize("case", sorted(WHOLE))
def test_random_modes_blockwise_equal_whole_array_for_every_grid(tmp_path, multi, case):
    lab, spec = multi
    mode = case.split("-")[0]
    params, whole = WHOLE[case]
    seed = 11
    expected = whole(lab, seed)
    for block in [(2, 16, 16), (3, 7, 40), (4, 40, 44)]:
        result = noise_file(NoiseConfig(spec, f"{tmp_path}/out.h5:{case}{block[1]}", mode, params, seed=seed,
                                        block_shape=block))
        out, _ = read(f"{tmp_path}/out.h5:{case}{block[1]}")
        np.testing.assert_array_equal(out, expected, err_msg=f"{case} {block}")
        assert out.dtype == expected.dtype
        np.testing.assert_array_equal(out[lab == -1], -1)
        assert result.blocks == int(np.prod([-(-n // b) for n, b in zip(lab.shape, block)]))


@settings(max_examples=25, deadline=None)
@given(mode=st.sampled_from(["flip", "sample", "random", "shift"]),
       block=st.tuples(st.integers(1, 5), st.integers(1, 23), st.integers(1, 23)),
       seed=st.integers(0, 2**32))
def test_property_any_block_grid_gives_the_whole_array_result(mode, block, seed):
    lab = blobs((5, 23, 21), n_classes=3, sigma=1.5, seed=4, ignore_frac=0.1)
    params = resolve_params(lab, mode, {"p": 0.3} if mode != "shift" else {"radius": 2})
    expected = {
        "flip": lambda: flip(lab, 0.3, n_classes=params.get("n_classes"), rng=seed),
        "sample": lambda: sample(lab, 0.3, rng=seed),
        "random": lambda: np.where(lab < 0, -1, random_labels(lab.shape, 0.3, n_classes=params.get("n_classes"),
                                                              rng=seed, dtype=lab.dtype)),
        "shift": lambda: shift(lab, 2, rng=seed),
    }[mode]()
    blocks = plan_noise_blocks(lab.shape, mode, params, block)
    out = np.zeros(lab.shape, dtype=output_dtype(mode, params, lab.dtype))
    apply_noise(lab, out, mode, params, seed, blocks=blocks)
    np.testing.assert_array_equal(out, expected)


def test_sample_many_classes_exact_counts_and_grid_independent():
    lab = np.random.default_rng(2).integers(-1, 200, size=(4, 20, 21)).astype(np.int32)
    whole = sample(lab, 0.3, rng=8)
    params = resolve_params(lab, "sample", {"p": 0.3})
    out = np.zeros(lab.shape, dtype=output_dtype("sample", params, lab.dtype))
    apply_noise(lab, out, "sample", params, 8, blocks=plan_noise_blocks(lab.shape, "sample", params, (3, 6, 5)))
    np.testing.assert_array_equal(out, whole)
    for k in range(200):
        assert int((whole == k).sum()) == round(0.3 * int((lab == k).sum()))


@pytest.mark.parametrize("sigmas", [0.0, 8.0])
def test_selection_from_blocks_equals_in_memory_selection(sigmas):
    from emseg.noise.counts import selection_from_chunks, selection_in_memory
    from emseg.noise.streams import linear_index, stream_key

    lab = blobs((6, 30, 31), n_classes=5, sigma=1.5, seed=7, ignore_frac=0.05)
    key, shape = stream_key(3), lab.shape
    fractions = [0.0, 0.2, 0.5, 1.0, 0.37]
    ref = selection_in_memory(key, lab.reshape(-1), linear_index(shape, (0, 0, 0), shape).reshape(-1),
                              fractions)

    def chunks():
        for b in plan_noise_blocks(shape, "flip", {"p": 0.1}, (4, 8, 9)):
            origin = tuple(s.start for s in b.inner)
            yield lab[b.inner].reshape(-1), linear_index(lab[b.inner].shape, origin, shape).reshape(-1)

    # sigmas = 0 leaves windows of 4 / n_k around the quantile: most miss and are widened
    got = selection_from_chunks(key, chunks, fractions, sigmas=sigmas)
    np.testing.assert_array_equal(got.classes, ref.classes)
    np.testing.assert_array_equal(got.chosen, ref.chosen)
    np.testing.assert_array_equal(got.thresholds[got.chosen], ref.thresholds[ref.chosen])
    # the thresholds choose exactly round(f_k * n_k) voxels of each class
    chosen = ref.apply(lab.reshape(-1), linear_index(shape, (0, 0, 0), shape).reshape(-1))
    for k, f in enumerate(fractions):
        n_k = int((lab == k).sum())
        assert int(chosen[lab.reshape(-1) == k].sum()) == round(f * n_k)


def test_process_block_is_order_independent():
    lab = blobs((3, 30, 30), n_classes=3, seed=3)
    params = resolve_params(lab, "flip", {"p": 0.3})
    blocks = plan_noise_blocks(lab.shape, "flip", params, (2, 10, 10))
    forward = [process_block(lab, b, "flip", params, 5) for b in blocks]
    backward = [process_block(lab, b, "flip", params, 5) for b in reversed(blocks)][::-1]
    for a, b in zip(forward, backward):
        np.testing.assert_array_equal(a, b)


def test_flip_counts_exact_over_the_volume_and_n_classes_global(tmp_path):
    # class 2 occurs in one corner only: blocks without it must still flip into class 2
    lab = np.zeros((2, 32, 32), np.uint8)
    lab[:, 8:24, 8:24] = 1
    lab[:, :4, :4] = 2
    write_h5(tmp_path / "in.h5", label=lab)
    res = noise_file(NoiseConfig(f"{tmp_path}/in.h5:label", f"{tmp_path}/o.h5:f", "flip", {"p": 0.3},
                                 block_shape=(2, 16, 16)))
    assert res.params["n_classes"] == 3
    out, _ = read(f"{tmp_path}/o.h5:f")
    far = out[:, 16:, 16:]  # a block where the input holds classes 0 and 1 only
    assert (far == 2).any()
    for k in range(3):
        n_k = int((lab == k).sum())
        assert int(((lab == k) & (out != k)).sum()) == round(0.3 * n_k)
    # a grid whose blocks each hold an odd number of voxels per class gives the same labels
    res = noise_file(NoiseConfig(f"{tmp_path}/in.h5:label", f"{tmp_path}/o.h5:g", "flip", {"p": 0.3},
                                 block_shape=(1, 5, 7)))
    np.testing.assert_array_equal(read(f"{tmp_path}/o.h5:g")[0], out)


# --------------------------------------------------------------------------- CLI: determinism, provenance, formats
@pytest.mark.parametrize("fmt", ["h5", "zarr"])
@pytest.mark.parametrize("mode_args", [["--flip", "0.45"], ["--sample", "0.2"], ["--random", "0.1"],
                                       ["--shift", "1"]])
def test_cli_same_seed_same_output(tmp_path, multi, fmt, mode_args):
    _, spec = multi
    outs = [f"{tmp_path}/a.h5:n", f"{tmp_path}/b.h5:n"] if fmt == "h5" else \
        [f"{tmp_path}/a.zarr/n", f"{tmp_path}/b.zarr/n"]
    for out in outs:
        result = run("noise", spec, out, *mode_args, "--seed", 3, "--block", "2,20,20", "-q")
        assert result.exit_code == 0, result.output
    other = outs[0].replace("a.", "c.")
    assert run("noise", spec, other, *mode_args, "--seed", 4, "--block", "2,20,20", "-q").exit_code == 0
    a, b, c = read(outs[0])[0], read(outs[1])[0], read(other)[0]
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


@pytest.mark.parametrize("fmt", ["h5", "zarr"])
def test_provenance_attributes(tmp_path, multi, fmt):
    _, spec = multi
    out = f"{tmp_path}/o.h5:noisy" if fmt == "h5" else f"{tmp_path}/o.zarr/noisy"
    result = run("noise", spec, out, "--dilate", "2", "--per-section", "--seed", 9, "--block", "2,16,16", "-q")
    assert result.exit_code == 0, result.output
    data, attrs = read(out)
    assert attrs["noise_mode"] == "dilate"
    assert json.loads(attrs["noise_params"]) == {"radius": 2, "per_section": True}
    assert int(attrs["noise_seed"]) == 9
    assert attrs["noise_source"].endswith("in.h5:label") and attrs["noise_source"].startswith("/")
    assert attrs["emseg_version"] == __version__
    assert list(attrs["noise_block_shape"]) == [2, 16, 16]
    assert list(attrs["noise_halo"]) == [0, 2, 2]
    assert data.dtype == np.int16 and data.shape == (4, 40, 44)


def test_global_seed_option_is_used(tmp_path, multi):
    _, spec = multi
    assert run("--seed", 5, "noise", spec, f"{tmp_path}/a.h5:x", "--flip", ".3", "-q").exit_code == 0
    assert run("noise", spec, f"{tmp_path}/b.h5:x", "--flip", ".3", "--seed", 5, "-q").exit_code == 0
    a, attrs = read(f"{tmp_path}/a.h5:x")
    np.testing.assert_array_equal(a, read(f"{tmp_path}/b.h5:x")[0])
    assert int(attrs["noise_seed"]) == 5


# --------------------------------------------------------------------------- report
def test_report_json_flip_diagonal(tmp_path, multi):
    lab, spec = multi
    result = run("noise", spec, f"{tmp_path}/o.h5:f", "--flip", "0.45", "--report", "--json",
                 "--block", "2,20,22")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    rep = payload["report"]
    assert rep["n_classes"] == 4 and rep["rank"] == 4
    n_blocks = payload["blocks"]
    clean_counts = np.array(rep["clean_counts"])
    np.testing.assert_array_equal(clean_counts, [(lab == k).sum() for k in range(4)])
    # exact counts over the whole volume: at most half a voxel per class away from 1 - p
    assert n_blocks > 1
    diag = np.diag(np.array(rep["matrix"]))
    assert np.all(np.abs(diag - 0.55) <= 0.5 / clean_counts + 1e-12)
    # the streamed report equals the report of the whole arrays
    out, _ = read(f"{tmp_path}/o.h5:f")
    whole = noise_report(lab, out, 4)
    assert rep["counts"] == whole["counts"] and rep["kept_fraction"] == whole["kept_fraction"]


def test_report_random_labels_rows_alike(tmp_path):
    lab = blobs((4, 64, 64), n_classes=2, seed=8)
    write_h5(tmp_path / "in.h5", label=lab)
    result = run("noise", f"{tmp_path}/in.h5:label", f"{tmp_path}/o.h5:r", "--random", "0.1", "--report",
                 "--json", "--seed", 1)
    rep = json.loads(result.stdout)["report"]
    m = np.array(rep["matrix"])
    # every row is Bernoulli(0.1) on ~8000 voxels: within 5 standard errors of (0.9, 0.1)
    se = np.sqrt(0.09 / np.array(rep["clean_counts"]))
    assert np.all(np.abs(m[:, 1] - 0.1) < 5 * se)
    # Lemma 2: random labels keep one class; the smallest singular value is within the noise
    assert rep["rank"] == 1 and rep["rank_classes"] == [0, 1]
    svals = np.linalg.svd(m, compute_uv=False)
    np.testing.assert_allclose(rep["singular_values"], svals, rtol=1e-12)
    assert svals[1] <= rep["rank_tol"] == pytest.approx(3 * rep["rank_sampling_error"])
    # a tolerance passed on the command line is used as is: 0 gives the numerical rank
    result = run("noise", f"{tmp_path}/in.h5:label", f"{tmp_path}/o.h5:r0", "--random", "0.1", "--report",
                 "--rank-tol", "0", "--json", "--seed", 1)
    assert result.exit_code == 0, result.output
    rep0 = json.loads(result.stdout)["report"]
    assert rep0["rank"] == 2 and rep0["rank_tol"] == 0.0
    bad = run("noise", f"{tmp_path}/in.h5:label", f"{tmp_path}/o.h5:r1", "--random", "0.1", "--rank-tol", "0.1")
    assert bad.exit_code == 2 and "--rank-tol applies to --report" in bad.output
    bad = run("noise", f"{tmp_path}/in.h5:label", f"{tmp_path}/o.h5:r1", "--random", "0.1", "--report",
              "--rank-tol", "-1")
    assert bad.exit_code == 2 and "rank tolerance" in bad.output


def test_report_binary_flip_at_one_half_has_rank_one(tmp_path):
    lab = blobs((4, 64, 64), n_classes=2, seed=8)
    write_h5(tmp_path / "in.h5", label=lab)
    for p, rank in (("0.5", 1), ("0.4", 2)):
        result = run("noise", f"{tmp_path}/in.h5:label", f"{tmp_path}/o.h5:f{p}", "--flip", p, "--report",
                     "--json", "--block", "2,32,32")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["report"]["rank"] == rank


def test_report_human_table(tmp_path, multi):
    _, spec = multi
    result = run("noise", spec, f"{tmp_path}/o.h5:f", "--sample", "0.5", "--report")
    assert result.exit_code == 0, result.output
    assert "rank 4 of 4" in result.stdout and "labelled" in result.stdout
    assert "singular values" in result.stdout


def test_transition_counter_equals_whole_array():
    rng = np.random.default_rng(0)
    clean = rng.integers(-1, 3, (30, 40))
    noisy = rng.integers(-1, 5, (30, 40))
    counter = TransitionCounter()
    for part in np.array_split(np.arange(30), 4):  # classes 3, 4 appear late: the counter grows
        counter.update(clean[part], noisy[part])
    np.testing.assert_array_equal(counter.transition().counts, transition_matrix(clean, noisy).counts)
    assert counter.report() == noise_report(clean, noisy)


# --------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("args,needle", [
    (["--flip", "1.5"], "p must be in [0, 1]"),
    (["--flip-fg", "-0.1"], "p_fg must be in [0, 1]"),
    (["--sample", "2"], "p must be in [0, 1]"),
    (["--random", "-0.5"], "p must be in [0, 1]"),
    (["--dilate", "-1"], "radius must be an integer >= 0"),
    (["--shift", "-2"], "radius must be an integer >= 0"),
    (["--flip", "0.4", "--erode", "1"], "--flip and --erode given"),
    (["--skeleton", "--sample", "0.1"], "--sample and --skeleton given"),
    ([], "no mode given"),
    (["--dilate", "1", "--unsampled", "0"], "--unsampled applies to --sample only"),
    (["--erode", "1", "--halo", "3"], "--halo applies to --skeleton only"),
    (["--flip-fg", "0.2"], "binary labels only"),
    (["--flip", "0.2", "--n-classes", "1"], "n_classes must be an integer >= 2"),
    (["--flip", "0.2", "--seed", "-1"], "seed must be an integer >= 0"),
    (["--dilate", "1", "--block", "4,4"], "block shape"),
])
def test_bad_arguments_one_line_exit_2_no_output(tmp_path, multi, args, needle):
    _, spec = multi
    result = run("noise", spec, f"{tmp_path}/out.h5:x", *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle in lines[0]
    assert list(tmp_path.iterdir()) == [tmp_path / "in.h5"]


def test_bad_input_exit_2(tmp_path, multi):
    lab, spec = multi
    write_h5(tmp_path / "in.h5", floats=lab.astype(np.float32))
    for args, needle in [
        ([spec, spec, "--flip", ".2"], "OUTPUT must differ from INPUT"),
        ([f"{tmp_path}/in.h5:floats", f"{tmp_path}/o.h5:x", "--flip", ".2"], "labels must be integers"),
        ([f"{tmp_path}/missing.h5:x", f"{tmp_path}/o.h5:x", "--flip", ".2"], "no such file"),
        ([spec, f"{tmp_path}/o.h5:x", "--flip", ".2", "--n-classes", "3"], "n_classes=3"),
    ]:
        result = run("noise", *args)
        assert result.exit_code == 2, (args, result.output)
        assert len(result.stderr.strip().splitlines()) == 1 and needle in result.stderr, result.stderr
    assert not (tmp_path / "o.h5").exists()


# --------------------------------------------------------------------------- downstream use and dispatch
def test_sampled_labels_train(tmp_path):
    vol = synthetic((4, 64, 64), 0)
    write_h5(tmp_path / "train.h5", raw=vol.raw, label=vol.label)
    result = run("noise", f"{tmp_path}/train.h5:label", f"{tmp_path}/train.h5:sampled", "--sample", "0.1",
                 "--unsampled", "-1", "-q")
    assert result.exit_code == 0, result.output
    sampled, _ = read(f"{tmp_path}/train.h5:sampled")
    assert (sampled == -1).mean() == pytest.approx(0.9, abs=0.01)
    config = tiny_train_config(tmp_path / "train.h5", steps=2)
    config["train"] = [{"raw": f"{tmp_path}/train.h5:raw", "label": f"{tmp_path}/train.h5:sampled"}]
    (tmp_path / "t.toml").write_text(to_toml(config))
    result = run("train", tmp_path / "t.toml", "--out", tmp_path / "run", "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "last.pt").exists()


def test_igtt_subcommand_dispatches(monkeypatch):
    @click.command("igtt")
    @click.argument("raw")
    @click.option("--out")
    def fake(raw, out):
        click.echo(f"igtt got {raw} {out}")

    monkeypatch.setitem(sys.modules, "emseg.cli.igtt", types.SimpleNamespace(command=fake))
    result = run("noise", "igtt", "r.h5:raw", "--out", "d")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "igtt got r.h5:raw d"


def test_check_params_defaults_and_unknown():
    assert check_params("skeleton") == {"per_section": True, "halo": None}
    assert check_params("flip", {"p_fg": 0.2}) == {"p": None, "p_fg": 0.2, "p_bg": None, "n_classes": None}
    with pytest.raises(ValueError, match="unknown parameter"):
        check_params("dilate", {"radius": 1, "p": 0.3})
    with pytest.raises(ValueError, match="not resolved"):
        process_block(np.zeros((4, 4), int), plan_noise_blocks((4, 4), "flip", {"p": 0.1})[0], "flip",
                      check_params("flip", {"p": 0.1}), 0)


@settings(max_examples=25, deadline=None)
@given(
    mode=st.sampled_from(MODES),
    shape=st.one_of(st.tuples(st.integers(2, 20), st.integers(2, 20)),
                    st.tuples(st.integers(1, 4), st.integers(2, 12), st.integers(2, 12))),
    n_classes=st.integers(2, 4),
    seed=st.integers(0, 2**31),
)
def test_property_every_mode_keeps_shape_and_ignore_voxels(mode, shape, n_classes, seed):
    """Every mode, run blockwise: same shape, -1 voxels stay -1, other voxels hold a class (or, for
    ``sample``, their own class or -1)."""
    rng = np.random.default_rng(seed)
    lab = rng.integers(-1, n_classes, size=shape).astype(np.int16)
    params = {"flip": {"p": 0.3}, "sample": {"p": 0.4}, "random": {"p": 0.5}, "skeleton": {"halo": max(shape)},
              "dilate": {"radius": 1}, "erode": {"radius": 1}, "shift": {"radius": 2}}[mode]
    params = resolve_params(lab, mode, params)
    out = np.full(lab.shape, -7, dtype=output_dtype(mode, params, lab.dtype))
    block = tuple(max(1, s // 2) for s in shape)
    apply_noise(lab, out, mode, params, seed, blocks=plan_noise_blocks(lab.shape, mode, params, block))
    assert out.shape == lab.shape
    np.testing.assert_array_equal(out[lab == -1], -1)
    kept = out[lab >= 0]
    if mode == "sample":
        assert np.all((kept == lab[lab >= 0]) | (kept == -1))
    else:
        assert kept.min(initial=0) >= 0 and kept.max(initial=0) < max(n_classes, params.get("n_classes") or 0)


# --------------------------------------------------------------------------- on dask.distributed
SHAPE, BLOCK, N_BLOCKS = CLUSTER_SHAPE, CLUSTER_BLOCK, CLUSTER_BLOCKS
_array = zarr_array


@needs_dask
def test_noise_cluster_equals_in_process(tmp_path, labels_h5, client):
    noise_file(NoiseConfig(f"{labels_h5}:label", str(tmp_path / "ref.zarr"), "flip", {"p": 0.45}, seed=4,
                           block_shape=BLOCK, n_classes=3))
    out = noise_file(NoiseConfig(f"{labels_h5}:label", str(tmp_path / "run.zarr/noisy/flip"), "flip", {"p": 0.45},
                                 seed=4, block_shape=BLOCK, n_classes=3, report=True), client=client)
    a, b = _array(tmp_path / "ref.zarr"), _array(tmp_path / "run.zarr", "noisy/flip")
    np.testing.assert_array_equal(a[...], b[...])
    assert dict(a.attrs) == dict(b.attrs) and b.attrs["noise_seed"] == 4 and b.attrs["noise_mode"] == "flip"
    assert not (tmp_path / "run.zarr/noisy/.flip.partial").exists()
    assert out.blocks == N_BLOCKS
    # independent check of the flip: per block, round(0.45 * n_k) voxels of each class changed
    clean = synthetic(SHAPE, 3).label
    changed = clean != b[...]
    assert abs(changed.mean() - 0.45) <= N_BLOCKS * 3 / clean.size
    # the report read back from the output is the transition matrix counted directly
    counts = np.zeros((3, 3))
    np.add.at(counts, (clean.ravel(), b[...].ravel()), 1)
    np.testing.assert_allclose(out.report["matrix"], counts / counts.sum(1, keepdims=True))


@needs_dask
def test_noise_resume_after_a_failed_block_computes_only_the_rest(tmp_path, labels_h5, client, monkeypatch):
    ref = tmp_path / "ref.zarr"
    shift2 = NoiseConfig(f"{labels_h5}:label", str(ref), "shift", {"radius": 2}, seed=1, block_shape=BLOCK)
    noise_file(shift2)
    out = tmp_path / "out.zarr"
    monkeypatch.setenv(FAIL_BLOCKS_ENV, "5")
    with pytest.raises(BlockFailed, match=r"block 5 .*failed after 1 attempt"):
        noise_file(replace(shift2, output=str(out), retries=0), client=client)
    partial = tmp_path / "out.zarr.partial"
    assert not out.exists() and sorted(int(p.name) for p in (partial / ".done").iterdir()) == [
        i for i in range(N_BLOCKS) if i != 5]
    # rerun: every block but 5 would fail, so success means only block 5 was computed
    monkeypatch.setenv(FAIL_BLOCKS_ENV, ",".join(str(i) for i in range(N_BLOCKS) if i != 5))
    noise_file(replace(shift2, output=str(out)), client=client)
    np.testing.assert_array_equal(_array(out)[...], _array(ref)[...])
    assert not partial.exists() and "emseg_resume" not in _array(out).attrs
    # a partial started with other parameters is refused, not mixed
    monkeypatch.setenv(FAIL_BLOCKS_ENV, "0")
    with pytest.raises(BlockFailed):
        noise_file(replace(shift2, output=str(tmp_path / "o2.zarr"), retries=0), client=client)
    monkeypatch.delenv(FAIL_BLOCKS_ENV)
    with pytest.raises(InputError, match="other parameters.*noise_seed 1 -> 2"):
        noise_file(replace(shift2, output=str(tmp_path / "o2.zarr"), seed=2), client=client)


def test_noise_scheduler_needs_zarr_output(tmp_path, labels_h5):
    from click.testing import CliRunner
    from emseg.cli.main import cli

    res = CliRunner().invoke(cli, ["noise", f"{labels_h5}:label", f"{tmp_path / 'o.h5'}:n", "--flip", "0.2",
                                   "--scheduler", "tcp://127.0.0.1:1"])
    assert res.exit_code == 2 and "needs a zarr output" in res.output
    res = CliRunner().invoke(cli, ["noise", f"{labels_h5}:label", str(tmp_path / "o.zarr"), "--flip", "0.2",
                                   "--workers", "2"])
    assert res.exit_code == 2 and "--workers applies only when --scheduler is 'local'" in res.output
    assert not (tmp_path / "o.zarr").exists()
