"""Analysis figures (PNG, matplotlib Agg): skill-chain frequencies, expert usage, expert weight similarity (paper
Fig. 7, one model or several side by side), learning curves and data scaling (paper Fig. 8).

Each `*_figure` function builds a figure (for TensorBoard's `add_figure`); each `plot_*` saves it atomically and
returns the path.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # headless: training nodes have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mose_lightning.io import atomic_write_bytes  # noqa: E402


def _save(fig, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def predicted_chain(skill_chain: Sequence[Mapping]) -> Optional[str]:
    """'perception skill > prediction skill > ...' from a record's per-layer routing (None when empty).

    A level spans several MoE layers that may route differently; the level's skill is its most frequent one
    (ties: the earliest layer's), levels in the order they first appear.
    """
    if not skill_chain:
        return None
    per_level: Dict[str, List[str]] = {}
    for entry in sorted(skill_chain, key=lambda e: e.get("layer", 0)):
        per_level.setdefault(str(entry.get("level")), []).append(str(entry.get("skill")))
    parts = []
    for skills in per_level.values():
        counts = Counter(skills)
        best = max(counts.values())
        parts.append(next(s for s in skills if counts[s] == best))
    return " > ".join(parts)


def skill_chain_frequency_figure(records: Iterable[Mapping], top_k: int = 5):
    """Per task, horizontal bars of the `top_k` most frequent predicted skill chains (fraction of the task)."""
    by_task: Dict[str, Counter] = {}
    for r in records:
        chain = predicted_chain(r.get("skill_chain") or [])
        if chain is not None:
            by_task.setdefault(str(r.get("task")), Counter())[chain] += 1
    if not by_task:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "No skill chains recorded (dense or top-k model)", ha="center", va="center")
        return fig
    tasks = sorted(by_task)
    fig, axes = plt.subplots(len(tasks), 1, figsize=(8, 1.0 + 0.45 * top_k * len(tasks)), squeeze=False)
    for ax, task in zip(axes[:, 0], tasks):
        counts = by_task[task]
        total = sum(counts.values())
        top = counts.most_common(top_k)[::-1]  # most frequent on top
        ax.barh([c for c, _ in top], [n / total for _, n in top], color="tab:blue")
        ax.set_xlim(0, 1)
        ax.set_title(f"{task} (n={total})", fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
    axes[-1, 0].set_xlabel("fraction of samples")
    fig.tight_layout()
    return fig


def plot_skill_chain_frequency(records: Iterable[Mapping], path: str | os.PathLike, top_k: int = 5) -> Path:
    return _save(skill_chain_frequency_figure(records, top_k), path)


def expert_usage_figure(usage, layer_labels: Sequence[str]):
    """Heatmap of how often each expert is chosen per MoE layer (rows normalised to fractions)."""
    usage = np.asarray(usage, dtype=float)
    if usage.ndim != 2:
        raise ValueError(f"expert usage must be a (layers, experts) array, got shape {usage.shape}")
    if len(layer_labels) != usage.shape[0]:
        raise ValueError(f"{len(layer_labels)} layer labels for {usage.shape[0]} layers of expert usage")
    totals = usage.sum(axis=1, keepdims=True)
    frac = np.divide(usage, totals, out=np.zeros_like(usage), where=totals > 0)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * usage.shape[1], 1.0 + 0.35 * usage.shape[0]))
    im = ax.imshow(frac, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(usage.shape[1]))
    ax.set_xlabel("expert")
    ax.set_yticks(range(usage.shape[0]))
    ax.set_yticklabels(list(layer_labels), fontsize=8)
    fig.colorbar(im, ax=ax, label="fraction of tokens/samples")
    ax.set_title("Expert usage per MoE layer")
    fig.tight_layout()
    return fig


def plot_expert_usage(usage, layer_labels: Sequence[str], path: str | os.PathLike) -> Path:
    return _save(expert_usage_figure(usage, layer_labels), path)


def last_layer_experts(model):
    """The stacked experts of the model's last MoE layer (the paper's Fig. 7 compares their weights), or None
    where no MoE block has experts."""
    experts = [b.experts for b in model.layout.blocks if getattr(b, "experts", None) is not None]
    return experts[-1] if experts else None


def experts_similarity(experts) -> np.ndarray:
    """`expert_weight_similarity` of one stacked-experts module's gate/up and down projections."""
    return expert_weight_similarity([experts.gate_up_proj, experts.down_proj])


