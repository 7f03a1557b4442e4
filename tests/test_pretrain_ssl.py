"""Self-supervised pretraining (MAE, masked patch prediction) through the real stages: unlabelled
shards in, a head-less encoder out that timm, `vitpipe finetune --init` and `vitpipe evaluate
--knn.enabled` read; MLflow shows reconstructions and an online k-NN; every ZeRO stage, bf16,
grad accumulation and activation checkpointing run it; a 2-rank ZeRO-2 MAE run killed mid-way
resumes to the uninterrupted run's losses, also on another number of ranks; bad input is one
line, exit 2, before anything is written."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from test_pretrain import _config as supervised_config
from test_pretrain import _history, _launch, _vitpipe, _wait_until, _workers  # the same CLI runner and readers
from vit.models.weights import load_pretrained
from vit.pretrain import pretrain
from vit.train.config import PretrainConfig

DATA = {"image_size": 16, "batch_size": 32, "num_workers": 0, "channels": 1, "mean": [0.5], "std": [0.5],
        "augment": {"crop_scale": [0.8, 1.0], "hflip": 0.0}}


@pytest.fixture(scope="session")
def unlabelled_digits(digits_dir, tmp_path_factory) -> Path:
    """The digits' images without their class folders, sharded: index.json has `classes: []`."""
    from pipeline.packaged_data import write_unlabelled
    from pipeline.shard import ShardConfig, shard

    root = tmp_path_factory.mktemp("unlabelled")
    src = write_unlabelled(root / "images", digits_dir)
    out = root / "shards"
    shard(ShardConfig(src=str(src), out=str(out), val_ratio=0.1, max_samples_per_shard=500, workers=1))
    assert json.loads((out / "index.json").read_text())["classes"] == []
    return out


def _config(shards, out, *, objective="mae", mlflow_uri=None, **sections) -> dict:
    """test_pretrain's run, 20 steps of `objective` on 1-channel images, evaluated every 10."""
    ours = {"model": {"preset": "micro/4", "overrides": {}}, "data": DATA,
            "train": {"steps": 20, "eval_every": 10, "objective": objective}}
    for section, values in sections.items():
        ours[section] = {**ours.get(section, {}), **values} if isinstance(values, dict) else values
    return supervised_config(shards, out, mlflow_uri, **ours)


# ---------------------------------------------------------------------------------------------
# One MAE run through the CLI, looked at from every side


@pytest.fixture(scope="module")
def mae_run(unlabelled_digits, digits_shards, tmp_path_factory):
    """`vitpipe pretrain --train.objective mae` on unlabelled shards, probed on the labelled digits."""
    root = tmp_path_factory.mktemp("mae_run")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg_file = root / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(_config(unlabelled_digits, root / "run", mlflow_uri=uri,
                                               probe={"shards": str(digits_shards)})))
    proc = _vitpipe(["pretrain", str(cfg_file)])
    return root, uri, proc


@pytest.mark.slow
def test_mae_run_logs_reconstructions_knn_and_the_loss_curve(mae_run):
    from mlflow import MlflowClient
    from PIL import Image

    root, uri, proc = mae_run
    results = json.loads((root / "run" / "results.json").read_text())
    assert results["step"] == 20 and math.isfinite(results["val/loss"]) and 0 <= results["val/knn_top1"] <= 1
    assert "val k-NN top-1" in proc.stderr  # the summary line says it
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("vitpipe").experiment_id])[0]
    for key in ("val/loss", "val/knn_top1"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [10, 20], key
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 4
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "loss_curve.png", "reconstructions"} <= top
    pngs = sorted(a.path for a in client.list_artifacts(run.info.run_id, "reconstructions"))
    assert pngs == [f"reconstructions/reconstruction_step{s:08d}.png" for s in (10, 20)]
    local = client.download_artifacts(run.info.run_id, pngs[-1], str(root / "download"))
    with Image.open(local) as img:
        assert img.format == "PNG" and img.width > 200 and img.height > 8 * 50  # 3 columns x 8 val images
    # The labels were never read: the export is a head-less encoder.
    assert run.data.params["train.objective"] == "mae" and run.data.params["derived.num_classes"] == "0"


