"""The training loop shared by pretraining and fine-tuning.

`run_training(cfg, stage, build)` does everything around the model: process group, loaders,
DeepSpeed engine, resume, steps with gradient accumulation and the lr schedule, periodic
evaluation, checkpoints, MLflow, progress bar, export. A stage supplies only `build`, which turns
the dataset's facts into the model to train (pretraining: a fresh ViT; fine-tuning: loaded weights
with a new head). Side effects happen on rank 0 only, here.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from vit.train import distributed as dist
from vit.train.checkpoint import RUN_RECORD, CheckpointManager, export_checkpoint, tag_for
from vit.train.config import TrainingConfig
from vit.train.engine import (Stepper, build_optimizer, create_engine, ds_config, input_dtype, lr_at, resolve_compile,
                        resolve_precision, set_lr)
from vit.objectives import build_objective, micro_batch_seed
from vit.tracking.lineage import log_training_inputs
from vit.tracking.tracker import (RunRecord, Stopped, Tracker, check_tracking, close_abandoned_run, describe_unlogged,
                                  flatten, git_commit, resolve_uri, tracked)
from vit.train.stopping import StopOnSignal
from vit.train.monitor import SelfSupervisedEval
from vitpipe.config import save_config
from vitpipe.errors import UserError

# Dense peak FLOP/s per device (bf16/fp16, fp32 via TF32) by GPU name, for MFU. Unknown = no MFU.
# Matched as substrings of torch's device name, first match wins: a name that contains another
# (GB200 contains B200, L40S contains L40 and L4) comes before it.
GPU_PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "GB200": (2500e12, 1250e12),
    "B200": (2250e12, 1100e12),
    "GH200": (989e12, 494e12),
    "H200": (989e12, 494e12),
    "H100 SXM": (989e12, 494e12),
    "H100 80GB HBM3": (989e12, 494e12),
    "H100 NVL": (835e12, 418e12),
    "H100 PCIe": (756e12, 378e12),
    "H100": (989e12, 494e12),
    "A100": (312e12, 156e12),
    "A800": (312e12, 156e12),
    "L40S": (362e12, 183e12),
    "L40": (181e12, 90.5e12),
    "L4": (121e12, 60e12),
    "A10G": (70e12, 35e12),
    "A10": (125e12, 62.5e12),
    "RTX 4090": (165e12, 82.6e12),
    "V100": (125e12, 15.7e12),
}


def peak_flops_by_name(name: str, precision: str) -> float | None:
    """Peak dense FLOP/s of the GPU called `name` (as torch reports it) at `precision`; None if unknown."""
    for key, (half, single) in GPU_PEAK_FLOPS.items():
        if key in name:
            return single if precision == "fp32" else half
    return None


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak dense FLOP/s of one device at `precision`, when the GPU is in the table; else None."""
    if device.type != "cuda":
        return None
    return peak_flops_by_name(torch.cuda.get_device_name(device), precision)


@dataclass
class Model:
    """What a stage builds for the loop: the module to train and how to export it."""

    module: nn.Module                  # what DeepSpeed wraps (the ViT, or a wrapper around it)
    param_groups: list[dict[str, Any]]  # from vit.train.engine.param_groups
    model_config: dict[str, Any]       # ViTConfig.to_dict() of the exported model
    flops_per_image: int               # forward+backward matmul FLOPs, for MFU
    export_prefix: str = ""            # key prefix of the ViT inside `module`
    params: dict[str, Any] = field(default_factory=dict)  # extra MLflow params (e.g. init source)


@dataclass
class _Log:
    """Running sums between two log lines (local to this rank until reduced)."""

    loss_sum: float | torch.Tensor = 0.0
    count: int = 0
    data_s: float = 0.0  # waiting for (or, data.decode gpu, decoding) batches
    steps: int = 0
    t0: float = field(default_factory=time.perf_counter)


def _say(world: dist.World, msg: str) -> None:
    if world.is_main:
        print(msg, file=sys.stderr, flush=True)


