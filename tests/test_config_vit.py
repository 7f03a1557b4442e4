"""PretrainConfig / FinetuneConfig: defaults, file < CLI precedence, unknown keys, stage CLI options."""

from __future__ import annotations

import argparse

import pytest

from vit.train.config import FinetuneConfig, PretrainConfig, add_stage_arguments, stage_config_from_args
from vitpipe.config import ConfigError, build_config
from vitpipe.errors import UserError


def _parse(cls, argv):
    parser = argparse.ArgumentParser()
    add_stage_arguments(parser, cls)
    return stage_config_from_args(cls, parser.parse_args(argv))


def test_defaults_follow_the_paper():
    cfg = PretrainConfig(data={"shards": "s"})
    assert (cfg.optim.beta2, cfg.optim.weight_decay) == (0.999, 0.1)
    assert cfg.schedule.decay == "cosine" and cfg.deepspeed.precision == "auto"
    assert cfg.checkpoint.resume and cfg.train.steps is None and cfg.train.epochs == 1.0


def test_file_then_cli_precedence(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("data: {shards: /data/s, batch_size: 8}\noptim: {lr: 0.01}\ndeepspeed: {zero_stage: 2}\n")
    cfg = _parse(PretrainConfig, [str(f), "--optim.lr", "0.002", "--deepspeed.zero-stage", "3", "--nproc", "2"])
    assert cfg.optim.lr == 0.002 and cfg.deepspeed.zero_stage == 3  # CLI wins
    assert cfg.data.batch_size == 8 and cfg.data.shards == "/data/s"  # file kept
    assert cfg.checkpoint.resume
    assert not _parse(PretrainConfig, [str(f), "--no-resume"]).checkpoint.resume


def test_two_config_files_rejected(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("data: {shards: x}\n")
    b.write_text("data: {shards: y}\n")
    with pytest.raises(ConfigError, match="two config files"):
        _parse(PretrainConfig, [str(a), "--config", str(b)])


@pytest.mark.parametrize("data, match", [
    ({"optim": {"lr": 1e-3, "momentum": 0.9}}, "unknown key 'optim.momentum'"),
    ({"deepspeed": {"zero_stage": 4}}, "deepspeed.zero_stage"),
    ({"deepspeed": {"precision": "int8"}}, "deepspeed.precision"),
    ({"checkpoint": {"keep_last": 0}}, "checkpoint.keep_last"),
])
def test_bad_values_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        build_config(PretrainConfig, overrides={"data.shards": "s", **{
            f"{section}.{k}": v for section, values in data.items() for k, v in values.items()}})


def test_finetune_needs_init_and_knows_modes():
    with pytest.raises(ConfigError, match="init"):
        build_config(FinetuneConfig, overrides={"data.shards": "s"})
    cfg = build_config(FinetuneConfig, overrides={"data.shards": "s", "init": "runs:/abc/model",
                                                  "mode": "linear_probe"})
    assert cfg.mode == "linear_probe" and cfg.layer_decay == 0.75 and cfg.model.preset == ""
    with pytest.raises(ConfigError, match="mode"):
        build_config(FinetuneConfig, overrides={"data.shards": "s", "init": "x", "mode": "lora"})


def test_model_overrides_owned_by_the_data():
    from vit.pretrain import model_overrides

    cfg = PretrainConfig(data={"shards": "s", "image_size": 16, "channels": 1, "mean": [0.5], "std": [0.5]},
                         model={"preset": "micro/4", "overrides": {"global_pool": "avg"}})
    o = model_overrides(cfg, num_classes=7)
    assert o == {"global_pool": "avg", "num_classes": 7, "image_size": 16, "in_chans": 1,
                 "drop_path_rate": 0.0, "drop_rate": 0.0}
    with pytest.raises(UserError, match="model.overrides.num_classes"):
        model_overrides(cfg.model_copy(update={"model": cfg.model.model_copy(
            update={"overrides": {"num_classes": 0}})}), num_classes=7)
    with pytest.raises(UserError, match="model.image_size=32 differs from data.image_size=16"):
        model_overrides(cfg.model_copy(update={"model": cfg.model.model_copy(update={"image_size": 32})}),
                        num_classes=7)
