"""Forward+backward step time of vitpipe's ViT against timm's VisionTransformer of the same config.

Both models get the same weights, batch and precision; their steps alternate (A B, B A, ...) in one
process so that machine noise hits both alike. Prints one line per model and the ratio ours/timm
(< 1.0 = ours faster), then one JSON line.

    python bench/bench_model.py --preset ti/16 --batch 16 --steps 10                  # CPU
    python bench/bench_model.py --preset b/16 --batch 128 --device cuda --dtype bf16  # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vit.models.vit import VisionTransformer, preset_config  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_models(preset: str, *, image_size: int | None, depth: int | None, device: str,
                 with_timm: bool = True) -> dict[str, torch.nn.Module]:
    """Ours, and timm's with our weights copied in (if timm is importable and wanted)."""
    overrides = {k: v for k, v in {"image_size": image_size, "depth": depth}.items() if v}
    cfg = preset_config(preset, **overrides)
    torch.manual_seed(0)
    models: dict[str, torch.nn.Module] = {"ours": VisionTransformer(cfg)}
    if with_timm:
        try:
            from timm.models.vision_transformer import VisionTransformer as TimmViT

            from vit.models.weights import timm_model_kwargs, vitpipe_to_timm  # needs safetensors, as timm does
        except ImportError:
            print("timm is not importable: timing ours only", file=sys.stderr)
        else:
            theirs = TimmViT(**timm_model_kwargs(cfg))
            theirs.load_state_dict(vitpipe_to_timm(models["ours"].state_dict(), cfg))
            models["timm"] = theirs
    return {name: m.to(device).train() for name, m in models.items()}


def make_batch(model: torch.nn.Module, batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = model.cfg
    x = torch.randn(batch, cfg.in_chans, cfg.image_size, cfg.image_size, device=device)
    y = torch.randint(0, max(cfg.num_classes, 1), (batch,), device=device)
    return x, y


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None) -> None:
    """One forward+backward, as a training step runs it (autocast for bf16/fp16, master weights fp32)."""
    autocast = (torch.autocast(x.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext())
    with autocast:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(models: dict[str, torch.nn.Module], x: torch.Tensor, y: torch.Tensor, *,
                     dtype: torch.dtype | None, steps: int, warmup: int,
                     clock=time.perf_counter, step=None) -> dict[str, list[float]]:
    """Seconds per step of each model; the order flips every round so neither always runs first.
    `step(model, x, y, dtype)` is one training step (default: `train_step`, cross-entropy)."""
    step = step or train_step
    device = str(x.device)
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + steps):
        for name in names if i % 2 == 0 else reversed(names):
            _sync(device)
            start = clock()
            step(models[name], x, y, dtype)
            _sync(device)
            if i >= warmup:
                times[name].append(clock() - start)
    return times


def summarize(times: dict[str, list[float]], batch: int) -> dict[str, dict[str, float]]:
    return {name: {"step_ms": 1e3 * statistics.median(t), "images_per_s": batch / statistics.median(t)}
            for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="ti/16", help="model preset, e.g. ti/16, s/4, b/16")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--depth", type=int, default=None, help="fewer blocks for a quicker CPU run")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu = this process's CPU time: on a shared CPU machine it ignores time spent "
                        "preempted by other jobs (use with --threads 1); wall for GPUs")
    args = p.parse_args(argv)
    if args.clock == "cpu" and args.device != "cpu":
        p.error("--clock cpu measures CPU work; time GPU runs with --clock wall")
    if args.threads:
        torch.set_num_threads(args.threads)

    models = build_models(args.preset, image_size=args.image_size, depth=args.depth, device=args.device)
    if "timm" not in models:
        print("error: the comparison needs timm (pip install timm)", file=sys.stderr)
        return 1
    x, y = make_batch(models["ours"], args.batch, args.device)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = time_interleaved(models, x, y, dtype=DTYPES[args.dtype], steps=args.steps, warmup=args.warmup,
                             clock=clock)
    result = summarize(times, args.batch)
    for name, r in result.items():
        print(f"{name:5s} {r['step_ms']:9.1f} ms/step  {r['images_per_s']:9.1f} images/s")
    ratio = result["ours"]["step_ms"] / result["timm"]["step_ms"]
    # Each round's two steps ran back to back, so their ratio cancels slow drifts in machine load.
    paired = statistics.quantiles([a / b for a, b in zip(times["ours"], times["timm"])], n=4)
    cfg = models["ours"].cfg
    print(f"ours/timm step time: {ratio:.3f} (per-round ratios, quartiles: {paired[0]:.3f} {paired[1]:.3f} "
          f"{paired[2]:.3f})  [{args.preset} {cfg.image_size}px depth {cfg.depth}, batch {args.batch}, "
          f"{args.dtype}, {args.device}, {torch.get_num_threads()} threads, {args.steps} interleaved steps, "
          f"{args.clock} clock]")
    print(json.dumps({"preset": args.preset, "image_size": cfg.image_size, "depth": cfg.depth,
                      "batch": args.batch, "dtype": args.dtype, "device": args.device, "clock": args.clock,
                      "ratio_ours_over_timm": round(ratio, 4),
                      "paired_ratio_quartiles": [round(q, 4) for q in paired], **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
