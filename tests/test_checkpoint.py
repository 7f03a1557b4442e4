"""Checkpoints: complete-marker protocol, keep-last-K, partial/corrupt skipped, exact restore, export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vit.train.checkpoint import LATEST, MARKER, CheckpointManager, export_checkpoint
from vit.train.config import PretrainConfig
from vit.train.distributed import World, init_process_group
from vit.train.engine import build_optimizer, create_engine, ds_config, param_groups
from vit.models.vit import create_model

CPU = torch.device("cpu")


def _engine(stage: int, seed: int = 0, universal: bool = False):
    init_process_group(World.from_env(), CPU)
    torch.manual_seed(seed)
    model = create_model("micro/4", num_classes=4, image_size=16)
    cfg = PretrainConfig(data={"shards": "s", "batch_size": 4}, deepspeed={"zero_stage": stage})
    ds = ds_config(cfg, device=CPU)
    if universal:
        ds["checkpoint"] = {"load_universal": True}
    return create_engine(model, build_optimizer(param_groups(model, cfg.optim), cfg.optim, CPU), ds)


def _train(engine, steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 4, (4,), generator=g)
        loss = torch.nn.functional.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()


def _save(mgr, engine, step):
    return mgr.save(engine, step=step, meta={"step": step, "epoch": 0, "zero_stage": 1},
                    rank_state={"loader": {"epoch": 0, "steps": step}})


def _weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def test_keep_last_and_latest_marker(tmp_path):
    engine = _engine(stage=1)
    mgr = CheckpointManager(tmp_path / "ck", World(), keep_last=2)
    for step in (1, 2, 3):
        _train(engine, 1)
        path = _save(mgr, engine, step)
        marker = json.loads((path / MARKER).read_text())
        assert marker["step"] == step and marker["world_size"] == 1
        assert "vitpipe_rank00000.json" in marker["files"] and any("optim_states" in f for f in marker["files"])
    assert mgr.tags() == ["step_00000002", "step_00000003"]  # step 1 pruned
    assert (tmp_path / "ck" / LATEST).read_text().strip() == "step_00000003"
    assert mgr.latest_complete() == "step_00000003"
    mgr.clear()
    assert mgr.tags() == [] and mgr.latest_complete() is None


def test_partial_and_corrupt_checkpoints_are_skipped(tmp_path):
    engine = _engine(stage=1)
    mgr = CheckpointManager(tmp_path / "ck", World(), keep_last=5)
    for step in (1, 2, 3, 4):
        _train(engine, 1)
        _save(mgr, engine, step)
    root = tmp_path / "ck"
    (root / "step_00000004" / MARKER).unlink()  # a save that died before every rank finished
    optim = next((root / "step_00000003").glob("*optim_states.pt"))
    with open(optim, "r+b") as f:  # truncated by a full disk / killed writer
        f.truncate(optim.stat().st_size // 2)
    (root / "step_00000002" / MARKER).write_text("{not json")  # marker itself garbled
    warnings: list[str] = []
    assert mgr.latest_complete(warn=warnings.append) == "step_00000001"
    assert "partial" in warnings[0] and "step_00000004" in warnings[0]
    assert "truncated" in warnings[1] and "unreadable completion marker" in warnings[2]


def test_restore_is_exact(tmp_path):
    engine = _engine(stage=2)
    mgr = CheckpointManager(tmp_path / "ck", World())
    _train(engine, 2)
    _save(mgr, engine, 2)
    saved = _weights(engine)
    draw = torch.rand(3)  # the RNG stream right after saving
    torch.manual_seed(1234)
    _train(engine, 2, seed=2)  # reference continuation
    after_two_more = _weights(engine)

    fresh = _engine(stage=2, seed=99)  # different init and RNG: everything must come from the checkpoint
    meta, rank_state = mgr.load(fresh, mgr.latest_complete())
    assert torch.equal(torch.rand(3), draw)
    assert meta["step"] == 2 and rank_state["loader"] == {"epoch": 0, "steps": 2}
    for k, v in saved.items():
        torch.testing.assert_close(fresh.module.state_dict()[k], v, rtol=0, atol=0)
    torch.manual_seed(1234)
    _train(fresh, 2, seed=2)  # optimizer moments restored -> the same two steps
    for k, v in after_two_more.items():
        torch.testing.assert_close(fresh.module.state_dict()[k], v, rtol=1e-6, atol=1e-7)


def test_zero3_on_another_number_of_ranks_is_refused(tmp_path):
    from vitpipe.errors import UserError

    engine = _engine(stage=3)
    mgr = CheckpointManager(tmp_path / "ck", World())
    _save(mgr, engine, 1)
    other = CheckpointManager(tmp_path / "ck", World(rank=0, world_size=2))
    assert not mgr.prepare_resize("step_00000001", zero_stage=3)  # same ranks: nothing to do
    with pytest.raises(UserError, match="written by 1 ranks with ZeRO-3 and this run has 2.*Relaunch with 1 ranks"):
        other.prepare_resize("step_00000001", zero_stage=3)


# Save on one number of ranks, resume on another. Every rank trains on the same batches, so the
# data-parallel mean gradient is the same whatever the rank count, and the resumed run must
# continue exactly as the saving run did: weights, Adam moments and step count all restored.
_RESIZE_SCRIPT = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_checkpoint import _engine, _train, _save, _weights
    from vit.train.checkpoint import CheckpointManager
    from vit.train.distributed import World, init_process_group
    world = World.from_env()
    init_process_group(world, torch.device("cpu"))
    out, stage, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    mgr = CheckpointManager(out / "ck", world)
    if mode == "save":
        engine = _engine(stage)
        _train(engine, 3, seed=1)  # the same batches on every rank
        _save(mgr, engine, 3)
        _train(engine, 3, seed=2)
        if world.rank == 0:
            torch.save(_weights(engine), out / "reference.pt")
    else:
        tag = mgr.latest_complete()
        universal = mgr.prepare_resize(tag, zero_stage=stage)
        engine = _engine(stage, seed=99, universal=universal)  # nothing may come from this init
        meta, rank_state = mgr.load(engine, tag)
        assert meta["step"] == 3 and rank_state["loader"] == {{"epoch": 0, "steps": 3}}
        _train(engine, 3, seed=2)
        reference = torch.load(out / "reference.pt")
        worst = max((engine.module.state_dict()[k] - v).abs().max().item() for k, v in reference.items())
        # one write per line (print's separate writes of each rank would interleave in the pipe)
        print(f"RESUMED {{world.world_size}} {{'universal' if universal else 'plain'}} {{worst}}", flush=True)
""")


