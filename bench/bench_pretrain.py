"""DeepSpeed training step vs a plain PyTorch loop: same model, weights, batch, AdamW groups, clipping.

One rank. The two loops alternate in rounds (plain, DeepSpeed, DeepSpeed, plain, ...) inside one
process so machine noise hits both alike; each round times `--steps` steps after `--warmup`
untimed ones. Prints one line per loop, the ratio DeepSpeed/plain (goal <= 1.10), images/s and MFU
where the GPU's peak is known (vit.train.loop.GPU_PEAK_FLOPS); the last stdout line is JSON.

    python bench/bench_pretrain.py                                         # CPU: ti/4, 32px, fp32
    python bench/bench_pretrain.py --preset b/16 --batch 128 --zero-stage 0 1 2   # GPU: bf16 by default
    python bench/bench_pretrain.py --preset b/16 --batch 256 --compile            # GPU: MFU, compiled

On the GPU the plain loop uses bf16 autocast with fp32 weights (the usual PyTorch recipe), and so
does DeepSpeed with `precision: bf16` (its torch_autocast mode); `--precision bf16_full` times
DeepSpeed's bf16 weights with an fp32 master copy instead.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vit.train.config import PretrainConfig  # noqa: E402
from vit.train.distributed import World, device_for, init_process_group  # noqa: E402
from vit.train.engine import (Stepper, build_optimizer, create_engine, ds_config, input_dtype,  # noqa: E402
                        param_groups, resolve_precision)
from vit.models.vit import create_model  # noqa: E402
from vit.train.loop import peak_flops  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PlainLoop:
    """The reference: what a PyTorch user writes without DeepSpeed."""

    name = "plain"

    def __init__(self, model, cfg: PretrainConfig, device, precision: str):
        self.model = model.to(device).train()
        self.opt = build_optimizer(param_groups(self.model, cfg.optim), cfg.optim, device)
        if cfg.train.compile:
            self.model = torch.compile(self.model)
        self.clip = cfg.deepspeed.grad_clip
        self.dtype = {"bf16": torch.bfloat16, "bf16_full": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.device = device

    def step(self, x, y) -> None:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = F.cross_entropy(self.model(x).float(), y)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class DeepSpeedLoop:
    """The same step through vitpipe's engine (vit.train.engine.create_engine)."""

    def __init__(self, model, cfg: PretrainConfig, device, precision: str):
        self.name = f"deepspeed-zero{cfg.deepspeed.zero_stage}"
        model = model.to(device)
        opt = build_optimizer(param_groups(model, cfg.optim), cfg.optim, device)
        self.engine = create_engine(model, opt, ds_config(cfg, device=device), compile=cfg.train.compile)
        # vitpipe's clipping where it clips itself (ZeRO-0, fp32 weights), as `vitpipe pretrain` steps
        self.stepper = Stepper(self.engine, cfg, device)
        self.dtype = input_dtype(precision)  # bf16 autocasts inside the engine; bf16_full/fp16 want half inputs

    def step(self, x, y) -> None:
        x = x if self.dtype is None else x.to(self.dtype)
        loss = F.cross_entropy(self.engine(x).float(), y)
        self.stepper.backward_step(loss)


def time_rounds(loops, x, y, *, steps: int, warmup: int, rounds: int, device) -> dict[str, list[float]]:
    """Seconds per step of each loop, one value per round; the order flips every round."""
    for loop in loops:
        for _ in range(warmup):
            loop.step(x, y)
    _sync(device)
    times: dict[str, list[float]] = {loop.name: [] for loop in loops}
    for r in range(rounds):
        for loop in (loops if r % 2 == 0 else loops[::-1]):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                loop.step(x, y)
            _sync(device)
            times[loop.name].append((time.perf_counter() - t0) / steps)
    return times


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=None, help="model preset [default: ti/4 on CPU, b/16 on GPU]")
    p.add_argument("--image-size", type=int, default=None, help="[default: the preset's]")
    p.add_argument("--batch", type=int, default=None, help="images per step [default: 32 on CPU, 128 on GPU]")
    p.add_argument("--zero-stage", type=int, nargs="+", default=[0], help="ZeRO stages to time against plain")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "bf16_full", "fp16", "fp32"])
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per loop first")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds; the median round counts")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile both loops (train.compile for DeepSpeed); compiling happens in the warm-up")
    args = p.parse_args(argv)

    world = World()
    device = device_for(world)
    gpu = device.type == "cuda"
    preset = args.preset or ("b/16" if gpu else "ti/4")
    batch = args.batch or (128 if gpu else 32)
    precision = resolve_precision(args.precision, device)
    init_process_group(world, device)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(0)
    overrides = {"image_size": args.image_size} if args.image_size else {}
    base = create_model(preset, **overrides)
    size = base.cfg.image_size
    x = torch.randn(batch, base.cfg.in_chans, size, size, device=device)
    y = torch.randint(0, base.cfg.num_classes, (batch,), device=device)
    loops = [PlainLoop(copy.deepcopy(base), _cfg(batch, 0, precision, args.compile), device, precision)]
    for stage in args.zero_stage:
        loops.append(DeepSpeedLoop(copy.deepcopy(base), _cfg(batch, stage, precision, args.compile), device, precision))
    times = time_rounds(loops, x, y, steps=args.steps, warmup=args.warmup, rounds=args.rounds, device=device)

    flops = base.flops_per_image(training=True)
    peak = peak_flops(device, precision)
    plain = statistics.median(times["plain"])
    result = {"device": torch.cuda.get_device_name(device) if gpu else "cpu", "preset": preset,
              "image_size": size, "batch": batch, "precision": precision, "compile": args.compile,
              "rounds": args.rounds,
              "steps_per_round": args.steps, "loops": {}}
    for name, ts in times.items():
        t = statistics.median(ts)
        ips = batch / t
        row = {"step_ms": round(1000 * t, 2), "min_ms": round(1000 * min(ts), 2), "max_ms": round(1000 * max(ts), 2),
               "images_per_s": round(ips, 1),
               "ratio_vs_plain": round(t / plain, 3),
               "mfu": round(ips * flops / peak, 4) if peak else None}
        result["loops"][name] = row
        mfu = f", MFU {100 * row['mfu']:.1f}%" if row["mfu"] else ""
        print(f"{name:>16}: {row['step_ms']:9.2f} ms/step (rounds {row['min_ms']:.1f}-{row['max_ms']:.1f})  "
              f"{ips:9.1f} img/s  x{row['ratio_vs_plain']:.3f} "
              f"vs plain{mfu}", file=sys.stderr)
    print(json.dumps(result))
    return result


def _cfg(batch: int, stage: int, precision: str, compile: bool = False) -> PretrainConfig:
    return PretrainConfig(data={"shards": "synthetic", "batch_size": batch}, train={"compile": compile},
                          deepspeed={"zero_stage": stage, "precision": precision})


if __name__ == "__main__":
    main()