def expert_weight_similarity(stacked_weights: Sequence) -> np.ndarray:
    """(E, E) cosine similarity of the experts' flattened weights (paper Fig. 7).

    `stacked_weights`: tensors or arrays shaped (E, ...), e.g. one MoE layer's stacked gate/up/down projections;
    each expert's slices are flattened and concatenated into one vector.
    """
    if not stacked_weights:
        raise ValueError("expert_weight_similarity: give at least one stacked weight tensor")
    parts = []
    for i, w in enumerate(stacked_weights):
        if hasattr(w, "detach"):
            t = w.detach().cpu().double()
            # A copy, never a view: numpy's view would pin the tensor's storage (FSDP frees gathered parameters by
            # resizing theirs after the read).
            arr = (t.clone() if t.data_ptr() == w.data_ptr() else t).numpy()
        else:
            arr = np.asarray(w, dtype=np.float64)
        if arr.ndim < 2:
            raise ValueError(f"stacked_weights[{i}] must be shaped (experts, ...), got shape {arr.shape}")
        parts.append(arr.reshape(arr.shape[0], -1).astype(np.float64, copy=False))
    experts = {p.shape[0] for p in parts}
    if len(experts) != 1:
        raise ValueError(f"stacked weights disagree on the number of experts: {sorted(experts)}")
    flat = np.concatenate(parts, axis=1)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    unit = np.divide(flat, norms, out=np.zeros_like(flat), where=norms > 0)
    return np.clip(unit @ unit.T, -1.0, 1.0)


def _similarity_shown(m: np.ndarray, transform: str) -> Tuple[np.ndarray, str]:
    if transform == "log":
        return -np.log10(np.clip(1.0 - m, 1e-12, None)), "-log10(1 - cosine)"
    if transform == "none":
        return m, "cosine similarity"
    raise ValueError(f"transform: expected 'none' or 'log', got {transform!r}")


def _square(matrix, labels: Sequence[str]) -> np.ndarray:
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"similarity matrix must be square, got shape {m.shape}")
    if len(labels) != m.shape[0]:
        raise ValueError(f"{len(labels)} labels for a {m.shape[0]}x{m.shape[0]} similarity matrix")
    return m


def _off_diagonal_range(shown: Sequence[np.ndarray]) -> Tuple[Optional[float], Optional[float]]:
    # The diagonal (self-similarity 1, i.e. 12 after the log) would swamp the colour range of the pairs.
    values = np.concatenate([s[~np.eye(s.shape[0], dtype=bool)] for s in shown])
    if not values.size or float(values.min()) == float(values.max()):
        return None, None
    return float(values.min()), float(values.max())


def _draw_similarity(ax, m: np.ndarray, shown: np.ndarray, labels: Sequence[str], vmin, vmax):
    im = ax.imshow(shown, cmap="magma", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(m.shape[0]))
    ax.set_xticklabels(list(labels), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(m.shape[0]))
    ax.set_yticklabels(list(labels), fontsize=8)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:.3f}", ha="center", va="center", fontsize=7, color="grey")
    return im


def weight_similarity_figure(matrix, labels: Sequence[str], transform: str = "none"):
    """Heatmap of an expert similarity matrix.

    transform="log" shows -log10(1 - cos): experts initialised as copies of one FFN stay at cos 0.999..., which a
    linear colour scale renders as one flat colour (the paper log-transforms for the same reason).
    """
    m = _square(matrix, labels)
    shown, cbar = _similarity_shown(m, transform)
    vmin, vmax = _off_diagonal_range([shown])
    fig, ax = plt.subplots(figsize=(1.5 + 0.8 * m.shape[0], 1.0 + 0.8 * m.shape[0]))
    im = _draw_similarity(ax, m, shown, labels, vmin, vmax)
    fig.colorbar(im, ax=ax, label=cbar)
    ax.set_title("Expert weight similarity")
    fig.tight_layout()
    return fig


