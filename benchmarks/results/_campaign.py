"""What every results campaign shares: a resumable JSON of runs, paired statistics, table cells.

A campaign is a JSON document ``{"command", "machine", "settings", "split", "starts", "runs": [...]}``.
Each run is keyed by a few fields (e.g. arm and seed); :meth:`Campaign.run` skips keys already
present and writes the document atomically after every run, so a killed campaign continues where
it stopped. Every start of the script appends a ``starts`` entry (command, machine, commit, time)
and each run records the ``start`` that computed it, so a resumed campaign never overwrites the
provenance of earlier runs; ``command`` and ``machine`` stay those of the first start.

The protocol of every campaign (docs/results.md): VNC stack 1 sections 0-11 train (or are the
labelled pool), 12-14 validation (every choice), 15-19 test (scored once per reported configuration).
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import machine  # noqa: E402

from emseg.io import atomic_write_json  # noqa: E402


#: VNC stack 1 sections (start, stop) of the protocol every campaign follows.
SPLIT = {"train": [0, 12], "validation": [12, 15], "test": [15, 20]}


def commit() -> str:
    """The code's commit: ``$EMSEG_COMMIT`` (a frozen copy of the tree has no git), else git's HEAD."""
    if os.environ.get("EMSEG_COMMIT"):
        return os.environ["EMSEG_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Campaign:
    def __init__(self, path: str | Path, settings: dict[str, Any]):
        self.path = Path(path)
        self.doc = json.loads(self.path.read_text()) if self.path.exists() else {"runs": []}
        old = self.doc.get("settings")
        # settings are stored at the first start, so a campaign killed inside its first run (whose
        # folder may hold a partial checkpoint) cannot be continued under other settings either
        if old is not None and old != settings:
            raise SystemExit(f"{self.path} was run with other settings {old}; use another --out")
        command = " ".join(["python"] + sys.argv)
        self.doc.setdefault("command", command)
        self.doc.setdefault("machine", machine())
        self.doc.update(settings=settings, split=SPLIT)
        self.doc.setdefault("starts", []).append({
            "command": command, "machine": machine(), "commit": commit(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
        self.start = len(self.doc["starts"]) - 1
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.save()

    @property
    def runs(self) -> list[dict[str, Any]]:
        return self.doc["runs"]

    def find(self, **key) -> dict[str, Any] | None:
        for r in self.runs:
            if all(r.get(k) == v for k, v in key.items()):
                return r
        return None

    def run(self, key: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``fn()`` unless a run with ``key`` is stored; the result (with ``key``) is saved at once."""
        done = self.find(**key)
        if done is not None:
            return done
        result = dict(fn(), **key, start=self.start)
        self.runs.append(result)
        self.save()
        return result

    def save(self) -> None:
        atomic_write_json(self.path, self.doc)


def merged_runs(out: str, key: Callable[[dict[str, Any]], tuple]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The runs of the campaign JSONs in ``out`` (comma-separated: seeds run side by side, one per
    core) and their documents. Campaigns of other settings, or a run (``key``) stored in more than
    one of them, cannot share a table: that stops with a message."""
    names = out.split(",")
    docs = [json.loads(Path(name).read_text()) for name in names]
    for name, doc in zip(names[1:], docs[1:]):
        if doc.get("settings") != docs[0].get("settings"):
            raise SystemExit(f"{name} ran with other settings than {names[0]}: its runs cannot share a table")
    runs = [r for doc in docs for r in doc["runs"]]
    keys = [key(r) for r in runs]
    if len(set(keys)) != len(keys):
        raise SystemExit("a run and seed appear in more than one of the campaigns: merge campaigns of other seeds")
    return runs, docs


def finished(result, steps: int | None, where: str) -> None:
    """Stop the campaign when a training returned before its end (a Ctrl-C makes ``run_training``
    save and return): such a network must not be scored and stored as if it had finished. A run
    without a step budget (``steps`` None: a time budget) is checked for the interruption only."""
    if result.interrupted or (steps is not None and result.final_step != steps):
        raise SystemExit(f"{where}: training stopped at step {result.final_step}"
                         + (f" of {steps}" if steps is not None else "")
                         + "; nothing stored for it: run the same command again to continue")


def paired_interval(diffs) -> tuple[float, float, float]:
    """Mean and 95% t-interval of paired differences (NaN bounds with fewer than 2 pairs)."""
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return float(d.mean()) if len(d) else float("nan"), float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def mean_std(values) -> str:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if not len(v):
        return "-"
    return f"{v.mean():.3f} +- {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def ci_cell(d: tuple[float, float, float]) -> str:
    return f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]"


def no_data() -> int:
    """Say that the VNC data is absent (the campaign skips cleanly) and give the exit status, 0."""
    print("drosophila_vnc data not found (set EMSEG_DATA); nothing to do")
    return 0


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
