"""The CLI reference in docs/cli.md is generated from the commands' help and must not drift."""
from __future__ import annotations

import runpy
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_cli_reference_is_current():
    render = runpy.run_path(str(DOCS / "gen_cli.py"))["render"]
    assert (DOCS / "cli.md").read_text() == render(), "docs/cli.md is stale: run python docs/gen_cli.py"


def test_every_command_is_documented():
    text = (DOCS / "cli.md").read_text()
    for name in ("train", "predict", "segment", "targets", "evaluate", "query", "query answers", "query simulate",
                 "noise", "noise igtt", "igtt", "lcs train", "lcs infer", "demo", "pretrain"):
        assert f"## `emseg {name}`" in text


def test_example_vnc_config_is_the_new_user_config():
    """docs/examples/vnc.toml sets only the four keys a new user gives; its data paths reach
    ../shared/data from the repository root."""
    import tomllib

    from emseg.engine.config import load_config

    path = Path(__file__).resolve().parents[1] / "docs" / "examples" / "vnc.toml"
    data = tomllib.loads(path.read_text())
    assert sorted(data) == ["max_seconds", "n_classes", "patch_shape", "train"]
    cfg = load_config(path)
    expected = (path.parents[2].parent / "shared" / "data" / "drosophila_vnc" / "vnc_stack1.h5").resolve()
    assert Path(cfg.train[0].raw.rpartition(":")[0]).resolve() == expected
    assert cfg.train[0].region == ((0, 15),) and cfg.total_steps > 10**9


def test_architecture_page_names_only_files_and_objects_that_exist():
    """docs/architecture.md must be true: every file it names exists, every dotted name resolves."""
    import importlib
    import re

    text = (DOCS / "architecture.md").read_text()
    root = DOCS.parent
    places = [root / "src" / "emseg", root / "cli", root / "tests"]
    files = set(re.findall(r"`([a-z_]+(?:/[a-z_]+)*\.py)`", text))
    assert len(files) > 40
    missing = [f for f in files if not any(str(c).endswith(f) for p in places for c in p.rglob(f.split("/")[-1]))]
    assert missing == []
    names = set(re.findall(r"`((?:engine|io|semantic|instances|active|runtime|noise|igtt|lcs|models|data)\.[A-Za-z_.]+)`", text))
    assert len(names) > 15
    unresolved = []
    for name in names:
        module, _, attr = f"emseg.{name}".rpartition(".")
        try:
            getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            try:
                importlib.import_module(f"emseg.{name}")
            except ImportError:
                unresolved.append(name)
    assert unresolved == []
