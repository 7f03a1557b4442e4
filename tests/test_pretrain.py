"""`vitpipe pretrain` end to end on real digits shards: in one process, on 2 gloo ranks (ZeRO-2) with
MLflow, killed (SIGKILL of a rank, of rank 0) or stopped (SIGTERM, SIGINT) mid-run then relaunched
(resume with a matching loss curve, one MLflow run, no step logged twice)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from vit.train.config import PretrainConfig
from vit.pretrain import pretrain
from vit.models.weights import load_pretrained
from vitpipe.errors import UserError

# Small and quick on a CPU: 16x16 digits, the micro model, gentle crops, no flips (digits have handedness).
DATA = {"image_size": 16, "batch_size": 32, "num_workers": 0, "augment": {"crop_scale": [0.8, 1.0], "hflip": 0.0}}


def _config(shards, out, mlflow_uri=None, **sections) -> dict:
    cfg = {"model": {"preset": "micro/4", "overrides": {"global_pool": "avg"}},
           "data": {"shards": str(shards), **DATA},
           "optim": {"lr": 3e-3}, "schedule": {"warmup_steps": 5},
           "train": {"steps": 40, "eval_every": 20, "log_every": 5},
           "checkpoint": {"every_steps": 10, "keep_last": 2},
           "tracking": {"uri": mlflow_uri, "enabled": mlflow_uri is not None, "system_metrics": False},
           "out": str(out)}
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    return cfg


def _vitpipe(args, *, timeout=540, check=True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "vitpipe.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    return proc


def _history(out: Path) -> list[tuple[int, float]]:
    """The loss curve recorded in the final checkpoint (the whole job, across relaunches)."""
    ck = out / "checkpoints"
    latest = (ck / "latest").read_text().strip()
    return [tuple(x) for x in json.loads((ck / latest / "COMPLETE.json").read_text())["history"]]


def test_bad_inputs_rejected_before_training(digits_shards, tmp_path):
    base = _config(digits_shards, tmp_path / "run")
    with pytest.raises(UserError, match="unknown model 'vit-z/3'"):
        pretrain(PretrainConfig(**{**base, "model": {"preset": "vit-z/3"}}))
    with pytest.raises(UserError, match="deepspeed.extra.train_batch_size"):
        pretrain(PretrainConfig(**{**base, "deepspeed": {"extra": {"train_batch_size": 8}}}))
    with pytest.raises(UserError, match="no shard index"):
        pretrain(PretrainConfig(**{**base, "data": {**base["data"], "shards": str(tmp_path / "nowhere")}}))
    assert not (tmp_path / "run").exists()  # nothing was trained or written


@pytest.mark.slow
def test_pretrain_in_process_then_extend(digits_shards, tmp_path, mlflow_uri):
    """The plain Python call (what Prefect flows use); relaunching with more steps resumes the same job.
    The loaders' worker processes end with the stage: a Prefect worker running stage after stage
    keeps none."""
    import multiprocessing

    from mlflow import MlflowClient

    from vit.models.weights import load_pretrained

    out = tmp_path / "run"
    cfg = PretrainConfig(**_config(digits_shards, out, mlflow_uri,
                                   train={"steps": 12, "eval_every": 0, "activation_checkpointing": True},
                                   checkpoint={"every_steps": 5}, deepspeed={"zero_stage": 0},
                                   data={"num_workers": 1}))
    r = pretrain(cfg)
    assert not multiprocessing.active_children()
    assert r["step"] == 12 and r["world_size"] == 1 and r["resumed_from"] is None
    assert 0.0 <= r["val/top1"] <= 1.0 and r["val/samples"] == 170  # every val sample once
    model = load_pretrained(r["export"])
    assert model.cfg.num_classes == 10 and model.cfg.image_size == 16 and model.cfg.global_pool == "avg"
    assert model.class_names == [str(i) for i in range(10)]  # the index's classes, in head order
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 3e-3
    assert json.loads((out / "results.json").read_text())["run_id"] == r["run_id"]

    cfg.train.steps = 16
    r2 = pretrain(cfg)
    assert r2["resumed_from"] == "step_00000012" and r2["steps_this_launch"] == 4 and r2["step"] == 16
    assert r2["run_id"] == r["run_id"]  # one MLflow run per job, across relaunches
    client = MlflowClient(mlflow_uri)
    assert client.get_run(r["run_id"]).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(r["run_id"], "train/loss")]
    assert steps == [5, 10, 12, 15, 16]
    # ZeRO-0: vitpipe clips and measures the gradient norm itself (DeepSpeed reports none there).
    norms = client.get_metric_history(r["run_id"], "train/grad_norm")
    assert [m.step for m in norms] == steps and all(m.value > 0 for m in norms)

    # Relaunched with another model into the same --out: one line, not DeepSpeed's size mismatch.
    other = cfg.model_copy(deep=True)
    other.data.image_size, other.train.steps = 24, 20
    with pytest.raises(UserError, match=r"step_00000016 is of another run \(image_size 16 -> 24\).*--no-resume"):
        pretrain(other)


def test_a_warmup_as_long_as_the_run_is_said(digits_shards, tmp_path, capsys):
    cfg = PretrainConfig(**_config(digits_shards, tmp_path / "run", train={"steps": 3, "eval_every": 0},
                                   checkpoint={"every_steps": 0}, schedule={"warmup_steps": 100}))
    pretrain(cfg)
    assert "schedule.warmup_steps=100 is not below the 3 steps of this run" in capsys.readouterr().err


def test_summary_gives_one_loss_for_one_logging_window():
    from vit.train.loop import _summary

    r = {"stage": "pretrain", "steps_this_launch": 4, "seconds": 3.0, "step": 4, "export": "e"}
    assert "loss 2.306, " in _summary({**r, "first_loss": 2.306, "final_loss": 2.306})  # steps <= log_every
    assert "loss 2.306 -> 1.100" in _summary({**r, "first_loss": 2.306, "final_loss": 1.1})
    # a run the tracking server did not get whole is not named as if it were
    assert _summary({**r, "run_id": "abc"}).endswith("MLflow run abc")
    assert _summary({**r, "run_id": "abc", "tracking_unlogged": {"metric_points": 3}}).endswith(
        "MLflow run abc (INCOMPLETE, see above)")


@pytest.fixture(scope="module")
def two_rank_run(digits_shards, tmp_path_factory):
    """An uninterrupted 2-rank ZeRO-2 run through the CLI, `--nproc 2` (the reference for resume)."""
    root = tmp_path_factory.mktemp("two_ranks")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg_file = root / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(_config(digits_shards, root / "run", uri, deepspeed={"zero_stage": 2})))
    proc = _vitpipe(["pretrain", str(cfg_file), "--nproc", "2"])
    return root, uri, cfg_file, proc


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_zero2_loss_falls_and_one_mlflow_run(two_rank_run):
    from mlflow import MlflowClient

    from vit.models.weights import load_pretrained

    root, uri, _, proc = two_rank_run
    assert "torch.distributed.run --nproc-per-node 2" in proc.stderr
    results = json.loads((root / "run" / "results.json").read_text())
    assert results["world_size"] == 2 and results["step"] == 40
    losses = [loss for _, loss in _history(root / "run")]
    assert len(losses) == 8 and sum(losses[-2:]) / 2 < losses[0] - 0.1, losses  # loss falls
    assert "pretrain: 40 steps" in proc.stderr  # the summary line

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("vitpipe").experiment_id])
    assert len(runs) == 1  # rank 0 only, one run for the job
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["vitpipe.world_size"] == "2"
    assert run.data.params["deepspeed.zero_stage"] == "2" and run.data.params["derived.global_batch"] == "64"
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/images_per_s", "train/epoch", "val/top1",
                "val/loss"):
        assert key in run.data.metrics, key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/top1")] == [20, 40]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"model", "loss_curve.png", "config.yaml"}
    local = client.download_artifacts(run.info.run_id, "model", str(root / "download"))
    from_mlflow = load_pretrained(local).state_dict()
    exported = load_pretrained(root / "run" / "export").state_dict()
    assert all((from_mlflow[k] == v).all() for k, v in exported.items())


def _workers(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the training processes under a torchrun launcher."""
    import psutil

    out = {}
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            env = child.environ()
            if "vitpipe.cli" in " ".join(child.cmdline()) and "RANK" in env:
                out[int(env["RANK"])] = child.pid
        except psutil.Error:
            continue
    return out


