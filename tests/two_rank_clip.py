"""Run by tests/test_engine.py under torchrun with 2 ranks: vitpipe's own gradient clipping at ZeRO-0
(vit.train.engine.Stepper) must equal DeepSpeed's when each rank sees different data, i.e. it must clip
the gradients after DeepSpeed averaged them over the ranks, not each rank's own. Prints the largest
difference; exits non-zero on a mismatch."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from vit.train.config import PretrainConfig
from vit.train.distributed import World, destroy_process_group, init_process_group
from vit.train.engine import Stepper, build_optimizer, create_engine, ds_config, param_groups, set_lr
from vit.models.vit import create_model

CPU = torch.device("cpu")


def clip_config(precision: str) -> PretrainConfig:
    """ZeRO-0, accumulation 2, a clip low enough to act on every step."""
    return PretrainConfig(data={"shards": "s", "batch_size": 8},
                          deepspeed={"zero_stage": 0, "precision": precision, "grad_clip": 0.05, "grad_accum": 2})


def engine_pair(cfg: PretrainConfig):
    """Two engines around the same seeded micro ViT: `ours` as vitpipe builds it (DeepSpeed's clipping
    off, vitpipe's on), `theirs` with DeepSpeed clipping at the same max norm (the process group must
    exist)."""
    engines = []
    deepspeed_clips = ds_config(cfg, device=CPU) | {"gradient_clipping": cfg.deepspeed.grad_clip}
    for config in (ds_config(cfg, device=CPU), deepspeed_clips):
        torch.manual_seed(0)
        model = create_model("micro/4", num_classes=4, image_size=16)
        engine = create_engine(model, build_optimizer(param_groups(model, cfg.optim), cfg.optim, CPU), config)
        set_lr(engine, 1e-3)
        engines.append(engine)
    return engines


def main(precision: str) -> int:
    world = World.from_env()
    init_process_group(world, CPU)
    cfg = clip_config(precision)
    ours, theirs = engine_pair(cfg)
    stepper = Stepper(ours, cfg, CPU)
    assert stepper.own
    gen = torch.Generator().manual_seed(100 + world.rank)  # each rank its own data
    norms = []
    for _ in range(3):
        for _ in range(2):
            x, y = torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)
            stepper.backward_step(F.cross_entropy(ours(x).float(), y))
            loss = F.cross_entropy(theirs(x).float(), y)
            theirs.backward(loss)
            theirs.step()
        norms.append(stepper.grad_norm())
    diff = max((a - b).abs().max().item() for a, b in zip(ours.module.parameters(), theirs.module.parameters()))
    checksum = torch.tensor([sum(p.double().sum().item() for p in ours.module.parameters())])
    gathered = [torch.zeros(1, dtype=torch.double) for _ in range(world.world_size)]
    torch.distributed.all_gather(gathered, checksum.double())
    print(f"rank {world.rank}: max |ours - deepspeed| = {diff:.2e}, grad norms {norms}, "
          f"checksums {[g.item() for g in gathered]}", flush=True)
    destroy_process_group()
    same_on_ranks = all(torch.equal(g, gathered[0]) for g in gathered)
    return 0 if diff < 1e-5 and min(norms) > 0.05 and same_on_ranks else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
