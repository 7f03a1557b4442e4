"""Checkpoints: complete-marker protocol, keep-last-K, partial/corrupt skipped, exact restore, export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vit.train.checkpoint import LATEST, MARKER, CheckpointManager, consolidated_state_dict, export_checkpoint
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
        assert "vitpipe_rank00000.pt" in marker["files"] and any("optim_states" in f for f in marker["files"])
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
        print("RESUMED", world.world_size, "universal" if universal else "plain", worst)
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
    line = next(x for x in out.splitlines() if x.startswith("RESUMED"))
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
