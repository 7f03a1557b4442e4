"""Resumable checkpoints: DeepSpeed state + data stream position + RNG + step + config.

Layout of `checkpoint.dir` (one directory shared by all nodes):

    step_00000100/                 DeepSpeed's files for this step (model, ZeRO shards per rank)
        vitpipe_rank00000.pt       this rank's loader position and RNG states
        COMPLETE.json              written by rank 0 after *every* rank wrote its part: the file
                                   list with sizes, the step, the config; a step without it is partial
    latest                         name of the newest complete step, replaced atomically

A checkpoint is used only if its COMPLETE.json parses and every file it lists is there with the
recorded size, so a half-written or truncated checkpoint (a rank killed mid-save, a full disk) is
skipped in favour of the previous complete one.

A run may resume on another number of ranks (a job requeued on fewer nodes). ZeRO-1/2 optimizer
state is partitioned per rank, so it is first rewritten in DeepSpeed's rank-independent "universal"
format (`step_.../universal/`, by `deepspeed.checkpoint.ds_to_universal`) and the engine loads that;
an unpartitioned checkpoint (ZeRO-0) loads as it is. ZeRO-3 is refused: DeepSpeed's universal
restore of a ZeRO-3 run with several parameter groups does not continue it exactly (its first step
after the restore already differs from the uninterrupted run's).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vit.train.distributed import World, barrier, broadcast_object

MARKER = "COMPLETE.json"
LATEST = "latest"
UNIVERSAL = "universal"  # inside a step directory: its ZeRO state rewritten for any number of ranks
_TAG = re.compile(r"step_(\d{8,})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from (dropout, drop-path, augmentation, shuffling)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    """Saves, finds and restores complete checkpoints of one run; every rank holds one."""

    def __init__(self, root: str | Path, world: World, *, keep_last: int = 2) -> None:
        self.root = Path(root)
        self.world = world
        self.keep_last = keep_last

    # -- saving -----------------------------------------------------------------------------

    def save(self, engine, *, step: int, meta: dict[str, Any], rank_state: dict[str, Any]) -> Path:
        """Collective: every rank calls it at the same step. Returns the checkpoint's directory."""
        tag = tag_for(step)
        path = self.root / tag
        if self.world.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if path.exists():  # a partial save of this step by a run that died; never mix with it
                shutil.rmtree(path)
        barrier()
        engine.save_checkpoint(str(self.root), tag=tag, client_state={"vitpipe": meta}, save_latest=False)
        path.mkdir(parents=True, exist_ok=True)
        rank_file = path / f"vitpipe_rank{self.world.rank:05d}.pt"
        tmp = rank_file.with_name(rank_file.name + ".tmp")
        torch.save({**rank_state, "rng": rng_state()}, tmp)
        os.replace(tmp, rank_file)
        barrier()  # every rank's part is on disk before the marker says so
        if self.world.is_main:
            files = {str(p.relative_to(path)): p.stat().st_size
                     for p in sorted(path.rglob("*")) if p.is_file() and p.name != MARKER}
            marker = {"step": step, "world_size": self.world.world_size, "files": files, **meta}
            _atomic_write(path / MARKER, json.dumps(marker, indent=1, default=str))
            _atomic_write(self.root / LATEST, tag + "\n")
            self.prune()
        barrier()
        return path

    def prune(self) -> None:
        """Delete all but the newest `keep_last` complete checkpoints, and partial ones older than those."""
        complete = [t for t in self.tags() if self.check(t) is None]
        keep = set(complete[-self.keep_last:])
        oldest_kept = min((int(_TAG.match(t).group(1)) for t in keep), default=None)
        for tag in self.tags():
            step = int(_TAG.match(tag).group(1))
            if tag in keep or oldest_kept is None or step > oldest_kept:
                continue
            shutil.rmtree(self.root / tag, ignore_errors=True)

    def clear(self) -> None:
        """Collective: delete every checkpoint of this run (starting over), so none is resumed later."""
        if self.world.is_main:
            for tag in self.tags():
                shutil.rmtree(self.root / tag, ignore_errors=True)
            (self.root / LATEST).unlink(missing_ok=True)
        barrier()

    # -- finding ----------------------------------------------------------------------------

    def tags(self) -> list[str]:
        """Checkpoint directory names, oldest first (complete or not)."""
        if not self.root.is_dir():
            return []
        found = [p.name for p in self.root.iterdir() if p.is_dir() and _TAG.match(p.name)]
        return sorted(found, key=lambda t: int(_TAG.match(t).group(1)))

    def check(self, tag: str) -> str | None:
        """Why checkpoint `tag` cannot be loaded, or None when it is complete."""
        path = self.root / tag
        try:
            marker = json.loads((path / MARKER).read_text())
        except FileNotFoundError:
            return "partial (no completion marker)"
        except (OSError, ValueError) as e:
            return f"unreadable completion marker ({e})"
        files = marker.get("files")
        if not isinstance(files, dict) or not files:
            return "completion marker lists no files"
        for name, size in files.items():
            f = path / name
            if not f.is_file():
                return f"missing file {name}"
            if f.stat().st_size != size:
                return f"file {name} has {f.stat().st_size} bytes, expected {size} (truncated or overwritten)"
        return None

    def marker(self, tag: str) -> dict[str, Any]:
        return json.loads((self.root / tag / MARKER).read_text())

    def latest_complete(self, *, warn=print) -> str | None:
        """Newest complete checkpoint (agreed by all ranks), skipping partial and corrupt ones."""
        chosen = None
        if self.world.is_main:
            for tag in reversed(self.tags()):
                problem = self.check(tag)
                if problem is None:
                    chosen = tag
                    break
                warn(f"checkpoint {self.root / tag} skipped: {problem}")
        return broadcast_object(chosen)

    # -- restoring --------------------------------------------------------------------------

    def written_by(self, tag: str) -> int:
        """How many ranks wrote checkpoint `tag`."""
        return int(self.marker(tag)["world_size"])

    def prepare_resize(self, tag: str, *, zero_stage: int, say=print) -> bool:
        """Collective, before the engine is built. When `tag` was written by another number of ranks,
        make it loadable by this run; returns True when the engine must load it in DeepSpeed's
        universal format (its config then needs `"checkpoint": {"load_universal": true}`)."""
        from vitpipe.errors import UserError

        before, now = self.written_by(tag), self.world.world_size
        if before == now:
            return False
        path = self.root / tag
        if zero_stage >= 3:
            raise UserError(f"checkpoint {path} was written by {before} ranks with ZeRO-3 and this run has {now}; "
                            f"DeepSpeed cannot yet restore a ZeRO-3 run exactly on another number of ranks. "
                            f"Relaunch with {before} ranks, or start over with --no-resume")
        partitioned = _partitioned(path)
        if self.world.is_main:
            if partitioned and not (path / UNIVERSAL).is_dir():
                say(f"checkpoint {path} was written by {before} ranks, this run has {now}: rewriting its ZeRO "
                    f"state for any number of ranks in {path / UNIVERSAL}")
                to_universal(path, path / UNIVERSAL)
            else:
                say(f"checkpoint {path} was written by {before} ranks, this run has {now}: resharding it")
        barrier()
        return partitioned

    def load(self, engine, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore engine (weights, optimizer) and this rank's RNG; returns (meta, rank_state).
        A checkpoint of another number of ranks needs `prepare_resize` first."""
        path = self.root / tag
        marker = self.marker(tag)
        resized = marker["world_size"] != self.world.world_size
        if resized and engine.load_universal_checkpoint():
            load_dir, load_tag = path, UNIVERSAL
        elif resized and _partitioned(path):
            raise RuntimeError(f"checkpoint {path} holds ZeRO state of {marker['world_size']} ranks; call "
                               f"prepare_resize and build the engine with checkpoint.load_universal")
        else:
            load_dir, load_tag = self.root, tag
        load_path, client = engine.load_checkpoint(str(load_dir), tag=load_tag, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
        mine = path / f"vitpipe_rank{self.world.rank:05d}.pt"
        rank_state = torch.load(mine if mine.is_file() else path / "vitpipe_rank00000.pt", weights_only=False)
        set_rng_state(rank_state.pop("rng"))
        if resized:  # a rank of the old layout has no say over this one's dropout masks
            reseed(int(marker["step"]), self.world.rank)
        return client.get("vitpipe", {}), rank_state


def _partitioned(path: Path) -> bool:
    """Whether a checkpoint holds optimizer state split per rank (ZeRO-1/2, DeepSpeed's bf16 optimizer)."""
    return any(path.glob("*optim_states.pt"))


def reseed(step: int, rank: int) -> None:
    """Fresh, distinct RNG streams per rank after a resume on another number of ranks."""
    seed = (step * 1_000_003 + rank) % 2**31
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_universal(src: Path, dst: Path) -> None:
    """Rewrite DeepSpeed checkpoint directory `src` in the universal format at `dst`, atomically.

    Runs DeepSpeed's converter in its own process: it forks worker pools, which must not inherit
    a training process's communication threads."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
                           "--output_folder", str(tmp), "--inject_missing_state",
                           "--num_extract_workers", "2", "--num_merge_workers", "1"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"DeepSpeed could not convert checkpoint {src} to its universal format:\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    os.replace(tmp, dst)


# ---------------------------------------------------------------------------------------------
# Export


def consolidated_state_dict(root: str | Path, tag: str, *, zero_stage: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """Full fp32 weights of a checkpoint, whatever ZeRO stage and rank count wrote it (reads disk only)."""
    root = Path(root)
    if zero_stage >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per step of its work
            state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    else:
        files = sorted((root / tag).glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"no model states in {root / tag}")
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    out = {}
    for key, value in state.items():
        key = key.removeprefix("_orig_mod.")
        if prefix:
            if not key.startswith(prefix):
                continue
            key = key[len(prefix):]
        out[key] = value.detach().float().clone() if value.is_floating_point() else value.clone()
    return out


def export_checkpoint(root: str | Path, tag: str, out_dir: str | Path, *, model_config: dict[str, Any],
                      zero_stage: int, prefix: str = "", class_names: list[str] | None = None) -> Path:
    """Write the artifact fine-tuning loads (safetensors + config.json) from a complete checkpoint;
    `class_names`: the head's classes in output order, recorded in config.json."""
    from vit.models.vit import ViTConfig, VisionTransformer
    from vit.models.weights import save_pretrained

    state = consolidated_state_dict(root, tag, zero_stage=zero_stage, prefix=prefix)
    model = VisionTransformer(ViTConfig.from_dict(model_config))
    model.load_state_dict(state, strict=True)
    if class_names is not None and len(class_names) == model.cfg.num_classes:
        model.class_names = list(class_names)
    return Path(save_pretrained(model, out_dir))
