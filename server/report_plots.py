"""Audit report figures, each drawn on a fresh Agg figure and returned as a base64 PNG."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from configs.schema import CohortSchema, ColumnSpec
from models.pairs import pair_key
from server.report_gates import finite

_DPI = 90


def _figure_tools() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise RuntimeError("the audit report needs matplotlib (pip install matplotlib)") from err
    return Figure, FigureCanvasAgg


def png_of(draw: Callable[[Any], None], size: tuple[float, float]) -> str:
    """Draw on a fresh Agg figure (no pyplot state) and return it as a base64 PNG."""
    figure_cls, canvas_cls = _figure_tools()
    fig = figure_cls(figsize=size, dpi=_DPI, layout="constrained")
    canvas_cls(fig)
    draw(fig)
    buffer = io.BytesIO()
    # No "Software" entry: the PNG bytes then depend only on what was drawn.
    fig.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


_SERIES_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


def marginal_png(spec: ColumnSpec, entry: dict[str, Any], score: float | None) -> str:
    """One column's DP-reference vs synthetic shares (bars if categorical, steps if numeric)."""
    title = spec.name if score is None else f"{spec.name} (shape {score:.3f})"
    series = {"DP reference": entry["reference"], "synthetic": entry["synthetic"]}
    return shares_png(spec, series, title=title, cells=entry.get("cells"))