def close_job_run(cfg: TrainingConfig, status: int, signum: int | None = None, *,
                  stopped: bool | None = None) -> None:
    """For the process that launched a job's ranks, once they are gone: close the job's MLflow run if
    it is still RUNNING (rank 0 was SIGKILLed, or died with its node): KILLED when the launch was
    stopped by a signal (or its ranks were: exit 128 + SIGTERM/SIGINT/SIGHUP; `stopped` says so
    where the caller knows better), else FAILED."""
    if status == 0 and not signum:
        return
    if stopped is None:
        stopped = bool(signum) or status - 128 in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    how = "KILLED" if stopped else "FAILED"
    closed = close_abandoned_run(Path(cfg.checkpoint.dir or Path(cfg.out) / "checkpoints") / RUN_RECORD, how)
    if closed:
        print(f"MLflow run {closed} closed as {how}: the ranks ended without closing it", file=sys.stderr)


def launch_ranks(args, cfg: TrainingConfig, preflight: Callable[[TrainingConfig], None]) -> None:
    """`vitpipe pretrain|finetune ... --nproc N`: check the inputs once, start the ranks under the
    launcher and exit with their status when the options ask for several processes; else return.

    Once the ranks are gone, this process closes the job's MLflow run if it is still RUNNING (rank
    0 was SIGKILLed, or died with its node): KILLED when this process was stopped, else FAILED."""
    from vit.train.launch import maybe_relaunch

    def checks() -> None:
        preflight(cfg)
        check_tracking(cfg.tracking)  # tracking.fail_fast: one line here, not one per rank under torchrun's

    def on_exit(status: int, signum: int | None) -> None:
        close_job_run(cfg, status, signum)

    # torchrun's wait between SIGTERM and SIGKILL to its ranks: long enough for their checkpoint.
    env = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(int(cfg.checkpoint.stop_timeout_s) + 15)}
    maybe_relaunch(args, preflight=checks, on_exit=on_exit, env=env)


def run_training(cfg: TrainingConfig, *, stage: str, build: Callable[[Any], Model]) -> dict[str, Any]:
    """Train `build(train_loader)` as configured; every rank calls it. Returns the results dict.

    SIGTERM/SIGINT/SIGHUP stop it at the next step with a checkpoint (vit.train.stopping): it then
    raises `Stopped` (a SystemExit of 128 + the signal) and its MLflow run ends KILLED."""
    from vit.train.launch import note_error

    world = dist.World.from_env()
    with StopOnSignal(timeout_s=cfg.checkpoint.stop_timeout_s, say=lambda m: _say(world, m)) as stop:
        try:
            return _run_training(cfg, stage=stage, build=build, world=world, stop=stop)
        except UserError as e:
            if world.is_main:
                note_error(f"vitpipe {stage}: error: {e}")
            raise


def _run_training(cfg: TrainingConfig, *, stage: str, build: Callable[[Any], Model], world: dist.World,
                  stop: StopOnSignal) -> dict[str, Any]:
    # The loaders' worker processes stop when the stage ends, however it ends, not when the
    # loaders are freed: a process that runs stage after stage (a Prefect worker) keeps none.
    with contextlib.ExitStack() as loaders:
        return _train(cfg, stage=stage, build=build, world=world, stop=stop, loaders=loaders)