def _job(ref_cfg: Path, tmp_path: Path) -> tuple[Path, str]:
    """The reference run's config with its own output folder and MLflow store: (config file, URI)."""
    cfg = yaml.safe_load(ref_cfg.read_text())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg.update(out=str(tmp_path / "run"), tracking={**cfg["tracking"], "uri": uri})
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    return cfg_file, uri


def _launch(cfg_file: Path, *extra: str, through: tuple[str, ...] = ()) -> subprocess.Popen:
    """`vitpipe pretrain CFG EXTRA...` in the background; `through` puts a launcher command before
    it (e.g. ("launch", "--nproc-per-node", "2"))."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "vitpipe.cli", *through, "pretrain", str(cfg_file), *extra],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_until(done, launcher: subprocess.Popen, what: str, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert launcher.poll() is None, f"the run ended before {what}: {launcher.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.1)


def _logged(uri: str, step: int):
    """A predicate: the job's run has train/loss at `step` or later (rank 0 is past it)."""
    from mlflow import MlflowClient

    def done() -> bool:
        try:
            client = MlflowClient(uri)
            exp = client.get_experiment_by_name("vitpipe")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            return bool(runs) and max((m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")),
                                      default=0) >= step
        except Exception:  # the store is being created
            return False
    return done


def _the_run(uri: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("vitpipe").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]  # one run for the job, across relaunches
    return client, client.get_run(runs[0].info.run_id)


def _assert_resumed_exactly(ref_root: Path, tmp_path: Path, proc, uri: str) -> dict:
    """The relaunch's loss curve equals the uninterrupted run's, and its one MLflow run is FINISHED
    with every logged step once (steps replayed after the resume are not logged twice)."""
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    resumed = results["resumed_from"]
    assert resumed is not None and results["step"] == 40 and results["steps_this_launch"] < 40, results
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / resumed}" in proc.stderr
    # Same seed, same data order (the loader resumes mid-epoch), same optimizer state: the whole
    # curve equals the uninterrupted run's up to float summation noise of the gloo all-reduce.
    ref, got = _history(ref_root / "run"), _history(tmp_path / "run")
    assert [s for s, _ in got] == [s for s, _ in ref]
    for (step, a), (_, b) in zip(ref, got):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5), (step, a, b)
    ref_res = json.loads((ref_root / "run" / "results.json").read_text())
    assert results["val/top1"] == pytest.approx(ref_res["val/top1"], abs=1e-6)
    client, run = _the_run(uri)
    assert run.info.status == "FINISHED" and run.info.run_id == results["run_id"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(5, 41, 5))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/top1")] == [20, 40]
    return results


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigkill_a_rank_then_rank0_the_runs_are_closed_and_the_relaunch_resumes_exactly(two_rank_run, tmp_path):
    """SIGKILL rank 1 (rank 0 survives, torchrun SIGTERMs it: it must close the run, and that close
    must not be cut short by the signal); relaunch, then SIGKILL rank 0 after step 25 is logged with
    its newest checkpoint at 20 (it cannot close anything: the launching process, here `vitpipe launch`,
    does, from the run id kept beside the checkpoints); the third launch replays steps 21-25 without logging them twice and
    ends with the uninterrupted run's loss curve."""
    ref_root, _, ref_cfg, _ = two_rank_run
    cfg_file, uri = _job(ref_cfg, tmp_path)
    ck = tmp_path / "run" / "checkpoints"
    launcher = _launch(cfg_file, "--nproc", "2")
    _wait_until((ck / "step_00000010" / "COMPLETE.json").exists, launcher, "the first checkpoint")
    os.kill(_workers(launcher.pid)[1], signal.SIGKILL)  # rank 1 dies without any chance to clean up
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode != 0, err[-3000:]
    assert not (tmp_path / "run" / "results.json").exists()
    assert _the_run(uri)[1].info.status in ("FAILED", "KILLED"), err[-3000:]

    # The same job, no resume flag, through the cluster launcher (`vitpipe launch`, as deployments run it).
    launcher = _launch(cfg_file, through=("launch", "--nproc-per-node", "2"))
    _wait_until(lambda: (ck / "step_00000020" / "COMPLETE.json").exists() and _logged(uri, 25)(), launcher,
                "step 25")
    os.kill(_workers(launcher.pid)[0], signal.SIGKILL)
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode != 0
    run = _the_run(uri)[1]
    assert run.info.status == "FAILED" and f"MLflow run {run.info.run_id} closed as FAILED" in err, err[-3000:]

    proc = _vitpipe(["pretrain", str(cfg_file), "--nproc", "2"])
    assert _assert_resumed_exactly(ref_root, tmp_path, proc, uri)["resumed_from"] == "step_00000020"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigterm_stops_two_ranks_with_a_checkpoint_and_a_killed_run_then_resumes_exactly(two_rank_run, tmp_path):
    """Preemption: SIGTERM to `vitpipe pretrain --nproc 2` reaches both ranks (through torchrun);
    they agree on a step, save it, end the MLflow run KILLED and exit 143; the relaunch resumes
    at that step, not at the last periodic checkpoint, and continues exactly."""
    from vit.train.checkpoint import CheckpointManager, tag_for
    from vit.train.distributed import World

    ref_root, _, ref_cfg, _ = two_rank_run
    cfg_file, uri = _job(ref_cfg, tmp_path)
    launcher = _launch(cfg_file, "--nproc", "2")
    _wait_until(_logged(uri, 15), launcher, "step 15")
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 128 + signal.SIGTERM, err[-3000:]
    stopped = re.search(r"stopped by SIGTERM at step (\d+)/40, checkpoint (\S+) saved", err)
    assert stopped, err[-3000:]
    step = int(stopped.group(1))
    assert 15 <= step < 40, step
    ck = tmp_path / "run" / "checkpoints"
    assert CheckpointManager(ck, World()).latest_complete() == tag_for(step) == Path(stopped.group(2)).name
    assert _the_run(uri)[1].info.status == "KILLED"

    proc = _vitpipe(["pretrain", str(cfg_file), "--nproc", "2"])
    assert _assert_resumed_exactly(ref_root, tmp_path, proc, uri)["resumed_from"] == tag_for(step)


