"""The DeepSpeed engine: the one place where a model is wrapped for (distributed) training.

The DeepSpeed JSON config is generated from our typed config (`ds_config`), so a run is described
once, in vitpipe's terms; `deepspeed.extra` lets a user pass further DeepSpeed keys, which are
checked here against what DeepSpeed accepts and against the keys we own.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from vit.train.config import DeepSpeedSection, OptimSection, ScheduleSection, TrainingConfig
from vitpipe.errors import UserError

# Keys the typed config owns; setting them through `extra` would silently disagree with it.
_OWNED = {
    "train_batch_size": "data.batch_size and deepspeed.grad_accum",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "deepspeed.grad_accum",
    "gradient_clipping": "deepspeed.grad_clip",
    "bf16": "deepspeed.precision",
    "fp16": "deepspeed.precision",
    "torch_autocast": "deepspeed.precision",
    "optimizer": "the optim section (vitpipe builds AdamW with its parameter groups)",
    "scheduler": "the schedule section",
}
_OWNED_ZERO = {"stage": "deepspeed.zero_stage"}

# Top-level DeepSpeed keys a user may add (DeepSpeed itself ignores unknown ones silently).
_ALLOWED_EXTRA = {
    "zero_optimization", "steps_per_print", "wall_clock_breakdown", "dump_state", "prescale_gradients",
    "gradient_predivide_factor", "communication_data_type", "seq_parallel_communication_data_type",
    "activation_checkpointing", "flops_profiler", "comms_logger", "monitor_config", "tensorboard",
    "wandb", "csv_monitor", "aio", "checkpoint", "data_types", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "memory_breakdown", "sparse_gradients", "amp", "compile",
    "elasticity", "autotuning", "nebula", "graph_harvesting", "timers", "use_data_before_expert_parallelism",
}


# Engines whose weights are half precision need half-precision inputs; autocast takes fp32 inputs.
INPUT_DTYPES = {"bf16_full": torch.bfloat16, "fp16": torch.float16}


def input_dtype(precision: str) -> torch.dtype | None:
    """The dtype a batch must have for an engine of `precision` (None: leave it as loaded)."""
    return INPUT_DTYPES.get(precision)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on GPUs with bf16 support, fp32 elsewhere; explicit choices are checked."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UserError("deepspeed.precision=fp16 needs a GPU (loss scaling is a CUDA path in DeepSpeed); "
                        "use fp32 or bf16 on the CPU")
    return precision


def clips_itself(zero_stage: int, precision: str) -> bool:
    """Whether vitpipe clips (and measures) the gradients itself, between backward and step.

    At ZeRO-0 with fp32 weights (precision fp32, or bf16 autocast over fp32 weights) every rank
    holds the full, already averaged fp32 gradients after `engine.backward`, and torch's foreach
    `clip_grad_norm_` does the job in a few kernels. DeepSpeed clips there with a Python loop
    over the parameters plus an extra all-reduce (most of its step overhead over a plain loop
    for ViT-B/16 bf16 on an H200) and reports no gradient norm. Elsewhere the gradients are
    partitioned (ZeRO-1/2/3) or live in DeepSpeed's half-precision optimizer, so DeepSpeed clips.
    """
    return zero_stage == 0 and precision in ("fp32", "bf16")


def ds_config(cfg: TrainingConfig, *, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed JSON config of a run; call before building anything so bad keys fail early."""
    ds: DeepSpeedSection = cfg.deepspeed
    precision = resolve_precision(ds.precision, device)
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": ds.grad_accum,
        # Where vitpipe clips itself (see clips_itself), DeepSpeed must not clip a second time.
        "gradient_clipping": 0.0 if clips_itself(ds.zero_stage, precision) else ds.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        # bf16 = torch autocast over fp32 weights, as a plain PyTorch AMP loop does. DeepSpeed's own bf16
        # mode (bf16_full) keeps bf16 weights and was 1.5-1.8x slower per step for ViT-B/16 on an H200.
        "torch_autocast": {"enabled": precision == "bf16", "dtype": "bfloat16"},
        "bf16": {"enabled": precision == "bf16_full"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        # We log ourselves (rank 0, MLflow, progress bar); DeepSpeed's own step prints are noise.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return merge_extra(out, ds.extra)


def merge_extra(generated: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Merge user pass-through keys into the generated config; reject owned or unknown keys."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in generated.items()}
    for key, value in extra.items():
        if key in _OWNED:
            raise UserError(f"deepspeed.extra.{key}: set by vitpipe from {_OWNED[key]}; set it there instead")
        if key not in _ALLOWED_EXTRA:
            raise UserError(f"deepspeed.extra.{key}: not a DeepSpeed key vitpipe passes through; "
                            f"allowed: {', '.join(sorted(_ALLOWED_EXTRA))}")
        if key == "zero_optimization":
            if not isinstance(value, dict):
                raise UserError(f"deepspeed.extra.zero_optimization must be a mapping, got {value!r}")
            for sub in value:
                if sub in _OWNED_ZERO:
                    raise UserError(f"deepspeed.extra.zero_optimization.{sub}: set {_OWNED_ZERO[sub]} instead")
            out[key] = {**out[key], **value}
            _validate_zero(out[key])
        else:
            out[key] = value
    return out


def _validate_zero(zero: dict[str, Any]) -> None:
    # DeepSpeed's own pydantic model knows every ZeRO key and rejects typos ('overlap_com').
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    try:
        DeepSpeedZeroConfig(**zero)
    except Exception as e:  # pydantic.ValidationError, with DeepSpeed's field names
        first = str(e).strip().splitlines()
        raise UserError("deepspeed.extra.zero_optimization is not valid for DeepSpeed: "
                        + " ".join(line.strip() for line in first[:4])) from None


# ---------------------------------------------------------------------------------------------
# Optimizer


def layer_id(name: str, depth: int) -> int:
    """Depth of a parameter for layer-wise lr decay: embeddings 0, block i -> i+1, head depth+1."""
    name = name.removeprefix("module.").removeprefix("_orig_mod.")
    for prefix in ("vit.", "backbone."):
        name = name.removeprefix(prefix)
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(model: nn.Module, optim: OptimSection, *, layer_decay: float = 1.0,
                 depth: int | None = None) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on 1-D params (norms, biases) and embeddings; lr scale per layer.

    Each group carries `lr_scale`; the loop sets lr = schedule(step) * lr_scale, which is how
    layer-wise decay rides on one schedule. Frozen parameters are left out.
    """
    no_decay_names = set(getattr(model, "no_weight_decay", lambda: set())())
    if depth is None:
        depth = len(getattr(model, "blocks", []))
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or any(name == n or name.endswith("." + n) for n in no_decay_names)
        lid = layer_id(name, depth) if layer_decay < 1.0 else 0
        key = (lid, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [],
                           "weight_decay": 0.0 if no_decay else optim.weight_decay,
                           "lr_scale": layer_decay ** (depth + 1 - lid) if layer_decay < 1.0 else 1.0}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    if not groups:
        raise UserError("the model has no trainable parameters; check the fine-tuning mode")
    return [groups[k] for k in sorted(groups)]


def build_optimizer(groups: list[dict[str, Any]], optim: OptimSection, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the groups; the fused kernel on GPU (one launch for all params)."""
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    return torch.optim.AdamW(clean, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                             weight_decay=optim.weight_decay, fused=device.type == "cuda")


def lr_at(step: int, *, total_steps: int, peak: float, schedule: ScheduleSection) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine/linear/constant."""
    warmup = min(schedule.warmup_steps, max(0, total_steps - 1))
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    floor = peak * schedule.min_lr_ratio
    if schedule.decay == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if schedule.decay == "linear":
        return floor + (peak - floor) * (1.0 - progress)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Engine


def resolve_compile(compile: bool | str, device: torch.device) -> bool:
    """train.compile -> whether to compile: 'auto' compiles on CUDA, where it pays (not on the CPU,
    where compiling takes longer than the short runs made there save)."""
    return device.type == "cuda" if compile == "auto" else bool(compile)


def create_engine(model: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any], *,
                  compile: bool = False):
    """Wrap model and optimizer in a DeepSpeed engine (call once per run, after init_process_group)."""
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    # DeepSpeed logs its whole config and every step at INFO; our progress bar and MLflow say enough.
    ds_logger.setLevel(logging.WARNING)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if compile:
        engine.compile()
    return engine


class Stepper:
    """One micro-step of training: `engine.backward`, then vitpipe's gradient clipping at the
    accumulation boundary where it clips itself (`clips_itself`), then `engine.step`.

    `grad_norm()` is the global gradient norm (before clipping) of the last optimizer step that
    measured it, from vitpipe or from DeepSpeed, as a float (one host sync: call it when logging),
    or None where neither measured one. With clipping off, vitpipe measures only when asked to
    (`measure=True`), since nothing else needs the norm.
    """

    def __init__(self, engine, cfg: TrainingConfig, device: torch.device):
        self.engine = engine
        self.own = clips_itself(cfg.deepspeed.zero_stage, resolve_precision(cfg.deepspeed.precision, device))
        self.max_norm = cfg.deepspeed.grad_clip
        self._norm: torch.Tensor | None = None

    def backward_step(self, loss: torch.Tensor, *, measure: bool = False) -> None:
        self.engine.backward(loss)
        # DeepSpeed's own notion of the boundary: the micro-step after which it averaged the
        # gradients over the ranks and will apply the optimizer.
        if self.own and self.engine.is_gradient_accumulation_boundary() and (self.max_norm > 0 or measure):
            self._norm = clip_grad_norm([p for p in self.engine.module.parameters() if p.grad is not None],
                                        self.max_norm)
        self.engine.step()

    def grad_norm(self) -> float | None:
        norm = self._norm if self.own else self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """The global L2 norm of the gradients (a device tensor, no host sync); they are scaled down to
    `max_norm` when it is > 0 and exceeded. Torch's foreach kernels where the device has them."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm([p.grad for p in params])
    return torch.nn.utils.clip_grad_norm_(params, float("inf"))  # scales by 1.0


def set_lr(engine, lr: float) -> None:
    """Apply a scheduled lr to every param group, times the group's layer-decay scale."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def whole_parameters(module: nn.Module, zero_stage: int):
    """A context in which `module`'s parameters are whole on every rank, for evaluation code that
    calls the model's methods outside the engine's forward (k-NN features). ZeRO-3 partitions them
    (entering gathers them, collectively); the other stages keep them whole, so it does nothing."""
    import contextlib

    if zero_stage < 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
