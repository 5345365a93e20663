"""Plots of a report: per study, val ppl / train time / memory against the swept value; and val ppl against
trainable parameters over every run. matplotlib with the Agg backend (no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.studies import Study, Value  # noqa: E402

LOG2_KEYS = {"lora.rank", "model.max_position_embeddings"}
MIB = 2**20


def _x(st: Study) -> tuple[list[float], list[str], bool]:
    """x positions, tick labels and whether the axis is log2: numbers as they are, anything else categorical."""
    if st.numeric:
        xs = [float(v.value) for v in st.values]
        log2 = st.key in LOG2_KEYS or (min(xs) > 0 and all(math.log2(x).is_integer() for x in xs) and len(xs) > 2)
        return xs, [v.label for v in st.values], log2
    return list(range(len(st.values))), [v.short for v in st.values], False


def _panel(
    ax, st: Study, xs: list[float], metric: str, scale: float, color: str, label: str | None = None, style: str = "-o"
) -> None:
    """Means with 95% CI error bars (seeds >= 2) at each value that has the metric; the baseline ringed."""
    pts = [(x, v.summary(metric), v) for x, v in zip(xs, st.values)]
    pts = [(x, s, v) for x, s, v in pts if s is not None]
    if not pts:
        return
    x = [p[0] for p in pts]
    y = [p[1].mean / scale for p in pts]
    err = [(p[1].half or 0.0) / scale for p in pts]
    ax.errorbar(x, y, yerr=err if any(err) else None, fmt=style, color=color, capsize=4, label=label, ms=5)
    for xx, s, v in pts:
        if v.is_baseline:
            ax.plot([xx], [s.mean / scale], "o", ms=12, mfc="none", mec="black", zorder=5)


def plot_study(st: Study, path: Path) -> Path:
    """Four panels against the swept value: val ppl, train time, peak memory, activations saved for backward."""
    xs, labels, log2 = _x(st)
    fig, grid = plt.subplots(2, 2, figsize=(11, 7.5))
    axes = grid.ravel()
    seeds = max((len(v.rows) for v in st.values), default=1)
    panels = [
        ("val_ppl", 1.0, "tab:blue", "validation perplexity"),
        ("train_time_s", 1.0, "tab:orange", "train time (s)"),
        ("peak_memory_bytes", MIB, "tab:red", "peak memory (MiB; GPU allocator / CPU RSS)"),
        ("saved_for_backward_bytes", MIB, "tab:purple", "saved for backward (MiB, per micro-batch)"),
    ]
    for ax, (metric, scale, color, ylabel) in zip(axes, panels):
        _panel(ax, st, xs, metric, scale, color)
        ax.set_ylabel(ylabel)
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        if log2:
            ax.set_xscale("log", base=2)
            ax.minorticks_off()
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, rotation=0 if st.numeric else 15, ha="center" if st.numeric else "right")
        ax.set_xlabel(st.key + (" (log2)" if log2 else ""))
        ax.grid(alpha=0.3)
    failed = [v.short for v in st.values if not v.ok]
    note = f"; no finished run: {', '.join(failed)}" if failed else ""
    bars = "error bars: 95% CI over seeds" if seeds >= 2 else "1 seed per value (no error bars)"
    fig.suptitle(f"{st.ablation}: {bars}; ringed = baseline{note}", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ppl_vs_params(studies: list[Study], path: Path) -> Path:
    """Every value of every study: mean val ppl against trainable parameters (log x), one colour per study."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels: dict[tuple[float, float], list[tuple[str, str]]] = {}  # a config shared by studies: one label
    for i, st in enumerate(studies):
        pts: list[tuple[float, float, float, Value]] = []
        for v in st.values:
            p, s = v.mean("trainable_params"), v.summary("val_ppl")
            if p is not None and s is not None:
                pts.append((p, s.mean, s.half or 0.0, v))
        if not pts:
            continue
        c = colors[i % len(colors)]
        ax.errorbar(
            [p[0] for p in pts],
            [p[1] for p in pts],
            yerr=[p[2] for p in pts] if any(p[2] for p in pts) else None,
            fmt="o",
            color=c,
            capsize=3,
            label=f"{st.ablation} ({st.key})",
            alpha=0.85,
        )
        for p, m, _, v in pts:
            labels.setdefault((p, m), []).append((v.short, c))
    column: dict[float, list[float]] = {}  # points with the same parameter count share an x
    for p, m in sorted(labels):
        column.setdefault(p, []).append(m)
    for (p, m), names in labels.items():
        text = " = ".join(dict.fromkeys(n for n, _ in names))
        left = column[p].index(m) % 2 == 1  # alternate sides so neighbours in a column do not overlap
        ax.annotate(
            text,
            (p, m),
            textcoords="offset points",
            xytext=(-6, -3) if left else (5, 4),
            fontsize=7,
            ha="right" if left else "left",
            color=names[0][1] if len(names) == 1 else "black",
        )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Val perplexity vs trainable parameters, every run (mean over seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(studies: list[Study], folder: Path) -> dict[str, Path]:
    """Write every plot into `folder`; returns {plot name: path}."""
    out = {st.slug: plot_study(st, Path(folder) / f"{st.slug}.png") for st in studies}
    out["ppl_vs_params"] = plot_ppl_vs_params(studies, Path(folder) / "ppl_vs_params.png")
    return out