def _run_ranks(n: int, script, *args) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)] if n > 1
           else [sys.executable])
    proc = subprocess.run([*cmd, str(script), *map(str, args)], env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("stage, saved_by, resumed_by", [(1, 2, 1), (2, 2, 1), (2, 1, 2), (0, 2, 1)])
def test_resume_on_another_number_of_ranks_continues_exactly(tmp_path, stage, saved_by, resumed_by):
    script = tmp_path / "resize.py"
    script.write_text(_RESIZE_SCRIPT.format(tests=os.path.dirname(__file__)))
    _run_ranks(saved_by, script, tmp_path, stage, "save")
    out = _run_ranks(resumed_by, script, tmp_path, stage, "load")
    lines = [x for x in out.splitlines() if x.startswith("RESUMED")]
    assert len(lines) == resumed_by, out  # every rank's own report
    for line in lines:
        _, world, how, worst = line.split()
        assert int(world) == resumed_by and how == ("plain" if stage == 0 else "universal")
        assert float(worst) < 1e-6, line  # a lost Adam moment or step count moves the weights by ~lr (1e-3)
    if stage:
        assert (tmp_path / "ck" / "step_00000003" / "universal" / "zero").is_dir()


@pytest.mark.parametrize("stage", [0, 3])
def test_export_equals_live_weights(tmp_path, stage):
    import deepspeed

    from vit.models.weights import load_pretrained

    engine = _engine(stage=stage)
    _train(engine, 3)
    mgr = CheckpointManager(tmp_path / "ck", World())
    _save(mgr, engine, 3)
    cfg = create_model("micro/4", num_classes=4, image_size=16).cfg.to_dict()
    out = export_checkpoint(tmp_path / "ck", "step_00000003", tmp_path / "export", model_config=cfg,
                            zero_stage=stage)
    exported = load_pretrained(out).state_dict()
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=stage == 3):
        live = {k: v.detach().clone() for k, v in params.items()}
    assert set(live) == set(exported)
    for k, v in live.items():
        torch.testing.assert_close(exported[k], v, rtol=0, atol=0, msg=k)


