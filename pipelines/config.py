"""The typed pipeline configuration: YAML in, validated sections out, one-line errors.

Every section is a frozen pydantic model with ``extra="forbid"``: a typo is an error
that names the field, and ``--set a.b=v`` overrides go through the same validation.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import os
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from cl_core.errors import HyperparameterError
from cl_core.methods import get_method, known_methods, method_params

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


class ConfigError(ValueError):
    """A bad configuration; the message has one line per problem, each naming the field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # fields added after runs were cached, whose unset value (None) keeps the old behaviour: left out of
    # the dump while None, so the section (and every stage cache key and record made from it) stays what
    # it was for those runs. A section that gains such a field names it here.
    ADDED_LATER: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out = handler(self)
        for name in self.ADDED_LATER:
            if getattr(self, name) is None:
                out.pop(name, None)
        return out


PACKAGED_DATA = {  # data sets a system package installs, and the command that does it
    "/usr/share/datasets/fashion-mnist": "apt-get install -y dataset-fashion-mnist (as root; or make fashion-mnist)",
}


class SourceConfig(Section):
    kind: Literal["digits", "idx", "image_folder", "npz", "text"] = "digits"
    path: str | None = Field(
        None,
        description="folder (image_folder), .npz file (npz), folder of IDX files (idx: "
        "MNIST, Fashion-MNIST, KMNIST, EMNIST; the official test files stay the test split), "
        ".txt or .jsonl file (text); image_folder and npz may be s3://bucket/prefix (one object "
        "per image) or s3://.../x.npz",
    )

    @model_validator(mode="after")
    def _path_exists(self) -> SourceConfig:
        if self.kind == "digits":
            if self.path is not None:
                raise ValueError(
                    "path: the digits source is bundled with scikit-learn and takes no path; set kind "
                    "(image_folder, npz or text) to read this path, or drop path"
                )
            return self
        if not self.path:
            raise ValueError(f"path: required for kind={self.kind}")
        if self.path.startswith("s3://"):  # checked when the shard stage lists it (needs the S3 endpoint)
            if self.kind == "text":
                raise ValueError("path: text sources are read from local files; download the .txt/.jsonl first")
            if self.kind == "idx":
                raise ValueError("path: IDX sources are read from a local folder; download the IDX files first")
            return self
        if not Path(self.path).expanduser().exists():
            what = {
                "image_folder": "folder",
                "npz": ".npz file",
                "text": ".txt or .jsonl file",
                "idx": "folder of IDX files",
            }[self.kind]
            hint = PACKAGED_DATA.get(str(Path(self.path).expanduser()).rstrip("/"))
            raise ValueError(
                f"path: {self.path} does not exist; " + (f"install it: {hint}" if hint else f"give an existing {what}")
            )
        if self.kind == "text" and Path(self.path).suffix not in (".txt", ".jsonl"):
            raise ValueError(
                f"path: {self.path}: a text source is a .txt file (one sentence per line) or a .jsonl file "
                '(one {"text": ..., "label": ...} object per line)'
            )
        return self


class DataConfig(Section):
    source: SourceConfig = SourceConfig()
    val_fraction: float = Field(0.15, ge=0, lt=1, description="share of each class held out for selection")
    test_fraction: float = Field(0.15, ge=0, lt=1, description="share held out for the final evaluation only")
    max_samples: int | None = Field(
        None,
        ge=2,
        description="a stratified random subset of this many images (of the "
        "non-test images when the source has an official test set) before the split; "
        "null: all",
    )
    max_test_samples: int | None = Field(
        None, ge=1, description="a stratified random subset of this many of the test split; null: all"
    )
    samples_per_shard: int = Field(256, ge=1)
    min_shards: int = Field(4, ge=1, description="per split; >= training workers x DataLoader workers")
    tokenizer_vocab_size: int = Field(
        8192, ge=300, description="text sources: byte-level BPE vocabulary trained on the train split"
    )
    output: str | None = Field(
        None,
        description="null: shard sets in the work dir; s3://bucket/prefix: shards and "
        "label subsets uploaded there (AWS_* environment), readers stream them",
    )

    @field_validator("output")
    @classmethod
    def _output(cls, v: str | None) -> str | None:
        if v is not None and (not v.startswith("s3://") or len(v) <= 5 or v[5] == "/"):
            raise ValueError(f"expected s3://BUCKET/prefix (or null for the work dir), got {v!r}")
        return v

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be < 1 to leave training samples")
        return self