def weight_similarity_panels_figure(panels: Mapping[str, Tuple[object, Sequence[str]]], transform: str = "log",
                                    title: str = "Expert weight similarity, last MoE layer"):
    """Several models' expert similarity matrices side by side on one colour scale (paper Fig. 7: MoE vs MoSE).
    `panels`: {panel title: (matrix, expert labels)}."""
    if not panels:
        raise ValueError("weight similarity panels: nothing to draw")
    items = [(name, _square(matrix, labels), labels) for name, (matrix, labels) in panels.items()]
    shown = [_similarity_shown(m, transform) for _, m, _ in items]
    vmin, vmax = _off_diagonal_range([s for s, _ in shown])
    size = max(m.shape[0] for _, m, _ in items)
    fig, axes = plt.subplots(1, len(items), figsize=(0.9 + 0.8 * size * len(items), 1.3 + 0.8 * size), squeeze=False)
    im = None
    for ax, (name, m, labels), (s, _) in zip(axes[0], items, shown):
        im = _draw_similarity(ax, m, s, labels, vmin, vmax)
        ax.set_title(name, fontsize=10)
    fig.colorbar(im, ax=list(axes[0]), label=shown[0][1], shrink=0.8)
    fig.suptitle(title)
    return fig


def plot_weight_similarity_panels(panels: Mapping[str, Tuple[object, Sequence[str]]], path: str | os.PathLike,
                                  transform: str = "log", title: str = "Expert weight similarity, last MoE layer") -> Path:
    return _save(weight_similarity_panels_figure(panels, transform, title), path)


def learning_curves_figure(curves: Mapping[str, Mapping[str, Mapping[int, Tuple[float, float]]]],
                           metrics: Sequence[Tuple[str, str]]):
    """One panel per metric, one line per run group: {group: {metric: {step: (mean, std)}}} with a band of
    one std (over seeds). `metrics`: (key, axis label) pairs."""
    if not curves:
        raise ValueError("learning curves: nothing to plot")
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics):
        for group, by_metric in curves.items():
            points = by_metric.get(key) or {}
            if not points:
                continue
            steps = sorted(points)
            mean = np.array([points[s][0] for s in steps], dtype=float)
            std = np.array([points[s][1] or 0.0 for s in steps], dtype=float)
            (line,) = ax.plot(steps, mean, marker="o", markersize=3, label=str(group))
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in axes[0]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
            break
    fig.suptitle("Validation during fine-tuning (mean over seeds, band: ± std)")
    fig.tight_layout()
    return fig


def plot_learning_curves(curves, metrics: Sequence[Tuple[str, str]], path: str | os.PathLike) -> Path:
    return _save(learning_curves_figure(curves, metrics), path)


def plot_weight_similarity(matrix, labels: Sequence[str], path: str | os.PathLike, transform: str = "none") -> Path:
    return _save(weight_similarity_figure(matrix, labels, transform), path)


def data_scaling_figure(results: Mapping[str, Mapping[float, Tuple[float, float]]], metric: str = "Score"):
    """One line per variant: metric against the fraction of training data, error bars = std (paper Fig. 8)."""
    if not results:
        raise ValueError("data scaling: no variants to plot")
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, points in results.items():
        fracs = sorted(points, key=float)
        means = [float(points[f][0]) for f in fracs]
        stds = [float(points[f][1] or 0.0) for f in fracs]
        ax.errorbar([100.0 * float(f) for f in fracs], means, yerr=stds, marker="o", capsize=3, label=str(variant))
    ax.set_xlabel("training data used (%)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Data scaling")
    fig.tight_layout()
    return fig


def plot_data_scaling(
    results: Mapping[str, Mapping[float, Tuple[float, float]]], path: str | os.PathLike, metric: str = "Score"
) -> Path:
    return _save(data_scaling_figure(results, metric), path)


def view_confusion_figure(confusion, classes: Sequence[str]):
    """The view router's confusion matrix: rows the target view class, columns its top-1, counts annotated."""
    matrix = np.asarray(confusion, dtype=float)
    if matrix.shape != (len(classes), len(classes)):
        raise ValueError(f"view confusion must be {len(classes)}x{len(classes)} for classes {list(classes)}, "
                         f"got shape {matrix.shape}")
    totals = matrix.sum(axis=1, keepdims=True)
    frac = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    size = 1.5 + 0.75 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    short = [c.replace("CAM_", "") for c in classes]
    ax.set_xticks(range(len(classes)))
    ax.set_xticklabels(short, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)))
    ax.set_yticklabels(short, fontsize=8)
    for i in range(len(classes)):
        for j in range(len(classes)):
            if matrix[i, j]:
                ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xlabel("router top-1")
    ax.set_ylabel("needed view")
    fig.colorbar(im, ax=ax, label="fraction of the row")
    ax.set_title("View router confusion")
    fig.tight_layout()
    return fig


def plot_view_confusion(confusion, classes: Sequence[str], path: str | os.PathLike) -> Path:
    return _save(view_confusion_figure(confusion, classes), path)