@pytest.mark.slow
def test_mae_export_is_the_encoder_and_timm_gives_identical_features(mae_run):
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    from safetensors.torch import load_file

    from vit.models.weights import timm_model_kwargs, vitpipe_to_timm

    root, _, _ = mae_run
    export = root / "run" / "export"
    model = load_pretrained(export).eval()
    assert model.cfg.num_classes == 0 and model.cfg.in_chans == 1 and model.cfg.global_pool == "avg"
    assert not [k for k in load_file(str(export / "model.safetensors")) if "decoder" in k or "mask_token" in k]
    theirs = TimmViT(**timm_model_kwargs(model.cfg)).eval()
    theirs.load_state_dict(vitpipe_to_timm(model.state_dict(), model.cfg))  # strict
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(theirs.forward_features(x), model.forward_features(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(x), model(x), rtol=1e-5, atol=1e-5)   # pooled features
    # The training checkpoint keeps the decoder (a resumed run continues exactly).
    states = torch.load(next((root / "run" / "checkpoints" / "step_00000020").glob("mp_rank_*_model_states.pt")),
                        weights_only=False)["module"]
    assert "decoder_pred.weight" in states and "mask_token" in states and "vit.pos_embed" in states


@pytest.mark.slow
def test_mae_export_feeds_knn_evaluation_and_finetuning(mae_run, digits_shards, tmp_path):
    root, _, _ = mae_run
    export = root / "run" / "export"
    proc = _vitpipe(["evaluate", "--model", str(export), "--data.shards", str(digits_shards), "--knn.enabled",
                     "--knn.k", "[1, 20]", "--no-tracking.enabled", "--out", str(tmp_path / "knn")])
    results = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert 0.2 < results["knn_top1_k20"] <= 1 and "knn_top1_k20" in proc.stdout
    proc = _vitpipe(["finetune", str(Path("vit/recipes/mae_finetune.yaml").resolve()), "--init", str(export),
                     "--data.shards", str(digits_shards), "--train.steps", "6", "--data.batch-size", "32",
                     "--data.num-workers", "0", "--no-tracking.enabled", "--out", str(tmp_path / "ft")])
    tuned = load_pretrained(tmp_path / "ft" / "export")
    assert tuned.cfg.num_classes == 10 and tuned.cfg.fc_norm and tuned.cfg.global_pool == "avg"
    assert tuned.cfg.drop_path_rate == 0.1  # the MAE recipe's


def test_unlabelled_data_given_to_evaluate_says_what_works(unlabelled_digits, tmp_path, capsys):
    from vit.models.vit import create_model
    from vit.models.weights import save_pretrained
    from vitpipe.cli import main

    model = save_pretrained(create_model("micro/4", num_classes=0, image_size=16, in_chans=1), tmp_path / "m")
    for extra in ([], ["--knn.enabled"]):
        rc = main(["evaluate", "--model", str(model), "--data.shards", str(unlabelled_digits),
                   "--no-tracking.enabled", "--out", str(tmp_path / "o"), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and "unlabelled" in err and "k-NN needs labelled images too" in err, err


# ---------------------------------------------------------------------------------------------
# Every engine setting, small


@pytest.mark.parametrize("objective, deepspeed, train", [
    ("mae", {"zero_stage": 0, "grad_accum": 2}, {"activation_checkpointing": True}),
    ("mae", {"zero_stage": 1, "precision": "bf16"}, {}),
    ("mae", {"zero_stage": 3}, {}),
    ("mpp", {"zero_stage": 2, "precision": "bf16_full"}, {"activation_checkpointing": True}),
    ("mpp", {"zero_stage": 3, "precision": "bf16", "grad_accum": 2}, {}),
])
def test_every_zero_stage_and_precision_runs_self_supervised(objective, deepspeed, train, unlabelled_digits,
                                                             digits_shards, tmp_path):
    out = tmp_path / "run"
    r = pretrain(PretrainConfig(**_config(unlabelled_digits, out, objective=objective, deepspeed=deepspeed,
                                          train={"steps": 4, "eval_every": 0, "log_every": 2, **train},
                                          checkpoint={"every_steps": 0}, probe={"shards": str(digits_shards)})))
    assert r["step"] == 4 and math.isfinite(r["final_loss"]) and math.isfinite(r["val/loss"])
    assert 0 <= r["val/knn_top1"] <= 1  # k-NN on the encoder's weights, gathered under ZeRO-3
    if objective == "mpp":
        assert 0 <= r["val/mpp_accuracy"] <= 1
    model = load_pretrained(r["export"])
    assert model.cfg.num_classes == 0 and next(model.parameters()).dtype == torch.float32


@pytest.mark.slow
def test_compiled_mae_trains(unlabelled_digits, tmp_path):
    r = pretrain(PretrainConfig(**_config(unlabelled_digits, tmp_path / "run", train={
        "steps": 6, "eval_every": 0, "log_every": 3, "compile": True}, checkpoint={"every_steps": 0})))
    assert r["step"] == 6 and r["final_loss"] < r["first_loss"]


def test_labelled_shards_train_mae_with_labels_ignored(digits_shards, tmp_path):
    r = pretrain(PretrainConfig(**_config(digits_shards, tmp_path / "run", objective="mpp",
                                          train={"steps": 3, "eval_every": 0, "log_every": 3},
                                          checkpoint={"every_steps": 0})))
    # The labelled val split gives the online k-NN without any --probe.shards.
    assert "val/knn_top1" in r and load_pretrained(r["export"]).cfg.num_classes == 0


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


@pytest.mark.parametrize("args, message", [
    (["--train.objective", "mae", "--mae.mask-ratio", "1.5"], r"mae.mask_ratio=1.5 must be in \(0, 1\)"),
    (["--train.objective", "mae", "--mae.mask-ratio", "0"], r"mae.mask_ratio=0.0 must be in \(0, 1\)"),
    (["--train.objective", "mae", "--mae.decoder-dim", "131072", "--mae.decoder-heads", "64",
      "--mae.decoder-depth", "64"], "mae.decoder_dim=131072 x mae.decoder_depth=64: the decoder alone needs"),
    (["--train.objective", "mae", "--data.image-size", "18"], "image_size=18 must be a positive multiple of "
                                                              "patch_size=4, e.g. image_size=16"),
    (["--mae.mask-ratio", "0.5"], "mae.mask_ratio is an option of --train.objective mae"),
    (["--train.objective", "mpp", "--no-mae.norm-pix-loss"], "mae.norm_pix_loss is an option of --train.objective mae"),
    ([], "has no class labels.*--train.objective mae"),  # supervised on unlabelled images
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, message, unlabelled_digits, tmp_path):
    import re

    out = tmp_path / "run"
    proc = _vitpipe(["pretrain", "--model.preset", "micro/4", "--data.shards", str(unlabelled_digits),
                     "--data.channels", "1", "--data.mean", "0.5", "--data.std", "0.5", "--data.image-size", "16",
                     "--no-tracking.enabled", "--out", str(out), *args], check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.search(message, proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 2, proc.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Two ranks, ZeRO-2: killed and relaunched, and resumed on one rank


@pytest.fixture(scope="module")
def two_rank_mae(unlabelled_digits, tmp_path_factory):
    """An uninterrupted 2-rank ZeRO-2 MAE run through the CLI (the reference for the resumes)."""
    root = tmp_path_factory.mktemp("two_rank_mae")
    cfg_file = root / "run.yaml"
    cfg = _config(unlabelled_digits, root / "run", deepspeed={"zero_stage": 2},
                  train={"steps": 30, "eval_every": 30, "log_every": 5})
    cfg_file.write_text(yaml.safe_dump(cfg))
    _vitpipe(["pretrain", str(cfg_file), "--nproc", "2"])
    return root, cfg_file


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_rank_zero2_mae_killed_then_relaunched_has_the_uninterrupted_losses(two_rank_mae, tmp_path):
    ref_root, ref_cfg = two_rank_mae
    cfg = yaml.safe_load(ref_cfg.read_text())
    cfg["out"] = str(tmp_path / "run")
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    launcher = _launch(cfg_file, "--nproc", "2")
    _wait_until((tmp_path / "run" / "checkpoints" / "step_00000010" / "COMPLETE.json").exists, launcher,
                "the first checkpoint")
    os.kill(_workers(launcher.pid)[1], signal.SIGKILL)  # rank 1 dies without any chance to clean up
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode != 0, err[-3000:]
    assert not (tmp_path / "run" / "results.json").exists()

    proc = _vitpipe(["pretrain", str(cfg_file), "--nproc", "2"])  # the same command
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["resumed_from"] is not None and results["steps_this_launch"] < 30, results
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / results['resumed_from']}" in proc.stderr
    # Same data order, same optimizer state and the same masks (drawn from seed, rank and step):
    # the loss curve equals the uninterrupted run's up to the summation noise of gloo's all-reduce.
    ref, got = _history(ref_root / "run"), _history(tmp_path / "run")
    assert [s for s, _ in got] == [s for s, _ in ref] == [5, 10, 15, 20, 25, 30]
    for (step, a), (_, b) in zip(ref, got):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5), (step, a, b)
    ref_res = json.loads((ref_root / "run" / "results.json").read_text())
    assert results["val/loss"] == pytest.approx(ref_res["val/loss"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_rank_mae_resumes_on_one_rank(two_rank_mae, tmp_path):
    import shutil

    ref_root, ref_cfg = two_rank_mae
    shutil.copytree(ref_root / "run" / "checkpoints", tmp_path / "run" / "checkpoints")
    proc = _vitpipe(["pretrain", str(ref_cfg), "--out", str(tmp_path / "run"), "--train.steps", "40",
                     "--deepspeed.grad-accum", "2"])
    assert "written by 2 ranks, this run has 1" in proc.stderr and "global batch changed" not in proc.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["world_size"] == 1 and results["step"] == 40 and results["steps_this_launch"] == 10
    history = _history(tmp_path / "run")
    assert history[:6] == _history(ref_root / "run")
    # It goes on from the 2-rank run's state: its losses stay near the last one, far below the first.
    assert max(loss for _, loss in history[6:]) < (history[0][1] + history[5][1]) / 2, history


# ---------------------------------------------------------------------------------------------
# Weights from elsewhere


def test_official_mae_checkpoint_initialises_finetuning(digits_shards, tmp_path, caplog):
    """A file in facebookresearch/mae's layout: {"model": encoder under timm names + decoder_* + mask_token}."""
    from vit.finetune import load_init
    from vit.models.mae import MaskedAutoencoder, decoder_for
    from vit.models.vit import create_model
    from vit.train.config import FinetuneConfig

    torch.manual_seed(0)
    mae = MaskedAutoencoder(create_model("micro/4", num_classes=0, image_size=16), decoder_for("micro/4"))  # RGB
    official = {k.removeprefix("vit."): v for k, v in mae.state_dict().items()}
    assert {"mask_token", "decoder_embed.weight", "decoder_pos_embed", "norm.weight", "cls_token"} <= set(official)
    path = tmp_path / "mae_pretrain_vit_micro.pth"
    torch.save({"model": official, "epoch": 799}, path)  # as main_pretrain.py saves it

    cfg = FinetuneConfig(init=str(path), model={"preset": "micro/4"},
                         data={"shards": str(digits_shards), **DATA, "channels": 3}, out=str(tmp_path / "ft"),
                         train={"steps": 4, "eval_every": 0, "log_every": 2}, schedule={"warmup_steps": 1},
                         checkpoint={"every_steps": 0}, tracking={"enabled": False})
    with caplog.at_level("WARNING"):
        model = load_init(cfg, num_classes=10)
    said = [r.message for r in caplog.records if "MAE pretraining checkpoint" in r.message]
    assert len(said) == 1 and "ignoring its decoder" in said[0]
    for name, value in model.state_dict().items():
        if name in official:
            assert torch.equal(value, official[name]), name
    assert model.cfg.num_classes == 10

    proc = _vitpipe(["finetune", "--init", str(path), "--model.preset", "micro/4", "--data.shards",
                     str(digits_shards), "--data.image-size", "16", "--data.batch-size", "32", "--data.num-workers",
                     "0", "--train.steps", "4", "--schedule.warmup-steps", "1", "--no-tracking.enabled",
                     "--out", str(tmp_path / "cli")])
    assert "ignoring its decoder" in proc.stderr
    assert load_pretrained(tmp_path / "cli" / "export").cfg.num_classes == 10


def test_mae_finetune_recipe_moves_the_final_norm_after_pooling(unlabelled_digits, digits_shards, tmp_path):
    from vit.finetune import load_init
    from vit.models.vit import create_model
    from vit.models.weights import save_pretrained
    from vit.train.config import FinetuneConfig
    from vitpipe.config import build_config

    torch.manual_seed(0)
    encoder = create_model("micro/4", num_classes=0, image_size=16, in_chans=1, global_pool="avg", fc_norm=False)
    with torch.no_grad():
        encoder.norm.weight.uniform_(0.5, 1.5)
    export = save_pretrained(encoder, tmp_path / "export")
    recipe = Path(__file__).resolve().parents[1] / "vit" / "recipes" / "mae_finetune.yaml"
    cfg = build_config(FinetuneConfig, recipe, {"init": str(export), "data.shards": str(digits_shards)})
    model = load_init(cfg, num_classes=10)
    assert model.cfg.fc_norm and model.cfg.global_pool == "avg" and model.cfg.drop_path_rate == 0.1
    assert torch.equal(model.fc_norm.weight, encoder.norm.weight) and isinstance(model.norm, torch.nn.Identity)
    assert cfg.layer_decay == 0.75


def test_the_pretrain_deployment_takes_an_mae_config_and_refuses_a_mixed_one(tmp_path, capsys, monkeypatch):
    """The objective is a config value: the nightly pretrain deployment runs MAE from its config file."""
    import tempfile

    from flows.deploy import build_deployments
    from vit.models.vit import create_model
    from vit.models.weights import save_pretrained
    from vitpipe.cli import main

    # deploy refuses an init under the machine's temporary folder (not durable): move that folder aside
    monkeypatch.setenv("TMPDIR", str(tmp_path / "scratch"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    init = tmp_path / "init"
    save_pretrained(create_model("micro/4", image_size=16, in_chans=1, num_classes=10), init)
    recipe = Path(__file__).resolve().parents[1] / "vit" / "recipes" / "digits_mae_pretrain.yaml"
    deps = {d.name: d for d in build_deployments(pretrain_config=str(recipe), finetune_init=str(init))}
    assert deps["pretrain"].parameters["config"] == str(recipe.resolve())
    assert deps["pretrain"].entrypoint == "flows.stages.pretrain_flow"
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text("data: {}\nmae:\n  mask_ratio: 0.5\n")  # an MAE option on a supervised run
    assert main(["deploy", "--pretrain-config", str(mixed)]) == 2
    assert "mae.mask_ratio is an option of --train.objective mae" in capsys.readouterr().err
