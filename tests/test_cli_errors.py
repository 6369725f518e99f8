"""Bad input: one `error:` line, the right exit code, no traceback, and nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from optiserve.cli import app
from tests.conftest import error_lines, run_cli

COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]

# (id, files to create in the cwd, arguments after `run`, exit code, text the error line must contain)
BAD_INPUTS = [
    ("missing-model-file", {}, ["--model", "/nope/x.onnx"], 3, "/nope/x.onnx does not exist"),
    ("not-onnx", {"bad.onnx": "garbage\n"}, ["--model", "bad.onnx"], 3, "not a valid ONNX model"),
    ("unknown-builtin", {}, ["--model", "resnet9000"], 3, "unknown model 'resnet9000'"),
    ("callable-without-shape", {}, ["--model", "tests.tiny_models:mlp"], 3, "input shape must be given"),
    ("misspelt-top-key", {"c.yaml": "lod: {}\n"}, ["c.yaml"], 2, "unknown key 'lod'"),
    (
        "misspelt-nested-key",
        {"c.yaml": "load: {concurency: [1]}\n"},
        ["c.yaml"],
        2,
        "allowed here: arrival, concurrency",
    ),
    ("wrong-type", {"c.yaml": "load: {duration_s: fast}\n"}, ["c.yaml"], 2, "load.duration_s"),
    ("not-yaml", {"c.yaml": "load: [1\n"}, ["c.yaml"], 2, "not valid YAML"),
    ("missing-config", {}, ["nope.yaml"], 2, "nope.yaml does not exist"),
    ("unknown-optimizer", {}, ["-o", "nope"], 2, "unknown optimizer 'nope'"),
    ("unknown-runtime", {}, ["-r", "nope"], 2, "unknown runtime 'nope'"),
    ("bad-concurrency", {}, ["-c", "1,x"], 2, "--concurrency must be comma-separated"),
    ("zero-concurrency", {}, ["-c", "0"], 2, "load.concurrency"),
    ("negative-duration", {}, ["--duration", "-1"], 2, "load.duration_s"),
    ("zero-replicas", {}, ["--replicas", "0"], 2, "serving.replicas"),
]


@pytest.mark.parametrize(
    ("files", "args", "code", "message"), [case[1:] for case in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_is_one_error_line_and_writes_nothing(
    tmp_path: Path, mlp_onnx: Path, files: dict[str, str], args: list[str], code: int, message: str
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    before = sorted(tmp_path.iterdir())
    workdir = tmp_path / "work"
    model = [] if "--model" in args or any(a.endswith(".yaml") for a in args) else ["--model", mlp_onnx]
    done = run_cli("run", "--workdir", workdir, "--duration", 1, *model, *args, cwd=tmp_path, timeout=120)
    assert done.returncode == code, done.stderr
    assert len(error_lines(done.stderr)) == 1, done.stderr
    assert message in error_lines(done.stderr)[0]
    assert "Traceback" not in done.stderr + done.stdout
    assert not workdir.exists()
    assert sorted(tmp_path.iterdir()) == before  # no default optiserve-work/ either


def test_unknown_command_and_option_are_usage_errors(tmp_path: Path) -> None:
    for args in (["fly"], ["run", "--turbo"]):
        done = run_cli(*args, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_report_of_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    done = run_cli("report", tmp_path, cwd=tmp_path)
    assert done.returncode == 2
    assert len(error_lines(done.stderr)) == 1
    assert "is not a results folder" in done.stderr


def test_doctor_lists_plugins_and_tools(tmp_path: Path) -> None:
    done = run_cli("doctor", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for name in ("onnxruntime", "torch-eager", "efficientnet-lite0", "onnx-export", "closed-loop"):
        assert name in done.stdout
    for line in done.stdout.splitlines():  # everything this suite relies on is available here
        if any(f" {name} " in line for name in ("onnxruntime", "torch-eager", "bentoml", "locust")):
            assert "available" in line and "unavailable" not in line, line


def test_models_lists_the_builtin(tmp_path: Path) -> None:
    done = run_cli("models", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "efficientnet-lite0" in done.stdout
    assert "3 × 224 × 224" in done.stdout
    assert "module:factory" in done.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_an_example(command: str, tmp_path: Path) -> None:
    done = run_cli(command, "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Example" in done.stdout
    assert list(tmp_path.iterdir()) == []


def test_every_command_is_covered() -> None:
    assert set(COMMANDS) >= {"run", "optimize", "serve", "bench", "report", "doctor", "models"}
