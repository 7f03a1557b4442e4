"""Resumable checkpoints: DeepSpeed state + data stream position + RNG + step + config.

Layout of `checkpoint.dir` (one directory shared by all nodes):

    step_00000100/                 DeepSpeed's files for this step (model, ZeRO shards per rank)
        vitpipe_rank00000.json     this rank's loader position and RNG states (plain JSON, no pickle)
        COMPLETE.json              written by rank 0 after *every* rank wrote its part: the file
                                   list with sizes, the step, the config; a step without it is partial
    latest                         name of the newest complete step, replaced atomically
    mlflow_run.json                the job's MLflow run (vit.tracking.tracker.RunRecord)

A checkpoint is used only if its COMPLETE.json parses and every file it lists is there with the
recorded size, so a half-written or truncated checkpoint (a rank killed mid-save, a full disk) is
skipped in favour of the previous complete one. Files a killed writer left half-written
(`.NAME.tmp-PID`, `NAME.tmp`) are removed when a run starts.

Resuming unpickles nothing that could run code: every `torch.load` of a resume (DeepSpeed's
model and optimizer states, its universal checkpoint, the export) runs with torch's weights-only
unpickler, which builds tensors, containers and the few DeepSpeed types listed in
`DEEPSPEED_SAFE_TYPES`, and refuses anything else. A checkpoint folder is often shared and
writable by many people; a planted `__reduce__` is refused with `UnsafeCheckpoint` instead of run.

A save checks first that the disk has room for one more checkpoint (the size of the previous
one), and a save that fails anyway (a full disk, a quota) removes its partial step on every rank
and stops the run with one line naming the path and the space needed: the latest complete
checkpoint stays, so the same command resumes exactly once there is room. Pruning to
`keep_last` happens after the new checkpoint is complete, so keep_last=N needs room for N+1.

A run may resume on another number of ranks (a job requeued on fewer nodes). ZeRO-1/2 optimizer
state is partitioned per rank, so it is first rewritten in DeepSpeed's rank-independent "universal"
format (`step_.../universal/`, by `deepspeed.checkpoint.ds_to_universal`) and the engine loads that;
an unpartitioned checkpoint (ZeRO-0) loads as it is. ZeRO-3 is refused: DeepSpeed's universal
restore of a ZeRO-3 run with several parameter groups does not continue it exactly (its first step
after the restore already differs from the uninterrupted run's).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import io
import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from vit.train.distributed import World, barrier, broadcast_object, gather_objects, raise_on_rank0
from vitpipe.errors import UserError

MARKER = "COMPLETE.json"
LATEST = "latest"
UNIVERSAL = "universal"  # inside a step directory: its ZeRO state rewritten for any number of ranks
RUN_RECORD = "mlflow_run.json"
_TAG = re.compile(r"step_(\d{8,})$")
# What a writer killed between creating and renaming its file leaves: `.NAME.tmp-PID` (atomic_write,
# to_universal) and `NAME.tmp` (older rank files).
_STALE = re.compile(r"^\..+\.tmp-\d+$|.+\.tmp$")
# Bytes per trained parameter a checkpoint holds at least: fp32 weights and Adam's two moments. Used to
# check the space for the first checkpoint of a run; later ones take the previous one's size.
_MIN_BYTES_PER_PARAM = 12


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write(path: Path, text: str) -> None:
    """Replace `path` by `text` so that a reader sees the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there when the write failed


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from (dropout, drop-path, augmentation, shuffling), as JSON data."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (or, from checkpoints before JSON rank files, its tensors)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(state["cuda"]))


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return torch.frombuffer(bytearray(base64.b64decode(value)), dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------
# Loading without running code


class UnsafeCheckpoint(UserError):
    """A checkpoint file holds pickled objects beyond tensors and plain data (code a load would run)."""


def deepspeed_safe_types() -> list:
    """The classes DeepSpeed pickles into its checkpoints besides tensors and containers: plain
    records the weights-only unpickler may build (their constructors run no code of the file's)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _numpy_rng_types() -> list:
    """What a rank file of vitpipe before JSON rank files holds besides tensors: numpy's RNG key array."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _reconstruct,
            (_reconstruct, "numpy.core.multiarray._reconstruct"), (_reconstruct, "numpy._core.multiarray._reconstruct")]


