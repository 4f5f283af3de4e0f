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


def plot_curve(curve: dict, path: str | Path, final: int | None = None) -> None:
    """Write a PNG of the removal curve (:meth:`gradmap.methods.budget.QualityBudget.as_dict`): held-out calibration
    perplexity after each removal (with the budget's limit and the test PPL at the evaluated counts) on the left;
    decoder parameters removed and the measured forward tokens/s on the right.

    Args:
        curve: the curve dict (``curve`` list of points; optional ``limit``, ``test_ppl``, ``stopped``).
        path: PNG file to write.
        final: the removed-layer count of the saved model (marked).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = curve["curve"]
    xs = [p["removed"] for p in points]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    a.plot(xs, [p["holdout_ppl"] for p in points], marker="o", lw=1.5, label="held-out calibration PPL")
    if curve.get("limit"):
        a.axhline(curve["limit"], color="red", ls="--", lw=1,
                  label=f"budget: dense + {curve['max_ppl_increase']:g} %")
    test = {int(k): v for k, v in (curve.get("test_ppl") or {}).items()}
    if test:
        a.scatter(sorted(test), [test[k] for k in sorted(test)], marker="^", s=60, color="black", zorder=3,
                  label="test PPL (saved models, compensated)")
    if curve.get("stopped"):
        a.scatter([len(points)], [curve["stopped"]["holdout_ppl"]], marker="x", s=70, color="red", zorder=3,
                  label=f"refused: layer {curve['stopped']['layer']}")
    if final is not None:
        a.axvline(final, color="gray", lw=1, alpha=0.5)
    a.set_xlabel("decoder layers removed")
    a.set_ylabel("perplexity")
    a.set_yscale("log")
    a.grid(alpha=0.3, which="both")
    a.legend(fontsize=7)
    a.set_title("quality along the removal order")
    b.bar(xs, [p["params_removed"] / 1e6 for p in points], color="tab:blue", alpha=0.4, label="parameters removed (M)")
    b.set_xlabel("decoder layers removed")
    b.set_ylabel("decoder parameters removed (millions)")
    b2 = b.twinx()
    b2.plot(xs, [p["tokens_per_s"] for p in points], marker=".", color="tab:orange", label="forward tokens/s")
    b2.set_ylabel("measured forward tokens/s (held-out windows)")
    b.set_title("size and speed along the removal order")
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
