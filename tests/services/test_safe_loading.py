"""What a variant must pass before a runtime reads it: ONNX external data confined to the variant's
folder, a size limit on the model files, and servers that listen on the loopback interface only.

Variants are real copies of the tiny ONNX MLP, rewritten with real external data files; runtimes and
servers are the real ones."""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import onnx
import psutil
import pytest

from optiserve.deploy.targets.local import LocalTarget
from optiserve.errors import ArtifactError, ServingError
from optiserve.manifest import describe_artifact, load_variant, variant_dir, write_variant
from optiserve.models.resolve import resolve_model
from optiserve.optimizers.source import materialize_source
from optiserve.procs import free_port
from optiserve.safeload import GIB, check_model_files
from optiserve.services.core import ServingCore
from optiserve.services.runtimes.base import Runtime
from optiserve.types import Endpoint, ServingLimits, Variant
from tests.conftest import (
    processes_mentioning,
    random_inputs,
    serve_cli,
    service_needles,
    service_spec,
    torch_reference,
)

# --- variants with external data ------------------------------------------------------------------------


def copy_variant(variant: Variant, workdir: Path, to: Path) -> Path:
    """A private copy of a variant's folder, in ``to``'s variants/ (tests below rewrite it)."""
    folder = variant_dir(to, variant.id)
    shutil.copytree(variant_dir(workdir, variant.id), folder)
    return folder


def externalize(folder: Path, data_relpath: str = "weights.bin") -> Path:
    """Rewrite the folder's model.onnx with every initializer in one external file, as onnx saves it
    (``data_relpath``, relative to the model), and list that file in the manifest; returns its path."""
    model_path = folder / "model.onnx"
    model = onnx.load(str(model_path))
    (folder / data_relpath).parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model,
        str(model_path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_relpath,
        size_threshold=0,
    )
    variant = load_variant(folder, verify=False)
    artifacts = {
        "model": describe_artifact(folder, "model.onnx"),
        "weights": describe_artifact(folder, data_relpath),
    }
    write_variant(folder, variant.model_copy(update={"artifacts": artifacts}))
    return folder / data_relpath


