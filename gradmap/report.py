"""Run reports: package versions, the JSON report and the plot of the layer scores per step."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

import torch

_PACKAGES = ("gradmap", "torch", "transformers", "triton", "accelerate", "safetensors", "tokenizers", "numpy")


def environment() -> dict:
    """Versions of Python, the packages gradmap depends on, and the machine (for every report)."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": versions,
            "torch_threads": torch.get_num_threads(), "cuda": torch.version.cuda}


def plot_scores(steps: list[dict], path: str | Path, title: str = "layer scores per step") -> None:
    """Write a PNG: one line per pruning step, score against ORIGINAL layer index, removed layer marked.

    Args:
        steps: report steps, each ``{"scores": {orig_index: score}, "removed": orig_index}``.
        path: PNG file to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    cmap = plt.get_cmap("viridis")
    for k, step in enumerate(steps):
        scores = {int(i): float(s) for i, s in step["scores"].items()}
        xs = sorted(scores)
        color = cmap(k / max(len(steps) - 1, 1))
        ax.plot(xs, [scores[x] for x in xs], marker=".", lw=1, color=color, label=f"step {k + 1}")
        victim = int(step["removed"])
        ax.scatter([victim], [scores[victim]], s=80, facecolors="none", edgecolors="red", zorder=3)
    ax.set_xlabel("decoder layer (original index)")
    ax.set_ylabel("score (lower = removed first)")
    ax.set_title(title + " (red circle = removed at that step)")
    ax.grid(alpha=0.3)
    if len(steps) <= 12:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
