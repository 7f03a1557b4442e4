"""`vitpipe finetune` on the pretraining engine: starting weights from an export, a timm file or MLflow,
new head, higher resolution, full (LLRD) and linear-probe modes, and bad input rejected up front."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vit.train.config import FinetuneConfig, PretrainConfig
from vit.finetune import LinearProbe, finetune, load_init
from vit.pretrain import pretrain
from vitpipe.errors import UserError

# shuffle_buffer above the split size: the digits shards hold classes in order, and a smaller buffer
# gives the first batches only some classes (a head then unlearns what it just learned).
DATA = {"image_size": 16, "batch_size": 32, "num_workers": 0, "shuffle_buffer": 2000, "augment": {"crop_scale": [0.8, 1.0], "hflip": 0.0}}


@pytest.fixture(scope="module")
def pretrained(digits_shards, tmp_path_factory):
    """A short real pretraining run (in process) whose export and MLflow run fine-tuning starts from."""
    root = tmp_path_factory.mktemp("pretrained")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    r = pretrain(PretrainConfig(model={"preset": "micro/4"}, data={"shards": str(digits_shards), **DATA},
                                train={"steps": 6, "eval_every": 0, "log_every": 3}, schedule={"warmup_steps": 2},
                                checkpoint={"every_steps": 0},
                                tracking={"uri": uri, "experiment": "pre", "system_metrics": False},
                                out=str(root / "run")))
    return r, uri


def _cfg(shards, tmp_path, init, **kw) -> FinetuneConfig:
    data = {"shards": str(shards), **DATA, **kw.pop("data", {})}
    return FinetuneConfig(init=str(init), data=data, out=str(tmp_path / "ft"),
                          train={"steps": 8, "eval_every": 0, "log_every": 4, **kw.pop("train", {})},
                          schedule={"warmup_steps": 2}, checkpoint={"every_steps": 0},
                          tracking=kw.pop("tracking", {"enabled": False}), **kw)


@pytest.fixture(scope="module")
def unlabelled_shards(tmp_path_factory):
    from pipeline.packaged_data import write_photos
    from pipeline.shard import ShardConfig, shard

    root = tmp_path_factory.mktemp("photos")
    out = root / "shards"
    shard(ShardConfig(src=str(write_photos(root / "images")), out=str(out), val_ratio=0.3))
    return out


def test_bad_input_rejected_before_training(pretrained, digits_shards, unlabelled_shards, tmp_path):
    r, _ = pretrained
    export = r["export"]
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model\n")
    cases = [
        (_cfg(digits_shards, tmp_path, tmp_path / "missing"), "does not exist"),
        (_cfg(digits_shards, tmp_path, ""), "init is empty; pass --init"),
        (_cfg(digits_shards, tmp_path, Path(export) / "config.json"), "not a weights file .*pass its folder"),
        (_cfg(digits_shards, tmp_path, notes), r"notes.txt' is not a weights file"),
        (_cfg(digits_shards, tmp_path, export, model={"preset": "ti/4"}), "another architecture than model.preset"),
        (_cfg(digits_shards, tmp_path, export, model={"overrides": {"num_classes": 0}}),
         "model.overrides.num_classes"),
        (_cfg(unlabelled_shards, tmp_path, export, data={"batch_size": 2}), "has no class labels"),
        (_cfg(digits_shards, tmp_path, export, data={"val_split": "test"}), "split 'test' is not in the shard set"),
        (_cfg(digits_shards, tmp_path, export, data={"channels": 1, "mean": [0.5], "std": [0.5]}),
         "3-channel images but data.channels=1"),
    ]
    for cfg, match in cases:
        with pytest.raises(UserError, match=match):
            finetune(cfg)
    assert not (tmp_path / "ft" / "checkpoints").exists()  # no training step ran for any of them


def test_timm_checkpoint_and_mlflow_uris_load(pretrained, digits_shards, tmp_path):
    import mlflow
    import timm

    from vit.tracking.registry import register_model
    from vit.models.weights import load_pretrained

    # A timm ViT of the micro/4 architecture, saved the way timm users save theirs.
    torch.manual_seed(0)
    ref = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=4, embed_dim=64, depth=4,
                                                           num_heads=4, mlp_ratio=2.0, num_classes=7)
    torch.save(ref.state_dict(), tmp_path / "timm_micro.pth")
    with pytest.raises(UserError, match="name it with --model.preset"):
        load_init(_cfg(digits_shards, tmp_path, tmp_path / "timm_micro.pth"), num_classes=10)
    model = load_init(_cfg(digits_shards, tmp_path, tmp_path / "timm_micro.pth", model={"preset": "micro/4"}),
                      num_classes=10)
    x = torch.randn(2, 3, 16, 16)
    ref.eval(), model.eval()
    torch.testing.assert_close(model.forward_features(x), ref.forward_features(x), rtol=1e-4, atol=1e-5)
    assert model.cfg.num_classes == 10
    # a timm model without a class token (mean pooling, fc_norm): what the preset leaves open comes from the file
    no_cls = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=4, embed_dim=64, depth=4,
                                                              num_heads=4, mlp_ratio=2.0, num_classes=7,
                                                              class_token=False, global_pool="avg").eval()
    torch.save(no_cls.state_dict(), tmp_path / "timm_no_cls.pth")
    model = load_init(_cfg(digits_shards, tmp_path, tmp_path / "timm_no_cls.pth", model={"preset": "micro/4"}),
                      num_classes=10).eval()
    assert (model.cfg.class_token, model.cfg.global_pool, model.cfg.fc_norm) == (False, "avg", True)
    torch.testing.assert_close(model.forward_features(x), no_cls.forward_features(x), rtol=1e-4, atol=1e-5)

    r, uri = pretrained
    base = load_pretrained(r["export"]).eval()
    from_run = load_init(_cfg(digits_shards, tmp_path, f"runs:/{r['run_id']}/model", tracking={"uri": uri}),
                         num_classes=4).eval()
    torch.testing.assert_close(from_run.forward_features(x), base.forward_features(x))
    assert from_run.cfg.num_classes == 4

    mlflow.set_tracking_uri(uri)
    register_model(base, "digits-micro", alias="candidate")
    from_registry = load_init(_cfg(digits_shards, tmp_path, "models:/digits-micro@candidate",
                                   tracking={"uri": uri}, data={"image_size": 24}), num_classes=10).eval()
    assert from_registry.cfg.image_size == 24 and from_registry.pos_embed.shape == (1, 1 + 36, 64)
    with pytest.raises(UserError, match="cannot fetch it from MLflow"):
        load_init(_cfg(digits_shards, tmp_path, "models:/no-such-model@candidate", tracking={"uri": uri}),
                  num_classes=10)


def test_linear_probe_never_backpropagates_into_the_backbone():
    from vit.models.vit import create_model

    model = create_model("micro/4", num_classes=3, image_size=16)
    probe = LinearProbe(model).train()
    assert not model.training  # frozen backbone: no dropout / drop-path noise either
    logits = probe(torch.randn(4, 3, 16, 16))
    logits.sum().backward()
    grads = {n: p.grad is not None for n, p in probe.named_parameters()}
    assert grads == {n: n.startswith("vit.head.") for n, _ in probe.named_parameters()}


def test_unset_data_options_follow_the_init(digits_shards, tmp_path):
    """A grayscale 16x16 export fine-tunes with only --init and --data.shards given: channels, image
    size, mean, std and eval crop come from the model and its recorded training; a size given
    explicitly still wins (position embedding resampled); a channel count given must match."""
    from vitpipe.config import read_yaml

    gray = {"channels": 1, "mean": [0.25], "std": [0.35], "eval_crop_pct": 0.9}
    r = pretrain(PretrainConfig(model={"preset": "micro/4"},
                                data={"shards": str(digits_shards), **DATA, **gray},
                                train={"steps": 2, "eval_every": 0, "log_every": 1}, schedule={"warmup_steps": 1},
                                checkpoint={"every_steps": 0}, tracking={"enabled": False}, out=str(tmp_path / "pre")))

    def run(name: str, model=None, **data):
        cfg = FinetuneConfig(init=r["export"], data={"shards": str(digits_shards), "batch_size": 16,
                                                      "num_workers": 0, **data}, model=model or {},
                             out=str(tmp_path / name), train={"steps": 2, "eval_every": 0, "log_every": 1},
                             schedule={"warmup_steps": 1}, checkpoint={"every_steps": 0}, tracking={"enabled": False})
        finetune(cfg)
        return read_yaml(tmp_path / name / "config.yaml")["data"]

    used = run("bare")
    assert {k: used[k] for k in ("channels", "image_size", *gray)} == {"image_size": 16, **gray}
    used = run("bigger", image_size=24, mean=[0.5], std=[0.5])
    assert (used["image_size"], used["channels"], used["mean"], used["std"], used["eval_crop_pct"]) == \
        (24, 1, [0.5], [0.5], 0.9)
    with pytest.raises(UserError, match="takes 1-channel images but data.channels=3"):
        run("rgb", channels=3)
    assert run("model_size", model={"image_size": 24})["image_size"] == 24  # model.image_size resizes too
    assert json.loads((tmp_path / "model_size" / "export" / "config.json").read_text())["image_size"] == 24
    with pytest.raises(UserError, match="model.image_size=24 and data.image_size=32 differ"):
        run("both", model={"image_size": 24}, image_size=32)


@pytest.mark.slow
def test_full_finetune_at_higher_resolution(pretrained, digits_shards, tmp_path, mlflow_uri):
    from mlflow import MlflowClient

    from vit.models.weights import load_pretrained

    r, _ = pretrained
    cfg = _cfg(digits_shards, tmp_path, r["export"], data={"image_size": 24}, layer_decay=0.7,
               deepspeed={"zero_stage": 1, "grad_accum": 2}, tracking={"uri": mlflow_uri, "system_metrics": False})
    res = finetune(cfg)
    assert res["stage"] == "finetune" and res["step"] == 8 and res["val/samples"] == 170
    model = load_pretrained(res["export"])
    assert model.cfg.image_size == 24 and model.cfg.num_classes == 10 and model.pos_embed.shape[1] == 1 + 36
    base = load_pretrained(r["export"])
    assert not torch.equal(model.blocks[0].attn.qkv.weight, base.blocks[0].attn.qkv.weight)  # backbone trained
    run = MlflowClient(mlflow_uri).get_run(res["run_id"])
    assert run.data.params["init.source"] == r["export"] and run.data.params["layer_decay"] == "0.7"
    assert run.data.tags["vitpipe.stage"] == "finetune" and run.info.status == "FINISHED"
    assert run.data.params["derived.global_batch"] == "64"  # 32 per micro-batch x 2 accumulated x 1 rank
    # the evaluation stage's full report lands in the fine-tuning run itself
    assert {"val/macro_f1", "val/top5", "val/top1"} <= set(run.data.metrics) and "val/macro_f1" in res
    logged = {a.path for a in MlflowClient(mlflow_uri).list_artifacts(res["run_id"], "evaluation/val")}
    assert {"evaluation/val/confusion_matrix.png", "evaluation/val/results.json"} <= logged, logged


@pytest.mark.slow
def test_linear_probe_run_changes_only_the_head(pretrained, digits_shards, tmp_path):
    from vit.models.weights import load_pretrained

    r, _ = pretrained
    res = finetune(_cfg(digits_shards, tmp_path, r["export"], mode="linear_probe", optim={"lr": 3e-3},
                        train={"steps": 10}))
    before, after = load_pretrained(r["export"]).state_dict(), load_pretrained(res["export"]).state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}
    assert res["final_loss"] < res["first_loss"]


def test_cli_help_and_one_line_error(tmp_path, digits_shards):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    help_text = subprocess.run([sys.executable, "-m", "vitpipe.cli", "finetune", "--help"], env=env,
                               capture_output=True, text=True, timeout=300).stdout
    for option in ("--init", "--mode", "--layer-decay", "--nproc", "--hostfile", "--no-resume", "--data.image-size"):
        assert option in help_text, option
    proc = subprocess.run([sys.executable, "-m", "vitpipe.cli", "finetune", "--data.shards", str(digits_shards),
                           "--init", str(tmp_path / "nope"), "--out", str(tmp_path / "ft")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"init='{tmp_path / 'nope'}' does not exist" in proc.stderr
