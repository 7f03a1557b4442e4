"""DeepSpeed config generation, optimizer groups, lr schedule, and a real engine step on the CPU."""

from __future__ import annotations

import pytest
import torch

from vit.train.config import OptimSection, PretrainConfig, ScheduleSection
from vit.train.engine import (Stepper, build_optimizer, clips_itself, create_engine, ds_config, layer_id, lr_at,
                        merge_extra, param_groups, resolve_precision, set_lr)
from vit.models.vit import create_model
from vitpipe.errors import UserError

CPU = torch.device("cpu")


def _cfg(**deepspeed) -> PretrainConfig:
    return PretrainConfig(data={"shards": "s", "batch_size": 8}, deepspeed=deepspeed)


def _micro_engine(cfg: PretrainConfig, *, layer_decay: float = 1.0, compile: bool = False):
    """A real DeepSpeed engine (one gloo rank) around a seeded micro ViT for 16x16 inputs, 4 classes."""
    from vit.train.distributed import World, init_process_group

    init_process_group(World(), CPU)
    torch.manual_seed(0)
    model = create_model("micro/4", num_classes=4, image_size=16)
    groups = param_groups(model, cfg.optim, layer_decay=layer_decay)
    return create_engine(model, build_optimizer(groups, cfg.optim, CPU), ds_config(cfg, device=CPU),
                         compile=compile)


def _train(engine, steps: int, dtype: torch.dtype | None = None) -> list[float]:
    """Losses of `steps` optimizer steps on one fixed batch."""
    x, y = torch.randn(8, 3, 16, 16).to(dtype), torch.randint(0, 4, (8,))
    losses = []
    for _ in range(steps):
        logits = engine(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_ds_config_from_typed_config(stage):
    ds = ds_config(_cfg(zero_stage=stage, grad_accum=4, grad_clip=0.5), device=CPU)
    assert ds["zero_optimization"] == {"stage": stage}
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 4
    # ZeRO-0 with fp32 weights: vitpipe clips between backward and step (Stepper), DeepSpeed must not.
    assert ds["gradient_clipping"] == (0.0 if stage == 0 else 0.5)
    assert clips_itself(stage, "fp32") == (stage == 0)
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]  # auto -> fp32 on the CPU


def test_precision_choice():
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        resolve_precision("fp16", CPU)
    bf16 = ds_config(_cfg(precision="bf16"), device=CPU)
    assert bf16["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and not bf16["bf16"]["enabled"]
    full = ds_config(_cfg(precision="bf16_full"), device=CPU)
    assert full["bf16"] == {"enabled": True} and not full["torch_autocast"]["enabled"]


@pytest.mark.parametrize("precision,weight_dtype", [("bf16", torch.float32), ("bf16_full", torch.bfloat16)])
def test_bf16_modes_train_on_cpu(precision, weight_dtype):
    """bf16 = autocast over fp32 weights (bf16 matmuls); bf16_full = bf16 weights fed bf16 inputs."""
    from vit.train.engine import input_dtype

    engine = _micro_engine(_cfg(zero_stage=0, precision=precision))
    set_lr(engine, 2e-3)
    assert engine(torch.randn(2, 3, 16, 16).to(input_dtype(precision))).dtype == torch.bfloat16  # ran in bf16
    losses = _train(engine, 10, input_dtype(precision))
    assert engine.module.head.weight.dtype == weight_dtype
    assert losses[-1] < losses[0] - 0.2, losses


def test_extra_keys_merged_and_validated():
    ds = ds_config(_cfg(zero_stage=2, extra={"zero_optimization": {"overlap_comm": True},
                                             "wall_clock_breakdown": True}), device=CPU)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True} and ds["wall_clock_breakdown"]
    with pytest.raises(UserError, match="deepspeed.extra.train_batch_size: set by vitpipe"):
        merge_extra({}, {"train_batch_size": 64})
    with pytest.raises(UserError, match="deepspeed.extra.optimizer"):
        merge_extra({}, {"optimizer": {"type": "Lamb"}})
    with pytest.raises(UserError, match="set deepspeed.zero_stage instead"):
        merge_extra({"zero_optimization": {"stage": 1}}, {"zero_optimization": {"stage": 3}})
    with pytest.raises(UserError, match="deepspeed.extra.zero_optimisation: not a DeepSpeed key"):
        merge_extra({}, {"zero_optimisation": {}})
    # A typo inside the ZeRO section is caught by DeepSpeed's own schema.
    with pytest.raises(UserError, match="overlap_com"):
        merge_extra({"zero_optimization": {"stage": 2}}, {"zero_optimization": {"overlap_com": True}})


