"""The dependency check `make test` runs (deptry, configured in pyproject.toml) passes on the project, and
fails when a package the code imports is not declared or a declared one is not used."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPTRY = Path(sys.executable).parent / "deptry"
CODE = ("optiserve", "optimizers", "services", "loadtests", "deploy")


def deptry(where: Path) -> subprocess.CompletedProcess[str]:
    if not DEPTRY.is_file():
        pytest.fail(f"deptry is not installed beside {sys.executable} (pip install -e '.[dev]')")
    return subprocess.run(
        [str(DEPTRY), ".", "--no-ansi"],
        cwd=where,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
        check=False,
    )


def project_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "project"
    copy.mkdir()
    shutil.copy(ROOT / "pyproject.toml", copy)
    for folder in CODE:
        shutil.copytree(ROOT / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_the_project_declares_what_it_imports_and_uses_what_it_declares() -> None:
    done = deptry(ROOT)
    assert done.returncode == 0, done.stdout


def test_an_undeclared_import_fails_the_check(tmp_path: Path) -> None:
    copy = project_copy(tmp_path)
    pyproject = copy / "pyproject.toml"
    text = pyproject.read_text()
    assert '"psutil>=5.9",' in text
    pyproject.write_text(text.replace('"psutil>=5.9",', ""))
    done = deptry(copy)
    assert done.returncode != 0 and "'psutil' imported but" in done.stdout, done.stdout


def test_an_unused_declared_package_fails_the_check(tmp_path: Path) -> None:
    copy = project_copy(tmp_path)
    pyproject = copy / "pyproject.toml"
    text = pyproject.read_text()
    pyproject.write_text(text.replace('"httpx>=0.27",', '"httpx>=0.27",\n    "six>=1.16",'))
    done = deptry(copy)
    assert done.returncode != 0 and "'six' defined as a dependency but not used" in done.stdout, done.stdout
