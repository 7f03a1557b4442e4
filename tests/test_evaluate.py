"""Evaluation on real digits shards read by the real loader; `vitpipe evaluate` logging to real MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from sklearn import metrics as skm

from pipeline.loader import DataConfig, make_eval_loader
from vit.evaluate import evaluate_model, log_evaluation, split_fingerprint
from vitpipe.cli import main as vitpipe


def _data(shards: Path, **kw) -> DataConfig:
    return DataConfig(shards=str(shards), channels=1, mean=(0.5,), std=(0.5,), image_size=32,
                      eval_batch_size=64, num_workers=0, **kw)


def _model(num_classes: int = 10, seed: int = 0):
    from vit.models.vit import create_model

    torch.manual_seed(seed)
    model = create_model("micro/4", in_chans=1, num_classes=num_classes)
    if num_classes:
        # The paper's zero-initialised head predicts class 0 everywhere; a random head gives a
        # confusion matrix with something in every row to check.
        torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    from vit.models.weights import save_pretrained

    return save_pretrained(_model(), tmp_path_factory.mktemp("export") / "export")


def test_evaluate_model_matches_an_independent_computation(digits_shards, tmp_path):
    model = _model()
    loader = make_eval_loader(_data(digits_shards), "val")
    res = evaluate_model(model, loader, class_names=loader.class_names, out_dir=tmp_path, split="val",
                         split_id=split_fingerprint(str(digits_shards), "val"), progress=False)

    logits, targets = [], []
    with torch.no_grad():
        model.eval()
        for images, t, _ in loader:
            logits.append(model(images))
            targets.append(t)
    logits, targets = torch.cat(logits), torch.cat(targets)
    preds = logits.argmax(1)
    assert res["num_samples"] == loader.num_samples == len(targets) and "num_samples_expected" not in res
    assert res["top1"] == pytest.approx(skm.accuracy_score(targets, preds))
    assert res["top5"] == pytest.approx(skm.top_k_accuracy_score(targets, logits, k=5, labels=range(10)))
    assert res["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, targets)), rel=1e-4)
    assert res["confusion_matrix"]["counts"] == skm.confusion_matrix(targets, preds, labels=range(10)).tolist()
    assert res["per_class"]["7"]["f1"] == pytest.approx(skm.f1_score(targets, preds, labels=[7], average=None)[0])
    assert res["split_id"].startswith("val:")

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["top1"] == res["top1"] and saved["per_class"]["3"] == res["per_class"]["3"]
    assert json.loads((tmp_path / "confusion_matrix.json").read_text())["counts"] == res["confusion_matrix"]["counts"]
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(res["artifacts"]) == {"results", "confusion_matrix_json", "confusion_matrix_png"}


def test_split_fingerprint_tells_splits_apart(digits_shards):
    val, train = split_fingerprint(str(digits_shards), "val"), split_fingerprint(str(digits_shards), "train")
    assert val != train and val == split_fingerprint(str(digits_shards / "index.json"), "val")
    from vitpipe.errors import UserError

    with pytest.raises(UserError, match="split 'test' is not in"):
        split_fingerprint(str(digits_shards), "test")


def test_log_evaluation_into_the_callers_run(digits_shards, tmp_path, mlflow_uri):
    import mlflow
    from mlflow import MlflowClient

    loader = make_eval_loader(_data(digits_shards), "val")
    res = evaluate_model(_model(), loader, class_names=loader.class_names, out_dir=tmp_path, progress=False)
    mlflow.set_tracking_uri(mlflow_uri)
    try:
        with pytest.raises(RuntimeError, match="no active MLflow run"):
            log_evaluation(res)
        with mlflow.start_run() as run:  # the run of the stage that called evaluation
            log_evaluation(res, step=7)
    finally:
        mlflow.set_tracking_uri(None)
    client = MlflowClient(tracking_uri=mlflow_uri)
    metrics = client.get_run(run.info.run_id).data.metrics
    assert metrics["val/top1"] == pytest.approx(res["top1"]) and "val/macro_f1" in metrics
    assert client.get_metric_history(run.info.run_id, "val/loss")[0].step == 7
    files = {f.path for f in client.list_artifacts(run.info.run_id, "evaluation/val")}
    assert files == {"evaluation/val/results.json", "evaluation/val/confusion_matrix.json",
                     "evaluation/val/confusion_matrix.png"}


def test_vitpipe_evaluate_writes_and_logs_one_run(digits_shards, export_dir, tmp_path, mlflow_uri, capsys):
    from mlflow import MlflowClient

    import mlflow

    out = tmp_path / "eval"
    uri_before = mlflow.get_tracking_uri()
    rc = vitpipe(["evaluate", "--model", str(export_dir), "--data.shards", str(digits_shards),
                  "--data.channels", "1", "--data.mean", "[0.5]", "--data.std", "[0.5]",
                  "--data.num-workers", "0", "--knn.enabled", "--knn.k", "[5]",
                  "--out", str(out), "--tracking.uri", mlflow_uri, "--tracking.experiment", "eval-test"])
    assert rc == 0
    summary = capsys.readouterr().out
    assert "evaluate: split val" in summary and "top1" in summary and "knn_top1_k5" in summary
    assert mlflow.get_tracking_uri() == uri_before  # a later stage in this process keeps its own store
    res = json.loads((out / "results.json").read_text())
    assert res["num_samples"] == make_eval_loader(_data(digits_shards), "val").num_samples
    assert 0.0 <= res["knn_top1_k5"] <= 1.0 and res["knn_memory_size"] > 1000
    assert (out / "config.yaml").is_file() and (out / "confusion_matrix.png").is_file()

    client = MlflowClient(tracking_uri=mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("eval-test").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["vitpipe.stage"] == "evaluate"
    assert run.data.metrics["val/top1"] == pytest.approx(res["top1"])
    assert run.data.metrics["val/knn_top1_k5"] == pytest.approx(res["knn_top1_k5"])
    assert "evaluation/val/confusion_matrix.png" in {f.path for f in client.list_artifacts(run.info.run_id,
                                                                                           "evaluation/val")}


def test_backbone_without_head_gets_knn_only(digits_shards, tmp_path):
    from vit.evaluate import EvaluateConfig, evaluate
    from vit.models.weights import save_pretrained

    backbone = save_pretrained(_model(num_classes=0), tmp_path / "backbone")
    cfg = EvaluateConfig(model=str(backbone), data=_data(digits_shards), out=str(tmp_path / "out"),
                         knn={"enabled": True, "k": [10]}, tracking={"enabled": False})
    res = evaluate(cfg)
    assert "top1" not in res and 0.2 < res["knn_top1_k10"] <= 1.0  # chance is 0.1
    assert set(res["artifacts"]) == {"results"}


def test_a_head_for_other_classes_gets_knn_only_when_asked(digits_shards, tmp_path, capsys):
    """--knn.enabled measures the features of a model whose head was trained on other classes."""
    from vit.evaluate import EvaluateConfig, evaluate
    from vit.models.weights import save_pretrained

    five = save_pretrained(_model(num_classes=5), tmp_path / "five")
    cfg = EvaluateConfig(model=str(five), data=_data(digits_shards), out=str(tmp_path / "out"),
                         knn={"enabled": True, "k": [10]}, tracking={"enabled": False})
    res = evaluate(cfg)
    assert "top1" not in res and 0.2 < res["knn_top1_k10"] <= 1.0
    assert "predicts 5 classes, " in capsys.readouterr().out


def _named(names: list[str]):
    model = _model()
    model.class_names = names
    return model


DIGITS = [str(i) for i in range(10)]


@pytest.mark.parametrize("args, message", [
    (["--split", "test"], "split 'test' is not in"),
    (["--model", "does/not/exist"], "does/not/exist: no such file or folder"),
    (["--model", "BACKBONE"], "has no classifier head"),
    (["--model", "FIVE"], "predicts 5 classes but"),
    (["--model", "LETTERS"], "was trained on other classes than"),
    (["--model", "SHUFFLED"], "0: model '1' vs data '0'"),
    (["--data.shards", ""], "data.shards is empty"),
    (["--knn.enabled", "FLAG", "--knn.k", "0"], "knn.k.0: Input should be greater than 0"),  # before any work
])
def test_bad_input_is_one_clear_line(args, message, digits_shards, export_dir, tmp_path, capsys):
    from vit.models.weights import save_pretrained

    models = {"BACKBONE": save_pretrained(_model(0), tmp_path / "b"), "FIVE": save_pretrained(_model(5), tmp_path / "f"),
              "LETTERS": save_pretrained(_named(list("abcdefghij")), tmp_path / "l"),
              "SHUFFLED": save_pretrained(_named(DIGITS[1:] + DIGITS[:1]), tmp_path / "s")}
    base = {"--model": str(export_dir), "--data.shards": str(digits_shards), "--out": str(tmp_path / "o"),
            "--data.channels": "1", "--data.mean": "[0.5]", "--data.std": "[0.5]", "--data.num-workers": "0",
            "--no-tracking.enabled": None}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = None if value == "FLAG" else str(models.get(value, value))
    argv = ["evaluate"] + [x for k, v in base.items() for x in ((k,) if v is None else (k, v))]
    assert vitpipe(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_recorded_class_names_are_checked_against_the_data(digits_shards, tmp_path, capsys):
    """An export that names its classes is scored only on data with the same classes in the same
    order; --no-check-classes accepts other names (e.g. renamed folders)."""
    from vit.models.weights import save_pretrained

    base = ["evaluate", "--data.shards", str(digits_shards), "--data.channels", "1", "--data.mean", "[0.5]",
            "--data.std", "[0.5]", "--data.num-workers", "0", "--no-tracking.enabled"]
    same = save_pretrained(_named(DIGITS), tmp_path / "same")
    assert vitpipe(base + ["--model", str(same), "--out", str(tmp_path / "o1")]) == 0
    renamed = save_pretrained(_named([f"digit {d}" for d in DIGITS]), tmp_path / "renamed")
    assert vitpipe(base + ["--model", str(renamed), "--out", str(tmp_path / "o2")]) == 2
    assert "--no-check-classes" in capsys.readouterr().err
    assert vitpipe(base + ["--model", str(renamed), "--out", str(tmp_path / "o3"), "--no-check-classes"]) == 0


def test_unlabelled_shards_are_refused(tmp_path, export_dir, capsys):
    from pipeline.packaged_data import write_photos
    from pipeline.shard import ShardConfig, shard

    photos = write_photos(tmp_path / "photos")
    shard(ShardConfig(src=str(photos), out=str(tmp_path / "shards"), val_ratio=0.3, workers=1,
                      resize="center_crop", size=32, encode="png"))
    rc = vitpipe(["evaluate", "--model", str(export_dir), "--data.shards", str(tmp_path / "shards"),
                  "--data.channels", "1", "--data.mean", "[0.5]", "--data.std", "[0.5]", "--no-tracking.enabled",
                  "--out", str(tmp_path / "o")])
    assert rc == 2 and "unlabelled" in capsys.readouterr().err


def test_a_split_without_samples_is_refused(tmp_path, export_dir, capsys):
    """Every input failed when sharding: evaluation and training say so instead of scoring nothing."""
    from pipeline.shard import ShardConfig, shard
    from vitpipe.errors import UserError

    src = tmp_path / "src" / "7"
    src.mkdir(parents=True)
    for i in range(12):
        (src / f"{i}.png").write_bytes(b"")  # empty files, each a failure
    with pytest.raises(UserError, match="no image could be read"):
        shard(ShardConfig(src=str(tmp_path / "src"), out=str(tmp_path / "shards"), val_ratio=0.5, workers=1))
    args = ["--data.shards", str(tmp_path / "shards"), "--data.channels", "1", "--data.mean", "0.5", "--data.std",
            "0.5", "--data.num-workers", "0", "--no-tracking.enabled"]
    assert vitpipe(["evaluate", "--model", str(export_dir), "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert "split 'val' of" in err and "has no samples" in err, err  # the index keeps both splits, with empty shards
    assert vitpipe(["pretrain", "--model.preset", "micro/4", "--out", str(tmp_path / "p"), *args]) == 2
    err = capsys.readouterr().err
    assert "split 'train' of" in err and "has no samples" in err, err


def _rank_main(rank: int, world: int, port: int, shards: str, queue) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        loader = make_eval_loader(_data(Path(shards)), "val", rank=rank, world_size=world)
        res = evaluate_model(_model(), loader, class_names=loader.class_names, world_size=world, progress=False)
        queue.put((rank, res))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_ranks_count_every_val_sample_once(digits_shards):
    from vit.train.distributed import free_port

    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    torch.multiprocessing.start_processes(_rank_main, args=(2, free_port(), str(digits_shards), queue), nprocs=2,
                                          start_method="spawn", join=True)
    got = dict(queue.get() for _ in range(2))
    loader = make_eval_loader(_data(digits_shards), "val")
    ref = evaluate_model(_model(), loader, class_names=loader.class_names, progress=False)
    for rank in (0, 1):
        assert got[rank]["num_samples"] == loader.num_samples
        assert got[rank]["confusion_matrix"]["counts"] == ref["confusion_matrix"]["counts"]
        assert got[rank]["loss"] == pytest.approx(ref["loss"], rel=1e-5)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_vitpipe_evaluate_nproc_2_equals_one_process(digits_shards, export_dir, tmp_path):
    import subprocess
    import sys

    common = ["--model", str(export_dir), "--data.shards", str(digits_shards), "--data.channels", "1",
              "--data.mean", "[0.5]", "--data.std", "[0.5]", "--data.num-workers", "0", "--no-tracking.enabled"]
    (tmp_path / "eval.yaml").write_text(f"out: {tmp_path / 'two'}\n")
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "vitpipe.cli", "evaluate", str(tmp_path / "eval.yaml"), *common,
                           "--nproc", "2"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launching:" in proc.stderr  # really went through the launcher
    assert vitpipe(["evaluate", *common, "--out", str(tmp_path / "one")]) == 0
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert two["num_samples"] == one["num_samples"] == make_eval_loader(_data(digits_shards), "val").num_samples
    assert two["per_class"] == one["per_class"] and two["top1"] == one["top1"]  # same counts, same floats


def _export_with_training(tmp_path: Path, shards: Path, *, train_config: bool = True) -> Path:
    """A 16x16 grayscale model exported as training exports it: weights + config.json, and the
    training config (vitpipe.config.save_config of a real PretrainConfig) as train_config.yaml."""
    from vit.train.config import PretrainConfig
    from vit.models.vit import create_model
    from vit.models.weights import save_pretrained
    from vitpipe.config import save_config

    torch.manual_seed(0)
    model = create_model("micro/4", in_chans=1, num_classes=10, image_size=16)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    export = save_pretrained(model, tmp_path / "export")
    if train_config:
        cfg = PretrainConfig.model_validate({"data": {"shards": str(shards), "image_size": 16, "channels": 1,
                                                      "mean": [0.3], "std": [0.2], "eval_crop_pct": 0.9}})
        save_config(cfg, export / "train_config.yaml")
    return export


def test_evaluate_takes_size_channels_and_normalisation_from_the_model(digits_shards, tmp_path, capsys):
    """`vitpipe evaluate --model EXPORT --data.shards S` scores the model on pixels prepared as in its
    training (size and channels from the model, mean/std/crop from train_config.yaml), exactly as
    when every option is spelled out; an explicit size is honoured with a resampled position
    embedding; a different channel count is refused."""
    export = _export_with_training(tmp_path, digits_shards)
    base = ["evaluate", "--model", str(export), "--data.shards", str(digits_shards), "--data.num-workers", "0",
            "--no-tracking.enabled"]
    assert vitpipe(base + ["--out", str(tmp_path / "auto")]) == 0
    spelled = ["--data.image-size", "16", "--data.channels", "1", "--data.mean", "[0.3]", "--data.std", "[0.2]",
               "--data.eval-crop-pct", "0.9"]
    assert vitpipe(base + spelled + ["--out", str(tmp_path / "spelled")]) == 0
    auto, ref = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("auto", "spelled"))
    assert auto["loss"] == pytest.approx(ref["loss"], rel=1e-6) and auto["top1"] == ref["top1"]
    resolved = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())["data"]
    assert (resolved["image_size"], resolved["channels"], resolved["mean"], resolved["std"],
            resolved["eval_crop_pct"]) == (16, 1, [0.3], [0.2], 0.9)
    capsys.readouterr()

    assert vitpipe(base + ["--data.image-size", "32", "--out", str(tmp_path / "at32")]) == 0
    assert "trained at 16x16; evaluating at 32x32" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "at32" / "config.yaml").read_text())["data"]["image_size"] == 32

    assert vitpipe(base + ["--data.channels", "3", "--data.mean", "[0.5]", "--data.std", "[0.5]",
                           "--out", str(tmp_path / "rgb")]) == 2
    err = capsys.readouterr().err
    assert "takes 1-channel images but --data.channels is 3" in err and "Traceback" not in err


def test_evaluate_without_a_training_record_still_reads_the_models_channels(digits_shards, tmp_path):
    """A bare weights export (no train_config.yaml, e.g. written by save_pretrained in a notebook):
    size and channels from the model, the default normalisation cut to one channel."""
    export = _export_with_training(tmp_path, digits_shards, train_config=False)
    out = tmp_path / "o"
    assert vitpipe(["evaluate", "--model", str(export), "--data.shards", str(digits_shards),
                    "--data.num-workers", "0", "--no-tracking.enabled", "--out", str(out)]) == 0
    resolved = yaml.safe_load((out / "config.yaml").read_text())["data"]
    assert (resolved["image_size"], resolved["channels"], resolved["mean"], resolved["std"]) == (16, 1, [0.5], [0.5])


def _timm_micro(**kwargs):
    """A real timm ViT of micro/4's size for 1-channel 32 px digits, every weight random."""
    timm = pytest.importorskip("timm")
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=64,
                               depth=4, num_heads=4, mlp_ratio=2.0, in_chans=1, num_classes=10, **kwargs)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if p.ndim == 1 and p.shape[0] > 1 else 0))
    return theirs.eval()


