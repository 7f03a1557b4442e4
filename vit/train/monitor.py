"""What a self-supervised run measures at each evaluation, for a person watching it in MLflow.

A supervised run reports val top-1 (vit.train.loop.evaluate). An MAE or MPP run has no labels to
score, so at each evaluation it reports, on every rank together:

- `val/loss`: the objective's loss on the whole val split, with masks fixed per val batch (the
  same at every evaluation, so the curve shows learning, not mask noise); MPP adds
  `val/mpp_accuracy` (mean colours predicted right);
- MAE: `reconstruction_stepNNNNNNNN.png`, the first `mae.reconstructions` val images as
  original / masked / reconstruction (rank 0 writes it; the loop logs it);
- `val/knn_top1`: k-NN top-1 of the encoder's frozen features (vit.evaluation.knn), the health
  metric self-supervised users watch, when labels are at hand: `--probe.shards` (a small labelled
  shard set), or else the training data's own train/val splits if they are labelled.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field, PositiveInt

from vitpipe.config import StageConfig

_EVAL_SALT = 0x5EEDE7A1  # val masks come from their own seeds, apart from the training steps'


class ProbeSection(StageConfig):
    """Online k-NN of a self-supervised run's encoder, at each evaluation (needs labelled images)."""

    enabled: bool = Field(True, description="measure it when labels are at hand (probe.shards, or labelled "
                                            "training data); each evaluation then reads the memory split once")
    shards: str | None = Field(None, description="a labelled shard set to measure on (e.g. a small one); empty = "
                                                 "the training data, when it has labels")
    memory_split: str = Field("train", description="split whose features are the k-NN memory")
    split: str = Field("val", description="split whose images query the memory")
    k: PositiveInt = Field(20, description="neighbours that vote (DINO uses 20)")
    temperature: float = Field(0.07, gt=0, description="softmax temperature of the similarity-weighted vote")


class SelfSupervisedEval:
    """Built once per run on every rank; `run(engine, step)` -> (metrics, files rank 0 wrote)."""

    def __init__(self, cfg, objective, eval_loader, *, labelled: bool, world, device: torch.device,
                 dtype: torch.dtype | None, out: Path) -> None:
        self.cfg, self.objective, self.eval_loader = cfg, objective, eval_loader
        self.world, self.device, self.dtype, self.out = world, device, dtype, Path(out)
        self.probe = self._probe_loaders(labelled)

    def close(self) -> None:
        """Stop the probe loaders' worker processes (the eval loader is the caller's)."""
        if self.probe is not None:
            for loader in self.probe[1:]:
                loader.close()

    def _probe_loaders(self, labelled: bool):
        from pipeline.loader import make_eval_loader

        probe: ProbeSection = getattr(self.cfg, "probe", None) or ProbeSection()
        if not probe.enabled or not (probe.shards or labelled):
            return None
        data = self.cfg.data if not probe.shards else self.cfg.data.model_copy(update={"shards": probe.shards})
        memory_split = probe.memory_split if probe.shards else self.cfg.data.train_split
        query_split = probe.split if probe.shards else self.cfg.data.val_split
        rank, size = self.world.rank, self.world.world_size
        memory = make_eval_loader(data, memory_split, rank=rank, world_size=size, device=self.device, dtype=self.dtype)
        queries = make_eval_loader(data, query_split, rank=rank, world_size=size, device=self.device, dtype=self.dtype)
        if not memory.num_classes:
            from vitpipe.errors import UserError

            raise UserError(f"probe.shards={probe.shards!r} has no class labels; the k-NN probe needs a labelled "
                            f"shard set (one sub-folder per class), or leave probe.shards empty")
        return probe, memory, queries

    @torch.no_grad()
    def run(self, engine, step: int) -> tuple[dict[str, float], list[Path]]:
        from vit.objectives import micro_batch_seed
        from vit.train import distributed as dist

        engine.eval()
        loss_sum, count, correct, predicted = 0.0, 0, 0.0, 0.0
        files: list[Path] = []
        for j, (images, targets, _keys) in enumerate(self.eval_loader):
            images = images.to(self.device, dtype=self.dtype)
            # Every rank runs every forward, even of an empty tail batch: ZeRO-3 gathers weights collectively.
            out = self.objective(engine, images, targets.to(self.device),
                                 seed=micro_batch_seed(self.cfg.train.seed ^ _EVAL_SALT, self.world.rank, j))
            b = images.shape[0]
            if b == 0:
                continue
            loss_sum += float(out["loss"]) * b
            count += b
            correct += float(out.get("correct", 0.0))
            predicted += float(out.get("predicted", 0.0))
            if j == 0 and self.world.is_main and "pred" in out:
                files += self._reconstruction_png(images, out, step, engine.module.vit.cfg.patch_size)
        loss_sum, count, correct, predicted = dist.all_reduce_sum([loss_sum, count, correct, predicted], self.device)
        metrics = {"val/loss": loss_sum / count, "val/samples": count} if count else {}
        if predicted:
            metrics["val/mpp_accuracy"] = correct / predicted
        metrics.update(self._knn(engine))
        return metrics, files

    def _reconstruction_png(self, images: torch.Tensor, out: dict[str, torch.Tensor], step: int,
                            patch: int) -> list[Path]:
        from vit.evaluation.plots import plot_reconstructions
        from vit.objectives.mae import reconstructions

        n = min(self.cfg.mae.reconstructions, images.shape[0]) if hasattr(self.cfg, "mae") else 0
        if n == 0:
            return []
        mean, std = self.cfg.data.channel_stats()
        original, masked, recon = reconstructions(images[:n], out["pred"][:n], out["mask"][:n], patch_size=patch,
                                                  norm_pix=self.cfg.mae.norm_pix_loss, mean=mean, std=std)
        path = self.out / "reconstructions" / f"reconstruction_step{step:08d}.png"
        ratio, norm_pix = self.cfg.mae.mask_ratio, self.cfg.mae.norm_pix_loss
        # With norm_pix_loss the model predicts each patch's pixels up to its mean and std, which the
        # picture borrows from the original (as MAE's own figures do): the title says so.
        title = f"MAE, step {step}" + ("\n* hidden patches at their original mean/std" if norm_pix else "")
        return [plot_reconstructions({"original": original.numpy(), f"masked {ratio:.0%}": masked.numpy(),
                                      "reconstruction*" if norm_pix else "reconstruction": recon.numpy()}, path,
                                     title=title)]

    def _knn(self, engine) -> dict[str, float]:
        if self.probe is None:
            return {}
        from vit.evaluation.knn import knn_evaluate
        from vit.train.engine import whole_parameters

        probe, memory, queries = self.probe
        vit = engine.module.vit
        with whole_parameters(vit, self.cfg.deepspeed.zero_stage):
            result = knn_evaluate(vit, memory, queries, num_classes=memory.num_classes, ks=[probe.k],
                                  temperature=probe.temperature, device=self.device)
        return {"val/knn_top1": result[f"knn_top1_k{probe.k}"]}

