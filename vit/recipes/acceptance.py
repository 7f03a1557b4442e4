"""Real-data acceptance runs: digits fine-tuned to >= 97%, and pretrained vs from scratch on a few labels.

    python -m vit.recipes.acceptance --out runs/acceptance                   # both parts
    python -m vit.recipes.acceptance --out runs/acceptance --part full       # only the 97% run
    python -m vit.recipes.acceptance --out runs/acceptance --part fraction --fraction 0.1
    python -m vit.recipes.acceptance --out runs/acceptance --part self-supervised      # MAE / MPP, no labels

Every run goes through the real stages with the recipes next to this file: `vitpipe shard`, then
`pretrain` on generated shapes (the "other collection"), `finetune` on digits and `evaluate` on
the held-out digits split. The comparison of the paper's point trains the same architecture on
the same labelled fraction with the same data, optimizer, schedule and number of steps, once
from the shapes backbone (`digits_finetune.yaml`) and once from random weights
(`digits_scratch.yaml`). The held-out split is the same 10% of every class in both, and in the
full run. Results land in OUT/acceptance.json and are copied into docs/results.md by hand.

The self-supervised part pretrains on the digits' training images with their labels dropped
(`digits_mae_pretrain.yaml`, `digits_mpp_pretrain.yaml`), then fine-tunes on the same labelled
fraction, once with the supervised comparison's recipe (`digits_finetune.yaml`) and once with
MAE's (`mae_finetune.yaml`), each also from a randomly initialised encoder; and measures the
frozen encoders by k-NN against a random one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

RECIPES = Path(__file__).resolve().parent
VAL_FRACTION = 0.1


def _quiet_tracking(overrides: dict[str, Any], tracking_uri: str | None) -> dict[str, Any]:
    if tracking_uri:
        return {**overrides, "tracking.uri": tracking_uri, "tracking.system_metrics": False}
    return {**overrides, "tracking.enabled": False}


def write_digits_splits(out: Path, *, train_fraction: float = 1.0, seed: int = 0) -> Path:
    """Digits as out/{train,val}/<digit>/<i>.png: val = a fixed stratified 10%, train = `train_fraction` of the rest.

    The val images do not depend on `train_fraction`, so every run is scored on the same samples.
    """
    import numpy as np
    from sklearn.model_selection import train_test_split

    from pipeline.packaged_data import write_digits

    if not 0 < train_fraction <= 1:
        raise ValueError(f"train_fraction={train_fraction}: must be in (0, 1], e.g. 0.1")
    out = Path(out)
    source = write_digits(out.parent / f".{out.name}-all", size=32)
    files = sorted(source.glob("*/*.png"))
    labels = [f.parent.name for f in files]
    train, val = train_test_split(files, test_size=VAL_FRACTION, stratify=labels, random_state=seed)
    if train_fraction < 1:
        train_labels = [f.parent.name for f in train]
        # At least one image of every class, else "a fraction of the labels" drops whole classes.
        keep = max(len(set(train_labels)), int(round(train_fraction * len(train))))
        train, _ = train_test_split(train, train_size=keep, stratify=train_labels, random_state=seed)
    for split, chosen in (("train", train), ("val", val)):
        for f in chosen:
            dst = out / split / f.parent.name / f.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
    shutil.rmtree(source)
    assert len(np.unique([f.parent.name for f in train])) == 10, "every class must stay in the train split"
    return out


def shard_folder(src: Path, out: Path, **kw: Any) -> Path:
    """`vitpipe shard` of a folder tree, skipped when `out` already holds a complete shard set."""
    from pipeline.shard import ShardConfig, shard

    if (Path(out) / "index.json").is_file():
        return Path(out)
    shard(ShardConfig(src=str(src), out=str(out), workers=1, **kw))
    return Path(out)


def prepare_data(root: Path, *, fraction: float | None = None, shapes_per_class: int = 500) -> dict[str, Path]:
    """Shard sets under root/shards: digits (full), digits_fraction (if asked) and shapes."""
    from pipeline.packaged_data import write_shapes

    root = Path(root)
    data, shards = root / "data", root / "shards"
    out = {}
    if not (shards / "digits" / "index.json").is_file():
        write_digits_splits(data / "digits")
    out["digits"] = shard_folder(data / "digits", shards / "digits", split_by="source")
    if fraction is not None:
        name = f"digits_{int(round(fraction * 100))}pct"
        if not (shards / name / "index.json").is_file():
            write_digits_splits(data / name, train_fraction=fraction)
        out["digits_fraction"] = shard_folder(data / name, shards / name, split_by="source")
    if not (shards / "shapes" / "index.json").is_file():
        write_shapes(data / "shapes", per_class=shapes_per_class, size=32)
    out["shapes"] = shard_folder(data / "shapes", shards / "shapes", val_ratio=0.1)
    return out


def pretrain_shapes(root: Path, shards: Path, *, tracking_uri: str | None = None, **overrides: Any) -> Path:
    """The shapes backbone (recipe shapes_pretrain.yaml); returns its export folder (reused if present)."""
    from vit.train.config import PretrainConfig
    from vit.pretrain import pretrain
    from vitpipe.config import build_config

    out = Path(root) / "runs" / "shapes"
    if (out / "export" / "model.safetensors").is_file():
        return out / "export"
    cfg = build_config(PretrainConfig, RECIPES / "shapes_pretrain.yaml", _quiet_tracking(
        {"data.shards": str(shards), "out": str(out), **overrides}, tracking_uri))
    return Path(pretrain(cfg)["export"])


def train_digits(root: Path, shards: Path, *, name: str, init: Path | None, tracking_uri: str | None = None,
                 register_as: str | None = None, recipe: str = "digits_finetune.yaml",
                 **overrides: Any) -> dict[str, Any]:
    """Fine-tune from `init` (digits_finetune.yaml), or train from scratch when `init` is None
    (digits_scratch.yaml, same settings); then evaluate on the held-out split. Returns the results.

    With `tracking_uri`, the evaluation is logged into the training run and the model registered
    as `register_as` (default NAME-vit) with alias candidate, and promoted to champion if better."""
    from vit.train.config import FinetuneConfig, PretrainConfig
    from vit.evaluate import EvaluateConfig, evaluate
    from vit.finetune import finetune
    from vit.pretrain import pretrain
    from vitpipe.config import build_config

    out = Path(root) / "runs" / name
    common = _quiet_tracking({"data.shards": str(shards), "out": str(out), "checkpoint.resume": False,
                              **overrides}, tracking_uri)
    start = time.perf_counter()
    if init is None:
        cfg = build_config(PretrainConfig, RECIPES / "digits_scratch.yaml", common)
        trained = pretrain(cfg)
    else:
        cfg = build_config(FinetuneConfig, RECIPES / recipe, {**common, "init": str(init)})
        trained = finetune(cfg)
    seconds = time.perf_counter() - start
    ev = EvaluateConfig(model=trained["export"], data=cfg.data, out=str(out / "evaluation"),
                        tracking={"enabled": False})
    results = evaluate(ev)
    if tracking_uri and trained.get("run_id"):
        _log_and_register(tracking_uri, trained["run_id"], trained["export"], results,
                          name=register_as or f"{name}-vit")
    return {"name": name, "init": str(init) if init else "scratch", "steps": trained["step"],
            "train_seconds": round(seconds, 1), "top1": results["top1"], "loss": results["loss"],
            "macro_f1": results["macro_f1"], "num_val": results["num_samples"],
            "train_samples": _num_samples(shards, "train"), "evaluation": str(out / "evaluation")}


def _log_and_register(tracking_uri: str, run_id: str, export: str, results: dict[str, Any], *, name: str) -> None:
    """Evaluation into the training run, the model into the registry as candidate, champion if better."""
    import mlflow

    from vit.evaluate import load_model, log_evaluation
    from vit.tracking.registry import promote_if_better, register_model

    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        log_evaluation(results)
        register_model(load_model(export), name, results=results)
    print(promote_if_better(name).reason)


def prepare_unlabelled(root: Path) -> Path:
    """The digits' training images without labels (the held-out 10% left out), sharded with a
    val split of their own for the reconstruction loss."""
    from pipeline.packaged_data import write_unlabelled

    root = Path(root)
    out = root / "shards" / "digits_unlabelled"
    if not (out / "index.json").is_file():
        src = write_unlabelled(root / "data" / "digits_unlabelled", root / "data" / "digits" / "train")
        shard_folder(src, out, val_ratio=0.1)
    return out


def pretrain_unlabelled(root: Path, shards: Path, objective: str, *, probe: Path,
                        tracking_uri: str | None = None) -> Path:
    """The MAE or MPP backbone (digits_{objective}_pretrain.yaml) of unlabelled digits, probed by
    online k-NN on the labelled ones; returns its export (reused if present)."""
    from vit.pretrain import pretrain
    from vit.train.config import PretrainConfig
    from vitpipe.config import build_config

    out = Path(root) / "runs" / f"digits_{objective}"
    if (out / "export" / "model.safetensors").is_file():
        return out / "export"
    cfg = build_config(PretrainConfig, RECIPES / f"digits_{objective}_pretrain.yaml", _quiet_tracking(
        {"data.shards": str(shards), "out": str(out), "probe.shards": str(probe)}, tracking_uri))
    return Path(pretrain(cfg)["export"])


def random_encoder(root: Path) -> Path:
    """A freshly initialised head-less micro/4 (seed 0), exported like a pretraining run's encoder."""
    import torch

    from vit.models.vit import create_model
    from vit.models.weights import save_pretrained

    out = Path(root) / "runs" / "random_encoder"
    torch.manual_seed(0)
    return save_pretrained(create_model("micro/4", num_classes=0, image_size=16, in_chans=1, global_pool="avg"), out)