_ZERO3_SCRIPT = textwrap.dedent("""
    import sys, torch, deepspeed
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_checkpoint import _engine, _train, _save
    from vit.train.checkpoint import CheckpointManager, export_checkpoint
    from vit.train.distributed import World, init_process_group
    from vit.models.vit import create_model
    from vit.models.weights import load_pretrained
    world = World.from_env()
    init_process_group(world, torch.device("cpu"))
    out = Path(sys.argv[1])
    engine = _engine(stage=3)
    _train(engine, 3, seed=10 + world.rank)  # each rank its own data, like real data parallelism
    mgr = CheckpointManager(out / "ck", world)
    _save(mgr, engine, 3)
    params = dict(engine.module.named_parameters())
    shard = sum(p.ds_tensor.numel() for p in params.values())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        live = {{k: v.detach().clone() for k, v in params.items()}}
    if world.rank == 0:
        cfg = create_model("micro/4", num_classes=4, image_size=16).cfg.to_dict()
        export_checkpoint(out / "ck", "step_00000003", out / "export", model_config=cfg, zero_stage=3)
        exported = load_pretrained(out / "export").state_dict()
        assert set(live) == set(exported)
        for k, v in live.items():
            torch.testing.assert_close(exported[k], v, rtol=0, atol=0, msg=k)
        full = sum(v.numel() for v in live.values())
        assert shard < full, (shard, full)  # the weights really were sharded over the two ranks
        print("EXPORT-MATCHES", shard, full)
""")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_zero3_export_over_two_ranks_equals_live_weights(tmp_path):
    script = tmp_path / "zero3_export.py"
    script.write_text(_ZERO3_SCRIPT.format(tests=os.path.dirname(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "EXPORT-MATCHES" in proc.stdout


# -- resume loads no pickles ---------------------------------------------------------------------

class _Payload:
    """What an attacker plants: unpickling it runs a shell command (here: creating a file)."""

    def __init__(self, evidence):
        self.evidence = str(evidence)

    def __reduce__(self):
        return os.system, (f"touch {self.evidence}",)


def _plant(file, evidence) -> None:
    """Add a payload to a real checkpoint file, as someone with write access to the folder could."""
    state = torch.load(file, weights_only=False)  # the test's own file, before planting
    state["note"] = _Payload(evidence)
    torch.save(state, file)


def _reseal(root, tag) -> None:
    """Rewrite COMPLETE.json's file sizes so the tampered checkpoint passes the completeness check."""
    path = root / tag
    marker = json.loads((path / MARKER).read_text())
    marker["files"] = {str(p.relative_to(path)): p.stat().st_size
                       for p in sorted(path.rglob("*")) if p.is_file() and p.name != MARKER}
    (path / MARKER).write_text(json.dumps(marker))


@pytest.mark.parametrize("target", ["model_states", "optim_states", "old_rank_file", "universal", "to_universal"])
def test_a_pickle_planted_in_any_file_a_resume_reads_does_not_run(tmp_path, target):
    from vit.train.checkpoint import UnsafeCheckpoint

    engine = _engine(stage=1)
    _train(engine, 1)
    root, tag = tmp_path / "ck", "step_00000001"
    mgr = CheckpointManager(root, World())
    _save(mgr, engine, 1)
    evidence = tmp_path / "payload-ran"
    path = root / tag
    if target == "model_states":
        _plant(path / "mp_rank_00_model_states.pt", evidence)
    elif target == "optim_states":
        _plant(next(path.glob("*optim_states.pt")), evidence)
    elif target == "old_rank_file":  # the .pt rank file of vitpipe before JSON rank files
        (path / "vitpipe_rank00000.json").unlink()
        torch.save({"loader": {"epoch": 0, "steps": 1}, "rng": {"torch": torch.get_rng_state()},
                    "note": _Payload(evidence)}, path / "vitpipe_rank00000.pt")
    elif target == "to_universal":  # resuming on 2 ranks rewrites the optimizer state first
        _plant(next(path.glob("*optim_states.pt")), evidence)
    _reseal(root, tag)
    if target in ("universal", "to_universal"):  # a resume on another number of ranks
        mgr = CheckpointManager(root, World(rank=0, world_size=2))
        if target == "to_universal":
            with pytest.raises(UnsafeCheckpoint, match=r"holds a pickled posix\.system.*--no-resume"):
                mgr.prepare_resize(tag, zero_stage=1)
            assert not evidence.exists() and not (path / "universal").exists()
            return
        assert mgr.prepare_resize(tag, zero_stage=1)
        _plant(next((path / "universal" / "zero").rglob("fp32.pt")), evidence)
        _reseal(root, tag)
    fresh = _engine(stage=1, seed=5, universal=target == "universal")
    with pytest.raises(UnsafeCheckpoint, match=rf"checkpoint {root}.* holds a pickled posix\.system, which could "
                                               r"run code.*not loaded.*--no-resume"):
        mgr.load(fresh, mgr.latest_complete())
    assert not evidence.exists()  # the payload never ran


def test_checkpoints_of_vitpipe_before_json_rank_files_still_resume_exactly(tmp_path):
    """The old per-rank .pt file (numpy RNG arrays) loads with the weights-only unpickler."""
    import random

    import numpy as np

    engine = _engine(stage=0)
    mgr = CheckpointManager(tmp_path / "ck", World())
    _save(mgr, engine, 1)
    path = tmp_path / "ck" / "step_00000001"
    (path / "vitpipe_rank00000.json").unlink()
    torch.save({"loader": {"epoch": 0, "steps": 1}, "rng": {"python": random.getstate(),
                "numpy": np.random.get_state(), "torch": torch.get_rng_state()}}, path / "vitpipe_rank00000.pt")
    _reseal(tmp_path / "ck", "step_00000001")
    expected = (random.random(), np.random.rand(), torch.rand(2))
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    _, rank_state = mgr.load(_engine(stage=0, seed=3), "step_00000001")
    assert rank_state["loader"] == {"epoch": 0, "steps": 1}
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(2), expected[2])


# -- files a killed writer leaves ------------------------------------------------------------------

_WRITE_LATEST_FOREVER = """
import sys
from pathlib import Path
from vit.train.checkpoint import atomic_write
root = Path(sys.argv[1])
print("writing", flush=True)
while True:
    atomic_write(root / "latest", "step_00000001\\n" * 200_000)
"""


def test_a_latest_tmp_file_left_by_a_kill_is_removed_at_the_next_start(tmp_path):
    import signal
    import time

    root = tmp_path / "ck"
    root.mkdir()
    left = []
    for attempt in range(20):  # SIGKILL a real writer until it dies between create and rename
        proc = subprocess.Popen([sys.executable, "-c", _WRITE_LATEST_FOREVER, str(root)], stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(0.05 + 0.03 * attempt)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        left = list(root.glob(".latest.tmp-*"))
        if left:
            break
    assert left, "no kill landed inside a write in 20 tries"
    (root / "step_00000003").mkdir()
    (root / "step_00000003" / "vitpipe_rank00001.pt.tmp").write_bytes(b"half")  # older vitpipe's rank tmp
    removed = CheckpointManager(root, World()).remove_stale_files()
    assert sorted(p.name for p in removed) == sorted([left[0].name, "vitpipe_rank00001.pt.tmp"])
    assert not list(root.glob(".latest.tmp-*")) and (root / "latest").is_file()
    assert CheckpointManager(root, World(rank=1, world_size=2)).remove_stale_files() == []  # rank 0's job


# -- a full disk -------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real 20 MB filesystem (tmpfs), so writes fail with ENOSPC as on a full disk."""
    import shutil

    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk, leave: int):
    """Fill `disk` with one file until `leave` bytes are free; returns that file (delete it to free space)."""
    import shutil

    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(bytes(max(0, shutil.disk_usage(disk).free - leave)))
    return filler


def _loss_curve(ckpt_dir):
    latest = (ckpt_dir / LATEST).read_text().strip()
    return [tuple(x) for x in json.loads((ckpt_dir / latest / MARKER).read_text())["history"]]


@pytest.mark.slow
def test_a_disk_without_room_for_keep_last_plus_one_stops_in_one_line_and_the_rerun_is_exact(
        digits_shards, tmp_path, small_disk):
    """keep_last=2 with room for 2.5 checkpoints: steps 10 and 20 are saved, the last (30) is refused
    before a byte is written (one line: the path, the space needed, why keep_last needs 3); after
    freeing space the same run resumes at step 20 and its loss curve equals an uninterrupted run's."""
    from test_pretrain import _config

    from vit.pretrain import pretrain
    from vitpipe.errors import UserError

    def config(out, ckpt_dir=None):
        return PretrainConfig(**_config(digits_shards, out, train={"steps": 30, "eval_every": 0, "log_every": 5},
                                        checkpoint={"every_steps": 10, "keep_last": 2,
                                                    **({"dir": str(ckpt_dir)} if ckpt_dir else {})},
                                        deepspeed={"zero_stage": 1}))

    pretrain(config(tmp_path / "reference"))
    ref_ckpt = tmp_path / "reference" / "checkpoints"
    size = sum(json.loads((ref_ckpt / "step_00000030" / MARKER).read_text())["files"].values())
    filler = fill(small_disk, leave=int(2.5 * size))
    ckpt_dir = small_disk / "ck"
    with pytest.raises(UserError) as err:
        pretrain(config(tmp_path / "run", ckpt_dir))
    msg = str(err.value)
    assert "\n" not in msg and f"checkpoint {ckpt_dir / 'step_00000030'} does not fit" in msg, msg
    assert "needs about 2." in msg and "MB are free there" in msg and "keep_last=2 needs room for 3" in msg
    assert msg.endswith("run the same command again: it resumes from step_00000020"), msg
    mgr = CheckpointManager(ckpt_dir, World())
    assert mgr.tags() == ["step_00000010", "step_00000020"] and mgr.latest_complete() == "step_00000020"
    assert not [p for p in ckpt_dir.rglob("*") if ".tmp" in p.name]

    filler.unlink()
    result = pretrain(config(tmp_path / "run", ckpt_dir))
    assert result["resumed_from"] == "step_00000020" and result["step"] == 30
    assert _loss_curve(ckpt_dir) == _loss_curve(ref_ckpt)  # one process, fixed seed: bit-identical


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_disk_that_fills_while_two_ranks_write_is_one_line_and_leaves_no_partial_checkpoint(
        digits_shards, tmp_path, small_disk):
    """Room for more than the space check expects of a first checkpoint (12 bytes a parameter) but
    less than ZeRO-1 writes (16): the disk really fills inside DeepSpeed's torch.save. Both ranks
    stop together, the partial step is removed, the run is FAILED and the one error line names the
    path and the space; after freeing space the same command trains to the end."""
    from mlflow import MlflowClient

    from vit.models.vit import create_model

    numel = create_model("micro/4", num_classes=10, image_size=16).num_params()
    filler = fill(small_disk, leave=14 * numel)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ckpt_dir = small_disk / "ck"
    cmd = [sys.executable, "-m", "vitpipe.cli", "pretrain", "--data.shards", str(digits_shards),
           "--data.image-size", "16", "--data.batch-size", "16", "--data.num-workers", "0",
           "--model.preset", "micro/4", "--train.steps", "8", "--train.eval-every", "0", "--train.log-every", "2",
           "--checkpoint.every-steps", "4", "--checkpoint.dir", str(ckpt_dir), "--deepspeed.zero-stage", "1",
           "--tracking.uri", uri, "--no-tracking.system-metrics", "--out", str(tmp_path / "run"), "--nproc", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 2, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line and "checkpoint" in line]
    # rank 0 says it, rank 1 stops quietly, and the launching process repeats it last, after torchrun's report
    assert len(errors) == 2 and errors[0] == errors[1] == proc.stderr.strip().splitlines()[-1], proc.stderr[-4000:]
    assert f"checkpoint {ckpt_dir / 'step_00000004'} ran out of space; the partial checkpoint was removed: it " \
           f"needs about" in errors[0] and "are free there" in errors[0] and "it starts from the beginning" in errors[0]
    assert "Traceback" not in proc.stderr.split(errors[0])[0][-2000:]  # no raw traceback before the line
    assert not list(ckpt_dir.glob("step_*")) and not [p for p in ckpt_dir.rglob("*") if ".tmp" in p.name]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("vitpipe").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]

    filler.unlink()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    assert again.returncode == 0, again.stderr[-4000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["step"] == 8 and results["run_id"] == runs[0].info.run_id  # the job's one run, continued
    assert client.get_run(results["run_id"]).info.status == "FINISHED"


@pytest.mark.slow
def test_a_resume_from_a_planted_checkpoint_refuses_in_one_line(digits_shards, tmp_path):
    """The user's way in: the same command again, after someone wrote a pickle into the folder."""
    from test_pretrain import _config

    from vit.pretrain import pretrain

    cfg = PretrainConfig(**_config(digits_shards, tmp_path / "run", train={"steps": 4, "eval_every": 0},
                                   checkpoint={"every_steps": 0}))
    pretrain(cfg)
    evidence = tmp_path / "payload-ran"
    ck = tmp_path / "run" / "checkpoints"
    _plant(ck / "step_00000004" / "mp_rank_00_model_states.pt", evidence)
    _reseal(ck, "step_00000004")
    (tmp_path / "run.yaml").write_text(cfg.model_dump_json())
    proc = subprocess.run([sys.executable, "-m", "vitpipe.cli", "pretrain", str(tmp_path / "run.yaml"),
                           "--train.steps", "6"], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"vitpipe pretrain: error: checkpoint {ck / 'step_00000004'} holds a pickled posix.system, which could run "
        f"code when loaded, so it was not loaded (someone may have written into the checkpoint folder). Delete "
        f"that checkpoint to resume from an older one, or start over with --no-resume")
    assert not evidence.exists()
