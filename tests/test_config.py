"""The typed config machinery: precedence, unknown keys, bad values, sizes, CLI options."""

from __future__ import annotations

import argparse
from typing import Literal

import pytest
import yaml
from pydantic import Field

from vitpipe.config import (ByteSize, ConfigError, StageConfig, add_config_arguments, build_config,
                            config_from_args, parse_size, save_config)


class OptimSection(StageConfig):
    lr: float = Field(1e-3, description="peak learning rate")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")


class ToyConfig(StageConfig):
    src: str = Field("", description="where to read")
    out: str = Field("", description="where to write")
    name: str = Field("run", description="a name (text: '007' must stay a string)")
    steps: int = Field(10, gt=0, description="how many steps")
    precision: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="number format")
    resume: bool = Field(True, description="resume if possible")
    max_size: ByteSize = Field("1GB", description="largest file")
    optim: OptimSection = OptimSection()


def parse(argv, positional=("src", "out")):
    p = argparse.ArgumentParser()
    add_config_arguments(p, ToyConfig, positional=positional)
    return config_from_args(ToyConfig, p.parse_args(argv))


def test_defaults_when_nothing_given():
    cfg = build_config(ToyConfig)
    assert cfg.steps == 10 and cfg.optim.lr == 1e-3 and cfg.max_size == 10**9


def test_precedence_cli_over_file_over_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"steps": 5, "optim": {"lr": 0.5}, "name": "file"}))
    cfg = parse(["a", "b", "--config", str(f), "--optim.lr", "0.25", "--name", "007"])
    assert cfg.src == "a" and cfg.out == "b"
    assert cfg.steps == 5  # from the file
    assert cfg.optim.lr == 0.25  # CLI beats the file
    assert cfg.optim.betas == (0.9, 0.999)  # default kept inside a partly given section
    assert cfg.name == "007"  # text fields are not YAML-parsed


def test_bool_and_choice_options():
    cfg = parse(["a", "b", "--no-resume", "--precision", "fp32", "--max-size", "512MiB"])
    assert cfg.resume is False and cfg.precision == "fp32" and cfg.max_size == 512 * 2**20


def test_unknown_key_in_file_names_key_and_allowed(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"optim": {"learning_rate": 1.0}}))
    with pytest.raises(ConfigError) as e:
        build_config(ToyConfig, f)
    msg = str(e.value)
    assert "optim.learning_rate" in msg and "lr" in msg and "betas" in msg


def test_bad_value_names_key_and_value():
    with pytest.raises(ConfigError) as e:
        build_config(ToyConfig, overrides={"steps": 0, "precision": "int3"})
    msg = str(e.value)
    assert "steps" in msg and "precision" in msg and "int3" in msg and "'bf16'" in msg


def test_unknown_cli_option_is_an_error(capsys):
    with pytest.raises(SystemExit):
        parse(["a", "b", "--optim.momentum", "0.9"])
    assert "--optim.momentum" in capsys.readouterr().err


def test_missing_or_malformed_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(ToyConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(ToyConfig, bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        build_config(ToyConfig, listy)


@pytest.mark.parametrize("text,expected", [
    ("512MB", 512 * 10**6), ("1GiB", 2**30), ("1.5GB", 1_500_000_000), ("4096", 4096),
    (4096, 4096), ("10 kb", 10_000), ("2M", 2 * 2**20),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["0", "-1MB", "12XB", "MB", "", True])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_bad_size_in_config_names_key():
    with pytest.raises(ConfigError) as e:
        build_config(ToyConfig, overrides={"max_size": "12XB"})
    assert "max_size" in str(e.value) and "12XB" in str(e.value) and "512MB" in str(e.value)


def test_saved_config_round_trips(tmp_path):
    cfg = build_config(ToyConfig, overrides={"steps": 3, "optim.lr": 0.1})
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = build_config(ToyConfig, path)
    assert again == cfg