def test_evaluate_a_bare_timm_file_naming_its_architecture(digits_shards, tmp_path, capsys):
    """`--model file.safetensors` of a bare timm file: refused naming --model-preset, then scored
    with it exactly as the timm model itself scores on the same loader."""
    from safetensors.torch import save_file

    theirs = _timm_micro(class_token=False, global_pool="avg")  # also a timm model without a class token
    save_file(theirs.state_dict(), str(tmp_path / "bare.safetensors"))
    args = ["evaluate", "--model", str(tmp_path / "bare.safetensors"), "--data.shards", str(digits_shards),
            "--data.num-workers", "0", "--no-tracking.enabled"]
    assert vitpipe([*args, "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "--model-preset" in err and "bare weights file" in err and len(err.strip().splitlines()) == 1, err
    assert vitpipe([*args, "--model-preset", "vit_giant_patch3_1", "--out", str(tmp_path / "bad")]) == 2
    assert "vit_giant_patch3_1" in capsys.readouterr().err

    assert vitpipe([*args, "--model-preset", "micro/4", "--out", str(tmp_path / "ok")]) == 0
    ours = json.loads((tmp_path / "ok" / "results.json").read_text())
    loader = make_eval_loader(_data(digits_shards), "val")
    expected = evaluate_model(theirs, loader, class_names=loader.class_names, progress=False)
    assert ours["num_samples"] == expected["num_samples"] > 0
    assert ours["top1"] == expected["top1"] and ours["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_evaluate_a_timm_hub_folder_and_a_preset_that_contradicts_it(digits_shards, tmp_path, capsys):
    from timm.models import save_for_hf

    theirs = _timm_micro(global_pool="avg")  # timm: fc_norm=True
    save_for_hf(theirs, str(tmp_path / "hub"), safe_serialization=True)
    args = ["evaluate", "--model", str(tmp_path / "hub"), "--data.shards", str(digits_shards),
            "--data.num-workers", "0", "--no-tracking.enabled"]
    assert vitpipe([*args, "--out", str(tmp_path / "ok")]) == 0
    ours = json.loads((tmp_path / "ok" / "results.json").read_text())
    loader = make_eval_loader(_data(digits_shards), "val")
    assert ours["top1"] == evaluate_model(theirs, loader, class_names=loader.class_names, progress=False)["top1"]
    assert vitpipe([*args, "--model-preset", "s/16", "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert "another architecture than --model-preset s/16" in err and "embed_dim 64 vs 384" in err, err