class ViewsConfig(Section):
    image_size: int = Field(16, ge=4)
    crop_min_scale: float = Field(0.3, gt=0, le=1)
    hflip_prob: float = Field(0.0, ge=0, le=1)
    jitter_strength: float = Field(0.5, ge=0)
    jitter_prob: float = Field(0.8, ge=0, le=1)
    grayscale_prob: float = Field(0.2, ge=0, le=1)
    blur_prob: float = Field(0.0, ge=0, le=1, description="SimCLR: 0.5 on ImageNet, off for small images")
    local_views: int = Field(
        6, ge=0, description="multi-crop methods (SwAV, DINO): small views per image (SwAV: 6, DINO: 8)"
    )
    local_image_size: int | None = Field(None, ge=4, description="side of the local views; None: 96/224 of image_size")
    local_crop_scale: tuple[float, float] = Field(
        (0.05, 0.14), description="area range of local crops (SwAV: 0.05-0.14)"
    )
    augment_on: Literal["loader", "device"] = Field(
        "loader",
        description="where the colour augmentation (jitter, "
        "grayscale, blur, normalize) runs: 'loader' per image in the "
        "DataLoader workers; 'device' batched on the training device "
        "(the GPU), with the loader decoding, cropping and flipping only",
    )
    decode_on: Literal["auto", "loader", "device"] = Field(
        "auto",
        description="where JPEG images are decoded, cropped and flipped: 'loader' in the DataLoader workers; "
        "'device' batched on the training device (nvJPEG on a GPU), the loader reading only bytes; 'auto': the "
        "device when augment_on is 'device' and the worker has a GPU",
    )

    @field_validator("local_crop_scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"must be (min, max) with 0 < min <= max <= 1, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _decode_needs_device_augment(self) -> ViewsConfig:
        if self.decode_on == "device" and self.augment_on != "device":
            raise ValueError(
                "decode_on: device needs augment_on: device (the colour augmentation follows the crops "
                "on the device); set augment_on: device, or decode_on: loader"
            )
        return self

    def local_size(self) -> int:
        return self.local_image_size or max(4, round(self.image_size * 96 / 224))


class TrainingConfig(Section):
    """What every Ray Train stage shares: budget, optimizer, schedule and resources."""

    epochs: int = Field(20, ge=1)
    batch_size_per_worker: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adamw", "lars"] = "lars"
    lr_base: float = Field(0.3, gt=0, description="per 256 images")
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    weight_decay: float = Field(1e-6, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    warmup_epochs: float = Field(1.0, ge=0)
    num_workers: int = Field(2, description="Ray Train workers")
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: Literal["auto", True, False] = "auto"
    loader_workers: int = Field(1, ge=0, description="DataLoader worker processes per training worker")
    shuffle_buffer: int = Field(1000, ge=0)
    grad_clip: float | None = Field(
        None,
        ge=0,
        description="clip each parameter tensor's gradient to this l2 norm "
        "(DINO's clipping); null: the method's default (DINO 3.0, the others none); 0: off",
    )
    weight_decay_end: float | None = Field(
        None,
        ge=0,
        description="weight decay on a cosine from weight_decay to "
        "this at the last step (DINO: 0.04 -> 0.4); null: the method's default "
        "(DINO 0.4, the others constant)",
    )
    max_failures: int = Field(
        0,
        ge=-1,
        description="Ray Train restarts of the worker group after a worker dies "
        "(-1: unlimited); each restart resumes from the last checkpoint",
    )
    log_every_steps: int = Field(0, ge=0)
    checkpoint_every_steps: int = Field(
        0,
        ge=0,
        description="also checkpoint every N optimizer steps inside an "
        "epoch (0: at epoch ends only); a restart loses at most N steps",
    )
    checkpoint_every_minutes: float = Field(
        0.0, ge=0, description="also checkpoint when this many minutes have passed since the last checkpoint (0: off)"
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 autocast of the step (auto: on CUDA only; bf16 also speeds CPUs with AVX512-BF16/AMX)"
    )
    channels_last: Literal["auto", True, False] = Field(
        "auto", description="NHWC memory format for images and conv weights (auto: on CUDA only)"
    )
    compile: bool = Field(
        False,
        description="torch.compile the networks (encoder, momentum copies, distillation "
        "teacher and student); the first steps pay the compilation",
    )
    cpu_allocator: Literal["cache", "system"] = Field(
        "cache",
        description="CPU workers: 'cache' keeps freed "
        "memory for the next step instead of glibc's fresh mmap per "
        "large block (2x faster CPU steps); 'system': glibc's defaults",
    )

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        return v


class MonitorConfig(Section):
    """The val kNN monitor of pretraining and of the sweep's trials (the sweep ranks by it)."""

    enabled: bool = Field(
        True,
        description="measure val/knn_top1 after every epoch (every worker encodes its share); false: no monitor "
        "(the sweep needs it)",
    )
    max_bank: int = Field(
        10_000,
        ge=1,
        description="training images in the kNN bank (the first ones in shard "
        "order); the features are streamed from the shards, so memory stays flat in the split's size",
    )
    max_val: int = Field(10_000, ge=1, description="val images scored (the first ones in shard order)")


class PretrainConfig(TrainingConfig):
    ADDED_LATER = ("backbone_out_width",)

    method: str = "simclr"
    backbone: Literal["small_cnn", "resnet18", "resnet50", "vit_tiny", "vit_small", "text_transformer"] = "small_cnn"
    backbone_width: int = Field(32, ge=1, description="small_cnn only")
    backbone_out_width: int | None = Field(
        None,
        ge=1,
        description="small_cnn only: channels of the last block, the features' dimension (null: 4 x backbone_width)",
    )
    cifar_stem: bool = False
    patch_size: int = Field(
        4, ge=1, description="ViT backbones: patch side in pixels (views.image_size must be a multiple)"
    )
    vit_depth: int = Field(12, ge=1, description="ViT backbones: Transformer blocks (ViT-Tiny/Small: 12)")
    sync_bn: Literal["auto", True, False] = Field(
        "auto",
        description="BatchNorm statistics over all workers' batches together when num_workers > 1 (torch's "
        "SyncBatchNorm on CUDA, cl_core's GlobalBatchNorm elsewhere); auto: what the method's authors trained with "
        "(on for SimCLR, SupCon, BYOL, SimSiam, SwAV, DINO, Barlow Twins, VICReg, MoCo v3; off for MoCo v1/v2, which "
        "shuffle BN instead, InstDisc, CMC, CPC, SimCSE)",
    )
    params: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"simclr": {"temperature": 0.5, "head_layers": 3, "proj_dim": 64}},
        description="hyperparameters per method: params.<method>.<name>; only the selected method's are used",
    )
    epochs: int = Field(25, ge=1)
    batch_size_per_worker: int = Field(32, ge=1)
    optimizer: Literal["sgd", "adamw", "lars"] = "sgd"
    lr_base: float = Field(1.0, gt=0, description="per 256 images")
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(2.0, ge=0)
    shuffle_buffer: int = Field(500, ge=0)
    views: ViewsConfig = ViewsConfig()
    knn_k: int = Field(20, ge=1)
    knn_temperature: float = Field(0.07, gt=0)
    monitor: MonitorConfig = MonitorConfig()

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in known_methods():
            raise ValueError(f"unknown method {v!r}; known methods: {', '.join(known_methods())}")
        return v

    @field_validator("params")
    @classmethod
    def _params(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for method, values in v.items():
            if method not in known_methods():
                raise ValueError(f"params.{method}: unknown method; known methods: {', '.join(known_methods())}")
            if not isinstance(values, dict):
                raise ValueError(f"params.{method}: expected a mapping of hyperparameters, got {values!r}")
            known = method_params(method)
            for k in values:
                if k not in known:
                    raise ValueError(
                        f"params.{method}.{k}: {method} has no such hyperparameter; "
                        f"its hyperparameters: {', '.join(sorted(known))}"
                    )
        return v

    @field_validator("batch_size_per_worker")
    @classmethod
    def _batch(cls, v: int) -> int:
        if v < 2:
            raise ValueError(f"must be >= 2 (a contrastive batch needs negatives), got {v}")
        return v

    @model_validator(mode="after")
    def _build_check(self) -> PretrainConfig:
        """Build the selected method once, without memory (meta device), so a bad value
        (a temperature <= 0, a momentum >= 1, a ViT patch that does not divide the image)
        fails here with the method's own message."""
        import torch

        if self.backbone_out_width is not None and self.backbone != "small_cnn":
            raise ValueError(
                f"backbone_out_width: small_cnn only, but backbone is {self.backbone}; remove backbone_out_width"
            )
        kwargs = self.model_kwargs(num_samples=2)
        try:
            with torch.device("meta"):
                get_method(self.method)(**kwargs, gather_distributed=False)
        except HyperparameterError as e:
            if e.name in self.method_kwargs():  # the method's own hyperparameter: its field
                raise ValueError(f"params.{self.method}.{e.name}: {e.problem}") from None
            raise ValueError(f"{self.method} on {self.backbone}: {e}") from None
        except (ValueError, TypeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{self.method} on {self.backbone}: {msg}") from None
        return self

    def method_kwargs(self) -> dict[str, Any]:
        """The selected method's hyperparameters: its defaults, then ``params.<method>``."""
        return {**method_params(self.method), **self.params.get(self.method, {})}

    def model_kwargs(self, *, num_samples: int | None = None) -> dict[str, Any]:
        """Constructor arguments of the selected method (what a checkpoint records)."""
        backbone_args: dict[str, Any] = {"width": self.backbone_width, "cifar_stem": self.cifar_stem}
        if self.backbone_out_width is not None:  # only when set: earlier checkpoints' records stay as they were
            backbone_args["out_width"] = self.backbone_out_width
        if self.backbone == "text_transformer":
            backbone_args = {}
        elif self.backbone.startswith("vit"):
            backbone_args = {
                "image_size": self.views.image_size,
                "patch_size": self.patch_size,
                "depth": self.vit_depth,
            }
        out = {"backbone": self.backbone, "backbone_args": backbone_args, **self.params.get(self.method, {})}
        if num_samples is not None and "num_samples" in inspect.signature(get_method(self.method).__init__).parameters:
            out["num_samples"] = num_samples
        return out


SWEEP_TRAINING_FIELDS = {
    "lr_base": "> 0",
    "weight_decay": ">= 0",
    "batch_size_per_worker": "an integer >= 2",
    "optimizer": "sgd, adamw or lars",
    "warmup_epochs": ">= 0",
}
SWEEP_VIEW_FIELDS = ("crop_min_scale", "jitter_strength", "hflip_prob")  # pretrain.views.<name>
DOMAINS = ("grid", "choice", "uniform", "loguniform")


class SweepConfig(Section):
    """A Ray Tune sweep over the pretraining method's hyperparameters, before the final
    pretrain: each trial is a short pretrain (one in-process loop, or a TorchTrainer of
    ``workers_per_trial`` workers) scored by val kNN top-1 every epoch, successive halving stops poor
    trials early, and the best values feed the pretrain stage."""

    enabled: bool = True
    space: dict[str, dict[str, Any]] | None = Field(
        None,
        description="None: the method's own space (`clpipe methods` lists each one's); else "
        "NAME: {grid: [..]} | {choice: [..]} | {uniform: [lo, hi]} | {loguniform: [lo, hi]}; NAME is a "
        "hyperparameter of the method (temperature, momentum, head_layers, ...), a training field "
        "(lr_base, weight_decay, batch_size_per_worker, optimizer, warmup_epochs) or a view field "
        "(crop_min_scale, jitter_strength, hflip_prob)",
    )
    search: Literal["basic", "optuna"] = Field("basic", description="basic: Tune's variant generator; optuna: TPE")
    num_samples: int = Field(1, ge=1, description="repeats of the space (random domains are drawn anew each time)")
    epochs: int = Field(3, ge=1, description="epochs per trial (the last rung)")
    grace_period: int = Field(1, ge=1, description="halving: epochs every trial gets before it can be stopped")
    reduction_factor: int = Field(2, ge=2, description="halving: 1/reduction_factor of the trials go on at each rung")
    workers_per_trial: int = Field(
        1,
        ge=1,
        description="training workers per trial (1: an in-process loop; more: "
        "a TorchTrainer per trial); GPUs: one per worker when pretrain.use_gpu applies",
    )
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs per trial in all (several workers share them)")
    max_concurrent_trials: int | None = Field(None, ge=1, description="None: as many as the cluster's CPUs allow")
    seed: int | None = Field(None, description="sampling seed of random domains; None: the pipeline's seed")

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]] | None:
        for name, dom in (v or {}).items():
            if not isinstance(dom, dict) or len(dom) != 1 or next(iter(dom)) not in DOMAINS:
                raise ValueError(
                    f"space.{name}: expected one of {{grid: [...]}}, {{choice: [...]}}, "
                    f"{{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}, got {dom!r}"
                )
            kind, values = next(iter(dom.items()))
            if not isinstance(values, list) or not values:
                raise ValueError(f"space.{name}.{kind}: expected a non-empty list, got {values!r}")
            if kind in ("uniform", "loguniform"):
                if (
                    len(values) != 2
                    or not all(isinstance(x, (int, float)) for x in values)
                    or not values[0] < values[1]
                ):
                    raise ValueError(f"space.{name}.{kind}: expected [lo, hi] with lo < hi, got {values!r}")
                if kind == "loguniform" and values[0] <= 0:
                    raise ValueError(f"space.{name}.loguniform: bounds must be > 0, got {values!r}")
        return v

    def candidates(self, name: str) -> list[Any]:
        """The values of ``name`` worth validating: every grid/choice value, the range bounds."""
        return list(next(iter((self.space or {})[name].values())))


