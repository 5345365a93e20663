"""Plots of a report. Per study: val ppl / train time / memory against the swept value; val ppl against trainable
parameters and against train time with the Pareto front and the recommended value; target against source ppl
(learning against forgetting); train and val loss against tokens (each run's metrics.jsonl). Over every run: val ppl
against trainable parameters. matplotlib, Agg backend: every plot is saved as a PNG (the notebook shows the files)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from experiments.report.fmt import MIB  # noqa: E402
from experiments.report.recommend import METRIC, front, recommend  # noqa: E402
from experiments.report.studies import Study, Value  # noqa: E402
from training.metrics import read_metrics  # noqa: E402

LOG2_KEYS = {"lora.rank", "model.max_position_embeddings"}
SEED_STYLES = ("-", "--", ":", "-.")  # loss curves: the runs of one value, seed by seed


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


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _half(v: Value, metric: str) -> float:
    s = v.summary(metric)
    return 0.0 if s is None or s.half is None else s.half


def plot_study(st: Study, path: Path) -> Path:
    """Four panels against the swept value: val ppl, train time, peak memory, activations saved for backward."""
    xs, labels, log2 = _x(st)
    fig, grid = plt.subplots(2, 2, figsize=(11, 7.5))
    axes = grid.ravel()
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
    fig.suptitle(f"{st.ablation}: ringed = baseline{note}\n{_bars(st)}", fontsize=11)
    return _save(fig, path)


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
    return _save(fig, path)


def _tradeoff_panel(ax, st: Study, cost: str, rec: Value | None, xlabel: str) -> None:
    """One cost axis: every value (ppl CI bars; light cost CI bars where the cost varies over seeds), the Pareto
    front as a line through its values, the recommended value starred."""
    vs = [v for v in st.values if v.mean(METRIC) is not None and v.mean(cost) is not None]
    ax.set_xlabel(xlabel)
    if len(vs) > 1 and len({v.mean(cost) for v in vs}) == 1:  # e.g. context length: every value has the same
        ax.text(0.5, 0.5, f"every value has the same {xlabel}:\n{vs[0].mean(cost):,.0f}", ha="center", va="center")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    line = front(st, cost)
    if line:
        ax.plot(
            [v.mean(cost) for v in line],
            [v.mean(METRIC) for v in line],
            "-",
            lw=2.5,
            color="tab:green",
            alpha=0.5,
            zorder=1,
            label="Pareto front (no value beats these on both axes)",
        )
    for i, v in enumerate(vs):
        x, y = v.mean(cost), v.mean(METRIC)
        on = any(v is w for w in line)
        color = "tab:blue" if on else "tab:gray"
        if _half(v, cost):
            ax.errorbar([x], [y], xerr=[_half(v, cost)], fmt="none", capsize=2, color=color, alpha=0.3)
        ax.errorbar(
            [x],
            [y],
            yerr=[_half(v, METRIC)] if _half(v, METRIC) else None,
            fmt="o",
            capsize=3,
            ms=6,
            color=color,
            mfc=color if on else "white",
        )
        if v.is_baseline:
            ax.plot([x], [y], "o", ms=13, mfc="none", mec="black", zorder=5)
        ax.annotate(st.named(v), (x, y), textcoords="offset points", xytext=(7, 5 if i % 2 else -11), fontsize=8)
    if rec is not None and any(rec is v for v in vs):
        ax.plot(
            [rec.mean(cost)],
            [rec.mean(METRIC)],
            "*",
            ms=18,
            color="gold",
            mec="black",
            zorder=6,
            label=f"recommended: {st.named(rec)}",
        )
    xs = [v.mean(cost) for v in vs]
    if cost == "trainable_params" and xs and max(xs) >= 4 * min(xs):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel + " (log)")
    ax.set_ylabel("validation perplexity")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:  # no recommendation (no finished run): nothing to name
        ax.legend(fontsize=8)


def _bars(st: Study) -> str:
    """What the error bars of a study's plot are, and why they overlap more than the paired test says."""
    if max((len(v.ok) for v in st.values), default=0) < 2:
        return "1 seed per value (no error bars)"
    return "bars: 95% CI of each mean over seeds; the table's paired Δ removes the shift a seed gives every value"


def plot_tradeoff(st: Study, path: Path) -> Path:
    """Val ppl against trainable parameters and against train time, Pareto front drawn, recommended value starred
    (experiments.report.recommend)."""
    rec = recommend(st)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    _tradeoff_panel(axes[0], st, "trainable_params", rec and rec.value, "trainable parameters")
    _tradeoff_panel(axes[1], st, "train_time_s", rec and rec.value, "train time (s)")
    note = "; recommendation provisional (1 seed)" if rec and rec.provisional else ""
    fig.suptitle(
        f"{st.ablation}: perplexity against cost; ringed = baseline; hollow = off the Pareto front{note}\n{_bars(st)}",
        fontsize=11,
    )
    return _save(fig, path)


