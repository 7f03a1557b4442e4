"""MAE step time against a supervised step of the same encoder and batch (He et al. 2022: the
encoder sees 25% of the patches, so a step costs a fraction of a supervised one).

Both models start from the same encoder weights; one MAE step is masking (mask_ratio 0.75), the
encoder on the visible patches, the decoder (the preset's: 512 x 8 for b/16 and l/16) and the
masked MSE, forward and backward; one supervised step is the whole encoder plus a 1000-class head
and cross-entropy. Their steps alternate in one process (bench_model.time_interleaved). Prints
one line per device: the CPU, and the GPU when one exists. Ratio = median MAE step / median
supervised step; the goal of issue 16 is <= 0.40.

    python bench/bench_mae.py --preset l/16 --batch 2 --steps 4 --threads 1 --clock cpu   # CPU (+ GPU if present)
    python bench/bench_mae.py --preset b/16 --batch 4 --steps 6
    python bench/bench_mae.py --preset b/16 --no-cpu --gpu-batch 256                  # GPU only, bf16
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.bench_model import summarize, time_interleaved, train_step  # noqa: E402
from vit.models.mae import MaskedAutoencoder, decoder_for  # noqa: E402
from vit.models.vit import VisionTransformer, preset_config  # noqa: E402
from vit.objectives.mae import MAEObjective, MAESection  # noqa: E402


def build(preset: str, *, image_size: int | None, mask_ratio: float, decoder_depth: int | None,
          device: str) -> tuple[dict[str, torch.nn.Module], MAEObjective]:
    overrides = {"image_size": image_size} if image_size else {}
    torch.manual_seed(0)
    supervised = VisionTransformer(preset_config(preset, num_classes=1000, **overrides))
    encoder = copy.deepcopy(supervised)
    encoder.reset_classifier(0)
    mae = MaskedAutoencoder(encoder, decoder_for(preset, depth=decoder_depth), mask_ratio=mask_ratio)
    objective = MAEObjective(MAESection(mask_ratio=mask_ratio, decoder_depth=decoder_depth), preset=preset)
    return {"supervised": supervised.to(device).train(), "mae": mae.to(device).train()}, objective


def measure(args, device: str, batch: int, dtype_name: str) -> dict:
    dtype = {"fp32": None, "bf16": torch.bfloat16}[dtype_name]
    models, objective = build(args.preset, image_size=args.image_size, mask_ratio=args.mask_ratio,
                              decoder_depth=args.decoder_depth, device=device)
    cfg = models["supervised"].cfg
    x = torch.randn(batch, cfg.in_chans, cfg.image_size, cfg.image_size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    calls = iter(range(10**9))

    def step(model, x, y, dtype):
        if model is models["supervised"]:
            return train_step(model, x, y, dtype)
        autocast = torch.autocast(x.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with autocast:  # fresh masks every step, as in training
            loss = objective(model, x, y, seed=next(calls))["loss"]
        loss.backward()
        model.zero_grad(set_to_none=True)

    clock = time.process_time if args.clock == "cpu" and device == "cpu" else time.perf_counter
    times = time_interleaved(models, x, y, dtype=dtype, steps=args.steps, warmup=args.warmup, step=step, clock=clock)
    result = summarize(times, batch)
    ratio = result["mae"]["step_ms"] / result["supervised"]["step_ms"]
    paired = statistics.quantiles([a / b for a, b in zip(times["mae"], times["supervised"])], n=4) \
        if len(times["mae"]) > 1 else [ratio] * 3
    flops = models["mae"].flops_per_image(training=True) / models["supervised"].flops_per_image(training=True)
    dec = models["mae"].decoder_cfg
    where = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"{device:4s} mae/supervised step time: {ratio:.3f} (per-round quartiles {paired[0]:.3f} "
          f"{paired[1]:.3f} {paired[2]:.3f}; FLOP ratio {flops:.3f})  mae {result['mae']['step_ms']:.1f} ms, "
          f"supervised {result['supervised']['step_ms']:.1f} ms  [{args.preset} {cfg.image_size}px, decoder "
          f"{dec.embed_dim} x {dec.depth}, mask {args.mask_ratio}, batch {batch}, {dtype_name}, {where}, "
          f"{args.steps} interleaved steps, {'cpu' if clock is time.process_time else 'wall'} clock]", flush=True)
    if device.startswith("cuda"):
        del models
        torch.cuda.empty_cache()
    return {"device": device, "where": where, "preset": args.preset, "image_size": cfg.image_size,
            "decoder": [dec.embed_dim, dec.depth], "mask_ratio": args.mask_ratio, "batch": batch,
            "dtype": dtype_name, "ratio_mae_over_supervised": round(ratio, 4), "flop_ratio": round(flops, 4),
            "paired_ratio_quartiles": [round(q, 4) for q in paired], **result}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="l/16", help="encoder preset; the decoder is the preset's MAE default")
    p.add_argument("--image-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--decoder-depth", type=int, default=None, help="default: the preset's (8 for b/16, l/16)")
    p.add_argument("--batch", type=int, default=2, help="CPU batch")
    p.add_argument("--gpu-batch", type=int, default=128, help="GPU batch (bf16 autocast)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU line (GPU only)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="CPU line: cpu = this process's CPU time, which ignores time preempted by other jobs on a "
                        "shared machine (use with --threads 1); the GPU line is always wall clock")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = []
    if not args.no_cpu:
        lines.append(measure(args, "cpu", args.batch, "fp32"))
    if torch.cuda.is_available():
        args.steps, args.warmup = max(args.steps, 20), max(args.warmup, 3)
        lines.append(measure(args, "cuda", args.gpu_batch, "bf16"))
    elif args.no_cpu:
        print("no GPU here: nothing measured (drop --no-cpu for the CPU line)", file=sys.stderr)
        return 1
    print(json.dumps(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
