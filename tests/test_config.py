"""The experiment YAML: every key is checked, errors name the key, and flags override the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from optiserve.cli import _config
from optiserve.config import ExperimentConfig, load_config, parse_config, with_overrides
from optiserve.errors import ConfigError


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    cfg = load_config(None)
    assert cfg == ExperimentConfig()
    assert cfg.model.ref == "efficientnet-lite0"
    assert cfg.optimizers is None  # the model's recommended set


def test_misspelt_top_level_key_lists_the_allowed_keys() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"lod": {}})
    message = str(info.value)
    assert "'lod'" in message
    for key in ("eval", "load", "model", "optimizers", "serving", "workdir"):
        assert key in message


def test_misspelt_nested_key_lists_the_keys_allowed_there(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "load:\n  concurency: [1]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "'load.concurency'" in message
    allowed = message.split("allowed here: ")[1].split(", ")
    assert {"concurrency", "duration_s", "scenario", "warmup_s"} <= set(allowed)
    assert allowed == sorted(allowed)
    assert str(path) in message


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("load:\n  duration_s: fast\n", "load.duration_s"),
        ("load:\n  concurrency: [0]\n", "load.concurrency"),
        ("eval:\n  samples: many\n", "eval.samples"),
        ("serving:\n  batching:\n    max_batch_size: -1\n", "serving.batching.max_batch_size"),
    ],
)
def test_wrong_type_names_the_key(tmp_path: Path, yaml_text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(write_yaml(tmp_path, yaml_text))


def test_not_yaml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML at line 3"):
        load_config(write_yaml(tmp_path, "load:\n  concurrency: [1\n  x: 1\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write_yaml(tmp_path, "- just\n- a list\n"))


def test_flags_override_the_yaml_and_keep_the_rest(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        "model:\n  ref: from-yaml.onnx\n"
        "workdir: yaml-work\n"
        "load:\n  concurrency: [1, 4]\n  duration_s: 12\n  warmup_s: 2\n"
        "eval:\n  samples: 32\n",
    )
    cfg = _config(path, model="flag.onnx", concurrency="2,8", duration=5.0, runtimes=["onnxruntime"])
    assert cfg.model.ref == "flag.onnx"
    assert cfg.load.concurrency == (2, 8)
    assert cfg.load.duration_s == 5.0
    assert cfg.serving.runtimes == ("onnxruntime",)
    # what no flag touched comes from the file
    assert cfg.load.warmup_s == 2
    assert cfg.eval.samples == 32
    assert cfg.workdir == Path("yaml-work")


def test_overrides_are_validated_too() -> None:
    with pytest.raises(ConfigError, match=r"command line: load\.duration_s"):
        with_overrides(ExperimentConfig(), {"load.duration_s": -1})
    with pytest.raises(ConfigError, match="comma-separated whole numbers"):
        _config(None, concurrency="1,two")
