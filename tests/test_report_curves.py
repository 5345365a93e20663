"""Loss curves: the records a run logged read back from its metrics.jsonl, and drawn per study (one colour per value,
one line style per seed), from files written by the training engine's own MetricsLog."""

from __future__ import annotations

import pytest

from experiments.report import plots
from experiments.report.plots import SEED_STYLES, plot_curves
from experiments.report.studies import Study, Value
from training.metrics import METRICS_FILE, MetricsLog, read_metrics


def log_run(run_dir, val: list[float], train: list[float], tokens_per_step: int = 1024) -> None:
    """What the loop logs: the plan at step 0, val loss at steps 0 and last, train loss at every step."""
    log = MetricsLog(run_dir, config={})
    log.log({"step": 0, "tokens_per_step": tokens_per_step, "steps": len(train)})
    log.log({"step": 0, "tokens": 0, "val_loss": val[0]})
    for s, loss in enumerate(train, 1):
        log.log({"step": s, "tokens": s * tokens_per_step, "train_loss": loss, "lr": 1e-3})
    log.log({"step": len(train), "tokens": len(train) * tokens_per_step, "val_loss": val[1]})


def test_read_metrics_returns_records_in_order(tmp_path):
    log_run(tmp_path, [5.0, 4.0], [4.9, float("nan"), 4.5])
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [0, 0, 1, 2, 3, 3]
    assert recs[3]["train_loss"] is None  # a non-finite loss is written as null
    assert recs[-1] == {"step": 3, "tokens": 3072, "val_loss": 4.0}


def test_read_metrics_without_a_file_is_empty_and_a_broken_line_is_named(tmp_path):
    assert read_metrics(tmp_path / "no_such_run") == []
    (tmp_path / METRICS_FILE).write_text('{"step": 0}\n\n{"step": 1, "train_lo\n')
    with pytest.raises(ValueError, match=rf"{METRICS_FILE}:3 is not a JSON record"):
        read_metrics(tmp_path)


@pytest.fixture
def drawn(monkeypatch):
    """plot_curves' figure, kept instead of closed, to read back what it drew."""
    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig) or path)
    return figs


def study(*values: Value) -> Study:
    return Study("lora_rank", "lora.rank", "h", list(values))


def runs(*names: str) -> list[dict]:
    return [{"seed": s, "status": "ok", "run_dir": f"runs/{n}"} for s, n in enumerate(names)]


def test_one_colour_per_value_one_style_per_seed(tmp_path, drawn):
    log_run(tmp_path / "runs/a", [5.0, 4.0], [4.9, 4.6])
    log_run(tmp_path / "runs/b", [5.0, 4.1], [4.8, 4.7])
    log_run(tmp_path / "runs/c", [5.0, 3.9], [4.7, 4.4, 4.2], tokens_per_step=512)
    st = study(Value(4, None, True, runs("a", "b")), Value(8, None, False, runs("c", "gone")))
    assert plot_curves(st, tmp_path, tmp_path / "curves.png") == tmp_path / "curves.png"
    train, val = drawn[0].axes
    assert len(train.lines) == len(val.lines) == 3  # the run without a metrics file draws nothing
    assert [list(line.get_xdata()) for line in train.lines] == [[1024, 2048], [1024, 2048], [512, 1024, 1536]]
    assert [list(line.get_ydata()) for line in val.lines] == [[5.0, 4.0], [5.0, 4.1], [5.0, 3.9]]
    colours = [line.get_color() for line in val.lines]
    assert colours[0] == colours[1] != colours[2]
    styles = [line.get_linestyle() for line in val.lines]
    assert styles[0] == styles[2] != styles[1] and len(set(SEED_STYLES)) == len(SEED_STYLES)
    assert [t.get_text() for t in val.get_legend().get_texts()] == ["rank 4 (baseline)", "rank 8"]


def test_non_finite_losses_are_skipped_and_a_folder_without_metrics_gives_none(tmp_path, drawn):
    log_run(tmp_path / "runs/a", [5.0, 4.0], [4.9, float("inf"), 4.5])
    plot_curves(study(Value(4, None, True, runs("a"))), tmp_path, tmp_path / "curves.png")
    assert list(drawn[0].axes[0].lines[0].get_xdata()) == [1024, 3072]
    assert plot_curves(study(Value(4, None, True, runs("x", "y"))), tmp_path, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_the_png_is_written(tmp_path):
    log_run(tmp_path / "runs/a", [5.0, 4.0], [4.9, 4.6])
    path = plot_curves(study(Value(4, None, True, runs("a"))), tmp_path, tmp_path / "plots" / "curves.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
