"""Typed configs of the training stages: `PretrainConfig` and `FinetuneConfig`.

Both share one section tree (model, data, optim, schedule, deepspeed, checkpoint, tracking, train),
so the same engine and loop run them; fine-tuning adds `init`, `mode` and `layer_decay`.
Precedence: command line > YAML file > the defaults below. Unknown keys are errors.

    vitpipe pretrain run.yaml --optim.lr 1e-3 --deepspeed.zero-stage 2 --nproc 2
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.loader import DataConfig
from vit.objectives.mae import MAESection
from vit.objectives.mpp import MPPSection
from vit.train.monitor import ProbeSection
from vitpipe.config import StageConfig


class ModelSection(StageConfig):
    """Which architecture to build; the class count always comes from the dataset's index."""

    preset: str = Field("ti/4", description="named architecture from vit.models.vit.PRESETS, e.g. micro/4, s/16, b/16")
    image_size: int | None = Field(None, description="input side in pixels; empty = data.image_size")
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0,
                                  description="stochastic depth at the last block; ~0.1 for S, more for bigger models")
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0, description="dropout in blocks; the paper uses 0.1 on small datasets")
    overrides: dict[str, Any] = Field(default_factory=dict,
                                      description="any other ViTConfig field, e.g. {global_pool: avg}")


class FinetuneModelSection(ModelSection):
    """As ModelSection, but the architecture comes from the checkpoint unless a preset is named."""

    preset: str = Field("", description="only for timm checkpoints (which carry no config), e.g. s/16; "
                                        "set for an export, it must match the checkpoint")


class OptimSection(StageConfig):
    """AdamW as in the ViT paper: beta2 0.999, weight decay 0.1, no decay on norms/biases/embeddings."""

    lr: float = Field(1e-3, gt=0, description="peak learning rate after warmup; scale with the global batch")
    weight_decay: float = Field(0.1, ge=0, description="decoupled weight decay on matrices only")
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam momentum")
    beta2: float = Field(0.999, ge=0, lt=1, description="Adam second moment; 0.999 in the paper, 0.95 for huge batches")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon")


class ScheduleSection(StageConfig):
    """Learning rate over optimizer steps: linear warmup, then cosine or linear decay."""

    warmup_steps: int = Field(100, ge=0, description="steps of linear warmup from 0; ~5-10% of the run")
    decay: Literal["cosine", "linear", "constant"] = Field("cosine", description="shape after warmup")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr as a fraction of the peak")


class DeepSpeedSection(StageConfig):
    """How DeepSpeed shards and runs the step; the JSON config is generated from this."""

    zero_stage: int = Field(0, ge=0, le=3,
                            description="0 = DDP-like; 1/2 shard optimizer state/grads; 3 also shards weights")
    precision: Literal["auto", "bf16", "bf16_full", "fp16", "fp32"] = Field(
        "auto", description="auto = bf16 on GPUs that support it, fp32 on CPU. bf16: bf16 autocast compute "
                            "with fp32 weights and optimizer (DeepSpeed torch_autocast; the fastest on an H200, "
                            "see docs/benchmarks.md); bf16_full: bf16 weights, fp32 master copy in the optimizer "
                            "(DeepSpeed bf16: less memory for very large models); fp16: loss-scaled, GPU only")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step (global batch = batch*ranks*this)")
    grad_clip: float = Field(1.0, ge=0, description="clip the global grad norm to this; 0 = no clipping")
    extra: dict[str, Any] = Field(default_factory=dict,
                                  description="extra DeepSpeed JSON keys merged in, e.g. {zero_optimization: "
                                              "{overlap_comm: true}}; validated")


class CheckpointSection(StageConfig):
    """Where and how often to save resumable state."""

    dir: str | None = Field(None, description="checkpoint directory (shared by all nodes); empty = OUT/checkpoints")
    every_steps: int = Field(500, ge=0, description="save every N optimizer steps (and always at the end); 0 = end only")
    keep_last: int = Field(2, ge=1, description="complete checkpoints kept; older ones are deleted once a new one "
                                                "is complete, so the disk needs room for keep_last + 1")
    resume: bool = Field(True, description="continue from the latest complete checkpoint if there is one")
    stop_timeout_s: float = Field(25.0, ge=0, description="on SIGTERM/SIGINT/SIGHUP (preemption, Ctrl-C) the ranks "
                                  "stop at the next step, save a checkpoint and end the MLflow run KILLED within this "
                                  "many seconds, else exit without; keep it below the scheduler's kill delay (Slurm "
                                  "KillWait, Kubernetes terminationGracePeriodSeconds: 30 s by default); 0 = exit at "
                                  "once, no checkpoint")


