"""Planning figures (PNG, matplotlib Agg): a bird's-eye sketch of one sample (ego box, obstacles, history, ground
truth and predicted trajectory) and the planner's expert usage per scenario class. `*_figure` builds a figure
(for TensorBoard's `add_figure`), `plot_*` saves it atomically."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: training nodes have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from mose_lightning.io import atomic_write_bytes  # noqa: E402
from mose_lightning.planning.geometry import EGO_LENGTH, EGO_WIDTH  # noqa: E402

LANE_WIDTH = 3.5


def _save(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _box(ax, x: float, y: float, length: float, width: float, **style) -> None:
    # Plot axes: lateral y to the right of the page is the ego's right (y points left), forward x up the page.
    ax.add_patch(Rectangle((-y - width / 2, x - length / 2), width, length, **style))


def bev_figure(record: Mapping, title: Optional[str] = None):
    """Bird's-eye sketch in the ego frame: forward is up, the ego's left is left. `record` has `reference` and
    `prediction` ((H, 2) lists, either may be None), and optionally `history` and `obstacles`."""
    fig, ax = plt.subplots(figsize=(2.8, 4.2))
    paths = [np.asarray(record[k], dtype=float) for k in ("reference", "prediction", "history") if record.get(k)]
    far = max([float(p[:, 0].max()) for p in paths] + [10.0]) + 6.0
    near = min([float(p[:, 0].min()) for p in paths] + [0.0]) - 4.0
    for lane in (-1.5, -0.5, 0.5, 1.5):
        ax.axvline(lane * LANE_WIDTH, color="0.75", lw=0.8, ls="-" if abs(lane) == 1.5 else "--", zorder=0)
    for o in record.get("obstacles") or []:
        (cx, cy), (length, width) = o["center"], o["size"]
        if o["kind"] == "stop_zone":
            _box(ax, cx, cy, length, width, facecolor="orange", alpha=0.25, edgecolor="darkorange", hatch="//")
        else:
            _box(ax, cx, cy, length, width, facecolor="firebrick", alpha=0.8)
            vx, vy = o.get("velocity", (0.0, 0.0))
            if abs(vx) + abs(vy) > 0:
                ax.annotate("", xy=(-(cy + vy), cx + vx), xytext=(-cy, cx),
                            arrowprops=dict(arrowstyle="->", color="firebrick", lw=1))
    _box(ax, 0.0, 0.0, EGO_LENGTH, EGO_WIDTH, facecolor="none", edgecolor="black", lw=1.2)
    styles = {"history": dict(color="0.5", marker=".", ls=":", label="history"),
              "reference": dict(color="tab:green", marker="o", ms=3, label="ground truth"),
              "prediction": dict(color="tab:blue", marker="x", ms=4, label="prediction")}
    for key, style in styles.items():
        if record.get(key):
            p = np.asarray(record[key], dtype=float)
            if key != "history":
                p = np.vstack([np.zeros((1, 2)), p])
            ax.plot(-p[:, 1], p[:, 0], lw=1.3, **style)
    ax.set_xlim(-2.2 * LANE_WIDTH, 2.2 * LANE_WIDTH)
    ax.set_ylim(near, far)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.tick_params(labelsize=6)
    ax.set_ylabel("forward (m)", fontsize=7)
    ax.set_title(title or str(record.get("key", "")), fontsize=7)
    fig.legend(*ax.get_legend_handles_labels(), fontsize=6, loc="lower center", ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def plot_bev(record: Mapping, path: str | os.PathLike, title: Optional[str] = None) -> Path:
    return _save(bev_figure(record, title), path, dpi=100)


def expert_by_class_figure(counts: np.ndarray, class_names: Sequence[str], title: str):
    """Heatmap of how often each planner expert is chosen per scenario class (rows normalised to fractions)."""
    counts = np.asarray(counts, dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    fig, ax = plt.subplots(figsize=(1.6 + 0.6 * counts.shape[1], 1.0 + 0.35 * counts.shape[0]))
    im = ax.imshow(frac, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(counts.shape[1]))
    ax.set_xlabel("planner expert")
    ax.set_yticks(range(counts.shape[0]))
    ax.set_yticklabels([f"{n} ({int(t)})" for n, t in zip(class_names, totals[:, 0])], fontsize=8)
    fig.colorbar(im, ax=ax, label="fraction of trajectories")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_expert_by_class(counts: np.ndarray, class_names: Sequence[str], path: str | os.PathLike, title: str) -> Path:
    return _save(expert_by_class_figure(counts, class_names, title), path)
