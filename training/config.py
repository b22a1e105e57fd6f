"""The one typed configuration of ``dino train``: paper defaults, loadable from YAML, CLI overrides.

Precedence: dataclass defaults < ``--config FILE.yaml`` < command-line flags. The effective config
is written to ``OUTPUT_DIR/config.yaml`` so that every run documents itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import tokenize
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import yaml


@dataclass
class TrainConfig:
    """Hyper-parameters of a DINO run. Defaults follow Caron et al. 2021 (ViT-S/16, ImageNet)."""

    # data and output
    data: str = ""  #: image folder (recursive; labels ignored)
    output_dir: str = "runs/dino"  #: checkpoints, logs, curves; rerunning the command resumes here
    # model
    arch: str = "vit_small"  #: vit_tiny | vit_small | vit_base
    patch_size: int = 16  #: 16 or 8 (4 for 32 px images)
    drop_path_rate: float = 0.1  #: stochastic depth of the student
    out_dim: int = 65536  #: K, prototypes of the DINO head
    head_bn: bool = False  #: batch norm in the head's MLP (helps small CPU runs)
    norm_last_layer: bool = True  #: freeze the weight-norm gain of the head's last layer
    head_hidden_dim: int = 2048  #: width of the head's MLP
    head_bottleneck_dim: int = 256  #: bottleneck before the weight-normalised last layer
    # multi-crop
    global_size: int = 224  #: side of the 2 global crops (teacher and student), px
    local_size: int = 96  #: side of the local crops (student only), px
    local_crops: int = 8  #: local crops per image (0: global crops only)
    global_scale: tuple[float, float] = (0.4, 1.0)  #: area range of the global crops (RandomResizedCrop)
    local_scale: tuple[float, float] = (0.05, 0.4)  #: area range of the local crops
    # optimisation
    epochs: int = 100  #: passes over the data
    batch_size: int = 64  #: global batch size (split over processes)
    lr: float = 0.0005  #: base learning rate at batch 256; the effective rate is lr * batch / 256
    min_lr: float = 1e-6  #: learning rate at the end of the cosine schedule
    warmup_epochs: float = 10  #: linear learning-rate warm-up
    weight_decay: float = 0.04  #: start of the cosine weight-decay schedule
    weight_decay_end: float = 0.4  #: end of the cosine weight-decay schedule
    clip_grad: float = 3.0  #: clip each parameter's gradient to this L2 norm (as the reference); 0 disables
    freeze_last_layer: int = 1  #: epochs during which the head's last layer is not updated
    # teacher
    teacher_momentum: float = 0.996  #: start of the cosine EMA schedule
    teacher_momentum_end: float = 1.0  #: end of the cosine EMA schedule
    teacher_temp: float = 0.04  #: final teacher temperature
    warmup_teacher_temp: float = 0.04  #: teacher temperature at the start of its warm-up
    warmup_teacher_temp_epochs: int = 0  #: linear warm-up of the teacher temperature
    student_temp: float = 0.1  #: student softmax temperature
    center_momentum: float = 0.9  #: EMA momentum of the centre subtracted from the teacher's output
    # runtime
    device: str = "auto"  #: auto | cpu | cuda
    precision: str = "auto"  #: auto (bf16 on CUDA and on CPUs with AVX512_BF16/AMX, else fp32) | fp32 | bf16
    compile: bool = False  #: torch.compile the student and teacher
    num_workers: int = 4  #: data-loading processes
    seed: int = 0  #: seed of initialisation, shuffling and augmentation
    save_every_steps: int = 0  #: also checkpoint every N steps (0: only at epoch ends)
    log_every_steps: int = 10  #: write a step record to log.jsonl every N steps
    max_steps_per_epoch: int = 0  #: cap the steps of each epoch (0: whole dataset); for smoke runs
    # k-NN monitoring during training (DINO protocol)
    knn_train: str = ""  #: labelled ImageFolder used as the k-NN gallery
    knn_val: str = ""  #: labelled ImageFolder used as queries
    knn_every: int = 1  #: evaluate every K epochs (and before training); 0: only at the end
    knn_k: int = 20  #: neighbours that vote
    knn_temperature: float = 0.07  #: temperature of the vote weights exp(similarity / T)
    knn_max_images: int = 0  #: cap per split (0: all), evenly across classes
    knn_image_size: int = 0  #: 0: the global crop size

    def __post_init__(self) -> None:
        # YAML and argparse give lists: back to (min, max) pairs (a wrong length is a ValueError)
        global_min, global_max = self.global_scale
        local_min, local_max = self.local_scale
        self.global_scale = (float(global_min), float(global_max))
        self.local_scale = (float(local_min), float(local_max))
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        for name in ("epochs", "batch_size", "out_dim", "global_size", "local_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.local_crops < 0:
            raise ValueError("local_crops must be >= 0")
        if self.knn_every < 0:
            raise ValueError("knn_every must be >= 0 (0: only at the end)")

    @property
    def ncrops(self) -> int:
        return 2 + self.local_crops

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of config keys")
        return cls.from_dict(values)


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """The ``#:`` comment of each field of a config dataclass, read from its source: the comments are
    the documentation, and ``--help`` shows them. Empty when the source is not available."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    names = {f.name for f in fields(cls)}
    comments: dict[str, str] = {}
    line_field: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NAME and token.start[1] == 4 and token.string in names:
            line_field.setdefault(token.start[0], token.string)
        elif token.type == tokenize.COMMENT and token.string.startswith("#:") and token.start[0] in line_field:
            comments[line_field[token.start[0]]] = token.string[2:].strip()
    return comments


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser, cls=TrainConfig) -> None:
    """One ``--flag`` per config field (default None, so unset flags do not override YAML)."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    parser.add_argument("--config", help="YAML file with config keys (flags override it)")
    for f in fields(cls):
        hint = hints[f.name]
        kwargs: dict = {"default": None, "dest": f.name}
        if hint is bool:
            kwargs.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
        elif typing.get_origin(hint) is tuple:
            kwargs.update(nargs=2, type=float, metavar=("MIN", "MAX"))
        else:
            kwargs["type"] = hint
        default = f.default if f.default is not dataclasses.MISSING else None
        comment = comments.get(f.name)
        kwargs["help"] = f"{comment} (default: {default})" if comment else f"(default: {default})"
        parser.add_argument(_flag(f.name), **kwargs)


def config_from_args(args: argparse.Namespace, cls=TrainConfig):
    """Defaults < YAML (``args.config``) < flags that were given."""
    values: dict = {}
    if getattr(args, "config", None):
        values.update(yaml.safe_load(Path(args.config).read_text()) or {})
    for f in fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    return cls.from_dict(values)
