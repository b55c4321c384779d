"""The command line end to end with click's CliRunner: help texts, train -> predict -> evaluate on
tiny synthetic volumes, ``--json`` output, exit codes and one-line errors.

The installed ``emseg`` script as a real process is exercised in test_packaging.py."""
from __future__ import annotations

import json

import click
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import tiny_train_config, to_toml, write_h5
from emseg.cli.main import cli
from emseg.io import open_volume
from emseg.semantic.train import SegmentationTask

COMMANDS = ("train", "predict", "segment", "targets", "evaluate", "query", "noise", "lcs")


def _command_paths(group: click.Group, prefix=()) -> list[tuple[str, ...]]:
    """Every command and subcommand below ``group`` as an argument path."""
    ctx = click.Context(group)
    paths = []
    for name in group.list_commands(ctx):
        sub = group.get_command(ctx, name)
        if sub is None:  # an optional subcommand that is not installed
            continue
        paths.append(prefix + (name,))
        if isinstance(sub, click.Group):
            paths += _command_paths(sub, prefix + (name,))
    return paths


def _one_json(result) -> dict:
    """stdout must hold exactly one JSON document (json.loads rejects anything after it)."""
    return json.loads(result.stdout)


def _error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def runner():
    return CliRunner()


def test_help_lists_commands(runner):
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    listed = result.stdout.split("Commands:")[1]
    for name in COMMANDS:
        assert f"  {name} " in listed or f"  {name}\n" in listed, name


def test_every_command_help_works(runner):
    paths = _command_paths(cli)
    assert {p[0] for p in paths} >= set(COMMANDS)
    for path in paths:
        result = runner.invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert result.stdout.startswith("Usage:"), path
        assert "-h, --help" in result.stdout or "--help" in result.stdout


def test_version(runner):
    import emseg

    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0 and emseg.__version__ in result.stdout