class TrackingSection(StageConfig):
    """MLflow tracking, written by rank 0 only."""

    uri: str | None = Field(None, description="MLflow tracking URI; empty = $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    experiment: str = Field("vitpipe", description="MLflow experiment name")
    run_name: str | None = Field(None, description="MLflow run name; empty = generated")
    fail_fast: bool = Field(False, description="stop when the tracking server is unreachable instead of warning")
    flush_timeout_s: float = Field(60.0, ge=0, description="at the end, how long to wait for a tracking server that "
                                   "stopped answering mid-run before saying what it did not get")
    enabled: bool = Field(True, description="log to MLflow at all")
    system_metrics: bool = Field(True, description="log CPU/GPU/memory utilisation alongside training metrics")


class TrainSection(StageConfig):
    """Length of the run and what happens during it."""

    steps: int | None = Field(None, ge=1, description="optimizer steps; wins over epochs when set")
    epochs: float = Field(1.0, gt=0, description="passes over the train split, used when steps is empty")
    eval_every: int = Field(500, ge=0, description="evaluate on the val split every N steps (and at the end); 0 = end only")
    log_every: int = Field(10, ge=1, description="log metrics every N steps")
    seed: int = Field(0, description="seed for init, data order and augmentation; fixed seed = reproducible curves")
    compile: Literal["auto"] | bool = Field(
        "auto", description="torch.compile the model: faster steps after a warm-up of a minute or so (ViT-B/16 on "
        "an H200: 1.3x, docs/benchmarks.md); auto = on when training on CUDA, off on the CPU; false for short "
        "debugging runs")
    activation_checkpointing: bool = Field(False, description="recompute block activations: less memory, ~30% slower")
    deterministic: bool = Field(False, description="deterministic kernels (for exact resume comparisons); slower")
    objective: Literal["supervised", "mae", "mpp"] = Field(
        "supervised", description="what the run learns from (vit.objectives): supervised = class labels; "
                                  "mae = masked autoencoder, mpp = the ViT paper's masked patch prediction "
                                  "(both self-supervised: unlabelled images are enough, labels are ignored)")


class TrainingConfig(StageConfig):
    """Sections shared by every stage that trains (the engine reads only these)."""

    model: ModelSection = Field(default_factory=ModelSection)
    data: DataConfig
    optim: OptimSection = Field(default_factory=OptimSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    train: TrainSection = Field(default_factory=TrainSection)
    strict_data: bool = Field(False, description="fail the run (--strict-data) when a shard is truncated or holds "
                              "other counts than its index, or a sample fails to decode, instead of skipping and "
                              "counting it (data/damaged_shards, data/skipped_samples in results.json and MLflow)")
    out: str = Field("runs/train", description="output directory: export, resolved config, checkpoints")


class PretrainConfig(TrainingConfig):
    """`vitpipe pretrain`: pretraining on a sharded collection, supervised (labelled) or self-supervised."""

    out: str = Field("runs/pretrain", description="output directory: export, resolved config, checkpoints")
    mae: MAESection = Field(default_factory=MAESection, description="options of --train.objective mae")
    mpp: MPPSection = Field(default_factory=MPPSection, description="options of --train.objective mpp")
    probe: ProbeSection = Field(default_factory=ProbeSection,
                                description="online k-NN of a self-supervised run's encoder")

    @model_validator(mode="after")
    def _options_fit_the_objective(self) -> "PretrainConfig":
        from vit.objectives import objective_options_problem

        problem = objective_options_problem(self.train.objective, {"mae": self.mae, "mpp": self.mpp,
                                                                   "probe": self.probe}, self.data.augment)
        if problem:
            raise ValueError(problem)
        return self


class FinetuneConfig(TrainingConfig):
    """`vitpipe finetune`: adapt a pretrained ViT to a new labelled dataset."""

    init: str = Field(..., description="starting weights: export dir, timm checkpoint file, runs:/ID/PATH or "
                                       "models:/NAME@ALIAS")
    mode: Literal["full", "linear_probe"] = Field(
        "full", description="full = train everything with layer-wise lr decay; linear_probe = frozen backbone")
    layer_decay: float = Field(0.75, gt=0, le=1,
                               description="lr multiplier per block going down from the head (1 = off)")
    model: FinetuneModelSection = Field(default_factory=FinetuneModelSection)
    out: str = Field("runs/finetune", description="output directory: export, resolved config, checkpoints")

    @model_validator(mode="after")
    def _supervised(self) -> "FinetuneConfig":
        if self.train.objective != "supervised":
            raise ValueError(f"train.objective={self.train.objective}: fine-tuning trains a classifier on labels "
                             f"(supervised); pretrain with --train.objective {self.train.objective} instead, then "
                             f"fine-tune its export")
        return self


# ---------------------------------------------------------------------------------------------
# Command line of the training stages


# Data options that fine-tuning and evaluation take from the model when left unset (vit.models.weights.data_for_model).
FROM_MODEL = ("data.image_size", "data.channels", "data.mean", "data.std", "data.eval_crop_pct")


def add_stage_arguments(parser, cls: type[TrainingConfig]) -> None:
    """`CONFIG` positional + one option per field + launch options + `--no-resume`."""
    from vit.train.launch import add_launch_arguments
    from vitpipe.config import add_config_arguments

    parser.add_argument("config_file", nargs="?", default=None, metavar="CONFIG",
                        help="YAML file with any of the options below (same as --config)")
    add_config_arguments(parser, cls, from_model=FROM_MODEL if cls is FinetuneConfig else ())
    parser.add_argument("--no-resume", action="store_true",
                        help="start over: delete this run's checkpoints instead of resuming from the latest")
    add_launch_arguments(parser)


def stage_config_from_args(cls: type[TrainingConfig], args) -> TrainingConfig:
    """Resolve the config of `vitpipe pretrain|finetune` from parsed arguments (file < options)."""
    from vitpipe.config import ConfigError, config_from_args

    if args.config_file:
        if args.config and args.config != args.config_file:
            raise ConfigError(f"two config files given ({args.config_file!r} and --config {args.config!r}); "
                              f"pass one")
        args.config = args.config_file
    cfg = config_from_args(cls, args)
    if args.no_resume:
        cfg.checkpoint.resume = False
    return cfg