def plot_forgetting(st: Study, path: Path) -> Path | None:
    """Target val ppl against source ppl, one point per value with 95% CI bars both ways, and an arrow from the
    base model (before fine-tuning) to each: down is learning, right is forgetting. None without a source set."""
    vs = [v for v in st.values if v.mean(METRIC) is not None and v.mean("source_val_ppl") is not None]
    if not vs:
        return None
    fig, ax = plt.subplots(figsize=(8, 6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    bases = set()
    for i, v in enumerate(vs):
        c = colors[i % len(colors)]
        x, y = v.mean("source_val_ppl"), v.mean(METRIC)
        xerr, yerr = _half(v, "source_val_ppl"), _half(v, METRIC)
        ax.errorbar(
            [x],
            [y],
            xerr=[xerr] if xerr else None,
            yerr=[yerr] if yerr else None,
            fmt="o",
            capsize=3,
            color=c,
            label=st.named(v) + (" (baseline)" if v.is_baseline else ""),
        )
        bx, by = v.mean("base_source_val_ppl"), v.mean("base_val_ppl")
        if bx is not None and by is not None:
            ax.annotate("", (x, y), (bx, by), arrowprops={"arrowstyle": "->", "color": c, "alpha": 0.4, "lw": 1})
            bases.add((round(bx, 6), round(by, 6)))
    for bx, by in bases:
        ax.plot([bx], [by], "kx", ms=9)
    if bases:
        ax.plot([], [], "kx", label="base model, before fine-tuning")
    ax.set_xlabel("source ppl: held-out base-domain text (right = more forgetting)")
    ax.set_ylabel("target validation ppl (down = more learning)")
    ax.ticklabel_format(useOffset=False, style="plain")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{st.ablation}: learning against forgetting\n{_bars(st)}", fontsize=10)
    return _save(fig, path)


def plot_lr(st: Study, path: Path) -> Path:
    """Validation perplexity against the learning rate, one line per value (mean over seeds, 95% CI), the chosen
    lr of each value marked: whether the choice is clear or the grid too narrow."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for v in st.values:
        lrs = sorted(v.grid)
        summaries = [Value(v.value, v.index, v.is_baseline, v.grid[lr]).summary("val_ppl") for lr in lrs]
        pts = [(lr, s) for lr, s in zip(lrs, summaries) if s is not None]
        if not pts:
            continue
        line = ax.errorbar(
            [lr for lr, _ in pts],
            [s.mean for _, s in pts],
            yerr=[s.half or 0.0 for _, s in pts],
            fmt="-o",
            capsize=3,
            ms=4,
            label=st.named(v),
        )
        chosen = next((s for lr, s in pts if lr == v.chosen_lr), None)
        if chosen is not None:
            ax.plot([v.chosen_lr], [chosen.mean], "*", ms=14, color=line[0].get_color(), mec="black", zorder=5)
    ax.set_xscale("log")
    ax.set_xticks(st.lr_grid, [f"{lr:g}" for lr in st.lr_grid])
    ax.minorticks_off()
    ax.set_xlabel("learning rate (log)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"{st.ablation}: star = the lr the tune split chose (validation not used)\n{_bars(st)}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_curves(st: Study, out_dir: Path, path: Path) -> Path | None:
    """Train and validation loss against tokens seen, from each run's metrics.jsonl under `out_dir`: one colour per
    value, one line style per seed. None when no run of the study has a metrics file (a folder of results only)."""
    runs = [
        (i, j, v, read_metrics(Path(out_dir) / r["run_dir"]))
        for i, v in enumerate(st.values)
        for j, r in enumerate(v.rows)  # rows are in seed order
    ]
    runs = [run for run in runs if run[3]]
    if not runs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    named: set[int] = set()  # values already in the legend: one entry per value, not per seed
    for i, j, v, recs in runs:
        label = None if i in named else st.named(v) + (" (baseline)" if v.is_baseline else "")
        named.add(i)
        style = SEED_STYLES[j % len(SEED_STYLES)]
        for ax, key in zip(axes, ("train_loss", "val_loss")):
            pts = [(r["tokens"], r[key]) for r in recs if r.get(key) is not None and r.get("tokens") is not None]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, style, marker="o", ms=3, lw=1.3, color=colors[i % len(colors)], alpha=0.8, label=label)
    axes[0].set_ylabel("train loss (mean over each logging window)")
    axes[1].set_ylabel("validation loss (at 0 tokens: the base model)")
    for ax in axes:
        ax.set_xlabel("training tokens seen")
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    seeds = max(len(v.rows) for v in st.values)
    how = "one line per run: colour = value, line style = seed" if seeds > 1 else "one line per run (1 seed)"
    fig.suptitle(f"{st.ablation}: loss against training tokens; {how}", fontsize=11)
    return _save(fig, path)


def plot_all(studies: list[Study], folder: Path) -> dict[str, Path]:
    """Write every plot into `folder`; returns {plot name: path} (no forgetting plot for a study without a
    source set)."""
    folder = Path(folder)
    out = {}
    for st in studies:
        out[st.slug] = plot_study(st, folder / f"{st.slug}.png")
        out[f"{st.slug}_tradeoff"] = plot_tradeoff(st, folder / f"{st.slug}_tradeoff.png")
        forgetting = plot_forgetting(st, folder / f"{st.slug}_forgetting.png")
        if forgetting is not None:
            out[f"{st.slug}_forgetting"] = forgetting
        if st.lr_grid:
            out[f"{st.slug}_lr"] = plot_lr(st, folder / f"{st.slug}_lr.png")
    out["ppl_vs_params"] = plot_ppl_vs_params(studies, folder / "ppl_vs_params.png")
    return out
