"""The deployment-target registry: every target file is found, described and checked for what it needs;
names that do not exist and engines that are not there are one line each."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from optiserve.deploy.targets.base import Target, target_for
from optiserve.errors import ConfigError, PluginUnavailable
from tests.conftest import error_lines, run_cli


@pytest.mark.parametrize("name", sorted(Target.registry()))
def test_every_target_is_described_and_checks_itself(name: str) -> None:
    cls = Target.get(name)
    assert cls.name == name and cls.description and cls.metrics_source
    avail = cls.availability()
    assert avail.ok or avail.reason  # unavailable always says why


def test_the_targets_the_docs_promise_exist() -> None:
    assert {"local", "docker", "kubernetes", "url"} <= set(Target.registry())


def test_unknown_target_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown target 'nope'; known: "):
        target_for("nope", tmp_path)


def test_kubernetes_without_a_cluster_is_unavailable(tmp_path: Path) -> None:
    if Target.get("kubernetes").availability().ok:
        pytest.skip("a cluster answers here")
    with pytest.raises(PluginUnavailable, match="no Kubernetes cluster"):
        target_for("kubernetes", tmp_path)


def test_cli_names_an_unknown_target_in_one_line(mlp_onnx: Path, tmp_path: Path) -> None:
    done = run_cli("bench", "-m", mlp_onnx, "-w", tmp_path / "w", "--target", "nope", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    (line,) = error_lines(done.stderr)
    assert "unknown target 'nope'" in line


@pytest.mark.slow
def test_docker_target_without_an_engine_is_one_line_exit_5(mlp_onnx: Path, tmp_path: Path) -> None:
    """A PATH with Python but no docker: the target says so before anything starts."""
    work = tmp_path / "w"
    assert run_cli("optimize", "-m", mlp_onnx, "-w", work, "--no-eval", cwd=tmp_path).returncode == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    saved = os.environ["PATH"]
    os.environ["PATH"] = str(bin_dir)
    try:
        done = run_cli("serve", "-m", mlp_onnx, "-w", work, "--target", "docker", "--for", "1", cwd=tmp_path)
    finally:
        os.environ["PATH"] = saved
    assert done.returncode == 5, done.stderr
    (line,) = error_lines(done.stderr)
    assert "docker is not installed" in line and "make system-deps" in line


@pytest.mark.slow
def test_serve_pins_servers_to_serving_cpus_with_serving_threads(mlp_onnx: Path, tmp_path: Path) -> None:
    """`serve` honours serving.cpus and serving.threads as `run` does (it used to ignore the CPUs)."""
    import json

    from tests.conftest import processes_mentioning, serve_cli

    work = tmp_path / "w"
    assert run_cli("optimize", "-m", mlp_onnx, "-w", work, "--no-eval", cwd=tmp_path).returncode == 0
    config = tmp_path / "serve.yaml"
    config.write_text(
        f"model: {{ref: {mlp_onnx}}}\nworkdir: {work}\n"
        "serving:\n  runtimes: [onnxruntime]\n  cpus: [0]\n  threads: {intra_op: 2}\n"
    )
    with serve_cli(config, "--for", "60", cwd=tmp_path) as printed:
        assert any("2 intra-op" in line for line in printed), "".join(printed)
        servers = [p for p in processes_mentioning(str(work)) if "bentoml" in " ".join(p.cmdline())]
        assert servers, "".join(printed)
        for server in servers:
            assert server.cpu_affinity() == [0]
            spec = json.loads((Path(server.cwd()) / "service.json").read_text())
            assert spec["threads"]["intra_op"] == 2


def test_serve_refuses_cpus_this_machine_lacks(mlp_onnx: Path, tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(f"model: {{ref: {mlp_onnx}}}\nworkdir: {tmp_path / 'w'}\nserving:\n  cpus: [4096]\n")
    done = run_cli("serve", config, "--for", "1", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    (line,) = error_lines(done.stderr)
    assert "serving.cpus [4096] names CPUs this machine lacks" in line


@pytest.mark.slow
def test_serve_on_a_taken_port_is_one_line_naming_it(mlp_onnx: Path, tmp_path: Path) -> None:
    import socket

    workdir = tmp_path / "w"
    built = run_cli("optimize", "--model", mlp_onnx, "--workdir", workdir, "-o", "onnx-export", cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("serve", "--model", mlp_onnx, "--workdir", workdir, "--port", port, cwd=tmp_path)
    assert done.returncode == 7, done.stderr
    (line,) = error_lines(done.stderr)
    assert f"port {port} on 127.0.0.1 is already in use" in line and "--port" in line
    assert not (workdir / "services").exists() or not list((workdir / "services").rglob("server.log"))