def point_external_data_at(folder: Path, location: str) -> None:
    """Make every external tensor of the folder's model.onnx name ``location`` (only the protobuf's
    metadata changes), and drop the data file from the manifest as a hand-made variant would."""
    model_path = folder / "model.onnx"
    model = onnx.load(str(model_path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    model_path.write_bytes(model.SerializeToString())
    variant = load_variant(folder, verify=False)
    write_variant(
        folder, variant.model_copy(update={"artifacts": {"model": describe_artifact(folder, "model.onnx")}})
    )


def onnxruntime_for(folder: Path) -> Runtime:
    return Runtime.get("onnxruntime")(load_variant(folder), folder)


@pytest.mark.parametrize("data_relpath", ["weights.bin", "data/weights.bin"])
def test_external_data_inside_the_variant_folder_loads_and_gives_the_same_outputs(
    data_relpath: str, onnx_source: Variant, variants_workdir: Path, tmp_path: Path
) -> None:
    folder = copy_variant(onnx_source, variants_workdir, tmp_path)
    data = externalize(folder, data_relpath)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    runtime = onnxruntime_for(folder)
    runtime.load()
    x = random_inputs(3, seed=5)
    np.testing.assert_allclose(runtime.infer(x), torch_reference(x), atol=1e-5, rtol=1e-5)
    # The data file counts toward the size limit, with the model it belongs to.
    total = check_model_files(load_variant(folder), folder, ServingLimits().max_model_gib)
    assert total == (folder / "model.onnx").stat().st_size + data.stat().st_size


def escaping_variant(kind: str, onnx_source: Variant, workdir: Path, tmp_path: Path) -> tuple[Path, str]:
    """A variant whose external data is a valid weights file outside its folder, reached by an
    absolute path, by '..', or by a symlink inside the folder; returns the folder and the location."""
    folder = copy_variant(onnx_source, workdir, tmp_path)
    data = externalize(folder)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    if kind == "absolute":
        location = str(shutil.move(data, outside / "weights.bin"))
    elif kind == "dotdot":
        shutil.move(data, folder.parent / "weights.bin")
        location = "../weights.bin"
    else:
        shutil.move(data, outside / "weights.bin")
        (folder / "link.bin").symlink_to(outside / "weights.bin")
        location = "link.bin"
    point_external_data_at(folder, location)
    return folder, location


ESCAPES = ["absolute", "dotdot", "symlink"]


@pytest.mark.parametrize("kind", ESCAPES)
def test_onnxruntime_refuses_external_data_outside_the_variant_folder(
    kind: str, onnx_source: Variant, variants_workdir: Path, tmp_path: Path
) -> None:
    folder, location = escaping_variant(kind, onnx_source, variants_workdir, tmp_path)
    runtime = onnxruntime_for(folder)
    with pytest.raises(ArtifactError) as refused:
        runtime.load()
    line = refused.value.one_line()
    assert "\n" not in line
    # Our check, naming the tensor, the location and what is expected (not ONNX Runtime's own error).
    assert "tensor 'w1'" in line and repr(location) in line, line
    assert "relative to the variant's folder" in line or "outside the variant's folder" in line, line
    assert "ONNX Runtime" not in line
    assert not runtime.ready


def test_openvino_given_an_onnx_file_refuses_external_data_outside_the_variant_folder(
    onnx_source: Variant, variants_workdir: Path, tmp_path: Path
) -> None:
    """OpenVINO reads ONNX files too (a hand-edited manifest could hand it one): the same check."""
    runtime_cls = Runtime.get("openvino")
    if not runtime_cls.availability().ok:
        pytest.skip(runtime_cls.availability().reason)
    folder, location = escaping_variant("symlink", onnx_source, variants_workdir, tmp_path)
    runtime = runtime_cls(load_variant(folder).model_copy(update={"format": "openvino"}), folder)
    with pytest.raises(ArtifactError, match="outside the variant's folder") as refused:
        runtime.load()
    assert repr(location) in refused.value.one_line() and "OpenVINO" not in refused.value.one_line()


@pytest.mark.parametrize("kind", ESCAPES)
def test_the_service_refuses_external_data_outside_the_variant_folder_before_loading(
    kind: str, onnx_source: Variant, variants_workdir: Path, tmp_path: Path
) -> None:
    """The serving core's check runs before any runtime exists (and before its metrics are registered,
    so a refused ServingCore leaves this process as it found it)."""
    folder, location = escaping_variant(kind, onnx_source, variants_workdir, tmp_path)
    with pytest.raises(ArtifactError, match="external data of tensor 'w1'") as refused:
        ServingCore(service_spec(load_variant(folder), tmp_path, "onnxruntime"))
    assert repr(location) in refused.value.one_line()


def test_a_manifest_artifact_path_leading_out_of_the_folder_is_refused(
    onnx_source: Variant, variants_workdir: Path, tmp_path: Path
) -> None:
    folder = copy_variant(onnx_source, variants_workdir, tmp_path)
    shutil.move(folder / "model.onnx", folder.parent / "model.onnx")
    variant = load_variant(folder, verify=False)
    art = variant.artifacts["model"].model_copy(update={"path": "../model.onnx"})
    write_variant(folder, variant.model_copy(update={"artifacts": {"model": art}}))
    with pytest.raises(
        ArtifactError, match=r"artifact 'model' is '\.\./model\.onnx', which leads to .*outside"
    ):
        check_model_files(load_variant(folder, verify=False), folder, 4.0)


# --- the size limit -------------------------------------------------------------------------------------


def test_model_files_above_the_default_limit_are_refused_before_anything_reads_them(
    onnx_source: Variant, variants_workdir: Path, tmp_path: Path
) -> None:
    """A 4.5 GiB model.onnx (sparse: no disk used, and not a valid model) is refused by its size alone,
    in well under the time hashing or parsing it would take."""
    folder = copy_variant(onnx_source, variants_workdir, tmp_path)
    with (folder / "model.onnx").open("r+b") as fh:
        fh.truncate(int(4.5 * GIB))
    started = time.monotonic()
    with pytest.raises(ArtifactError) as refused:
        ServingCore(service_spec(load_variant(folder, verify=False), tmp_path, "onnxruntime"))
    assert time.monotonic() - started < 2
    line = refused.value.one_line()
    assert "\n" not in line
    for part in (
        "4.50 GiB",
        "model.onnx",
        "the 4.00 GiB of limits.max_model_gib = 4;",
        "raise serving.limits.max_model_gib",
    ):
        assert part in line, line


def test_external_data_counts_toward_the_size_limit(
    onnx_source: Variant, variants_workdir: Path, tmp_path: Path
) -> None:
    folder = copy_variant(onnx_source, variants_workdir, tmp_path)
    data = externalize(folder)
    model_size = (folder / "model.onnx").stat().st_size
    assert data.stat().st_size > model_size  # the weights are in the data file
    limit = (model_size + data.stat().st_size - 1) / GIB  # one byte short of both
    check_model_files(load_variant(folder), folder, 2 * limit)
    with pytest.raises(
        ArtifactError,
        match=r"\(weights\.bin: [\d,]+ bytes\), above the [\d,]+ bytes of limits\.max_model_gib",
    ):
        check_model_files(load_variant(folder), folder, limit)


@pytest.mark.slow
def test_a_server_refuses_a_model_above_its_configured_limit_with_one_line(
    onnx_source: Variant, variants_workdir: Path, tmp_path: Path
) -> None:
    """Through `bentoml serve`: the start fails fast, and the server's log says why in one line."""
    spec = service_spec(onnx_source, variants_workdir, "onnxruntime")
    size = onnx_source.artifacts["model"].size_bytes
    small = spec.model_copy(update={"limits": ServingLimits(max_model_gib=(size // 2) / GIB)})
    started = time.monotonic()
    with LocalTarget(tmp_path, ready_timeout_s=120) as deployment, pytest.raises(ServingError) as failed:
        deployment.start(small)
    assert time.monotonic() - started < 60
    (line,) = {x.strip() for x in str(failed.value).splitlines() if "errors.ArtifactError:" in x}
    assert f"its model files take {size:,} bytes (model.onnx: {size:,} bytes)" in line, line
    assert f"above the {size // 2:,} bytes of limits.max_model_gib" in line, line
    assert line.endswith("raise serving.limits.max_model_gib in the experiment file to serve it"), line


def test_max_model_gib_is_read_from_the_experiment_file(tmp_path: Path) -> None:
    from optiserve.config import load_config

    config = tmp_path / "e.yaml"
    config.write_text("model: {ref: efficientnet-lite0}\nserving:\n  limits: {max_model_gib: 0.5}\n")
    assert load_config(config).serving.limits.max_model_gib == 0.5
    assert ServingLimits().max_model_gib == 4.0


# --- loopback only --------------------------------------------------------------------------------------


def non_loopback_addresses() -> list[str]:
    """This machine's IPv4/IPv6 addresses other than loopback and link-local ones."""
    found = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            address = a.address.split("%")[0]
            if address.startswith(("127.", "fe80:")) or address == "::1":
                continue
            found.append(address)
    return found


def assert_loopback_only(port: int, servers: list[psutil.Process]) -> None:
    """Nothing answers on ``port`` at any other address of this machine, and no process of the server
    listens anywhere but on loopback (BentoML's supervisor included)."""
    addresses = non_loopback_addresses()
    if not addresses:
        pytest.skip("this machine has no address besides loopback")
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # the control: it is up
    for address in addresses:
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=2).close()
    listening = [
        (p.pid, c.laddr.ip, c.laddr.port)
        for p in servers
        for c in p.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert any(port_ == port for _, _, port_ in listening), listening
    assert all(ip in ("127.0.0.1", "::1") for _, ip, _ in listening), listening


def server_processes(workdir: Path, port: int) -> list[psutil.Process]:
    return [
        p for p in processes_mentioning(*service_needles(workdir, port)) if "bentoml" in " ".join(p.cmdline())
    ]


def test_a_served_variant_is_not_reachable_on_other_addresses(
    mlp_endpoint: Endpoint, variants_workdir: Path
) -> None:
    assert mlp_endpoint.service.host == "127.0.0.1"
    port = mlp_endpoint.service.port
    assert port is not None
    servers = server_processes(variants_workdir, port)
    assert servers
    assert_loopback_only(port, servers)


@pytest.mark.slow
def test_optiserve_serve_listens_on_loopback_only(mlp_onnx: Path, tmp_path: Path) -> None:
    work = tmp_path / "w"
    materialize_source(resolve_model(str(mlp_onnx)), work)
    port = free_port()
    with serve_cli(
        "-m", mlp_onnx, "-w", work, "-r", "onnxruntime", "--port", port, "--for", "120", cwd=tmp_path
    ):
        spec = json.loads(next((work / "services").glob("*/service.json")).read_text())
        assert spec["host"] == "127.0.0.1"
        assert_loopback_only(port, server_processes(work, port))


def test_the_model_is_parsed_once_for_the_service_and_its_runtime_and_again_when_it_changes(
    onnx_source: Variant, variants_workdir: Path, tmp_path: Path
) -> None:
    from optiserve.safeload import _external_locations, onnx_external_data

    folder = copy_variant(onnx_source, variants_workdir, tmp_path)
    data = externalize(folder)
    model = folder / "model.onnx"
    _external_locations.cache_clear()
    assert onnx_external_data(model, folder) == [data.resolve()]
    assert onnx_external_data(model, folder) == [data.resolve()]
    info = _external_locations.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    point_external_data_at(folder, "../elsewhere/weights.bin")  # a changed file is read again
    with pytest.raises(ArtifactError, match="outside the variant's folder"):
        onnx_external_data(model, folder)
    assert _external_locations.cache_info().misses == 2