def knn_of(root: Path, export: Path, shards: Path, name: str) -> dict[str, float]:
    """k-NN top-1 (k = 1, 20) of a frozen encoder: memory the digits' train split, queries the held-out 180."""
    from vit.evaluate import EvaluateConfig, evaluate

    r = evaluate(EvaluateConfig(model=str(export), data={"shards": str(shards)}, knn={"enabled": True, "k": [1, 20]},
                                out=str(Path(root) / "runs" / f"knn_{name}"), tracking={"enabled": False}))
    return {k: r[k] for k in ("knn_top1_k1", "knn_top1_k20")}


def run_self_supervised(root: Path, shards: dict[str, Path], *, fraction_steps: int = 300,
                        tracking_uri: str | None = None) -> dict[str, Any]:
    """MAE and MPP on unlabelled digits, then fine-tuned on the labelled fraction and probed by k-NN."""
    unlabelled = prepare_unlabelled(root)
    random = random_encoder(root)
    budget = {"train.steps": fraction_steps, "data.batch_size": 32}
    report: dict[str, Any] = {"knn": {"random": knn_of(root, random, shards["digits"], "random")}}
    starts = {"random": random}
    for objective in ("mae", "mpp"):
        start = time.perf_counter()
        starts[objective] = pretrain_unlabelled(root, unlabelled, objective, probe=shards["digits"],
                                                tracking_uri=tracking_uri)
        report[f"{objective}_pretrain_seconds"] = round(time.perf_counter() - start, 1)
        report["knn"][objective] = knn_of(root, starts[objective], shards["digits"], objective)
    for recipe in ("digits_finetune.yaml", "mae_finetune.yaml"):
        for name, init in starts.items():
            report[f"{name}+{recipe.removesuffix('.yaml')}"] = train_digits(
                root, shards["digits_fraction"], name=f"fraction_{name}_{recipe.removesuffix('.yaml')}", init=init,
                recipe=recipe, tracking_uri=tracking_uri, **budget)
    report["scratch"] = train_digits(root, shards["digits_fraction"], name="fraction_scratch", init=None,
                                     tracking_uri=tracking_uri, **budget)
    return report


