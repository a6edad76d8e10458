"""Pictures of per-class results, drawn with matplotlib (imported only when one is drawn): the
confusion matrix of a classifier and, for two objects an image (MultiMNIST), the accuracy per
pair of classes. Each comes back as an image ``[3, H, W]`` in [0, 1] for TensorBoard and PNG files."""

from __future__ import annotations

import math

import numpy as np
import torch


def _image(fig) -> torch.Tensor:
    """A matplotlib figure as ``[3, H, W]`` in [0, 1] (the figure is closed)."""
    import matplotlib.pyplot as plt

    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    plt.close(fig)
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).float() / 255


def per_class_image(per_class: dict[str, list], prefix: str, title: str = "") -> torch.Tensor | None:
    """The picture of :class:`capsrun.metrics.Confusion`'s lists under ``prefix`` (``test``):
    the confusion matrix (each cell its count, shaded by its share of the row; rows are the true
    classes, labelled with their accuracy), or the pair accuracies (%, shaded) with each class's
    accuracy on the left. None when there is neither."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracy = per_class.get(f"{prefix}/class_accuracy")
    confusion = per_class.get(f"{prefix}/confusion")
    pairs = per_class.get(f"{prefix}/pair_accuracy")
    if accuracy is None or (confusion is None and pairs is None):
        return None
    k = len(accuracy)
    if confusion is not None:
        counts = np.asarray(confusion, dtype=float)
        shade = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        cells = [[f"{int(c)}" for c in row] for row in counts]
        what = f"{prefix} confusion matrix ({int(counts.sum())} images): rows true, columns predicted"
    else:
        shade = np.asarray([[math.nan if v is None else v / 100 for v in row] for row in pairs], dtype=float)
        cells = [["" if v is None else f"{v:.0f}" for v in row] for row in pairs]
        what = f"{prefix} accuracy (%) per pair of digits: both found in the top two"
    size = max(4.5, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=100)
    ax.imshow(np.ma.masked_invalid(shade), cmap="Blues", vmin=0, vmax=1)
    small = "x-small" if k > 12 else "small"
    for i in range(k):
        for j in range(k):
            if cells[i][j]:
                dark = not math.isnan(shade[i, j]) and shade[i, j] > 0.6
                ax.text(j, i, cells[i][j], ha="center", va="center", fontsize=small, color="white" if dark else "black")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_yticklabels([f"{c}  {'-' if a is None else f'{a:.1f}%'}" for c, a in enumerate(accuracy)], fontsize=small)
    ax.set_xlabel("predicted" if confusion is not None else "digit")
    ax.set_ylabel("true class (its accuracy)" if confusion is not None else "digit (found in the top two)")
    ax.set_title(f"{title}\n{what}" if title else what, fontsize="small")
    fig.tight_layout()
    return _image(fig)
