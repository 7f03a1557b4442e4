"""Where DeepSpeed's step overhead goes: the plain loop against variants of the generated config.

One rank, ZeRO-0, bf16 (DeepSpeed torch_autocast over fp32 weights). "ds" is vitpipe's step as
`vitpipe pretrain` runs it (vitpipe clips the gradients itself at ZeRO-0); each other variant changes
one thing: DeepSpeed clipping instead ("ds-deepspeed-clip", what vitpipe did before), no clipping
at all, fp32 gradient communication, bigger buckets. The loops alternate in rounds as in
bench_pretrain.py. Prints ms/step and
the ratio to the plain PyTorch loop:

    python bench/bench_ds_variants.py                          # ViT-B/16 at 224, batch 128 (GPU)
    python bench/bench_ds_variants.py --preset micro/4 --batch 4   # a quick CPU check of the script
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_pretrain import PlainLoop, _cfg, time_rounds  # noqa: E402
from vit.train.distributed import World, device_for, init_process_group  # noqa: E402
from vit.train.engine import Stepper, build_optimizer, create_engine, ds_config, param_groups  # noqa: E402
from vit.models.vit import create_model  # noqa: E402


def _no_lower_precision_comm(c: dict) -> bool:
    c["torch_autocast"]["lower_precision_safe_modules"] = []
    return True


def _deepspeed_clipping(c: dict) -> bool:
    c["gradient_clipping"] = 1.0  # the config's grad_clip, applied by DeepSpeed instead of vitpipe
    return False


def _no_clipping(c: dict) -> bool:
    c["gradient_clipping"] = 0.0
    return False


def _big_buckets(c: dict) -> bool:
    c["zero_optimization"].update(reduce_bucket_size=int(5e8), allgather_bucket_size=int(5e8))
    return True


# name -> change to the generated config; returns whether vitpipe's own clipping (Stepper) stays on.
VARIANTS = {"ds": lambda c: True, "ds-deepspeed-clip": _deepspeed_clipping, "ds-no-clip": _no_clipping,
            "ds-fp32-comm": _no_lower_precision_comm, "ds-big-buckets": _big_buckets}


class VariantLoop:
    """vitpipe's engine and step (vit.train.engine.Stepper) with one change to its DeepSpeed config."""

    def __init__(self, name: str, model, batch: int, device):
        self.name = name
        cfg = _cfg(batch, 0, "bf16")
        assert cfg.deepspeed.grad_clip == 1.0
        model = model.to(device)
        config = ds_config(cfg, device=device)
        own_clip = VARIANTS[name](config)
        self.engine = create_engine(model, build_optimizer(param_groups(model, cfg.optim), cfg.optim, device), config)
        self.stepper = Stepper(self.engine, cfg, device)
        self.stepper.own = self.stepper.own and own_clip

    def step(self, x, y) -> None:
        loss = F.cross_entropy(self.engine(x).float(), y)
        self.stepper.backward_step(loss)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="b/16", help="model preset [default: b/16]")
    p.add_argument("--batch", type=int, default=128, help="images per step [default: 128]")
    p.add_argument("--steps", type=int, default=8, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median counts")
    args = p.parse_args()

    world = World()
    device = device_for(world)
    init_process_group(world, device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    base = create_model(args.preset)
    size = base.cfg.image_size
    x = torch.randn(args.batch, base.cfg.in_chans, size, size, device=device)
    y = torch.randint(0, base.cfg.num_classes, (args.batch,), device=device)
    loops = [PlainLoop(copy.deepcopy(base), _cfg(args.batch, 0, "bf16"), device, "bf16")]
    loops += [VariantLoop(name, copy.deepcopy(base), args.batch, device) for name in VARIANTS]
    times = time_rounds(loops, x, y, steps=args.steps, warmup=2, rounds=args.rounds, device=device)
    plain = statistics.median(times["plain"])
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:16s} {t * 1e3:8.2f} ms/step  x{t / plain:.3f} vs plain")


if __name__ == "__main__":
    main()
