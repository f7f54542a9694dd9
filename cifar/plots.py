"""The training curves of a run as a PNG: loss and test accuracy by epoch."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from repro.files import write_atomic


def plot_curves(records: list[dict[str, Any]], path: Path) -> bool:
    """Write ``path`` (PNG) from the metrics records of a run.

    Returns False, writing nothing, when matplotlib is not installed: the plot
    is a convenience, and a machine with torch and accelerate but no matplotlib
    (a GPU node's preinstalled image, say) must still train.
    """
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")  # no display on servers and in containers
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(9, 3.5))
    loss_axis.plot(epochs, [r["train_loss"] for r in records], marker="o", label="train")
    loss_axis.plot(epochs, [r["test_loss"] for r in records], marker="o", label="test")
    loss_axis.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    loss_axis.legend()
    accuracy_axis.plot(epochs, [100 * r["test_accuracy"] for r in records], marker="o", color="tab:green")
    accuracy_axis.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    image = io.BytesIO()
    try:
        figure.savefig(image, format="png", dpi=100)
    finally:
        plt.close(figure)
    # Rendered in memory, then written through a rename: a full disk or a kill while
    # writing leaves the previous plot, never a truncated PNG under its name.
    write_atomic(path, image.getvalue())
    return True