@pytest.mark.slow
def test_ctrl_c_stops_with_a_checkpoint_and_exit_130(digits_shards, tmp_path, mlflow_uri):
    """SIGINT (Ctrl-C) to a one-process run: the step's checkpoint, the run KILLED, exit status 130."""
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(_config(digits_shards, tmp_path / "run", mlflow_uri,
                                               train={"steps": 400, "eval_every": 0, "log_every": 5},
                                               checkpoint={"every_steps": 1000})))
    launcher = _launch(cfg_file)
    _wait_until(_logged(mlflow_uri, 5), launcher, "step 5")
    launcher.send_signal(signal.SIGINT)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 130, err[-3000:]
    step = int(re.search(r"stopped by SIGINT at step (\d+)/400", err).group(1))
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    assert _the_run(mlflow_uri)[1].info.status == "KILLED"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_two_rank_run_resumes_on_one_rank(two_rank_run, tmp_path):
    """A job requeued on fewer ranks: the 2-rank ZeRO-2 run's checkpoints are extended by 10 steps
    on one rank, with grad_accum 2 keeping the global batch of 64."""
    import shutil

    ref_root, _, ref_cfg, _ = two_rank_run
    shutil.copytree(ref_root / "run" / "checkpoints", tmp_path / "run" / "checkpoints")
    proc = _vitpipe(["pretrain", str(ref_cfg), "--out", str(tmp_path / "run"), "--train.steps", "50",
                     "--deepspeed.grad-accum", "2", "--no-tracking.enabled"])
    step40 = tmp_path / "run" / "checkpoints" / "step_00000040"
    assert "written by 2 ranks, this run has 1: rewriting its ZeRO state" in proc.stderr
    assert f"resumed from {step40}" in proc.stderr and "global batch changed" not in proc.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["world_size"] == 1 and results["step"] == 50 and results["steps_this_launch"] == 10
    assert (step40 / "universal" / "zero").is_dir()
    history = _history(tmp_path / "run")
    assert history[:8] == _history(ref_root / "run")  # the saved curve carried over
    # It continues where the 2-rank run stopped: near its last loss, far below the untrained one.
    assert history[-1][1] < history[0][1] - 0.1 and history[8][1] < (history[0][1] + history[7][1]) / 2, history
    marker = json.loads((tmp_path / "run" / "checkpoints" / "step_00000050" / "COMPLETE.json").read_text())
    assert marker["world_size"] == 1

    # Without grad_accum the global batch halves: the relaunch says so.
    proc = _vitpipe(["pretrain", str(ref_cfg), "--out", str(tmp_path / "run"), "--train.steps", "52",
                     "--no-tracking.enabled"])
    assert "global batch changed from 64 to 32" in proc.stderr and "--deepspeed.grad-accum 2 keeps it" in proc.stderr