def method_sweep_space(method: str) -> dict[str, dict[str, list[Any]]]:
    """The sweep space of ``method`` when the config names none: its ``sweep_space`` grids."""
    return {name: {"grid": list(values)} for name, values in get_method(method).sweep_space.items()}


class SweepStageConfig(Section):
    """What the sweep stage depends on: its own section and the pretrain it tunes."""

    sweep: SweepConfig
    pretrain: PretrainConfig


class LabelsConfig(Section):
    fractions: list[float] = Field(
        [0.1], min_length=1, description="label fractions of the training split (SimCLRv2: 1% and 10%)"
    )

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        bad = [f for f in v if not 0 < f <= 1]
        if bad:
            raise ValueError(f"every fraction must be in (0, 1], got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"fractions repeat: {v}")
        return sorted(v)


class CropFlipConfig(Section):
    """Views for fine-tuning and distillation: random resized crop and flip only."""

    crop_min_scale: float = Field(0.8, gt=0, le=1)
    hflip_prob: float = Field(0.0, ge=0, le=1)


class ClassifierTrainingConfig(TrainingConfig):
    """What fine-tuning and distillation share: classifiers trained on crops and flips, each
    model's epoch kept by its val top-1."""

    views: CropFlipConfig = CropFlipConfig()
    seed: int | None = Field(
        None,
        description="this stage's training seed (initialisation, batch order, "
        "augmentation); null: the pipeline's seed. Repeats over seeds keep the shards, labels "
        "and encoder",
    )
    bn_recalibration_images: int = Field(
        2048,
        ge=0,
        description="before each val evaluation, BatchNorm statistics are recomputed on up to this many "
        "of the training images, uncropped (precise BN); 0: the running averages as they are",
    )
    val_checks: int | None = Field(
        None,
        ge=1,
        description="at most this many val checks per model, evenly spaced over its epochs (the last epoch "
        "and the starting point always checked); the epoch kept is the best checked one. None: every epoch",
    )


class FinetuneConfig(ClassifierTrainingConfig):
    finetune_from_head_layer: int | None = Field(
        0,
        ge=0,
        le=4,
        description="projection-head layers kept (SimCLRv2: 1; 0: encoder only); None: 1 for SimCLR's head, else 0",
    )
    num_classes: int | None = Field(None, ge=2, description="None: the data's class count; set it to assert that count")
    objective: Literal["cross_entropy", "supcon"] = Field(
        "cross_entropy",
        description="supcon: supervised contrastive loss on two views + a linear layer on detached features",
    )
    supcon_temperature: float = Field(0.1, gt=0, description="SupCon (Khosla et al. 2020): 0.1")
    baseline: bool = Field(
        True, description="also train the same classifier from scratch on the same labels and budget"
    )
    head_init: Literal["probe", "random"] = Field(
        "probe",
        description="the teacher's new linear layer: probe = a logistic-regression probe of the labeled "
        "images' features, then fine-tuned (LP-FT, Kumar et al. 2022: a random layer's first steps distort the "
        "pretrained features); random = PyTorch's default init",
    )
    epochs: int = Field(60, ge=1, description="SimCLRv2: 60 epochs on 1% of ImageNet, 30 on 10%")
    min_steps: int = Field(
        120, ge=0, description="raise the epochs of a small labeled subset to at least this many steps"
    )
    batch_size_per_worker: int = Field(32, ge=1)
    optimizer: Literal["sgd", "adamw", "lars"] = "sgd"
    lr_base: float = Field(0.2, gt=0, description="per 256 images")
    weight_decay: float = Field(0.0, ge=0)
    warmup_epochs: float = Field(0.0, ge=0)
    loader_workers: int = Field(0, ge=0, description="DataLoader worker processes per training worker")
    shuffle_buffer: int = Field(200, ge=0)


class DistillConfig(ClassifierTrainingConfig):
    student_backbone: str | None = Field(None, description="None: the teacher's backbone (self-distillation)")
    student_width: int | None = Field(None, ge=1, description="small_cnn only; None: the teacher's")
    temperature: float = Field(0.1, gt=0, description="SimCLRv2: 0.1 self-distillation, 1.0 big-to-small")
    alpha: float = Field(0.0, ge=0, description="weight of cross-entropy on the labeled subset")
    init: Literal["scratch", "pretrained", "teacher"] = Field(
        "scratch",
        description="the student's starting weights: scratch (random, SimCLRv2's distillation), "
        "pretrained (the pretrain stage's encoder, before fine-tuning) or teacher (the fine-tuned teacher's "
        "encoder); the last two need the student to have the teacher's architecture (self-distillation)",
    )
    epochs: int = Field(10, ge=1)
    batch_size_per_worker: int = Field(32, ge=1)
    lr_base: float = Field(1.0, gt=0, description="per 256 images")
    shuffle_buffer: int = Field(500, ge=0)

    @field_validator("student_backbone")
    @classmethod
    def _student_backbone(cls, v: str | None) -> str | None:
        from cl_core.models import BACKBONES

        if v is not None and v not in BACKBONES:
            raise ValueError(f"unknown backbone {v!r}; known backbones: {', '.join(sorted(BACKBONES))}")
        return v


class RegisterConfig(Section):
    enabled: bool = True
    model_name: str | None = Field(
        None, description="registry names NAME-encoder/-teacher/-student; None: the config's name"
    )
    label_fraction: float | None = Field(None, description="whose teacher and student to register; None: the largest")


class EvaluateConfig(Section):
    knn_k: int = Field(20, ge=1)
    knn_temperature: float = Field(0.07, gt=0)
    probe_weight_decay: float = Field(1e-4, ge=0)
    probe_max_iter: int = Field(200, ge=1)
    max_train: int | None = Field(
        60_000,
        ge=1,
        description="training images (the first in shard order) for the "
        "all-labels kNN bank and linear probe: MNIST-sized sets whole, larger ones a "
        "bounded sample, so the evaluation's memory stops growing; null: all of them",
    )
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs (and torch threads) of the evaluation task; null: every CPU of the largest node"
    )
    use_gpu: Literal["auto", True, False] = Field(
        "auto", description="run the evaluation on a GPU (auto: when the cluster has one)"
    )