def shares_png(
    spec: ColumnSpec, series: Mapping[str, Sequence[float]], *, title: str, cells: Sequence[str] | None = None
) -> str:
    """One column's shares of rows per cell, one series per table; the first is the reference."""

    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        width = 0.8 / max(len(series), 1)
        for i, (label, shares) in enumerate(series.items()):
            values, colour = np.asarray(shares, dtype=np.float64), _SERIES_COLOURS[i % len(_SERIES_COLOURS)]
            if spec.is_categorical:
                x = np.arange(len(values))
                ax.bar(x - 0.4 + width * (i + 0.5), values, width=width, label=label, color=colour)
            elif i == 0:
                ax.stairs(values, spec.bin_edges(), label=label, color=colour, fill=True, alpha=0.35)
            else:
                ax.stairs(values, spec.bin_edges(), label=label, color=colour, linewidth=1.8)
        if spec.is_categorical:
            labels = list(cells) if cells is not None else list(spec.categories or ())
            ax.set_xticks(np.arange(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        else:
            ax.set_xlabel(spec.unit or spec.name, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("share of rows", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)

    return png_of(draw, (3.6, 2.7))


def _difference_matrix(names: list[str], pair_differences: Mapping[str, float]) -> np.ndarray:
    """Symmetric column x column matrix of the differences; NaN where a pair has none."""
    matrix = np.full((len(names), len(names)), np.nan)
    for i, a in enumerate(names):
        for j, b in enumerate(names[i + 1 :], start=i + 1):
            value = finite(pair_differences.get(pair_key(a, b), pair_differences.get(pair_key(b, a))))
            if value is not None:
                matrix[i, j] = matrix[j, i] = value
    return matrix


def heatmap_png(
    schema: CohortSchema,
    pair_differences: Mapping[str, float],
    *,
    title: str = "association difference (Pearson r / Cramér's V)",
    colorbar_label: str = "synthetic - reference association",
) -> str:
    """Synthetic minus reference association per column pair, on a symmetric colour scale."""
    names = schema.column_names
    matrix = _difference_matrix(names, pair_differences)
    finite_cells = matrix[np.isfinite(matrix)]
    limit = max(0.1, float(np.abs(finite_cells).max())) if finite_cells.size else 1.0

    def draw(fig: Any) -> None:
        import matplotlib as mpl

        ax = fig.add_subplot()
        cmap = mpl.colormaps["RdBu_r"].with_extremes(bad="#dddddd")
        image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=-limit, vmax=limit)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        for i in range(len(names)):
            for j in range(len(names)):
                if np.isfinite(matrix[i, j]):
                    ax.text(j, i, f"{matrix[i, j]:+.2f}", ha="center", va="center", fontsize=6.5)
        fig.colorbar(image, ax=ax, label=colorbar_label)
        ax.set_title(title, fontsize=9)

    return png_of(draw, (7.0, 5.8))


def dcr_png(
    entry: Mapping[str, Any],
    *,
    labels: tuple[str, str] = ("members", "held out (non-members)"),
    xlabel: str = "distance bin to the synthetic sample (nearest on the right)",
    ylabel: str = "share of patients (noisy)",
) -> str:
    """Members' and held-out patients' shares per distance bin (noisy), nearest bin on the right."""
    members = np.asarray(entry.get("members_share", ()), dtype=np.float64)
    holdout = np.asarray(entry.get("nonmembers_share", ()), dtype=np.float64)

    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        if members.size >= 2 and members.size == holdout.size:
            edges = np.arange(members.size + 1)
            ax.stairs(members, edges, label=labels[0], color="#c44e52", linewidth=1.6)
            ax.stairs(holdout, edges, label=labels[1], color="#4c72b0", linewidth=1.6)
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no histogram", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        score = finite(entry.get("score"))
        suffix = "" if score is None else f" (protection {score:.3f})"
        ax.set_title(f"DCR: {entry.get('hospital', '?')}{suffix}", fontsize=9)
        ax.tick_params(labelsize=7)

    return png_of(draw, (4.2, 2.9))


def _roc_curves(linear: Any, low: Any, curves: list[Mapping[str, Any]]) -> None:
    """One line per hospital (or `label`) on both axes; curves without a usable ROC are left out."""
    for entry in curves:
        fpr = np.asarray(entry.get("roc_fpr", ()), dtype=np.float64)
        tpr = np.asarray(entry.get("roc_tpr", ()), dtype=np.float64)
        if fpr.size == 0 or fpr.size != tpr.size:
            continue
        auc = finite(entry.get("auc"))
        name = entry.get("label", entry.get("hospital", "?"))
        label = f"{name}" + ("" if auc is None else f" (AUC {auc:.3f})")
        linear.plot(fpr, tpr, linewidth=1.5, label=label)
        positive = fpr > 0  # the log axis cannot show FPR 0
        low.plot(fpr[positive], tpr[positive], linewidth=1.5)


def roc_png(name: str, curves: list[Mapping[str, Any]]) -> str:
    """One attack's ROC per hospital, on linear axes and zoomed into the low-FPR region."""

    def draw(fig: Any) -> None:
        linear, low = fig.subplots(1, 2)
        diagonal = np.logspace(-4, 0, 200)
        for ax in (linear, low):
            ax.plot(diagonal, diagonal, linestyle="--", color="grey", linewidth=1, label="chance")
        _roc_curves(linear, low, curves)
        linear.set(xlim=(0, 1), ylim=(0, 1))
        low.set_xscale("log")
        low.set(xlim=(1e-4, 1), ylim=(0, 1))
        low.axvline(0.01, color="black", linewidth=0.8, linestyle=":")
        for ax, title in ((linear, f"ROC: {name}"), (low, "low-FPR region (log FPR)")):
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("false positive rate", fontsize=8)
            ax.set_ylabel("true positive rate", fontsize=8)
            ax.tick_params(labelsize=7)
        linear.legend(fontsize=7, loc="lower right")

    return png_of(draw, (7.6, 3.2))


_ACTION_STYLES = {"accept": ("o", "#55a868"), "keep": ("s", "#8c8c8c"), "rollback": ("X", "#c44e52")}


def _timeline_markers(ax: Any, xs: list[Any], scores: list[float | None], rounds: list[Any]) -> None:
    """One marker style per SA-DQC action, at the rounds whose overall score is known."""
    for action, (marker, color) in _ACTION_STYLES.items():
        points = [(x, s) for x, s, d in zip(xs, scores, rounds, strict=True) if d["action"] == action]
        points = [(x, s) for x, s in points if s is not None]
        if points:
            ax.scatter(*zip(*points, strict=True), marker=marker, color=color, label=action, zorder=3)


def timeline_png(decisions: list[Mapping[str, Any]]) -> str | None:
    """Overall quality per SA-DQC round decision with its rollback floor; None if there were none."""
    rounds = [d for d in decisions if d.get("action") in {"accept", "keep", "rollback"}]
    if not rounds:
        return None
    # Round numbers restart per stage, so with several stages the x axis counts decisions instead.
    use_round = len({d.get("stage", "") for d in rounds}) == 1

    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        xs = [d["round"] if use_round else i + 1 for i, d in enumerate(rounds)]
        scores = [finite((d.get("scores") or {}).get("overall")) for d in rounds]
        ax.plot(xs, [np.nan if s is None else s for s in scores], color="#4c72b0", linewidth=1)
        floor = [
            np.nan
            if d.get("best_score") is None
            else d["best_score"] - d.get("next_threshold", d.get("threshold", 0.0))
            for d in rounds
        ]
        ax.step(xs, floor, where="post", color="#c44e52", linestyle=":", label="rollback below")
        _timeline_markers(ax, xs, scores, rounds)
        ax.set_xlabel("round" if use_round else "decision #", fontsize=8)
        ax.set_ylabel("overall quality", fontsize=8)
        ax.set_title("SA-DQC decisions", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)

    return png_of(draw, (6.4, 3.0))
