"""Issue 18's GPU numbers in one run: the real input pipeline in the loop, shards on local disk -> loss.

Run through `bash bench/gpu_pretrain.sh` (it installs carried wheels first). On one H100/H200 it
takes under 8 minutes and prints, for ViT-B/16 at 224 in bf16:

  (a) end to end, `vitpipe pretrain` from shards of ~500 px JPEGs (generated here, noise and shapes),
      with data.decode cpu (Pillow in the DataLoader workers) and gpu (nvJPEG + crops on the device):
      images/s, MFU and the fraction of time the step waited for data (train/data_wait_frac);
  (b) vitpipe's DeepSpeed step over the plain PyTorch loop (same model, batch, AdamW, vitpipe's
      clipping), eager and compiled; goal <= 1.10;
  (c) the loaders alone (images/s: vitpipe cpu, vitpipe gpu, DALI where it is installed) against the
      step alone (compiled, synthetic batch on the device); goal: the GPU loader >= 1.5x the step.

Stages run in this order: loaders, end to end gpu, steps eager (with a channels_last variant),
end to end cpu, steps compiled, each only if it fits in what is left of --time-budget; a stage that would not fit is skipped
and says so. Progress goes to stderr; a table and one JSON line go to stdout at the end (and
results.json under --out).

    bash bench/gpu_pretrain.sh --quick        # 1-2 minutes on a GPU: every stage, tiny, checks it all works
    bash bench/gpu_pretrain.sh                # the measurement
    python bench/bench_gpu_pretrain.py --cpu-dry-run --work /tmp/w   # the same stages on the CPU, tiny (CI)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[gpu_pretrain {time.perf_counter() - T0:6.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass
class Plan:
    """Sizes of one mode of the benchmark."""

    device: str
    images: int            # JPEGs generated
    photo_size: int        # their nominal side (each side within +-25%)
    preset: str
    image_size: int
    batch: int
    precision: str
    loader_batches: int    # timed batches per loader (after 3 untimed)
    step_steps: int        # timed steps per round of the step benchmarks
    rounds: int
    compile: bool
    e2e_steps: int
    e2e_log_every: int
    cpu_workers: int       # DataLoader workers of the decode=cpu loader
    gpu_workers: int       # ... of the decode=gpu loader (they only read)
    budget_s: float


def plans(cpus: int) -> dict[str, Plan]:
    workers = max(1, cpus - 2)
    return {
        "full": Plan("cuda", 8000, 500, "b/16", 224, 256, "bf16", 20, 8, 3, True, 60, 20, workers, 6, 450),
        "quick": Plan("cuda", 768, 500, "s/16", 224, 64, "bf16", 3, 2, 1, False, 6, 3, workers, 4, 120),
        "cpu-dry-run": Plan("cpu", 48, 64, "micro/4", 16, 8, "fp32", 2, 1, 1, False, 2, 1, 1, 1, 900),
    }


# ---------------------------------------------------------------------------------------------
# Data


def _write_class(args: tuple) -> None:
    from pipeline.packaged_data import write_shapes

    root, kind, per_class, size, seed = args
    write_shapes(root, per_class=per_class, classes=(kind,), size=size, seed=seed, color=True, jitter=0.25,
                 fmt="jpg", quality=90)


def make_shards(work: Path, plan: Plan) -> tuple[Path, dict]:
    """~plan.images JPEGs in 10 classes, sharded by the real shard stage (bytes kept as they are)."""
    from pipeline.index import load_index
    from pipeline.packaged_data import SHAPE_CLASSES
    from pipeline.shard import ShardConfig, shard

    src, out = work / "photos", work / "shards"
    if not (out / "index.json").exists():
        per_class = max(2, plan.images // len(SHAPE_CLASSES))
        jobs = [(src, kind, per_class, plan.photo_size, i) for i, kind in enumerate(SHAPE_CLASSES)]
        with Pool(min(len(jobs), max(1, (os.cpu_count() or 1)))) as pool:
            pool.map(_write_class, jobs)
        shard(ShardConfig(src=str(src), out=str(out), val_ratio=0.02, max_samples_per_shard=max(8, plan.images // 32),
                          workers=min(4, os.cpu_count() or 1), overwrite=True))
    index = load_index(out)
    files = list(src.rglob("*.jpg"))
    facts = {"images": index["splits"]["train"]["num_samples"], "shards": len(index["splits"]["train"]["shards"]),
             "mean_jpeg_kb": round(sum(f.stat().st_size for f in files) / max(1, len(files)) / 1024, 1)}
    return out, facts


def data_config(shards: Path, plan: Plan, decode: str, **kw):
    from pipeline.loader import DataConfig

    workers = plan.cpu_workers if decode == "cpu" else plan.gpu_workers
    stats = IMAGENET if plan.image_size >= 64 else {"mean": [0.5], "std": [0.5]}
    return DataConfig(shards=str(shards), image_size=plan.image_size, batch_size=plan.batch, num_workers=workers,
                      decode=decode, shuffle_buffer=1000, **stats, **kw)


# ---------------------------------------------------------------------------------------------
# (c) the loaders alone


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_vitpipe_loader(shards: Path, plan: Plan, decode: str, device: torch.device) -> dict:
    """Images/s of make_train_loader, batches delivered on the device as the training loop takes them."""
    from pipeline.loader import make_train_loader

    loader = make_train_loader(data_config(shards, plan, decode), device=device)
    batches, epoch, n, t0 = iter(loader), 0, 0, None
    for i in range(3 + plan.loader_batches):
        if i == 3:
            _sync(device)
            t0 = time.perf_counter()
        try:
            x, _ = next(batches)
        except StopIteration:
            epoch += 1
            loader.set_epoch(epoch)
            batches = iter(loader)
            x, _ = next(batches)
        x = x.to(device, non_blocking=True)
        n += len(x) if i >= 3 else 0
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"images_per_s": round(n / seconds, 1), "workers": loader.cfg.num_workers, "kind": type(loader).__name__,
            **{k: v for k, v in loader.stats.items() if k in ("decode_failures", "decoded_on_cpu")}}


def time_dali_loader(shards: Path, plan: Plan, device: torch.device) -> dict:
    """Images/s of an NVIDIA DALI pipeline over the same tars (webdataset reader, decode with a random
    crop, resize, flip, normalise): the other candidate for the GPU path. Not part of vitpipe."""
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError as e:
        return {"skipped": f"DALI not installed ({e}); pip install nvidia-dali-cuda130"}
    from pipeline.index import load_index, shard_urls

    tars = shard_urls(load_index(shards), "train")
    gpu = device.type == "cuda"
    mean = [255 * m for m in IMAGENET["mean"]] if plan.image_size >= 64 else [127.5] * 3
    std = [255 * s for s in IMAGENET["std"]] if plan.image_size >= 64 else [127.5] * 3

    @pipeline_def(batch_size=plan.batch, num_threads=max(2, plan.cpu_workers), device_id=0 if gpu else None,
                  prefetch_queue_depth=2, seed=0)
    def pipe():
        jpg, cls = fn.readers.webdataset(paths=tars, ext=["jpg", "cls"], random_shuffle=True, initial_fill=1000,
                                         missing_component_behavior="skip", name="reader")
        img = fn.decoders.image_random_crop(jpg, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                            random_area=[0.35, 1.0], random_aspect_ratio=[3 / 4, 4 / 3])
        img = fn.resize(img, resize_x=plan.image_size, resize_y=plan.image_size)
        img = fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std,
                                       mirror=fn.random.coin_flip())
        return img, cls

    p = pipe()
    p.build()
    n, t0 = 0, None
    for i in range(3 + plan.loader_batches):
        if i == 3:
            t0 = time.perf_counter()
        images, _ = p.run()
        n += len(images) if i >= 3 else 0
    images.as_tensor()  # waits for the last batch
    import nvidia.dali

    return {"images_per_s": round(n / (time.perf_counter() - t0), 1), "threads": max(2, plan.cpu_workers),
            "version": nvidia.dali.__version__}


# ---------------------------------------------------------------------------------------------
# (b), (c) the step alone: plain PyTorch vs vitpipe's DeepSpeed engine, synthetic batch on the device


def _channels_last_loop(plain: type) -> type:
    class ChannelsLast(plain):
        """The plain loop with the patch conv (the model's only 4-D op) in channels_last: NHWC weight
        and batch, so cuDNN may pick its NHWC kernels. The batch is converted inside the step."""

        name = "plain-channels-last"

        def __init__(self, model, *a, **kw):
            super().__init__(model.to(memory_format=torch.channels_last), *a, **kw)

        def step(self, x, y) -> None:
            super().step(x.contiguous(memory_format=torch.channels_last), y)

    return ChannelsLast


def time_steps(plan: Plan, device: torch.device, *, compile: bool, channels_last: bool) -> dict:
    from bench_pretrain import DeepSpeedLoop, PlainLoop, _cfg, time_rounds
    from vit.models.vit import create_model
    from vit.train.loop import peak_flops

    torch.manual_seed(0)
    base = create_model(plan.preset, num_classes=10, image_size=plan.image_size)
    x = torch.randn(plan.batch, 3, plan.image_size, plan.image_size, device=device)
    y = torch.randint(0, 10, (plan.batch,), device=device)
    cfg = _cfg(plan.batch, 0, plan.precision, compile)
    loops = [PlainLoop(copy.deepcopy(base), cfg, device, plan.precision),
             DeepSpeedLoop(copy.deepcopy(base), cfg, device, plan.precision)]
    if channels_last:
        loops.append(_channels_last_loop(PlainLoop)(copy.deepcopy(base), cfg, device, plan.precision))
    warmup = 3 if compile else 2
    times = time_rounds(loops, x, y, steps=plan.step_steps, warmup=warmup, rounds=plan.rounds, device=device)
    peak = peak_flops(device, plan.precision)
    flops = base.flops_per_image(training=True)
    plain = statistics.median(times["plain"])
    out = {}
    for name, ts in times.items():
        t = statistics.median(ts)
        ips = plan.batch / t
        out[name] = {"step_ms": round(1000 * t, 2), "images_per_s": round(ips, 1), "ratio_vs_plain": round(t / plain, 3),
                     "mfu": round(ips * flops / peak, 4) if peak else None}
    del loops
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------
# (a) end to end: `vitpipe pretrain`, as a user runs it


def end_to_end(shards: Path, work: Path, plan: Plan, decode: str) -> dict:
    out = work / f"e2e-{decode}"
    cfg = data_config(shards, plan, decode)
    args = [sys.executable, "-m", "vitpipe.cli", "pretrain", "--model.preset", plan.preset,
            "--data.shards", str(shards), "--data.image-size", str(plan.image_size),
            "--data.batch-size", str(plan.batch), "--data.num-workers", str(cfg.num_workers),
            "--data.decode", decode, "--data.mean", *map(str, cfg.mean), "--data.std", *map(str, cfg.std),
            "--deepspeed.precision", plan.precision, "--train.compile", "true" if plan.compile else "false",
            "--train.steps", str(plan.e2e_steps), "--train.log-every", str(plan.e2e_log_every),
            "--train.eval-every", "0", "--schedule.warmup-steps", "1", "--checkpoint.every-steps", "0",
            "--no-tracking.enabled", "--no-resume", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True, cwd=work)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-15:]
        return {"error": f"exit {proc.returncode}", "stderr_tail": tail}
    r = json.loads((out / "results.json").read_text())
    return {"images_per_s": round(r["images_per_s"], 1), "mfu": r["mfu"] and round(r["mfu"], 4),
            "data_wait_frac": r.get("data_wait_frac") and round(r["data_wait_frac"], 3),
            "loss": [round(r["first_loss"], 4), round(r["final_loss"], 4)], "wall_s": round(time.perf_counter() - t0, 1),
            "window": f"last {plan.e2e_log_every} of {plan.e2e_steps} steps"}


# ---------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    import torchvision

    from pipeline.device_loader import device_decode_available

    env = {"torch": torch.__version__, "torchvision": torchvision.__version__, "cpus": os.cpu_count(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import deepspeed
        env["deepspeed"] = deepspeed.__version__
    except ImportError as e:
        env["deepspeed"] = f"missing ({e}); carry it: bash bench/gpu_wheels.sh"
    env["device_decode"] = device_decode_available(device) or "ok"
    try:
        import nvidia.dali
        env["dali"] = nvidia.dali.__version__
    except ImportError:
        env["dali"] = None
    return env


def _table(result: dict) -> str:
    lines = [f"ViT {result['plan']['preset']} {result['plan']['image_size']}px {result['plan']['precision']}, "
             f"batch {result['plan']['batch']}, {result['env']['device']} ({result['env']['date']})"]

    def row(name: str, r: dict | None, *keys: str) -> None:
        if r is None:
            return
        if "skipped" in r or "error" in r:
            lines.append(f"  {name:34s} {r.get('skipped') or r.get('error')}")
            return
        lines.append(f"  {name:34s} " + "  ".join(f"{k} {r[k]}" for k in keys if r.get(k) is not None))

    for decode in ("gpu", "cpu"):
        row(f"(a) end to end, decode {decode}", result["e2e"].get(decode), "images_per_s", "mfu", "data_wait_frac")
    for mode in ("eager", "compiled"):
        steps = result["steps"].get(mode) or {}
        if "skipped" in steps:
            row(f"(b) step, {mode}", steps)
        for name, r in steps.items() if "skipped" not in steps else ():
            row(f"(b) step {mode}: {name}", r, "step_ms", "images_per_s", "ratio_vs_plain", "mfu")
    for name, r in result["loaders"].items():
        row(f"(c) loader alone: {name}", r, "images_per_s")
    for k, v in result.get("ratios", {}).items():
        lines.append(f"  {k:34s} {v}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a 1-2 minute smoke run of every stage, tiny sizes (compile off)")
    mode.add_argument("--cpu-dry-run", action="store_true", help="every stage on the CPU, tiny (for CI)")
    p.add_argument("--work", default="/tmp/vitpipe-gpu-pretrain", help="scratch dir: photos, shards, runs")
    p.add_argument("--out", default=None, help="also write results.json here")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; stages past it are skipped")
    p.add_argument("--skip", nargs="*", default=[], choices=["loaders", "eager", "compiled", "e2e-gpu", "e2e-cpu", "dali"],
                   help="stages to leave out")
    args = p.parse_args(argv)
    plan = plans(os.cpu_count() or 1)["quick" if args.quick else "cpu-dry-run" if args.cpu_dry_run else "full"]
    budget = args.time_budget or plan.budget_s
    device = torch.device(plan.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU machine, or pass --cpu-dry-run")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    work = Path(args.work) / ("quick" if args.quick else "dry" if args.cpu_dry_run else "full")
    work.mkdir(parents=True, exist_ok=True)

    result: dict = {"plan": vars(plan), "env": environment(device), "loaders": {}, "steps": {}, "e2e": {}}
    log(f"environment: {result['env']}")
    shards, facts = make_shards(work, plan)
    result["data"] = facts
    log(f"data: {facts} in {work / 'shards'}")

    def fits(stage: str, need_s: float) -> bool:
        left = budget - (time.perf_counter() - T0)
        if stage in args.skip:
            return False
        if left < need_s:
            log(f"skipping {stage}: {left:.0f}s of the {budget:.0f}s budget left, it needs ~{need_s:.0f}s")
            return False
        return True

    scale = 1.0 if plan.compile else 0.5
    if fits("loaders", 20):
        for decode in ("cpu", "gpu"):
            result["loaders"][f"vitpipe decode {decode}"] = r = time_vitpipe_loader(shards, plan, decode, device)
            log(f"loader decode={decode}: {r}")
        if "dali" not in args.skip:
            result["loaders"]["dali"] = r = time_dali_loader(shards, plan, device)
            log(f"loader dali: {r}")
    if fits("e2e-gpu", 120 * scale):
        result["e2e"]["gpu"] = r = end_to_end(shards, work, plan, "gpu")
        log(f"end to end, decode gpu: {r}")
    from vit.train.distributed import World, init_process_group

    init_process_group(World(), device)  # one rank, for the engine in this process
    if fits("eager", 30 * scale):
        result["steps"]["eager"] = r = time_steps(plan, device, compile=False, channels_last=True)
        log(f"steps eager: {r}")
    if fits("e2e-cpu", 90 * scale):  # compiles from the inductor cache the gpu run filled
        result["e2e"]["cpu"] = r = end_to_end(shards, work, plan, "cpu")
        log(f"end to end, decode cpu: {r}")
    if plan.compile and fits("compiled", 120):
        result["steps"]["compiled"] = r = time_steps(plan, device, compile=True, channels_last=False)
        log(f"steps compiled: {r}")
    elif not plan.compile:
        result["steps"]["compiled"] = {"skipped": "compile is off in this mode"}

    step = (result["steps"].get("compiled") or {}).get("deepspeed-zero0") or (result["steps"].get("eager") or {}).get(
        "deepspeed-zero0")
    gpu_loader = result["loaders"].get("vitpipe decode gpu")
    if step and gpu_loader and "images_per_s" in step:
        result["ratios"] = {"gpu loader / step (goal >= 1.5)": round(gpu_loader["images_per_s"] / step["images_per_s"], 2)}
    result["wall_s"] = round(time.perf_counter() - T0, 1)
    print(_table(result), flush=True)
    print(json.dumps(result), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