def _num_samples(shards: Path, split: str) -> int:
    return json.loads((Path(shards) / "index.json").read_text())["splits"][split]["num_samples"]


def run(root: Path, *, part: str = "all", fraction: float = 0.1, fraction_steps: int = 300,
        tracking_uri: str | None = None, with_scratch: bool = True) -> dict[str, Any]:
    """The acceptance runs; returns (and writes to root/acceptance.json) every number of docs/results.md.

    `with_scratch=False` skips the from-scratch baseline on the full digits (the 97% check alone)."""
    root = Path(root)
    shards = prepare_data(root, fraction=fraction if part in ("all", "fraction", "self-supervised") else None)
    report: dict[str, Any] = {}
    if part == "self-supervised":
        report["self_supervised"] = run_self_supervised(root, shards, fraction_steps=fraction_steps,
                                                        tracking_uri=tracking_uri)
        (root / "acceptance.json").write_text(json.dumps(report, indent=2) + "\n")
        return report
    backbone = pretrain_shapes(root, shards["shapes"], tracking_uri=tracking_uri)
    report["backbone"] = str(backbone)
    if part in ("all", "full"):
        report["full"] = train_digits(root, shards["digits"], name="digits", init=backbone, tracking_uri=tracking_uri)
        report["full_scratch"] = train_digits(root, shards["digits"], name="digits_scratch", init=None,
                                              tracking_uri=tracking_uri) if with_scratch else None
    if part in ("all", "fraction"):
        budget = {"train.steps": fraction_steps, "data.batch_size": 32}
        report["fraction"] = {
            "fraction": fraction,
            # One registered name: the second model is promoted only if it beats the first on the same split.
            "pretrained": train_digits(root, shards["digits_fraction"], name="fraction_pretrained", init=backbone,
                                       tracking_uri=tracking_uri, register_as="digits-fraction-vit", **budget),
            "scratch": train_digits(root, shards["digits_fraction"], name="fraction_scratch", init=None,
                                    tracking_uri=tracking_uri, register_as="digits-fraction-vit", **budget),
        }
    (root / "acceptance.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vit.recipes.acceptance", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/acceptance", help="working folder (data, shards, runs, acceptance.json)")
    p.add_argument("--part", choices=["all", "full", "fraction", "self-supervised"], default="all",
                   help="all = full + fraction (supervised backbone); self-supervised = MAE/MPP without labels")
    p.add_argument("--fraction", type=float, default=0.1, help="labelled fraction of the digits train split")
    p.add_argument("--fraction-steps", type=int, default=300, help="optimizer steps of both fraction runs")
    p.add_argument("--tracking-uri", default=None, help="log every run to this MLflow store (default: off)")
    args = p.parse_args(argv)
    report = run(Path(args.out), part=args.part, fraction=args.fraction, fraction_steps=args.fraction_steps,
                 tracking_uri=args.tracking_uri)
    if "full" in report:
        r = report["full"]
        print(f"full digits, fine-tuned from shapes: top-1 {100 * r['top1']:.2f}% on {r['num_val']} held-out "
              f"images ({r['steps']} steps, {r['train_seconds']:.0f}s)")
    if report.get("full_scratch"):
        r = report["full_scratch"]
        print(f"full digits, from scratch (same budget): top-1 {100 * r['top1']:.2f}% ({r['steps']} steps, "
              f"{r['train_seconds']:.0f}s)")
    for key, r in (report.get("self_supervised") or {}).items():
        if key == "knn":
            for name, k in r.items():
                print(f"k-NN of the frozen {name} encoder: top-1 {100 * k['knn_top1_k1']:.2f}% (k=1), "
                      f"{100 * k['knn_top1_k20']:.2f}% (k=20)")
        elif isinstance(r, dict):
            print(f"{100 * args.fraction:.0f}% of labels, {key:36s}: top-1 {100 * r['top1']:.2f}% ({r['steps']} steps, "
                  f"{r['train_seconds']:.0f}s)")
    if "fraction" in report:
        f = report["fraction"]
        for kind in ("pretrained", "scratch"):
            r = f[kind]
            print(f"{100 * f['fraction']:.0f}% of labels ({r['train_samples']} images), {kind:10s}: top-1 "
                  f"{100 * r['top1']:.2f}% ({r['steps']} steps, {r['train_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
