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
    for name in ("train", "predict", "evaluate", "query", "query answers", "query simulate", "noise", "noise igtt", "igtt",
                 "lcs train", "lcs infer", "demo"):
        assert f"## `emseg {name}`" in text
