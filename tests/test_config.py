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
    mean: tuple[float, ...] = Field((0.5,), description="one value or one per channel")
    extra: list[str] = Field(default_factory=list, description="arguments passed on")
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


@pytest.mark.parametrize("argv", [["0.485", "0.456", "0.406"], ["0.485,0.456,0.406"], ["[0.485, 0.456, 0.406]"]])
def test_sequence_options_take_values_as_their_help_shows(argv):
    cfg = parse(["a", "b", "--mean", *argv, "--optim.betas", "0.8", "0.9"])
    assert cfg.mean == (0.485, 0.456, 0.406) and cfg.optim.betas == (0.8, 0.9)
    assert parse(["a", "b", "--mean", "0.25"]).mean == (0.25,)  # one value for every channel
    with pytest.raises(ConfigError, match=r"optim.betas.*(at most|2 items)"):
        parse(["a", "b", "--optim.betas", "0.8", "0.9", "0.99"])
    # a list of text is one value, so positionals may follow it
    cfg = parse(["--extra", "[--exclusive, --qos=high]", "a", "b"])
    assert cfg.extra == ["--exclusive", "--qos=high"] and (cfg.src, cfg.out) == ("a", "b")


class NeedsInit(StageConfig):
    init: str = Field(description="the model to start from")


def test_required_option_says_so_in_help_and_error(capsys):
    p = argparse.ArgumentParser()
    add_config_arguments(p, NeedsInit)
    p.print_help()
    assert "[required]" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="init: required; pass --init VALUE"):
        config_from_args(NeedsInit, p.parse_args([]))


def test_a_check_across_fields_is_one_clean_line():
    from pydantic import model_validator

    class Pair(StageConfig):
        a: int = 0
        b: int = 0

        @model_validator(mode="after")
        def _a_needs_b(self):
            if self.a and not self.b:
                raise ValueError("a needs b; pass --b too")
            return self

    with pytest.raises(ConfigError) as e:
        build_config(Pair, overrides={"a": 1})
    assert str(e.value).splitlines()[1] == "  a needs b; pass --b too"


def test_missing_or_malformed_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(ToyConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a folder, not a YAML file"):
        build_config(ToyConfig, tmp_path)
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
