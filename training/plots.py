"""Training curves PNG from the JSONL log (loss, learning rate, k-NN accuracy, collapse monitors)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


def read_log(path: str | Path) -> list[dict]:
    records = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line torn by a crash mid-write: skip it
    return records


def plot_curves(log_path: str | Path, output: str | Path, title: str = "") -> Path:
    """Write a 2x2 figure: loss per step, lr per step, k-NN top-1 per epoch, entropy/KL per epoch."""
    records = read_log(log_path)
    steps = [r for r in records if r.get("type") == "step"]
    epochs = [r for r in records if r.get("type") == "epoch"]
    knn = [r for r in records if r.get("type") == "knn"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0, 0]
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8)
    ax.set(title="DINO loss", xlabel="step")
    ax = axes[0, 1]
    ax.plot([r["step"] for r in steps], [r["lr"] for r in steps], lw=0.8, label="lr")
    ax.set(title="learning rate", xlabel="step")
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in steps], [r["teacher_momentum"] for r in steps], color="C1", lw=0.8)
    ax2.set_ylabel("teacher momentum", color="C1")
    ax = axes[1, 0]
    if knn:
        ax.plot([r["epoch"] for r in knn], [r["top1"] for r in knn], "o-", label="teacher top-1")
        ax.plot([r["epoch"] for r in knn], [r["top5"] for r in knn], "s--", alpha=0.6, label="teacher top-5")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no k-NN evaluation\n(--knn-train/--knn-val)", ha="center", va="center")
    ax.set(title="k-NN accuracy (%)", xlabel="epoch")
    ax = axes[1, 1]
    if epochs:
        ax.plot([r["epoch"] for r in epochs], [r["teacher_entropy"] for r in epochs], "o-", label="teacher entropy")
        ax.plot([r["epoch"] for r in epochs], [r["kl_teacher_student"] for r in epochs], "s-", label="KL(t||s)")
        ax.axhline(epochs[-1]["teacher_entropy_max"], color="gray", ls=":", label="log K")
        ax.legend()
    ax.set(title="collapse monitors (nats)", xlabel="epoch")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    output = Path(output)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
