"""The DINO training loop (Caron et al. 2021, Algorithm 1) and the ``dino train`` command.

Student and teacher are two separate networks of the same architecture (backbone + DINO head). Only
the student receives gradients; the teacher is an exponential moving average of the student
("momentum teacher"), sees only the 2 global crops, and its output is centred and sharpened.

Runs on one CPU, one GPU, or several processes under ``torchrun`` (DDP; gloo on CPU, NCCL on CUDA).
Rerunning the same command resumes from ``OUTPUT_DIR/checkpoint.pth``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from training.augmentation import MultiCropAugmentation
from training.backbone import build_backbone, set_fused_attention
from training.batchnorm import convert_to_all_reduce_batchnorm
from training.checkpoint import CHECKPOINT_NAME, load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from training.config import TrainConfig, add_config_arguments, config_from_args
from training.data import DataError, UnlabelledImageFolder, collate_skip_none
from training.distributed import (
    DeviceError,
    init_distributed,
    is_main_process,
    resolve_device,
    resolve_precision,
    shutdown_distributed,
)
from training.gradients import cancel_last_layer_gradients, clip_gradients
from training.head import DINOHead
from training.knn import evaluate_knn
from training.loss import DINOLoss
from training.monitors import CollapseMonitor, collapse_metrics
from training.multicrop import MultiCropWrapper
from training.schedules import cosine_schedule, teacher_temp_schedule
from training.weights import WeightsError

log = logging.getLogger("dino.train")

LOG_NAME = "log.jsonl"
CURVES_NAME = "curves.png"
CONFIG_NAME = "config.yaml"
#: seeds of successive epochs are spaced so that per-rank offsets never collide
EPOCH_SEED_STRIDE = 1000


class EpochSampler(Sampler[int]):
    """Shuffled indices that depend only on (seed, epoch), split across ranks, resumable mid-epoch.

    Each rank takes a strided share of the same permutation (like DistributedSampler with
    ``drop_last``); ``skip`` drops the samples a resumed run has already trained on.
    """

    def __init__(self, n: int, rank: int, world_size: int, seed: int, samples_per_rank: int):
        self.n, self.rank, self.world_size, self.seed = n, rank, world_size, seed
        self.samples_per_rank = samples_per_rank
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g)
        mine = order[self.rank :: self.world_size][: self.samples_per_rank]
        return iter(mine[self.skip :].tolist())

    def __len__(self) -> int:
        return self.samples_per_rank - self.skip


def param_groups(model: nn.Module) -> list[dict]:
    """Weight decay on weights only: biases and norm parameters (1-D) are not regularised."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_student_teacher(cfg: TrainConfig) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student (with stochastic depth) and teacher (without), starting from the same weights."""

    def head(embed_dim: int) -> DINOHead:
        return DINOHead(
            embed_dim,
            cfg.out_dim,
            cfg.head_hidden_dim,
            cfg.head_bottleneck_dim,
            use_bn=cfg.head_bn,
            norm_last_layer=cfg.norm_last_layer,
        )

    s_backbone = build_backbone(cfg.arch, cfg.patch_size, cfg.global_size, cfg.drop_path_rate)
    t_backbone = build_backbone(cfg.arch, cfg.patch_size, cfg.global_size, 0.0)
    student = MultiCropWrapper(s_backbone, head(s_backbone.embed_dim))
    teacher = MultiCropWrapper(t_backbone, head(t_backbone.embed_dim))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher = m * teacher + (1 - m) * student, over parameters (Eq. in Sec. 3.1)."""
    t_params: list[torch.Tensor] = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


class JsonlLog:
    """Append-only JSON lines log, flushed per record so that a crash loses at most one line."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def set_aside(self) -> Path | None:
        """Move a log left by an earlier run (whose checkpoint is gone) to ``*.previous``, so that
        the curves of a fresh run do not mix two runs. Returns where it went, if anywhere."""
        if not (self.enabled and self.path.exists()):
            return None
        previous = self.path.with_name(self.path.name + ".previous")
        self.path.replace(previous)
        return previous


# ---------------------------------------------------------------- training


