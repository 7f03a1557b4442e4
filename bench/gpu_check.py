"""One-shot GPU check of the model: ours vs timm step time, images/s, MFU, attention kernel, compile.

Written for a single run on a lent H100/H200 (finishes in under 4 minutes, skips what would not fit
--time-budget). ViT-B/16 at 224, bf16 autocast, fp32 master weights, forward+backward steps
interleaved with timm's VisionTransformer of the same config and weights. Progress goes to stderr;
the last stdout line is one JSON object with every result.

    python bench/gpu_check.py                                   # the GPU run (defaults)
    python bench/gpu_check.py --device cpu --dtype fp32 --preset micro/4 --batch 4 --steps 2 --no-compile

MFU = flops_per_image(training=True) * images/s / peak dense bf16 FLOP/s of the GPU (vit.train.loop).
timm is optional: without it only our model is timed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from bench_model import DTYPES, build_models, make_batch, summarize, time_interleaved, train_step  # noqa: E402
from vit.train.loop import peak_flops as device_peak_flops  # noqa: E402


def peak_flops(device: str, dtype: str) -> float | None:
    """Peak dense FLOP/s of this device for bf16/fp16 matmuls (vit.train.loop.GPU_PEAK_FLOPS, the table
    `vitpipe pretrain` logs MFU with), or None where unknown (CPU, fp32, GPUs not in the table)."""
    if not device.startswith("cuda") or dtype == "fp32":
        return None
    return device_peak_flops(torch.device(device), "bf16")


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fit_batch(models: dict, batch: int, device: str, dtype) -> int:
    """The largest batch <= the requested one (halving) at which every model runs a step."""
    while True:
        try:
            x, y = make_batch(models["ours"], batch, device)
            for model in models.values():
                train_step(model, x, y, dtype)
            return batch
        except torch.cuda.OutOfMemoryError:
            if batch <= 8:
                raise
            log(f"out of memory at batch {batch}; trying {batch // 2}")
            torch.cuda.empty_cache()
            batch //= 2


def attention_kernels(model, x, y, dtype) -> dict:
    """Which SDPA implementation one eager step dispatches to, and whether forcing flash works."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=activities) as prof:
        train_step(model, x, y, dtype)
    ops = sorted({e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")})
    kernels = sorted({e.key for e in prof.key_averages()
                      if x.is_cuda and any(s in e.key.lower() for s in ("flash", "fmha", "attention"))
                      and not e.key.startswith("aten::")})
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            train_step(model, x, y, dtype)
        forced = True
    except RuntimeError as e:  # "No available kernel" when flash cannot take these inputs
        forced = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return {"sdpa_ops": ops, "attention_kernels": kernels[:6],
            "flash_used": any("flash" in op for op in ops), "flash_forced_ok": forced}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="b/16")
    p.add_argument("--image-size", type=int, default=None, help="default: the preset's (224 for b/16)")
    p.add_argument("--batch", type=int, default=256, help="halved automatically on out-of-memory")
    p.add_argument("--steps", type=int, default=20, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time torch.compile'd models if time allows")
    p.add_argument("--time-budget", type=float, default=200.0, help="seconds; later stages are skipped past it")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    dtype = DTYPES[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = True  # only fp32 leftovers (loss, norms) are affected under autocast
    torch.backends.cudnn.allow_tf32 = True

    result: dict = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
                    "torch": torch.__version__, "preset": args.preset, "dtype": args.dtype}
    try:
        import timm
        result["timm_version"] = timm.__version__
    except ImportError:
        result["timm_version"] = None
    models = build_models(args.preset, image_size=args.image_size, depth=None, device=args.device,
                          with_timm=result["timm_version"] is not None)
    ours = models["ours"]
    result.update(image_size=ours.cfg.image_size, params=ours.num_params(),
                  flops_per_image_train=ours.flops_per_image(training=True))
    log(f"built {', '.join(models)} ({ours.num_params() / 1e6:.1f}M params) in {time.perf_counter() - t0:.0f}s")

    batch = fit_batch(models, args.batch, args.device, dtype)
    x, y = make_batch(ours, batch, args.device)
    result["batch"] = batch
    result.update(attention_kernels(ours, x, y, dtype))
    log(f"batch {batch}; SDPA ops {result['sdpa_ops']}; forced flash: {result['flash_forced_ok']}")

    peak = peak_flops(args.device, args.dtype)
    result["peak_tflops"] = peak / 1e12 if peak else None

    def measure(ms: dict) -> dict:
        timed = summarize(time_interleaved(ms, x, y, dtype=dtype, steps=args.steps, warmup=args.warmup), batch)
        out = {name: {k: round(v, 2) for k, v in r.items()} for name, r in timed.items()}
        out["ratio_ours_over_timm"] = (round(timed["ours"]["step_ms"] / timed["timm"]["step_ms"], 4)
                                       if "timm" in timed else None)
        out["mfu"] = (round(result["flops_per_image_train"] * timed["ours"]["images_per_s"] / peak, 4)
                      if peak else None)
        return out

    eager = measure(models)
    result.update(ours=eager["ours"], timm=eager.get("timm"), ratio_ours_over_timm=eager["ratio_ours_over_timm"],
                  images_per_s=eager["ours"]["images_per_s"], mfu=eager["mfu"])
    log(f"eager: ours {eager['ours']['step_ms']} ms/step, {eager['ours']['images_per_s']} img/s, "
        f"MFU {eager['mfu']}, ours/timm {eager['ratio_ours_over_timm']}")

    result["compiled"] = None
    if args.compile:
        if time.perf_counter() - t0 > args.time_budget - 100:
            log("skipping torch.compile: not enough of the time budget left")
        else:
            compiled = {"ours": torch.compile(ours)}
            start = time.perf_counter()
            train_step(compiled["ours"], x, y, dtype)  # compile happens here
            log(f"compiled ours in {time.perf_counter() - start:.0f}s")
            if "timm" in models and time.perf_counter() - t0 < args.time_budget - 60:
                start = time.perf_counter()
                compiled["timm"] = torch.compile(models["timm"])
                train_step(compiled["timm"], x, y, dtype)
                log(f"compiled timm in {time.perf_counter() - start:.0f}s")
            result["compiled"] = measure(compiled)
            log(f"compiled: {result['compiled']}")

    if args.device.startswith("cuda"):
        result["max_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