class MlflowConfig(Section):
    tracking_uri: str | None = Field(None, description="default: sqlite:///<work_dir>/mlflow.db")
    experiment: str = "clpipe"
    artifact_location: str | None = Field(None, description="default: <work_dir>/mlartifacts")
    system_metrics_seconds: float = Field(
        10.0,
        ge=0,
        description="MLflow system metrics (CPU, memory, disk, network; GPU with pynvml) on the training "
        "and evaluate stages' runs, one sample per this many seconds (MLflow's default); 0: off",
    )


class RayConfig(Section):
    address: str | None = Field(
        None,
        description="None: $RAY_ADDRESS if set (a Ray Job, the local stack), else start a "
        "local Ray; 'auto' or ray://... to join a cluster",
    )
    num_cpus: int | None = Field(None, ge=1, description="local Ray only")
    storage_path: str | None = Field(
        None,
        description="Ray Train/Tune run storage (checkpoints): null = <work_dir>/"
        "ray_results; a shared path or s3://bucket/prefix for multi-node clusters",
    )
    train_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING", description="Ray Train's own console logs (INFO: worker-group and per-checkpoint lines)"
    )
    train_poll_seconds: float = Field(
        0.5,
        gt=0,
        description="how often Ray Train's controller collects the workers' "
        "reports and checks their health ($RAY_TRAIN_HEALTH_CHECK_INTERVAL_S; Ray's "
        "default 2 s makes a report wait up to 2 s when the previous one is not yet "
        "collected)",
    )
    shared_fs: bool = Field(
        False,
        description="the local paths (work_dir and the locations under it) are on a "
        "filesystem every node mounts at the same path (NFS, Lustre, EFS): accepted on a cluster "
        "whose worker nodes have not started yet (autoscaling from zero), where they cannot be "
        "checked; the nodes present are checked either way",
    )
    metrics: bool = Field(
        False,
        description="Ray's and Ray Train's metrics export in the local Ray this process "
        "starts (nothing scrapes them without a Prometheus, and every Ray process pays for them); "
        "a cluster joined through `address` keeps its own settings",
    )