def _train(cfg: TrainingConfig, *, stage: str, build: Callable[[Any], Model], world: dist.World,
           stop: StopOnSignal, loaders: contextlib.ExitStack) -> dict[str, Any]:
    from pipeline.loader import make_eval_loader, make_train_loader

    device = dist.device_for(world)
    ds = ds_config(cfg, device=device)  # bad DeepSpeed keys fail here, before anything is built
    precision = resolve_precision(cfg.deepspeed.precision, device)
    out = Path(cfg.out)
    ckpt_root = Path(cfg.checkpoint.dir or out / "checkpoints")
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.train.seed)  # same init on every rank

    objective = build_objective(cfg)
    dist.init_process_group(world, device)
    # data.decode gpu/auto: batches are decoded on `device` and arrive there in the step's input dtype
    train_loader = loaders.enter_context(make_train_loader(
        cfg.data, rank=world.rank, world_size=world.world_size, seed=cfg.train.seed, device=device,
        dtype=input_dtype(precision)))
    if objective.needs_labels and not train_loader.num_classes:
        raise UserError(f"data.shards={cfg.data.shards!r} has no class labels; {stage} trains a classifier and "
                        f"needs a labelled collection (shard a folder tree with one sub-folder per class)"
                        + ("; to pretrain on unlabelled images pass --train.objective mae" if stage == "pretrain"
                           else ""))
    eval_loader = loaders.enter_context(make_eval_loader(
        cfg.data, cfg.data.val_split, rank=world.rank, world_size=world.world_size, device=device,
        dtype=input_dtype(precision)))
    built = build(train_loader)
    module = built.module
    if cfg.train.activation_checkpointing:
        vit = getattr(module, "vit", module)
        vit.set_grad_checkpointing(True)
    module.to(device)

    accum = cfg.deepspeed.grad_accum
    steps_per_epoch = max(1, train_loader.steps_per_epoch // accum)
    total_steps = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    global_batch = cfg.data.batch_size * accum * world.world_size
    if cfg.schedule.warmup_steps >= total_steps > 1:
        _say(world, f"{stage}: schedule.warmup_steps={cfg.schedule.warmup_steps} is not below the {total_steps} "
                    f"steps of this run: warming up over {total_steps - 1} and never decaying; lower it")

    ckpt = CheckpointManager(ckpt_root, world, keep_last=cfg.checkpoint.keep_last)
    ckpt.remove_stale_files()  # what a writer killed mid-write left
    step, epoch, history, run_id, window = 0, 0, [], None, None
    if not cfg.checkpoint.resume and ckpt.tags():
        _say(world, f"{stage}: starting over (--no-resume): deleting the checkpoints in {ckpt_root}")
        ckpt.clear()
    tag = ckpt.latest_complete(warn=lambda m: _say(world, m)) if cfg.checkpoint.resume else None
    if tag is not None:
        _check_same_model(ckpt.marker(tag), built.model_config, cfg, where=ckpt_root / tag)
    if tag is not None and ckpt.prepare_resize(tag, zero_stage=cfg.deepspeed.zero_stage,
                                               say=lambda m: _say(world, f"{stage}: {m}")):
        ds = {**ds, "checkpoint": {**ds.get("checkpoint", {}), "load_universal": True}}

    optimizer = build_optimizer(built.param_groups, cfg.optim, device)
    engine = create_engine(module, optimizer, ds, compile=resolve_compile(cfg.train.compile, device))
    ssl_eval = None if objective.needs_labels else SelfSupervisedEval(
        cfg, objective, eval_loader, labelled=train_loader.num_classes > 0, world=world, device=device,
        dtype=input_dtype(precision), out=out)
    if ssl_eval is not None:
        loaders.callback(ssl_eval.close)

    if tag is not None:
        meta, rank_state = ckpt.load(engine, tag)
        step, epoch, history, run_id = meta["step"], meta["epoch"], meta.get("history", []), meta.get("run_id")
        _warn_batch_change(world, meta.get("config"), ckpt.written_by(tag), global_batch, cfg, stage)
        train_loader.set_epoch(epoch)
        train_loader.load_state_dict(rank_state["loader"])
        window = rank_state.get("log_window")  # saved mid-window (a stop): its steps count in the next line
        _say(world, f"{stage}: resumed from {ckpt_root / tag} (step {step}/{total_steps})")
    else:
        train_loader.set_epoch(epoch)
    record = ckpt_root / RUN_RECORD
    if run_id is None and cfg.checkpoint.resume:  # killed before its first checkpoint: the same run goes on
        run_id = (RunRecord(record).read() or {}).get("run_id")

    if world.is_main:
        save_config(cfg, out / "config.yaml")
        (out / "ds_config.json").write_text(json.dumps(ds, indent=2) + "\n")  # what DeepSpeed was given
    params = {**flatten(cfg.model_dump(mode="json")), **{f"derived.{k}": v for k, v in {
        "world_size": world.world_size, "global_batch": global_batch, "total_steps": total_steps,
        "precision": precision, "num_params": sum(p.numel() for p in module.parameters()),
        "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "num_classes": train_loader.num_classes}.items()}, **built.params}
    tags = {"vitpipe.stage": stage, "vitpipe.world_size": str(world.world_size),
            "vitpipe.num_nodes": str(world.num_nodes), "mlflow.source.git.commit": git_commit() or "unknown"}
    tracker = Tracker.open(cfg.tracking, is_main=world.is_main, params=params, tags=tags,
                           resume_run_id=run_id, record=record, warn=lambda m: _say(world, m))
    stop.on_expire = lambda: tracker.end("KILLED", timeout_s=2)
    log_training_inputs(tracker, cfg)  # its shard set and digest, however the run was launched
    peak = peak_flops(device, precision)

    with tracked(tracker):
        with stop.deferred():
            results = _loop(cfg, engine=engine, objective=objective, train_loader=train_loader,
                            eval_loader=eval_loader, world=world, device=device, ckpt=ckpt, tracker=tracker,
                            built=built, step=step, epoch=epoch, history=history, total_steps=total_steps,
                            steps_per_epoch=steps_per_epoch, global_batch=global_batch, peak=peak, stage=stage,
                            resumed_from=tag, stop=stop, window=window, ssl_eval=ssl_eval)
        check_data(world, cfg, train_loader, eval_loader)
        export_dir = out / "export"
        final_tag = tag_for(results["step"])
        if world.is_main:
            export_checkpoint(ckpt_root, final_tag, export_dir, model_config=built.model_config,
                              zero_stage=cfg.deepspeed.zero_stage, prefix=built.export_prefix,
                              class_names=list(train_loader.class_names))
            save_config(cfg, export_dir / "train_config.yaml")
            plot = _plot_history(results["history"], out / "loss_curve.png")
            tracker.log_artifacts(export_dir, "model")
            if plot:
                tracker.log_artifact(plot)
            tracker.log_artifact(out / "config.yaml")
            tracker.log_artifact(out / "ds_config.json")
        evaluation = _final_evaluation(cfg, module, eval_loader, train_loader.class_names, world, device, out,
                                       tracker, results["step"]) if objective.needs_labels else {}
        damage = check_data(world, cfg, train_loader, eval_loader)
        if world.is_main and (damage["data/damaged_shards"] or damage["data/skipped_samples"]):
            tracker.log_metrics({k: v for k, v in damage.items() if k.startswith("data/")}, results["step"])
            (out / "data_problems.json").write_text(json.dumps(damage["data_problems"], indent=2) + "\n")
            tracker.log_artifact(out / "data_problems.json")
        dist.barrier()
        results.update(evaluation)
        results.update(damage)
        results.update(export=str(export_dir), checkpoint_dir=str(ckpt_root), run_id=tracker.run_id,
                       tracking_uri=resolve_uri(cfg.tracking) if tracker.active else None,
                       world_size=world.world_size, stage=stage)
        results.pop("history")
        if world.is_main:
            unlogged = tracker.flush()  # the server may have gone away: say what it lacks, do not claim the run
            if unlogged:
                results["tracking_unlogged"] = unlogged
                _say(world, f"{stage}: MLflow run {tracker.run_id} is incomplete: "
                            f"{describe_unlogged(unlogged, tracker.uri)}")
            (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            _say(world, _summary(results))
    return results


def _local_damage(*loaders) -> int:
    """Damaged shards plus samples that failed to decode, seen by this rank's loaders so far."""
    return sum(len(x.report.truncated) + len(x.report.failed_keys) for x in loaders if x is not None)


def check_data(world: dist.World, cfg: TrainingConfig, *loaders) -> dict[str, Any]:
    """Collective: the bad data every rank's loaders met so far, merged (damaged shards by name,
    distinct samples that failed to decode); with `strict_data` and any of it, every rank stops
    here (rank 0 with one line)."""
    mine = {"shards": {}, "skipped": set(), "filled": 0, "samples": []}
    for loader in loaders:
        if loader is not None:
            mine["shards"].update(loader.report.truncated)
            mine["skipped"] |= loader.report.failed_keys
            mine["filled"] += loader.report.filled
            mine["samples"] += loader.report.failed[:20]
    shards, skipped, filled, samples = {}, set(), 0, []
    for theirs in dist.gather_objects(mine):
        shards.update(theirs["shards"])
        skipped |= theirs["skipped"]
        filled += theirs["filled"]
        samples += theirs["samples"]
    damage = {"data/damaged_shards": len(shards), "data/skipped_samples": len(skipped),
              "data/refilled_slots": filled,
              "data_problems": {"damaged_shards": dict(sorted(shards.items())), "skipped_samples": samples[:20]}}
    if cfg.strict_data and (shards or skipped):
        what = [f"shard {name} {why}" for name, why in sorted(shards.items())[:2]]
        if skipped:
            first = samples[0] if samples else None
            example = f" (e.g. {first['key']!r} of {first['shard']}: {first['detail']})" if first else ""
            what.append(f"{len(skipped)} samples failed to decode{example}")
        more = f" and {len(shards) - 2} more damaged shards" if len(shards) > 2 else ""
        dist.raise_on_rank0(world, UserError(
            f"--strict-data: damaged data in {cfg.data.shards}: {'; '.join(what)}{more}; check it with 'vitpipe "
            f"verify {cfg.data.shards}' and re-shard, or drop --strict-data to skip and count what is damaged"))
    return damage


def _check_same_model(saved: dict, model_config: dict, cfg: TrainingConfig, *, where: Path) -> None:
    """Refuse to resume a checkpoint of another model (architecture, classes, image size, what is
    trained, ZeRO layout) in one line, rather than fail inside DeepSpeed's state loading."""
    now = {**json.loads(json.dumps(model_config, default=str)), "zero_stage": cfg.deepspeed.zero_stage,
           "mode": getattr(cfg, "mode", None)}
    before = {**(saved.get("model_config") or {}), "zero_stage": saved.get("zero_stage"),
              "mode": (saved.get("config") or {}).get("mode")}
    now.update(_objective_shape(cfg.model_dump(mode="json")))
    before.update(_objective_shape(saved.get("config") or {}))
    regularizers = {"drop_rate", "attn_drop_rate", "drop_path_rate", "head_drop_rate"}  # same weights: may change
    diff = [f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now) - regularizers)
            if before.get(k) != now.get(k) and before.get(k) is not None]
    if diff:
        raise UserError(f"checkpoint {where} is of another run ({'; '.join(diff[:4])}"
                        f"{'; ...' if len(diff) > 4 else ''}); to resume, use the settings it was saved with; "
                        f"otherwise start over with --no-resume or pick another --out")


def _objective_shape(config: dict) -> dict:
    """What of a run's objective fixes the trained weights beyond the ViT: its name, MAE's decoder."""
    objective = (config.get("train") or {}).get("objective")
    out = {"objective": objective}
    if objective == "mae":
        from vit.models.mae import decoder_for

        m = config.get("mae") or {}
        dec = decoder_for((config.get("model") or {}).get("preset", ""), embed_dim=m.get("decoder_dim"),
                          depth=m.get("decoder_depth"), num_heads=m.get("decoder_heads"))
        out["mae decoder (dim x depth, heads)"] = f"{dec.embed_dim} x {dec.depth}, {dec.num_heads}"
    return out


def _warn_batch_change(world: dist.World, saved: dict | None, saved_ranks: int, now: int, cfg: TrainingConfig,
                       stage: str) -> None:
    """Say so when a resumed run's global batch differs from the one it was saved with (`now`)."""
    try:
        before = saved["data"]["batch_size"] * saved["deepspeed"]["grad_accum"] * saved_ranks
    except (KeyError, TypeError):
        return
    per_step = cfg.data.batch_size * world.world_size  # images per rank-step, before accumulation
    if before != now:
        keep = (f"; --deepspeed.grad-accum {before // per_step} keeps it" if before % per_step == 0 else "")
        _say(world, f"{stage}: the global batch changed from {before} to {now} images per step (ranks, batch size "
                    f"or grad_accum differ from the saved run); the learning-rate schedule continues by step{keep}")


def _loop(cfg: TrainingConfig, *, engine, objective, train_loader, eval_loader, world: dist.World,
          device: torch.device, ckpt: CheckpointManager, tracker: Tracker, built: Model, step: int, epoch: int,
          history: list, total_steps: int, steps_per_epoch: int, global_batch: int, peak: float | None,
          stage: str, resumed_from: str | None, stop: StopOnSignal, window: dict | None = None,
          ssl_eval=None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    t_cfg = cfg.train
    accum = cfg.deepspeed.grad_accum
    in_dtype = input_dtype(resolve_precision(cfg.deepspeed.precision, device))
    start_step = step
    first_loss = history[0][1] if history else None
    last = {"train/loss": None}
    val: dict[str, float] = {}
    log = _Log(loss_sum=window["loss_sum"], count=window["count"]) if window else _Log()
    t_start = time.perf_counter()
    bar = tqdm(total=total_steps, initial=step, disable=not world.is_main, unit="step", dynamic_ncols=True,
               desc=stage, file=sys.stderr)
    batches = iter(train_loader)
    stepper = Stepper(engine, cfg, device)
    engine.train()
    while step < total_steps:
        set_lr(engine, lr_at(step, total_steps=total_steps, peak=cfg.optim.lr, schedule=cfg.schedule))
        logged = (step + 1) % t_cfg.log_every == 0 or step + 1 == total_steps  # measure the grad norm
        for micro in range(accum):
            t_data = time.perf_counter()
            try:
                images, targets = next(batches)
            except StopIteration:
                epoch += 1
                train_loader.set_epoch(epoch)
                batches = iter(train_loader)
                images, targets = next(batches)
            log.data_s += time.perf_counter() - t_data
            images = images.to(device, dtype=in_dtype, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            seed = micro_batch_seed(t_cfg.seed, world.rank, step * accum + micro)  # same masks after a resume
            loss = objective(engine, images, targets, seed=seed)["loss"]
            stepper.backward_step(loss, measure=logged)  # the optimizer runs at the accumulation boundary
            log.loss_sum += loss.detach().float()  # stays on the device: no host sync per step
            log.count += 1
        step += 1
        log.steps += 1
        bar.update(1)

        if step % t_cfg.log_every == 0 or step == total_steps:
            loss_sum, count, damaged = dist.all_reduce_sum(
                [float(log.loss_sum), log.count, _local_damage(train_loader, eval_loader)], device)
            if damaged and cfg.strict_data:  # the same sum on every rank: all stop here
                check_data(world, cfg, train_loader, eval_loader)
            elapsed = time.perf_counter() - log.t0
            ips = log.steps * global_batch / max(elapsed, 1e-9)
            mean_loss = loss_sum / max(count, 1)
            first_loss = mean_loss if first_loss is None else first_loss
            metrics = {"train/loss": mean_loss, "train/lr": engine.optimizer.param_groups[-1]["lr"],
                       "train/images_per_s": ips, "train/epoch": step / steps_per_epoch,
                       # near 0: the step is the bottleneck; near 1: the input pipeline is (this rank)
                       "train/data_wait_frac": log.data_s / max(elapsed, 1e-9)}
            grad_norm = stepper.grad_norm()
            if grad_norm is not None:
                metrics["train/grad_norm"] = float(grad_norm)
            if peak:
                metrics["train/mfu"] = ips * built.flops_per_image / (peak * world.world_size)
            tracker.log_metrics(metrics, step)
            history.append((step, mean_loss))
            last = metrics
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{ips:.0f}", refresh=False)
            log = _Log()

        if t_cfg.eval_every and step % t_cfg.eval_every == 0 and step < total_steps:
            val = _evaluate(engine, eval_loader, device, in_dtype, ssl_eval, step, tracker)
            engine.train()
        save_now = step == total_steps or (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0)
        signum = stop.poll()  # collective: every rank stops at the same step, or none
        if save_now or signum:
            meta = {"step": step, "epoch": epoch, "history": history, "run_id": tracker.run_id,
                    "stage": stage, "zero_stage": cfg.deepspeed.zero_stage, "model_config": built.model_config,
                    "config": cfg.model_dump(mode="json")}
            ckpt.save(engine, step=step, meta=meta, rank_state={
                "loader": train_loader.state_dict(),
                "log_window": {"loss_sum": float(log.loss_sum), "count": log.count}})
        if signum:
            bar.close()
            name = signal.Signals(signum).name
            _say(world, f"{stage}: stopped by {name} at step {step}/{total_steps}, checkpoint "
                        f"{ckpt.root / tag_for(step)} saved; run the same command again to resume")
            raise Stopped(signum, f"stopped by {name} at step {step}")
    bar.close()
    val = _evaluate(engine, eval_loader, device, in_dtype, ssl_eval, step, tracker)
    trained = step - start_step
    seconds = time.perf_counter() - t_start
    return {"step": step, "steps_this_launch": trained, "seconds": round(seconds, 3),
            "first_loss": first_loss, "final_loss": last.get("train/loss"),
            "images_per_s": last.get("train/images_per_s"), "mfu": last.get("train/mfu"),
            "data_wait_frac": last.get("train/data_wait_frac"),
            "resumed_from": resumed_from, **val, "history": history}


def _final_evaluation(cfg: TrainingConfig, module: nn.Module, eval_loader, class_names: list[str],
                      world: dist.World, device: torch.device, out: Path, tracker: Tracker,
                      step: int) -> dict[str, Any]:
    """The evaluation stage's full report on the val split, logged into this training run.

    Per-class precision/recall/F1, top-5 and the confusion matrix (PNG + JSON) land in
    OUT/evaluation and in the run's artifacts under evaluation/<split>, next to the loss curve.
    """
    if eval_loader is None:
        return {}
    from vit.evaluate import evaluate_model, scalar_metrics

    split = cfg.data.val_split
    full = evaluate_model(module, eval_loader, class_names=class_names, device=device,
                          world_size=world.world_size, out_dir=out / "evaluation", split=split, progress=False)
    if world.is_main:
        # top-1 and loss at this step are already in the run's history (the loop's own final eval)
        extra = {k: v for k, v in scalar_metrics(full, f"{split}/").items()
                 if k not in (f"{split}/top1", f"{split}/loss", f"{split}/samples")}
        tracker.log_metrics(extra, step)
        for path in (full.get("artifacts") or {}).values():
            tracker.log_artifact(path, f"evaluation/{split}")
    return {f"{split}/{k}": v for k, v in scalar_metrics(full).items()
            if k in ("top5", "macro_f1")}


def _evaluate(engine, eval_loader, device: torch.device, dtype: torch.dtype | None, ssl_eval, step: int,
              tracker: Tracker) -> dict[str, float]:
    """The periodic evaluation: top-1 and loss, or a self-supervised run's own (vit.train.monitor)."""
    files = []
    if ssl_eval is None:
        val = evaluate(engine, eval_loader, device, dtype=dtype)
    else:
        val, files = ssl_eval.run(engine, step)
    tracker.log_metrics(val, step)
    for path in files:
        tracker.log_artifact(path, "reconstructions")
    return val


@torch.no_grad()
def evaluate(engine, eval_loader, device: torch.device, *, dtype: torch.dtype | None = None) -> dict[str, float]:
    """Top-1 and loss on the whole split, every sample counted once over all ranks."""
    if eval_loader is None:
        return {}
    engine.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for images, targets, _keys in eval_loader:
        images, targets = images.to(device, dtype=dtype), targets.to(device)
        logits = engine(images).float()
        loss_sum += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(-1) == targets).sum().item()
        count += targets.numel()
    loss_sum, correct, count = dist.all_reduce_sum([loss_sum, correct, count], device)
    if count == 0:
        return {}
    return {"val/loss": loss_sum / count, "val/top1": correct / count, "val/samples": count}


def _plot_history(history: list, path: Path) -> Path | None:
    if not history:
        return None
    from vit.evaluation.plots import plot_curves

    return plot_curves({"train/loss": [(int(s), float(v)) for s, v in history]}, path, title="Training loss")


def _summary(r: dict[str, Any]) -> str:
    parts = [f"{r['stage']}: {r['steps_this_launch']} steps in {r['seconds']:.0f}s (to step {r['step']})"]
    if r.get("first_loss") is not None and r.get("final_loss") is not None:
        # one logging window (steps <= log_every) gives one number, not a trend
        same = r["first_loss"] == r["final_loss"]
        parts.append(f"loss {r['final_loss']:.3f}" if same else f"loss {r['first_loss']:.3f} -> {r['final_loss']:.3f}")
    if "val/top1" in r:
        parts.append(f"val top-1 {100 * r['val/top1']:.1f}%")
    if "val/knn_top1" in r:
        parts.append(f"val k-NN top-1 {100 * r['val/knn_top1']:.1f}%")
    if r.get("images_per_s"):
        parts.append(f"{r['images_per_s']:.0f} img/s")
    if r.get("mfu"):
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    if r.get("data/damaged_shards") or r.get("data/skipped_samples"):
        parts.append(f"DAMAGED DATA: {r['data/damaged_shards']} shards, {r['data/skipped_samples']} samples skipped "
                     f"(data_problems.json)")
    parts.append(f"export {r['export']}")
    if r.get("run_id"):
        incomplete = " (INCOMPLETE, see above)" if r.get("tracking_unlogged") else ""
        parts.append(f"MLflow run {r['run_id']}{incomplete}")
    return ", ".join(parts)