def test_param_groups_no_decay_and_layer_decay():
    model = create_model("micro/4", num_classes=3)
    optim = OptimSection(weight_decay=0.1)
    groups = param_groups(model, optim)
    by_name = {n: g for g in groups for n in g["names"]}
    assert set(by_name) == {n for n, _ in model.named_parameters()}
    for name in ("pos_embed", "cls_token", "blocks.0.norm1.weight", "head.bias", "blocks.1.attn.qkv.bias"):
        assert by_name[name]["weight_decay"] == 0.0, name
    for name in ("blocks.0.attn.qkv.weight", "head.weight", "patch_embed.proj.weight"):
        assert by_name[name]["weight_decay"] == 0.1, name

    depth = len(model.blocks)
    assert [layer_id(n, depth) for n in ("pos_embed", "blocks.0.mlp.fc1.weight", "blocks.3.norm2.bias",
                                         "norm.weight", "head.weight", "vit.blocks.2.attn.proj.weight")] \
        == [0, 1, 4, 5, 5, 3]
    llrd = {n: g["lr_scale"] for g in param_groups(model, optim, layer_decay=0.5) for n in g["names"]}
    assert llrd["head.weight"] == 1.0 and llrd["blocks.3.attn.qkv.weight"] == 0.5
    assert llrd["pos_embed"] == 0.5 ** (depth + 1)

    model.requires_grad_(False)
    model.head.requires_grad_(True)
    assert {n for g in param_groups(model, optim) for n in g["names"]} == {"head.weight", "head.bias"}
    model.head.requires_grad_(False)
    with pytest.raises(UserError, match="no trainable parameters"):
        param_groups(model, optim)


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_lr_schedule_shape(decay):
    sched = ScheduleSection(warmup_steps=10, decay=decay, min_lr_ratio=0.1)
    lrs = [lr_at(s, total_steps=100, peak=1.0, schedule=sched) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup to the peak
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    if decay == "constant":
        assert lrs[-1] == 1.0
    else:
        assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
        assert lrs[-1] == pytest.approx(0.1, abs=0.02)  # decays to min_lr_ratio * peak
        mid = lr_at(55, total_steps=100, peak=1.0, schedule=sched)
        assert mid == pytest.approx(0.55, abs=0.01)  # halfway down: same for cosine and linear


def test_engine_trains_on_cpu_with_scheduled_lr():
    """A real DeepSpeed engine (ZeRO-2, one gloo rank): loss falls on a fixed batch; set_lr reaches AdamW."""
    engine = _micro_engine(_cfg(zero_stage=2), layer_decay=0.5)
    set_lr(engine, 2e-3)
    assert sorted({g["lr"] for g in engine.optimizer.param_groups})[-1] == pytest.approx(2e-3)
    assert min(g["lr"] for g in engine.optimizer.param_groups) == pytest.approx(2e-3 * 0.5 ** 5)
    losses = _train(engine, 15)
    assert losses[-1] < losses[0] - 0.3, losses
    assert engine.get_global_grad_norm() is not None


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_own_clipping_at_zero0_matches_deepspeeds(precision):
    """At ZeRO-0 with fp32 weights vitpipe clips with torch's clip_grad_norm_ between backward and
    step (DeepSpeed's clipping turned off): the same weights as DeepSpeed clipping, step for step,
    with a clip low enough to act on every step, and the norm is reported (DeepSpeed reports none)."""
    from two_rank_clip import clip_config, engine_pair

    from vit.train.distributed import World, init_process_group

    cfg = clip_config(precision)
    assert ds_config(cfg, device=CPU)["gradient_clipping"] == 0.0
    init_process_group(World(), CPU)
    ours, theirs = engine_pair(cfg)
    assert all(torch.equal(a, b) for a, b in zip(ours.module.parameters(), theirs.module.parameters()))

    stepper = Stepper(ours, cfg, CPU)
    assert stepper.own and Stepper(theirs, _cfg(zero_stage=1), CPU).own is False
    torch.manual_seed(1)
    for step in range(4):
        for micro in range(2):
            x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
            for engine in (ours, theirs):
                loss = torch.nn.functional.cross_entropy(engine(x).float(), y)
                if engine is ours:
                    stepper.backward_step(loss)
                else:
                    engine.backward(loss)
                    engine.step()
        norm = stepper.grad_norm()
        assert norm is not None and norm > 0.05  # so the clip acted on this step
    assert theirs.get_global_grad_norm() is None
    for a, b in zip(ours.module.parameters(), theirs.module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_own_clipping_on_two_ranks_clips_the_averaged_gradients():
    """2 ranks with different data: vitpipe clips after DeepSpeed averaged the gradients over the
    ranks (in engine.backward at the boundary), so it equals DeepSpeed's clipping (tests/two_rank_clip.py)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(repo / "tests" / "two_rank_clip.py"), "fp32"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("max |ours - deepspeed|") == 2


def test_grad_norm_measured_without_clipping_only_when_asked():
    engine = _micro_engine(_cfg(zero_stage=0, grad_clip=0.0))
    stepper = Stepper(engine, _cfg(zero_stage=0, grad_clip=0.0), CPU)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    stepper.backward_step(torch.nn.functional.cross_entropy(engine(x), y))
    assert stepper.grad_norm() is None
    stepper.backward_step(torch.nn.functional.cross_entropy(engine(x), y), measure=True)
    assert stepper.grad_norm() > 0


@pytest.mark.slow
def test_compiled_engine_trains_and_keeps_plain_parameter_names():
    """train.compile: DeepSpeed compiles the forward; names stay those of the model, so export loads."""
    names = set(create_model("micro/4", num_classes=4, image_size=16).state_dict())
    engine = _micro_engine(_cfg(zero_stage=0), compile=True)
    losses = _train(engine, 4)
    assert engine.is_compiled and losses[-1] < losses[0]
    assert set(engine.module.state_dict()) == names


@pytest.mark.parametrize("name,precision,peak", [
    ("NVIDIA GB200", "bf16", 2500e12),          # contains "B200": must not take B200's row
    ("NVIDIA B200", "bf16", 2250e12),
    ("NVIDIA GH200 480GB", "bf16", 989e12),
    ("NVIDIA H100 NVL", "bf16", 835e12),        # contains "H100"
    ("NVIDIA H100 PCIe", "fp32", 378e12),
    ("NVIDIA L40S", "bf16", 362e12),            # contains "L40" and "L4"
    ("NVIDIA L4", "bf16", 121e12),
    ("NVIDIA A10G", "bf16", 70e12),             # contains "A10"
    ("NVIDIA A100-SXM4-80GB", "fp32", 156e12),
    ("Tesla V100-SXM2-16GB", "bf16", 125e12),
    ("NVIDIA GeForce GTX 1080", "bf16", None),  # unknown: no MFU rather than a wrong one
])
def test_gpu_peak_table_matches_the_most_specific_name(name, precision, peak):
    from vit.train.loop import peak_flops_by_name

    assert peak_flops_by_name(name, precision) == peak


def test_compile_defaults_to_auto_which_compiles_on_cuda_only():
    import argparse

    from vit.train.config import add_stage_arguments, stage_config_from_args
    from vit.train.engine import resolve_compile

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert PretrainConfig(data={"shards": "x"}).train.compile == "auto"
    assert resolve_compile("auto", cuda) is True and resolve_compile("auto", cpu) is False
    assert resolve_compile(False, cuda) is False and resolve_compile(True, cpu) is True
    parser = argparse.ArgumentParser()
    add_stage_arguments(parser, PretrainConfig)
    for value, expected in (("false", False), ("true", True), ("auto", "auto")):
        args = parser.parse_args(["--data.shards", "x", "--train.compile", value])
        assert stage_config_from_args(PretrainConfig, args).train.compile == expected
    with pytest.raises(Exception, match="compile"):
        PretrainConfig(data={"shards": "x"}, train={"compile": "sometimes"})