# the section has the stage's name, `register`, which is also a classmethod of every ABC (pydantic's
# models among them): the field shadows it on instances only, as fields do, so pydantic's warning is moot
warnings.filterwarnings("ignore", message='Field name "register" in "PipelineConfig" shadows', category=UserWarning)


class PipelineConfig(Section):
    name: str = "default"
    seed: int = 0
    work_dir: str = "clpipe-work"
    data: DataConfig = DataConfig()
    sweep: SweepConfig = SweepConfig()
    pretrain: PretrainConfig = PretrainConfig()
    labels: LabelsConfig = LabelsConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    distill: DistillConfig = DistillConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    register: RegisterConfig = RegisterConfig()
    mlflow: MlflowConfig = MlflowConfig()
    ray: RayConfig = RayConfig()

    @field_validator("work_dir")
    @classmethod
    def _work_dir(cls, v: str) -> str:
        if "://" in v:  # a plain path would turn it into a local folder named after the URI
            raise ValueError(
                f"{v!r} is a URI, not a directory; work_dir is a local (or mounted, shared) path. For "
                "object storage set data.output, ray.storage_path and mlflow.artifact_location to "
                "s3://... and MLFLOW_TRACKING_URI to a tracking server"
            )
        return v

    @model_validator(mode="before")
    @classmethod
    def _method_sweep_space(cls, data: Any) -> Any:
        """An unset ``sweep.space`` becomes the method's own, so changing the method changes
        what is swept (SimCLR's temperature, BYOL's target decay, ...)."""
        if not isinstance(data, dict):
            return data
        sweep, pretrain = data.get("sweep"), data.get("pretrain")
        method = (
            pretrain.get("method", "simclr") if isinstance(pretrain, dict) else getattr(pretrain, "method", "simclr")
        )
        if method not in known_methods():
            return data  # the method's own one-line error follows
        if sweep is None or isinstance(sweep, dict) and sweep.get("space") is None:
            return {**data, "sweep": {**(sweep or {}), "space": method_sweep_space(method)}}
        if isinstance(sweep, SweepConfig) and sweep.space is None:
            return {**data, "sweep": sweep.model_copy(update={"space": method_sweep_space(method)})}
        return data

    @model_validator(mode="after")
    def _across_sections(self) -> PipelineConfig:
        for stage in ("pretrain", "finetune", "distill"):
            need = getattr(self, stage).num_workers
            if self.data.min_shards < need:
                raise ValueError(
                    f"data.min_shards ({self.data.min_shards}) < {stage}.num_workers ({need}): "
                    "every worker needs its own shard"
                )
        k, layers = self.finetune.finetune_from_head_layer, self.pretrain.method_kwargs().get("head_layers")
        if k and layers is None:
            raise ValueError(
                f"finetune.finetune_from_head_layer ({k}): {self.pretrain.method} has no SimCLR-style "
                "projection head to fine-tune from; set it to 0 (or leave it unset)"
            )
        if k and layers is not None and k > layers:
            raise ValueError(
                f"finetune.finetune_from_head_layer ({k}) > pretrain.params.{self.pretrain.method}.head_layers "
                f"({layers}): the head has only {layers} layers to fine-tune from"
            )
        if self.sweep.enabled:
            self._check_sweep()
        text_method = get_method(self.pretrain.method).view_kind == "text"
        if text_method != (self.data.source.kind == "text"):
            raise ValueError(
                f"pretrain.method: {self.pretrain.method} {'reads text' if text_method else 'reads images'} "
                f"but data.source.kind is {self.data.source.kind}; pair text methods (simcse) with a text "
                "source and image methods with an image source"
            )
        if self.register.label_fraction is not None and self.register.label_fraction not in self.labels.fractions:
            raise ValueError(
                f"register.label_fraction ({self.register.label_fraction}) is not one of "
                f"labels.fractions {self.labels.fractions}"
            )
        if (
            self.distill.student_width is not None
            and (self.distill.student_backbone or self.pretrain.backbone) != "small_cnn"
        ):
            raise ValueError("distill.student_width applies to the small_cnn backbone only; leave it unset")
        return self

    def _check_sweep(self) -> None:
        """Every swept name exists and every candidate value builds the method, before any trial runs."""
        sw, pre = self.sweep, self.pretrain
        if not pre.monitor.enabled:
            raise ValueError(
                "pretrain.monitor.enabled: false, but the sweep ranks its trials by the monitor's "
                "val/knn_top1; turn the monitor on or set sweep.enabled: false"
            )
        if not sw.space:
            raise ValueError(
                "sweep.space: empty; name at least one hyperparameter to sweep, e.g. "
                "space: {temperature: {grid: [0.1, 0.5]}}, or set sweep.enabled: false"
            )
        known = method_params(pre.method)
        for name in sw.space:
            if name not in known and name not in SWEEP_TRAINING_FIELDS and name not in SWEEP_VIEW_FIELDS:
                raise ValueError(
                    f"sweep.space.{name}: {pre.method} has no hyperparameter {name!r}; sweepable: "
                    f"{', '.join(sorted([*known, *SWEEP_TRAINING_FIELDS, *SWEEP_VIEW_FIELDS]))}"
                )
            for value in sw.candidates(name):
                try:
                    apply_sweep(pre, {name: value})
                except ValueError as e:
                    raise ValueError(f"sweep.space.{name}: value {value!r}: {str(e).splitlines()[0]}") from None
        if sw.search == "optuna":
            import importlib.util

            if importlib.util.find_spec("optuna") is None:
                raise ValueError("sweep.search: optuna is not installed (pip install optuna), or use search: basic")
            grids = [n for n, d in sw.space.items() if "grid" in d]
            if grids:
                raise ValueError(f"sweep.space.{grids[0]}: Optuna cannot search a grid; use choice, or search: basic")
        if sw.workers_per_trial > 1 and (sw.cpus_per_trial - 0.01) / sw.workers_per_trial < 0.1:
            raise ValueError(
                f"sweep.cpus_per_trial ({sw.cpus_per_trial}) leaves less than 0.1 CPU to each of the "
                f"{sw.workers_per_trial} workers_per_trial; raise it or lower workers_per_trial"
            )
        if (
            self.ray.num_cpus is not None
            and sw.max_concurrent_trials is not None
            and sw.max_concurrent_trials * sw.cpus_per_trial > self.ray.num_cpus
        ):
            raise ValueError(
                f"sweep.max_concurrent_trials ({sw.max_concurrent_trials}) x cpus_per_trial "
                f"({sw.cpus_per_trial}) > ray.num_cpus ({self.ray.num_cpus}): not enough CPUs"
            )

    def is_text(self) -> bool:
        return self.data.source.kind == "text"

    def model_name(self) -> str:
        return self.register.model_name or self.name

    def work_path(self) -> Path:
        return Path(self.work_dir).expanduser().resolve()

    def tracking_uri(self) -> str:
        """``mlflow.tracking_uri``, else $MLFLOW_TRACKING_URI (a shared server, the local
        stack's env file), else a sqlite store in the work dir."""
        return (
            self.mlflow.tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{self.work_path() / 'mlflow.db'}"
        )

    def s3_locations(self) -> list[str]:
        """The s3:// locations the run reads or writes: source, shard output, Ray's run
        storage, MLflow's artifacts."""
        where = (self.data.source.path, self.data.output, self.ray.storage_path, self.artifact_location())
        return [u for u in where if u and u.startswith("s3://")]

    def node_paths(self) -> list[tuple[str, str, bool]]:
        """(field, local path, written) for every location on a local filesystem that Ray
        tasks and workers on any node read (``written`` False) or write: what must be on
        storage every node sees when the run spans several nodes."""
        out: list[tuple[str, str, bool]] = []
        path = self.data.source.path
        if path and "://" not in path:
            out.append(("data.source.path", str(Path(path).expanduser().resolve()), False))
        if not (self.data.output and "://" in self.data.output):
            out.append(("data.output", str(Path(self.data.output or self.work_path()).expanduser().resolve()), True))
        if not (self.ray.storage_path and "://" in self.ray.storage_path):
            out.append(
                (
                    "ray.storage_path",
                    str(Path(self.ray.storage_path or self.work_path() / "ray_results").expanduser().resolve()),
                    True,
                )
            )
        uri = self.tracking_uri()
        if uri.startswith("sqlite:///") or "://" not in uri or uri.startswith("file:"):
            where = uri.removeprefix("sqlite:///").removeprefix("file://")
            parent = Path(where).parent if uri.startswith("sqlite:") else Path(where)
            out.append(("mlflow.tracking_uri", str(parent.expanduser().resolve()), True))
        art = self.artifact_location()
        if art and (art.startswith("file:") or "://" not in art):
            out.append(
                ("mlflow.artifact_location", str(Path(art.removeprefix("file://")).expanduser().resolve()), True)
            )
        return out

    def artifact_location(self) -> str | None:
        """``mlflow.artifact_location``; unset: the server's default for a tracking server,
        ``<work_dir>/mlartifacts`` for a local store."""
        if self.mlflow.artifact_location:
            return self.mlflow.artifact_location
        if self.tracking_uri().startswith(("http://", "https://")):
            return None
        return (self.work_path() / "mlartifacts").as_uri()


