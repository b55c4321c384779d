"""Packaging: every package folder is listed in setup.cfg, and a non-editable install works."""
from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser


def _listed_packages() -> set[str]:
    text = _setup_cfg()["options"]["packages"]
    return {line.split("#")[0].strip() for line in text.splitlines() if line.split("#")[0].strip()}


def _package_dirs() -> dict[str, str]:
    text = _setup_cfg()["options"]["package_dir"]
    mapping = {}
    for line in text.splitlines():
        if "=" in line:
            name, _, folder = line.partition("=")
            mapping[name.strip()] = folder.strip()
    return mapping


def _found_packages() -> set[str]:
    """Dotted names of every folder holding an ``__init__.py`` under src/emseg and cli/."""
    found = set()
    for base, prefix in ((ROOT / "src" / "emseg", "emseg"), (ROOT / "cli", "emseg.cli")):
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            if "__pycache__" in rel.parts:
                continue
            found.add(".".join((prefix,) + rel.parts))
    return found


def test_every_package_folder_is_listed():
    found, listed = _found_packages(), _listed_packages()
    assert "emseg" in found and "emseg.cli" in found
    assert found - listed == set(), f"package folders missing from setup.cfg `packages`: {sorted(found - listed)}"
    assert listed - found == set(), f"setup.cfg lists packages without a folder: {sorted(listed - found)}"


def test_package_dirs_point_at_src_and_cli():
    mapping = _package_dirs()
    assert mapping.get("") == "src"
    assert mapping.get("emseg.cli") == "cli"


def test_console_script_entry_point():
    scripts = _setup_cfg()["options.entry_points"]["console_scripts"]
    assert "emseg = emseg.cli.entry:main" in [line.strip() for line in scripts.splitlines()]


def test_no_module_folder_without_init():
    """A folder of .py files without ``__init__.py`` would silently be left out of the install."""
    for base in (ROOT / "src" / "emseg", ROOT / "cli"):
        for py in base.rglob("*.py"):
            if "__pycache__" in py.parts:
                continue
            assert (py.parent / "__init__.py").exists(), f"{py.parent} holds modules but no __init__.py"


def _copy_source(dest: Path) -> Path:
    """Copy what a build needs, so building leaves no build/ or egg-info in the repository."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    dest.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dest / name)
    for name in ("src", "cli"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    return dest


@pytest.mark.skipif(os.environ.get("EMSEG_TEST_INSTALL") == "0",
                    reason="EMSEG_TEST_INSTALL=0 skips the install into a fresh virtualenv (~15 s)")
def test_install_into_fresh_venv_gives_working_cli(tmp_path):
    """``pip install .`` (not editable) into a new virtualenv yields a working ``emseg`` command.

    The new environment sees this environment's dependencies through a ``.pth`` file, so nothing
    is downloaded; ``--no-deps --no-build-isolation`` keeps pip offline.
    """
    start = time.perf_counter()
    source = _copy_source(tmp_path / "source")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # Directories listed in a .pth are appended to sys.path, but .pth files inside them are not
    # run, so this environment's editable emseg does not leak into the new one.
    Path(site, "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", str(source)], check=True, timeout=300,
                   cwd=tmp_path)
    # Every listed package landed in site-packages (a package missing from setup.cfg would not).
    for package in sorted(_found_packages()):
        assert Path(site, *package.split("."), "__init__.py").exists(), package
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run([str(venv / "bin" / "emseg"), "--help"], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in ("train", "predict", "evaluate", "query", "noise", "lcs"):
        assert name in result.stdout
    # Bad input from the real entry point: exit status 2 and a single line on stderr.
    result = subprocess.run([str(venv / "bin" / "emseg"), "evaluate", "absent.h5:pred", "absent.h5:label"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == ["error: absent.h5: no such file"], result.stderr
    print(f"fresh install + emseg --help: {time.perf_counter() - start:.1f} s")