@contextlib.contextmanager
def weights_only_loading(where: Path) -> Iterator[None]:
    """Every `torch.load` inside (ours and DeepSpeed's, which pass weights_only=False in dozens of
    places) uses torch's weights-only unpickler; a refused file becomes `UnsafeCheckpoint`.

    TORCH_FORCE_WEIGHTS_ONLY_LOAD is torch's documented switch that overrides a call's own
    weights_only=False; the environment also carries it into DeepSpeed's converter process."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_safe_types()):
            yield
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpoint(unsafe_message(where, str(e))) from None
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def unsafe_message(where: Path, detail: str) -> str:
    """The one line for a checkpoint that a weights-only load refused (`detail`: torch's message)."""
    found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", detail)
    what = f"a pickled {found.group(1)}" if found else "pickled objects other than tensors"
    return (f"checkpoint {where} holds {what}, which could run code when loaded, so it was not loaded "
            f"(someone may have written into the checkpoint folder). Delete that checkpoint to resume "
            f"from an older one, or start over with --no-resume")


class CheckpointManager:
    """Saves, finds and restores complete checkpoints of one run; every rank holds one."""

    def __init__(self, root: str | Path, world: World, *, keep_last: int = 2) -> None:
        self.root = Path(root)
        self.world = world
        self.keep_last = keep_last

    # -- saving -----------------------------------------------------------------------------

    def save(self, engine, *, step: int, meta: dict[str, Any], rank_state: dict[str, Any]) -> Path:
        """Collective: every rank calls it at the same step. Returns the checkpoint's directory.

        Raises UserError on every rank (one line: the path, the space needed) when the disk is too
        full for it, after removing what was written of it; the previous checkpoints stay."""
        tag = tag_for(step)
        path = self.root / tag
        problem = None
        if self.world.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if path.exists():  # a partial save of this step by a run that died; never mix with it
                shutil.rmtree(path)
            need, free = self._expected_size(engine), shutil.disk_usage(self.root).free
            if free < need:
                problem = self._no_space(path, need, free)
        problem = broadcast_object(problem)
        if problem:
            raise_on_rank0(self.world, UserError(problem))
        barrier()
        error = None
        try:
            engine.save_checkpoint(str(self.root), tag=tag, client_state={"vitpipe": meta}, save_latest=False)
        except Exception as e:
            # Its writes come after its last collective but the closing barrier, where the ranks
            # whose writes succeeded now wait: meet them there, then agree below.
            error = e
            barrier()
        if error is None:
            try:
                path.mkdir(parents=True, exist_ok=True)
                state = {"format": "vitpipe.rank_state", "version": 2, **rank_state, "rng": rng_state()}
                atomic_write(path / f"vitpipe_rank{self.world.rank:05d}.json", json.dumps(state))
            except Exception as e:
                error = e
        self._agree(error, engine, path)  # every rank's part is on disk before the marker says so
        error = None
        if self.world.is_main:
            try:
                files = {str(p.relative_to(path)): p.stat().st_size
                         for p in sorted(path.rglob("*")) if p.is_file() and p.name != MARKER}
                marker = {"step": step, "world_size": self.world.world_size, "files": files, **meta}
                atomic_write(path / MARKER, json.dumps(marker, indent=1, default=str))
                atomic_write(self.root / LATEST, tag + "\n")
            except Exception as e:
                error = e
        self._agree(error, engine, path)
        if self.world.is_main:
            self.prune()
        barrier()
        return path

    def _agree(self, error: Exception | None, engine, path: Path) -> None:
        """Collective: when a rank's write failed, rank 0 removes the partial checkpoint and every
        rank stops (rank 0 raises, with one line for a full disk; the others exit quietly); else return."""
        failures = [f for f in gather_objects(None if error is None else (self.world.rank, _describe(error)))
                    if f is not None]
        if not failures:
            return
        if self.world.is_main:
            shutil.rmtree(path, ignore_errors=True)
        barrier()
        need, free = self._expected_size(engine), shutil.disk_usage(self.root).free
        if any(full for _, (_, full) in failures) or free < need:
            problem: Exception = UserError(self._no_space(path, need, free, failed=True))
        else:
            rank, (what, _) = failures[0]
            problem = RuntimeError(f"checkpoint {path} could not be written (rank {rank}: {what}); it was removed, "
                                   f"the previous checkpoints stay")
        raise_on_rank0(self.world, problem, cause=error)

    def _expected_size(self, engine) -> int:
        """Bytes the next checkpoint takes: the newest complete one's, else a lower bound from the model."""
        for tag in reversed(self.tags()):
            if self.check(tag) is None:
                return sum(self.marker(tag)["files"].values())
        return sum(getattr(p, "ds_numel", p.numel()) * (_MIN_BYTES_PER_PARAM if p.requires_grad else 4)
                   for p in engine.module.parameters())  # a frozen weight has no optimizer state

    def _no_space(self, path: Path, need: int, free: int, *, failed: bool = False) -> str:
        complete = [t for t in self.tags() if self.check(t) is None]
        resume = f"it resumes from {complete[-1]}" if complete else "it starts from the beginning"
        what = "ran out of space; the partial checkpoint was removed" if failed else "does not fit"
        return (f"checkpoint {path} {what}: it needs about {_size(need)}, {_size(free)} are free there. Free "
                f"{_size(max(need - free, 0) or need)} or more (checkpoint.keep_last={self.keep_last} needs room "
                f"for {self.keep_last + 1} checkpoints: the oldest is deleted only after the new one is "
                f"complete), or lower checkpoint.keep_last or move checkpoint.dir; then run the same command "
                f"again: {resume}")

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
            (self.root / RUN_RECORD).unlink(missing_ok=True)
        barrier()

    def remove_stale_files(self) -> list[Path]:
        """Delete what writers killed mid-write left behind (rank 0; call at the start of a run,
        before anything is saved): `.latest.tmp-PID`, half-written rank files and markers, a
        half-converted universal checkpoint. Returns what was removed."""
        if not self.world.is_main or not self.root.is_dir():
            return []
        removed = []
        for folder in [self.root, *(self.root / t for t in self.tags())]:
            for p in folder.iterdir():
                if _STALE.match(p.name):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                    removed.append(p)
        return removed

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
        with weights_only_loading(path):
            load_path, client = engine.load_checkpoint(str(load_dir), tag=load_tag, load_optimizer_states=True,
                                                       load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
        rank_state = load_rank_state(path, self.world.rank)
        set_rng_state(rank_state.pop("rng"))
        if resized:  # a rank of the old layout has no say over this one's dropout masks
            reseed(int(marker["step"]), self.world.rank)
        return client.get("vitpipe", {}), rank_state


def load_rank_state(path: Path, rank: int) -> dict[str, Any]:
    """Rank `rank`'s loader position and RNG from checkpoint directory `path` (rank 0's when the
    checkpoint was written by fewer ranks). Reads the JSON file, or the `.pt` file of vitpipe
    before it with the weights-only unpickler (its numpy RNG array allowed)."""
    for r in (rank, 0):
        json_file, pt_file = path / f"vitpipe_rank{r:05d}.json", path / f"vitpipe_rank{r:05d}.pt"
        if json_file.is_file():
            state = json.loads(json_file.read_text())
            state.pop("format", None), state.pop("version", None)
            return state
        if pt_file.is_file():
            try:
                with torch.serialization.safe_globals(_numpy_rng_types()):
                    return torch.load(pt_file, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                raise UnsafeCheckpoint(unsafe_message(pt_file, str(e))) from None
    raise FileNotFoundError(f"checkpoint {path} has no vitpipe_rank file for rank {rank} or 0")


def _describe(error: Exception) -> tuple[str, bool]:
    """(what went wrong, whether it was a full disk or quota) for a failed checkpoint write."""
    chain, e = [], error
    while e is not None and len(chain) < 5:
        chain.append(e)
        e = e.__cause__ or e.__context__
    full = any(getattr(x, "errno", None) in (errno.ENOSPC, errno.EDQUOT) for x in chain) or any(
        # torch.save's zip writer reports a short write as one of these, without the errno
        any(m in str(x) for m in ("unexpected pos", "file write failed", "No space left")) for x in chain)
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}", full


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


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
    # The converter unpickles the checkpoint too: weights-only, with DeepSpeed's record types allowed.
    # (Its worker pools fork, so they inherit the allowed types.)
    run = ("import torch; from vit.train.checkpoint import deepspeed_safe_types; "
           "torch.serialization.add_safe_globals(deepspeed_safe_types()); "
           "from deepspeed.checkpoint import ds_to_universal as m; m.main(m.parse_arguments())")
    proc = subprocess.run([sys.executable, "-c", run, "--input_folder", str(src), "--output_folder", str(tmp),
                           "--inject_missing_state", "--num_extract_workers", "2", "--num_merge_workers", "1"],
                          capture_output=True, text=True, env={**os.environ, "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"})
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        out = proc.stdout + proc.stderr
        if "Weights only load failed" in out:
            raise UnsafeCheckpoint(unsafe_message(src, out))
        if "No space left on device" in out or "unexpected pos" in out:
            raise UserError(f"rewriting checkpoint {src} for another number of ranks ran out of space in "
                            f"{dst.parent} (it takes about as much as the checkpoint); free space there, or "
                            f"relaunch with the number of ranks that wrote it")
        raise RuntimeError(f"DeepSpeed could not convert checkpoint {src} to its universal format:\n{out[-3000:]}")
    os.replace(tmp, dst)


# ---------------------------------------------------------------------------------------------
# Export


def consolidated_state_dict(root: str | Path, tag: str, *, zero_stage: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """Full fp32 weights of a checkpoint, whatever ZeRO stage and rank count wrote it (reads disk only)."""
    root = Path(root)
    if zero_stage >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # it prints a line per step of its work
        with contextlib.redirect_stdout(io.StringIO()), weights_only_loading(root / tag):
            state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    else:
        files = sorted((root / tag).glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"no model states in {root / tag}")
        with weights_only_loading(root / tag):
            state = torch.load(files[0], map_location="cpu", weights_only=True)["module"]
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