def test_train_predict_evaluate(tmp_path, synthetic_h5, synthetic_valid_h5, runner):
    config = tiny_train_config(synthetic_h5, steps=4, valid_every=2,
                               valid=[{"raw": f"{synthetic_valid_h5}:raw", "label": f"{synthetic_valid_h5}:label"}])
    (tmp_path / "train.toml").write_text(to_toml(config))
    run = tmp_path / "run"

    result = runner.invoke(cli, ["train", str(tmp_path / "train.toml"), "--out", str(run), "--device", "cpu",
                                 "--json"])
    assert result.exit_code == 0, result.output
    trained = _one_json(result)
    assert trained["final_step"] == 4 and not trained["interrupted"]
    assert set(trained["last_valid"]) >= {"valid_score", "valid_jaccard_0", "valid_jaccard_1", "valid_jaccard_2"}
    assert (run / "best.pt").exists() and (run / "last.pt").exists() and (run / "metrics.csv").exists()

    # Training into the same folder again needs --resume; --resume with more steps continues.
    again = runner.invoke(cli, ["train", str(tmp_path / "train.toml"), "--out", str(run), "--device", "cpu"])
    assert again.exit_code == 2
    assert "--resume" in _error_line(again)
    resumed = runner.invoke(cli, ["train", str(tmp_path / "train.toml"), "--out", str(run), "--steps", "5",
                                  "--resume", "--device", "cpu", "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert _one_json(resumed)["start_step"] == 4 and _one_json(resumed)["final_step"] == 5

    pred = f"{tmp_path}/pred.zarr/probs"
    result = runner.invoke(cli, ["predict", str(run / "best.pt"), f"{synthetic_valid_h5}:raw", pred, "--json",
                                 "--device", "cpu", "--overlap", "0.5"])
    assert result.exit_code == 0, result.output
    predicted = _one_json(result)
    assert predicted["shape"] == [3, 2, 64, 64] and predicted["n_classes"] == 3
    assert predicted["patch_shape"] == [1, 32, 32]

    result = runner.invoke(cli, ["evaluate", pred, f"{synthetic_valid_h5}:label", "--json"])
    assert result.exit_code == 0, result.output
    scores = _one_json(result)
    with open_volume(pred) as p, open_volume(f"{synthetic_valid_h5}:label") as g:
        labels, gt = np.argmax(p[...], axis=0), g[...]
    for k in range(3):
        union = np.sum((labels == k) | (gt == k))
        expected = np.sum((labels == k) & (gt == k)) / union if union else None
        if expected is None:
            assert scores["jaccard"][k] is None
        else:
            assert scores["jaccard"][k] == pytest.approx(expected, rel=1e-6)

    # Human-readable output goes to stdout without --json, nothing with -q.
    human = runner.invoke(cli, ["evaluate", pred, f"{synthetic_valid_h5}:label"])
    assert human.exit_code == 0 and "jaccard" in human.stdout
    quiet = runner.invoke(cli, ["-q", "evaluate", pred, f"{synthetic_valid_h5}:label"])
    assert quiet.exit_code == 0 and quiet.stdout == ""


def test_predict_labels_then_evaluate(tmp_path, synthetic_h5, runner):
    (tmp_path / "train.toml").write_text(to_toml(tiny_train_config(synthetic_h5, steps=1)))
    run = tmp_path / "run"
    assert runner.invoke(cli, ["-q", "train", str(tmp_path / "train.toml"), "--out", str(run)]).exit_code == 0
    out = f"{tmp_path}/pred.h5:labels"
    result = runner.invoke(cli, ["--json", "predict", str(run / "last.pt"), f"{synthetic_h5}:raw", out,
                                 "--output-type", "labels", "--patch", "1,16,16", "--block", "1,32,32"])
    assert result.exit_code == 0, result.output
    assert _one_json(result)["shape"] == [4, 64, 64] and _one_json(result)["blocks"] == 4 * 2 * 2
    with open_volume(out) as vol:
        assert vol.dtype == np.uint8 and vol.shape == (4, 64, 64) and vol.attrs["n_classes"] == 3
    result = runner.invoke(cli, ["evaluate", out, f"{synthetic_h5}:label", "--json"])
    assert result.exit_code == 0, result.output
    assert len(_one_json(result)["jaccard"]) == 3


@pytest.mark.parametrize("args, words", [
    (["train", "{tmp}/absent.toml", "--out", "{tmp}/run"], "no such config file"),
    (["predict", "{tmp}/absent.pt", "{tmp}/in.h5:raw", "{tmp}/o.h5:p"], "no such checkpoint"),
    (["evaluate", "{tmp}/in.h5:raw", "{tmp}/in.h5:nothing"], "no dataset 'nothing'"),
    (["evaluate", "{tmp}/in.h5", "{tmp}/in.h5:raw"], "no dataset given"),
    (["evaluate", "{tmp}/in.raw", "{tmp}/in.h5:raw"], "unknown volume format"),
    (["evaluate", "{tmp}/in.tif", "{tmp}/in.h5:raw"], "in.tif: no such file"),
])
def test_input_errors_exit_2_with_one_line(tmp_path, runner, args, words):
    write_h5(tmp_path / "in.h5", raw=np.zeros((2, 8, 8), np.uint8))
    args = [a.format(tmp=tmp_path) for a in args]
    result = runner.invoke(cli, args + ["--json"])
    assert result.exit_code == 2, result.output
    assert words in _error_line(result)
    doc = json.loads(result.stdout)  # one JSON document on failure too
    assert doc["exit_code"] == 2 and words in doc["error"] and set(doc) == {"error", "exit_code"}
    verbose = runner.invoke(cli, ["-v"] + args)
    assert verbose.exit_code == 2 and "Traceback" in verbose.stderr


def test_flag_wording_turns_parameter_names_into_the_running_commands_flags():
    from emseg.cli import predict
    from emseg.cli._ui import command_options, flag_wording

    options = command_options(click.Context(predict.command, parent=click.Context(cli)))
    assert options["workers"] == "--workers" and options["batch_size"] == "--batch-size"
    assert options["compile_"] == options["compile"] == "--compile"  # parameter name and flag both reach it
    assert options["verbose"] == "--verbose"  # the longest -- form, not -v
    # known names (directly or by alias) become flags; unknown ones lose their backticks
    assert flag_wording("`workers` applies only when `scheduler` is 'local'", options) == \
        "--workers applies only when --scheduler is 'local'"
    assert flag_wording("`block_shape` (2, 16) and `patch_shape` (1, 16, 16)", options) == \
        "--block (2, 16) and --patch (1, 16, 16)"
    assert flag_wording("`rank_tol` applies to `report` only", options) == "rank_tol applies to report only"
    # a name inside a longer word or name, unquoted names and quoted commands stay as they are
    assert flag_wording("`max_workers` of coworkers; workers", options) == "max_workers of coworkers; workers"
    assert flag_wording("x`workers`, ``workers``", options) == "x`workers`, ``workers``"
    assert flag_wording("use `emseg lcs infer`", options) == "use `emseg lcs infer`"
    # the innermost command's option wins over a group option of the same name
    noise_options = command_options(click.Context(cli.get_command(click.Context(cli), "noise").commands["synth"],
                                                  parent=click.Context(cli)))
    assert noise_options["seed"] == "--seed" and noise_options["halo"] == "--halo"
    assert noise_options["flip_p"] == noise_options["flip"] == "--flip"


def test_usage_errors_exit_2(tmp_path, runner):
    result = runner.invoke(cli, ["predict", "m.pt", "a.h5:raw", "b.h5:p", "--patch", "1,x,16"])
    assert result.exit_code == 2 and "--patch" in _error_line(result)
    for args in (["predict", "m.pt"], ["no-such-command"], ["--device", "gpu", "demo"],
                 ["lcs", "infer", "m.pt"], ["noise", "a.h5:l", "b.h5:n", "--flip", "x"]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 2, args
        _error_line(result)


@pytest.mark.parametrize("option", [["--valid-every", "0"], ["--lr", "-1"]])
def test_bad_training_numbers_are_input_errors(tmp_path, synthetic_h5, runner, option):
    (tmp_path / "train.toml").write_text(to_toml(tiny_train_config(synthetic_h5, steps=1)))
    result = runner.invoke(cli, ["train", str(tmp_path / "train.toml"), "--out", str(tmp_path / "run"), *option])
    assert result.exit_code == 2
    assert option[0].lstrip("-").replace("-", "_") in _error_line(result)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args", [
    ["predict", "m.pt", "{tmp}/d.h5:raw", "{tmp}/d.h5:raw"],
    ["predict", "m.pt", "{tmp}/d.zarr/raw", "{tmp}/d.zarr"],
    ["noise", "{tmp}/d.zarr/label", "{tmp}/d.zarr", "--flip", "0.1"],
    ["lcs", "infer", "m.pt", "{tmp}/d.zarr/raw", "{tmp}/d.zarr"],
    ["lcs", "infer", "m.pt", "{tmp}/d.h5:raw", "{tmp}/d.h5:raw"],
    ["query", "m.pt", "{tmp}/d.h5:raw", "--export", "{tmp}/d.h5"],
])
def test_outputs_never_replace_their_input(tmp_path, runner, args):
    import zarr

    raw, label = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8), np.zeros((2, 8, 8), np.int16)
    write_h5(tmp_path / "d.h5", raw=raw, label=label)
    root = zarr.open_group(str(tmp_path / "d.zarr"), mode="w")
    root.create_array("raw", data=raw)
    root.create_array("label", data=label)
    result = runner.invoke(cli, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2
    assert "input" in _error_line(result)
    for spec in ("d.h5:raw", "d.zarr/raw", "d.zarr/label"):
        with open_volume(str(tmp_path / spec)) as vol:
            np.testing.assert_array_equal(vol[:], raw if spec.endswith("raw") else label)


def test_bad_config_key_is_input_error(tmp_path, synthetic_h5, runner):
    config = tiny_train_config(synthetic_h5, stesp=3)
    (tmp_path / "train.toml").write_text(to_toml(config))
    result = runner.invoke(cli, ["train", str(tmp_path / "train.toml"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    line = _error_line(result)
    assert "stesp" in line and str(tmp_path / "train.toml") in line


def test_diverged_training_is_reported_in_one_line(tmp_path, synthetic_h5, runner, monkeypatch):
    monkeypatch.setattr(SegmentationTask, "loss", lambda self, model, batch: model(batch["raw"]).sum() * np.nan)
    (tmp_path / "train.toml").write_text(to_toml(tiny_train_config(synthetic_h5, steps=2)))
    result = runner.invoke(cli, ["train", str(tmp_path / "train.toml"), "--out", str(tmp_path / "run")])
    assert result.exit_code not in (0, 2)
    assert "step 1" in _error_line(result)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_gpu_is_input_error(tmp_path, synthetic_h5, runner):
    (tmp_path / "train.toml").write_text(to_toml(tiny_train_config(synthetic_h5, steps=1)))
    result = runner.invoke(cli, ["train", str(tmp_path / "train.toml"), "--out", str(tmp_path / "run"),
                                 "--device", "cuda"])
    assert result.exit_code == 2
    assert "cuda" in _error_line(result).lower()