@pytest.mark.parametrize("precision", ["bf16", "bf16_full"])
def test_bf16_pretraining_runs_the_whole_loop(precision, digits_shards, tmp_path):
    """The loop feeds each precision's engine the inputs it needs (fp32 under autocast, bf16 for bf16 weights)."""
    out = tmp_path / precision
    result = pretrain(PretrainConfig(**_config(digits_shards, out, deepspeed={"precision": precision},
                                               train={"steps": 6, "eval_every": 6, "log_every": 3},
                                               checkpoint={"every_steps": 0})))
    assert result["step"] == 6 and math.isfinite(result["final_loss"]) and result["val/samples"] > 0
    model = load_pretrained(result["export"])
    assert next(model.parameters()).dtype == torch.float32  # exports are fp32 whatever the training precision


def _damage(shards: Path, out: Path) -> Path:
    """A copy of the shard set with three kinds of damage: train-000000's index count lowered by 10
    (the tar holds more), train-000001.tar cut in half, one image of train-000002.tar overwritten."""
    import shutil
    import tarfile

    shutil.copytree(shards, out)
    index = json.loads((out / "index.json").read_text())
    for where in (index["splits"]["train"]["shards"][0], index["splits"]["train"], index["totals"]):
        where["num_samples"] -= 10
    (out / "index.json").write_text(json.dumps(index))
    cut = out / "train-000001.tar"
    with open(cut, "r+b") as f:
        f.truncate(cut.stat().st_size // 2)
    with tarfile.open(out / "train-000002.tar") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    with open(out / "train-000002.tar", "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"\0" * member.size)
    return out


@pytest.mark.slow
def test_damaged_data_is_counted_in_the_summary_results_and_mlflow_and_strict_data_fails(digits_shards, tmp_path):
    from mlflow import MlflowClient

    damaged = _damage(digits_shards, tmp_path / "damaged")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["pretrain", "--data.shards", str(damaged), "--data.image-size", "16", "--data.batch-size", "64",
              "--data.num-workers", "0", "--model.preset", "micro/4", "--train.steps", "26", "--train.eval-every", "0",
              "--train.log-every", "5", "--checkpoint.every-steps", "0", "--tracking.uri", uri,
              "--no-tracking.system-metrics"]
    proc = _vitpipe([*common, "--out", str(tmp_path / "run")])  # one epoch: every shard is read
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["data/damaged_shards"] == 2 and results["data/skipped_samples"] == 1, results
    problems = results["data_problems"]
    assert "holds more than the 490 samples" in problems["damaged_shards"]["train-000000.tar"]
    assert "ends after" in problems["damaged_shards"]["train-000001.tar"]
    assert problems["skipped_samples"][0]["shard"] == "train-000002.tar"
    summary = proc.stderr.strip().splitlines()[-1]
    assert "DAMAGED DATA: 2 shards, 1 samples skipped" in summary, summary
    run = MlflowClient(uri).get_run(results["run_id"])
    assert run.data.metrics["data/damaged_shards"] == 2 and run.data.metrics["data/skipped_samples"] == 1
    assert "data_problems.json" in {a.path for a in MlflowClient(uri).list_artifacts(results["run_id"])}

    strict = _vitpipe([*common, "--out", str(tmp_path / "strict"), "--strict-data"], check=False)
    assert strict.returncode == 2, strict.stderr[-3000:]
    errors = [line for line in strict.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--strict-data: damaged data in" in errors[0] and "vitpipe verify" in errors[0], errors
    assert not (tmp_path / "strict" / "results.json").exists()