class Trainer:
    """One DINO run: builds everything from a ``TrainConfig`` and trains to ``cfg.epochs``."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        device = resolve_device(cfg.device)
        self.rank, self.world_size, self.device = init_distributed(device)
        self.main = self.rank == 0
        if cfg.batch_size % self.world_size:
            raise DataError(f"batch size {cfg.batch_size} is not divisible by the {self.world_size} processes")
        self.batch_per_rank = cfg.batch_size // self.world_size
        precision = resolve_precision(cfg.precision, self.device)
        # bf16 has fp32's exponent range: no loss scaling (the reference's fp16 GradScaler) is needed
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
        self.precision = precision

        self.out.mkdir(parents=True, exist_ok=True)
        self.augmentation = MultiCropAugmentation(
            cfg.global_size, cfg.local_size, cfg.local_crops, cfg.global_scale, cfg.local_scale
        )
        self.dataset = UnlabelledImageFolder(cfg.data, self.augmentation)
        self.steps_per_epoch = len(self.dataset) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"{len(self.dataset)} images are fewer than one batch of {cfg.batch_size}")
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        self.sampler = EpochSampler(
            len(self.dataset), self.rank, self.world_size, cfg.seed, self.steps_per_epoch * self.batch_per_rank
        )
        self.loader_generator = torch.Generator()
        self.loader = DataLoader(
            self.dataset,
            batch_size=self.batch_per_rank,
            sampler=self.sampler,
            num_workers=cfg.num_workers,
            collate_fn=collate_skip_none,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            generator=self.loader_generator,
            persistent_workers=False,
            prefetch_factor=4 if cfg.num_workers else None,
        )

        torch.manual_seed(cfg.seed)
        student, teacher = build_student_teacher(cfg)
        for model in (student, teacher):
            set_fused_attention(model, enabled=self.device.type == "cuda")
        if self.world_size > 1 and cfg.head_bn:
            # the head's batch norm sees the global batch, as the reference's SyncBatchNorm; torch's
            # SyncBatchNorm refuses CPU tensors, so gloo runs use an all-reduce batch norm instead
            if self.device.type == "cuda":
                student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
                teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
            else:
                bn_group = dist.new_group()  # its own group: never interleaved with DDP's all-reduces
                student = cast(MultiCropWrapper, convert_to_all_reduce_batchnorm(student, bn_group))
                teacher = cast(MultiCropWrapper, convert_to_all_reduce_batchnorm(teacher, bn_group))
        self.student_module = student.to(self.device)
        self.teacher = teacher.to(self.device)
        self.student: nn.Module = (
            nn.parallel.DistributedDataParallel(
                self.student_module, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            if self.world_size > 1
            else self.student_module
        )
        if cfg.compile:
            self.student = cast(nn.Module, torch.compile(self.student))  # an OptimizedModule
            self.teacher_forward = torch.compile(self.teacher)
        else:
            self.teacher_forward = self.teacher
        self.loss_fn = DINOLoss(cfg.out_dim, cfg.ncrops, cfg.student_temp, cfg.center_momentum).to(self.device)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.student_module), fused=True if self.device.type == "cuda" else None
        )

        n = self.steps_per_epoch
        lr_peak = cfg.lr * cfg.batch_size / 256  # linear scaling rule
        self.lr_schedule = cosine_schedule(lr_peak, cfg.min_lr, cfg.epochs, n, cfg.warmup_epochs)
        self.wd_schedule = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, n)
        self.momentum_schedule = cosine_schedule(cfg.teacher_momentum, cfg.teacher_momentum_end, cfg.epochs, n)
        self.teacher_temps = teacher_temp_schedule(
            cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_temp_epochs, cfg.epochs
        )
        self.log = JsonlLog(self.out / LOG_NAME, self.main)
        self.monitor = CollapseMonitor(cfg.out_dim)
        self.start_epoch, self.start_step_in_epoch, self.global_step = 0, 0, 0
        self.last_knn: dict | None = None
        self.skipped_images = 0

    # ------------------------------------------------------------ checkpoints

    def state(self, epoch: int, step_in_epoch: int) -> dict:
        return {
            "student": self.student_module.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "dino_loss": self.loss_fn.state_dict(),
            "epoch": epoch,  # epochs completed
            "step_in_epoch": step_in_epoch,  # steps of epoch `epoch` already done (mid-epoch saves)
            "step": self.global_step,
            "config": self.cfg.to_dict(),
            "rng": rng_state(),
            "knn": self.last_knn,
            "skipped_images": self.skipped_images,
        }

    def save(self, epoch: int, step_in_epoch: int = 0) -> None:
        if self.main:
            save_checkpoint(self.state(epoch, step_in_epoch), self.out / CHECKPOINT_NAME)

    def maybe_resume(self) -> None:
        path = self.out / CHECKPOINT_NAME
        if not path.exists():
            previous = self.log.set_aside()
            if previous is not None:
                log.info("no checkpoint in %s: starting afresh; the earlier run's log is now %s", self.out, previous)
            return
        ckpt = load_checkpoint(path)
        self.student_module.load_state_dict(ckpt["student"])
        self.teacher.load_state_dict(ckpt["teacher"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.loss_fn.load_state_dict(ckpt["dino_loss"])  # a "scaler" entry of older checkpoints is unused
        restore_rng_state(ckpt["rng"])
        self.start_epoch, self.start_step_in_epoch = ckpt["epoch"], ckpt.get("step_in_epoch", 0)
        self.global_step = ckpt["step"]
        self.last_knn = ckpt.get("knn")
        self.skipped_images = ckpt.get("skipped_images", 0)
        log.info("resumed from %s at epoch %d, step %d", path, self.start_epoch, self.global_step)

    # ------------------------------------------------------------ evaluation

    def run_knn(self, epoch: int) -> None:
        cfg = self.cfg
        if not (cfg.knn_train and cfg.knn_val):
            return
        if self.main:
            t0 = time.time()
            knn = evaluate_knn(
                self.teacher.backbone,
                cfg.knn_train,
                cfg.knn_val,
                cfg.knn_image_size or cfg.global_size,
                self.device,
                cfg.knn_k,
                cfg.knn_temperature,
                cfg.knn_max_images,
                num_workers=min(cfg.num_workers, 2),
            )
            record = {**knn, "type": "knn", "epoch": epoch, "seconds": round(time.time() - t0, 1)}
            self.last_knn = record
            self.log.write(record)
            log.info(
                "epoch %d k-NN top-1 %.2f%% top-5 %.2f%% (%.0fs)", epoch, knn["top1"], knn["top5"], record["seconds"]
            )
        if self.world_size > 1:
            dist.barrier()

    # ------------------------------------------------------------ the loop

    def train_step(self, crops: list[torch.Tensor], epoch: int, it: int) -> dict:
        cfg = self.cfg
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = self.lr_schedule[it]
            if i == 0:
                group["weight_decay"] = self.wd_schedule[it]
        crops = [c.to(self.device, non_blocking=True) for c in crops]
        teacher_temp = float(self.teacher_temps[epoch])
        autocast = torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()
        with autocast:
            with torch.no_grad():
                teacher_out = self.teacher_forward(crops[:2])
            student_out = self.student(crops)
            center_before = self.loss_fn.center.clone()
            loss = self.loss_fn(student_out, teacher_out, teacher_temp)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.global_step}; stopping")

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if epoch < cfg.freeze_last_layer:
            # frozen during the first epoch(s), which stabilises early training (paper, App.)
            cancel_last_layer_gradients(cast(DINOHead, self.student_module.head).last_layer)
        # per parameter, as the reference; cancelled gradients take no part. With clip_grad 0 this
        # only measures (total_grad_norm in the log)
        clip = clip_gradients(self.student_module.parameters(), cfg.clip_grad)
        self.optimizer.step()
        momentum = float(self.momentum_schedule[it])
        update_teacher(self.student_module, self.teacher, momentum)

        batch = crops[0].shape[0]
        entropy, kl = collapse_metrics(
            student_out[: 2 * batch], teacher_out, center_before, teacher_temp, cfg.student_temp
        )
        self.monitor.update(entropy, kl)
        return {
            "loss": loss.item(),
            "lr": float(self.lr_schedule[it]),
            "wd": float(self.wd_schedule[it]),
            "teacher_momentum": momentum,
            "teacher_temp": teacher_temp,
            "entropy": entropy,
            "kl": kl,
            "clipped_params": clip.clipped_params,
            "total_grad_norm": clip.total_grad_norm,
            "total_norm_rule_clips": clip.total_norm_rule_clips,
        }

    def train(self) -> dict:
        cfg = self.cfg
        self.maybe_resume()
        if self.main:
            cfg.save(self.out / CONFIG_NAME)
            log.info(
                "DINO %s/%d on %s: %d images, %d steps/epoch, global batch %d (%d process%s), %s, %s",
                cfg.arch,
                cfg.patch_size,
                self.device,
                len(self.dataset),
                self.steps_per_epoch,
                cfg.batch_size,
                self.world_size,
                "es" if self.world_size > 1 else "",
                self.precision,
                f"lr {cfg.lr * cfg.batch_size / 256:.2e}",
            )
        if self.start_epoch == 0 and self.start_step_in_epoch == 0 and self.last_knn is None:
            self.run_knn(0)

        summary: dict = {}
        for epoch in range(self.start_epoch, cfg.epochs):
            skip_steps = self.start_step_in_epoch if epoch == self.start_epoch else 0
            # everything random in an epoch (order, augmentation, drop path) derives from (seed, epoch),
            # so a run resumed at an epoch boundary reproduces the uninterrupted run exactly
            epoch_seed = cfg.seed + epoch * EPOCH_SEED_STRIDE + skip_steps
            torch.manual_seed(epoch_seed + self.rank)
            np.random.seed((epoch_seed + self.rank) % 2**32)
            self.loader_generator.manual_seed(epoch_seed + self.rank)
            self.sampler.set_epoch(epoch, skip_steps * self.batch_per_rank)
            self.monitor.reset()
            summary = self.train_epoch(epoch, skip_steps)
            if epoch + 1 == cfg.epochs or (cfg.knn_every and (epoch + 1) % cfg.knn_every == 0):
                self.run_knn(epoch + 1)
            self.save(epoch + 1)
            if self.main:
                self.write_curves()
        result = {"epochs": cfg.epochs, "steps": self.global_step, "knn": self.last_knn, **summary}
        if self.world_size > 1:
            result["center_max_diff_across_ranks"] = self.center_spread()
        return result

    def center_spread(self) -> float:
        """Largest difference between any rank's loss centre and rank 0's (0 when in sync)."""
        gathered = [torch.zeros_like(self.loss_fn.center) for _ in range(self.world_size)]
        dist.all_gather(gathered, self.loss_fn.center)
        spread = max((c - gathered[0]).abs().max().item() for c in gathered)
        if self.main:
            log.info("loss centre across %d ranks: max difference %.3g", self.world_size, spread)
        return spread

    def agree_on_batch(self, crops: list[torch.Tensor] | None, skipped: int) -> bool:
        """Whether every process has images for this step; counts the unreadable images of all.

        A batch whose images were all unreadable leaves its process without a step. The others would
        then wait for it in the step's all-reduces forever, so all processes take the decision
        together: one all-reduce of (processes without a batch, skipped images), and the step is
        skipped everywhere if any process has no batch.
        """
        empty = int(crops is None)
        if self.world_size > 1:
            flags = torch.tensor([empty, skipped], dtype=torch.int64, device=self.device)
            dist.all_reduce(flags)
            empty, skipped = (int(v) for v in flags.tolist())
        self.skipped_images += skipped
        if empty and self.main:
            log.warning(
                "step skipped: the batch of %d of %d process(es) had only unreadable images", empty, self.world_size
            )
        return not empty

    def train_epoch(self, epoch: int, skip_steps: int) -> dict:
        cfg = self.cfg
        self.student.train()
        self.teacher.train()  # batch statistics in the teacher head (as the reference); no dropout anywhere
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=skip_steps,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not self.main,
            dynamic_ncols=True,
        )
        images = 0
        losses: list[float] = []
        clip_steps = {"per_param": 0, "total_norm": 0}  # steps whose gradients each rule changed
        data_wait = compute = 0.0
        t_epoch = tick = time.perf_counter()
        for i, (crops, skipped) in enumerate(self.loader, start=skip_steps):
            t_data = time.perf_counter()
            data_wait += t_data - tick
            if not self.agree_on_batch(crops, skipped):
                tick = time.perf_counter()
                continue
            assert crops is not None  # every rank has a batch
            it = epoch * self.steps_per_epoch + i
            metrics = self.train_step(crops, epoch, it)
            clip_steps["per_param"] += metrics["clipped_params"] > 0
            clip_steps["total_norm"] += metrics["total_norm_rule_clips"]
            self.global_step += 1
            n = crops[0].shape[0] * self.world_size
            images += n
            losses.append(metrics["loss"])
            tick = time.perf_counter()
            compute += tick - t_data
            img_s = images / max(tick - t_epoch, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.1e}", img_s=f"{img_s:.1f}")
            if self.global_step % cfg.log_every_steps == 0 or i == self.steps_per_epoch - 1:
                self.log.write(
                    {"type": "step", "epoch": epoch, "step": self.global_step, "img_s": round(img_s, 2), **metrics}
                )
            if cfg.save_every_steps and self.global_step % cfg.save_every_steps == 0 and i + 1 < self.steps_per_epoch:
                self.save(epoch, i + 1)
        bar.close()
        elapsed = time.perf_counter() - t_epoch
        record = {
            "type": "epoch",
            "epoch": epoch + 1,
            "step": self.global_step,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "img_s": images / max(elapsed, 1e-9),
            "seconds": round(elapsed, 1),
            "data_wait_fraction": data_wait / max(data_wait + compute, 1e-9),
            "skipped_images": self.skipped_images,
            # share of steps where clipping changed a gradient: the reference's per-parameter rule
            # (applied) and the total-norm rule of clip_grad_norm_ (measured on the same gradients)
            "clip_share_per_param": clip_steps["per_param"] / max(len(losses), 1),
            "clip_share_total_norm": clip_steps["total_norm"] / max(len(losses), 1),
            **self.monitor.summary(),
        }
        self.log.write(record)
        if self.main:
            log.info(
                "epoch %d: loss %.4f, %.1f img/s, data wait %.0f%%, teacher entropy %.3f / %.3f, KL %.4f",
                epoch + 1,
                record["loss"],
                record["img_s"],
                100 * record["data_wait_fraction"],
                record["teacher_entropy"],
                record["teacher_entropy_max"],
                record["kl_teacher_student"],
            )
            if self.skipped_images:
                log.warning("%d unreadable image(s) skipped so far", self.skipped_images)
            warning = self.monitor.collapse_warning()
            if warning:
                log.warning("epoch %d: %s", epoch + 1, warning)
        return record

    def write_curves(self) -> None:
        from training.plots import plot_curves

        plot_curves(
            self.out / LOG_NAME,
            self.out / CURVES_NAME,
            title=f"DINO {self.cfg.arch}/{self.cfg.patch_size} on {'/'.join(Path(self.cfg.data).resolve().parts[-2:])}",
        )


# ---------------------------------------------------------------- command line: dino train


def setup_logging(output_dir: Path, main_process: bool) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(output_dir / "train.log"))
    logging.basicConfig(
        level=logging.INFO if main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        handlers=handlers,
        force=True,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TrainConfig)


def main(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args, TrainConfig)
    except (ValueError, TypeError, OSError) as exc:
        print(f"dino train: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if not cfg.data:
        print("dino train: --data is required (a folder of images)", file=sys.stderr)
        return 2
    setup_logging(Path(cfg.output_dir), is_main_process())
    try:
        trainer = Trainer(cfg)
        result = trainer.train()
    # no images, no device, an unreadable checkpoint to resume, a non-finite loss: a message, not a traceback
    except (DataError, DeviceError, WeightsError, FloatingPointError) as exc:
        print(f"dino train: {exc}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()
    if is_main_process():
        knn = result.get("knn")
        knn_text = f", k-NN top-1 {knn['top1']:.2f}%" if knn else ""
        print(
            f"done: {result['epochs']} epochs, {result['steps']} steps{knn_text}; "
            f"checkpoint {Path(cfg.output_dir) / CHECKPOINT_NAME}"
        )
    return 0