def apply_sweep(pretrain: PretrainConfig, values: dict[str, Any]) -> PretrainConfig:
    """``pretrain`` with swept values applied (method hyperparameters under
    ``params.<method>``, the training fields directly), validated again."""
    data = pretrain.model_dump(mode="json")
    for name, value in values.items():
        if name in SWEEP_TRAINING_FIELDS:
            data[name] = value
        elif name in SWEEP_VIEW_FIELDS:
            data["views"][name] = value
        else:
            data.setdefault("params", {}).setdefault(pretrain.method, {})[name] = value
    try:
        return PretrainConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ValueError(f"{where + ': ' if where else ''}{err['msg'].removeprefix('Value error, ')}") from None


# ---- loading ---------------------------------------------------------------------------


def _model_at(loc: tuple) -> Any:
    """The config model class at a location, e.g. ("pretrain", "views") -> ViewsConfig."""
    model: Any = PipelineConfig
    for p in loc:
        field = getattr(model, "model_fields", {}).get(p)
        if field is None:
            return None
        model = field.annotation
    return model


def _unknown_field(loc: tuple[str, ...], data: dict) -> str:
    """What to say about a field the config does not have: the method's hyperparameter it
    is (they live under ``pretrain.params.<method>``), a near spelling, or the known fields."""
    known = sorted(getattr(_model_at(loc[:-1]), "model_fields", {}))
    name = loc[-1]
    raw = data.get("pretrain")
    pretrain: dict = raw if isinstance(raw, dict) else {}
    method = pretrain.get("method", "simclr")
    if loc[:-1] == ("pretrain",) and method in known_methods():
        params = method_params(method)
        if name in params:
            return f"unknown field; {name} is a hyperparameter of {method}: set pretrain.params.{method}.{name}"
        near = difflib.get_close_matches(name, params, n=1, cutoff=0.8)
        if near and not difflib.get_close_matches(name, known, n=1, cutoff=0.8):
            return f"unknown field; did you mean pretrain.params.{method}.{near[0]} (a hyperparameter of {method})?"
    near = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
    if near:
        return f"unknown field; did you mean {'.'.join((*loc[:-1], near[0]))}?"
    return f"unknown field; known fields here: {', '.join(known)}"


