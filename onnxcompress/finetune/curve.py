"""The training curve of a fine-tune run as a PNG: training and held-out loss, held-out accuracy.

Drawn from `TrainResult.history` (what the `finetune` pass puts in its report notes) so a
user sees whether early stopping stopped where the held-out curve turned. Needs matplotlib;
without it nothing is drawn (a warning says so). No torch here.
"""

from __future__ import annotations

__all__ = ["curve_png"]

import io
import logging
from collections.abc import Mapping, Sequence

logger = logging.getLogger(__name__)


def curve_png(history: Sequence[Mapping[str, float]], best_epoch: int | None = None) -> bytes | None:
    """The loss curves (left axis) and held-out accuracy (right axis) per epoch, or None."""
    if not history:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: the fine-tune curve is not drawn (pip install matplotlib)")
        return None
    epochs = [row["epoch"] for row in history]
    figure, axes = plt.subplots(figsize=(6.5, 4), dpi=100)
    axes.plot(epochs, [row["loss"] for row in history], marker="o", markersize=3, label="training loss")
    if all("held_out_loss" in row for row in history):
        axes.plot(epochs, [row["held_out_loss"] for row in history], marker="o", markersize=3, label="held-out loss")
    axes.set_xlabel("epoch")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    handles, labels = axes.get_legend_handles_labels()
    if all("held_out_accuracy" in row for row in history):
        right = axes.twinx()
        right.plot(epochs, [100 * row["held_out_accuracy"] for row in history], color="tab:green", marker="s",
                   markersize=3, label="held-out accuracy (%)")
        right.set_ylabel("held-out accuracy (%)")
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    if best_epoch:
        axes.axvline(best_epoch, color="grey", linestyle="--", linewidth=1)
        labels.append(f"kept: epoch {best_epoch}")
        handles.append(axes.lines[-1])
    axes.legend(handles, labels, fontsize=8, loc="upper right")
    axes.set_title("fine-tuning")
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", metadata={"Software": None})
    plt.close(figure)
    return image.getvalue()