def _format_errors(e: ValidationError, source: str, data: dict | None = None) -> str:
    lines = []
    for err in e.errors():
        loc = tuple(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = _unknown_field(loc, data or {})
        elif err["type"] == "literal_error":
            msg = f"{msg}, got {err.get('input')!r}"
        else:
            # a cross-field check on a section names its field first ("path: ..."): fold it into the location
            head, sep, rest = msg.partition(": ")
            if sep and head.split(".")[0] in getattr(_model_at(loc), "model_fields", {}):
                loc, msg = (*loc, *head.split(".")), rest
        where = ".".join(loc)
        lines.append(f"{source}: {where}: {msg}" if where else f"{source}: {msg}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=v`` -> (["a", "b"], yaml value of v)."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY=VALUE, e.g. --set pretrain.epochs=5")
    key, value = text.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {text}: empty key part")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(
            f"--set {text}: value is not valid YAML ({getattr(e, 'problem', None) or type(e).__name__}); "
            "quote a string value, close brackets and braces"
        ) from e
    return key.split("."), parsed


def apply_override(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        if node.get(k) is None:  # an unset section (sweep.space: null) takes the first field named in it
            node[k] = {}
        nxt = node[k]
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {'.'.join(keys)}: {k} is not a section")
        node = nxt
    node[keys[-1]] = value


def shipped_configs() -> list[str]:
    """The names of the configs shipped in the package (``clpipe run NAME``)."""
    return sorted(f.stem for f in DEFAULT_CONFIG.parent.glob("*.yaml"))


def config_path(config: str | Path) -> Path:
    """A config file: a path, or the name of a shipped config (``fashion_mnist``)."""
    p = Path(config).expanduser()
    if p.is_file():
        return p
    if "/" not in str(config) and (DEFAULT_CONFIG.parent / f"{Path(str(config)).stem}.yaml").is_file():
        return DEFAULT_CONFIG.parent / f"{Path(str(config)).stem}.yaml"
    raise ConfigError(
        f"{config}: config file not found; give a YAML path or a shipped config: {', '.join(shipped_configs())}"
    )


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Default config <- YAML file <- ``--set`` overrides, validated once at the end."""
    data: dict = yaml.safe_load(DEFAULT_CONFIG.read_text()) or {}
    source = str(path) if path else "default config"
    if path is not None:
        p = config_path(path)
        try:
            user = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(
                f"{p}: not valid YAML{where}: {getattr(e, 'problem', None) or str(e).splitlines()[0]}"
            ) from e
        if not isinstance(user, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
        data = _merge(data, user)
    for o in overrides:
        apply_override(data, *parse_override(o))
    if overrides:
        source += " + --set"
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source, data)) from None


REPLACED_WHOLE = {("sweep", "space")}  # a file's search space replaces the default one instead of adding to it


def _merge(base: dict, over: dict, path: tuple[str, ...] = ()) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        here = (*path, k)
        merge = isinstance(v, dict) and isinstance(out.get(k), dict) and here not in REPLACED_WHOLE
        out[k] = _merge(out[k], v, here) if merge else v
    return out


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
